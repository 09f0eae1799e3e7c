"""Online, per-site SLA headroom: a conformal quantile tracker (adaptive conformal inference /
the conformal PID controller's quantile step).

Per site, the allocation for the next interval is ``base + q * scale``: ``base`` is the point
forecast (or the last value, for persistence), ``scale`` the site's level (:func:`headroom_scale`):
a mix of the base itself and the site's own long-run mean, the mean of the same history its B1 and
B2 come from, with the weight ``site_weight`` on the latter. So the headroom has the static
calibration's form, a margin relative to the forecast plus a constant, with the constant in units of
the site's own level: ``q`` is scale-free and one step size fits sites of any level. The long-run
part keeps the headroom from swelling at every daily peak where the demand's noise and surges are
not proportional to the hour's level. The step size and the weight are chosen on the training sites
(``forecaster.train.tune_online``). When the interval's actual arrives::

    miss = actual > allocation
    q   <- q + eta * (miss - target)

A miss raises ``q`` by ``eta * (1 - target)``, a hit lowers it by ``eta * target``; over any
stretch of ``T`` intervals the miss rate is within ``(q_max - q_min + eta) / (eta * T)`` of the
target, whatever the data do (Angelopoulos et al., "Conformal PID Control", 2023, Prop. 1).
``q`` is clipped to ``[Q_MIN, Q_MAX]`` so one outage cannot wind it up without bound.

Considered: MAPIE's time-series ACI refits a scikit-learn estimator per step and keeps its own
state; the live controller needs two floats per site that fit in the site's table record, and the
same three lines offline, so the rule lives here and both sides call it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DEFAULT_ETA = 0.02
SCALE_FLOOR = 1.0  # demand units: keeps the scale positive through outages (the data has zeros)
Q_MIN, Q_MAX = -1.0, 5.0


SITE_LEVEL_WEIGHT = 0.5  # the default weight of the site's long-run level in the scale
# What the scale is made of, stored with the settings: the same q and weight mean another headroom
# under another scale, so settings tuned for an older one are refused rather than misread.
SCALE_KIND = "base+site_level"


def headroom_scale(base: np.ndarray | float, site_level: np.ndarray | float | None = None,
                   site_weight: float = SITE_LEVEL_WEIGHT) -> np.ndarray:
    """The headroom's scale from each interval's base (the forecast or the last value; below zero
    counts as zero) and the site's long-run mean level (offline: its training part; live: its
    baseline warm-up so far), floored. Without a site level (None or NaN: nothing seen yet), the base
    alone."""
    scale = np.maximum(np.asarray(base, dtype=np.float64), 0.0)
    if site_level is not None:
        level = np.asarray(site_level, dtype=np.float64)
        scale = np.where(np.isfinite(level), (1.0 - site_weight) * scale + site_weight * level, scale)
    return np.maximum(scale, SCALE_FLOOR)


def initial_headroom(base: np.ndarray, actual: np.ndarray, scale: np.ndarray, target: float) -> float:
    """Start value of ``q``: the ``1 - target`` quantile of the scale-free calibration residuals."""
    r = (np.asarray(actual, np.float64) - np.asarray(base, np.float64)) / np.asarray(scale, np.float64)
    if r.size == 0:
        raise ValueError("initial_headroom needs calibration residuals")
    return float(np.clip(np.quantile(r, 1.0 - target), Q_MIN, Q_MAX))


@dataclass(frozen=True)
class OnlineHeadroom:
    """The tracker's settings; its state is one float ``q`` per site."""

    q0: float
    eta: float = DEFAULT_ETA
    target: float = 0.01
    site_weight: float = SITE_LEVEL_WEIGHT

    def scale(self, base: np.ndarray | float, site_level: np.ndarray | float | None) -> np.ndarray:
        """This tracker's scale (:func:`headroom_scale` with its ``site_weight``)."""
        return headroom_scale(base, site_level, self.site_weight)

    def scale_one(self, base: float, site_level: float) -> float:
        """One interval's scale (the live engine's per-sample path; the same as :meth:`scale`)."""
        b = max(base, 0.0)
        s = b if math.isnan(site_level) else (1.0 - self.site_weight) * b + self.site_weight * site_level
        return max(s, SCALE_FLOOR)

    def allocate_one(self, base: float, scale: float, q: float, floor: float = 0.0,
                     ceiling: float | None = None) -> float:
        """One interval's allocation, bounded like every allocator."""
        a = max(base + q * scale, floor)
        return a if ceiling is None else min(a, ceiling)

    def update_one(self, q: float, allocated: float, actual: float) -> float:
        """``q`` after the interval's actual is known."""
        return min(max(q + self.eta * (float(actual > allocated) - self.target), Q_MIN), Q_MAX)

    def run(self, base: np.ndarray, scale: np.ndarray, actual: np.ndarray, q: float | None = None,
            floor: float = 0.0, ceiling: float | None = None) -> tuple[np.ndarray, float]:
        """One site's series in time order: allocations and the final ``q`` (what the live engine does,
        interval by interval)."""
        base = np.asarray(base, np.float64)
        scale = np.asarray(scale, np.float64)
        actual = np.asarray(actual, np.float64)
        out = np.empty(base.shape)
        cur = self.q0 if q is None else float(q)
        for i in range(base.size):
            out[i] = self.allocate_one(float(base[i]), float(scale[i]), cur, floor, ceiling)
            cur = self.update_one(cur, out[i], float(actual[i]))
        return out, cur

    def to_dict(self) -> dict[str, float | str]:
        return {"q0": self.q0, "eta": self.eta, "target": self.target, "site_weight": self.site_weight,
                "scale": SCALE_KIND}

    @classmethod
    def from_dict(cls, d: dict) -> OnlineHeadroom:
        """Settings as :meth:`to_dict` wrote them; refused when tuned for another scale."""
        kind = d.get("scale")
        if kind != SCALE_KIND:
            raise ValueError(f"online headroom settings were tuned for the scale {kind or 'window mean'!r}, "
                             f"this version uses {SCALE_KIND!r}: retrain and re-export the model")
        return cls(q0=float(d["q0"]), eta=float(d.get("eta", DEFAULT_ETA)), target=float(d["target"]),
                   site_weight=float(d.get("site_weight", SITE_LEVEL_WEIGHT)))
