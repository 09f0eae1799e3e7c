"""Message contracts: samples, commands and dead letters."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest

from contracts.messages import (
    COMMAND_SCHEMA,
    DEAD_LETTER_PAYLOAD_BYTES,
    DEAD_LETTER_SCHEMA,
    REJECT_REASONS,
    SAMPLE_SCHEMA,
    Rejected,
    Sample,
    check_key,
    encode_command,
    encode_dead_letter,
    encode_sample,
    parse_sample,
)
from forecaster import KPI_NAMES

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
    ("[" * 60_000, "malformed_json"),  # too deep for the JSON parser: rejected, not a crash
    (None, "tombstone"),
    ("{" + " " * (64 * 1024) + "}", "payload_too_large"),
    (raw(internet=1e308), "out_of_range"),
    (raw(vpn=1000.001), "out_of_range"),
    (raw(ts=1e300), "bad_timestamp"),
    (raw(ts=253_402_300_800), "bad_timestamp"),
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
                    "payload_bytes": len(payload), "payload_truncated": False, "tombstone": False,
                    "payload_sha256": hashlib.sha256(payload).hexdigest(),
                    "source": {"topic": "dtwin.kpi-samples", "partition": 3, "offset": 42}, "rejected_at": 12.5}


def test_encode_dead_letter_binary_payload_and_no_key():
    payload = b"\xff\xfe\x00garbage\x80"
    body = json.loads(encode_dead_letter(payload, "malformed_json", "x", "t", 0, 7, None, 1.0))
    assert body["payload"] is None
    assert base64.b64decode(body["payload_base64"]) == payload
    assert body["key"] is None and body["source"] == {"topic": "t", "partition": 0, "offset": 7}
    empty = json.loads(encode_dead_letter(None, "malformed_json", "x", "t", 0, 8, b"\xff", 1.0))
    assert empty["payload"] == "" and empty["payload_base64"] is None and empty["key"] == "\ufffd"


def test_kpi_names_order_is_the_contract():
    assert KPI_NAMES == ("internet", "sessions", "vpn", "downstream")


def test_values_at_the_bounds_are_accepted():
    s = parse_sample(raw(internet=1000.0, vpn=0.0, ts=253_402_300_799 - 199))
    assert s.values[0] == 1000.0


def test_record_key_must_be_the_site():
    check_key(b"s1", "s1")
    for key, reason in ((None, "missing_key"), (b"\xff\xfe", "bad_key"), (b"s2", "key_mismatch")):
        with pytest.raises(Rejected) as info:
            check_key(key, "s1")
        assert info.value.reason == reason and "s1" in info.value.detail


def test_dead_letter_of_a_huge_payload_is_cut_and_says_what_it_was():
    payload = b"x" * (2 * 1024 * 1024)
    body = json.loads(encode_dead_letter(payload, "payload_too_large", "2 MB", "t", 0, 7, b"s1", 1.0))
    assert len(body["payload"]) == DEAD_LETTER_PAYLOAD_BYTES
    assert body["payload_truncated"] is True and body["payload_bytes"] == len(payload)
    assert body["payload_sha256"] == hashlib.sha256(payload).hexdigest()


def test_dead_letter_of_a_tombstone():
    body = json.loads(encode_dead_letter(None, "tombstone", "no value", "t", 0, 7, None, 1.0))
    assert body["tombstone"] is True and body["payload"] == "" and body["key"] is None
