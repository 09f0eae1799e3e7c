"""What-if on the twin: replay a scenario offline through the live controller's own engine.

A scenario is a slice of one or more sites (recorded or synthetic): ``warmup`` intervals that fix
each site's B1/B2 levels (nothing is scored before, exactly as in the live loop), then
``intervals`` scored intervals. ``surge`` multiplies every KPI by up to ``1 + magnitude`` for
``event_length`` intervals: it builds up linearly over the first ``ramp`` of them (a crowd gathers)
and ends at once (the event is over); ``outage`` sets every KPI to zero for as long; ``recorded``
replays the slice as it is. Values stay within the sample contract's [0, 1000]. By default the
event is centred on the peak hours of the sites' total demand in the first scored day.

The samples go through :class:`controller.engine.Engine` with the artifacts served as the worker
serves them (:func:`controller.serving.served_model`), the candidate in the engine's candidate
slot, so every allocator (live policy, shadows, baselines, candidate and ``current`` on the
candidate's intervals) is scored as a worker with the same settings would score the same samples;
the table uses :func:`forecaster.core.metrics.summarize` (report.json's keys). For surge and
outage the same slice without the event is run too (``reference``), so the table shows what the
event changes. No Kafka: a day of a site takes milliseconds.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from contracts.messages import VALUE_MAX, Sample, encode_sample, parse_sample
from controller.engine import (
    AI_RAW,
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
)
from controller.serving import persistence_headroom, served_model
from export.artifact import MANIFEST_FILE, ModelArtifact, load_artifact
from export.compare import AllocatorScore, Comparison, compare_scores
from export.registry import POINTERS, Registry, RegistryError
from forecaster.core.metrics import summarize
from forecaster.data import Site

SCENARIOS = ("surge", "outage", "recorded")
BASE_TS = 1_704_067_200  # the replay producer's base (2024-01-01T00:00:00Z), so ts keep their time of day
STEPS_PER_DAY = 288
DEFAULT_WARMUP = STEPS_PER_DAY  # one day: B1/B2 see a whole daily cycle, and a replay stays short
DEFAULT_INTERVALS = 2 * STEPS_PER_DAY
DEFAULT_EVENT_LENGTH = 36  # 3 h
DEFAULT_MAGNITUDE = 0.4  # surge: +40 %
DEFAULT_RAMP = 6  # 30 min to build up
ORDER = (AI_SLA, AI_RAW, AI_SLA_STATIC, CANDIDATE, CURRENT, PERSISTENCE_SLA, B1, B2, FALLBACK)
LABELS = {
    AI_SLA: "current model + online SLA headroom",
    AI_RAW: "current model, raw forecast",
    AI_SLA_STATIC: "current model + static calibration",
    CANDIDATE: "candidate model + online SLA headroom",
    CURRENT: "current model on the candidate's intervals",
    PERSISTENCE_SLA: "persistence + online SLA headroom",
    B1: "B1 (warm-up mean + 2 std)",
    B2: "B2 (warm-up P95)",
    FALLBACK: "fallback (window not full)",
}


class WhatIfError(ValueError):
    """The scenario or a model cannot be used; the message says why."""


@dataclass(frozen=True)
class Scenario:
    kind: str
    start: int = 0  # first interval of the slice in each site
    warmup: int = DEFAULT_WARMUP
    intervals: int = DEFAULT_INTERVALS
    event_at: int | None = None  # first event interval, counted from the end of the warm-up; None: at the peak
    event_length: int = DEFAULT_EVENT_LENGTH
    magnitude: float = DEFAULT_MAGNITUDE
    ramp: int = DEFAULT_RAMP

    def __post_init__(self) -> None:
        if self.kind not in SCENARIOS:
            raise WhatIfError(f"scenario must be one of {', '.join(SCENARIOS)}, got {self.kind!r}")
        if self.warmup < 1 or self.intervals < 1 or self.start < 0:
            raise WhatIfError("warm-up and intervals must be positive, start not negative")
        if self.kind != "recorded":
            if not 1 <= self.event_length <= self.intervals:
                raise WhatIfError(f"event length {self.event_length} must be within the {self.intervals} scored "
                                  "intervals")
            if self.event_at is not None and not 0 <= self.event_at <= self.intervals - self.event_length:
                raise WhatIfError(f"the event ({self.event_length} intervals from {self.event_at}) must lie within "
                                  f"the {self.intervals} scored intervals")
            if self.kind == "surge" and (self.magnitude <= -1 or not math.isfinite(self.magnitude)):
                raise WhatIfError(f"surge magnitude must be above -1 (-100 %), got {self.magnitude}")
            if not 0 <= self.ramp <= self.event_length:
                raise WhatIfError(f"ramp {self.ramp} must be within the event length {self.event_length}")

    @property
    def length(self) -> int:
        return self.warmup + self.intervals


@dataclass(frozen=True)
class Prepared:
    """The scenario's sites (event injected) and the same slices without it."""

    scenario: Scenario
    sites: list[Site]
    reference: list[Site]
    event: tuple[int, int] | None  # [first, last + 1) rows of the slice, or None (recorded)
    envelope: np.ndarray  # per row: the surge factor's excess (0 outside the event), or the outage mask


