"""Helpers for the loop and fault tests on Apache Kafka: the measuring kit of ``dtwin bench recovery``
(dtwin.commands.recovery), figures printed and recorded, and the fuzzer's Hypothesis-built records."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from contracts.messages import MAX_SAMPLE_BYTES, SAMPLE_FIELDS, SAMPLE_SCHEMA, TS_MAX, Rejected, check_key, parse_sample
from dtwin.commands.recovery import Record, site_partition

WARMUP = 50  # baseline warm-up of the test workers: scored intervals start early in short replays
STEP = 300
HORIZON = 2016  # the workers' default DTWIN_FUTURE_HORIZON_INTERVALS


def report(record_property: Callable[[str, object], None], scenario: str, figures: dict) -> None:
    """Print a scenario's figures (seen with ``pytest -s``) and keep them in the JUnit XML."""
    text = json.dumps(figures, sort_keys=True, default=str)
    print(f"\n[{scenario}] {text}", flush=True)
    record_property(scenario, text)


def reason_of(r: Record) -> str | None:
    """The contract's verdict on one record before the engine: its reject reason, or None for a sample."""
    try:
        sample = parse_sample(r.value)
        check_key(r.key, sample.site)
    except Rejected as rej:
        return rej.reason
    return None


# --- the fuzzer's records -----------------------------------------------------------------------------------------
# A "template" is a record whose reason depends only on its own bytes. An "engine" record is placed relative
# to a site's last accepted sample (duplicate, out of order, misaligned, too far ahead) when the stream is laid out.
@dataclass(frozen=True)
class Template:
    kind: str
    key: bytes | None  # b"\x00SITE" stands for the good site's key, filled in at layout
    value: bytes | None
    reason: str | None  # None: let the contract say (binary garbage), checked to be a reject


@dataclass(frozen=True)
class EngineCase:
    kind: str  # duplicate, out_of_order, misaligned, too_far_ahead
    amount: int  # intervals back, seconds off the grid, or intervals ahead


SITE_KEY = b"\x00SITE"
NUMERIC = ("ts", "internet", "sessions", "vpn", "downstream")
KPIS = ("internet", "sessions", "vpn", "downstream")


def _body(site: str = "fuzz", ts: int = 1_704_067_200) -> dict:
    return {"schema": SAMPLE_SCHEMA, "site": site, "ts": ts, "internet": 10.0, "sessions": 5.0, "vpn": 1.0,
            "downstream": 9.0}


def _dumps(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                           | st.text(max_size=20), lambda kids: st.lists(kids, max_size=4)
                           | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=10)
non_numbers = st.one_of(st.text(max_size=12), st.booleans(), st.none(), st.lists(st.integers(), max_size=3),
                        st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))


def _with(field: str, raw_literal: str) -> bytes:
    """A sample whose ``field`` is the raw JSON literal given (NaN, Infinity, 1e400...)."""
    body = _body()
    body[field] = "@@"
    return _dumps(body).replace(b'"@@"', raw_literal.encode())


