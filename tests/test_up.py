"""`make up`'s main job as a user runs it: `dtwin up` on the default synthetic fleet (embedded broker,
production model trained on sites it then never sees in the replay), and the fleet claims of README."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from forecaster.core.baselines import live_levels
from replay.sites import replay_sites

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.timeout(1500)]
WARMUP = 2016


@pytest.fixture(scope="module")
def up_run(tmp_path_factory) -> tuple[dict, Path]:
    run_dir = tmp_path_factory.mktemp("up")
    out = subprocess.run([sys.executable, "-m", "dtwin", "up", "--run-dir", str(run_dir), "--json",
                          str(run_dir / "up.json"), "--figure", str(run_dir / "up.png")],
                         capture_output=True, text=True, cwd=ROOT, timeout=1400)
    assert out.returncode == 0, f"dtwin up failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    print(out.stdout[-2500:])
    return json.loads((run_dir / "up.json").read_text()), run_dir


def test_up_scores_every_site_and_writes_the_figure(up_run):
    summary, run_dir = up_run
    assert summary["sites"] == 4
    assert summary["commands"] == summary["samples"] == 4 * 10_738
    assert (run_dir / "up.png").stat().st_size > 10_000
    for name in ("ai_sla", "ai_raw", "ai_sla_static", "persistence_sla", "b1", "b2"):
        assert summary["allocators"][name]["n"] == 4 * (10_738 - WARMUP), name
        spread = summary["per_site"][name]["underprovisioning_rate"]
        assert spread["min"] <= spread["median"] <= spread["p90"] <= spread["max"]


def test_every_sites_live_policy_meets_its_sla_after_warm_up(up_run):
    summary, _ = up_run
    rates = {s: v["underprovisioned"] / v["scored"] for s, v in summary["site_rates"]["ai_sla"].items()}
    assert len(rates) == 4 and max(rates.values()) <= 0.015, rates
    assert summary["per_site"]["ai_sla"]["underprovisioning_rate"]["max"] <= 0.015


def test_the_live_policy_provisions_less_than_its_non_ai_and_static_competitors(up_run):
    a = up_run[0]["allocators"]
    for other in ("persistence_sla", "ai_sla_static"):
        assert a["ai_sla"]["overprovisioning_mean"] < a[other]["overprovisioning_mean"], other
        assert a["ai_sla"]["underprovisioning_rate"] <= max(a[other]["underprovisioning_rate"], 0.01 + 0.002), other


def test_baselines_are_each_sites_own_levels(up_run):
    """B1's and B2's per-site miss rates are those of the site's own warm-up levels over its scored intervals."""
    summary, _ = up_run
    for site in replay_sites(4):
        internet = site.values[:, 0].astype(np.float64)
        levels = live_levels(internet, WARMUP)
        scored = internet[WARMUP:]
        for name, level in (("b1", levels.b1), ("b2", levels.b2)):
            got = summary["site_rates"][name][site.name]
            assert got["scored"] == scored.size
            assert got["underprovisioned"] == int(np.count_nonzero(scored > level)), (site.name, name)