def prepare(scenario: Scenario, sites: Sequence[Site]) -> Prepared:
    if not sites:
        raise WhatIfError("a scenario needs at least one site")
    stop = scenario.start + scenario.length
    short = [f"{s.name} ({len(s.values)})" for s in sites if len(s.values) < stop]
    if short:
        raise WhatIfError(f"the scenario needs intervals {scenario.start}..{stop - 1} of each site; too short: "
                          f"{', '.join(short)}")
    steps = {s.step_seconds for s in sites}
    if len(steps) != 1:
        raise WhatIfError(f"the sites have different steps: {sorted(steps)}")
    ref = [s.slice(scenario.start, stop) for s in sites]
    envelope = np.zeros(scenario.length)
    if scenario.kind == "recorded":
        return Prepared(scenario, ref, ref, None, envelope)
    first = scenario.warmup + (scenario.event_at if scenario.event_at is not None else _peak(scenario, ref))
    last = first + scenario.event_length
    if scenario.kind == "surge":
        shape = np.ones(scenario.event_length)
        if scenario.ramp:
            shape[:scenario.ramp] = np.arange(1, scenario.ramp + 1) / scenario.ramp
        envelope[first:last] = scenario.magnitude * shape
    else:
        envelope[first:last] = 1.0
    out = []
    for s in ref:
        values = s.values.astype(np.float64).copy()
        if scenario.kind == "surge":
            values *= (1.0 + envelope)[:, None]
        else:
            values[first:last] = 0.0
        values = np.clip(values, 0.0, VALUE_MAX).astype(np.float32)  # the sample contract's range
        out.append(Site(s.name, s.timestamps, values, f"{s.source}, {scenario.kind}", s.step_seconds))
    return Prepared(scenario, out, ref, (first, last), envelope)


def _peak(scenario: Scenario, ref: list[Site]) -> int:
    """Event start (from the end of the warm-up) centring it on the peak hours of the first scored day."""
    total = np.sum([s.values[scenario.warmup:, 0].astype(np.float64) for s in ref], axis=0)
    day = total[:min(STEPS_PER_DAY, scenario.intervals)]
    n = scenario.event_length
    if len(day) <= n:
        return 0
    mean = np.convolve(day, np.ones(n) / n, mode="valid")
    return int(min(np.argmax(mean), scenario.intervals - n))


def samples(sites: Sequence[Site], base_ts: int = BASE_TS) -> list[Sample]:
    """One sample per site per interval, interleaved by interval as the replay sends them, as a worker
    parses them (the contract rounds values to 6 decimals)."""
    step = sites[0].step_seconds
    t0 = base_ts + int(sites[0].timestamps[0])
    n = min(len(s.values) for s in sites)
    return [parse_sample(encode_sample(s.name, t0 + i * step, s.values[i])) for i in range(n) for s in sites]


# --- models --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRef:
    path: Path
    source: str  # how it was named: "folder", "registry version", "registry <pointer>"


def resolve_model(spec: str | None, registry: str | Path | None, role: str = "current") -> ModelRef | None:
    """A model named as an artifact folder, a registry version or a registry pointer (current, candidate,
    previous). ``spec`` None means the registry's pointer for ``role`` (None if it is unset, for a
    candidate; an error for the current model)."""
    reg = Registry(registry) if registry else None
    if spec is None:
        if reg is None:
            if role == "current":
                raise WhatIfError("no model: give --model (an artifact folder or a registry version) or --registry")
            return None
        spec = role
    path = Path(spec)
    if (path / MANIFEST_FILE).is_file():
        return ModelRef(path, "folder")
    if reg is None:
        raise WhatIfError(f"{spec!r} is not an artifact folder (no {path / MANIFEST_FILE}), and no registry was "
                          "given to look it up as a version")
    try:
        if spec in POINTERS:
            version = reg.pointer_version(spec)
            if version is None:
                if spec == role == "candidate":
                    return None
                raise WhatIfError(f"the {spec} pointer of registry {reg.root} is not set")
            return ModelRef(reg.version_path(version), f"registry {spec}")
        if reg.has_version(spec):
            return ModelRef(reg.version_path(spec), "registry version")
    except RegistryError as exc:
        raise WhatIfError(str(exc)) from exc
    known = ", ".join(i.version for i in reg.list()) or "none"
    raise WhatIfError(f"no version {spec!r} in registry {reg.root} (versions: {known}) and no such artifact folder")


