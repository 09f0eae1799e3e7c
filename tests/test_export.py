"""ONNX export and the artifact loader the controller trusts: round trip, manifest, and each refusal."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from export.artifact import MIN_OPSET, ArtifactError, load_artifact, sha256_file
from export.bench import COLUMNS
from export.onnx_export import N_CANARIES, ExportError, export_checkpoint, export_model
from forecaster import KPI_NAMES, STEP_SECONDS, TARGET, WINDOW
from forecaster.core.online import OnlineHeadroom
from forecaster.core.windows import Normalizer
from forecaster.models import DeltaMLP
from forecaster.synthetic import generate_site
from forecaster.train import (
    TRAIN_PRESETS,
    load_checkpoint,
    make_checkpoint,
    predict,
    prepare,
    save_checkpoint,
    train,
    with_epochs,
)

EPOCHS = {"delta_mlp": 2, "paper": 1, "bilstm": 1}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """Tiny delta_mlp, paper and bilstm checkpoints, and their fp32 artifacts (plus the delta_mlp INT8 one)."""
    root = tmp_path_factory.mktemp("export")
    prep = prepare(generate_site(0, n_steps=1500))
    out: dict = {"root": root}
    for kind, epochs in EPOCHS.items():
        trained = train(kind, prep, with_epochs(TRAIN_PRESETS[kind], epochs), progress=False)
        ckpt_path = save_checkpoint(make_checkpoint(trained, prep), root / f"{kind}.pt")
        art_dir = root / f"{kind}-artifact"
        manifest = export_checkpoint(ckpt_path, art_dir)
        out[kind] = {"ckpt": ckpt_path, "dir": art_dir, "manifest": manifest}
    int8_dir = root / "delta_mlp-int8"
    out["delta_mlp"]["int8_manifest"] = export_checkpoint(out["delta_mlp"]["ckpt"], int8_dir, int8=True)
    out["delta_mlp"]["int8_dir"] = int8_dir
    return out


def _copy(src: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "artifact"
    shutil.copytree(src, dest)
    return dest


def _edit_manifest(directory: Path, edit) -> None:
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def _rejected(directory: Path) -> ArtifactError:
    with pytest.raises(ArtifactError) as info:
        load_artifact(directory)
    return info.value


# --- round trip ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(EPOCHS))
def test_onnx_matches_torch_on_the_test_windows(built, kind):
    model, ckpt = load_checkpoint(built[kind]["ckpt"])
    test_x = ckpt["test_x"].numpy()
    art = load_artifact(built[kind]["dir"])
    expected = predict(model, test_x)
    got = art.predict(test_x)
    assert got.shape == expected.shape == (len(test_x),)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-3)
    # The manifest's test metrics are those of the ONNX graph on the same windows.
    y = ckpt["test_y"].numpy().astype(np.float64)
    assert art.manifest["test_metrics"]["mae"] == pytest.approx(float(np.mean(np.abs(got - y))), rel=1e-6)
    assert art.manifest["test_metrics"]["n"] == len(test_x)


@pytest.mark.parametrize("kind", list(EPOCHS))
def test_dynamic_batch_dimension(built, kind):
    import onnx

    proto = onnx.load(str(built[kind]["dir"] / "model.onnx"))
    in_dims = proto.graph.input[0].type.tensor_type.shape.dim
    out_dims = proto.graph.output[0].type.tensor_type.shape.dim
    assert in_dims[0].dim_param and out_dims[0].dim_param
    assert [d.dim_value for d in in_dims[1:]] == [WINDOW, len(KPI_NAMES)]

    model, ckpt = load_checkpoint(built[kind]["ckpt"])
    test_x = ckpt["test_x"].numpy()
    art = load_artifact(built[kind]["dir"])
    x300 = np.ascontiguousarray(np.tile(test_x, (2, 1, 1))[:300])
    for x in (test_x[:1], x300):
        got = art.predict(x)
        assert got.shape == (len(x),)
        np.testing.assert_allclose(got, predict(model, x), rtol=0, atol=1e-3)
    assert art.predict(test_x[:0]).shape == (0,)
    with pytest.raises(ValueError, match="shape"):
        art.predict(test_x[:, :9])


@pytest.mark.parametrize("kind", list(EPOCHS))
def test_a_forecast_does_not_depend_on_the_batch(built, kind):
    """Bit for bit: a live batch holds whatever the consumer fetched, and the live decisions must equal
    the offline engine's (onnxruntime rounds a batch of one differently unless the loader pads it)."""
    _, ckpt = load_checkpoint(built[kind]["ckpt"])
    test_x = ckpt["test_x"].numpy()
    art = load_artifact(built[kind]["dir"])
    whole = art.predict(test_x)
    alone = np.concatenate([art.predict(test_x[i:i + 1]) for i in range(len(test_x))])
    in_sevens = np.concatenate([art.predict(test_x[i:i + 7]) for i in range(0, len(test_x), 7)])
    np.testing.assert_array_equal(alone, whole)
    np.testing.assert_array_equal(in_sevens, whole)


