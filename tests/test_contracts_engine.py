"""Message contracts and the controller's batch engine, with a real exported model (no Kafka)."""

from __future__ import annotations

import base64
import copy
import json
import math

import numpy as np
import pytest

from contracts.messages import (
    COMMAND_SCHEMA,
    DEAD_LETTER_SCHEMA,
    REJECT_REASONS,
    SAMPLE_SCHEMA,
    Rejected,
    Sample,
    encode_command,
    encode_dead_letter,
    encode_sample,
    parse_sample,
)
from controller.engine import BatchResult, Engine
from controller.policy import allocators_from_manifest
from forecaster import KPI_NAMES
from forecaster.core.metrics import summarize
from forecaster.core.windows import make_windows
from forecaster.synthetic import generate_site

STEP = 300
T0 = 1_700_000_100  # a multiple of STEP
GOOD = {"site": "s1", "ts": T0, "internet": 412.5, "sessions": 300, "vpn": 151.25, "downstream": 380.0}


def raw(**changes) -> str:
    body = {**GOOD, **changes}
    return json.dumps({k: v for k, v in body.items() if v is not ...})


def reason_of(payload: str | bytes) -> str:
    with pytest.raises(Rejected) as info:
        parse_sample(payload)
    assert info.value.reason in REJECT_REASONS
    return info.value.reason


# --- parse_sample --------------------------------------------------------------------------------


def test_parse_good_sample_with_and_without_schema():
    expected = Sample(site="s1", ts=T0, values=(412.5, 300.0, 151.25, 380.0))
    assert parse_sample(raw()) == expected
    assert parse_sample(raw(schema=SAMPLE_SCHEMA)) == expected
    assert parse_sample(raw(schema=SAMPLE_SCHEMA).encode()) == expected
    s = parse_sample(raw(ts=float(T0)))  # 1.7e9 written as a float is still whole seconds
    assert s.ts == T0 and isinstance(s.ts, int)
    assert all(isinstance(v, float) for v in s.values)


def test_sample_json_round_trip():
    s = parse_sample(raw())
    assert parse_sample(s.to_json()) == s
    assert json.loads(encode_sample("x", 5, (1, 2, 3, 4)))["schema"] == SAMPLE_SCHEMA


@pytest.mark.parametrize(("payload", "reason"), [
    ("{\"site\": \"s1\", ", "malformed_json"),
    (b"\xff\xfe\x00", "malformed_json"),
    ("", "malformed_json"),
    ("[" * 100_000, "malformed_json"),  # too deep for the JSON parser: rejected, not a crash
    ("[1, 2, 3]", "not_an_object"),
    ("42", "not_an_object"),
    ("null", "not_an_object"),
    (raw(vpn=...), "missing_field"),
    (raw(site=...), "missing_field"),
    (raw(extra=1), "unknown_field"),
    (raw(schema="dtwin.kpi-sample/2"), "unsupported_schema"),
    (raw(schema=None), "unsupported_schema"),
    (raw(internet="412.5"), "wrong_type"),
    (raw(sessions=True), "wrong_type"),
    (raw(ts=False), "wrong_type"),
    (raw(vpn=None), "wrong_type"),
    (raw(downstream=[1.0]), "wrong_type"),
    (raw(site=""), "wrong_type"),
    (raw(site=7), "wrong_type"),
    ("{\"site\": \"\\ud800\", \"ts\": 0, \"internet\": 1, \"sessions\": 1, \"vpn\": 1, \"downstream\": 1}",
     "wrong_type"),  # a lone surrogate cannot be a record key
    (raw().replace("412.5", "NaN"), "not_finite"),
    (raw().replace("412.5", "Infinity"), "not_finite"),
    (raw().replace("412.5", "-Infinity"), "not_finite"),
    (raw().replace("412.5", "1e400"), "not_finite"),
    (raw().replace("412.5", "9" * 400), "not_finite"),  # an int beyond float range: rejected, not a crash
    (raw().replace(str(T0), "9" * 400), "not_finite"),
    (raw(vpn=-0.5), "negative_value"),
    (raw(ts=T0 + 0.5), "bad_timestamp"),
    (raw(ts=-300), "bad_timestamp"),
])
def test_parse_rejects(payload, reason):
    assert reason_of(payload) == reason


def test_rejected_carries_reason_and_detail():
    with pytest.raises(Rejected) as info:
        parse_sample(raw(extra=1, more=2))
    assert info.value.detail == "unknown extra, more"
    assert str(info.value).startswith("unknown_field: ")
    assert isinstance(info.value, ValueError)