def load_model(ref: ModelRef) -> ModelArtifact:
    return load_artifact(ref.path, threads=min(4, os.cpu_count() or 1))


# --- running -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """The worker settings that change decisions (DTWIN_POLICY, DTWIN_SLA_TARGET, DTWIN_CAPACITY_*)."""

    policy: str = "sla"
    sla_target: float = 0.01
    floor: float = 0.0
    ceiling: float | None = None
    batch: int = 1000  # samples per engine call; decisions do not depend on it


@dataclass
class Run:
    """One pass of a scenario's samples: per allocator the scored intervals, in order."""

    sites: list[str] = field(default_factory=list)
    scores: dict[str, dict[str, list]] = field(default_factory=dict)  # allocator -> sites/actual/allocated
    commands: int = 0
    policies: dict[str, int] = field(default_factory=dict)

    def table(self) -> dict[str, dict]:
        out = {}
        for name in [a for a in ORDER if a in self.scores] + sorted(set(self.scores) - set(ORDER)):
            sc = self.scores[name]
            out[name] = summarize(np.asarray(sc["actual"]), np.asarray(sc["allocated"]))
        return out

    def per_site(self) -> dict[str, dict[str, dict]]:
        out: dict[str, dict[str, dict]] = {}
        for name, sc in self.scores.items():
            sites = np.asarray(sc["sites"])
            actual, alloc = np.asarray(sc["actual"]), np.asarray(sc["allocated"])
            out[name] = {}
            for site in self.sites:
                m = sites == site
                if m.any():
                    s = summarize(actual[m], alloc[m])
                    out[name][site] = {k: s[k] for k in ("underprovisioning_rate", "overprovisioning_mean",
                                                         "efficiency_mean", "n")}
        return out

    def series(self, allocator: str, site: str) -> tuple[np.ndarray, np.ndarray]:
        sc = self.scores[allocator]
        m = np.asarray(sc["sites"]) == site
        return np.asarray(sc["actual"])[m], np.asarray(sc["allocated"])[m]


def make_engine(current: ModelArtifact, candidate: ModelArtifact | None, warmup: int, settings: Settings) -> Engine:
    """The engine a worker builds for these artifacts (controller.app.Controller.install)."""
    return Engine(
        EngineSettings(window=current.window, step_seconds=int(current.manifest["step_seconds"]),
                       persistence=persistence_headroom(current.manifest, settings.sla_target), policy=settings.policy,
                       warmup=warmup, floor=settings.floor, ceiling=settings.ceiling),
        served_model(current, settings.sla_target),
        served_model(candidate, settings.sla_target) if candidate is not None else None)


def replay(engine: Engine, batch: Sequence[Sample], batch_size: int = 1000) -> Run:
    states: dict = {}
    run = Run(sites=list(dict.fromkeys(s.site for s in batch)))
    for i in range(0, len(batch), batch_size):
        chunk = batch[i:i + batch_size]
        res = engine.process(states, chunk, [(0, i + k) for k in range(len(chunk))], float(chunk[0].ts))
        states.update(res.states)
        if res.rejects:
            raise WhatIfError(f"the engine rejected scenario samples: {res.rejects[:3]}")
        run.commands += len(res.commands)
        for c in res.commands:
            run.policies[c.policy] = run.policies.get(c.policy, 0) + 1
        for name, sc in res.scores.items():
            d = run.scores.setdefault(name, {"sites": [], "actual": [], "allocated": []})
            d["sites"] += sc.sites
            d["actual"] += sc.actual
            d["allocated"] += sc.allocated
    return run


