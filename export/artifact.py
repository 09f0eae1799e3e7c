"""Load and verify an exported model artifact (``model.onnx`` + ``manifest.json``).

The controller serves only what passes every check here. Nothing is unpickled: the manifest
is JSON and the model is an ONNX protobuf.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MANIFEST_FORMAT = "dtwin-model/1"
MANIFEST_FILE = "manifest.json"
MIN_OPSET = 17
REQUIRED_KEYS = ("format", "name", "version", "created", "model_file", "sha256", "window", "step_seconds",
                 "features", "target", "input", "output", "calibration", "training_stats", "canaries",
                 "canary_tolerance", "opset")


class ArtifactError(Exception):
    """The artifact failed a check; ``check`` names which one."""

    def __init__(self, check: str, message: str) -> None:
        super().__init__(f"model artifact rejected ({check}): {message}")
        self.check = check


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class ModelArtifact:
    directory: Path
    manifest: dict
    session: object  # onnxruntime.InferenceSession
    input_name: str
    output_name: str

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def sha256(self) -> str:
        return str(self.manifest["sha256"])

    @property
    def window(self) -> int:
        return int(self.manifest["window"])

    @property
    def features(self) -> list[str]:
        return list(self.manifest["features"])

    def predict(self, windows: np.ndarray) -> np.ndarray:
        """Raw KPI windows ``[batch, window, features]`` → forecast ``[batch]`` in raw units."""
        x = np.ascontiguousarray(windows, dtype=np.float32)
        if x.ndim != 3 or x.shape[1:] != (self.window, len(self.features)):
            raise ValueError(f"expected windows of shape [batch, {self.window}, {len(self.features)}], got {x.shape}")
        if x.shape[0] == 0:
            return np.zeros(0, dtype=np.float64)
        if x.shape[0] == 1:
            # onnxruntime takes another kernel path for a batch of one, whose float32 result differs from
            # the same window's in any larger batch in the last bits; a live batch holds whatever the
            # consumer fetched, so one window is run as two to make every forecast independent of it.
            (out,) = self.session.run([self.output_name], {self.input_name: np.concatenate([x, x])})
            return np.asarray(out[:1], dtype=np.float64).reshape(-1)
        (out,) = self.session.run([self.output_name], {self.input_name: x})
        return np.asarray(out, dtype=np.float64).reshape(-1)


def _read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise ArtifactError("missing_file", f"{path} does not exist")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError("manifest", f"{path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise ArtifactError("manifest", f"{path} must hold a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ArtifactError("manifest", f"{path} lacks {', '.join(missing)}")
    if manifest["format"] != MANIFEST_FORMAT:
        raise ArtifactError("manifest", f"{path}: format {manifest['format']!r}, expected {MANIFEST_FORMAT!r}")
    return manifest


def _dims(value_info) -> list[int | str]:
    return [d.dim_param if d.dim_param else d.dim_value for d in value_info.type.tensor_type.shape.dim]


def load_artifact(directory: str | Path, threads: int = 1) -> ModelArtifact:
    """Verify and load an artifact; raise :class:`ArtifactError` naming the failed check."""
    import onnx
    import onnxruntime as ort

    directory = Path(directory)
    manifest = _read_manifest(directory)
    model_path = directory / str(manifest["model_file"])
    if not model_path.is_file():
        raise ArtifactError("missing_file", f"{model_path} does not exist")
    digest = sha256_file(model_path)
    if digest != manifest["sha256"]:
        raise ArtifactError("sha256", f"{model_path} has sha256 {digest}, manifest says {manifest['sha256']}")

    try:
        proto = onnx.load(str(model_path))
    except Exception as exc:
        raise ArtifactError("onnx", f"{model_path} does not parse as ONNX: {exc}") from None
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < MIN_OPSET or opset != int(manifest["opset"]):
        raise ArtifactError("opset", f"graph opset {opset}; manifest says {manifest['opset']}, minimum {MIN_OPSET}")
    window, n_features = int(manifest["window"]), len(manifest["features"])
    graph_inputs = [i for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
    if len(graph_inputs) != 1 or len(proto.graph.output) != 1:
        raise ArtifactError("shape", f"graph needs one input and one output, has {len(graph_inputs)} and "
                                     f"{len(proto.graph.output)}")
    in_dims, out_dims = _dims(graph_inputs[0]), _dims(proto.graph.output[0])
    in_name, out_name = graph_inputs[0].name, proto.graph.output[0].name
    if in_name != manifest["input"]["name"] or out_name != manifest["output"]["name"]:
        raise ArtifactError("shape", f"graph input/output names {in_name}/{out_name} differ from the manifest's "
                                     f"{manifest['input']['name']}/{manifest['output']['name']}")
    if len(in_dims) != 3 or in_dims[1:] != [window, n_features] or not isinstance(in_dims[0], str):
        raise ArtifactError("shape", f"graph input shape {in_dims} does not match the manifest's "
                                     f"[batch, {window}, {n_features}] (features {manifest['features']})")
    if len(out_dims) != 1 or not isinstance(out_dims[0], str):
        raise ArtifactError("shape", f"graph output shape {out_dims}, expected [batch]")

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    artifact = ModelArtifact(directory=directory, manifest=manifest, session=session,
                             input_name=graph_inputs[0].name, output_name=proto.graph.output[0].name)
    check_canaries(artifact)
    return artifact


def check_canaries(artifact: ModelArtifact) -> None:
    canaries = artifact.manifest["canaries"]
    if not canaries:
        raise ArtifactError("canary", "the manifest holds no canary windows")
    x = np.asarray([c["input"] for c in canaries], dtype=np.float32)
    expected = np.asarray([c["expected"] for c in canaries], dtype=np.float64)
    got = artifact.predict(x)
    if not np.all(np.isfinite(got)):
        raise ArtifactError("non_finite", f"the model returns non-finite forecasts on canaries: {got.tolist()}")
    tol = float(artifact.manifest["canary_tolerance"])
    worst = float(np.max(np.abs(got - expected)))
    if worst > tol:
        raise ArtifactError("canary", f"canary outputs differ from the manifest by up to {worst:.6g} (tolerance {tol})")
