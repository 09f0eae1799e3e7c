"""Loader for the "Network operator KPIs time series dataset" (Zenodo record 8147768).

Layout (the archive's own)::

    data_series_info.txt    "<series id> <kpi type>" per line
    data_series/sN.txt      "<timestamp_seconds> <value>" per line (also sN.txt.ok)
    data_real_info.txt      the same for the series with labelled real anomalies
    data_real/rN.txt

A *site* is one series of each KPI type, aligned on timestamp, in the order
internet, sessions, vpn, downstream.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from forecaster import KPI_NAMES, STEP_SECONDS

DEFAULT_SERIES: tuple[str, ...] = ("s1", "s11", "s31", "s41")
DATA_ENV = "DTWIN_DATA"


class DatasetError(ValueError):
    """The dataset is missing or malformed; the message names the file and line."""


@dataclass(frozen=True)
class Site:
    name: str
    timestamps: np.ndarray  # int64 [T], seconds
    values: np.ndarray  # float32 [T, 4] in KPI_NAMES order
    source: str
    step_seconds: int = STEP_SECONDS

    @property
    def internet(self) -> np.ndarray:
        return self.values[:, 0]

    def slice(self, start: int, stop: int | None = None) -> Site:
        return Site(self.name, self.timestamps[start:stop], self.values[start:stop], self.source,
                    self.step_seconds)


def site_series(index: int) -> tuple[str, ...]:
    """The archive's site ``index`` (1..10): s{i}, s{10+i}, s{30+i}, s{40+i}."""
    if not 1 <= index <= 10:
        raise ValueError(f"site index must be 1..10, got {index}")
    return (f"s{index}", f"s{10 + index}", f"s{30 + index}", f"s{40 + index}")


def parse_site_ids(text: str) -> tuple[int, ...]:
    """``"1,4,5"`` → ``(1, 4, 5)``: distinct site numbers of the archive, 1..10, in the given order."""
    parts = [part.strip() for part in text.split(",")]
    if not any(parts):
        raise ValueError(f"site ids: expected site numbers like 1,4,5, got {text!r}")
    ids: list[int] = []
    for part in parts:
        if not part:
            continue
        try:
            i = int(part)
        except ValueError:
            raise ValueError(f"site ids: {part!r} in {text!r} is not a site number (expected e.g. 1,4,5)") from None
        if not 1 <= i <= 10:
            raise ValueError(f"site ids: {i} in {text!r} is out of range; the archive's sites are 1..10")
        if i in ids:
            raise ValueError(f"site ids: {i} appears twice in {text!r}")
        ids.append(i)
    return tuple(ids)


def parse_series_arg(text: str) -> tuple[str, ...]:
    ids = tuple(part.strip() for part in text.split(",") if part.strip())
    if len(ids) != len(KPI_NAMES):
        raise ValueError(f"--series needs {len(KPI_NAMES)} ids ({','.join(KPI_NAMES)}), got {text!r}")
    return ids


def resolve_data_dir(data: str | os.PathLike | None) -> Path | None:
    chosen = data if data is not None else os.environ.get(DATA_ENV) or None
    return Path(chosen) if chosen is not None else None


def read_info(path: Path) -> dict[str, str]:
    """``<series id> <kpi type>`` lines → {id: type}."""
    info: dict[str, str] = {}
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise DatasetError(f"{path}:{lineno}: expected '<series id> <kpi type>', got {line.rstrip()!r}")
            info[parts[0]] = parts[1]
    return info


def series_path(data_dir: Path, series_id: str) -> Path:
    folder = data_dir / ("data_real" if series_id.startswith("r") else "data_series")
    for name in (f"{series_id}.txt", f"{series_id}.txt.ok"):
        if (folder / name).is_file():
            return folder / name
    raise DatasetError(f"series {series_id!r} not found: no {folder / (series_id + '.txt')} "
                       f"or {folder / (series_id + '.txt.ok')}")


