"""Seeded synthetic multi-site KPI generator with the dataset's record shape.

Each site has a daily and a weekly cycle with its own phase and amplitude, four KPIs that
move together (sessions and downstream follow internet; VPN follows office hours), AR(1)
noise, occasional surges of a few intervals, and outages where every KPI drops to zero.
Values are clipped to [0, 1000], as in the real data.
"""

from __future__ import annotations

import numpy as np

from forecaster import STEP_SECONDS
from forecaster.data import Site

STEPS_PER_DAY = 86400 // STEP_SECONDS


def generate_site(index: int, n_steps: int = 10_738, seed: int = 0, start_ts: int = 0) -> Site:
    rng = np.random.default_rng([seed, index])
    t = np.arange(n_steps)
    day = 2 * np.pi * (t % STEPS_PER_DAY) / STEPS_PER_DAY
    week = 2 * np.pi * (t % (7 * STEPS_PER_DAY)) / (7 * STEPS_PER_DAY)
    phase = rng.uniform(-0.6, 0.6)
    base = rng.uniform(250, 450)
    amp = rng.uniform(120, 250)
    daily = np.sin(day - np.pi / 2 + phase) + 0.35 * np.sin(2 * (day + phase))
    weekly = 1.0 - 0.12 * (np.cos(week) > 0.6)

    noise = np.empty(n_steps)
    noise[0] = 0.0
    eps = rng.normal(0, 1, n_steps)
    for i in range(1, n_steps):
        noise[i] = 0.9 * noise[i - 1] + eps[i]

    internet = (base + amp * daily) * weekly + 6.0 * noise
    surges = np.zeros(n_steps)
    for start in rng.choice(n_steps, size=max(1, n_steps // 1500), replace=False):
        length = int(rng.integers(2, 12))
        surges[start:start + length] += rng.uniform(60, 200)
    internet = internet + surges

    office = np.clip(np.sin(day - np.pi / 2 + phase), 0, None) * weekly
    sessions = 0.8 * internet + 40 * rng.normal(0, 1, n_steps).cumsum() / np.sqrt(n_steps) + 30
    vpn = 150 + 500 * office + 5 * noise
    downstream = 0.92 * internet + 3 * rng.normal(0, 1, n_steps)
    values = np.stack([internet, sessions, vpn, downstream], axis=1)

    for start in rng.choice(n_steps, size=max(1, n_steps // 2500), replace=False):
        values[start:start + int(rng.integers(1, 6))] = 0.0
    values = np.clip(values, 0.0, 1000.0).astype(np.float32)
    ts = start_ts + t.astype(np.int64) * STEP_SECONDS
    return Site(name=f"synthetic-{index}", timestamps=ts, values=values,
                source=f"synthetic(seed={seed}, index={index})")


def generate_sites(n_sites: int, n_steps: int = 10_738, seed: int = 0, start_ts: int = 0) -> list[Site]:
    return [generate_site(i, n_steps, seed, start_ts) for i in range(n_sites)]
