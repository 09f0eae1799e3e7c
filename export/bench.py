"""``dtwin bench model``: size, latency, throughput and accuracy of exported artifacts, side by side."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np

from export.artifact import load_artifact
from forecaster.core.metrics import mae, rmse

COLUMNS = ("name", "onnx_bytes", "params", "latency_b1_ms_median", "latency_b1_ms_p99", "throughput_b256",
           "mae", "rmse")


def bench_artifact(directory: Path, test_x: np.ndarray, test_y: np.ndarray, runs: int = 2000,
                   batch: int = 256, throughput_seconds: float = 2.0, threads: int = 1) -> dict:
    art = load_artifact(directory, threads=threads)
    x1 = test_x[:1]
    for _ in range(50):
        art.predict(x1)
    lat = np.empty(runs)
    for i in range(runs):
        sample = test_x[i % len(test_x)][None]
        t0 = time.perf_counter()
        art.predict(sample)
        lat[i] = time.perf_counter() - t0
    reps = int(np.ceil(batch / len(test_x)))
    xb = np.ascontiguousarray(np.tile(test_x, (reps, 1, 1))[:batch])
    art.predict(xb)
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < throughput_seconds:
        art.predict(xb)
        done += batch
    throughput = done / (time.perf_counter() - t0)
    # Whole test split in batches of `batch`: dynamic INT8 quantizes per batch, as served.
    pred = np.concatenate([art.predict(test_x[i:i + batch]) for i in range(0, len(test_x), batch)])
    return {
        "name": art.name,
        "version": art.version,
        "onnx_bytes": (directory / art.manifest["model_file"]).stat().st_size,
        "params": int(art.manifest.get("params", 0)),
        "latency_b1_ms_median": float(np.median(lat) * 1e3),
        "latency_b1_ms_p99": float(np.percentile(lat, 99) * 1e3),
        "throughput_b256": float(throughput),
        "mae": mae(test_y, pred),
        "rmse": rmse(test_y, pred),
    }


def render_table(rows: list[dict]) -> str:
    head = ("| model | ONNX bytes | params | latency b1 median ms | latency b1 p99 ms | throughput b256 windows/s "
            "| test MAE | test RMSE |")
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['onnx_bytes']:,} | {r['params']:,} | {r['latency_b1_ms_median']:.3f} | "
                     f"{r['latency_b1_ms_p99']:.3f} | {r['throughput_b256']:,.0f} | {r['mae']:.2f} | {r['rmse']:.2f} |")
    return "\n".join(lines)


def machine() -> dict:
    import os

    import onnxruntime as ort

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "onnxruntime": ort.__version__}


def run(directories: list[Path], test_x: np.ndarray, test_y: np.ndarray, json_path: Path | None,
        threads: int = 1, runs: int = 2000) -> list[dict]:
    rows = [bench_artifact(d, test_x, test_y, runs=runs, threads=threads) for d in directories]
    print(render_table(rows))
    paper = [r for r in rows if "paper" in r["name"]]
    if paper:
        for r in rows:
            if r is not paper[0]:
                print(f"{r['name']}: {r['throughput_b256'] / paper[0]['throughput_b256']:.1f}x the paper model's "
                      f"batched throughput, {r['onnx_bytes'] / paper[0]['onnx_bytes']:.3f}x its size")
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(rows, indent=2) + "\n")
        meta = json_path.with_suffix(".machine.json")
        meta.write_text(json.dumps({"machine": machine(), "threads": threads, "test_windows": len(test_x)},
                                   indent=2) + "\n")
    return rows
