"""The dataset loader on the real files and on broken copies: every malformation is a
DatasetError whose message names the file (and the line, where there is one)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from forecaster import KPI_NAMES, STEP_SECONDS
from forecaster.data import (
    DEFAULT_SERIES,
    DatasetError,
    load_site,
    load_site_by_id,
    load_sites,
    parse_series_arg,
    parse_site_ids,
    resolve_data_dir,
    site_series,
)

# Lines per series in the broken copy (conftest.COPY_LINES).
COPY_LINES = 300


def series_file(root: Path, sid: str) -> Path:
    return root / "data_series" / f"{sid}.txt"


def set_line(path: Path, lineno: int, text: str) -> None:
    """Replace line ``lineno`` (1-based) of ``path`` with ``text``."""
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[lineno - 1] = text
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def load_error(root: Path) -> str:
    with pytest.raises(DatasetError) as info:
        load_site(root)
    return str(info.value)


# --- the real files -------------------------------------------------------------------------


def test_real_site_shape_and_values(real_site, data_dir):
    assert real_site.values.shape == (10738, 4)
    assert real_site.values.dtype == np.float32
    assert real_site.timestamps.dtype == np.int64
    assert real_site.timestamps.shape == (10738,)
    assert real_site.timestamps[0] == 0
    assert real_site.timestamps[-1] == 3221100  # 10737 * 300
    assert np.all(np.diff(real_site.timestamps) == 300)
    assert real_site.step_seconds == STEP_SECONDS == 300
    assert real_site.values.min() >= 0.0
    assert real_site.values.max() <= 1000.0
    assert real_site.name == "s1-s11-s31-s41"
    assert str(data_dir) in real_site.source
    # Column order is internet, sessions, vpn, downstream: first lines of s1, s11, s31, s41.
    np.testing.assert_allclose(real_site.values[0], [309.634, 974.081, 297.694, 306.335], rtol=1e-6)
    np.testing.assert_allclose(real_site.values[-1], [199.748, 952.274, 507.902, 188.179], rtol=1e-6)
    np.testing.assert_array_equal(real_site.internet, real_site.values[:, 0])


def test_site_slice(real_site):
    part = real_site.slice(100, 400)
    assert part.values.shape == (300, 4)
    assert part.timestamps[0] == 100 * 300
    np.testing.assert_array_equal(part.values, real_site.values[100:400])


def test_custom_name(broken_copy):
    assert load_site(broken_copy, name="site-a").name == "site-a"


def test_txt_ok_naming_accepted(broken_copy):
    before = load_site(broken_copy)
    for sid in DEFAULT_SERIES:
        path = series_file(broken_copy, sid)
        path.rename(path.with_name(path.name + ".ok"))
    after = load_site(broken_copy)
    assert after.values.shape == (COPY_LINES, 4)
    np.testing.assert_array_equal(after.values, before.values)
    np.testing.assert_array_equal(after.timestamps, before.timestamps)


def test_blank_lines_are_skipped(broken_copy):
    path = series_file(broken_copy, "s31")
    path.write_text("\n" + path.read_text(encoding="utf-8") + "\n\n", encoding="utf-8")
    assert load_site(broken_copy).values.shape == (COPY_LINES, 4)


# --- one test per malformation --------------------------------------------------------------


def test_missing_series_file(broken_copy):
    path = series_file(broken_copy, "s31")
    path.unlink()
    msg = load_error(broken_copy)
    assert "'s31'" in msg
    assert str(path) in msg


def test_missing_folder(tmp_path):
    missing = tmp_path / "no-such-dataset"
    msg = load_error(missing)
    assert str(missing) in msg
    assert "does not exist" in msg


def test_wrong_column_count(broken_copy):
    path = series_file(broken_copy, "s11")
    set_line(path, 57, "16800 1.5 2.5")
    msg = load_error(broken_copy)
    assert f"{path}:57:" in msg
    assert "2 columns" in msg


def test_single_column(broken_copy):
    path = series_file(broken_copy, "s1")
    set_line(path, 3, "600")
    assert f"{path}:3:" in load_error(broken_copy)


def test_non_numeric_value(broken_copy):
    path = series_file(broken_copy, "s41")
    set_line(path, 120, "35700 abc")
    msg = load_error(broken_copy)
    assert f"{path}:120:" in msg
    assert "non-numeric" in msg


def test_nan_value(broken_copy):
    path = series_file(broken_copy, "s1")
    set_line(path, 10, "2700 nan")
    msg = load_error(broken_copy)
    assert f"{path}:10:" in msg
    assert "NaN" in msg


def test_infinite_value(broken_copy):
    path = series_file(broken_copy, "s31")
    set_line(path, 11, "3000 inf")
    assert f"{path}:11:" in load_error(broken_copy)


def test_non_monotonic_timestamp(broken_copy):
    path = series_file(broken_copy, "s31")
    set_line(path, 200, "59400 12.0")  # the previous line's timestamp (line 199: 198 * 300)
    msg = load_error(broken_copy)
    assert f"{path}:200:" in msg
    assert "does not increase" in msg


def test_decreasing_timestamp(broken_copy):
    path = series_file(broken_copy, "s11")
    set_line(path, 5, "0 12.0")
    msg = load_error(broken_copy)
    assert f"{path}:5:" in msg
    assert "does not increase" in msg


def test_irregular_timestamp(broken_copy):
    path = series_file(broken_copy, "s1")
    set_line(path, 42, "12301 100.0")  # expected 41 * 300 = 12300
    msg = load_error(broken_copy)
    assert f"{path}:42:" in msg
    assert "irregular" in msg
    assert "12300" in msg


def test_fractional_timestamp(broken_copy):
    path = series_file(broken_copy, "s41")
    set_line(path, 2, "300.5 100.0")
    assert f"{path}:2:" in load_error(broken_copy)


def test_series_of_different_lengths(broken_copy):
    path = series_file(broken_copy, "s41")
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text("".join(lines[:-1]), encoding="utf-8")
    msg = load_error(broken_copy)
    assert str(path) in msg
    assert str(series_file(broken_copy, "s1")) in msg
    assert f"{COPY_LINES - 1} samples" in msg
    assert f"has {COPY_LINES}" in msg


def test_mismatched_timestamps_between_series(broken_copy):
    # s11 is regular on its own, but starts one step later than s1.
    path = series_file(broken_copy, "s11")
    lines = path.read_text(encoding="utf-8").splitlines()
    shifted = [f"{int(t) + 300} {v}" for t, v in (line.split() for line in lines)]
    path.write_text("\n".join(shifted) + "\n", encoding="utf-8")
    msg = load_error(broken_copy)
    assert str(path) in msg
    assert str(series_file(broken_copy, "s1")) in msg
    assert "sample 1 " in msg
    assert "timestamp 300" in msg


def test_info_file_wrong_kpi_type(broken_copy):
    info = broken_copy / "data_series_info.txt"
    set_line(info, 31, "s31 sessions")
    msg = load_error(broken_copy)
    assert str(info) in msg
    assert "s31" in msg
    assert "'sessions'" in msg
    assert "'vpn'" in msg


def test_info_file_malformed_line(broken_copy):
    info = broken_copy / "data_series_info.txt"
    set_line(info, 7, "s7")
    msg = load_error(broken_copy)
    assert f"{info}:7:" in msg


def test_empty_series_file(broken_copy):
    path = series_file(broken_copy, "s11")
    path.write_text("\n", encoding="utf-8")
    msg = load_error(broken_copy)
    assert str(path) in msg
    assert "no samples" in msg


def test_wrong_number_of_series(broken_copy):
    with pytest.raises(DatasetError, match=re.escape("needs 4 series")):
        load_site(broken_copy, ("s1", "s11", "s31"))


def test_dataset_error_is_value_error():
    assert issubclass(DatasetError, ValueError)


# --- series arguments -----------------------------------------------------------------------


def test_site_series():
    assert site_series(1) == ("s1", "s11", "s31", "s41")
    assert site_series(10) == ("s10", "s20", "s40", "s50")
    assert site_series(1) == DEFAULT_SERIES


@pytest.mark.parametrize("index", [0, 11, -1])
def test_site_series_out_of_range(index):
    with pytest.raises(ValueError, match=r"1\.\.10"):
        site_series(index)


def test_parse_series_arg():
    assert parse_series_arg("s1,s11,s31,s41") == ("s1", "s11", "s31", "s41")
    assert parse_series_arg(" s2 , s12,s32 ,s42, ") == ("s2", "s12", "s32", "s42")


@pytest.mark.parametrize("text", ["", "s1", "s1,s11,s31", "s1,s11,s31,s41,s2", ",,,"])
def test_parse_series_arg_errors(text):
    with pytest.raises(ValueError, match="needs 4 ids") as info:
        parse_series_arg(text)
    assert repr(text) in str(info.value)
    for kpi in KPI_NAMES:
        assert kpi in str(info.value)


def test_resolve_data_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("DTWIN_DATA", raising=False)
    assert resolve_data_dir(None) is None
    assert resolve_data_dir(tmp_path) == tmp_path
    monkeypatch.setenv("DTWIN_DATA", str(tmp_path / "env"))
    assert resolve_data_dir(None) == tmp_path / "env"
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"  # the argument wins


# --- sites by number ------------------------------------------------------------------------


def test_load_site_by_id(data_dir, real_site):
    site = load_site_by_id(data_dir, 1)
    assert site.name == "1"
    np.testing.assert_array_equal(site.values, real_site.values)
    np.testing.assert_array_equal(site.timestamps, real_site.timestamps)


def test_load_sites(data_dir):
    sites = load_sites(data_dir, [5, 4])
    assert [s.name for s in sites] == ["5", "4"]
    assert all(s.values.shape == (10738, 4) for s in sites)
    assert "s45" in sites[0].source and "s14" in sites[1].source
    assert not np.array_equal(sites[0].values, sites[1].values)
    with pytest.raises(ValueError, match="at least one"):
        load_sites(data_dir, [])


def test_load_site_by_id_missing_site(broken_copy):
    with pytest.raises(DatasetError, match="'s4'"):
        load_site_by_id(broken_copy, 4)


def test_parse_site_ids():
    assert parse_site_ids("1,4,5") == (1, 4, 5)
    assert parse_site_ids(" 5 , 1,") == (5, 1)
    assert parse_site_ids("10") == (10,)


@pytest.mark.parametrize(("text", "message"), [
    ("", "expected site numbers"), (" , ", "expected site numbers"), ("1,x", "'x' in '1,x' is not a site number"),
    ("s1", "'s1' in 's1' is not a site number"), ("0,4", "0 in '0,4' is out of range"),
    ("1,11", "11 in '1,11' is out of range"), ("1,4,1", "1 appears twice"), ("1.5", "not a site number"),
])
def test_parse_site_ids_errors(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_site_ids(text)
