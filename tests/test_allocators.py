"""Allocators: the paper's baselines on the real data, SLA headroom calibration, bounds."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from forecaster.core.allocators import (
    CALIBRATION_TARGETS,
    DEFAULT_CONFIDENCE_Z,
    Allocator,
    Headroom,
    TrainingStats,
    allowed_misses,
    b1,
    b2,
    calibrate_headroom,
    forecast_policy,
    persistence,
    wilson_upper,
)
from forecaster.core.metrics import summarize


@pytest.fixture(scope="module")
def prep(real_site):
    from forecaster.train import prepare

    return prepare(real_site)


def under_rate(actual: np.ndarray, allocated: np.ndarray) -> float:
    return float(np.mean(np.asarray(actual) > np.asarray(allocated)))


# --- the paper's protocol on the real data --------------------------------------------------


def test_split_of_real_data(prep):
    assert len(prep.y) == 10728
    assert (prep.split.fit, prep.split.val, prep.split.test) == (
        slice(0, 6866), slice(6866, 8582), slice(8582, 10728))


def test_b1_on_real_test_split(prep):
    actual = prep.y[prep.split.test]
    alloc = b1(prep.stats).allocate(prep.last[prep.split.test])
    assert np.all(alloc == pytest.approx(prep.stats.mean + 2 * prep.stats.std))
    s = summarize(actual, alloc)
    assert s["efficiency_median"] == pytest.approx(0.474, abs=0.005)
    assert s["overprovisioning_mean"] == pytest.approx(457, abs=5)
    assert s["n"] == 2146


def test_b2_on_real_test_split(prep):
    actual = prep.y[prep.split.test]
    alloc = b2(prep.stats).allocate(prep.last[prep.split.test])
    assert np.all(alloc == pytest.approx(prep.stats.p95))
    s = summarize(actual, alloc)
    assert s["efficiency_median"] == pytest.approx(0.543, abs=0.005)
    assert s["overprovisioning_mean"] == pytest.approx(354, abs=5)


def test_persistence_on_real_test_split(prep):
    actual = prep.y[prep.split.test]
    alloc = persistence().allocate(prep.last[prep.split.test])
    # Persistence allocates the previous interval's demand: the target of window i-1.
    np.testing.assert_array_equal(alloc[1:], actual[:-1])
    s = summarize(actual, alloc)
    assert s["mae"] == pytest.approx(8.68, abs=0.01)
    assert s["rmse"] == pytest.approx(25.0, abs=0.05)


def test_training_stats_from_train_split_only(prep):
    y_train = prep.y[prep.split.train].astype(np.float64)
    assert prep.stats.n == 8582
    assert prep.stats.mean == pytest.approx(y_train.mean())
    assert prep.stats.std == pytest.approx(y_train.std())
    assert prep.stats.p95 == pytest.approx(np.percentile(y_train, 95))


def test_training_stats_by_hand():
    stats = TrainingStats.of(np.array([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert stats.mean == 3.0
    assert stats.std == pytest.approx(math.sqrt(2.0))  # population std: sqrt((4+1+0+1+4)/5)
    assert stats.b1 == pytest.approx(3.0 + 2.0 * math.sqrt(2.0))  # 5.828
    assert stats.b2 == pytest.approx(4.8)  # linear percentile: rank 0.95*4 = 3.8 -> 4 + 0.8
    assert stats.n == 5


# --- SLA headroom calibration ---------------------------------------------------------------


@pytest.mark.parametrize("z", [DEFAULT_CONFIDENCE_Z, None])
@pytest.mark.parametrize("target", CALIBRATION_TARGETS)
def test_calibration_meets_target_on_calibration_data(prep, target, z):
    last_val, y_val = prep.last[prep.split.val], prep.y[prep.split.val]
    h = calibrate_headroom(last_val, y_val, target, z)
    alloc = persistence("p", h).allocate(last_val)
    misses = int(np.sum(y_val > alloc))
    # Exactly within the budget on the data it was calibrated on, never above the target.
    assert misses <= allowed_misses(len(y_val), target, z)
    assert misses / len(y_val) <= target
    if z is not None and misses:
        assert wilson_upper(misses, len(y_val), z) <= target


@pytest.mark.parametrize("target", [0.01, 0.02, 0.05])
def test_calibration_holds_on_held_out_test(prep, target):
    """Calibrate persistence headroom on validation, check the rate on the later test split.

    The test rate is itself a binomial estimate from n = 2146 intervals, so it may exceed the
    target by sampling noise alone. Tolerance: one-sided 95 % band, 1.645 * sqrt(t(1-t)/n)
    (for t = 0.01: 0.0035). The 0.5 % target is left out: at ~11 expected misses, drift between
    validation and test outweighs the margin (it gives 0.79 % on this data).
    """
    h = calibrate_headroom(prep.last[prep.split.val], prep.y[prep.split.val], target)
    actual = prep.y[prep.split.test]
    rate = under_rate(actual, persistence("p", h).allocate(prep.last[prep.split.test]))
    tolerance = 1.645 * math.sqrt(target * (1 - target) / len(actual))
    assert rate <= target + tolerance
    # And the headroom is worth it: bare persistence misses about half the intervals.
    assert under_rate(actual, persistence().allocate(prep.last[prep.split.test])) > 0.4


def test_calibration_on_synthetic_held_out():
    from forecaster.synthetic import generate_site

    y = generate_site(1, n_steps=6000, seed=5).internet.astype(np.float64)
    last, actual = y[:-1], y[1:]
    h = calibrate_headroom(last[:3000], actual[:3000], 0.02)
    rate = under_rate(actual[3000:], persistence("p", h).allocate(last[3000:]))
    assert rate <= 0.02 + 1.645 * math.sqrt(0.02 * 0.98 / 3000)  # binomial noise, as above


def test_calibration_by_hand():
    # base 0 everywhere, actual 0..99, target 5 %, no confidence bound: 5 misses allowed,
    # so the additive margin is the 6th largest actual, 94 (misses: 95..99). The relative
    # margin multiplies 0 and cannot help; the first grid point (0.0) is kept.
    h = calibrate_headroom(np.zeros(100), np.arange(100.0), 0.05, z=None)
    assert h == Headroom(relative=0.0, additive=94.0, target_rate=0.05)
    alloc = h.apply(np.zeros(100))
    assert int(np.sum(np.arange(100.0) > alloc)) == 5


def test_calibration_picks_relative_margin_when_it_helps():
    # Error proportional to the base: actual = 1.1 * base. With base > 0, relative 0.1 and
    # additive 0 cover every interval with no over-provisioning at all.
    base = np.linspace(10, 500, 200)
    h = calibrate_headroom(base, 1.1 * base, 0.01, z=None)
    assert h.relative == pytest.approx(0.1)
    assert h.additive == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("seed", [118, 246, 7, 42])
@pytest.mark.parametrize("z", [DEFAULT_CONFIDENCE_Z, None])
@pytest.mark.parametrize("target", CALIBRATION_TARGETS)
def test_calibration_budget_exact_under_rounding(seed, z, target):
    """Regression: base*(1+rel) + (actual - base*(1+rel)) can round below actual, which
    used to leave one interval more than the budget under-provisioned (seeds 118, 246)."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(50, 2000))
    base = rng.uniform(0, 1000, n)
    actual = base + rng.normal(0, 30, n) * rng.uniform(0.1, 3)
    h = calibrate_headroom(base, actual, target, z)
    misses = int(np.sum(actual > persistence("p", h).allocate(base)))
    assert misses <= allowed_misses(n, target, z)


