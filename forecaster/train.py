"""Training loop and checkpoints (torch)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from forecaster import KPI_NAMES, STEP_SECONDS, TARGET
from forecaster.core.allocators import CALIBRATION_TARGETS, calibrate_headroom
from forecaster.core.metrics import mae, rmse
from forecaster.core.windows import Normalizer
from forecaster.models import build_model, count_parameters
from forecaster.prepare import Prepared, prepare

CHECKPOINT_FORMAT = "dtwin-checkpoint/1"


@dataclass(frozen=True)
class TrainConfig:
    epochs: int
    batch_size: int
    lr: float
    loss: str  # "mse" or "huber"
    patience: int
    weight_decay: float = 0.0
    huber_delta: float = 0.05  # in target standard deviations
    plateau_factor: float = 0.5
    plateau_patience: int = 2
    seed: int = 0


TRAIN_PRESETS: dict[str, TrainConfig] = {
    # Table I: Adam lr 1e-4 with a plateau scheduler, ≤ 30 epochs, early stopping patience 5, batch 32.
    "paper": TrainConfig(epochs=30, batch_size=32, lr=1e-4, loss="mse", patience=5),
    "delta_mlp": TrainConfig(epochs=60, batch_size=128, lr=1e-3, loss="huber", patience=10,
                             weight_decay=1e-4, plateau_patience=100),
}


@dataclass
class Trained:
    kind: str
    model: nn.Module
    config: TrainConfig
    seconds: float
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)


def predict(model: nn.Module, x: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            out.append(model(torch.as_tensor(x[i:i + batch_size], dtype=torch.float32)).numpy())
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


def train(kind: str, prep: Prepared, config: TrainConfig | None = None, progress: bool = True,
          **model_config) -> Trained:
    cfg = config or TRAIN_PRESETS[kind]
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = build_model(kind, prep.normalizer, window=prep.window, **model_config)
    x_fit = torch.as_tensor(prep.x[prep.split.fit])
    y_fit = torch.as_tensor(prep.y[prep.split.fit])
    x_val = prep.x[prep.split.val]
    y_val = prep.y[prep.split.val]
    scale = float(prep.normalizer.std[0])
    if cfg.loss == "mse":
        loss_fn: nn.Module = nn.MSELoss()
    elif cfg.loss == "huber":
        loss_fn = nn.HuberLoss(delta=cfg.huber_delta)
    elif cfg.loss == "l1":
        loss_fn = nn.L1Loss()
    else:
        raise ValueError(f"unknown loss {cfg.loss!r}")
    if cfg.weight_decay:
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(model.parameters(), cfg.lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=cfg.plateau_factor,
                                                       patience=cfg.plateau_patience)
    gen = torch.Generator().manual_seed(cfg.seed)
    best = (float("inf"), -1, None)
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    bar = tqdm(range(cfg.epochs), desc=f"train {kind}", unit="epoch", disable=not progress)
    for epoch in bar:
        model.train()
        perm = torch.randperm(len(y_fit), generator=gen)
        total = 0.0
        for i in range(0, len(perm), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            if len(idx) < 2:  # BatchNorm needs more than one sample
                continue
            if hasattr(model, "member_forecasts"):
                pred = model.member_forecasts(x_fit[idx])
                # Sum over members so each one learns at the configured rate.
                loss = loss_fn(pred / scale, (y_fit[idx] / scale).unsqueeze(1).expand_as(pred)) * pred.shape[1]
            else:
                loss = loss_fn(model(x_fit[idx]) / scale, y_fit[idx] / scale)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        pred_val = predict(model, x_val)
        val_mae = mae(y_val, pred_val)
        val_loss = rmse(y_val, pred_val) if cfg.loss == "mse" else val_mae
        sched.step(val_loss)
        history.append({"epoch": epoch + 1, "train_loss": total / len(perm), "val_mae": val_mae,
                        "val_rmse": rmse(y_val, pred_val), "lr": opt.param_groups[0]["lr"]})
        bar.set_postfix(val_mae=f"{val_mae:.2f}", val_rmse=f"{history[-1]['val_rmse']:.2f}")
        if val_loss < best[0]:
            best = (val_loss, epoch + 1, {k: v.detach().clone() for k, v in model.state_dict().items()})
        elif epoch + 1 - best[1] >= cfg.patience:
            break
    if best[2] is not None:
        model.load_state_dict(best[2])
    model.eval()
    return Trained(kind=kind, model=model, config=cfg, seconds=time.perf_counter() - start,
                   best_epoch=best[1], history=history)


def calibrations(val_forecast: np.ndarray, val_actual: np.ndarray) -> dict[str, dict]:
    """Headroom per target under-provisioning rate, keyed by the rate as text ("0.01")."""
    return {f"{t:g}": calibrate_headroom(val_forecast, val_actual, t).to_dict() for t in CALIBRATION_TARGETS}


def make_checkpoint(trained: Trained, prep: Prepared) -> dict:
    val_forecast = predict(trained.model, prep.x[prep.split.val])
    test_forecast = predict(trained.model, prep.x[prep.split.test])
    val_actual = prep.y[prep.split.val]
    test_actual = prep.y[prep.split.test]
    val_last = prep.last[prep.split.val]
    return {
        "format": CHECKPOINT_FORMAT,
        "kind": trained.kind,
        "model_config": dict(trained.model.config),
        "state_dict": trained.model.state_dict(),
        "params": count_parameters(trained.model),
        "window": prep.window,
        "step_seconds": int(prep.site.step_seconds or STEP_SECONDS),
        "features": list(KPI_NAMES),
        "target": TARGET,
        "normalizer": prep.normalizer.to_dict(),
        "training_stats": asdict(prep.stats),
        "calibration": calibrations(val_forecast, val_actual),
        "persistence_calibration": calibrations(val_last, val_actual),
        "val_forecast": val_forecast.tolist(),
        "val_actual": val_actual.tolist(),
        "test_metrics": {"mae": mae(test_actual, test_forecast), "rmse": rmse(test_actual, test_forecast),
                         "n": len(test_actual)},
        "test_x": torch.as_tensor(prep.x[prep.split.test]),
        "test_y": torch.as_tensor(prep.y[prep.split.test]),
        "data": {"site": prep.site.name, "source": prep.site.source, "samples": len(prep.site.values),
                 "windows": len(prep.y), "fit": [prep.split.fit.start, prep.split.fit.stop],
                 "val": [prep.split.val.start, prep.split.val.stop],
                 "test": [prep.split.test.start, prep.split.test.stop]},
        "train": {**asdict(trained.config), "seconds": trained.seconds, "best_epoch": trained.best_epoch,
                  "history": trained.history},
    }


def save_checkpoint(ckpt: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict]:
    """Load a checkpoint without unpickling arbitrary objects (``weights_only``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as exc:  # torch's unpickler raises many kinds on bytes that are no checkpoint
        raise ValueError(f"{path}: not a {CHECKPOINT_FORMAT} checkpoint (unreadable: "
                         f"{type(exc).__name__})") from exc
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
    if fmt != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a {CHECKPOINT_FORMAT} checkpoint (format {fmt!r})")
    model = build_model(ckpt["kind"], Normalizer.from_dict(ckpt["normalizer"]), **ckpt["model_config"])
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return model, ckpt


def with_epochs(config: TrainConfig, epochs: int | None, seed: int | None = None) -> TrainConfig:
    cfg = config if epochs is None else replace(config, epochs=epochs)
    return cfg if seed is None else replace(cfg, seed=seed)


__all__ = ["Prepared", "Trained", "load_checkpoint", "make_checkpoint", "prepare", "save_checkpoint", "train"]
