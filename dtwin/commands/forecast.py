"""``dtwin train`` and ``dtwin evaluate``: models and the offline report."""

from __future__ import annotations

import argparse
from pathlib import Path

from dtwin.args import add_data_args, env, load_site_from_args


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
    from forecaster.train import TRAIN_PRESETS, make_checkpoint, prepare, save_checkpoint, train, with_epochs

    site = load_site_from_args(args)
    prep = prepare(site)
    trained = train(args.model, prep, with_epochs(TRAIN_PRESETS[args.model], args.epochs, args.seed))
    ckpt = make_checkpoint(trained, prep)
    path = save_checkpoint(ckpt, args.out)
    m = ckpt["test_metrics"]
    print(f"{args.model}: test MAE {m['mae']:.2f}, RMSE {m['rmse']:.2f} over {m['n']} intervals; "
          f"{trained.seconds:.1f} s; checkpoint {path}")
    return 0


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="train or load models and write the offline report")
    add_data_args(p)
    p.add_argument("--model", default=None, help="paper, delta_mlp or bilstm (default: paper and the production one)")
    p.add_argument("--checkpoint", default=None, help="evaluate this checkpoint instead of training")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--epochs", type=int, default=None, help="override the preset's maximum epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sla-target", type=float, default=float(env("DTWIN_SLA_TARGET", "0.01")),
                   help="target share of under-provisioned intervals (default 0.01, $DTWIN_SLA_TARGET)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("train", help="train one model and save its checkpoint")
    add_data_args(p)
    p.add_argument("--model", default="delta_mlp", help="paper, delta_mlp or bilstm (default %(default)s)")
    p.add_argument("--out", required=True, help="checkpoint path (.pt)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train)
