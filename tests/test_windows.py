"""Sliding windows, the chronological split, normalization and the synthetic generator."""

from __future__ import annotations

import numpy as np
import pytest

from forecaster import STEP_SECONDS, WINDOW
from forecaster.core.windows import Normalizer, Split, chronological_split, make_windows
from forecaster.synthetic import generate_site, generate_sites

# --- make_windows ---------------------------------------------------------------------------


def test_make_windows_shapes_and_content():
    values = np.arange(30 * 4, dtype=np.float64).reshape(30, 4)
    x, y = make_windows(values, 10)
    assert x.shape == (20, 10, 4)
    assert y.shape == (20,)
    assert x.dtype == np.float32 and y.dtype == np.float32
    for i in range(20):
        np.testing.assert_array_equal(x[i], values[i:i + 10])  # rows i .. i+9
        assert y[i] == values[i + 10, 0]  # target: row i+10, internet column
    assert x.flags["C_CONTIGUOUS"]


def test_make_windows_target_column():
    values = np.arange(15 * 4, dtype=np.float32).reshape(15, 4)
    _, y = make_windows(values, 10, target_col=2)
    np.testing.assert_array_equal(y, values[10:, 2])


def test_make_windows_does_not_alias_input():
    values = np.ones((12, 4), dtype=np.float32)
    x, y = make_windows(values, 10)
    values[:] = 5.0
    assert np.all(x == 1.0) and np.all(y == 1.0)


def test_make_windows_minimum_rows():
    x, y = make_windows(np.zeros((11, 4)), 10)  # 11 rows: exactly one window
    assert x.shape == (1, 10, 4) and y.shape == (1,)
    with pytest.raises(ValueError, match="more than 10 rows"):
        make_windows(np.zeros((10, 4)), 10)


def test_make_windows_needs_2d():
    with pytest.raises(ValueError, match="2-D"):
        make_windows(np.zeros(30), 10)


def test_real_data_windows(real_site):
    x, y = make_windows(real_site.values, WINDOW)
    assert x.shape == (10728, 10, 4)
    np.testing.assert_array_equal(x[-1], real_site.values[-11:-1])
    assert y[-1] == real_site.values[-1, 0]


# --- chronological_split --------------------------------------------------------------------


def test_chronological_split_paper_sizes():
    split = chronological_split(10728)
    # n_train = int(10728 * 0.8) = 8582; n_val = int(8582 * 0.2) = 1716; fit = 8582 - 1716 = 6866
    assert split == Split(fit=slice(0, 6866), val=slice(6866, 8582), test=slice(8582, 10728))
    sizes = [s.stop - s.start for s in (split.fit, split.val, split.test)]
    assert sizes == [6866, 1716, 2146]
    assert split.train == slice(0, 8582)


def test_chronological_split_is_contiguous():
    for n in (10, 57, 1490, 10000):
        s = chronological_split(n, 0.7, 0.25)
        assert s.fit.start == 0 and s.fit.stop == s.val.start
        assert s.val.stop == s.test.start and s.test.stop == n


@pytest.mark.parametrize(("train", "val"), [(0.0, 0.2), (1.0, 0.2), (0.8, 0.0), (0.8, 1.0), (-0.1, 0.2)])
def test_chronological_split_bad_fractions(train, val):
    with pytest.raises(ValueError, match="fraction"):
        chronological_split(1000, train, val)


def test_chronological_split_too_few():
    with pytest.raises(ValueError, match="too few"):
        chronological_split(4)  # n_train 3, n_val 0


# --- Normalizer -----------------------------------------------------------------------------


def test_normalizer_fits_only_given_rows():
    rng = np.random.default_rng(0)
    rows = rng.normal(5.0, 2.0, (1000, 4))
    norm = Normalizer.fit(rows[:600])
    np.testing.assert_allclose(norm.mean, rows[:600].mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(norm.std, rows[:600].std(axis=0), rtol=1e-6)
    # The rest does not matter: changing it leaves the fit unchanged.
    changed = rows.copy()
    changed[600:] = 1e6
    again = Normalizer.fit(changed[:600])
    np.testing.assert_array_equal(again.mean, norm.mean)
    np.testing.assert_array_equal(again.std, norm.std)


def test_normalizer_by_hand():
    norm = Normalizer.fit(np.array([[1.0, 10.0], [3.0, 10.0]]))
    np.testing.assert_array_equal(norm.mean, [2.0, 10.0])
    np.testing.assert_array_equal(norm.std, [1.0, 1.0])  # a constant column gets std 1, not 0
    np.testing.assert_array_equal(norm.transform(np.array([[5.0, 12.0]])), [[3.0, 2.0]])


def test_normalizer_accepts_windows_and_roundtrips():
    x = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    norm = Normalizer.fit(x)
    np.testing.assert_allclose(norm.mean, x.reshape(-1, 4).mean(axis=0))
    back = Normalizer.from_dict(norm.to_dict())
    np.testing.assert_array_equal(back.mean, norm.mean)
    np.testing.assert_array_equal(back.std, norm.std)
    z = norm.transform(x)
    assert z.shape == x.shape and z.dtype == np.float32


def test_prepare_normalizer_sees_training_rows_only(real_site):
    from forecaster.train import prepare

    prep = prepare(real_site)
    # Training windows 0..8581 read rows 0..8591 (the last target is row 8581 + 10).
    train_rows = real_site.values[: 8582 + 10].astype(np.float64)
    np.testing.assert_allclose(prep.normalizer.mean, train_rows.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(prep.normalizer.std, train_rows.std(axis=0), rtol=1e-5)
    all_rows = real_site.values.astype(np.float64)
    assert not np.allclose(prep.normalizer.mean, all_rows.mean(axis=0), rtol=1e-5)


# --- synthetic generator --------------------------------------------------------------------


def test_synthetic_is_seeded():
    a = generate_site(3, n_steps=3000, seed=7)
    b = generate_site(3, n_steps=3000, seed=7)
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(a.timestamps, b.timestamps)
    assert a.source == b.source == "synthetic(seed=7, index=3)"
    assert not np.array_equal(a.values, generate_site(3, n_steps=3000, seed=8).values)
    assert not np.array_equal(a.values, generate_site(4, n_steps=3000, seed=7).values)


def test_synthetic_shape_range_and_outages():
    site = generate_site(0, n_steps=3000, start_ts=600)
    assert site.values.shape == (3000, 4)
    assert site.values.dtype == np.float32
    assert site.name == "synthetic-0"
    assert site.timestamps[0] == 600
    assert np.all(np.diff(site.timestamps) == STEP_SECONDS)
    assert site.values.min() >= 0.0 and site.values.max() <= 1000.0
    assert np.isfinite(site.values).all()
    # Outages: rows where every KPI is exactly 0.
    assert np.any(np.all(site.values == 0.0, axis=1))
    # Otherwise traffic: mostly non-zero demand.
    assert np.mean(site.internet > 0) > 0.95


def test_synthetic_default_length_matches_dataset():
    assert generate_site(1).values.shape == (10738, 4)


def test_generate_sites():
    sites = generate_sites(3, n_steps=500, seed=2)
    assert [s.name for s in sites] == ["synthetic-0", "synthetic-1", "synthetic-2"]
    np.testing.assert_array_equal(sites[1].values, generate_site(1, n_steps=500, seed=2).values)
