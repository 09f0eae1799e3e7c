"""Current model vs staged candidate, from the live scores the workers export.

The workers score the candidate as its own allocator (``candidate``), and the live model's ``ai_sla``
allocation again as ``current`` on exactly the intervals the candidate is scored on (both reset when
the candidate changes). :func:`compare_scores` is the pure decision rule; :func:`read_live_scores`
scrapes and sums the workers' Prometheus endpoints. Used by ``dtwin model compare`` and by the
promote guard of :class:`export.registry.Registry`.
"""

from __future__ import annotations

import math
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist

CURRENT_ALLOCATOR = "current"
CANDIDATE_ALLOCATOR = "candidate"
DEFAULT_METRICS_URL = "http://127.0.0.1:9108/metrics"
DEFAULT_MIN_INTERVALS = 1000
DEFAULT_LEVEL = 0.95

SCORED = "dtwin_allocation_intervals_scored_total"
UNDER = "dtwin_allocation_underprovisioned_intervals_total"
OVER_SUM = "dtwin_allocation_overprovisioning_units_sum"
OVER_COUNT = "dtwin_allocation_overprovisioning_units_count"
MODEL_INFO = "dtwin_model_info"

CAVEATS = (
    "Each scored interval is treated as an independent trial. Consecutive intervals of one site are "
    "correlated, so the real uncertainty is larger than stated; the test also ignores that both allocators "
    "were scored on the same intervals (pairing), which would narrow it.",
    "The mean over-provisioning has no confidence statement: the workers export only its sum and count.",
    "It covers only the traffic the workers read here have scored since the candidate was staged, summed over "
    "sites; it says nothing about single sites or about traffic unlike it.",
)


@dataclass(frozen=True)
class AllocatorScore:
    """One allocator's running scores, summed over workers."""

    allocator: str
    intervals: int = 0
    underprovisioned: int = 0
    overprovisioning_sum: float = 0.0
    overprovisioning_count: int = 0

    @property
    def miss_rate(self) -> float:
        return self.underprovisioned / self.intervals if self.intervals else math.nan

    @property
    def over_mean(self) -> float:
        return self.overprovisioning_sum / self.overprovisioning_count if self.overprovisioning_count else math.nan

    def __add__(self, other: AllocatorScore) -> AllocatorScore:
        return AllocatorScore(self.allocator, self.intervals + other.intervals,
                              self.underprovisioned + other.underprovisioned,
                              self.overprovisioning_sum + other.overprovisioning_sum,
                              self.overprovisioning_count + other.overprovisioning_count)