def test_calibration_input_errors():
    with pytest.raises(ValueError, match="target_rate"):
        calibrate_headroom(np.ones(5), np.ones(5), 0.0)
    with pytest.raises(ValueError, match="target_rate"):
        calibrate_headroom(np.ones(5), np.ones(5), 1.0)
    with pytest.raises(ValueError, match="matching"):
        calibrate_headroom(np.ones(5), np.ones(4))
    with pytest.raises(ValueError, match="non-empty"):
        calibrate_headroom(np.ones(0), np.ones(0))


def test_headroom_apply_and_roundtrip():
    h = Headroom(relative=0.1, additive=5.0, target_rate=0.01)
    np.testing.assert_allclose(h.apply(np.array([0.0, 100.0])), [5.0, 115.0])  # 100*1.1 + 5
    assert Headroom.from_dict(h.to_dict()) == h


# --- allowed_misses / wilson_upper ----------------------------------------------------------


def test_wilson_upper_by_hand():
    # 0 misses: (z^2/2n + z^2/2n) / (1 + z^2/n) = z^2 / (n + z^2) = 2.706025 / 102.706025
    assert wilson_upper(0, 100, 1.645) == pytest.approx(2.706025 / 102.706025)
    # The textbook 95 % Wilson interval for 10/100 is (0.0552, 0.1744).
    assert wilson_upper(10, 100, 1.96) == pytest.approx(0.1744, abs=1e-4)
    # z = 0 is the point estimate.
    assert wilson_upper(7, 100, 0.0) == pytest.approx(0.07)


