"""A tiny end-to-end training run on a synthetic site, and the checkpoint round trip."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from forecaster import KPI_NAMES, TARGET, WINDOW
from forecaster.core.allocators import CALIBRATION_TARGETS, Headroom, allowed_misses
from forecaster.core.online import OnlineHeadroom, initial_headroom
from forecaster.models import PRODUCTION_KIND, DeltaMLP, PaperBiLSTM, WindowBiLSTM, build_model, count_parameters
from forecaster.synthetic import generate_site
from forecaster.train import (
    CHECKPOINT_FORMAT,
    TRAIN_PRESETS,
    load_checkpoint,
    make_checkpoint,
    predict,
    prepare,
    save_checkpoint,
    train,
    with_epochs,
)

EPOCHS = {"delta_mlp": 2, "paper": 1, "bilstm": 1}


@pytest.fixture(scope="module")
def prep():
    return prepare(generate_site(0, n_steps=1500))


@pytest.fixture(scope="module")
def trained(prep):
    return {kind: train(kind, prep, with_epochs(TRAIN_PRESETS[kind], epochs), progress=False)
            for kind, epochs in EPOCHS.items()}


def test_prepare_small_site(prep):
    # 1500 samples -> 1490 windows; n_train = int(1490*0.8) = 1192, n_val = int(1192*0.2) = 238
    assert prep.x.shape == (1490, WINDOW, 4)
    assert (prep.split.fit, prep.split.val, prep.split.test) == (
        slice(0, 954), slice(954, 1192), slice(1192, 1490))
    np.testing.assert_array_equal(prep.last, prep.x[:, -1, 0])


@pytest.mark.parametrize("kind", list(EPOCHS))
def test_training_run(trained, prep, kind):
    t = trained[kind]
    assert t.kind == kind
    assert t.config.epochs == EPOCHS[kind]
    assert len(t.history) == EPOCHS[kind]
    assert 1 <= t.best_epoch <= EPOCHS[kind]
    assert t.seconds > 0
    assert [h["epoch"] for h in t.history] == list(range(1, EPOCHS[kind] + 1))
    assert all(np.isfinite(h["train_loss"]) and np.isfinite(h["val_mae"]) for h in t.history)
    assert not t.model.training  # left in eval mode
    f = predict(t.model, prep.x[prep.split.test])
    assert f.shape == (298,) and f.dtype == np.float64 and np.isfinite(f).all()


def test_delta_mlp_learns_something(trained, prep):
    # Two epochs on a smooth synthetic series: within a few units of the actual demand.
    h = trained["delta_mlp"].history
    assert h[-1]["val_mae"] < 50.0
    assert isinstance(trained["delta_mlp"].model, DeltaMLP)


def test_parameter_counts(trained):
    assert count_parameters(trained["paper"].model) == 698753
    # DeltaMLP, window 10, 4 features, hidden 64: (80*64+64) + (64*64+64) + (64+1) = 9409
    assert count_parameters(trained["delta_mlp"].model) == 9409
    assert isinstance(trained["paper"].model, PaperBiLSTM)
    # WindowBiLSTM, 12 inputs, hidden 32, both directions: 2*(4*32*(12+32) + 2*4*32) + (64*32+32) + (32+1)
    assert count_parameters(trained["bilstm"].model) == 13889
    assert isinstance(trained["bilstm"].model, WindowBiLSTM)
    assert PRODUCTION_KIND == "bilstm"


def test_training_is_seeded(prep, trained):
    again = train("delta_mlp", prep, with_epochs(TRAIN_PRESETS["delta_mlp"], 2), progress=False)
    x = prep.x[prep.split.test]
    np.testing.assert_array_equal(predict(again.model, x), predict(trained["delta_mlp"].model, x))


@pytest.mark.parametrize("kind", list(EPOCHS))
def test_checkpoint_roundtrip(trained, prep, tmp_path, kind):
    t = trained[kind]
    ckpt = make_checkpoint(t, prep)
    path = save_checkpoint(ckpt, tmp_path / "sub" / f"{kind}.pt")
    assert path.is_file()
    model, loaded = load_checkpoint(path)
    assert not model.training
    x = prep.x  # every window: fit, val and test
    np.testing.assert_array_equal(predict(model, x), predict(t.model, x))

    assert loaded["format"] == CHECKPOINT_FORMAT
    assert loaded["kind"] == kind
    assert loaded["model_config"] == t.model.config
    assert loaded["params"] == count_parameters(t.model)
    assert loaded["window"] == WINDOW
    assert loaded["step_seconds"] == 300
    assert loaded["features"] == list(KPI_NAMES)
    assert loaded["target"] == TARGET
    assert loaded["normalizer"] == prep.normalizer.to_dict()
    assert loaded["training_stats"] == asdict(prep.stats)
    assert loaded["train"]["epochs"] == EPOCHS[kind]
    assert loaded["train"]["best_epoch"] == t.best_epoch
    assert loaded["data"]["fit"] == [0, 954]
    assert loaded["data"]["val"] == [954, 1192]
    assert loaded["data"]["test"] == [1192, 1490]
    assert loaded["data"]["samples"] == 1500
    assert loaded["test_metrics"]["n"] == 298


@pytest.mark.parametrize("kind", list(EPOCHS))
def test_checkpoint_calibration_and_val_residuals(trained, prep, kind):
    ckpt = make_checkpoint(trained[kind], prep)
    val = prep.split.val
    val_forecast = np.asarray(ckpt["val_forecast"])
    val_actual = np.asarray(ckpt["val_actual"])
    np.testing.assert_allclose(val_forecast, predict(trained[kind].model, prep.x[val]))
    np.testing.assert_allclose(val_actual, prep.y[val])
    assert len(val_forecast) == len(val_actual) == 238

    for key in ("calibration", "persistence_calibration"):
        assert set(ckpt[key]) == {"0.005", "0.01", "0.02", "0.05"}
        for text, target in zip(ckpt[key], CALIBRATION_TARGETS, strict=True):
            assert float(text) == target
            h = Headroom.from_dict(ckpt[key][text])
            assert h.target_rate == target
            base = val_forecast if key == "calibration" else prep.last[val]
            misses = int(np.sum(val_actual > np.maximum(h.apply(base), 0.0)))
            assert misses <= allowed_misses(len(val_actual), target, 1.645)


def test_load_checkpoint_rejects_other_files(tmp_path: Path):
    text = tmp_path / "notes.pt"
    text.write_text("this is not a checkpoint\n")
    with pytest.raises(ValueError, match="not a dtwin-checkpoint/1 checkpoint"):
        load_checkpoint(text)

    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="not a dtwin-checkpoint/1 checkpoint"):
        load_checkpoint(empty)

    other = tmp_path / "other.pt"
    torch.save({"format": "something-else/3", "state_dict": {}}, other)
    with pytest.raises(ValueError, match="something-else/3"):
        load_checkpoint(other)

    not_dict = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_dict)
    with pytest.raises(ValueError, match="not a dtwin-checkpoint/1 checkpoint"):
        load_checkpoint(not_dict)

    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_build_model_unknown_kind(prep):
    with pytest.raises(ValueError, match="unknown model 'lstm9'"):
        build_model("lstm9", prep.normalizer)


def test_model_output_in_raw_units(prep):
    # An untrained DeltaMLP with zeroed output layers predicts exactly the last internet value.
    model = build_model("delta_mlp", prep.normalizer)
    with torch.no_grad():
        for member in model.members:
            member[-1].weight.zero_()
            member[-1].bias.zero_()
    np.testing.assert_allclose(predict(model, prep.x[:50]), prep.x[:50, -1, 0], rtol=1e-6)


def test_bilstm_is_scale_free(trained, prep):
    """Scaling a window scales the forecast: nothing of the training site's level is in the model."""
    model = trained["bilstm"].model
    x = prep.x[:200]
    np.testing.assert_allclose(predict(model, 2.5 * x), 2.5 * predict(model, x), rtol=1e-4, atol=1e-3)
    assert not any("x_mean" in k or "x_std" in k for k in model.state_dict())


