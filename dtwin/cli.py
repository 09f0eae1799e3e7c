"""The ``dtwin`` command. Subcommands import their modules lazily, so the controller side runs
without torch installed."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from forecaster.data import DEFAULT_SERIES, DatasetError, Site


def env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None,
                   help="dataset folder (data_series_info.txt, data_series/); default $DTWIN_DATA, "
                        "else a synthetic site")
    p.add_argument("--series", default=",".join(DEFAULT_SERIES),
                   help="INTERNET,SESSIONS,VPN,DOWNSTREAM series ids (default %(default)s, the paper's)")
    p.add_argument("--synthetic-seed", type=int, default=0, help="seed of the synthetic site (default 0)")
    p.add_argument("--limit-samples", type=int, default=None,
                   help="use only the first N samples (for quick runs)")


def load_site_from_args(args: argparse.Namespace) -> Site:
    from forecaster.data import load_site, parse_series_arg, resolve_data_dir

    data_dir = resolve_data_dir(args.data)
    if data_dir is None:
        from forecaster.synthetic import generate_site

        site = generate_site(0, seed=args.synthetic_seed)
    else:
        site = load_site(data_dir, parse_series_arg(args.series))
    if args.limit_samples:
        site = site.slice(0, args.limit_samples)
    return site


def cmd_evaluate(args: argparse.Namespace) -> int:
    from forecaster.evaluate import evaluate
    from forecaster.models import MODEL_KINDS, PRODUCTION_KIND

    kinds = [args.model] if args.model else ["paper", PRODUCTION_KIND]
    for k in kinds:
        if k not in MODEL_KINDS:
            raise SystemExit(f"dtwin evaluate: unknown --model {k!r}; choose from {', '.join(MODEL_KINDS)}")
    site = load_site_from_args(args)
    report = evaluate(site, Path(args.out), kinds, checkpoint=Path(args.checkpoint) if args.checkpoint else None,
                      epochs=args.epochs, seed=args.seed, sla_target=args.sla_target)
    print((Path(args.out) / "report.md").read_text().split("## Headroom")[0])
    print(f"wrote {args.out}/report.md, report.json and {len(list(Path(args.out).glob('*.png')))} figures")
    return 0 if report["allocators"] else 1


def cmd_train(args: argparse.Namespace) -> int:
    from forecaster.train import (
        TRAIN_PRESETS,
        make_checkpoint,
        prepare,
        save_checkpoint,
        train,
        with_epochs,
    )

    site = load_site_from_args(args)
    prep = prepare(site)
    trained = train(args.model, prep, with_epochs(TRAIN_PRESETS[args.model], args.epochs, args.seed))
    ckpt = make_checkpoint(trained, prep)
    path = save_checkpoint(ckpt, args.out)
    m = ckpt["test_metrics"]
    print(f"{args.model}: test MAE {m['mae']:.2f}, RMSE {m['rmse']:.2f} over {m['n']} intervals; "
          f"{trained.seconds:.1f} s; checkpoint {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dtwin", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("evaluate", help="train or load models and write the offline report")
    add_data_args(p)
    p.add_argument("--model", default=None, help="paper or delta_mlp (default: both)")
    p.add_argument("--checkpoint", default=None, help="evaluate this checkpoint instead of training")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--epochs", type=int, default=None, help="override the preset's maximum epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sla-target", type=float, default=float(env("DTWIN_SLA_TARGET", "0.01")),
                   help="target share of under-provisioned intervals (default 0.01, $DTWIN_SLA_TARGET)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("train", help="train one model and save its checkpoint")
    add_data_args(p)
    p.add_argument("--model", default="delta_mlp", help="paper or delta_mlp (default %(default)s)")
    p.add_argument("--out", required=True, help="checkpoint path (.pt)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train)

    from dtwin import commands

    commands.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DatasetError as exc:
        print(f"dtwin {args.command}: dataset error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
