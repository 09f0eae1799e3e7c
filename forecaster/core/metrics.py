"""Forecast and allocation metrics: one implementation for offline evaluation and the live loop.

Per interval, with ``a`` the actual demand and ``A`` the allocated capacity (negative
allocations count as 0):

* efficiency        = min(a / A, 1)
* wastage           = max((A - a) / A, 0)
* utilization       = a / A
* over-provisioning = max(A - a, 0)              (demand units)
* under-provisioned = a > A; its amount is max(a - A, 0)

Zeros (the data has outages where demand is exactly 0):

* ``A > 0, a = 0``: efficiency 0, wastage 1, utilization 0 — all capacity was wasted.
* ``A = 0, a = 0``: efficiency 1, wastage 0, utilization 1 — nothing was needed or given.
* ``A = 0, a > 0``: efficiency 1 and wastage 0 (their limits: nothing was given, nothing
  wasted); utilization is undefined (NaN) and left out of its mean, since a/0 has no finite
  value. The interval is under-provisioned, which the under-provisioning rate and amount report.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SUMMARY_KEYS: tuple[str, ...] = (
    "mae", "rmse", "efficiency_mean", "efficiency_median", "wastage_mean", "utilization_mean",
    "overprovisioning_mean", "underprovisioning_rate", "underprovisioned_amount_mean", "n",
)


@dataclass(frozen=True)
class IntervalMetrics:
    efficiency: np.ndarray
    wastage: np.ndarray
    utilization: np.ndarray
    overprovisioning: np.ndarray
    underprovisioned: np.ndarray
    underprovisioned_amount: np.ndarray
    abs_error: np.ndarray


def interval_metrics(actual: np.ndarray, allocated: np.ndarray) -> IntervalMetrics:
    a = np.asarray(actual, dtype=np.float64)
    alloc = np.maximum(np.asarray(allocated, dtype=np.float64), 0.0)
    if a.shape != alloc.shape:
        raise ValueError(f"actual {a.shape} and allocated {alloc.shape} differ in shape")
    positive = alloc > 0
    safe = np.where(positive, alloc, 1.0)
    efficiency = np.where(positive, np.minimum(a / safe, 1.0), 1.0)
    wastage = np.where(positive, np.maximum((alloc - a) / safe, 0.0), 0.0)
    utilization = np.where(positive, a / safe, np.where(a == 0, 1.0, np.nan))
    return IntervalMetrics(
        efficiency=efficiency,
        wastage=wastage,
        utilization=utilization,
        overprovisioning=np.maximum(alloc - a, 0.0),
        underprovisioned=a > alloc,
        underprovisioned_amount=np.maximum(a - alloc, 0.0),
        abs_error=np.abs(alloc - a),
    )


def mae(actual: np.ndarray, predicted: np.ndarray) -> float:
    return float(np.mean(np.abs(np.asarray(predicted, np.float64) - np.asarray(actual, np.float64))))


def rmse(actual: np.ndarray, predicted: np.ndarray) -> float:
    err = np.asarray(predicted, np.float64) - np.asarray(actual, np.float64)
    return float(np.sqrt(np.mean(err * err)))


def summarize(actual: np.ndarray, allocated: np.ndarray) -> dict[str, float | int]:
    """All allocation metrics over a set of intervals (MAE/RMSE are of the allocation itself)."""
    acc = MetricAccumulator()
    acc.add(actual, allocated)
    out = acc.summary()
    m = interval_metrics(actual, allocated)
    out["efficiency_median"] = float(np.median(m.efficiency)) if len(m.efficiency) else float("nan")
    return {k: out[k] for k in SUMMARY_KEYS}


@dataclass
class MetricAccumulator:
    """Running sums of the interval metrics; the live controller keeps one per allocator."""

    n: int = 0
    sum_abs_error: float = 0.0
    sum_sq_error: float = 0.0
    sum_efficiency: float = 0.0
    sum_wastage: float = 0.0
    sum_utilization: float = 0.0
    n_utilization: int = 0
    sum_overprovisioning: float = 0.0
    n_underprovisioned: int = 0
    sum_underprovisioned_amount: float = 0.0
    last: dict[str, float] = field(default_factory=dict)

    def add(self, actual: np.ndarray, allocated: np.ndarray) -> IntervalMetrics:
        m = interval_metrics(np.atleast_1d(actual), np.atleast_1d(allocated))
        k = len(m.efficiency)
        if k == 0:
            return m
        self.n += k
        self.sum_abs_error += float(m.abs_error.sum())
        self.sum_sq_error += float((m.abs_error**2).sum())
        self.sum_efficiency += float(m.efficiency.sum())
        self.sum_wastage += float(m.wastage.sum())
        defined = ~np.isnan(m.utilization)
        self.sum_utilization += float(m.utilization[defined].sum())
        self.n_utilization += int(defined.sum())
        self.sum_overprovisioning += float(m.overprovisioning.sum())
        self.n_underprovisioned += int(m.underprovisioned.sum())
        self.sum_underprovisioned_amount += float(m.underprovisioned_amount.sum())
        self.last = {
            "efficiency": float(m.efficiency[-1]),
            "wastage": float(m.wastage[-1]),
            "utilization": float(m.utilization[-1]),
            "overprovisioning": float(m.overprovisioning[-1]),
        }
        return m

    def summary(self) -> dict[str, float | int]:
        nan = float("nan")
        n = self.n
        return {
            "mae": self.sum_abs_error / n if n else nan,
            "rmse": float(np.sqrt(self.sum_sq_error / n)) if n else nan,
            "efficiency_mean": self.sum_efficiency / n if n else nan,
            "efficiency_median": nan,
            "wastage_mean": self.sum_wastage / n if n else nan,
            "utilization_mean": self.sum_utilization / self.n_utilization if self.n_utilization else nan,
            "overprovisioning_mean": self.sum_overprovisioning / n if n else nan,
            "underprovisioning_rate": self.n_underprovisioned / n if n else nan,
            "underprovisioned_amount_mean": self.sum_underprovisioned_amount / n if n else nan,
            "n": n,
        }
