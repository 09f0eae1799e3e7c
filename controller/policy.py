"""Allocators of the live loop, built from a model artifact's manifest with the shared allocator code."""

from __future__ import annotations

from forecaster.core.allocators import Allocator, Headroom, TrainingStats, b1, b2, forecast_policy, persistence

SHADOW_NAMES = ("b1", "b2", "persistence_sla")


def live_name(policy: str) -> str:
    return "ai_sla" if policy == "sla" else "ai_raw"


def _calibration(table: dict, target: float, what: str) -> Headroom:
    key = f"{target:g}"
    if key not in table:
        raise ValueError(f"the manifest's {what} has no entry for SLA target {key}; it has {', '.join(table)}")
    return Headroom.from_dict(table[key])


def allocators_from_manifest(manifest: dict, policy: str = "sla", sla_target: float = 0.01,
                             floor: float = 0.0, ceiling: float | None = None) -> tuple[Allocator, list[Allocator]]:
    """The live allocator (emitted) and the shadow allocators (scored only)."""
    headroom = _calibration(manifest["calibration"], sla_target, "calibration") if policy == "sla" else None
    live = forecast_policy(live_name(policy), headroom, floor=floor, ceiling=ceiling)
    stats = TrainingStats(**manifest["training_stats"])
    shadows = [b1(stats), b2(stats),
               persistence("persistence_sla", _calibration(manifest["persistence_calibration"], sla_target,
                                                           "persistence_calibration"))]
    return live, shadows