@st.composite
def templates(draw) -> Template:
    kind = draw(st.sampled_from((
        "binary", "truncated", "not_an_object", "missing_field", "unknown_field", "unsupported_schema",
        "wrong_type", "bad_site", "surrogate_site", "not_finite", "huge_int", "negative", "out_of_range",
        "bad_ts", "fractional_ts", "tombstone", "too_large", "missing_key", "empty_key", "non_utf8_key",
        "mismatched_key", "nested")))
    body = _body()
    if kind == "binary":
        return Template(kind, SITE_KEY, draw(st.binary(max_size=300)), None)
    if kind == "truncated":
        raw = _dumps(body)
        return Template(kind, SITE_KEY, raw[:draw(st.integers(0, len(raw) - 1))], "malformed_json")
    if kind == "not_an_object":
        value = draw(st.one_of(st.lists(json_values, max_size=5), st.integers(), st.text(max_size=30),
                               st.floats(allow_nan=False), st.booleans(), st.none()))
        return Template(kind, SITE_KEY, _dumps(value), "not_an_object")
    if kind == "missing_field":
        gone = draw(st.sets(st.sampled_from(SAMPLE_FIELDS), min_size=1))
        return Template(kind, SITE_KEY, _dumps({k: v for k, v in body.items() if k not in gone}), "missing_field")
    if kind == "unknown_field":
        extra = draw(st.dictionaries(st.text(min_size=1, max_size=12).filter(
            lambda k: k not in (*SAMPLE_FIELDS, "schema")), json_values, min_size=1, max_size=3))
        return Template(kind, SITE_KEY, _dumps({**body, **extra}), "unknown_field")
    if kind == "unsupported_schema":
        body["schema"] = draw(json_values.filter(lambda s: s != SAMPLE_SCHEMA))
        return Template(kind, SITE_KEY, _dumps(body), "unsupported_schema")
    if kind == "wrong_type":
        body[draw(st.sampled_from(NUMERIC))] = draw(non_numbers)
        return Template(kind, SITE_KEY, _dumps(body), "wrong_type")
    if kind == "bad_site":
        body["site"] = draw(st.one_of(st.just(""), st.integers(), st.none(), st.lists(st.text(max_size=3))))
        return Template(kind, SITE_KEY, _dumps(body), "wrong_type")
    if kind == "surrogate_site":  # valid JSON, but not text that UTF-8 can encode
        return Template(kind, SITE_KEY, _dumps(body).replace(b'"fuzz"', b'"fu\\ud800zz"'), "wrong_type")
    if kind == "not_finite":
        literal = draw(st.sampled_from(("NaN", "Infinity", "-Infinity", "1e400", "-1e999")))
        return Template(kind, SITE_KEY, _with(draw(st.sampled_from(NUMERIC)), literal), "not_finite")
    if kind == "huge_int":  # beyond the float range: Python parses it, float() overflows
        return Template(kind, SITE_KEY, _with(draw(st.sampled_from(KPIS)), str(10 ** draw(st.integers(309, 2000)))),
                        "not_finite")
    if kind == "negative":
        body[draw(st.sampled_from(KPIS))] = draw(st.floats(max_value=-1e-6, allow_infinity=False, allow_nan=False))
        return Template(kind, SITE_KEY, _dumps(body), "negative_value")
    if kind == "out_of_range":
        body[draw(st.sampled_from(KPIS))] = draw(st.one_of(st.just(1e308), st.floats(
            min_value=1000.000001, allow_infinity=False, allow_nan=False), st.integers(1001, 10**300)))
        return Template(kind, SITE_KEY, _dumps(body), "out_of_range")
    if kind == "bad_ts":
        body["ts"] = draw(st.one_of(st.integers(-10**300, -1), st.integers(min_value=TS_MAX + 1, max_value=10**300),
                                    st.just(1e300), st.floats(min_value=TS_MAX * 2.0, allow_infinity=False)))
        return Template(kind, SITE_KEY, _dumps(body), "bad_timestamp")
    if kind == "fractional_ts":
        body["ts"] = draw(st.floats(0, TS_MAX).filter(lambda x: x != int(x)))
        return Template(kind, SITE_KEY, _dumps(body), "bad_timestamp")
    if kind == "tombstone":
        return Template(kind, SITE_KEY, None, "tombstone")
    if kind == "too_large":  # just past the limit, not the 2 MB ones (those are few and added apart)
        pad = draw(st.integers(1, 4096))
        return Template(kind, SITE_KEY, _dumps(body)[:-1] + b" " * (MAX_SAMPLE_BYTES + pad) + b"}",
                        "payload_too_large")
    if kind == "missing_key":
        return Template(kind, None, _dumps(body), "missing_key")
    if kind == "empty_key":
        return Template(kind, b"", _dumps(body), "key_mismatch")
    if kind == "non_utf8_key":
        return Template(kind, b"\xff" + draw(st.binary(max_size=20)), _dumps(body), "bad_key")
    if kind == "mismatched_key":
        other = draw(st.text(min_size=1, max_size=20).filter(lambda t: t != "fuzz"))
        return Template(kind, other.encode(), _dumps(body), "key_mismatch")
    depth = draw(st.integers(2_000, 16_000))  # nested beyond the parser's recursion limit, within the size limit
    return Template(kind, SITE_KEY, b"[" * depth + b"]" * depth, "malformed_json")


engine_cases = st.one_of(
    st.builds(EngineCase, st.just("duplicate"), st.just(0)),
    st.builds(EngineCase, st.just("out_of_order"), st.integers(1, 40)),
    st.builds(EngineCase, st.just("misaligned"), st.integers(1, 100 * STEP).filter(lambda s: s % STEP)),
    st.builds(EngineCase, st.just("too_far_ahead"), st.integers(HORIZON + 1, 10**8)),
)