# --- encoders ------------------------------------------------------------------------------------


def test_encode_command_round_trip():
    body = json.loads(encode_command("s1", T0 + STEP, 512.25, 480.5, "ai_sla", "delta_mlp-v1", 1700000123.1234567))
    assert body == {"schema": COMMAND_SCHEMA, "site": "s1", "ts": T0 + STEP, "allocated": 512.25,
                    "forecast": 480.5, "policy": "ai_sla", "model_version": "delta_mlp-v1",
                    "decided_at": 1700000123.123457}
    assert isinstance(body["ts"], int)


def test_encode_dead_letter_utf8_payload():
    payload = raw(extra=1).encode()
    body = json.loads(encode_dead_letter(payload, "unknown_field", "unknown extra", "dtwin.kpi-samples", 3, 42,
                                         b"s1", 12.5))
    assert body == {"schema": DEAD_LETTER_SCHEMA, "reason": "unknown_field", "detail": "unknown extra",
                    "payload": payload.decode(), "payload_base64": None, "key": "s1",
                    "source": {"topic": "dtwin.kpi-samples", "partition": 3, "offset": 42}, "rejected_at": 12.5}


def test_encode_dead_letter_binary_payload_and_no_key():
    payload = b"\xff\xfe\x00garbage\x80"
    body = json.loads(encode_dead_letter(payload, "malformed_json", "x", "t", 0, 7, None, 1.0))
    assert body["payload"] is None
    assert base64.b64decode(body["payload_base64"]) == payload
    assert body["key"] is None and body["source"] == {"topic": "t", "partition": 0, "offset": 7}
    empty = json.loads(encode_dead_letter(None, "malformed_json", "x", "t", 0, 8, b"\xff", 1.0))
    assert empty["payload"] == "" and empty["payload_base64"] is None and empty["key"] == "\ufffd"


# --- engine --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A tiny delta_mlp trained for 2 epochs and exported: the engine runs the real ONNX graph."""
    from export.artifact import load_artifact
    from export.onnx_export import export_checkpoint
    from forecaster.train import TRAIN_PRESETS, make_checkpoint, prepare, save_checkpoint, train, with_epochs

    root = tmp_path_factory.mktemp("engine")
    prep = prepare(generate_site(0, n_steps=1500))
    trained = train("delta_mlp", prep, with_epochs(TRAIN_PRESETS["delta_mlp"], 2), progress=False)
    ckpt = save_checkpoint(make_checkpoint(trained, prep), root / "delta_mlp.pt")
    export_checkpoint(ckpt, root / "artifact")
    return load_artifact(root / "artifact")


@pytest.fixture(scope="module")
def engine(artifact) -> Engine:
    live, shadows = allocators_from_manifest(artifact.manifest)
    return Engine(artifact.predict, live, shadows, window=artifact.window,
                  step_seconds=int(artifact.manifest["step_seconds"]))


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    return generate_site(2, n_steps=120).values  # another site than the training one


def samples_of(rows: np.ndarray, site: str = "s1", start: int = 0, t0: int = T0) -> list[Sample]:
    return [Sample(site=site, ts=t0 + (start + i) * STEP, values=tuple(float(v) for v in r))
            for i, r in enumerate(rows)]


def run_in_batches(engine: Engine, samples: list[Sample], size: int, states: dict | None = None):
    """Feed ``samples`` in batches of ``size``, carrying the states; collect every output."""
    states = dict(states or {})
    decisions, scored, rejects, gaps = [], {"sites": [], "ts": [], "actual": [], "forecast": [],
                                             "allocations": {n: [] for n in engine.allocator_names}}, [], 0
    for i in range(0, len(samples), size):
        res = engine.process(states, samples[i:i + size])
        states.update(res.states)
        decisions += [(d.site, d.ts, d.forecast, d.allocations) for d in res.decisions]
        for k in ("sites", "ts", "actual", "forecast"):
            scored[k] += getattr(res.scored, k)
        for n in engine.allocator_names:
            scored["allocations"][n] += res.scored.allocations[n]
        rejects += [(i + j, reason) for j, reason, _ in res.rejects]
        gaps += res.gaps
    return states, decisions, scored, rejects, gaps


def test_engine_rejects_duplicate_allocator_names(artifact):
    live, shadows = allocators_from_manifest(artifact.manifest)
    with pytest.raises(ValueError, match="unique"):
        Engine(artifact.predict, live, [*shadows, live], window=10, step_seconds=STEP)


