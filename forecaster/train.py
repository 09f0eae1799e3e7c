"""Training loop and checkpoints (torch).

``train`` takes one prepared site or several: with several, the fit parts of all of them are
pooled and early stopping watches their pooled validation parts.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from forecaster import KPI_NAMES, STEP_SECONDS, TARGET
from forecaster.core.allocators import CALIBRATION_TARGETS, TrainingStats, calibrate_headroom
from forecaster.core.metrics import mae, rmse
from forecaster.core.online import DEFAULT_ETA, OnlineHeadroom, headroom_scale, initial_headroom
from forecaster.core.windows import Normalizer
from forecaster.models import build_model, count_parameters, is_scale_free
from forecaster.prepare import Prepared, prepare

CHECKPOINT_FORMAT = "dtwin-checkpoint/1"
DOWNSTREAM = KPI_NAMES.index("downstream")
# Step sizes and site-level weights the online headroom's tuning chooses from.
ETA_GRID: tuple[float, ...] = (0.005, 0.01, 0.02, 0.05)
SITE_WEIGHT_GRID: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int
    batch_size: int
    lr: float
    loss: str  # "mse", "huber" or "l1"
    patience: int
    weight_decay: float = 0.0
    huber_delta: float = 0.05  # in standard deviations of the site's internet demand
    plateau_factor: float = 0.5
    plateau_patience: int = 2
    seed: int = 0
    schedule: str = "plateau"  # or "cosine": annealed to 0 over `epochs`
    # Also train on each fit window with downstream in the internet column, predicting the next
    # downstream value: the two correlate at 0.998, so a scale-free model gets twice the examples.
    swap_downstream: bool = False


TRAIN_PRESETS: dict[str, TrainConfig] = {
    # Table I: Adam lr 1e-4 with a plateau scheduler, ≤ 30 epochs, early stopping patience 5, batch 32.
    "paper": TrainConfig(epochs=30, batch_size=32, lr=1e-4, loss="mse", patience=5),
    "delta_mlp": TrainConfig(epochs=60, batch_size=128, lr=1e-3, loss="huber", patience=10,
                             weight_decay=1e-4, plateau_patience=100),
    "bilstm": TrainConfig(epochs=60, batch_size=256, lr=3e-3, loss="huber", patience=12, weight_decay=1e-4,
                          schedule="cosine", swap_downstream=True),
}


@dataclass
class Trained:
    kind: str
    model: nn.Module
    config: TrainConfig
    seconds: float
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)
    site_ids: list[str] = field(default_factory=list)


def predict(model: nn.Module, x: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            out.append(model(torch.as_tensor(x[i:i + batch_size], dtype=torch.float32)).numpy())
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


def as_list(preps: Prepared | Sequence[Prepared]) -> list[Prepared]:
    out = [preps] if isinstance(preps, Prepared) else list(preps)
    if not out:
        raise ValueError("training needs at least one prepared site")
    if len({p.window for p in out}) != 1:
        raise ValueError(f"sites were prepared with different windows: {sorted({p.window for p in out})}")
    return out


def pooled_normalizer(preps: list[Prepared]) -> Normalizer:
    """One site's own normalizer; for several, one fitted on all their training rows."""
    if len(preps) == 1:
        return preps[0].normalizer
    return Normalizer.fit(np.concatenate([p.site.values[: p.split.train.stop + p.window] for p in preps]))