@pytest.mark.parametrize("kind", list(EPOCHS))
def test_manifest_contents(built, kind):
    m = json.loads((built[kind]["dir"] / "manifest.json").read_text())
    assert m == built[kind]["manifest"]
    for key in ("name", "version", "created", "sha256", "training_data", "test_metrics", "calibration",
                "persistence_calibration", "training_stats", "canaries", "versions", "input", "output"):
        assert key in m, key
    assert m["name"] == kind
    assert m["sha256"] == sha256_file(built[kind]["dir"] / "model.onnx")
    assert m["sha256"][:8] in m["version"] and kind in m["version"]
    assert m["bytes"] == (built[kind]["dir"] / "model.onnx").stat().st_size
    assert m["window"] == 10 == WINDOW
    assert m["step_seconds"] == 300 == STEP_SECONDS
    assert m["features"] == ["internet", "sessions", "vpn", "downstream"]
    assert m["target"] == TARGET == "internet"
    assert m["input"]["name"] == "kpi_window" and m["input"]["shape"] == ["batch", 10, 4]
    assert m["output"]["name"] == "forecast" and m["output"]["shape"] == ["batch"]
    assert m["training_data"]["samples"] == 1500 and m["training_data"]["site"] == "synthetic-0"
    assert {"mae", "rmse", "n"} <= set(m["test_metrics"])
    assert "0.01" in m["calibration"] and "0.01" in m["persistence_calibration"]
    assert {"relative", "additive", "target_rate"} <= set(m["calibration"]["0.01"])
    assert {"mean", "std", "p95"} <= set(m["training_stats"])
    assert m["train_site_ids"] == ["synthetic-0"]
    assert set(m["online_headroom"]) == {"0.005", "0.01", "0.02", "0.05"}
    for key, entry in m["online_headroom"].items():
        for which in ("model", "persistence"):
            h = OnlineHeadroom.from_dict(entry[which])
            assert h.target == float(key) and h.eta > 0 and np.isfinite(h.q0)
    assert m["scale_free"] is (kind == "bilstm")
    assert len(m["canaries"]) == N_CANARIES == 8
    for c in m["canaries"]:
        assert np.asarray(c["input"]).shape == (10, 4) and np.isfinite(c["expected"])
    v = m["versions"]
    assert v["torch"] == torch.__version__ and v["onnx"] and v["opset"] >= 17 and m["opset"] >= MIN_OPSET
    assert m["quantization"] is None
    assert m["verification"]["max_abs_diff_vs_torch"] <= 1e-3


def test_int8_export(built):
    q = built["delta_mlp"]["int8_manifest"]
    art = load_artifact(built["delta_mlp"]["int8_dir"])
    assert art.name == "delta_mlp-int8"
    assert q["quantization"]["fp32_test_mae"] == pytest.approx(built["delta_mlp"]["manifest"]["test_metrics"]["mae"])
    assert np.isfinite(q["test_metrics"]["mae"])
    fp32_bytes = (built["delta_mlp"]["dir"] / "model.onnx").stat().st_size
    int8_bytes = (built["delta_mlp"]["int8_dir"] / "model.onnx").stat().st_size
    assert int8_bytes < fp32_bytes and q["bytes"] == int8_bytes