def read_series(path: Path, step_seconds: int = STEP_SECONDS) -> tuple[np.ndarray, np.ndarray]:
    """One series file → (timestamps int64, values float64), validated line by line."""
    ts: list[int] = []
    vals: list[float] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise DatasetError(f"{path}:{lineno}: expected 2 columns '<timestamp> <value>', "
                                   f"got {len(parts)}: {line.rstrip()!r}")
            try:
                t = float(parts[0])
                v = float(parts[1])
            except ValueError:
                raise DatasetError(f"{path}:{lineno}: non-numeric field in {line.rstrip()!r}") from None
            if not math.isfinite(t) or not math.isfinite(v):
                raise DatasetError(f"{path}:{lineno}: NaN or infinite value in {line.rstrip()!r}")
            if t != int(t):
                raise DatasetError(f"{path}:{lineno}: timestamp {parts[0]} is not whole seconds")
            t_int = int(t)
            if ts:
                if t_int <= ts[-1]:
                    raise DatasetError(f"{path}:{lineno}: timestamp {t_int} does not increase "
                                       f"(previous {ts[-1]})")
                if t_int - ts[-1] != step_seconds:
                    raise DatasetError(f"{path}:{lineno}: irregular timestamp {t_int}: expected "
                                       f"{ts[-1] + step_seconds} (step {step_seconds} s)")
            ts.append(t_int)
            vals.append(v)
    if not ts:
        raise DatasetError(f"{path}: no samples")
    return np.asarray(ts, dtype=np.int64), np.asarray(vals, dtype=np.float64)


def load_site(data_dir: str | os.PathLike, series: Sequence[str] = DEFAULT_SERIES,
              name: str | None = None, step_seconds: int = STEP_SECONDS) -> Site:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DatasetError(f"dataset folder {data_dir} does not exist")
    series = tuple(series)
    if len(series) != len(KPI_NAMES):
        raise DatasetError(f"a site needs {len(KPI_NAMES)} series ({', '.join(KPI_NAMES)}), got {series}")
    for info_name in ("data_series_info.txt", "data_real_info.txt"):
        info_path = data_dir / info_name
        if not info_path.is_file():
            continue
        info = read_info(info_path)
        for sid, kpi in zip(series, KPI_NAMES, strict=True):
            if sid in info and info[sid] != kpi:
                raise DatasetError(f"{info_path}: series {sid} is {info[sid]!r}, but the site needs "
                                   f"{kpi!r} in that position")
    columns = []
    first_ts: np.ndarray | None = None
    first_path: Path | None = None
    for sid in series:
        path = series_path(data_dir, sid)
        ts, vals = read_series(path, step_seconds)
        if first_ts is None:
            first_ts, first_path = ts, path
        elif len(ts) != len(first_ts):
            raise DatasetError(f"{path}: {len(ts)} samples, but {first_path} has {len(first_ts)}; "
                               "a site's series must have the same length")
        elif not np.array_equal(ts, first_ts):
            bad = int(np.argmax(ts != first_ts))
            raise DatasetError(f"{path}: timestamp {ts[bad]} at sample {bad + 1} does not match "
                               f"{first_path} ({first_ts[bad]})")
        columns.append(vals)
    assert first_ts is not None
    return Site(name=name or "-".join(series), timestamps=first_ts,
                values=np.stack(columns, axis=1).astype(np.float32),
                source=f"{data_dir} [{','.join(series)}]", step_seconds=step_seconds)


def load_site_by_id(data_dir: str | os.PathLike, site_id: int, step_seconds: int = STEP_SECONDS) -> Site:
    """The archive's site ``site_id`` (series :func:`site_series`), named ``str(site_id)``."""
    return load_site(data_dir, site_series(site_id), name=str(site_id), step_seconds=step_seconds)


def load_sites(data_dir: str | os.PathLike, site_ids: Sequence[int], step_seconds: int = STEP_SECONDS) -> list[Site]:
    if not site_ids:
        raise ValueError("load_sites needs at least one site id")
    return [load_site_by_id(data_dir, i, step_seconds) for i in site_ids]
