"""A site's windows, split, normalization and training statistics (numpy only, no torch)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from forecaster import WINDOW
from forecaster.core.allocators import TrainingStats
from forecaster.core.windows import Normalizer, Split, chronological_split, make_windows
from forecaster.data import Site


@dataclass(frozen=True)
class Prepared:
    """A site's windows, split and training statistics: everything training and evaluation share."""

    site: Site
    x: np.ndarray
    y: np.ndarray
    split: Split
    normalizer: Normalizer
    stats: TrainingStats
    window: int

    @property
    def last(self) -> np.ndarray:
        return self.x[:, -1, 0]


def prepare(site: Site, window: int = WINDOW, train_fraction: float = 0.8,
            val_fraction: float = 0.2) -> Prepared:
    x, y = make_windows(site.values, window)
    split = chronological_split(len(y), train_fraction, val_fraction)
    # Rows seen by the training windows only: their inputs and their targets.
    train_rows = site.values[: split.train.stop + window]
    return Prepared(site=site, x=x, y=y, split=split, normalizer=Normalizer.fit(train_rows),
                    stats=TrainingStats.of(y[split.train]), window=window)