def test_loader_never_unpickles(built, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the artifact loader must not unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    for d in (built["delta_mlp"]["dir"], built["paper"]["dir"], built["delta_mlp"]["int8_dir"]):
        art = load_artifact(d)
        assert art.predict(np.asarray([c["input"] for c in art.manifest["canaries"]])).shape == (N_CANARIES,)


# --- refusals ------------------------------------------------------------------------------------


def test_flipped_byte_is_refused_by_sha256(built, tmp_path):
    d = _copy(built["delta_mlp"]["dir"], tmp_path)
    data = bytearray((d / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (d / "model.onnx").write_bytes(bytes(data))
    assert _rejected(d).check == "sha256"


def test_window_changed_is_refused_by_shape(built, tmp_path):
    d = _copy(built["delta_mlp"]["dir"], tmp_path)
    _edit_manifest(d, lambda m: m.update(window=12))
    assert _rejected(d).check == "shape"


def test_five_features_are_refused_by_shape(built, tmp_path):
    d = _copy(built["delta_mlp"]["dir"], tmp_path)
    _edit_manifest(d, lambda m: m.update(features=[*m["features"], "extra"]))
    assert _rejected(d).check == "shape"


@pytest.mark.parametrize("name", ["model.onnx", "manifest.json"])
def test_missing_file(built, tmp_path, name):
    d = _copy(built["delta_mlp"]["dir"], tmp_path)
    (d / name).unlink()
    err = _rejected(d)
    assert err.check == "missing_file" and name in str(err)


def test_missing_directory(tmp_path):
    assert _rejected(tmp_path / "nowhere").check == "missing_file"


@pytest.mark.parametrize("text", ["{not json", "", "[1, 2]", "\"a string\""])
def test_manifest_not_json_object(built, tmp_path, text):
    d = _copy(built["delta_mlp"]["dir"], tmp_path)
    (d / "manifest.json").write_text(text)
    assert _rejected(d).check == "manifest"


def test_manifest_not_utf8(built, tmp_path):
    d = _copy(built["delta_mlp"]["dir"], tmp_path)
    (d / "manifest.json").write_bytes(b"\xff\xfe{}")
    assert _rejected(d).check == "manifest"


@pytest.mark.parametrize("key", ["sha256", "canaries", "opset", "window", "calibration", "format"])
def test_manifest_missing_key(built, tmp_path, key):
    d = _copy(built["delta_mlp"]["dir"], tmp_path)
    _edit_manifest(d, lambda m: m.pop(key))
    err = _rejected(d)
    assert err.check == "manifest" and key in str(err)


def test_manifest_wrong_format(built, tmp_path):
    d = _copy(built["delta_mlp"]["dir"], tmp_path)
    _edit_manifest(d, lambda m: m.update(format="dtwin-model/0"))
    assert _rejected(d).check == "manifest"


@pytest.mark.parametrize("kind", list(EPOCHS))
def test_altered_canary_is_refused(built, tmp_path, kind):
    d = _copy(built[kind]["dir"], tmp_path)
    _edit_manifest(d, lambda m: m["canaries"][3].update(expected=m["canaries"][3]["expected"] + 1.0))
    assert _rejected(d).check == "canary"


def test_no_canaries_is_refused(built, tmp_path):
    d = _copy(built["delta_mlp"]["dir"], tmp_path)
    _edit_manifest(d, lambda m: m.update(canaries=[]))
    assert _rejected(d).check == "canary"


@pytest.mark.parametrize("opset", [18, 16])
def test_manifest_opset_changed(built, tmp_path, opset):
    d = _copy(built["delta_mlp"]["dir"], tmp_path)
    _edit_manifest(d, lambda m: m.update(opset=opset))
    assert _rejected(d).check == "opset"


def test_garbage_model_is_refused_by_onnx(built, tmp_path):
    d = _copy(built["delta_mlp"]["dir"], tmp_path)
    (d / "model.onnx").write_bytes(b"\x00\x01 this is not a protobuf \xff" * 10)
    _edit_manifest(d, lambda m: m.update(sha256=sha256_file(d / "model.onnx")))
    assert _rejected(d).check == "onnx"


def test_export_refuses_opset_16(built, tmp_path):
    with pytest.raises(ExportError, match="opset 16"):
        export_checkpoint(built["delta_mlp"]["ckpt"], tmp_path / "out", opset=16)
    assert not (tmp_path / "out").exists()


# --- non-finite models ---------------------------------------------------------------------------


class NaNDeltaMLP(DeltaMLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * float("nan")


@pytest.mark.parametrize("how", ["forward", "weights"])
def test_export_refuses_a_nan_model(built, tmp_path, how):
    model, ckpt = load_checkpoint(built["delta_mlp"]["ckpt"])
    if how == "forward":
        nan_model = NaNDeltaMLP(Normalizer.from_dict(ckpt["normalizer"]), **ckpt["model_config"])
        nan_model.load_state_dict(ckpt["state_dict"])
    else:
        nan_model = model
        with torch.no_grad():
            for p in nan_model.parameters():
                p.fill_(float("nan"))
    with pytest.raises(ExportError, match="non-finite"):
        export_model(nan_model, ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _hand_built_artifact(built, tmp_path: Path, produce_nan: bool) -> Path:
    """A valid opset-17 graph kpi_window [batch, 10, 4] → forecast [batch]: 0/0 (NaN) or 0."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("ReduceMean", ["kpi_window"], ["m"], axes=[1, 2], keepdims=0),
             helper.make_node("Sub", ["m", "m"], ["zero" if produce_nan else "forecast"])]
    if produce_nan:
        nodes.append(helper.make_node("Div", ["zero", "zero"], ["forecast"]))
    graph = helper.make_graph(
        nodes, "hand_built",
        [helper.make_tensor_value_info("kpi_window", TensorProto.FLOAT, ["batch", 10, 4])],
        [helper.make_tensor_value_info("forecast", TensorProto.FLOAT, ["batch"])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto, full_check=True)
    d = tmp_path / ("nan" if produce_nan else "zero")
    d.mkdir()
    onnx.save(proto, str(d / "model.onnx"))
    manifest = json.loads((built["delta_mlp"]["dir"] / "manifest.json").read_text())
    manifest["sha256"] = sha256_file(d / "model.onnx")
    manifest["opset"] = 17
    for c in manifest["canaries"]:
        c["expected"] = 0.0
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d


def test_hand_built_artifact_loads_when_finite(built, tmp_path):
    art = load_artifact(_hand_built_artifact(built, tmp_path, produce_nan=False))
    assert art.predict(np.ones((3, 10, 4))).tolist() == [0.0, 0.0, 0.0]


def test_loader_refuses_a_graph_that_outputs_nan(built, tmp_path):
    d = _hand_built_artifact(built, tmp_path, produce_nan=True)
    err = _rejected(d)
    assert err.check == "non_finite"


# --- CLI -----------------------------------------------------------------------------------------


def test_cli_export(built, tmp_path, capsys):
    from dtwin.cli import main

    out = tmp_path / "cli-artifact"
    assert main(["export", str(built["delta_mlp"]["ckpt"]), "--out", str(out)]) == 0
    assert "exported delta_mlp-" in capsys.readouterr().out
    assert load_artifact(out).manifest["name"] == "delta_mlp"


def test_cli_export_missing_checkpoint(tmp_path, capsys):
    from dtwin.cli import main

    missing = tmp_path / "nope.pt"
    assert main(["export", str(missing), "--out", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "refused" in text and str(missing) in text and "does not exist" in text
    assert not (tmp_path / "out").exists()


def test_cli_export_not_a_checkpoint(tmp_path, capsys):
    from dtwin.cli import main

    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"definitely not a checkpoint")
    assert main(["export", str(bogus), "--out", str(tmp_path / "out")]) == 2
    assert "not a dtwin-checkpoint/1 checkpoint" in capsys.readouterr().out


def test_cli_export_opset_16(built, tmp_path, capsys):
    from dtwin.cli import main

    assert main(["export", str(built["delta_mlp"]["ckpt"]), "--out", str(tmp_path / "o"), "--opset", "16"]) == 2
    assert "opset 16" in capsys.readouterr().out


def test_cli_bench_model(built, tmp_path, monkeypatch, capsys):
    from dtwin.cli import main

    monkeypatch.delenv("DTWIN_DATA", raising=False)
    out = tmp_path / "bench.json"
    rc = main(["bench", "model", str(built["delta_mlp"]["dir"]), str(built["paper"]["dir"]),
               "--limit-samples", "1500", "--runs", "50", "--json", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())
    assert isinstance(rows, list) and len(rows) == 2
    for row in rows:
        assert set(COLUMNS) <= set(row)
        assert row["onnx_bytes"] > 0 and row["params"] > 0 and row["throughput_b256"] > 0
        assert 0 < row["latency_b1_ms_median"] <= row["latency_b1_ms_p99"]
        assert np.isfinite(row["mae"]) and row["rmse"] >= row["mae"] > 0
    assert [r["name"] for r in rows] == ["delta_mlp", "paper"]
    assert any("paper" in r["name"] for r in rows)
    assert rows[0]["onnx_bytes"] == built["delta_mlp"]["manifest"]["bytes"]
    assert out.with_suffix(".machine.json").is_file()
    assert "| delta_mlp |" in capsys.readouterr().out


def test_bilstm_artifact_is_small_and_scale_free(built):
    """The production kind: well under 0.5 MB, and scaling a window scales its forecast (in the ONNX graph)."""
    art = load_artifact(built["bilstm"]["dir"])
    assert built["bilstm"]["manifest"]["bytes"] <= 500_000
    _, ckpt = load_checkpoint(built["bilstm"]["ckpt"])
    x = ckpt["test_x"].numpy()[:64]
    np.testing.assert_allclose(art.predict(3.0 * x), 3.0 * art.predict(x), rtol=1e-4, atol=1e-3)
