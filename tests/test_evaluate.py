"""The offline evaluation through the ``dtwin evaluate`` command, run in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dtwin.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIGURES = ("mae_rmse.png", "overprovisioning.png", "radar.png", "efficiency_box.png",
           "forecast_vs_actual.png", "per_site_underprovisioning.png")
ALLOCATORS = ("b1", "b2", "persistence", "persistence_sla", "paper_raw", "paper_sla", "paper_sla_static", "ai_raw",
              "ai_sla", "ai_sla_static")
METRIC_KEYS = ("mae", "rmse", "efficiency_mean", "efficiency_median", "wastage_mean", "utilization_mean",
               "overprovisioning_mean", "underprovisioning_rate", "n")


@pytest.fixture(scope="module")
def evaluated(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    rc = main(["evaluate", "--data", str(data_dir), "--limit-samples", "1500", "--epochs", "1",
               "--out", str(out)])
    return rc, out


def test_evaluate_exit_code_and_files(evaluated):
    rc, out = evaluated
    assert rc == 0
    for name in ("report.md", "report.json", "paper.pt", "bilstm.pt", *FIGURES):
        assert (out / name).is_file(), name
    for name in FIGURES:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC, name
        assert len(data) > 1000, name


def test_report_json(evaluated):
    _, out = evaluated
    report = json.loads((out / "report.json").read_text())
    assert set(report["allocators"]) == set(ALLOCATORS)
    # 1500 samples -> 1490 windows; n_train = int(1490*0.8) = 1192 -> 298 test windows
    assert report["data"]["samples"] == 1500
    assert report["data"]["test"] == [1192, 1490]
    for name in ALLOCATORS:
        metrics = report["allocators"][name]
        for key in METRIC_KEYS:
            assert key in metrics, (name, key)
        assert metrics["n"] == 298
        assert 0.0 <= metrics["efficiency_mean"] <= 1.0
        assert 0.0 <= metrics["underprovisioning_rate"] <= 1.0
    # Static baselines never under-provision more than bare persistence, and waste far more.
    a = report["allocators"]
    assert a["b1"]["overprovisioning_mean"] > a["persistence"]["overprovisioning_mean"]
    assert a["persistence_sla"]["underprovisioning_rate"] < a["persistence"]["underprovisioning_rate"]

    models = report["models"]
    assert set(models) == {"paper", "bilstm"}
    assert models["paper"]["params"] == 698753
    assert models["bilstm"]["params"] == 13889
    assert models["paper"]["allocator_prefix"] == "paper"
    assert models["bilstm"]["allocator_prefix"] == "ai"
    for m in models.values():
        assert m["bytes"] > 4 * m["params"]  # float32 weights plus buffers and framing
        assert m["train_seconds"] > 0
        assert m["best_epoch"] == 1
        assert m["train_site_ids"] == ["s1-s11-s31-s41"]

    policies = report["policies"]
    for name in ("paper_sla_static", "ai_sla_static"):
        assert set(policies[name]["headroom"]) == {"relative", "additive", "target_rate"}
        assert policies[name]["headroom"]["target_rate"] == 0.01
    for name in ("persistence_sla", "paper_sla", "ai_sla"):
        assert set(policies[name]["online"]) == {"q0", "eta", "target", "site_weight", "scale"}
        assert policies[name]["online"]["target"] == 0.01
    # One site: the fleet aggregate is that site's figures.
    assert list(report["sites"]) == ["s1-s11-s31-s41"]
    assert report["sites"]["s1-s11-s31-s41"]["allocators"] == report["allocators"]
    assert report["sla_target"] == 0.01
    assert report["window"] == 10


def test_report_markdown(evaluated):
    _, out = evaluated
    md = (out / "report.md").read_text()
    assert md.startswith("# dtwin offline evaluation")
    for name in ALLOCATORS:
        assert f"| {name} |" in md
    for name in FIGURES:
        assert f"]({name})" in md
    assert "| paper | paper_* | s1-s11-s31-s41 | 698,753 |" in md
    assert "| bilstm | ai_* | s1-s11-s31-s41 | 13,889 |" in md


def test_evaluate_missing_data_folder(tmp_path, capsys):
    missing = tmp_path / "nope"
    rc = main(["evaluate", "--data", str(missing), "--out", str(tmp_path / "out")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "dtwin evaluate: dataset error" in err
    assert str(missing) in err
    assert "does not exist" in err
    assert not (tmp_path / "out" / "report.json").exists()


def test_evaluate_broken_file_names_file_and_line(broken_copy, tmp_path, capsys):
    path = broken_copy / "data_series" / "s11.txt"
    lines = path.read_text().splitlines()
    lines[76] = "22800 n/a"
    path.write_text("\n".join(lines) + "\n")
    rc = main(["evaluate", "--data", str(broken_copy), "--out", str(tmp_path / "out")])
    assert rc == 2
    assert f"{path}:77:" in capsys.readouterr().err


def test_evaluate_unknown_model(data_dir, tmp_path):
    with pytest.raises(SystemExit, match="unknown --model 'gru'"):
        main(["evaluate", "--data", str(data_dir), "--model", "gru", "--out", str(tmp_path)])


def test_evaluate_from_checkpoint(evaluated, data_dir, tmp_path: Path):
    _, out = evaluated
    rc = main(["evaluate", "--data", str(data_dir), "--limit-samples", "1500",
               "--checkpoint", str(out / "bilstm.pt"), "--out", str(tmp_path)])
    assert rc == 0
    report = json.loads((tmp_path / "report.json").read_text())
    first = json.loads((out / "report.json").read_text())
    assert set(report["models"]) == {"bilstm"}
    # The loaded checkpoint forecasts and allocates exactly as the freshly trained model did.
    for name in ("ai_raw", "ai_sla", "ai_sla_static"):
        assert report["allocators"][name] == first["allocators"][name], name
    assert report["models"]["bilstm"]["train_seconds"] == first["models"]["bilstm"]["train_seconds"]
