"""The controller's batch engine: pure logic between parsed samples and commands (no Kafka, no Faust).

Per site it keeps a :class:`contracts.state.SiteState`. Rules, per site, in record order:

* A record at or before the site's stored source offset (same partition) is a **redelivery** of a
  sample already decided: it is counted and skipped, and if it is the site's latest sample its
  stored decision is re-emitted identically (same allocation, model version and decided_at).
* ``ts == last_ts`` is a duplicate, ``ts < last_ts`` out of order, a ``ts`` off the site's grid
  misaligned: all are rejected (dead-lettered) and leave the state unchanged.
* ``ts > last_ts + horizon * step`` is **too far ahead**: rejected, and remembered; if the next sample
  continues from it (``ts == jump + step``) the site really jumped, and that sample is taken as a gap.
* ``last_ts + step < ts`` (within the horizon) is a gap: the pending decision cannot be scored and
  the window restarts.
* Every accepted sample yields one decision for ``ts + step``. With a full window it is the model's
  (live policy ``ai_sla`` or ``ai_raw``, with the shadows scored beside it); otherwise it is the
  documented **fallback**: the last value plus the site's online persistence headroom.
* Each site's first ``warmup`` actuals fix its B1/B2 levels (:mod:`forecaster.core.baselines`). A
  decision is scored only if it was made after that, so every allocator is compared on the same
  intervals. The online headroom trackers learn from every interval, warm-up included.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from contracts.messages import Sample
from contracts.state import Pending, SiteState
from forecaster.core.allocators import Headroom
from forecaster.core.baselines import HISTOGRAM_BINS, BaselineEstimator, demand_bin
from forecaster.core.online import OnlineHeadroom

AI_SLA, AI_RAW, AI_SLA_STATIC = "ai_sla", "ai_raw", "ai_sla_static"
B1, B2, PERSISTENCE_SLA, FALLBACK = "b1", "b2", "persistence_sla", "fallback"
CANDIDATE, CURRENT = "candidate", "current"  # current: the live model on the intervals the candidate is scored on
MODEL_ALLOCATORS = (AI_SLA, AI_RAW, AI_SLA_STATIC, B1, B2, PERSISTENCE_SLA)
ALL_ALLOCATORS = (*MODEL_ALLOCATORS, FALLBACK, CANDIDATE, CURRENT)


@dataclass(frozen=True)
class ServedModel:
    """A model as the engine uses it: its forecast function and its headroom settings."""

    version: str
    predict: Callable[[np.ndarray], np.ndarray]
    online: OnlineHeadroom  # ai_sla: per-site online headroom, q0 from the manifest
    static: Headroom  # ai_sla_static: the manifest's global calibration


@dataclass(frozen=True)
class EngineSettings:
    window: int
    step_seconds: int
    persistence: OnlineHeadroom
    policy: str = "sla"  # sla: emit ai_sla; raw: emit ai_raw (the paper's mode)
    warmup: int = 2016
    horizon_intervals: int = 2016
    floor: float = 0.0
    ceiling: float | None = None


@dataclass(frozen=True)
class Command:
    site: str
    ts: int
    allocated: float
    forecast: float
    policy: str
    model_version: str
    decided_at: float
    sample: int  # index of the sample it answers (-1: re-emitted from state)


@dataclass
class Scores:
    """Scored intervals of one batch for one allocator."""

    sites: list[str] = field(default_factory=list)
    actual: list[float] = field(default_factory=list)
    allocated: list[float] = field(default_factory=list)


@dataclass
class BatchResult:
    states: dict[str, SiteState]
    commands: list[Command]
    reemitted: list[Command]
    rejects: list[tuple[int, str, str]]  # (sample index, reason, detail)
    scores: dict[str, Scores]
    forecast_errors: dict[str, list[float]]  # role (active, candidate) -> forecast - actual
    gaps: int = 0
    redelivered: int = 0
    latest: dict[str, tuple[float, float, dict[str, float]]] = field(default_factory=dict)  # site -> (actual,
    # forecast, allocations) of its latest scored interval


@dataclass
class _Decision:
    site: str
    sample: int
    ts: int
    last: float
    window_index: int  # row in the batch's model input, -1 for a fallback


class Engine:
    def __init__(self, settings: EngineSettings, model: ServedModel, candidate: ServedModel | None = None) -> None:
        if settings.policy not in ("sla", "raw"):
            raise ValueError(f"policy must be sla or raw, got {settings.policy!r}")
        self.settings = settings
        self.model = model
        self.candidate = candidate

    @property
    def live_name(self) -> str:
        return AI_SLA if self.settings.policy == "sla" else AI_RAW

    def process(self, states: Mapping[str, SiteState | None], samples: Sequence[Sample],
                positions: Sequence[tuple[int, int]], now: float) -> BatchResult:
        """``positions[i]`` is sample i's (partition, offset); ``now`` stamps the decisions."""
        cfg = self.settings
        step = cfg.step_seconds
        work: dict[str, SiteState] = {}
        rejects: list[tuple[int, str, str]] = []
        reemitted: list[Command] = []
        # In record order, per accepted sample: ("sample", site, (actual, scores_pending)) then
        # ("decide", site, _Decision); resolved after inference, since allocations need the forecasts.
        ops: list[tuple[str, str, object]] = []
        pending_ts: dict[str, int | None] = {}
        windows: list[np.ndarray] = []
        gaps = redelivered = 0
        for i, s in enumerate(samples):
            st = work.get(s.site)
            if st is None:
                prev = states.get(s.site)
                st = SiteState() if prev is None else _copy(prev)
                work[s.site] = st
                pending_ts[s.site] = st.pending.ts if st.pending is not None else None
            partition, offset = positions[i]
            if partition == st.partition and offset <= st.offset:
                redelivered += 1
                if s.ts == st.last_ts and st.pending is not None:
                    p = st.pending
                    reemitted.append(Command(s.site, p.ts, p.allocated, p.forecast, p.policy, p.model_version,
                                             p.decided_at, -1))
                continue
            last_ts = st.last_ts
            if last_ts is not None:
                if s.ts == last_ts:
                    rejects.append((i, "duplicate", f"site {s.site} already has ts {s.ts}"))
                    continue
                if s.ts < last_ts:
                    rejects.append((i, "out_of_order", f"site {s.site}: ts {s.ts} is before {last_ts}"))
                    continue
                if (s.ts - last_ts) % step:
                    rejects.append((i, "misaligned", f"site {s.site}: ts {s.ts} is not on the {step} s grid of "
                                                     f"{last_ts}"))
                    continue
                if s.ts > last_ts + cfg.horizon_intervals * step and s.ts != st.jump_ts + step:
                    st.jump_ts = s.ts
                    rejects.append((i, "too_far_ahead", f"site {s.site}: ts {s.ts} is more than "
                                                        f"{cfg.horizon_intervals} intervals after {last_ts}; taken "
                                                        "only if the next sample continues from it"))
                    continue
                if s.ts > last_ts + step:
                    gaps += 1
                    st.rows = []
                    pending_ts[s.site] = None
            st.jump_ts = 0
            st.partition, st.offset = partition, offset
            ops.append(("sample", s.site, (s.values[0], pending_ts[s.site] == s.ts)))
            st.rows.append(list(s.values))
            if len(st.rows) > cfg.window:
                del st.rows[0]
            st.last_ts = s.ts
            full = len(st.rows) == cfg.window
            d = _Decision(s.site, i, s.ts + step, s.values[0], len(windows) if full else -1)
            if full:
                windows.append(np.asarray(st.rows, dtype=np.float32))
            ops.append(("decide", s.site, d))
            pending_ts[s.site] = d.ts

        forecast, cand_forecast = self._infer(windows)
        result = BatchResult(states=work, commands=[], reemitted=reemitted, rejects=rejects,
                             scores={}, forecast_errors={"active": [], "candidate": []}, gaps=gaps,
                             redelivered=redelivered)
        # Pending decisions as resolved so far in this pass: the stored one, replaced by each new decision.
        pending: dict[str, Pending | None] = {site: (_copy_pending(states[site].pending) if states.get(site) else None)
                                              for site in work}
        for kind, site, payload in ops:
            st = work[site]
            if kind == "sample":
                actual, scores_pending = payload  # type: ignore[misc]
                if scores_pending:
                    self._score(site, st, pending[site], float(actual), result)
                self._add_to_baseline(st, float(actual))
            else:
                d: _Decision = payload  # type: ignore[assignment]
                p = self._decide(st, d, forecast, cand_forecast, now)
                pending[site] = p
                result.commands.append(Command(site, d.ts, p.allocated, p.forecast, p.policy, p.model_version,
                                               p.decided_at, d.sample))
        for site, st in work.items():
            if st.last_ts is not None and site in pending:
                p = pending[site]
                st.pending = p if (p is not None and p.ts == st.last_ts + step) else None
        return result

    def _infer(self, windows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        if not windows:
            return np.zeros(0), None
        x = np.stack(windows)
        forecast = np.asarray(self.model.predict(x), dtype=np.float64).reshape(-1)
        cand = None
        if self.candidate is not None:
            cand = np.asarray(self.candidate.predict(x), dtype=np.float64).reshape(-1)
        return forecast, cand

    def _bound(self, value: float) -> float:
        v = max(value, self.settings.floor)
        return v if self.settings.ceiling is None else min(v, self.settings.ceiling)

    def _decide(self, st: SiteState, d: _Decision, forecast: np.ndarray, cand_forecast: np.ndarray | None,
                now: float) -> Pending:
        cfg = self.settings
        pers = cfg.persistence
        if math.isnan(st.q_persistence):
            st.q_persistence = pers.q0
        level = site_level(st)
        scale = pers.scale_one(d.last, level)
        persistence_alloc = pers.allocate_one(d.last, scale, st.q_persistence, cfg.floor, cfg.ceiling)
        scorable = st.levels is not None
        f = float(forecast[d.window_index]) if d.window_index >= 0 else math.nan
        if not math.isfinite(f):  # no full window, or a model that returned garbage: never a NaN command
            return Pending(ts=d.ts, forecast=d.last, candidate_forecast=math.nan, scale=scale, scorable=scorable,
                           decided_at=now, policy=FALLBACK, model_version=self.model.version,
                           alloc={FALLBACK: persistence_alloc, PERSISTENCE_SLA: persistence_alloc})
        m = self.model
        if math.isnan(st.q_ai):
            st.q_ai = m.online.q0
        scale = m.online.scale_one(f, level)
        alloc = {
            AI_SLA: m.online.allocate_one(f, scale, st.q_ai, cfg.floor, cfg.ceiling),
            AI_RAW: self._bound(f),
            AI_SLA_STATIC: self._bound(float(m.static.apply(np.asarray(f)))),
            PERSISTENCE_SLA: persistence_alloc,
        }
        if st.levels is not None:
            mean, std, p95 = st.levels
            alloc[B1], alloc[B2] = mean + 2.0 * std, p95
        cf = math.nan
        if cand_forecast is not None and self.candidate is not None:
            cf = float(cand_forecast[d.window_index])
            if math.isfinite(cf):
                if math.isnan(st.q_candidate) or st.candidate_version != self.candidate.version:
                    st.q_candidate = self.candidate.online.q0  # a new candidate starts from its own headroom
                    st.candidate_version = self.candidate.version
                cand_scale = self.candidate.online.scale_one(cf, level)
                alloc[CANDIDATE] = self.candidate.online.allocate_one(cf, cand_scale, st.q_candidate, cfg.floor,
                                                                      cfg.ceiling)
                alloc[CURRENT] = alloc[AI_SLA]
        return Pending(ts=d.ts, forecast=f, candidate_forecast=cf, scale=scale, scorable=scorable, decided_at=now,
                       policy=self.live_name, model_version=m.version, alloc=alloc)

    def _score(self, site: str, st: SiteState, p: Pending | None, actual: float, result: BatchResult) -> None:
        if p is None:
            return
        a = p.alloc
        if AI_SLA in a:
            st.q_ai = self.model.online.update_one(st.q_ai, a[AI_SLA], actual)
        st.q_persistence = self.settings.persistence.update_one(st.q_persistence, a[PERSISTENCE_SLA], actual)
        if CANDIDATE in a and self.candidate is not None:
            st.q_candidate = self.candidate.online.update_one(st.q_candidate, a[CANDIDATE], actual)
        if p.scorable:
            names = (FALLBACK,) if p.policy == FALLBACK else tuple(n for n in a if n != FALLBACK)
            for name in names:
                sc = result.scores.setdefault(name, Scores())
                sc.sites.append(site)
                sc.actual.append(actual)
                sc.allocated.append(a[name])
            if p.policy != FALLBACK:
                result.forecast_errors["active"].append(p.forecast - actual)
                if CANDIDATE in a:
                    result.forecast_errors["candidate"].append(p.candidate_forecast - actual)
            result.latest[site] = (actual, p.forecast, {n: a[n] for n in names})

    def _add_to_baseline(self, st: SiteState, actual: float) -> None:
        if st.levels is not None:
            return
        st.seen += 1
        st.total += actual
        st.total_sq += actual * actual
        b = demand_bin(actual)
        st.histogram[b] = st.histogram.get(b, 0) + 1
        if st.seen >= self.settings.warmup:
            est = baseline_estimator(st)
            stats = est.stats()
            st.levels = (stats.mean, stats.std, stats.p95)
            st.histogram = {}


def site_level(st: SiteState) -> float:
    """The site's long-run mean demand for the headroom's scale: its frozen baseline mean, else the
    mean of its warm-up so far, else NaN (nothing seen yet)."""
    if st.levels is not None:
        return st.levels[0]
    return st.total / st.seen if st.seen else math.nan


def baseline_estimator(st: SiteState) -> BaselineEstimator:
    """The shared estimator over a site state's warm-up sums and histogram."""
    counts = np.zeros(HISTOGRAM_BINS, dtype=np.int64)
    for b, c in st.histogram.items():
        counts[b] = c
    return BaselineEstimator(n=st.seen, total=st.total, total_sq=st.total_sq, counts=counts)


def _copy_pending(p: Pending | None) -> Pending | None:
    if p is None:
        return None
    return Pending(ts=p.ts, forecast=p.forecast, candidate_forecast=p.candidate_forecast, scale=p.scale,
                   scorable=p.scorable, decided_at=p.decided_at, policy=p.policy, model_version=p.model_version,
                   alloc=dict(p.alloc))


def _copy(st: SiteState) -> SiteState:
    return SiteState(last_ts=st.last_ts, partition=st.partition, offset=st.offset, jump_ts=st.jump_ts,
                     rows=[list(r) for r in st.rows], q_ai=st.q_ai, q_persistence=st.q_persistence,
                     q_candidate=st.q_candidate, candidate_version=st.candidate_version, seen=st.seen,
                     total=st.total, total_sq=st.total_sq,
                     levels=st.levels, histogram=dict(st.histogram), pending=_copy_pending(st.pending))
