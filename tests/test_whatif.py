"""What-if on the twin (controller.whatif, `dtwin whatif`): scenarios replayed offline through the
controller's engine on real data, and the same samples scored live by a real worker on Apache Kafka."""

from __future__ import annotations

import argparse
import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from contracts.messages import encode_sample
from contracts.topics import Topics
from controller.whatif import Scenario, WhatIfError, resolve_model, run_whatif, samples
from dtwin.commands.swapbench import KAFKA_ENV, derive_artifact
from dtwin.runner import start_controller, value, wait_until
from dtwin.topics import create_topics
from export.artifact import load_artifact
from export.registry import Registry
from forecaster.core.metrics import SUMMARY_KEYS
from replay.sites import replay_sites
from tests.brokers import produce


@pytest.fixture(scope="module")
def artifact(artifact_dir):
    return load_artifact(artifact_dir)


@pytest.fixture(scope="module")
def sites(real_site):
    return replay_sites(3, bases=[real_site])


@pytest.mark.parametrize("start", [0, 4000, 8000])
def test_a_surge_raises_the_underprovisioning_of_b2_and_of_the_raw_forecast(artifact, sites, start):
    result = run_whatif(Scenario("surge", start=start), sites, artifact)
    with_surge, without = result.run.table(), result.reference.table()
    for name in ("b2", "ai_raw"):
        assert with_surge[name]["underprovisioning_rate"] > without[name]["underprovisioning_rate"], name
        assert with_surge[name]["n"] == without[name]["n"] == 3 * 576
    # Only the event differs: every decision before it is the same.
    first, last = result.prepared.event
    assert last - first == 36
    for site in result.run.sites:
        for name in with_surge:
            _, a = result.run.series(name, site)
            _, b = result.reference.series(name, site)
            np.testing.assert_array_equal(a[:first - 288], b[:first - 288])
    # By default the event sits on the peak hours of the first scored day (the sites' total demand).
    day = np.sum([s.values[288:576, 0].astype(np.float64) for s in result.prepared.reference], axis=0)
    means = np.convolve(day, np.ones(36) / 36, mode="valid")
    assert means[first - 288] == pytest.approx(means.max())


def test_an_outage_leaves_persistence_underprovisioned_when_demand_returns(artifact, sites):
    result = run_whatif(Scenario("outage", start=2000, event_at=100, event_length=12), sites, artifact)
    first, last = result.prepared.event
    assert all(float(np.abs(s.values[first:last]).max()) == 0.0 for s in result.prepared.sites)
    with_outage, without = result.run.table(), result.reference.table()
    assert with_outage["b2"]["underprovisioning_rate"] <= without["b2"]["underprovisioning_rate"]
    assert with_outage["b2"]["overprovisioning_mean"] > without["b2"]["overprovisioning_mean"]
    for site in result.run.sites:
        for name in with_outage:  # zero demand is never under-provisioned
            actual, alloc = result.run.series(name, site)
            assert not np.any(actual[first - 288:last - 288] > alloc[first - 288:last - 288]), name
        # When demand returns, persistence has just allocated for the zero it saw last.
        actual, alloc = result.run.series("persistence_sla", site)
        assert actual[last - 288] > alloc[last - 288]


def test_a_recorded_slice_has_no_reference_and_a_candidate_is_compared(artifact, sites, tmp_path):
    worse = load_artifact(derive_artifact(artifact.directory, tmp_path / "worse", "worse", bias=-30.0, noise=40.0))
    result = run_whatif(Scenario("recorded", start=500, warmup=50, intervals=300), sites, artifact, worse)
    assert result.reference is None and result.prepared.event is None
    table = result.run.table()
    assert table["candidate"]["n"] == table["current"]["n"] == table["ai_sla"]["n"] == 900
    assert table["current"] == table["ai_sla"]
    cmp = result.comparison()
    assert not cmp.wins and cmp.candidate_versions == ("worse",)
    assert table["candidate"]["overprovisioning_mean"] > table["current"]["overprovisioning_mean"]
    out = result.to_dict()
    json.dumps(out, allow_nan=False)
    assert out["comparison"]["wins"] is False and out["reference"] is None


def test_bad_scenarios_are_refused_with_a_reason(artifact, sites):
    with pytest.raises(WhatIfError, match="scenario must be one of"):
        Scenario("flood")
    with pytest.raises(WhatIfError, match="within the 10 scored"):
        Scenario("surge", intervals=10, event_length=20)
    with pytest.raises(WhatIfError, match="too short"):
        run_whatif(Scenario("recorded", start=10_700), sites, artifact)
    with pytest.raises(WhatIfError, match="warm-up"):
        run_whatif(Scenario("recorded", warmup=5), sites, artifact)


