"""The controller's batch engine on a real exported model and real data (no Kafka): decisions,
per-site baselines and online headroom against their offline twins, redelivery and bad order."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest

from contracts.messages import Sample
from contracts.state import SiteState, StateError, decode_state, encode_state
from controller.engine import (
    AI_SLA,
    AI_SLA_STATIC,
    B1,
    B2,
    CANDIDATE,
    CURRENT,
    FALLBACK,
    PERSISTENCE_SLA,
    Engine,
    EngineSettings,
    ServedModel,
)
from controller.metrics import FleetMetrics
from controller.serving import persistence_headroom, served_model
from forecaster.core.baselines import live_levels
from forecaster.core.metrics import summarize
from forecaster.core.windows import make_windows
from replay.sites import replay_sites

STEP = 300
T0 = 1_704_067_200
WARMUP = 300
N = 1200  # samples per site


@pytest.fixture(scope="module")
def artifact(artifact_dir):
    from export.artifact import load_artifact

    return load_artifact(artifact_dir)


def make_engine(artifact, warmup: int = WARMUP, candidate=None, horizon: int = 2016) -> Engine:
    return Engine(EngineSettings(window=artifact.window, step_seconds=STEP,
                                 persistence=persistence_headroom(artifact.manifest, 0.01), warmup=warmup,
                                 horizon_intervals=horizon),
                  served_model(artifact, 0.01), served_model(candidate, 0.01) if candidate is not None else None)


@pytest.fixture(scope="module")
def sites(real_site):
    return [s.slice(0, N) for s in replay_sites(2, bases=[real_site])]


def samples_of(site, start: int = 0, stop: int | None = None) -> list[Sample]:
    stop = len(site.values) if stop is None else stop
    return [Sample(site.name, T0 + i * STEP, tuple(float(v) for v in site.values[i])) for i in range(start, stop)]


def interleave(sites, stop: int | None = None) -> list[Sample]:
    per_site = [samples_of(s, 0, stop) for s in sites]
    return [smp for group in zip(*per_site, strict=True) for smp in group]


def run(engine: Engine, samples: list[Sample], batch: int, states=None, positions=None, now: float = 1.0):
    """Feed samples in batches, carrying the states through the binary codec as the table does."""
    states = dict(states or {})
    positions = positions or [(0, i) for i in range(len(samples))]
    out = {"commands": [], "rejects": [], "reemitted": [], "scores": {}, "redelivered": 0, "gaps": 0}
    metrics = FleetMetrics(["ai_sla"], 0.01, process_collectors=False)
    for i in range(0, len(samples), batch):
        res = engine.process(states, samples[i:i + batch], positions[i:i + batch], now)
        states.update({k: decode_state(encode_state(v)) for k, v in res.states.items()})
        out["commands"] += res.commands
        out["reemitted"] += res.reemitted
        out["rejects"] += [(i + j, reason) for j, reason, _ in res.rejects]
        out["redelivered"] += res.redelivered
        out["gaps"] += res.gaps
        for name, sc in res.scores.items():
            d = out["scores"].setdefault(name, {"sites": [], "actual": [], "allocated": []})
            for k in d:
                d[k] += getattr(sc, k)
        metrics.observe(res)
    out["metrics"] = metrics
    return states, out


def strip(c):
    """A command without its batch-relative sample index."""
    return (c.site, c.ts, c.allocated, c.forecast, c.policy, c.model_version, c.decided_at)


def test_every_sample_gets_one_command_fallback_until_the_window_is_full(artifact, sites):
    samples = samples_of(sites[0], 0, 40)
    _, out = run(make_engine(artifact), samples, 7)
    assert [c.ts for c in out["commands"]] == [s.ts + STEP for s in samples]
    assert [c.policy for c in out["commands"]] == [FALLBACK] * 9 + [AI_SLA] * 31
    assert all(math.isfinite(c.allocated) and c.allocated >= 0 for c in out["commands"])
    first_model = out["commands"][9]
    x = np.asarray([s.values for s in samples[:10]], dtype=np.float32)[None]
    assert first_model.forecast == pytest.approx(float(artifact.predict(x)[0]), abs=1e-9)


def test_batching_does_not_change_anything(artifact, sites):
    samples = interleave(sites, 500)
    ref_states, ref = run(make_engine(artifact), samples, 1000)
    for batch in (1, 13, 250):
        states, out = run(make_engine(artifact), samples, batch)
        assert [strip(c) for c in out["commands"]] == [strip(c) for c in ref["commands"]]
        assert out["scores"] == ref["scores"]
        assert {k: encode_state(v) for k, v in states.items()} == {k: encode_state(v) for k, v in ref_states.items()}


def test_live_baselines_and_online_headroom_equal_the_offline_computation(artifact, sites):
    """The shared core run offline over the same samples gives the live per-site levels, allocations and
    scores to 1e-6."""
    engine = make_engine(artifact)
    states, out = run(engine, interleave(sites), 97)
    model, pers = engine.model, engine.settings.persistence
    for site in sites:
        values = site.values.astype(np.float64)
        internet = values[:, 0]
        levels = live_levels(internet, WARMUP)
        assert states[site.name].levels == pytest.approx((levels.mean, levels.std, levels.p95), abs=1e-6)
        x, y = make_windows(site.values, 10)  # window i predicts row i + 10
        forecast = artifact.predict(x)
        # The site's level when deciding after k samples: the mean of its first min(k, WARMUP) values.
        seen = np.minimum(np.arange(1, len(internet) + 1), WARMUP)
        level = np.cumsum(internet)[seen - 1] / seen
        scale = model.online.scale(forecast, level[9:9 + len(x)])
        ai, q_ai = model.online.run(forecast, scale, y, q=model.online.q0)
        # Persistence decides on every sample, also before the window is full.
        pers_scale = pers.scale(internet[:-1], level[:-1])
        persist, q_p = pers.run(internet[:-1], pers_scale, internet[1:], q=pers.q0)
        assert states[site.name].q_ai == pytest.approx(q_ai, abs=1e-9)
        assert states[site.name].q_persistence == pytest.approx(q_p, abs=1e-9)
        # Scored: intervals decided after the warm-up, i.e. rows WARMUP .. N-1.
        rows = np.arange(WARMUP, len(internet))
        expected = {AI_SLA: ai[rows - 10], PERSISTENCE_SLA: persist[rows - 1],
                    AI_SLA_STATIC: np.maximum(model.static.apply(forecast[rows - 10]), 0.0),
                    B1: np.full(rows.size, levels.b1), B2: np.full(rows.size, levels.b2)}
        for name, alloc in expected.items():
            sc = out["scores"][name]
            mine = [a for s, a in zip(sc["sites"], sc["allocated"], strict=True) if s == site.name]
            np.testing.assert_allclose(mine, alloc, atol=1e-6, err_msg=name)
    # The exported sums are the shared metric code's over the same intervals.
    fleet = out["metrics"].summary()["allocators"]
    for name in (AI_SLA, B1, B2, PERSISTENCE_SLA):
        sc = out["scores"][name]
        offline = summarize(np.asarray(sc["actual"]), np.asarray(sc["allocated"]))
        for key in ("efficiency_mean", "overprovisioning_mean", "underprovisioning_rate", "wastage_mean"):
            assert fleet[name][key] == pytest.approx(offline[key], abs=1e-9)
    assert {len(v["actual"]) for k, v in out["scores"].items()} == {2 * (N - WARMUP)}


def test_nothing_is_scored_before_the_warm_up_ends(artifact, sites):
    _, out = run(make_engine(artifact, warmup=100), samples_of(sites[0], 0, 100), 50)
    assert out["scores"] == {}
    _, out = run(make_engine(artifact, warmup=100), samples_of(sites[0], 0, 101), 50)
    assert {k: len(v["actual"]) for k, v in out["scores"].items()} == {
        n: 1 for n in ("ai_sla", "ai_raw", AI_SLA_STATIC, B1, B2, PERSISTENCE_SLA)}


def test_duplicate_out_of_order_and_misaligned_are_rejected_without_changing_state(artifact, sites):
    engine = make_engine(artifact)
    good = samples_of(sites[0], 0, 20)
    states, _ = run(engine, good, 100)
    before = encode_state(states[sites[0].name])
    last = good[-1]
    bad = [Sample(last.site, last.ts, last.values), Sample(last.site, last.ts - STEP, last.values),
           Sample(last.site, last.ts + 7, last.values)]
    res = engine.process(states, bad, [(0, 100 + i) for i in range(3)], 2.0)
    assert [r[1] for r in res.rejects] == ["duplicate", "out_of_order", "misaligned"]
    assert res.commands == []
    st = res.states[last.site]
    st.partition, st.offset = states[last.site].partition, states[last.site].offset
    assert encode_state(st) == before


def test_redelivered_records_re_emit_the_identical_command_and_nothing_else(artifact, sites):
    engine = make_engine(artifact)
    samples = samples_of(sites[0], 0, 60)
    states, first = run(engine, samples, 25, now=1.0)
    again = engine.process(states, samples[40:], [(0, i) for i in range(40, 60)], now=99.0)
    assert again.redelivered == 20 and again.rejects == [] and again.commands == []
    assert len(again.reemitted) == 1
    c, orig = again.reemitted[0], first["commands"][-1]
    assert (c.site, c.ts, c.allocated, c.forecast, c.policy, c.model_version, c.decided_at) == (
        orig.site, orig.ts, orig.allocated, orig.forecast, orig.policy, orig.model_version, orig.decided_at)


def test_a_gap_restarts_the_window_with_fallback_commands(artifact, sites):
    samples = samples_of(sites[0], 0, 30) + samples_of(sites[0], 40, 60)
    _, out = run(make_engine(artifact), samples, 8)
    assert out["gaps"] == 1
    policies = [c.policy for c in out["commands"]]
    assert policies[30:39] == [FALLBACK] * 9 and policies[39] == AI_SLA
    assert len(out["commands"]) == len(samples)


def test_a_far_future_sample_is_set_aside_and_does_not_silence_the_site(artifact, sites):
    engine = make_engine(artifact, horizon=100)
    samples = samples_of(sites[0], 0, 30)
    stray = Sample(samples[0].site, samples[-1].ts + 100_000 * STEP, samples[-1].values)
    rest = samples_of(sites[0], 30, 50)
    _, out = run(engine, [*samples, stray, *rest], 10)
    assert out["rejects"] == [(30, "too_far_ahead")]
    assert len(out["commands"]) == 50 and out["gaps"] == 0
    # A real jump: the next sample continues from the far one, and is taken as a gap.
    jump = samples[-1].ts + 500 * STEP
    cont = [Sample(samples[0].site, jump + k * STEP, samples[-1].values) for k in range(3)]
    _, out = run(engine, [*samples, *cont], 10)
    assert out["rejects"] == [(30, "too_far_ahead")] and out["gaps"] == 1 and len(out["commands"]) == 32


def test_a_model_returning_nan_yields_fallback_commands_never_nan(artifact, sites):
    bad = ServedModel("nan-model", lambda x: np.full(len(x), np.nan), served_model(artifact, 0.01).online,
                      served_model(artifact, 0.01).static)
    engine = Engine(make_engine(artifact).settings, bad)
    _, out = run(engine, samples_of(sites[0], 0, 30), 10)
    assert all(c.policy == FALLBACK and math.isfinite(c.allocated) for c in out["commands"])


def test_a_candidate_is_scored_on_the_live_models_intervals(artifact, sites):
    engine = make_engine(artifact, warmup=50, candidate=artifact)
    _, out = run(engine, samples_of(sites[0], 0, 200), 40)
    cand, cur = out["scores"][CANDIDATE], out["scores"][CURRENT]
    assert len(cand["actual"]) == len(cur["actual"]) == len(out["scores"][AI_SLA]["actual"]) == 150
    np.testing.assert_allclose(cand["allocated"], cur["allocated"])  # the same model on both sides


def test_state_codec_round_trip_and_corruption():
    st = SiteState(last_ts=T0, partition=3, offset=99, rows=[[1.0, 2.0, 3.0, 4.0]] * 10, q_ai=0.1,
                   q_persistence=0.2, seen=5, total=10.0, total_sq=30.0, histogram={3: 4, 10: 1})
    assert encode_state(decode_state(encode_state(st))) == encode_state(st)
    assert decode_state(encode_state(st)).rows == st.rows
    blob = encode_state(st)
    rng = np.random.default_rng(0)
    for _ in range(300):
        cut = blob[: int(rng.integers(0, len(blob)))]
        noisy = bytearray(blob)
        noisy[int(rng.integers(0, len(blob)))] ^= 0xFF
        for data in (cut, bytes(noisy), rng.bytes(int(rng.integers(1, 200)))):
            with contextlib.suppress(StateError):
                decode_state(data)