def wilson_interval(successes: int, n: int, level: float = DEFAULT_LEVEL) -> tuple[float, float]:
    """Two-sided Wilson score interval of a proportion (``(0, 1)`` when ``n`` is 0)."""
    if n <= 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(1 - (1 - level) / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    return (0.0 if successes <= 0 else lo), (1.0 if successes >= n else hi)


def two_proportion_z(x1: int, n1: int, x2: int, n2: int) -> float:
    """Pooled z statistic of ``x1/n1 - x2/n2`` (0 when there is no variance to test against)."""
    if n1 <= 0 or n2 <= 0:
        return 0.0
    pooled = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    return (x1 / n1 - x2 / n2) / se if se > 0 else 0.0


@dataclass(frozen=True)
class Comparison:
    current: AllocatorScore
    candidate: AllocatorScore
    wins: bool
    reasons: tuple[str, ...]  # why the candidate does not win; empty when it does
    same_intervals: bool
    under_better: bool  # candidate miss rate <= current's
    over_better: bool  # candidate mean over-provisioning < current's
    level: float
    current_miss_ci: tuple[float, float]
    candidate_miss_ci: tuple[float, float]
    p_candidate_lower: float  # one-sided p-value of "the candidate misses less often"
    p_candidate_higher: float  # one-sided p-value of "the candidate misses more often"
    confidence: str
    caveats: tuple[str, ...] = CAVEATS
    current_versions: tuple[str, ...] = ()
    candidate_versions: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    unreachable: tuple[str, ...] = ()
    min_intervals: int = DEFAULT_MIN_INTERVALS
    strict: bool = False

    @property
    def candidate_version(self) -> str | None:
        return self.candidate_versions[0] if len(self.candidate_versions) == 1 else None

    @property
    def current_version(self) -> str | None:
        return self.current_versions[0] if len(self.current_versions) == 1 else None

    def to_dict(self) -> dict:
        d = asdict(self)
        for key, score in (("current", self.current), ("candidate", self.candidate)):
            d[key]["miss_rate"] = _finite(score.miss_rate)
            d[key]["over_mean"] = _finite(score.over_mean)
        return d

    def text(self) -> str:
        cur, cand = self.current, self.candidate
        lines = [
            f"{'':<22}{'intervals':>10}{'under-provisioned':>19}{'miss rate':>11}{f'{self.level:.0%} Wilson':>20}"
            f"{'over-prov. mean':>17}",
        ]
        for label, s, ci, v in (("current", cur, self.current_miss_ci, self.current_versions),
                                ("candidate", cand, self.candidate_miss_ci, self.candidate_versions)):
            name = f"{label} ({s.allocator})"
            lines.append(f"{name:<22}{s.intervals:>10,}{s.underprovisioned:>19,}{_pct(s.miss_rate):>11}"
                         f"{f'[{_pct(ci[0])}, {_pct(ci[1])}]':>20}{_num(s.over_mean):>17}"
                         + (f"   {', '.join(v)}" if v else ""))
        verdict = ("the candidate WINS: miss rate not higher, mean over-provisioning lower" if self.wins
                   else "the candidate does not win: " + "; ".join(self.reasons))
        lines += ["", verdict, self.confidence, "Not covered:", *(f"  - {c}" for c in self.caveats)]
        if self.unreachable:
            lines.append("Unreachable: " + ", ".join(self.unreachable))
        return "\n".join(lines)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _pct(x: float) -> str:
    return f"{100 * x:.2f} %" if math.isfinite(x) else "-"


def _num(x: float) -> str:
    return f"{x:.2f}" if math.isfinite(x) else "-"


def compare_scores(current: AllocatorScore, candidate: AllocatorScore, *, min_intervals: int = DEFAULT_MIN_INTERVALS,
                   level: float = DEFAULT_LEVEL, strict: bool = False, current_versions: Sequence[str] = (),
                   candidate_versions: Sequence[str] = (), sources: Sequence[str] = (),
                   unreachable: Sequence[str] = ()) -> Comparison:
    """Does the candidate beat the current model on both miss rate and mean over-provisioning?

    It wins when every worker was read, both were scored on the same intervals (equal counts), at
    least ``min_intervals`` of them, its miss rate is at most the current one's and its mean
    over-provisioning is lower. ``strict`` also demands the lower miss rate be significant at
    ``level`` (one-sided two-proportion z-test). The confidence statement is reported either way.
    """
    alpha = 1 - level
    n1, n2 = current.intervals, candidate.intervals
    z = two_proportion_z(current.underprovisioned, n1, candidate.underprovisioned, n2)
    p_lower = 1 - NormalDist().cdf(z)
    p_higher = NormalDist().cdf(z)
    if n1 <= 0 or n2 <= 0:
        p_lower = p_higher = 1.0
    same = n1 == n2 and current.overprovisioning_count == n1 and candidate.overprovisioning_count == n2
    under_better = n1 > 0 and n2 > 0 and candidate.miss_rate <= current.miss_rate
    over_better = (math.isfinite(candidate.over_mean) and math.isfinite(current.over_mean)
                   and candidate.over_mean < current.over_mean)

    reasons = []
    if unreachable:
        reasons.append(f"{len(unreachable)} metrics endpoint(s) could not be read")
    if len(set(candidate_versions)) > 1:
        reasons.append(f"workers score different candidates ({', '.join(sorted(set(candidate_versions)))})")
    if len(set(current_versions)) > 1:
        reasons.append(f"workers serve different current models ({', '.join(sorted(set(current_versions)))})")
    if n2 <= 0:
        reasons.append(f"no intervals scored for {candidate.allocator!r} (is a candidate staged and loaded?)")
    elif not same:
        reasons.append(f"not scored on the same intervals ({current.allocator}: {n1:,} scored, "
                       f"{current.overprovisioning_count:,} in the over-provisioning summary; {candidate.allocator}: "
                       f"{n2:,} and {candidate.overprovisioning_count:,})")
    if 0 < min(n1, n2) < min_intervals:
        reasons.append(f"only {min(n1, n2):,} intervals scored, {min_intervals:,} needed")
    if n2 > 0 and n1 > 0 and not under_better:
        reasons.append(f"higher miss rate ({_pct(candidate.miss_rate)} vs {_pct(current.miss_rate)})")
    if n2 > 0 and n1 > 0 and not over_better:
        reasons.append(f"mean over-provisioning not lower ({_num(candidate.over_mean)} vs {_num(current.over_mean)})")
    if strict and under_better and p_lower >= alpha:
        reasons.append(f"lower miss rate not significant at {level:.0%} (p = {p_lower:.3g}; strict)")

    ci1 = wilson_interval(current.underprovisioned, n1, level)
    ci2 = wilson_interval(candidate.underprovisioned, n2, level)
    if n1 <= 0 or n2 <= 0:
        statement = "No confidence statement: nothing scored yet."
    else:
        if p_lower < alpha:
            miss = (f"the candidate's miss rate is lower with {level:.0%} confidence (one-sided two-proportion "
                    f"z-test, p = {p_lower:.3g})")
        elif p_higher < alpha:
            miss = (f"the candidate's miss rate is HIGHER with {level:.0%} confidence (one-sided two-proportion "
                    f"z-test, p = {p_higher:.3g})")
        else:
            miss = (f"the miss rates do not differ significantly at {level:.0%} (one-sided p = "
                    f"{min(p_lower, p_higher):.3g})")
        statement = (f"Over {min(n1, n2):,} intervals: {miss}; {level:.0%} Wilson intervals current "
                     f"[{_pct(ci1[0])}, {_pct(ci1[1])}], candidate [{_pct(ci2[0])}, {_pct(ci2[1])}]. Mean "
                     f"over-provisioning {_num(candidate.over_mean)} vs {_num(current.over_mean)} units.")
    return Comparison(current=current, candidate=candidate, wins=not reasons, reasons=tuple(reasons),
                      same_intervals=same, under_better=under_better, over_better=over_better, level=level,
                      current_miss_ci=ci1, candidate_miss_ci=ci2, p_candidate_lower=p_lower,
                      p_candidate_higher=p_higher, confidence=statement,
                      current_versions=tuple(sorted(set(current_versions))),
                      candidate_versions=tuple(sorted(set(candidate_versions))), sources=tuple(sources),
                      unreachable=tuple(unreachable), min_intervals=min_intervals, strict=strict)


@dataclass(frozen=True)
class LiveScores:
    scores: dict[str, AllocatorScore]
    versions: dict[str, tuple[str, ...]]  # role ("active", "candidate") -> versions the workers report
    sources: tuple[str, ...]
    unreachable: tuple[str, ...]

    def score(self, allocator: str) -> AllocatorScore:
        return self.scores.get(allocator, AllocatorScore(allocator))


def parse_metrics(text: str) -> tuple[dict[str, AllocatorScore], dict[str, set[str]]]:
    """Allocator scores and model versions from one Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    fields_by_sample = {SCORED: "intervals", UNDER: "underprovisioned", OVER_SUM: "overprovisioning_sum",
                        OVER_COUNT: "overprovisioning_count"}
    raw: dict[str, dict[str, float]] = {}
    versions: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in fields_by_sample and "allocator" in sample.labels:
                values = raw.setdefault(sample.labels["allocator"], {})
                key = fields_by_sample[sample.name]
                values[key] = values.get(key, 0.0) + sample.value
            elif sample.name == MODEL_INFO and sample.value == 1 and "version" in sample.labels:
                versions.setdefault(sample.labels.get("role", "active"), set()).add(sample.labels["version"])
    scores = {a: AllocatorScore(a, int(v.get("intervals", 0)), int(v.get("underprovisioned", 0)),
                                float(v.get("overprovisioning_sum", 0.0)), int(v.get("overprovisioning_count", 0)))
              for a, v in raw.items()}
    return scores, versions


def combine(texts: Iterable[str], sources: Sequence[str] = (), unreachable: Sequence[str] = ()) -> LiveScores:
    scores: dict[str, AllocatorScore] = {}
    versions: dict[str, list[str]] = {}
    for text in texts:
        one, v = parse_metrics(text)
        for a, s in one.items():
            scores[a] = scores[a] + s if a in scores else s
        for role, names in v.items():
            versions.setdefault(role, []).extend(sorted(names))
    return LiveScores(scores, {r: tuple(v) for r, v in versions.items()}, tuple(sources), tuple(unreachable))


def read_live_scores(urls: Sequence[str], timeout: float = 3.0) -> LiveScores:
    """Scrape every endpoint and sum the scores; an endpoint that fails is listed in ``unreachable``."""
    texts, sources, unreachable = [], [], []
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                texts.append(resp.read().decode("utf-8"))
            sources.append(url)
        except (OSError, ValueError) as exc:
            unreachable.append(f"{url} ({exc})")
    return combine(texts, sources, unreachable)


def compare_live(live: LiveScores, current_allocator: str = CURRENT_ALLOCATOR,
                 candidate_allocator: str = CANDIDATE_ALLOCATOR, **kwargs) -> Comparison:
    return compare_scores(live.score(current_allocator), live.score(candidate_allocator),
                          current_versions=live.versions.get("active", ()),
                          candidate_versions=live.versions.get("candidate", ()), sources=live.sources,
                          unreachable=live.unreachable, **kwargs)