def test_models_resolve_as_folders_registry_versions_and_pointers(artifact_dir, tmp_path):
    reg = Registry(tmp_path / "reg")
    version = reg.publish(artifact_dir)
    other = reg.publish(derive_artifact(artifact_dir, tmp_path / "v2", "v2", scale=1.02))
    reg.promote(version, force=True)
    assert resolve_model(None, reg.root).path == reg.versions / version
    assert resolve_model(None, reg.root, "candidate") is None
    reg.stage(other)
    assert resolve_model(None, reg.root, "candidate").path == reg.versions / "v2"
    assert resolve_model("v2", reg.root).source == "registry version"
    assert resolve_model(str(artifact_dir), None).source == "folder"
    with pytest.raises(WhatIfError, match=r"no version 'v9'.*versions: "):
        resolve_model("v9", reg.root)
    with pytest.raises(WhatIfError, match="no registry"):
        resolve_model("v2", None)
    with pytest.raises(WhatIfError, match=r"previous pointer .* is not set"):
        resolve_model("previous", reg.root)


def run_cli(*argv: str) -> int:
    from dtwin.commands import whatif

    parser = argparse.ArgumentParser(prog="dtwin")
    sub = parser.add_subparsers(dest="command", required=True)
    whatif.register(sub, sub.add_parser("bench").add_subparsers(dest="bench"))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


def test_cli_prints_and_writes_json_and_png(artifact_dir, data_dir, tmp_path, capsys):
    reg = Registry(tmp_path / "reg")
    reg.promote(reg.publish(artifact_dir), force=True)
    reg.stage(reg.publish(derive_artifact(artifact_dir, tmp_path / "cand", "cand", scale=1.02)))
    out_json, png = tmp_path / "w.json", tmp_path / "w.png"
    assert run_cli("whatif", "--scenario", "surge", "--data", str(data_dir), "--site-ids", "1,4", "--registry",
                   str(reg.root), "--intervals", "300", "--json", str(out_json), "--figure", str(png)) == 0
    text = capsys.readouterr().out
    assert "what-if 'surge' on 2 site(s)" in text and "candidate cand" in text and "B2 (warm-up P95)" in text
    report = json.loads(out_json.read_text())
    assert report["models"]["candidate"]["source"] == "registry candidate"
    assert set(report["allocators"]) == {"ai_sla", "ai_raw", "ai_sla_static", "candidate", "current",
                                         "persistence_sla", "b1", "b2"}
    assert set(report["allocators"]["b2"]) == set(SUMMARY_KEYS)
    assert report["scenario"]["sites"] == ["1", "4"] and report["reference"]["b2"]["n"] == 600
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert run_cli("whatif", "--scenario", "outage", "--model", str(tmp_path / "nowhere")) == 2
    assert "not an artifact folder" in capsys.readouterr().err


@pytest.mark.kafka
@pytest.mark.timeout(300)
def test_the_whatif_table_equals_the_live_scoring_of_the_same_samples(kafka, artifact_dir, sites, tmp_path):
    """The scenario's samples, replayed on Apache Kafka through a real worker serving the same registry
    (current and candidate) with the same warm-up, give the same per-allocator figures to 1e-6."""
    reg = Registry(tmp_path / "reg")
    reg.promote(reg.publish(artifact_dir), force=True)
    reg.stage(reg.publish(derive_artifact(artifact_dir, tmp_path / "cand", "cand", scale=0.97, noise=5.0)))
    scenario = Scenario("surge", start=3000, warmup=100, intervals=300, event_length=24)
    result = run_whatif(scenario, sites[:2], load_artifact(reg.resolve("current")),
                        load_artifact(reg.resolve("candidate")))
    batch = samples(result.prepared.sites)
    assert len(batch) == 2 * 400

    topics = Topics("whatif.")
    create_topics(kafka.bootstrap, topics, 2, app_id="whatif")
    ctl = start_controller(kafka.bootstrap, None, tmp_path, topics.prefix, "whatif", 2,
                           extra_env={**KAFKA_ENV, "DTWIN_MODEL_REGISTRY": str(reg.root),
                                      "DTWIN_BASELINE_WARMUP_INTERVALS": str(scenario.warmup)})
    try:
        produce(kafka.bootstrap, topics.samples, [(s.site.encode(), encode_sample(s.site, s.ts, s.values))
                                                  for s in batch])
        wait_until(lambda: value(ctl.metrics() or {}, "dtwin_samples_received_total") >= len(batch), 240, 0.5,
                   "the worker to score the scenario's samples", ctl.alive)
        with urllib.request.urlopen(f"http://127.0.0.1:{ctl.web_port}/dtwin/summary", timeout=10) as resp:
            live = json.loads(resp.read())
    finally:
        ctl.stop()
    assert (live["model"], live["candidate"]) == (result.current.version, "cand")
    offline = result.run.table()
    assert set(live["allocators"]) == set(offline)
    for name, want in offline.items():
        got = live["allocators"][name]
        assert got["n"] == want["n"] == 600, name
        for key in SUMMARY_KEYS:
            if key in ("n", "efficiency_median"):  # the worker keeps sums only: no median
                continue
            assert got[key] == pytest.approx(want[key], abs=1e-6), (name, key)
    assert "Traceback" not in Path(ctl.log_path).read_text(errors="replace")
