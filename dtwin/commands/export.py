"""``dtwin export`` and ``dtwin bench model``."""

from __future__ import annotations

import argparse
from pathlib import Path

from dtwin.args import add_data_args, load_site_from_args


def cmd_export(args: argparse.Namespace) -> int:
    from export.artifact import ArtifactError
    from export.onnx_export import ExportError, export_checkpoint

    try:
        manifest = export_checkpoint(args.checkpoint, args.out, opset=args.opset, int8=args.int8)
    except (ExportError, ArtifactError, FileNotFoundError, ValueError) as exc:
        print(f"dtwin export: refused: {exc}")
        return 2
    m = manifest["test_metrics"]
    print(f"exported {manifest['version']} to {args.out}: {manifest['bytes']:,} bytes, opset {manifest['opset']}, "
          f"test MAE {m['mae']:.2f} RMSE {m['rmse']:.2f}; torch vs onnxruntime max diff "
          f"{manifest['verification']['max_abs_diff_vs_torch']:.2e}")
    if manifest["quantization"]:
        q = manifest["quantization"]
        print(f"INT8: MAE {q['fp32_test_mae']:.2f} → {m['mae']:.2f}, RMSE {q['fp32_test_rmse']:.2f} → {m['rmse']:.2f}")
    return 0


def cmd_bench_model(args: argparse.Namespace) -> int:
    from export.bench import run
    from forecaster.prepare import prepare

    prep = prepare(load_site_from_args(args))
    run([Path(d) for d in args.artifacts], prep.x[prep.split.test], prep.y[prep.split.test],
        Path(args.json) if args.json else None, threads=args.threads, runs=args.runs)
    return 0


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a checkpoint to a verified ONNX artifact (model.onnx + manifest.json)")
    p.add_argument("checkpoint", help="checkpoint (.pt) from dtwin train or dtwin evaluate")
    p.add_argument("--out", required=True, help="artifact folder")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, at least 17 (default %(default)s)")
    p.add_argument("--int8", action="store_true", help="write the dynamically INT8-quantized variant")
    p.set_defaults(func=cmd_export)

    p = bench.add_parser("model", help="ONNX size, latency, throughput and test accuracy, side by side")
    p.add_argument("artifacts", nargs="+", help="artifact folders (model.onnx + manifest.json)")
    add_data_args(p)
    p.add_argument("--json", default=None, help="also write the table as a JSON list of rows")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default %(default)s)")
    p.add_argument("--runs", type=int, default=2000, help="batch-1 latency samples (default %(default)s)")
    p.set_defaults(func=cmd_bench_model)