@pytest.fixture(scope="module")
def two_sites():
    return [prepare(generate_site(0, n_steps=1200)), prepare(generate_site(1, n_steps=1200))]


def test_pooled_training_and_checkpoint(two_sites):
    a, b = two_sites
    t = train("bilstm", two_sites, with_epochs(TRAIN_PRESETS["bilstm"], 1), progress=False)
    assert t.site_ids == [a.site.name, b.site.name] and len(t.history) == 1
    ckpt = make_checkpoint(t, two_sites)
    assert ckpt["train_site_ids"] == [a.site.name, b.site.name]
    assert ckpt["data"]["site"] == f"{a.site.name},{b.site.name}" and len(ckpt["data"]["sites"]) == 2
    n_val = (a.split.val.stop - a.split.val.start) + (b.split.val.stop - b.split.val.start)
    assert len(ckpt["val_actual"]) == n_val
    np.testing.assert_allclose(ckpt["val_actual"], np.concatenate([a.y[a.split.val], b.y[b.split.val]]))
    assert ckpt["test_metrics"]["n"] == len(ckpt["test_y"]) == 2 * (a.split.test.stop - a.split.test.start)
    pooled_train = np.concatenate([a.y[a.split.train], b.y[b.split.train]])
    assert ckpt["training_stats"]["n"] == len(pooled_train)
    assert ckpt["training_stats"]["mean"] == pytest.approx(float(pooled_train.mean()))
    # q0 of the online headroom: from the pooled validation parts, scale = the tracker's base (the forecast,
    # or the last value) mixed with the site's training mean at the tracker's chosen weight.
    val_x = np.concatenate([a.x[a.split.val], b.x[b.split.val]])
    val_f = predict(t.model, val_x)
    n_a = a.split.val.stop - a.split.val.start

    def val_scale(tracker: OnlineHeadroom, base: np.ndarray) -> np.ndarray:
        return np.concatenate([tracker.scale(base[:n_a], a.stats.mean), tracker.scale(base[n_a:], b.stats.mean)])

    for key, entry in ckpt["online_headroom"].items():
        target = float(key)
        model_h = OnlineHeadroom.from_dict(entry["model"])
        assert model_h.target == target and model_h.eta in ckpt["online_tuning"]["eta_grid"]
        assert model_h.q0 == pytest.approx(initial_headroom(val_f, ckpt["val_actual"], val_scale(model_h, val_f),
                                                            target))
        last_h = OnlineHeadroom.from_dict(entry["persistence"])
        last = val_x[:, -1, 0].astype(np.float64)
        assert last_h.q0 == pytest.approx(initial_headroom(last, ckpt["val_actual"], val_scale(last_h, last), target))
        assert {(r["eta"], r["site_weight"]) for r in ckpt["online_tuning"]["sweeps"][key]["model"]} == {
            (e, w) for e in ckpt["online_tuning"]["eta_grid"] for w in ckpt["online_tuning"]["site_weight_grid"]}
        assert model_h.site_weight in ckpt["online_tuning"]["site_weight_grid"]
        # the chosen pair: the least over-provisioning over the training parts among those holding the target
        sweep = ckpt["online_tuning"]["sweeps"][key]["model"]
        holding = [r for r in sweep if r["underprovisioning_rate"] <= target]
        best = (min(holding, key=lambda r: r["overprovisioning_mean"]) if holding
                else min(sweep, key=lambda r: (r["underprovisioning_rate"], r["overprovisioning_mean"])))
        assert (model_h.eta, model_h.site_weight) == (best["eta"], best["site_weight"])


def test_one_site_as_a_list_trains_the_same(prep, trained):
    again = train("delta_mlp", [prep], with_epochs(TRAIN_PRESETS["delta_mlp"], 2), progress=False)
    x = prep.x[prep.split.test]
    np.testing.assert_array_equal(predict(again.model, x), predict(trained["delta_mlp"].model, x))


def test_swap_downstream_doubles_the_fit_windows(prep):
    from forecaster.train import _downstream_swapped

    x, y, _ = _downstream_swapped([prep])
    fit = prep.split.fit
    assert len(x) == fit.stop - fit.start
    np.testing.assert_array_equal(x[:, :, 0], prep.x[fit][:, :, 3])
    np.testing.assert_array_equal(x[:, :, 3], prep.x[fit][:, :, 0])
    np.testing.assert_array_equal(y, prep.site.values[prep.window:prep.window + fit.stop, 3])
