"""The shared numeric core of the fleet policy: per-site baselines from a bounded histogram, and the
online conformal headroom tracker."""

from __future__ import annotations

import numpy as np
import pytest

from forecaster.core.allocators import TrainingStats, calibrate_headroom
from forecaster.core.baselines import P95_MAX_ERROR, BaselineEstimator, live_levels
from forecaster.core.online import SCALE_FLOOR, OnlineHeadroom, headroom_scale, initial_headroom
from forecaster.synthetic import generate_site


def test_histogram_p95_is_within_its_stated_error_of_the_exact_percentile(real_site):
    rng = np.random.default_rng(0)
    cases = [real_site.values[:2016, 0], real_site.values[:, 0], rng.uniform(0, 1000, 2016),
             np.round(rng.normal(300, 50, 5000).clip(0, 1000)), np.array([0.0, 1000.0]), np.array([412.5])]
    for v in cases:
        est = BaselineEstimator()
        est.add(v)
        exact = TrainingStats.of(v)
        for q in (5, 50, 95, 99):
            assert abs(est.percentile(q) - np.percentile(v, q)) <= P95_MAX_ERROR
        got = est.stats()
        assert got.mean == pytest.approx(exact.mean, abs=1e-9) and got.std == pytest.approx(exact.std, abs=1e-6)


def test_live_levels_are_the_sites_own_first_intervals(real_site):
    levels = live_levels(real_site.values[:, 0], 2016)
    exact = TrainingStats.of(real_site.values[:2016, 0])
    assert levels.n == 2016
    assert levels.b1 == pytest.approx(exact.b1, abs=1e-6)
    assert abs(levels.b2 - exact.b2) <= P95_MAX_ERROR


def drifting_series(n: int = 20_000, seed: int = 0):
    """A site whose level triples and whose noise grows over time: a static margin fitted on its start
    under-provisions its end."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    level = 200 + 400 * t / n + 50 * np.sin(2 * np.pi * t / 288)
    noise = rng.normal(0, 1, n) * (0.02 + 0.08 * t / n) * level
    actual = level + noise
    forecast = level  # a point forecast that is right on average
    return forecast, actual, headroom_scale(level)


def test_the_tracker_holds_its_target_where_a_static_headroom_fails():
    forecast, actual, scale = drifting_series()
    calib = slice(0, 2000)
    static = calibrate_headroom(forecast[calib], actual[calib], 0.01)
    later = slice(2000, None)
    static_miss = float(np.mean(actual[later] > static.apply(forecast[later])))
    tracker = OnlineHeadroom(q0=initial_headroom(forecast[calib], actual[calib], scale[calib], 0.01), target=0.01)
    alloc, _ = tracker.run(forecast[later], scale[later], actual[later])
    online_miss = float(np.mean(actual[later] > alloc))
    assert static_miss > 0.05, static_miss  # the static margin drifts far off its 1 % target
    assert abs(online_miss - 0.01) < 0.003, online_miss
    # and on every stretch of 2,000 intervals, within the tracker's bound
    for k in range(0, len(alloc) - 2000, 2000):
        seg = slice(k, k + 2000)
        assert np.mean(actual[later][seg] > alloc[seg]) < 0.01 + (6 + 0.02) / (0.02 * 2000)


def test_one_step_size_fits_sites_of_any_level():
    forecast, actual, scale = drifting_series(seed=1)
    rates = []
    for factor in (0.1, 1.0, 4.0):
        tracker = OnlineHeadroom(q0=0.0, target=0.01)
        alloc, _ = tracker.run(forecast * factor, scale * factor, actual * factor)
        rates.append(float(np.mean(actual * factor > alloc)))
    assert max(rates) - min(rates) < 1e-9  # scale-free: the same decisions at any level


def test_run_and_the_interval_steps_agree():
    forecast, actual, scale = drifting_series(n=500)
    tracker = OnlineHeadroom(q0=0.05, eta=0.03, target=0.02)
    alloc, q_end = tracker.run(forecast, scale, actual, floor=10.0, ceiling=900.0)
    q = 0.05
    for i in range(500):
        a = tracker.allocate_one(forecast[i], scale[i], q, 10.0, 900.0)
        assert a == alloc[i]
        q = tracker.update_one(q, a, actual[i])
    assert q == q_end


def test_the_scale_mixes_the_base_and_the_site_level():
    assert float(headroom_scale(300.0, 100.0)) == pytest.approx(200.0)
    assert float(headroom_scale(300.0, float("nan"))) == pytest.approx(300.0)  # nothing seen yet
    assert float(headroom_scale(300.0)) == pytest.approx(300.0)
    assert float(headroom_scale(0.0, 0.0)) == SCALE_FLOOR
    assert float(headroom_scale(-50.0, 100.0)) == pytest.approx(50.0)  # a negative forecast counts as zero
    np.testing.assert_allclose(headroom_scale(np.array([100.0, 500.0]), 300.0), [200.0, 400.0])
    # the live engine's scalar path gives the same values
    for weight in (0.0, 0.25, 1.0):
        tracker = OnlineHeadroom(q0=0.0, site_weight=weight)
        for base, level in ((300.0, 100.0), (300.0, float("nan")), (0.2, 0.0), (0.0, 640.0), (-7.0, 20.0)):
            assert tracker.scale_one(base, level) == pytest.approx(float(tracker.scale(base, level)))


def test_settings_tuned_for_another_scale_are_refused():
    tracker = OnlineHeadroom(q0=0.05, eta=0.01, target=0.01, site_weight=0.5)
    assert OnlineHeadroom.from_dict(tracker.to_dict()) == tracker
    old = {k: v for k, v in tracker.to_dict().items() if k != "scale"}  # exported before the scale had a name
    with pytest.raises(ValueError, match=r"tuned for the scale 'window mean'.*retrain and re-export"):
        OnlineHeadroom.from_dict(old)


def test_the_site_level_in_the_scale_cuts_over_provisioning_where_noise_is_not_proportional():
    """A synthetic site's noise and surges do not grow with the hour's level: a headroom proportional
    to the base alone (here the last value) over-provisions at every daily peak for the same miss rate."""
    site = generate_site(0, n_steps=8000)
    internet = site.values[:, 0].astype(np.float64)
    windows = np.lib.stride_tricks.sliding_window_view(internet[:-1], 10)
    base, actual = windows[:, -1], internet[10:]
    level = float(internet[:4000].mean())
    results = {}
    for name, scale in (("base", headroom_scale(base)), ("mixed", headroom_scale(base, level))):
        calib = slice(0, 2000)
        tracker = OnlineHeadroom(q0=initial_headroom(base[calib], actual[calib], scale[calib], 0.01), eta=0.01)
        alloc, _ = tracker.run(base, scale, actual)
        later = slice(2000, None)
        results[name] = (float(np.mean(actual[later] > alloc[later])),
                         float(np.mean(np.maximum(alloc[later] - actual[later], 0.0))))
    (miss_w, over_w), (miss_m, over_m) = results["base"], results["mixed"]
    assert abs(miss_w - 0.01) < 0.004 and abs(miss_m - 0.01) < 0.004, results
    assert over_m < 0.85 * over_w, results