def test_wilson_upper_monotone():
    values = [wilson_upper(k, 500, 1.645) for k in range(0, 30)]
    assert all(b > a for a, b in itertools.pairwise(values))
    assert all(v > k / 500 for k, v in enumerate(values))
    # More data at the same rate: a tighter bound.
    assert wilson_upper(10, 1000, 1.645) < wilson_upper(1, 100, 1.645)


def test_allowed_misses_without_confidence():
    assert allowed_misses(100, 0.01, None) == 1
    assert allowed_misses(1716, 0.01, None) == 17  # floor(17.16)
    assert allowed_misses(100, 0.29, None) == 29  # 0.29 * 100 = 28.999999999999996 in floats
    assert allowed_misses(99, 0.01, None) == 0


def test_allowed_misses_with_confidence():
    # wilson_upper(1, 100, 1.645) = 0.0436 <= 0.05 < wilson_upper(2, 100, 1.645) = 0.0587
    assert allowed_misses(100, 0.05, 1.645) == 1
    for n, t in [(1716, 0.01), (2146, 0.02), (500, 0.05)]:
        k = allowed_misses(n, t, 1.645)
        assert k < allowed_misses(n, t, None)  # the confidence bound is stricter
        assert wilson_upper(k, n, 1.645) <= t < wilson_upper(k + 1, n, 1.645)
    # Too few intervals for even 0 misses to meet the bound: the budget is 0, not negative.
    assert allowed_misses(10, 0.01, 1.645) == 0


# --- allocator rules and bounds -------------------------------------------------------------


def test_floor_and_ceiling_clip():
    pol = persistence(floor=50.0, ceiling=500.0)
    np.testing.assert_array_equal(pol.allocate(np.array([10.0, 100.0, 900.0])), [50.0, 100.0, 500.0])
    with_headroom = persistence("h", Headroom(0.1, 5.0, 0.01), floor=50.0, ceiling=500.0)
    # 10*1.1+5 = 16 -> floor 50; 100*1.1+5 = 115; 900*1.1+5 = 995 -> ceiling 500
    np.testing.assert_allclose(with_headroom.allocate(np.array([10.0, 100.0, 900.0])), [50.0, 115.0, 500.0])


def test_default_floor_is_zero():
    pol = forecast_policy("f", Headroom(0.0, -20.0, 0.01))
    np.testing.assert_array_equal(pol.allocate(np.zeros(3), np.array([5.0, 20.0, 30.0])), [0.0, 0.0, 10.0])


def test_ceiling_equal_to_floor_allowed():
    pol = persistence(floor=100.0, ceiling=100.0)
    np.testing.assert_array_equal(pol.allocate(np.array([0.0, 1000.0])), [100.0, 100.0])


def test_ceiling_below_floor_raises():
    with pytest.raises(ValueError, match="below floor"):
        persistence(floor=100.0, ceiling=50.0)
    with pytest.raises(ValueError, match="below floor"):
        Allocator("x", "forecast", floor=10.0, ceiling=9.99)


def test_static_allocator_without_level_raises():
    with pytest.raises(ValueError, match="needs a level"):
        Allocator("s", "static")


def test_static_allocator_ignores_inputs():
    pol = Allocator("s", "static", level=300.0)
    np.testing.assert_array_equal(pol.allocate(np.array([1.0, 999.0, 0.0])), [300.0, 300.0, 300.0])


def test_forecast_allocator_needs_forecast():
    pol = forecast_policy("f")
    with pytest.raises(ValueError, match="needs a forecast"):
        pol.allocate(np.array([1.0]))
    np.testing.assert_array_equal(pol.allocate(np.array([1.0]), np.array([7.0])), [7.0])


def test_describe():
    h = Headroom(0.05, 3.0, 0.01)
    d = persistence("p", h, floor=1.0, ceiling=900.0).describe()
    assert d == {"name": "p", "source": "last", "floor": 1.0, "ceiling": 900.0, "headroom": h.to_dict()}
    assert Allocator("s", "static", level=2.0).describe()["level"] == 2.0
