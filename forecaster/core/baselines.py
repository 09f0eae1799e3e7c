"""Per-site static baselines: B1 = mean + 2 std and B2 = P95 of a site's own history.

Offline, the paper's definition is exact over the site's training part
(:meth:`forecaster.core.allocators.TrainingStats.of`). Live, a site's levels come from its first
``warmup`` intervals and are then frozen; they must fit in the site's table state, so the
percentile comes from a fixed histogram rather than the raw values:

* the contract bounds demand to ``[DEMAND_MIN, DEMAND_MAX]`` = [0, 1000], split into
  ``HISTOGRAM_BINS`` = 1000 bins of width 1 unit;
* each order statistic is placed evenly inside its bin, so it is off by less than one bin width
  (1 unit, 0.1 % of the range), and P95, interpolated between two of them as ``numpy.percentile``
  does, is within :data:`P95_MAX_ERROR` = 1 unit of the exact percentile of the same values;
* mean and standard deviation are exact (running sums).

A quantile sketch (DDSketch, t-digest) was considered: its error is relative, so about 3 units at a
typical level of 300, and it needs its own serialization. The bounded range makes the histogram
both tighter and simpler to store (counts only), and any two histograms merge by addition.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from forecaster.core.allocators import TrainingStats

DEMAND_MIN = 0.0
DEMAND_MAX = 1000.0
HISTOGRAM_BINS = 1000
BIN_WIDTH = (DEMAND_MAX - DEMAND_MIN) / HISTOGRAM_BINS
P95_MAX_ERROR = BIN_WIDTH
DEFAULT_WARMUP_INTERVALS = 2016  # one week of 5-minute intervals: the weekly cycle is covered


def demand_bin(value: float) -> int:
    """The histogram bin of one demand value (values outside the range land in the end bins)."""
    return min(max(int(np.floor((value - DEMAND_MIN) / BIN_WIDTH)), 0), HISTOGRAM_BINS - 1)


def _bins(values: np.ndarray) -> np.ndarray:
    idx = np.floor((np.asarray(values, dtype=np.float64) - DEMAND_MIN) / BIN_WIDTH).astype(np.int64)
    return np.clip(idx, 0, HISTOGRAM_BINS - 1)


@dataclass
class BaselineEstimator:
    """Running count, sum, sum of squares and a fixed histogram of one site's demand."""

    n: int = 0
    total: float = 0.0
    total_sq: float = 0.0
    counts: np.ndarray = field(default_factory=lambda: np.zeros(HISTOGRAM_BINS, dtype=np.int64))

    def add(self, values: np.ndarray | float) -> None:
        v = np.atleast_1d(np.asarray(values, dtype=np.float64))
        if v.size == 0:
            return
        self.n += int(v.size)
        self.total += float(v.sum())
        self.total_sq += float((v * v).sum())
        np.add.at(self.counts, _bins(v), 1)

    def order_statistic(self, k: int) -> float:
        """The k-th smallest value (0-based), placed evenly inside its bin: within one bin width."""
        cum = np.cumsum(self.counts)
        b = min(int(np.searchsorted(cum, k, side="right")), HISTOGRAM_BINS - 1)
        below = int(cum[b - 1]) if b > 0 else 0
        inside = max(int(self.counts[b]), 1)
        return DEMAND_MIN + BIN_WIDTH * (b + (k - below + 0.5) / inside)

    def percentile(self, q: float) -> float:
        """Like ``numpy.percentile(values, q)`` (linear between order statistics), from the histogram.

        Each order statistic is off by less than a bin width, so their interpolation is too.
        """
        if self.n == 0:
            return float("nan")
        rank = q / 100.0 * (self.n - 1)
        lo = int(np.floor(rank))
        hi = min(lo + 1, self.n - 1)
        frac = rank - lo
        x_lo = self.order_statistic(lo)
        return x_lo if frac == 0 else x_lo + frac * (self.order_statistic(hi) - x_lo)

    def stats(self) -> TrainingStats:
        mean = self.total / self.n if self.n else float("nan")
        var = max(self.total_sq / self.n - mean * mean, 0.0) if self.n else float("nan")
        return TrainingStats(mean=mean, std=float(np.sqrt(var)), p95=self.percentile(95.0), n=self.n)


def live_levels(values: np.ndarray, warmup: int = DEFAULT_WARMUP_INTERVALS) -> TrainingStats:
    """The levels a live site freezes after its first ``warmup`` values (the offline twin of the
    controller's warm-up)."""
    est = BaselineEstimator()
    est.add(np.asarray(values, dtype=np.float64)[:warmup])
    return est.stats()