def test_first_decision_after_a_full_window(engine, rows, artifact):
    samples = samples_of(rows[:10])
    res = engine.process({}, samples[:9])
    assert res.decisions == [] and len(res.scored) == 0 and res.rejects == [] and res.gaps == 0
    assert res.states["s1"]["last_ts"] == T0 + 8 * STEP and len(res.states["s1"]["rows"]) == 9
    assert res.states["s1"]["pending"] is None

    res = engine.process(res.states, samples[9:])
    assert len(res.decisions) == 1 and res.decision_sample == [0]
    d = res.decisions[0]
    assert d.site == "s1" and d.ts == T0 + 9 * STEP + STEP
    assert d.forecast == pytest.approx(float(artifact.predict(rows[None, :10])[0]), abs=1e-9)
    assert set(d.allocations) == {"ai_sla", "b1", "b2", "persistence_sla"}
    assert all(math.isfinite(v) and v >= 0 for v in d.allocations.values())
    assert len(res.scored) == 0
    pending = res.states["s1"]["pending"]
    assert pending == {"ts": d.ts, "forecast": d.forecast, "alloc": d.allocations}

    # The 11th sample scores that decision with its internet value.
    res = engine.process(res.states, samples_of(rows[10:11], start=10))
    assert res.scored.ts == [d.ts] and res.scored.sites == ["s1"]
    assert res.scored.actual == [float(rows[10, 0])] and res.scored.forecast == [d.forecast]
    assert {n: v[0] for n, v in res.scored.allocations.items()} == d.allocations


def test_batching_does_not_change_decisions(engine, rows):
    samples = samples_of(rows[:40])
    reference = run_in_batches(engine, samples, 40)
    states, decisions, scored, rejects, gaps = reference
    assert len(decisions) == 31 and [d[1] for d in decisions] == [T0 + (i + 1) * STEP for i in range(9, 40)]
    assert len(scored["actual"]) == 40 - 10 == 30 and rejects == [] and gaps == 0
    assert scored["ts"] == [T0 + i * STEP for i in range(10, 40)]
    assert scored["actual"] == [float(v) for v in rows[10:40, 0]]
    for size in (1, 3, 7):
        got = run_in_batches(engine, samples, size)
        # Forecasts are compared to float32 rounding: onnxruntime may pick other kernels per batch size.
        for a, b in zip(got[1], decisions, strict=True):
            assert a[:2] == b[:2]
            assert a[2] == pytest.approx(b[2], rel=1e-6, abs=1e-6)
            assert a[3] == pytest.approx(b[3], rel=1e-6, abs=1e-6)
        assert got[2]["sites"] == scored["sites"] and got[2]["ts"] == scored["ts"]
        assert got[2]["actual"] == scored["actual"]
        np.testing.assert_allclose(got[2]["forecast"], scored["forecast"], rtol=1e-6, atol=1e-6)
        for n in engine.allocator_names:
            np.testing.assert_allclose(got[2]["allocations"][n], scored["allocations"][n], rtol=1e-6, atol=1e-6)
        assert got[0]["s1"]["rows"] == states["s1"]["rows"] and got[0]["s1"]["last_ts"] == states["s1"]["last_ts"]


def test_two_sites_interleaved_match_separate_runs(engine, rows):
    a = samples_of(rows[:25], site="a")
    b = samples_of(rows[50:75], site="b")
    mixed = [s for pair in zip(a, b, strict=True) for s in pair]
    _, decisions, scored, _, _ = run_in_batches(engine, mixed, 6)
    for site, own in (("a", a), ("b", b)):
        _, d_alone, s_alone, _, _ = run_in_batches(engine, own, 25)
        mine = [d for d in decisions if d[0] == site]
        assert [d[1] for d in mine] == [d[1] for d in d_alone]
        np.testing.assert_allclose([d[2] for d in mine], [d[2] for d in d_alone], rtol=1e-6, atol=1e-6)
        idx = [i for i, s in enumerate(scored["sites"]) if s == site]
        assert [scored["actual"][i] for i in idx] == s_alone["actual"]
        assert len(idx) == 15