def _pooled(preps: list[Prepared], part: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Windows, targets and each window's loss scale (its site's internet std) of one split part."""
    xs, ys, ss = [], [], []
    for p in preps:
        sl = getattr(p.split, part)
        xs.append(p.x[sl])
        ys.append(p.y[sl])
        ss.append(np.full(len(ys[-1]), float(p.normalizer.std[0]), dtype=np.float32))
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(ss)


def _downstream_swapped(preps: list[Prepared]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = [DOWNSTREAM, *range(1, DOWNSTREAM), 0, *range(DOWNSTREAM + 1, len(KPI_NAMES))]
    xs, ys, ss = [], [], []
    for p in preps:
        fit = p.split.fit
        xs.append(np.ascontiguousarray(p.x[fit][:, :, order]))
        ys.append(p.site.values[p.window:, DOWNSTREAM][fit].astype(np.float32))
        ss.append(np.full(len(ys[-1]), float(p.normalizer.std[DOWNSTREAM]), dtype=np.float32))
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(ss)


def train(kind: str, preps: Prepared | Sequence[Prepared], config: TrainConfig | None = None,
          progress: bool = True, **model_config) -> Trained:
    preps = as_list(preps)
    cfg = config or TRAIN_PRESETS[kind]
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = build_model(kind, pooled_normalizer(preps), window=preps[0].window, **model_config)
    x_fit, y_fit, s_fit = _pooled(preps, "fit")
    if cfg.swap_downstream:
        extra = _downstream_swapped(preps)
        x_fit, y_fit, s_fit = (np.concatenate([a, b]) for a, b in zip((x_fit, y_fit, s_fit), extra, strict=True))
    x_fit_t, y_fit_t, s_fit_t = (torch.as_tensor(a) for a in (x_fit, y_fit, s_fit))
    x_val, y_val, s_val = _pooled(preps, "val")
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
    if cfg.schedule == "cosine":
        sched: torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau = (
            torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs))
    elif cfg.schedule == "plateau":
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=cfg.plateau_factor,
                                                           patience=cfg.plateau_patience)
    else:
        raise ValueError(f"unknown schedule {cfg.schedule!r}")
    gen = torch.Generator().manual_seed(cfg.seed)
    best = (float("inf"), -1, None)
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    sites = ",".join(p.site.name for p in preps)
    bar = tqdm(range(cfg.epochs), desc=f"train {kind} on {sites}", unit="epoch", disable=not progress)
    for epoch in bar:
        model.train()
        perm = torch.randperm(len(y_fit_t), generator=gen)
        total = 0.0
        for i in range(0, len(perm), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            if len(idx) < 2:  # BatchNorm needs more than one sample
                continue
            scale = s_fit_t[idx]
            if hasattr(model, "member_forecasts"):
                pred = model.member_forecasts(x_fit_t[idx]) / scale.unsqueeze(1)
                target = (y_fit_t[idx] / scale).unsqueeze(1).expand_as(pred)
                # Sum over members so each one learns at the configured rate.
                loss = loss_fn(pred, target) * pred.shape[1]
            else:
                loss = loss_fn(model(x_fit_t[idx]) / scale, y_fit_t[idx] / scale)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        pred_val = predict(model, x_val)
        err = (pred_val - y_val) / s_val  # in each site's own units: no site dominates the pooled loss
        val_loss = float(np.sqrt(np.mean(err * err))) if cfg.loss == "mse" else float(np.mean(np.abs(err)))
        val_mae = mae(y_val, pred_val)
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            sched.step(val_loss)
        else:
            sched.step()
        history.append({"epoch": epoch + 1, "train_loss": total / len(perm), "val_loss": val_loss,
                        "val_mae": val_mae, "val_rmse": rmse(y_val, pred_val), "lr": opt.param_groups[0]["lr"]})
        bar.set_postfix(val_mae=f"{val_mae:.2f}", val_rmse=f"{history[-1]['val_rmse']:.2f}")
        if val_loss < best[0]:
            best = (val_loss, epoch + 1, {k: v.detach().clone() for k, v in model.state_dict().items()})
        elif epoch + 1 - best[1] >= cfg.patience:
            break
    if best[2] is not None:
        model.load_state_dict(best[2])
    model.eval()
    return Trained(kind=kind, model=model, config=cfg, seconds=time.perf_counter() - start,
                   best_epoch=best[1], history=history, site_ids=[p.site.name for p in preps])


def calibrations(val_forecast: np.ndarray, val_actual: np.ndarray) -> dict[str, dict]:
    """Headroom per target under-provisioning rate, keyed by the rate as text ("0.01")."""
    return {f"{t:g}": calibrate_headroom(val_forecast, val_actual, t).to_dict() for t in CALIBRATION_TARGETS}


@dataclass(frozen=True)
class TuningSeries:
    """One site's training part (fit, then validation) in time order: the tracker's base and the actual
    demand, the site's training mean and where its validation part starts."""

    base: np.ndarray
    site_level: float  # the site's training mean
    actual: np.ndarray
    val_start: int  # the validation part is base[val_start:]


