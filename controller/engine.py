"""The controller's batch engine: pure logic between parsed samples and commands (no Kafka, no Faust).

Per site it keeps the last ``window`` samples and the pending decision for the next interval,
as a JSON-able dict that the Faust table stores. Rules by timestamp, per site:

* the first sample starts the window;
* ``ts == last_ts + step`` appends; a pending decision for ``ts`` is scored with this sample;
* ``ts == last_ts`` is a duplicate, ``ts < last_ts`` is out of order, and a ``ts`` off the
  site's grid (``(ts - last_ts) % step != 0``) is misaligned: all are rejected (dead-lettered)
  and leave the state unchanged;
* ``ts > last_ts + step`` is a gap: the pending decision cannot be scored, and the window
  restarts from this sample, since the model needs consecutive intervals;
* once the window is full, every sample yields one decision for ``ts + step``: a forecast,
  the live allocation (emitted as a command) and each shadow allocation (scored only).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from contracts.messages import Sample
from forecaster.core.allocators import Allocator


@dataclass
class Decision:
    site: str
    ts: int  # the interval it provisions
    forecast: float
    allocations: dict[str, float]


@dataclass
class Scored:
    """Scored intervals of one batch, in order, with every allocator's allocation."""

    sites: list[str] = field(default_factory=list)
    ts: list[int] = field(default_factory=list)
    actual: list[float] = field(default_factory=list)
    forecast: list[float] = field(default_factory=list)
    allocations: dict[str, list[float]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.actual)


@dataclass
class BatchResult:
    states: dict[str, dict]
    decisions: list[Decision]
    decision_sample: list[int]  # index of the sample each decision came from
    scored: Scored
    rejects: list[tuple[int, str, str]]  # (sample index, reason, detail)
    gaps: int


class Engine:
    def __init__(self, predict: Callable[[np.ndarray], np.ndarray], live: Allocator, shadows: Sequence[Allocator],
                 window: int, step_seconds: int) -> None:
        names = [live.name, *(s.name for s in shadows)]
        if len(set(names)) != len(names):
            raise ValueError(f"allocator names must be unique, got {names}")
        self.predict = predict
        self.live = live
        self.allocators = [live, *shadows]
        self.window = window
        self.step = step_seconds

    @property
    def allocator_names(self) -> list[str]:
        return [a.name for a in self.allocators]

    def process(self, states: Mapping[str, dict | None], samples: Sequence[Sample]) -> BatchResult:
        work: dict[str, dict] = {}
        windows: list[np.ndarray] = []
        dec_site: list[str] = []
        dec_ts: list[int] = []
        dec_sample: list[int] = []
        # A scoring event points at its pending decision: ("batch", i) or ("stored", dict).
        events: list[tuple[str, int, float, tuple[str, object]]] = []
        rejects: list[tuple[int, str, str]] = []
        gaps = 0
        for i, s in enumerate(samples):
            st = work.get(s.site)
            if st is None:
                prev = states.get(s.site)
                st = {"last_ts": None, "rows": [], "pending": None} if prev is None else {
                    "last_ts": prev["last_ts"], "rows": list(prev["rows"]), "pending": stored_pending(prev)}
                work[s.site] = st
            last_ts = st["last_ts"]
            if last_ts is not None:
                if s.ts == last_ts:
                    rejects.append((i, "duplicate", f"site {s.site} already has ts {s.ts}"))
                    continue
                if s.ts < last_ts:
                    rejects.append((i, "out_of_order", f"site {s.site}: ts {s.ts} is before {last_ts}"))
                    continue
                if (s.ts - last_ts) % self.step:
                    rejects.append((i, "misaligned", f"site {s.site}: ts {s.ts} is not on the {self.step} s grid "
                                                     f"of {last_ts}"))
                    continue
                if s.ts > last_ts + self.step:
                    gaps += 1
                    st["rows"] = []
                    st["pending"] = None
            pending = st["pending"]
            if pending is not None and pending[1]["ts"] == s.ts:
                events.append((s.site, s.ts, s.values[0], pending))
            st["pending"] = None
            st["rows"].append(list(s.values))
            if len(st["rows"]) > self.window:
                del st["rows"][0]
            st["last_ts"] = s.ts
            if len(st["rows"]) == self.window:
                st["pending"] = ("batch", {"ts": s.ts + self.step, "index": len(windows)})
                windows.append(np.asarray(st["rows"], dtype=np.float32))
                dec_site.append(s.site)
                dec_ts.append(s.ts + self.step)
                dec_sample.append(i)

        if windows:
            x = np.stack(windows)
            forecast = np.asarray(self.predict(x), dtype=np.float64)
            last = x[:, -1, 0].astype(np.float64)
            alloc = {a.name: a.allocate(last, forecast) for a in self.allocators}
        else:
            forecast = np.zeros(0)
            alloc = {a.name: np.zeros(0) for a in self.allocators}

        def resolve(p: tuple[str, dict]) -> tuple[float, dict[str, float]]:
            kind, ref = p
            if kind == "stored":
                return float(ref["forecast"]), {k: float(v) for k, v in ref["alloc"].items()}
            j = ref["index"]
            return float(forecast[j]), {n: float(alloc[n][j]) for n in alloc}

        scored = Scored(allocations={n: [] for n in self.allocator_names})
        for site, ts, actual, pend in events:
            f, allocs = resolve(pend)
            scored.sites.append(site)
            scored.ts.append(ts)
            scored.actual.append(actual)
            scored.forecast.append(f)
            for n in self.allocator_names:
                scored.allocations[n].append(allocs[n])

        out_states: dict[str, dict] = {}
        for site, st in work.items():
            pend = st["pending"]
            stored = None
            if pend is not None:
                f, allocs = resolve(pend)
                stored = {"ts": pend[1]["ts"], "forecast": f, "alloc": allocs}
            out_states[site] = {"last_ts": st["last_ts"], "rows": st["rows"], "pending": stored}

        decisions = [Decision(site=dec_site[j], ts=dec_ts[j], forecast=float(forecast[j]),
                              allocations={n: float(alloc[n][j]) for n in alloc}) for j in range(len(dec_site))]
        return BatchResult(states=out_states, decisions=decisions, decision_sample=dec_sample, scored=scored,
                           rejects=rejects, gaps=gaps)


def stored_pending(state: dict | None) -> tuple[str, dict] | None:
    """Table states keep pending decisions as plain dicts; the engine tags them on the way in."""
    if state is None or state.get("pending") is None:
        return None
    return ("stored", state["pending"])
