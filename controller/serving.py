"""From a verified model artifact to what the engine serves: forecasts and headroom settings at the
configured SLA target (no Faust here, so offline tools build the same engine)."""

from __future__ import annotations

from controller.engine import ServedModel
from forecaster.core.allocators import Headroom
from forecaster.core.online import DEFAULT_ETA, SCALE_KIND, OnlineHeadroom

# For artifacts exported before the online headroom existed.
DEFAULT_ONLINE = {"q0": 0.1, "eta": DEFAULT_ETA, "scale": SCALE_KIND}


def served_model(artifact, sla_target: float, timer=None) -> ServedModel:
    """The engine's view of a verified artifact: forecasts, and its headroom settings at the SLA target."""
    key = f"{sla_target:g}"
    manifest = artifact.manifest
    calibration = manifest["calibration"]
    if key not in calibration:
        raise ValueError(f"the manifest's calibration has no entry for SLA target {key}; "
                         f"it has {', '.join(calibration)}")
    online = (manifest.get("online_headroom") or {}).get(key, {}).get("model")
    online = online or {**DEFAULT_ONLINE, "target": sla_target}

    def predict(x):
        if timer is None:
            return artifact.predict(x)
        with timer.time():
            return artifact.predict(x)

    return ServedModel(version=artifact.version, predict=predict,
                       online=OnlineHeadroom.from_dict({**online, "target": sla_target}),
                       static=Headroom.from_dict(calibration[key]))


def persistence_headroom(manifest: dict, sla_target: float) -> OnlineHeadroom:
    key = f"{sla_target:g}"
    online = (manifest.get("online_headroom") or {}).get(key, {}).get("persistence") or DEFAULT_ONLINE
    return OnlineHeadroom.from_dict({**online, "target": sla_target})