def tuning_series(prep: Prepared, forecast: np.ndarray | None) -> TuningSeries:
    """``forecast`` over the site's training windows (fit and validation), or None for persistence (the
    last value)."""
    part = prep.split.train
    base = prep.last[part].astype(np.float64) if forecast is None else np.asarray(forecast, np.float64)
    if base.shape != (part.stop - part.start,):
        raise ValueError(f"site {prep.site.name}: {base.shape[0]} forecasts for {part.stop - part.start} "
                         "training windows")
    return TuningSeries(base=base, site_level=float(prep.stats.mean), actual=prep.y[part].astype(np.float64),
                        val_start=prep.split.val.start - part.start)


def tune_online(series: list[TuningSeries], target: float, eta_grid: Sequence[float] = ETA_GRID,
                weight_grid: Sequence[float] = SITE_WEIGHT_GRID) -> tuple[OnlineHeadroom, list[dict]]:
    """The online headroom's settings, from the training sites only.

    ``q0``, for each weight: the ``1 - target`` quantile of the pooled validation parts' scale-free
    residuals (out of sample). The step size and the weight: the tracker runs from ``q0`` over each
    site's whole training part, and the pair with the lowest mean over-provisioning among those that
    hold ``target`` there (pooled) is chosen, else the one with the fewest misses.

    Why the whole training part and not only validation: at a 1 % target a site's validation part
    (six days) holds about 17 misses, too few to rank step sizes, and the tracker learns its level
    online, so what the choice needs from the data is how the residuals' spread moves and scales,
    which the fit part shows over four weeks. That part is in-sample for the model, which biases the
    residuals' level (learnt online anyway) more than their shape.
    """
    sweep = []
    q0_by_weight: dict[float, float] = {}
    for weight in map(float, weight_grid):
        scales = [headroom_scale(s.base, s.site_level, weight) for s in series]
        q0 = initial_headroom(np.concatenate([s.base[s.val_start:] for s in series]),
                              np.concatenate([s.actual[s.val_start:] for s in series]),
                              np.concatenate([sc[s.val_start:] for s, sc in zip(series, scales, strict=True)]),
                              target)
        q0_by_weight[weight] = q0
        for eta in eta_grid:
            tracker = OnlineHeadroom(q0=q0, eta=float(eta), target=target, site_weight=weight)
            misses = over = n = 0.0
            for s, sc in zip(series, scales, strict=True):
                alloc, _ = tracker.run(s.base, sc, s.actual)
                misses += float(np.sum(s.actual > alloc))
                over += float(np.sum(np.maximum(alloc - s.actual, 0.0)))
                n += len(alloc)
            sweep.append({"eta": float(eta), "site_weight": weight, "underprovisioning_rate": misses / n,
                          "overprovisioning_mean": over / n})
    holding = [r for r in sweep if r["underprovisioning_rate"] <= target]
    chosen = (min(holding, key=lambda r: r["overprovisioning_mean"]) if holding
              else min(sweep, key=lambda r: (r["underprovisioning_rate"], r["overprovisioning_mean"])))
    weight = chosen["site_weight"]
    return OnlineHeadroom(q0=q0_by_weight[weight], eta=chosen["eta"], target=target, site_weight=weight), sweep


