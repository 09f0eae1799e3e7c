"""``dtwin bench swap``: hot model swaps under load on Apache Kafka: swap latency, and throughput with
swaps vs without in one run. Also :func:`derive_artifact`, which makes the distinct, verifiable
versions the benchmark (and the swap and shadow tests) switch between."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

KAFKA_ENV = {"DTWIN_CHANGELOG_MARKERS": "0"}  # the marker record is a Tansu workaround


def derive_artifact(base: str | Path, dest: str | Path, version: str, *, scale: float = 1.0, bias: float = 0.0,
                    noise: float = 0.0, q0_shift: float = 0.0) -> Path:
    """A real artifact derived from ``base``: its ONNX graph's forecast becomes
    ``scale * forecast + bias + noise * sin(0.37 * sum(window))`` (a deterministic pseudo-noise of
    amplitude ``noise``), with the canaries recomputed, a new sha256 and version; ``q0_shift`` is
    added to the manifest's online headroom starts. It verifies like any export."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from export.artifact import MANIFEST_FILE, load_artifact, sha256_file

    base, dest = Path(base), Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    manifest = json.loads((base / MANIFEST_FILE).read_text())
    proto = onnx.load(str(base / manifest["model_file"]))
    g = proto.graph
    out_name, in_name = g.output[0].name, manifest["input"]["name"]
    for node in g.node:
        node.output[:] = [f"{o}__base" if o == out_name else o for o in node.output]
    consts = {"__scale": np.float32(scale), "__bias": np.float32(bias), "__noise": np.float32(noise),
              "__freq": np.float32(0.37)}
    for name, v in consts.items():
        g.initializer.append(numpy_helper.from_array(np.asarray(v, dtype=np.float32), name))
    g.initializer.append(numpy_helper.from_array(np.asarray([1, 2], dtype=np.int64), "__axes"))
    g.node.extend([
        helper.make_node("Mul", [f"{out_name}__base", "__scale"], ["__scaled"]),
        helper.make_node("Add", ["__scaled", "__bias"], ["__biased"]),
        helper.make_node("ReduceSum", [in_name, "__axes"], ["__sum"], keepdims=0),
        helper.make_node("Mul", ["__sum", "__freq"], ["__phase"]),
        helper.make_node("Sin", ["__phase"], ["__sin"]),
        helper.make_node("Mul", ["__sin", "__noise"], ["__wiggle"]),
        helper.make_node("Add", ["__biased", "__wiggle"], [out_name]),
    ])
    assert g.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    proto.doc_string = f"{version}: derived from {manifest['version']}"
    onnx.checker.check_model(proto, full_check=True)
    model_path = dest / manifest["model_file"]
    onnx.save(proto, str(model_path))

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    x = np.asarray([c["input"] for c in manifest["canaries"]], dtype=np.float32)
    (expected,) = sess.run([g.output[0].name], {in_name: x})
    manifest["canaries"] = [{"input": c["input"], "expected": float(e)}
                            for c, e in zip(manifest["canaries"], np.asarray(expected).reshape(-1), strict=True)]
    manifest.update(version=version, sha256=sha256_file(model_path), bytes=model_path.stat().st_size,
                    derived_from={"version": manifest["version"], "scale": scale, "bias": bias, "noise": noise,
                                  "q0_shift": q0_shift})
    if q0_shift:
        for per_target in (manifest.get("online_headroom") or {}).values():
            model = per_target.get("model") if isinstance(per_target, dict) else None
            if isinstance(model, dict) and "q0" in model:
                model["q0"] = float(model["q0"]) + q0_shift
    (dest / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    load_artifact(dest)
    return dest
