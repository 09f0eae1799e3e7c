"""Interval and summary metrics against values worked out by hand."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from forecaster.core.metrics import (
    SUMMARY_KEYS,
    MetricAccumulator,
    interval_metrics,
    mae,
    rmse,
    summarize,
)

# Six intervals covering every case. Per interval (a = actual, A = allocation, negative A -> 0):
#   a    A     eff   waste util  over under amount |A-a|
#   50   100   0.5   0.5   0.5   50   no    0      50
#   100  80    1     0     1.25  0    yes   20     20
#   0    20    0     1     0     20   no    0      20     (actual 0, allocation > 0)
#   0    0     1     0     1     0    no    0      0      (nothing needed, nothing given)
#   30   0     1     0     NaN   0    yes   30     30     (allocation 0, actual > 0)
#   80   -10   1     0     NaN   0    yes   80     80     (negative allocation counts as 0)
ACTUAL = [50.0, 100.0, 0.0, 0.0, 30.0, 80.0]
ALLOCATED = [100.0, 80.0, 20.0, 0.0, 0.0, -10.0]


def test_interval_metrics_by_hand():
    m = interval_metrics(np.array(ACTUAL), np.array(ALLOCATED))
    np.testing.assert_array_equal(m.efficiency, [0.5, 1.0, 0.0, 1.0, 1.0, 1.0])
    np.testing.assert_array_equal(m.wastage, [0.5, 0.0, 1.0, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(m.utilization, [0.5, 1.25, 0.0, 1.0, np.nan, np.nan])
    np.testing.assert_array_equal(m.overprovisioning, [50.0, 0.0, 20.0, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(m.underprovisioned, [False, True, False, False, True, True])
    np.testing.assert_array_equal(m.underprovisioned_amount, [0.0, 20.0, 0.0, 0.0, 30.0, 80.0])
    np.testing.assert_array_equal(m.abs_error, [50.0, 20.0, 20.0, 0.0, 30.0, 80.0])


def test_summarize_by_hand():
    s = summarize(np.array(ACTUAL), np.array(ALLOCATED))
    assert list(s) == list(SUMMARY_KEYS)
    assert s == {
        "mae": pytest.approx(200.0 / 6),  # (50+20+20+0+30+80)/6 = 33.333...
        # sqrt((2500+400+400+0+900+6400)/6) = sqrt(10600/6) = sqrt(1766.67) = 42.0317...
        "rmse": pytest.approx(math.sqrt(10600.0 / 6)),
        "efficiency_mean": pytest.approx(0.75),  # (0.5+1+0+1+1+1)/6 = 4.5/6
        "efficiency_median": pytest.approx(1.0),  # sorted 0, 0.5, 1, 1, 1, 1 -> (1+1)/2
        "wastage_mean": pytest.approx(0.25),  # (0.5+1)/6
        "utilization_mean": pytest.approx(0.6875),  # NaNs left out: (0.5+1.25+0+1)/4 = 2.75/4
        "overprovisioning_mean": pytest.approx(70.0 / 6),  # (50+20)/6 = 11.667
        "underprovisioning_rate": pytest.approx(0.5),  # 3 of 6
        "underprovisioned_amount_mean": pytest.approx(130.0 / 6),  # (20+30+80)/6 = 21.667
        "n": 6,
    }
    assert isinstance(s["n"], int)


def test_rmse_value_is_42_03():
    # sqrt(1766.666...) = 42.03173...: 42.0317^2 = 1766.664, 42.0318^2 = 1766.672
    assert summarize(np.array(ACTUAL), np.array(ALLOCATED))["rmse"] == pytest.approx(42.0317, abs=1e-4)


@pytest.mark.parametrize(
    ("actual", "allocated", "eff", "waste", "util", "under"),
    [
        (0.0, 10.0, 0.0, 1.0, 0.0, False),  # actual 0, allocation > 0: all capacity wasted
        (0.0, 0.0, 1.0, 0.0, 1.0, False),  # allocation 0, actual 0
        (5.0, 0.0, 1.0, 0.0, math.nan, True),  # allocation 0, actual > 0: utilization undefined
        (5.0, -3.0, 1.0, 0.0, math.nan, True),  # negative allocation is 0
        (0.0, -3.0, 1.0, 0.0, 1.0, False),  # negative allocation, actual 0: same as 0 / 0
        (10.0, 40.0, 0.25, 0.75, 0.25, False),  # 10/40; (40-10)/40
        (40.0, 10.0, 1.0, 0.0, 4.0, True),  # min(4, 1); max(-3, 0); 40/10
    ],
)
def test_single_interval_cases(actual, allocated, eff, waste, util, under):
    m = interval_metrics(np.array([actual]), np.array([allocated]))
    assert m.efficiency[0] == eff
    assert m.wastage[0] == waste
    if math.isnan(util):
        assert math.isnan(m.utilization[0])
    else:
        assert m.utilization[0] == util
    assert bool(m.underprovisioned[0]) is under
    assert m.overprovisioning[0] == max(max(allocated, 0.0) - actual, 0.0)
    assert m.underprovisioned_amount[0] == max(actual - max(allocated, 0.0), 0.0)


def test_utilization_nan_excluded_from_mean():
    # Intervals: (a=10, A=20) util 0.5; (a=5, A=0) util NaN. Mean over defined ones = 0.5.
    s = summarize(np.array([10.0, 5.0]), np.array([20.0, 0.0]))
    assert s["utilization_mean"] == pytest.approx(0.5)
    assert s["efficiency_mean"] == pytest.approx(0.75)  # (0.5 + 1) / 2
    assert s["underprovisioning_rate"] == pytest.approx(0.5)
    assert s["underprovisioned_amount_mean"] == pytest.approx(2.5)  # (0 + 5) / 2


def test_all_utilization_undefined_gives_nan():
    s = summarize(np.array([1.0, 2.0]), np.array([0.0, 0.0]))
    assert math.isnan(s["utilization_mean"])
    assert s["underprovisioning_rate"] == 1.0


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        interval_metrics(np.zeros(3), np.zeros(4))


def test_mae_rmse_by_hand():
    actual = [1.0, 2.0, 3.0, 4.0]
    predicted = [2.0, 2.0, 1.0, 8.0]  # errors +1, 0, -2, +4
    assert mae(actual, predicted) == pytest.approx(1.75)  # (1+0+2+4)/4 = 7/4
    assert rmse(actual, predicted) == pytest.approx(math.sqrt(5.25))  # (1+0+4+16)/4 = 21/4
    assert rmse(actual, predicted) == pytest.approx(2.2913, abs=1e-4)
    assert mae(actual, actual) == 0.0
    assert rmse(actual, actual) == 0.0
    # Symmetric in its arguments.
    assert mae(predicted, actual) == mae(actual, predicted)
    assert rmse(predicted, actual) == rmse(actual, predicted)


def test_rmse_at_least_mae():
    rng = np.random.default_rng(3)
    a, p = rng.uniform(0, 100, 50), rng.uniform(0, 100, 50)
    assert rmse(a, p) >= mae(a, p)


def test_summarize_keys():
    assert SUMMARY_KEYS == (
        "mae", "rmse", "efficiency_mean", "efficiency_median", "wastage_mean", "utilization_mean",
        "overprovisioning_mean", "underprovisioning_rate", "underprovisioned_amount_mean", "n",
    )
    assert tuple(summarize(np.array([1.0]), np.array([2.0]))) == SUMMARY_KEYS


def test_summarize_empty():
    s = summarize(np.zeros(0), np.zeros(0))
    assert s["n"] == 0
    assert all(math.isnan(s[k]) for k in SUMMARY_KEYS if k != "n")


def _random_case(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    actual = rng.uniform(0, 1000, n)
    actual[rng.choice(n, 20, replace=False)] = 0.0  # outages
    allocated = actual + rng.normal(0, 50, n)  # some negative, some below actual
    allocated[rng.choice(n, 20, replace=False)] = 0.0
    return actual, allocated


def test_accumulator_in_chunks_equals_summarize():
    actual, allocated = _random_case(0, 1000)
    whole = summarize(actual, allocated)
    acc = MetricAccumulator()
    bounds = [0, 1, 8, 8, 108, 500, 999, 1000]  # includes an empty chunk and single intervals
    for lo, hi in itertools.pairwise(bounds):
        acc.add(actual[lo:hi], allocated[lo:hi])
    chunked = acc.summary()
    assert chunked["n"] == whole["n"] == 1000
    for key in SUMMARY_KEYS:
        if key in ("n", "efficiency_median"):
            continue
        assert abs(chunked[key] - whole[key]) <= 1e-12 * max(1.0, abs(whole[key])), key
    # A running accumulator cannot give a median; it says so with NaN.
    assert math.isnan(chunked["efficiency_median"])
    assert list(chunked) == list(SUMMARY_KEYS)


def test_accumulator_scalars_and_last():
    acc = MetricAccumulator()
    acc.add(50.0, 100.0)  # scalars are one interval each
    acc.add(0.0, 20.0)
    assert acc.n == 2
    assert acc.last == {"efficiency": 0.0, "wastage": 1.0, "utilization": 0.0, "overprovisioning": 20.0}
    s = acc.summary()
    assert s["efficiency_mean"] == pytest.approx(0.25)  # (0.5 + 0) / 2
    assert s["overprovisioning_mean"] == pytest.approx(35.0)  # (50 + 20) / 2


def test_accumulator_empty_summary():
    acc = MetricAccumulator()
    acc.add(np.zeros(0), np.zeros(0))
    s = acc.summary()
    assert s["n"] == 0
    assert math.isnan(s["mae"])
    assert acc.last == {}
