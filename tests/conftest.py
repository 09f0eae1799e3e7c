"""Shared fixtures: the real dataset (beside the checkout, never inside it) and broken copies."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest_plugins = ["tests.conftest_kafka"]

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_ENV = "DTWIN_TEST_DATA"
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "datasets" / "network-operator-kpis"
SERIES = ("s1", "s11", "s31", "s41")
# Lines of each series that a broken copy keeps: enough for windows, small enough to stay fast.
COPY_LINES = 300


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The network-operator KPI dataset: $DTWIN_TEST_DATA, else ../shared/datasets/... ."""
    chosen = os.environ.get(DATA_ENV)
    path = Path(chosen) if chosen else DEFAULT_DATA
    if not (path / "data_series_info.txt").is_file() or not (path / "data_series").is_dir():
        pytest.fail(
            f"dataset not found at {path} (expected data_series_info.txt and data_series/ there). "
            f"Put the 'network-operator-kpis' dataset at {DEFAULT_DATA} or set {DATA_ENV} "
            "to its folder.",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def real_site(data_dir: Path):
    from forecaster.data import load_site

    return load_site(data_dir)


@pytest.fixture
def broken_copy(tmp_path: Path, data_dir: Path) -> Path:
    """A writable copy of the dataset's layout in tmp_path, with the first COPY_LINES lines of
    s1, s11, s31 and s41 and the full data_series_info.txt. Tests break it as they need."""
    dest = tmp_path / "kpis"
    (dest / "data_series").mkdir(parents=True)
    shutil.copyfile(data_dir / "data_series_info.txt", dest / "data_series_info.txt")
    for sid in SERIES:
        with (data_dir / "data_series" / f"{sid}.txt").open(encoding="utf-8") as fh:
            head = [next(fh) for _ in range(COPY_LINES)]
        (dest / "data_series" / f"{sid}.txt").write_text("".join(head), encoding="utf-8")
    return dest


@pytest.fixture(scope="session")
def broker():
    from dtwin.broker import EmbeddedBroker

    with EmbeddedBroker() as b:
        yield b


@pytest.fixture(scope="session")
def artifact_dir(tmp_path_factory, real_site) -> Path:
    """A tiny production model trained on the real data (3 epochs), exported and verified."""
    from export.onnx_export import export_model
    from forecaster.train import TRAIN_PRESETS, make_checkpoint, prepare, train, with_epochs

    prep = prepare(real_site)
    trained = train("delta_mlp", prep, with_epochs(TRAIN_PRESETS["delta_mlp"], 3), progress=False)
    out = tmp_path_factory.mktemp("artifact") / "model"
    export_model(trained.model, make_checkpoint(trained, prep), out)
    return out
