"""A site's controller state, as stored in the Faust table and its (compacted) changelog.

It holds everything a worker needs to carry on for the site after a restart or rebalance: the
window, where the site is in its source partition, its online headroom, its baseline warm-up and
the pending decision (enough to re-emit its command identically on redelivery).

JSON cost about a tenth of the worker's CPU: the state is rewritten for every site in every
batch. Binary layout, little-endian, version 3::

    u8 version | i64 last_ts | i32 partition | i64 offset | i64 jump_ts
    u8 n_rows | u8 n_features | f64 rows[n_rows * n_features]
    f64 q_ai | f64 q_persistence | f64 q_candidate                 (NaN: not started)
    u8 len, candidate_version                                     (the candidate q_candidate belongs to)
    u32 seen | f64 total | f64 total_sq | u8 frozen
      frozen:  f64 mean | f64 std | f64 p95
      else:    u16 n_bins | (u16 bin, u16 count) * n_bins          (the warm-up histogram)
    u8 has_pending [ | i64 ts | f64 forecast | f64 candidate_forecast | f64 scale | u8 scorable
                      | f64 decided_at | u8 len, policy | u8 len, model_version
                      | u8 n_alloc | (u8 len, name, f64 value) * n_alloc ]
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field

STATE_VERSION = 3
_HEAD = struct.Struct("<BqiqqBB")
_Q = struct.Struct("<ddd")
_BASE = struct.Struct("<IddB")
_LEVELS = struct.Struct("<ddd")
_BIN = struct.Struct("<HH")
_PENDING = struct.Struct("<qdddBd")
_F64 = struct.Struct("<d")
NAN = float("nan")


class StateError(ValueError):
    pass


@dataclass
class Pending:
    """The decision made for interval ``ts``, waiting for its actual."""

    ts: int
    forecast: float
    candidate_forecast: float
    scale: float
    scorable: bool  # the site's baselines were known when it was made: every allocator has a value
    decided_at: float
    policy: str  # the emitted allocator: ai_sla, ai_raw or fallback
    model_version: str
    alloc: dict[str, float] = field(default_factory=dict)

    @property
    def allocated(self) -> float:
        return self.alloc[self.policy]


@dataclass
class SiteState:
    last_ts: int | None = None
    partition: int = -1  # source partition and offset of the last sample taken
    offset: int = -1
    jump_ts: int = 0  # a far-ahead sample that was set aside; the next one continuing it confirms the jump
    rows: list[list[float]] = field(default_factory=list)
    q_ai: float = NAN
    q_persistence: float = NAN
    q_candidate: float = NAN
    candidate_version: str = ""
    seen: int = 0  # actual values taken into the baseline warm-up
    total: float = 0.0
    total_sq: float = 0.0
    levels: tuple[float, float, float] | None = None  # frozen (mean, std, p95) after warm-up
    histogram: dict[int, int] = field(default_factory=dict)  # bin -> count, during warm-up
    pending: Pending | None = None


def _text(raw: str) -> bytes:
    b = raw.encode()
    if len(b) > 255:
        raise StateError(f"text too long for the state codec: {raw[:40]!r}...")
    return bytes([len(b)]) + b


def encode_state(st: SiteState) -> bytes:
    rows = st.rows
    n_rows, n_features = len(rows), (len(rows[0]) if rows else 0)
    flat = [v for row in rows for v in row]
    parts = [_HEAD.pack(STATE_VERSION, -1 if st.last_ts is None else int(st.last_ts), st.partition, st.offset,
                        st.jump_ts, n_rows, n_features),
             struct.pack(f"<{len(flat)}d", *flat),
             _Q.pack(st.q_ai, st.q_persistence, st.q_candidate), _text(st.candidate_version),
             _BASE.pack(st.seen, st.total, st.total_sq, 1 if st.levels is not None else 0)]
    if st.levels is not None:
        parts.append(_LEVELS.pack(*st.levels))
    else:
        parts.append(struct.pack("<H", len(st.histogram)))
        parts.extend(_BIN.pack(b, c) for b, c in sorted(st.histogram.items()))
    p = st.pending
    if p is None:
        parts.append(b"\x00")
    else:
        parts.append(b"\x01" + _PENDING.pack(int(p.ts), p.forecast, p.candidate_forecast, p.scale, int(p.scorable),
                                             p.decided_at))
        parts.append(_text(p.policy) + _text(p.model_version) + bytes([len(p.alloc)]))
        for name, value in p.alloc.items():
            parts.append(_text(name) + _F64.pack(float(value)))
    return b"".join(parts)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.off = 0

    def unpack(self, s: struct.Struct) -> tuple:
        out = s.unpack_from(self.data, self.off)
        self.off += s.size
        return out

    def byte(self) -> int:
        v = self.data[self.off]
        self.off += 1
        return v

    def text(self) -> str:
        n = self.byte()
        raw = self.data[self.off:self.off + n]
        if len(raw) != n:
            raise StateError("truncated text")
        self.off += n
        return raw.decode()


def decode_state(data: bytes) -> SiteState:
    """Decode a stored state; any defect raises :class:`StateError` (the caller resets that site)."""
    if not isinstance(data, bytes | bytearray) or not data:
        raise StateError(f"site state must be non-empty bytes, got {type(data).__name__}")
    try:
        r = _Reader(bytes(data))
        version, last_ts, partition, offset, jump_ts, n_rows, n_features = r.unpack(_HEAD)
        if version != STATE_VERSION:
            raise StateError(f"state version {version}, expected {STATE_VERSION}")
        n = n_rows * n_features
        flat = struct.unpack_from(f"<{n}d", r.data, r.off)
        r.off += 8 * n
        st = SiteState(last_ts=None if last_ts < 0 else last_ts, partition=partition, offset=offset, jump_ts=jump_ts,
                       rows=[list(flat[i:i + n_features]) for i in range(0, n, n_features)])
        st.q_ai, st.q_persistence, st.q_candidate = r.unpack(_Q)
        st.candidate_version = r.text()
        st.seen, st.total, st.total_sq, frozen = r.unpack(_BASE)
        if frozen:
            st.levels = r.unpack(_LEVELS)
        else:
            (n_bins,) = r.unpack(struct.Struct("<H"))
            st.histogram = dict(r.unpack(_BIN) for _ in range(n_bins))
        if r.byte():
            ts, forecast, cand, scale, scorable, decided_at = r.unpack(_PENDING)
            policy, version_text = r.text(), r.text()
            alloc = {}
            for _ in range(r.byte()):
                name = r.text()
                (alloc[name],) = r.unpack(_F64)
            st.pending = Pending(ts=ts, forecast=forecast, candidate_forecast=cand, scale=scale,
                                 scorable=bool(scorable), decided_at=decided_at, policy=policy,
                                 model_version=version_text, alloc=alloc)
            if policy not in alloc:
                raise StateError(f"pending decision names policy {policy!r} without its allocation")
        if r.off != len(r.data):
            raise StateError(f"{len(r.data) - r.off} trailing bytes")
        values = [*flat, st.total, st.total_sq]
        if not all(math.isfinite(v) for v in values):
            raise StateError("non-finite numbers in the window or baseline sums")
        return st
    except StateError:
        raise
    except (struct.error, IndexError, ValueError, UnicodeDecodeError) as exc:
        raise StateError(f"corrupt site state ({len(data)} bytes): {exc}") from None
