"""torch checkpoint → verified ONNX artifact (``model.onnx`` + ``manifest.json``)."""

from __future__ import annotations

import json
import shutil
import tempfile
from datetime import UTC, datetime
from importlib.metadata import version as package_version
from pathlib import Path

import numpy as np

from export.artifact import MANIFEST_FILE, MANIFEST_FORMAT, MIN_OPSET, load_artifact, sha256_file
from forecaster.core.metrics import mae, rmse

INPUT_NAME = "kpi_window"
OUTPUT_NAME = "forecast"
TORCH_TOLERANCE = 1e-3
N_CANARIES = 8


class ExportError(Exception):
    """The exported graph failed verification; nothing was written to the output folder."""


def _ort_predict(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # as the loader; quantized kernels vary with the thread count
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (out,) = sess.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})
    return np.asarray(out, dtype=np.float64).reshape(-1)


def export_model(model, ckpt: dict, out: str | Path, opset: int = MIN_OPSET, int8: bool = False,
                 name: str | None = None) -> dict:
    """Export ``model`` (a torch module built from ``ckpt``), verify it, and write the artifact."""
    import onnx
    import onnxruntime as ort
    import torch

    from forecaster.train import predict

    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is below the minimum {MIN_OPSET}")
    out = Path(out)
    window, features = int(ckpt["window"]), list(ckpt["features"])
    test_x = np.asarray(ckpt["test_x"], dtype=np.float32)
    test_y = np.asarray(ckpt["test_y"], dtype=np.float64)
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path = Path(tmp) / "model.onnx"
        example = torch.as_tensor(test_x[:2])
        torch.onnx.export(
            model, (example,), str(fp32_path), opset_version=opset, input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            dynamo=False,  # the TorchScript exporter handles the LSTMs; verified against torch below
        )
        try:
            onnx.checker.check_model(onnx.load(str(fp32_path)), full_check=True)
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"onnx.checker rejected the graph: {exc}") from None
        torch_out = predict(model, test_x)
        ort_out = _ort_predict(fp32_path, test_x)
        if not np.all(np.isfinite(torch_out)) or not np.all(np.isfinite(ort_out)):
            raise ExportError("the model produces non-finite forecasts on the test windows")
        diff = float(np.max(np.abs(ort_out - torch_out)))
        if diff > TORCH_TOLERANCE:
            raise ExportError(f"onnxruntime and torch differ by up to {diff:.3g} in raw units "
                              f"(tolerance {TORCH_TOLERANCE}) over {len(test_x)} test windows")
        verification = {"windows": len(test_x), "max_abs_diff_vs_torch": diff, "tolerance": TORCH_TOLERANCE}
        final_path = fp32_path
        quantization = None
        if int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            final_path = Path(tmp) / "model.int8.onnx"
            quantize_dynamic(str(fp32_path), str(final_path), weight_type=QuantType.QInt8)
            int8_out = _ort_predict(final_path, test_x)
            if not np.all(np.isfinite(int8_out)):
                raise ExportError("the INT8 model produces non-finite forecasts on the test windows")
            quantization = {"method": "onnxruntime dynamic INT8 (weights)",
                            "fp32_test_mae": mae(test_y, ort_out), "fp32_test_rmse": rmse(test_y, ort_out),
                            "max_abs_diff_vs_fp32": float(np.max(np.abs(int8_out - ort_out)))}
            ort_out = int8_out
        idx = np.linspace(0, len(test_x) - 1, N_CANARIES).round().astype(int)
        # Run as one batch, as the loader does: dynamic INT8 quantizes activations per batch.
        canary_out = _ort_predict(final_path, test_x[idx])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(final_path, out / "model.onnx")

    model_path = out / "model.onnx"
    digest = sha256_file(model_path)
    created = datetime.now(UTC)
    base_name = name or (ckpt["kind"] + ("-int8" if int8 else ""))
    manifest = {
        "format": MANIFEST_FORMAT,
        "name": base_name,
        "version": f"{base_name}-{created:%Y%m%dT%H%M%SZ}-{digest[:8]}",
        "created": created.isoformat(timespec="seconds"),
        "kind": ckpt["kind"],
        "model_file": "model.onnx",
        "sha256": digest,
        "bytes": model_path.stat().st_size,
        "params": int(ckpt["params"]),
        "window": window,
        "step_seconds": int(ckpt["step_seconds"]),
        "features": features,
        "target": ckpt["target"],
        "input": {"name": INPUT_NAME, "shape": ["batch", window, len(features)], "dtype": "float32",
                  "units": "raw KPI values; normalization is inside the graph"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch"], "dtype": "float32",
                   "units": f"raw {ckpt['target']} demand of the next interval"},
        "training_data": ckpt["data"],
        "test_metrics": {"mae": mae(test_y, ort_out), "rmse": rmse(test_y, ort_out), "n": len(test_y),
                         "runtime": "onnxruntime"},
        "calibration": ckpt["calibration"],
        "persistence_calibration": ckpt["persistence_calibration"],
        "training_stats": ckpt["training_stats"],
        # Read by the controller: manifest["online_headroom"][f"{target:g}"]["model" | "persistence"].
        "online_headroom": ckpt.get("online_headroom"),
        "train_site_ids": [str(s) for s in ckpt.get("train_site_ids", [ckpt["data"]["site"]])],
        "scale_free": bool(ckpt.get("scale_free", False)),
        "canaries": [{"input": test_x[i].tolist(), "expected": float(v)} for i, v in zip(idx, canary_out, strict=True)],
        "canary_tolerance": 1e-3,
        "verification": verification,
        "quantization": quantization,
        "opset": opset,
        "versions": {"exporter": f"dtwin {package_version('dtwin')}", "torch": torch.__version__,
                     "onnx": onnx.__version__, "onnxruntime": ort.__version__, "opset": opset},
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    load_artifact(out)  # the same checks the controller runs
    return manifest


def export_checkpoint(checkpoint: str | Path, out: str | Path, opset: int = MIN_OPSET, int8: bool = False) -> dict:
    from forecaster.train import load_checkpoint

    model, ckpt = load_checkpoint(checkpoint)
    if "test_x" not in ckpt:
        raise ExportError(f"{checkpoint} holds no test windows to verify the export against")
    return export_model(model, ckpt, out, opset=opset, int8=int8)