def test_duplicate_and_out_of_order_are_rejected_without_changing_state(engine, rows):
    samples = samples_of(rows[:14])
    before = engine.process({}, samples[:12]).states
    snapshot = copy.deepcopy(before)
    for bad, reason in ((samples[11], "duplicate"), (samples[5], "out_of_order")):
        res = engine.process(before, [bad])
        assert [(i, r) for i, r, _ in res.rejects] == [(0, reason)]
        assert res.states == snapshot and before == snapshot
        assert res.decisions == [] and len(res.scored) == 0 and res.gaps == 0

    # Within one batch: the bad ones are skipped and the good ones go on as if they were absent.
    res = engine.process(before, [samples[11], samples[12], samples[12], samples[3], samples[13]])
    assert [(i, r) for i, r, _ in res.rejects] == [(0, "duplicate"), (2, "duplicate"), (3, "out_of_order")]
    clean = engine.process(before, [samples[12], samples[13]])
    assert res.states == clean.states
    assert res.scored.ts == clean.scored.ts == [T0 + 12 * STEP, T0 + 13 * STEP]
    assert res.decision_sample == [1, 4] and clean.decision_sample == [0, 1]


def test_gap_restarts_the_window(engine, rows):
    samples = samples_of(rows[:15])
    res = engine.process({}, samples)
    assert res.states["s1"]["pending"]["ts"] == T0 + 15 * STEP
    jump = T0 + 14 * STEP + 900  # two intervals missing
    after = [Sample("s1", jump + i * STEP, tuple(float(v) for v in r)) for i, r in enumerate(rows[20:32])]
    res2 = engine.process(res.states, after[:1])
    assert res2.gaps == 1 and len(res2.scored) == 0 and res2.decisions == []
    assert res2.states["s1"]["rows"] == [list(after[0].values)] and res2.states["s1"]["pending"] is None
    assert res2.states["s1"]["last_ts"] == jump

    res3 = engine.process(res2.states, after[1:])
    assert res3.gaps == 0
    assert res3.decision_sample == [8, 9, 10]  # the 10th, 11th and 12th samples since the gap
    assert [d.ts for d in res3.decisions] == [jump + (i + 1) * STEP for i in range(9, 12)]
    assert res3.scored.ts == [jump + 10 * STEP, jump + 11 * STEP]

    # The same in one batch.
    whole = engine.process({}, samples + after)
    assert whole.gaps == 1 and len(whole.decisions) == 6 + 3
    assert whole.scored.ts == [T0 + i * STEP for i in range(10, 15)] + res3.scored.ts
    assert T0 + 15 * STEP not in whole.scored.ts


def test_states_are_json_and_resume_identically(engine, rows):
    samples = samples_of(rows[:40])
    first = engine.process({}, samples[:23])
    text = json.dumps(first.states)  # what the Faust table stores
    restored = json.loads(text)
    assert restored == first.states
    a = engine.process(first.states, samples[23:])
    b = engine.process(restored, samples[23:])
    assert [(d.site, d.ts, d.forecast, d.allocations) for d in a.decisions] == \
        [(d.site, d.ts, d.forecast, d.allocations) for d in b.decisions]
    assert a.scored == b.scored and a.states == b.states
    json.dumps(a.states)
    # And it equals the single batch.
    whole = engine.process({}, samples)
    assert first.scored.ts + b.scored.ts == whole.scored.ts
    assert first.scored.actual + b.scored.actual == whole.scored.actual
    np.testing.assert_allclose(first.scored.forecast + b.scored.forecast, whole.scored.forecast,
                               rtol=1e-6, atol=1e-6)


def test_live_metrics_match_offline_allocation(engine, rows, artifact):
    samples = samples_of(rows[:40])
    results: list[BatchResult] = []
    states: dict = {}
    for i in range(0, 40, 7):
        results.append(engine.process(states, samples[i:i + 7]))
        states.update(results[-1].states)
    actual = np.concatenate([r.scored.actual for r in results])
    x, y = make_windows(rows[:40], artifact.window)
    assert len(x) == len(actual) == 30
    np.testing.assert_array_equal(actual, y.astype(np.float64))
    forecast = artifact.predict(x)
    last = x[:, -1, 0].astype(np.float64)
    for alloc in engine.allocators:
        live = np.concatenate([r.scored.allocations[alloc.name] for r in results])
        offline = alloc.allocate(last, forecast)
        got, want = summarize(actual, live), summarize(y, offline)
        assert got["n"] == want["n"] == 30
        for k in got:
            assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-6, nan_ok=True), (alloc.name, k)


def test_kpi_names_order_is_the_contract():
    assert KPI_NAMES == ("internet", "sessions", "vpn", "downstream")
