"""Sites to replay: recorded ones, derived ones, or synthetic ones.

Derived sites (``--sites`` beyond the recorded ones chosen): derived site k > 0 is a recorded site rotated
in time by ``k * DERIVED_SHIFT_STEPS`` intervals (the series wraps around) and scaled by
``1 + DERIVED_SCALE_SPREAD * sin(k)``, clipped to [0, 1000]. Each keeps the recorded series'
shape, outages included, while the sites' peaks fall at different times.
"""

from __future__ import annotations

import numpy as np

from forecaster.data import Site

DERIVED_SHIFT_STEPS = 97
DERIVED_SCALE_SPREAD = 0.2


def derive_site(base: Site, k: int) -> Site:
    if k == 0:
        return Site(f"{base.name}", base.timestamps, base.values, base.source, base.step_seconds)
    shift = (k * DERIVED_SHIFT_STEPS) % len(base.values)
    scale = 1.0 + DERIVED_SCALE_SPREAD * np.sin(k)
    values = np.clip(np.roll(base.values, -shift, axis=0) * scale, 0.0, 1000.0).astype(np.float32)
    return Site(f"{base.name}~{k}", base.timestamps, values,
                f"{base.source} shifted {shift} steps, scaled {scale:.3f}", base.step_seconds)


def replay_sites(n_sites: int, bases: list[Site] | None = None, seed: int = 0, n_steps: int = 10_738) -> list[Site]:
    """``n_sites`` sites: cycling over the recorded ``bases`` (then deriving further ones from them), else
    synthetic. Site k is ``derive_site(bases[k % len(bases)], k // len(bases))``."""
    if n_sites < 1:
        raise ValueError("need at least one site")
    if not bases:
        from forecaster.synthetic import generate_sites

        return generate_sites(n_sites, n_steps=n_steps, seed=seed)
    return [derive_site(bases[k % len(bases)], k // len(bases)) for k in range(n_sites)]
