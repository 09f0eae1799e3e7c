"""``dtwin train`` and ``dtwin evaluate``: models and the offline report."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from dtwin.args import add_data_args, env, load_sites_from_args, parse_site_ids


def _kinds(text: str | None, command: str) -> list[str]:
    from forecaster.models import MODEL_KINDS, PRODUCTION_KIND

    kinds = [k.strip() for k in text.split(",") if k.strip()] if text else ["paper", PRODUCTION_KIND]
    for k in kinds:
        if k not in MODEL_KINDS:
            raise SystemExit(f"dtwin {command}: unknown --model {k!r}; choose from {', '.join(MODEL_KINDS)}")
    return kinds


def _train_sites(args: argparse.Namespace) -> list | None:
    """The sites named by --train-site-ids (the same --data and --limit-samples), or None."""
    if not args.train_site_ids:
        return None
    from forecaster.data import load_sites, resolve_data_dir

    data_dir = resolve_data_dir(args.data)
    if data_dir is None:
        raise SystemExit(f"dtwin {args.command}: --train-site-ids needs --data (or $DTWIN_DATA)")
    sites = load_sites(data_dir, args.train_site_ids)
    return [s.slice(0, args.limit_samples) for s in sites] if args.limit_samples else sites


def cmd_evaluate(args: argparse.Namespace) -> int:
    from forecaster.evaluate import evaluate

    kinds = _kinds(args.model, "evaluate")
    sites = load_sites_from_args(args)
    command = shlex.join(["dtwin", *sys.argv[1:]]) if Path(sys.argv[0]).name == "dtwin" else None
    report = evaluate(sites, Path(args.out), kinds, checkpoint=Path(args.checkpoint) if args.checkpoint else None,
                      epochs=args.epochs, seed=args.seed, sla_target=args.sla_target,
                      train_sites=_train_sites(args), command=command)
    print((Path(args.out) / "report.md").read_text().split("## Per site")[0])
    print(f"wrote {args.out}/report.md, report.json and {len(list(Path(args.out).glob('*.png')))} figures")
    return 0 if report["allocators"] else 1


def cmd_train(args: argparse.Namespace) -> int:
    from forecaster.train import TRAIN_PRESETS, make_checkpoint, prepare, save_checkpoint, train, with_epochs

    kinds = _kinds(args.model, "train") if args.model else _kinds(None, "train")[-1:]
    if len(kinds) != 1:
        raise SystemExit(f"dtwin train: --model takes one kind, got {args.model!r}")
    kind = kinds[0]
    preps = [prepare(s) for s in load_sites_from_args(args)]
    trained = train(kind, preps, with_epochs(TRAIN_PRESETS[kind], args.epochs, args.seed))
    ckpt = make_checkpoint(trained, preps)
    path = save_checkpoint(ckpt, args.out)
    m = ckpt["test_metrics"]
    print(f"{kind} on sites {', '.join(trained.site_ids)}: test MAE {m['mae']:.2f}, RMSE {m['rmse']:.2f} over "
          f"{m['n']} intervals; {trained.seconds:.1f} s; checkpoint {path}")
    return 0


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    # Named here, not imported: the CLI loads without torch (the controller's install has none).
    choices, production = "paper, delta_mlp, bilstm", "bilstm"
    p = sub.add_parser("evaluate", help="train or load models and write the offline report")
    add_data_args(p)
    p.add_argument("--train-site-ids", type=parse_site_ids, default=None,
                   help="train on these real sites (pooled) instead of the evaluated ones, e.g. 1,4")
    p.add_argument("--model", default=None,
                   help=f"model kinds, comma-separated, from {choices} (default: paper and {production})")
    p.add_argument("--checkpoint", default=None, help="evaluate this checkpoint instead of training")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--epochs", type=int, default=None, help="override the preset's maximum epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sla-target", type=float, default=float(env("DTWIN_SLA_TARGET", "0.01")),
                   help="target share of under-provisioned intervals (default 0.01, $DTWIN_SLA_TARGET)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("train", help="train one model (pooled over the selected sites) and save its checkpoint")
    add_data_args(p)
    p.add_argument("--model", default=None, help=f"{choices} (default {production}, the production one)")
    p.add_argument("--out", required=True, help="checkpoint path (.pt)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train)
