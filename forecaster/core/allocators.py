"""Bandwidth allocators: static baselines, persistence, raw forecast and the SLA-aware policy.

Every allocator maps, per interval, the last observed demand and the model's forecast for the
next interval to an allocated capacity. The live controller and offline evaluation both call
:meth:`Allocator.allocate`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

Source = Literal["static", "last", "forecast"]

DEFAULT_SLA_TARGET = 0.01
CALIBRATION_TARGETS: tuple[float, ...] = (0.005, 0.01, 0.02, 0.05)
DEFAULT_CONFIDENCE_Z = 1.645
RELATIVE_GRID = np.round(np.linspace(0.0, 0.2, 41), 4)


@dataclass(frozen=True)
class TrainingStats:
    """Statistics of the training part's target series, from which the static baselines come."""

    mean: float
    std: float
    p95: float
    n: int

    @classmethod
    def of(cls, train_target: np.ndarray) -> TrainingStats:
        y = np.asarray(train_target, dtype=np.float64)
        return cls(mean=float(y.mean()), std=float(y.std()), p95=float(np.percentile(y, 95)), n=int(y.size))

    @property
    def b1(self) -> float:
        return self.mean + 2.0 * self.std

    @property
    def b2(self) -> float:
        return self.p95


@dataclass(frozen=True)
class Headroom:
    """Margin on a point forecast: ``allocation = base * (1 + relative) + additive``.

    Calibrated so that at most ``target_rate`` of intervals are under-provisioned.
    """

    relative: float
    additive: float
    target_rate: float

    def apply(self, base: np.ndarray) -> np.ndarray:
        return np.asarray(base, dtype=np.float64) * (1.0 + self.relative) + self.additive

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Headroom:
        return cls(relative=float(d["relative"]), additive=float(d["additive"]),
                   target_rate=float(d["target_rate"]))


def wilson_upper(misses: int, n: int, z: float) -> float:
    """Upper end of the Wilson score interval for a rate of ``misses`` in ``n``."""
    p = misses / n
    centre = p + z * z / (2 * n)
    spread = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return float((centre + spread) / (1 + z * z / n))


def allowed_misses(n: int, target_rate: float, z: float | None) -> int:
    """Most under-provisioned calibration intervals that still meet the target.

    With ``z`` (e.g. 1.645 for 95 % one-sided), the rate's upper confidence bound must meet
    the target, not only its point estimate: a validation stretch holds few misses at 1 %,
    and the test or live period drifts from it.
    """
    if z is None:
        return int(np.floor(target_rate * n + 1e-9))
    k = -1
    while k + 1 < n and wilson_upper(k + 1, n, z) <= target_rate:
        k += 1
    return max(k, 0)


def calibrate_headroom(base: np.ndarray, actual: np.ndarray, target_rate: float = DEFAULT_SLA_TARGET,
                       z: float | None = DEFAULT_CONFIDENCE_Z,
                       relative_grid: np.ndarray = RELATIVE_GRID) -> Headroom:
    """Headroom with the lowest mean over-provisioning on the calibration intervals among those
    that meet ``target_rate`` there (see :func:`allowed_misses`).

    For each relative margin on the grid, the additive margin is the order statistic of the
    per-interval shortfall, so the miss budget is met exactly.
    """
    if not 0 < target_rate < 1:
        raise ValueError(f"target_rate must lie in (0, 1), got {target_rate}")
    base = np.asarray(base, dtype=np.float64)
    actual = np.asarray(actual, dtype=np.float64)
    if base.size == 0 or base.shape != actual.shape:
        raise ValueError("calibration needs matching, non-empty forecast and actual arrays")
    misses = allowed_misses(base.size, target_rate, z)
    best: tuple[float, Headroom] | None = None
    for rel in relative_grid:
        scaled = base * (1.0 + rel)
        shortfall = np.sort(actual - scaled)
        add = float(shortfall[shortfall.size - 1 - misses])
        # scaled + (actual - scaled) can round below actual: step up until the budget holds.
        while np.count_nonzero(actual > scaled + add) > misses:
            add += float(np.spacing(max(abs(add), float(np.abs(scaled).max()), 1.0)))
        h = Headroom(relative=float(rel), additive=add, target_rate=float(target_rate))
        over = float(np.maximum(np.maximum(h.apply(base), 0.0) - actual, 0.0).mean())
        if best is None or over < best[0]:
            best = (over, h)
    assert best is not None
    return best[1]


@dataclass(frozen=True)
class Allocator:
    """One allocation rule. ``source`` says what it starts from; headroom and bounds follow."""

    name: str
    source: Source
    level: float | None = None
    headroom: Headroom | None = None
    floor: float = 0.0
    ceiling: float | None = None

    def __post_init__(self) -> None:
        if self.source == "static" and self.level is None:
            raise ValueError(f"static allocator {self.name!r} needs a level")
        if self.ceiling is not None and self.ceiling < self.floor:
            raise ValueError(f"allocator {self.name!r}: ceiling {self.ceiling} is below floor {self.floor}")

    def allocate(self, last: np.ndarray, forecast: np.ndarray | None = None) -> np.ndarray:
        last = np.asarray(last, dtype=np.float64)
        if self.source == "static":
            base = np.full(last.shape, float(self.level))
        elif self.source == "last":
            base = last
        else:
            if forecast is None:
                raise ValueError(f"allocator {self.name!r} needs a forecast")
            base = np.asarray(forecast, dtype=np.float64)
        alloc = self.headroom.apply(base) if self.headroom is not None else base
        return np.clip(alloc, self.floor, self.ceiling if self.ceiling is not None else np.inf)

    def describe(self) -> dict:
        d = {"name": self.name, "source": self.source, "floor": self.floor, "ceiling": self.ceiling}
        if self.level is not None:
            d["level"] = self.level
        if self.headroom is not None:
            d["headroom"] = self.headroom.to_dict()
        return d


def b1(stats: TrainingStats) -> Allocator:
    return Allocator("b1", "static", level=stats.b1)


def b2(stats: TrainingStats) -> Allocator:
    return Allocator("b2", "static", level=stats.b2)


def persistence(name: str = "persistence", headroom: Headroom | None = None, floor: float = 0.0,
                ceiling: float | None = None) -> Allocator:
    return Allocator(name, "last", headroom=headroom, floor=floor, ceiling=ceiling)


def forecast_policy(name: str, headroom: Headroom | None = None, floor: float = 0.0,
                    ceiling: float | None = None) -> Allocator:
    return Allocator(name, "forecast", headroom=headroom, floor=floor, ceiling=ceiling)
