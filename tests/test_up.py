"""The live-fleet claims of README and BENCHMARKS, asserted on the committed outputs of the commands that
produced them (`dtwin up --json`, see BENCHMARKS.md "Live fleet"): a re-run that regresses shows here.

* reports/live/up-synthetic.json: `make up` (the default synthetic fleet, embedded broker);
* reports/live/up-real.json: `dtwin up --data ../shared/datasets/network-operator-kpis --site-ids 1,4,5 --sites 30`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from forecaster.core.baselines import live_levels
from replay.sites import replay_sites

ROOT = Path(__file__).resolve().parents[1]
LIVE = ROOT / "reports" / "live"
RUNS = {name: LIVE / f"up-{name}.json" for name in ("synthetic", "real") if (LIVE / f"up-{name}.json").is_file()}


@pytest.fixture(params=sorted(RUNS))
def run(request) -> tuple[str, dict]:
    return request.param, json.loads(RUNS[request.param].read_text())


def test_every_site_is_scored_on_the_same_intervals(run):
    name, summary = run
    sites = 4 if name == "synthetic" else 30
    assert summary["sites"] == sites
    assert summary["commands"] == summary["samples"] == sites * 10_738
    n = summary["allocators"]["ai_sla"]["n"]
    assert n == sites * (10_738 - summary["warmup_intervals"])
    for a in ("ai_raw", "ai_sla_static", "persistence_sla", "b1", "b2"):
        assert summary["allocators"][a]["n"] == n, a


def test_every_sites_live_policy_meets_its_sla_after_warm_up(run):
    _, summary = run
    rates = {s: v["underprovisioned"] / v["scored"] for s, v in summary["site_rates"]["ai_sla"].items()}
    assert max(rates.values()) <= 0.015, {s: r for s, r in rates.items() if r > 0.015}
    assert summary["per_site"]["ai_sla"]["underprovisioning_rate"]["max"] <= 0.015


def no_higher_miss_rate(a: dict, other: str, target: float = 0.01) -> bool:
    """ai_sla's miss rate is not above the other allocator's or the SLA target, beyond two standard errors
    of a rate at the target over the scored intervals (0.11 points at 34,888): the tracker aims at the target
    itself, so its realized rate sits within sampling noise of it."""
    n = a["ai_sla"]["n"]
    return a["ai_sla"]["underprovisioning_rate"] <= max(a[other]["underprovisioning_rate"], target) + 2 * np.sqrt(
        target * (1 - target) / n)


def test_the_live_policy_provisions_less_than_persistence_at_no_higher_miss_rate(run):
    a = run[1]["allocators"]
    assert a["ai_sla"]["overprovisioning_mean"] < a["persistence_sla"]["overprovisioning_mean"]
    assert no_higher_miss_rate(a, "persistence_sla")


def test_the_live_policy_provisions_less_than_the_static_headroom_at_no_higher_miss_rate(run):
    a = run[1]["allocators"]
    assert a["ai_sla"]["overprovisioning_mean"] < a["ai_sla_static"]["overprovisioning_mean"]
    assert no_higher_miss_rate(a, "ai_sla_static")


@pytest.mark.parametrize("name", ["synthetic", "real"])
def test_the_runs_are_committed(name):
    assert name in RUNS, f"no {LIVE / f'up-{name}.json'}: run `dtwin up --json` (BENCHMARKS.md, Live fleet)"


def test_baselines_are_each_sites_own_levels(run, real_site):
    """B1's and B2's per-site miss rates are those of each site's own warm-up levels over its scored
    intervals, recomputed here from the replayed data."""
    name, summary = run
    if name == "synthetic":
        sites = replay_sites(4)
    else:
        from forecaster.data import load_site, site_series

        data = Path(real_site.source.split(" [")[0])
        sites = replay_sites(30, bases=[load_site(data, site_series(i), name=str(i)) for i in (1, 4, 5)])
    warmup = summary["warmup_intervals"]
    for site in sites:
        internet = site.values[:, 0].astype(np.float64)
        levels = live_levels(internet, warmup)
        scored = internet[warmup:]
        for allocator, level in (("b1", levels.b1), ("b2", levels.b2)):
            got = summary["site_rates"][allocator][site.name]
            assert got["scored"] == scored.size
            assert abs(got["underprovisioned"] - int(np.count_nonzero(scored > level))) <= 1, (site.name, allocator)