def hypothesis_pool(strategy: st.SearchStrategy, n: int) -> list:
    """``n`` examples of ``strategy``, the same in every run (derandomized, no example database)."""
    out: list = []

    @settings(max_examples=n, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(x) -> None:
        out.append(x)

    collect()
    return out


@dataclass
class Laid:
    """One record of the fuzzed stream and what must come of it."""

    record: Record
    reason: str | None  # the dead letter's reason; None for a good sample (it must get a command)
    kind: str


def with_site(t: Template, site: str) -> Record:
    key = site.encode() if t.key == SITE_KEY else t.key
    value = t.value
    if value is not None and b'"fuzz"' in value and len(value) < 2 * MAX_SAMPLE_BYTES:
        value = value.replace(b'"fuzz"', json.dumps(site).encode(), 1)
    return Record(key, value)


def edge_case_good(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    """A good sample written differently: still accepted (bounds 0 and 1000, schema left out, keys reordered,
    whitespace, padded to exactly the size limit)."""
    body = json.loads(raw)
    kind = rng.choice(("bounds", "no_schema", "reordered", "spaced", "padded"))
    if kind == "bounds":
        body[rng.choice(KPIS)] = rng.choice((0, 0.0, 1000, 1000.0))
    elif kind == "no_schema":
        del body["schema"]
    elif kind == "reordered":
        items = list(body.items())
        rng.shuffle(items)
        body = dict(items)
    elif kind == "spaced":
        return json.dumps(body, indent=3).encode(), kind
    else:
        text = json.dumps(body).encode()
        return text[:-1] + b" " * (MAX_SAMPLE_BYTES - len(text)) + b"}", kind
    return json.dumps(body).encode(), kind


def lay_out(good: Sequence[Record], pool: Sequence[Template], cases: Sequence[EngineCase], n_bad: int,
            big: int, partitions: int, seed: int = 8) -> list[Laid]:
    """Interleave the good samples (in order) with ``n_bad`` records drawn from the pools, ``big`` of them 2 MB,
    tracking each site's last accepted ts so engine cases get their reasons."""
    rng = random.Random(seed)
    kinds: dict[str, list[Template]] = {}
    for t in pool:
        kinds.setdefault(t.kind, []).append(t)
    case_kinds: dict[str, list[EngineCase]] = {}
    for c in cases:
        case_kinds.setdefault(c.kind, []).append(c)
    good_left = list(good)
    sites = sorted({parse_sample(r.value).site for r in good})
    last: dict[str, int] = {}
    jump: dict[str, int] = {}  # a site's set-aside far-ahead ts since its last accepted sample
    out: list[Laid] = []
    big_at = set(rng.sample(range(n_bad), big))
    bad_done = 0
    while good_left or bad_done < n_bad:
        if good_left and (bad_done >= n_bad or rng.random() < len(good_left) / (len(good_left) + n_bad - bad_done)):
            r = good_left.pop(0)
            s = parse_sample(r.value)
            value, kind = r.value, "good"
            if rng.random() < 0.05:
                value, kind = edge_case_good(r.value, rng)
            out.append(Laid(Record(r.key, value, r.partition), None, kind))
            last[s.site] = s.ts
            jump.pop(s.site, None)
            continue
        site = rng.choice(sites)
        part = site_partition(site.encode(), partitions)  # after the site's earlier samples, in its partition
        if bad_done in big_at:
            blob = rng.randbytes(2 * 1024 * 1024)
            out.append(Laid(Record(site.encode(), blob, part), "payload_too_large", "2MB"))
        elif site in last and rng.random() < 0.2:
            case = rng.choice(case_kinds[rng.choice(sorted(case_kinds))])
            ts = last[site]
            if case.kind == "out_of_order":
                ts -= case.amount * STEP
            elif case.kind == "misaligned":
                ts += case.amount
            elif case.kind == "too_far_ahead":
                ts += case.amount * STEP
                if jump.get(site) is not None and ts == jump[site] + STEP:
                    ts += STEP  # would continue the set-aside sample: that is a real jump, not a reject
                jump[site] = ts
            body = _body(site, ts)
            out.append(Laid(Record(site.encode(), _dumps(body), part), case.kind, case.kind))
        else:
            # Kinds drawn evenly: Hypothesis does not repeat an example, so fixed ones (a tombstone) occur
            # once in its pool.
            t = rng.choice(kinds[rng.choice(sorted(kinds))])
            rec = with_site(t, site)  # keyed records go by the producer's (murmur2) partitioner
            reason = t.reason if t.reason is not None else reason_of(rec)
            out.append(Laid(rec, reason, t.kind))
        bad_done += 1
    return out


def check_laid(laid: Sequence[Laid]) -> None:
    """The generator is honest: each template record gets the reason it is laid out with from the contract
    alone (engine cases and good samples are checked by the engine, live)."""
    for x in laid:
        if x.kind in ("duplicate", "out_of_order", "misaligned", "too_far_ahead"):
            assert reason_of(x.record) is None, x
            continue
        got = reason_of(x.record)
        assert got == x.reason, (x.kind, got, x.reason, (x.record.value or b"")[:120])