def online_headrooms(preps: list[Prepared], train_forecasts: list[np.ndarray]) -> tuple[dict, dict]:
    """``{"0.01": {"model": {...}, "persistence": {...}}, ...}`` for every calibration target, and the
    sweeps behind each choice of step size and weight (``train_forecasts``: over each site's training
    part)."""
    model_series = [tuning_series(p, f) for p, f in zip(preps, train_forecasts, strict=True)]
    last_series = [tuning_series(p, None) for p in preps]
    settings: dict[str, dict] = {}
    sweeps: dict[str, dict] = {}
    for t in CALIBRATION_TARGETS:
        key = f"{t:g}"
        settings[key], sweeps[key] = {}, {}
        for name, series in (("model", model_series), ("persistence", last_series)):
            tracker, sweep = tune_online(series, t)
            settings[key][name] = tracker.to_dict()
            sweeps[key][name] = sweep
    return settings, sweeps


def _data_of(prep: Prepared) -> dict:
    return {"site": prep.site.name, "source": prep.site.source, "samples": len(prep.site.values),
            "windows": len(prep.y), "fit": [prep.split.fit.start, prep.split.fit.stop],
            "val": [prep.split.val.start, prep.split.val.stop],
            "test": [prep.split.test.start, prep.split.test.stop]}


def make_checkpoint(trained: Trained, preps: Prepared | Sequence[Prepared]) -> dict:
    preps = as_list(preps)
    val_forecasts = [predict(trained.model, p.x[p.split.val]) for p in preps]
    val_forecast = np.concatenate(val_forecasts)
    test_x = np.concatenate([p.x[p.split.test] for p in preps])
    test_y = np.concatenate([p.y[p.split.test] for p in preps])
    test_forecast = predict(trained.model, test_x)
    val_actual = np.concatenate([p.y[p.split.val] for p in preps])
    val_last = np.concatenate([p.last[p.split.val] for p in preps])
    stats = preps[0].stats if len(preps) == 1 else TrainingStats.of(
        np.concatenate([p.y[p.split.train] for p in preps]))
    # Predicted again over the training part rather than sliced: torch's float32 result can differ in the
    # last bit with the batch, and the static calibration stays that of the validation part's own pass.
    online, sweeps = online_headrooms(preps, [predict(trained.model, p.x[p.split.train]) for p in preps])
    data = _data_of(preps[0])
    if len(preps) > 1:
        data = {**data, "site": ",".join(p.site.name for p in preps),
                "source": "; ".join(p.site.source for p in preps), "sites": [_data_of(p) for p in preps]}
    return {
        "format": CHECKPOINT_FORMAT,
        "kind": trained.kind,
        "model_config": dict(trained.model.config),
        "state_dict": trained.model.state_dict(),
        "params": count_parameters(trained.model),
        "window": preps[0].window,
        "step_seconds": int(preps[0].site.step_seconds or STEP_SECONDS),
        "features": list(KPI_NAMES),
        "target": TARGET,
        "scale_free": is_scale_free(trained.kind),
        "normalizer": pooled_normalizer(preps).to_dict(),
        "training_stats": asdict(stats),
        "train_site_ids": [p.site.name for p in preps],
        "calibration": calibrations(val_forecast, val_actual),
        "persistence_calibration": calibrations(val_last, val_actual),
        "online_headroom": online,
        "online_tuning": {"eta_grid": list(ETA_GRID), "site_weight_grid": list(SITE_WEIGHT_GRID),
                          "default_eta": DEFAULT_ETA, "sweeps": sweeps},
        "val_forecast": val_forecast.tolist(),
        "val_actual": val_actual.tolist(),
        "test_metrics": {"mae": mae(test_y, test_forecast), "rmse": rmse(test_y, test_forecast),
                         "n": len(test_y)},
        "test_x": torch.as_tensor(test_x),
        "test_y": torch.as_tensor(test_y),
        "data": data,
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
