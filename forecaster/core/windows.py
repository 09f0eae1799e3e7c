"""Sliding windows, the chronological split and normalization."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def make_windows(values: np.ndarray, window: int, target_col: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Windows ``[N, window, F]`` of consecutive rows and the next row's target ``[N]``.

    Window i covers rows i .. i+window-1 and predicts row i+window.
    """
    values = np.asarray(values, dtype=np.float32)
    if values.ndim != 2:
        raise ValueError(f"values must be 2-D [time, features], got shape {values.shape}")
    n = values.shape[0] - window
    if n <= 0:
        raise ValueError(f"need more than {window} rows to make windows, got {values.shape[0]}")
    view = np.lib.stride_tricks.sliding_window_view(values, window, axis=0)  # [n+1, F, window]
    x = np.ascontiguousarray(view[:n].transpose(0, 2, 1))
    y = values[window:, target_col].copy()
    return x, y


@dataclass(frozen=True)
class Split:
    """Index ranges into the window arrays: fit / validation / test, in time order.

    The paper's protocol: the first ``train_fraction`` of windows is training, the rest is
    test. The last ``val_fraction`` of training is held out for early stopping and for
    calibrating the SLA headroom.
    """

    fit: slice
    val: slice
    test: slice

    @property
    def train(self) -> slice:
        return slice(self.fit.start, self.val.stop)


def chronological_split(n: int, train_fraction: float = 0.8, val_fraction: float = 0.2) -> Split:
    if not 0 < train_fraction < 1 or not 0 < val_fraction < 1:
        raise ValueError("train_fraction and val_fraction must lie in (0, 1)")
    n_train = int(n * train_fraction)
    n_val = int(n_train * val_fraction)
    if n_train - n_val < 1 or n - n_train < 1 or n_val < 1:
        raise ValueError(f"{n} windows are too few for a {train_fraction:.0%} split with validation")
    return Split(fit=slice(0, n_train - n_val), val=slice(n_train - n_val, n_train),
                 test=slice(n_train, n))


@dataclass(frozen=True)
class Normalizer:
    """Per-feature z-score, fitted on the training rows only."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, rows: np.ndarray) -> Normalizer:
        rows = np.asarray(rows, dtype=np.float64).reshape(-1, np.shape(rows)[-1])
        std = rows.std(axis=0)
        std = np.where(std > 0, std, 1.0)
        return cls(mean=rows.mean(axis=0).astype(np.float32), std=std.astype(np.float32))

    def transform(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, dtype=np.float32) - self.mean) / self.std).astype(np.float32)

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std]}

    @classmethod
    def from_dict(cls, d: dict[str, list[float]]) -> Normalizer:
        return cls(mean=np.asarray(d["mean"], dtype=np.float32), std=np.asarray(d["std"], dtype=np.float32))
