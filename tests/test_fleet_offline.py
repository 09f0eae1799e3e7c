"""The fleet's offline claims (issue 7), asserted on the committed reports, so a regenerated report
that regresses fails here; and a quick multi-site evaluation with a pooled model, exported."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dtwin.cli import main

REPORTS = Path(__file__).resolve().parents[1] / "reports"
SITE_KEYS = ("b1", "b2", "persistence", "persistence_sla", "ai_raw", "ai_sla", "ai_sla_static")


def _report(name: str) -> dict:
    return json.loads((REPORTS / name / "report.json").read_text())


# --- the committed reports -----------------------------------------------------------------------


def test_paper_site_baselines_reproduce_the_paper():
    a = _report("paper")["allocators"]
    assert a["b1"]["efficiency_median"] == pytest.approx(0.474, abs=0.0015)
    assert a["b2"]["efficiency_median"] == pytest.approx(0.543, abs=0.0015)
    assert a["b1"]["overprovisioning_mean"] == pytest.approx(457, abs=1)
    assert a["b2"]["overprovisioning_mean"] == pytest.approx(354, abs=1)


def test_paper_site_bilstm_beats_persistence():
    report = _report("paper")
    assert report["models"]["bilstm"]["allocator_prefix"] == "ai"
    assert report["data"]["test"][1] - report["data"]["test"][0] == 2146
    a = report["allocators"]
    assert a["ai_raw"]["mae"] <= 0.75 * a["persistence"]["mae"]
    assert a["ai_raw"]["rmse"] <= 0.95 * a["persistence"]["rmse"]


def test_paper_site_online_headroom():
    a = _report("paper")["allocators"]["ai_sla"]
    assert a["overprovisioning_mean"] <= 22.0
    assert a["efficiency_mean"] >= 0.93
    assert a["underprovisioning_rate"] <= 0.010


def test_fleet_report_unseen_site():
    report = _report("fleet")
    assert set(report["sites"]) == {"1", "4", "5"}
    assert report["models"]["bilstm"]["train_site_ids"] == ["1", "4"]
    site5 = report["models"]["bilstm"]["sites"]["5"]
    assert site5["trained_on"] is False
    a5 = report["sites"]["5"]["allocators"]
    assert a5["ai_raw"]["mae"] <= 0.8 * a5["persistence"]["mae"]
    assert a5["ai_raw"]["rmse"] <= 1.0 * a5["persistence"]["rmse"]
    assert a5["persistence"]["mae"] == pytest.approx(8.68, abs=0.01)


def test_fleet_report_online_headroom_on_every_site():
    report = _report("fleet")
    for site, r in report["sites"].items():
        assert set(SITE_KEYS) <= set(r["allocators"]), site
        a = r["allocators"]
        assert a["ai_sla"]["underprovisioning_rate"] <= 0.015, site
        # the online tracker provisions less than the static headroom and the calibrated persistence
        assert a["ai_sla"]["overprovisioning_mean"] < a["ai_sla_static"]["overprovisioning_mean"], site
        assert a["ai_sla"]["overprovisioning_mean"] < a["persistence_sla"]["overprovisioning_mean"], site
    # The fleet aggregate is over all sites' test intervals.
    n = sum(r["allocators"]["ai_sla"]["n"] for r in report["sites"].values())
    assert report["allocators"]["ai_sla"]["n"] == n == 3 * 2146


def test_committed_bench_bilstm_is_small_and_fast():
    rows = {r["name"]: r for r in json.loads((REPORTS / "bench" / "model.json").read_text())}
    assert rows["bilstm"]["onnx_bytes"] <= 500_000
    assert rows["bilstm"]["throughput_b256"] >= 10 * rows["paper"]["throughput_b256"]


# --- a quick multi-site run ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fleet")
    rc = main(["evaluate", "--data", str(data_dir), "--site-ids", "1,4,5", "--train-site-ids", "1,4",
               "--model", "bilstm", "--limit-samples", "1500", "--epochs", "1", "--out", str(out)])
    return rc, out


def test_multi_site_evaluate_report(fleet_run):
    rc, out = fleet_run
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["sites"]) == {"1", "4", "5"}
    assert set(SITE_KEYS) <= set(report["allocators"])
    for site, r in report["sites"].items():
        assert set(r["allocators"]) == set(report["allocators"]), site
        assert r["allocators"]["ai_sla"]["n"] == 298  # 1500 samples -> 1490 windows -> 298 test windows
        assert r["data"]["site"] == site
        # Each site's own baselines: B1 is its own training mean + 2 std.
        stats = r["training_stats"]
        assert r["policies"]["b1"]["level"] == pytest.approx(stats["mean"] + 2 * stats["std"])
    levels = {r["policies"]["b1"]["level"] for r in report["sites"].values()}
    assert len(levels) == 3
    fleet = report["allocators"]
    for name in SITE_KEYS:
        assert fleet[name]["n"] == 3 * 298
        # Equal counts per site: the fleet's miss rate is the mean of the sites'.
        rates = [r["allocators"][name]["underprovisioning_rate"] for r in report["sites"].values()]
        assert fleet[name]["underprovisioning_rate"] == pytest.approx(float(np.mean(rates)))
    m = report["models"]["bilstm"]
    assert m["train_site_ids"] == ["1", "4"]
    assert {s: v["trained_on"] for s, v in m["sites"].items()} == {"1": True, "4": True, "5": False}
    assert report["policies"]["ai_sla"]["online"]["eta"] > 0
    assert "headroom" in report["policies"]["ai_sla_static"]
    md = (out / "report.md").read_text()
    assert "## Per site" in md and "| 5 | ai_sla |" in md
    assert (out / "per_site_underprovisioning.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pooled_checkpoint_exports_with_its_online_headroom(fleet_run, tmp_path):
    from export.artifact import load_artifact
    from export.onnx_export import export_checkpoint
    from forecaster.core.online import OnlineHeadroom
    from forecaster.train import load_checkpoint, predict

    _, out = fleet_run
    manifest = export_checkpoint(out / "bilstm.pt", tmp_path / "artifact")
    assert manifest["train_site_ids"] == ["1", "4"]
    assert manifest["kind"] == "bilstm" and manifest["bytes"] <= 500_000
    for key in ("0.005", "0.01", "0.02", "0.05"):
        for which in ("model", "persistence"):
            assert OnlineHeadroom.from_dict(manifest["online_headroom"][key][which]).target == float(key)
    model, ckpt = load_checkpoint(out / "bilstm.pt")
    x = ckpt["test_x"].numpy()
    assert len(x) == 2 * 298  # the test windows of both training sites
    np.testing.assert_allclose(load_artifact(tmp_path / "artifact").predict(x), predict(model, x), rtol=0, atol=1e-3)