@dataclass
class WhatIf:
    prepared: Prepared
    current: ModelArtifact
    candidate: ModelArtifact | None
    settings: Settings
    run: Run
    reference: Run | None
    models: dict[str, dict] = field(default_factory=dict)

    @property
    def live_name(self) -> str:
        return AI_SLA if self.settings.policy == "sla" else AI_RAW

    def comparison(self) -> Comparison | None:
        """The promote rule (export.compare) applied to this scenario's candidate and current scores."""
        if CANDIDATE not in self.run.scores:
            return None
        table = self.run.table()

        def score(name: str) -> AllocatorScore:
            s = table[name]
            n = int(s["n"])
            return AllocatorScore(name, n, round(s["underprovisioning_rate"] * n), s["overprovisioning_mean"] * n, n)

        return compare_scores(score(CURRENT), score(CANDIDATE), min_intervals=0,
                              current_versions=[self.current.version],
                              candidate_versions=[self.candidate.version] if self.candidate else [])

    def to_dict(self) -> dict:
        sc = self.prepared.scenario
        cmp = self.comparison()
        event = None
        if self.prepared.event is not None:
            first, last = self.prepared.event
            event = {"first_row": first, "rows": last - first, "first_scored_interval": first - sc.warmup,
                     "kind": sc.kind, **({"magnitude": sc.magnitude, "ramp": sc.ramp} if sc.kind == "surge" else {})}
        return {
            "scenario": {"kind": sc.kind, "sites": [s.name for s in self.prepared.sites],
                         "sources": [s.source for s in self.prepared.reference], "start": sc.start,
                         "warmup": sc.warmup, "intervals": sc.intervals,
                         "step_seconds": self.prepared.sites[0].step_seconds, "event": event},
            "models": self.models,
            "settings": {"policy": self.settings.policy, "live_allocator": self.live_name,
                         "sla_target": self.settings.sla_target, "floor": self.settings.floor,
                         "ceiling": self.settings.ceiling},
            "allocators": _finite_table(self.run.table()),
            "reference": _finite_table(self.reference.table()) if self.reference is not None else None,
            "per_site": _finite_table(self.run.per_site()),
            "comparison": cmp.to_dict() if cmp is not None else None,
        }

    def text(self) -> str:
        table = self.run.table()
        ref = self.reference.table() if self.reference is not None else {}
        sc = self.prepared.scenario
        names = ", ".join(s.name for s in self.prepared.sites)
        head = (f"what-if '{sc.kind}' on {len(self.prepared.sites)} site(s) ({names}), intervals "
                f"{sc.start}..{sc.start + sc.length - 1}: {sc.warmup} warm-up, {sc.intervals} scored")
        if self.prepared.event is not None:
            first, last = self.prepared.event
            what = f"+{sc.magnitude:.0%}" if sc.kind == "surge" else "zero demand"
            head += (f"; {what} for {last - first} intervals from scored interval {first - sc.warmup}"
                     + (f" (built up over {sc.ramp}, ending at once)" if sc.kind == "surge" and sc.ramp else ""))
        lines = [head, f"current model {self.current.version}"
                 + (f", candidate {self.candidate.version}" if self.candidate else ", no candidate")
                 + f"; policy {self.settings.policy}, SLA target {self.settings.sla_target:.2%}", ""]
        labels = {name: f"{name}: {LABELS.get(name, name)}" + (" [live]" if name == self.live_name else "")
                  for name in table}
        w = max(len(v) for v in labels.values()) + 2 if labels else 12
        cols = f"{'allocator':<{w}}{'intervals':>10}{'under-prov.':>13}{'over-prov. mean':>17}{'efficiency':>12}" \
               f"{'wastage':>9}"
        if ref:
            cols += f"{'under without event':>21}{'over without':>14}"
        lines.append(cols)
        for name, s in table.items():
            row = (f"{labels[name]:<{w}}{s['n']:>10,}{_pct(s['underprovisioning_rate']):>13}"
                   f"{_num(s['overprovisioning_mean']):>17}{_num(s['efficiency_mean'], 3):>12}"
                   f"{_num(s['wastage_mean'], 3):>9}")
            if ref:
                r = ref.get(name)
                row += (f"{_pct(r['underprovisioning_rate']) if r else '-':>21}"
                        f"{_num(r['overprovisioning_mean']) if r else '-':>14}")
            lines.append(row)
        cmp = self.comparison()
        if cmp is not None:
            verdict = ("the candidate WINS on this scenario" if cmp.wins
                       else "the candidate does not win on this scenario: " + "; ".join(cmp.reasons))
            lines += ["", verdict, cmp.confidence]
        return "\n".join(lines)


def run_whatif(scenario: Scenario, sites: Sequence[Site], current: ModelArtifact,
               candidate: ModelArtifact | None = None, settings: Settings | None = None) -> WhatIf:
    settings = settings or Settings()
    if scenario.warmup < current.window:
        raise WhatIfError(f"the warm-up ({scenario.warmup}) must cover at least one model window ({current.window})")
    if candidate is not None and candidate.window != current.window:
        raise WhatIfError(f"candidate window {candidate.window} differs from the current model's {current.window}")
    prepared = prepare(scenario, sites)
    run = replay(make_engine(current, candidate, scenario.warmup, settings), samples(prepared.sites), settings.batch)
    reference = None
    if prepared.event is not None:
        reference = replay(make_engine(current, candidate, scenario.warmup, settings), samples(prepared.reference),
                           settings.batch)
    return WhatIf(prepared, current, candidate, settings, run, reference)


def _finite_table(table: dict) -> dict:
    def clean(v):
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return v

    return clean(table)


def _pct(x: float) -> str:
    return f"{100 * x:.2f} %" if math.isfinite(x) else "-"


def _num(x: float, digits: int = 1) -> str:
    return f"{x:.{digits}f}" if math.isfinite(x) else "-"
