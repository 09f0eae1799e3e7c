"""Offline evaluation: train (or load) the models, allocate on each site's test part, write the report.

Per evaluated site: its own static baselines (B1, B2 from its own training part), persistence,
the online headroom tracker on the last value (``persistence_sla``) and on each model's forecast
(``<prefix>_sla``), the global static calibration from the training sites' pooled validation parts
(``<prefix>_sla_static``) and the bare forecast (``<prefix>_raw``). The trackers run from the start
of the site's validation part through its test part; only the test part is scored. The report's
top-level ``allocators`` aggregate all evaluated intervals of all sites; ``sites`` has each site's.
"""

from __future__ import annotations

import io
import json
import platform
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from forecaster.core.allocators import (
    DEFAULT_SLA_TARGET,
    Headroom,
    b1,
    b2,
    calibrate_headroom,
    forecast_policy,
    persistence,
)
from forecaster.core.metrics import mae, rmse, summarize
from forecaster.core.online import OnlineHeadroom
from forecaster.data import Site
from forecaster.models import PRODUCTION_KIND, count_parameters
from forecaster.prepare import Prepared
from forecaster.train import (
    TRAIN_PRESETS,
    load_checkpoint,
    make_checkpoint,
    predict,
    prepare,
    save_checkpoint,
    train,
    tune_online,
    tuning_series,
    with_epochs,
)

# The paper's reported AI-DT figures, for the side-by-side table.
PAPER_REPORTED = {"mae": 25.0, "rmse": 40.0, "efficiency_median": 0.987}
# Allocator-name prefix per model kind: the paper's Table I model and the production model; any
# other kind is named after itself.
PREFIX = {"paper": "paper", PRODUCTION_KIND: "ai"}
SCALE_NOTE = ("allocation = base + q × ((1 − w) × base + w × the site's training mean, floored at 1); "
              "q tracked online per site")


def state_dict_bytes(model: torch.nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def _tracked(prep: Prepared) -> slice:
    """Windows the online trackers run over: the validation part, then the test part."""
    return slice(prep.split.val.start, prep.split.test.stop)


def _online(tracker: OnlineHeadroom, prep: Prepared, base: np.ndarray) -> np.ndarray:
    """Run ``tracker`` over the site's validation and test parts (``base`` over both); the test part's
    allocations."""
    span = _tracked(prep)
    alloc, _ = tracker.run(base, tracker.scale(base, prep.stats.mean), prep.y[span])
    return alloc[prep.split.val.stop - prep.split.val.start:]


def _online_policy(name: str, source: str, tracker: OnlineHeadroom) -> dict:
    return {"name": name, "source": source, "online": tracker.to_dict(), "scale": SCALE_NOTE, "floor": 0.0,
            "ceiling": None}


def _settings(ckpt: dict, key: str, which: str, preps: list[Prepared], forecasts: list[np.ndarray] | None,
              target: float) -> OnlineHeadroom:
    """The checkpoint's online headroom at ``key``; else tuned on ``preps``' training parts (``forecasts``
    over them)."""
    stored = (ckpt.get("online_headroom") or {}).get(key, {}).get(which)
    if stored:
        return OnlineHeadroom.from_dict(stored)
    series = [tuning_series(p, None if forecasts is None else f)
              for p, f in zip(preps, forecasts or [None] * len(preps), strict=True)]
    return tune_online(series, target)[0]


def _static(ckpt: dict, key: str, target: float) -> Headroom:
    if key in ckpt.get("calibration", {}):
        return Headroom.from_dict(ckpt["calibration"][key])
    return calibrate_headroom(np.asarray(ckpt["val_forecast"]), np.asarray(ckpt["val_actual"]), target)


def _site_data(prep: Prepared) -> dict:
    return {"site": prep.site.name, "source": prep.site.source, "samples": len(prep.site.values),
            "fit": [prep.split.fit.start, prep.split.fit.stop], "val": [prep.split.val.start, prep.split.val.stop],
            "test": [prep.split.test.start, prep.split.test.stop]}


def evaluate(sites: Site | Sequence[Site], out: Path, kinds: list[str], checkpoint: Path | None = None,
             epochs: int | None = None, seed: int = 0, sla_target: float = DEFAULT_SLA_TARGET,
             progress: bool = True, train_sites: Sequence[Site] | None = None,
             command: str | None = None) -> dict:
    """Evaluate on ``sites``; models are trained on ``train_sites`` (default: the evaluated sites)
    pooled, or loaded from ``checkpoint``."""
    out.mkdir(parents=True, exist_ok=True)
    sites = [sites] if isinstance(sites, Site) else list(sites)
    if not sites:
        raise ValueError("evaluate needs at least one site")
    if len({s.name for s in sites}) != len(sites):
        raise ValueError(f"site names must differ: {[s.name for s in sites]}")
    preps = [prepare(s) for s in sites]
    by_name = {p.site.name: p for p in preps}
    train_preps = ([by_name.get(s.name) or prepare(s) for s in train_sites] if train_sites else preps)
    key = f"{sla_target:g}"

    allocations: dict[str, dict[str, np.ndarray]] = {p.site.name: {} for p in preps}
    forecasts: dict[str, dict[str, np.ndarray]] = {p.site.name: {} for p in preps}
    policies: dict[str, dict] = {}
    site_policies: dict[str, dict[str, dict]] = {p.site.name: {} for p in preps}
    for p in preps:
        for pol in (b1(p.stats), b2(p.stats), persistence()):
            allocations[p.site.name][pol.name] = pol.allocate(p.last[p.split.test])
            (site_policies[p.site.name] if pol.source == "static" else policies)[pol.name] = pol.describe()

    models: dict[str, dict] = {}
    persistence_tracker: OnlineHeadroom | None = None
    loaded = [load_checkpoint(checkpoint)] if checkpoint is not None else []
    for kind in kinds if checkpoint is None else [loaded[0][1]["kind"]]:
        if loaded:
            model, ckpt = loaded[0]
            train_seconds = float(ckpt["train"]["seconds"])
            best_epoch = int(ckpt["train"]["best_epoch"])
        else:
            trained = train(kind, train_preps, with_epochs(TRAIN_PRESETS[kind], epochs, seed), progress=progress)
            model, ckpt = trained.model, make_checkpoint(trained, train_preps)
            save_checkpoint(ckpt, out / f"{kind}.pt")
            train_seconds, best_epoch = trained.seconds, trained.best_epoch
        train_ids = [str(s) for s in ckpt.get("train_site_ids", [ckpt["data"]["site"]])]
        train_forecasts = [predict(model, p.x[p.split.train]) for p in train_preps]
        tracker = _settings(ckpt, key, "model", train_preps, train_forecasts, sla_target)
        if persistence_tracker is None:
            persistence_tracker = _settings(ckpt, key, "persistence", train_preps, None, sla_target)
        static = forecast_policy("", _static(ckpt, key, sla_target))
        prefix = PREFIX.get(kind, kind)
        raw_name, sla_name, static_name = f"{prefix}_raw", f"{prefix}_sla", f"{prefix}_sla_static"
        per_site = {}
        for p in preps:
            span_forecast = predict(model, p.x[_tracked(p)])
            f_test = span_forecast[p.split.val.stop - p.split.val.start:]
            name, last_test = p.site.name, p.last[p.split.test]
            forecasts[name][prefix] = f_test
            allocations[name][raw_name] = forecast_policy(raw_name).allocate(last_test, f_test)
            allocations[name][sla_name] = _online(tracker, p, span_forecast)
            allocations[name][static_name] = static.allocate(last_test, f_test)
            actual = p.y[p.split.test]
            per_site[name] = {"mae": mae(actual, f_test), "rmse": rmse(actual, f_test),
                              "persistence_mae": mae(actual, last_test), "persistence_rmse": rmse(actual, last_test),
                              "trained_on": name in train_ids}
        policies[raw_name] = forecast_policy(raw_name).describe()
        policies[sla_name] = _online_policy(sla_name, "forecast", tracker)
        policies[static_name] = forecast_policy(static_name, static.headroom).describe()
        all_actual = np.concatenate([p.y[p.split.test] for p in preps])
        all_f = np.concatenate([forecasts[p.site.name][prefix] for p in preps])
        models[kind] = {"allocator_prefix": prefix, "params": count_parameters(model),
                        "bytes": state_dict_bytes(model), "train_seconds": train_seconds, "best_epoch": best_epoch,
                        "train_site_ids": train_ids, "mae": mae(all_actual, all_f), "rmse": rmse(all_actual, all_f),
                        "sites": per_site, "online_headroom": tracker.to_dict(),
                        "online_tuning": (ckpt.get("online_tuning") or {}).get("sweeps", {}).get(key, {})}
    assert persistence_tracker is not None, "evaluate needs at least one model"
    for p in preps:
        allocations[p.site.name]["persistence_sla"] = _online(persistence_tracker, p, p.last[_tracked(p)])
    policies["persistence_sla"] = _online_policy("persistence_sla", "last", persistence_tracker)

    names = list(allocations[preps[0].site.name])
    order = [n for n in ("b1", "b2", "persistence", "persistence_sla") if n in names]
    names = order + [n for n in names if n not in order]
    actual_all = np.concatenate([p.y[p.split.test] for p in preps])
    alloc_all = {n: np.concatenate([allocations[p.site.name][n] for p in preps]) for n in names}
    site_reports = {
        p.site.name: {"data": _site_data(p), "training_stats": asdict(p.stats), "policies": site_policies[p.site.name],
                      "allocators": {n: summarize(p.y[p.split.test], allocations[p.site.name][n]) for n in names}}
        for p in preps}
    first = preps[0]
    report = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
        "data": {**_site_data(first), "sites": [_site_data(p) for p in preps],
                 "train_sites": [_site_data(p) for p in train_preps]},
        "window": first.window,
        "sla_target": sla_target,
        "training_stats": asdict(first.stats),
        "allocators": {n: summarize(actual_all, alloc_all[n]) for n in names},
        "sites": site_reports,
        "policies": {**site_policies[first.site.name], **policies},
        "models": models,
        "paper_reported": PAPER_REPORTED,
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, allow_nan=True) + "\n")
    from forecaster import figures

    f_all = {prefix: np.concatenate([forecasts[p.site.name][prefix] for p in preps])
             for prefix in forecasts[first.site.name]}
    figures.write_all(out, actual_all, alloc_all, f_all, np.concatenate([p.last[p.split.test] for p in preps]),
                      site=first.site.name)
    figures.per_site_underprovisioning(out, {name: r["allocators"] for name, r in site_reports.items()}, sla_target)
    (out / "report.md").write_text(render_markdown(report))
    return report


def _fmt(v: float, spec: str) -> str:
    return "n/a" if v is None or not np.isfinite(v) else format(v, spec)


def render_markdown(report: dict) -> str:
    a = report["allocators"]
    sites = report["sites"]
    several = len(sites) > 1
    d = report["data"]
    data_line = (f"Data: `{d['source']}`, {d['samples']} samples; window {report['window']}; chronological split "
                 f"fit/val/test = {d['fit']} / {d['val']} / {d['test']} (window indices)."
                 if not several else
                 f"Data: sites {', '.join(sites)} ({d['samples']} samples each, window {report['window']}, "
                 f"chronological split fit/val/test = {d['fit']} / {d['val']} / {d['test']} window indices per "
                 "site); source: " + "; ".join(f"`{s['source']}`" for s in d["sites"]) + ".")
    trained_on = sorted({s for m in report["models"].values() for s in m["train_site_ids"]})
    lines = [
        "# dtwin offline evaluation",
        "",
        f"{data_line} Models trained on the training parts of: {', '.join(trained_on)}. "
        f"SLA target: {report['sla_target']:.1%} under-provisioned intervals. Created {report['created']}.",
        "",
    ]
    if report.get("command"):
        lines += ["Reproduce (from the repository root, with the dataset beside the checkout):", "", "```sh",
                  report["command"], "```", ""]
    lines += [
        "## Allocators on the test split" + (" (all sites' test intervals together)" if several else ""),
        "",
        "| allocator | MAE | RMSE | efficiency mean | efficiency median | wastage mean | utilization mean "
        "| over-provisioning mean | under-provisioned share | under-provisioned amount mean | n |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in a.items():
        lines.append(
            f"| {name} | {m['mae']:.2f} | {m['rmse']:.2f} | {m['efficiency_mean']:.3f} | "
            f"{m['efficiency_median']:.3f} | {m['wastage_mean']:.3f} | {_fmt(m['utilization_mean'], '.3f')} | "
            f"{m['overprovisioning_mean']:.1f} | {m['underprovisioning_rate']:.2%} | "
            f"{m['underprovisioned_amount_mean']:.2f} | {m['n']} |")
    pr = report["paper_reported"]
    lines += [
        "",
        f"The paper reports MAE ≈ {pr['mae']:.0f}, RMSE ≈ {pr['rmse']:.0f} and median efficiency "
        f"{pr['efficiency_median']} for its AI-DT. `*_raw` allocates the bare forecast (the paper's mode); "
        "`*_sla` adds the online headroom (per site, learning from every interval from the start of the "
        "validation part); `*_sla_static` the static headroom calibrated once on the training sites' pooled "
        "validation parts. B1 and B2 are each site's own training mean + 2 std and P95.",
        "",
        "## Per site",
        "",
    ]
    if several:
        lines += ["| site | allocator | under-provisioned | over-provisioning mean | efficiency mean "
                  "| efficiency median | MAE | RMSE |", "|---|---|---|---|---|---|---|---|"]
        for site, r in sites.items():
            for name, m in r["allocators"].items():
                lines.append(f"| {site} | {name} | {m['underprovisioning_rate']:.2%} | "
                             f"{m['overprovisioning_mean']:.1f} | {m['efficiency_mean']:.3f} | "
                             f"{m['efficiency_median']:.3f} | {m['mae']:.2f} | {m['rmse']:.2f} |")
    else:
        lines.append(f"One site ({next(iter(sites))}): its figures are the table above.")
    lines += ["", "![Per-site under-provisioning](per_site_underprovisioning.png)", "",
              "## Forecast accuracy per site", "",
              "| model | site | trained on it | MAE | RMSE | persistence MAE | persistence RMSE | MAE ratio "
              "| RMSE ratio |", "|---|---|---|---|---|---|---|---|---|"]
    for kind, m in report["models"].items():
        for site, s in m["sites"].items():
            lines.append(f"| {kind} | {site} | {'yes' if s['trained_on'] else 'no'} | {s['mae']:.2f} | "
                         f"{s['rmse']:.2f} | {s['persistence_mae']:.2f} | {s['persistence_rmse']:.2f} | "
                         f"{s['mae'] / s['persistence_mae']:.3f} | {s['rmse'] / s['persistence_rmse']:.3f} |")
    lines += [
        "",
        "## Models (Table II)",
        "",
        "| model | allocators | trained on | parameters | bytes (state dict) | training s | best epoch "
        "| test MAE | test RMSE |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, m in report["models"].items():
        lines.append(f"| {kind} | {m['allocator_prefix']}_* | {', '.join(m['train_site_ids'])} | {m['params']:,} | "
                     f"{m['bytes']:,} | {m['train_seconds']:.1f} | {m['best_epoch']} | {m['mae']:.2f} | "
                     f"{m['rmse']:.2f} |")
    lines += ["", "## Headroom", ""]
    for name, pol in report["policies"].items():
        if "headroom" in pol:
            h = pol["headroom"]
            lines.append(f"- `{name}`: allocation = base × (1 + {h['relative']:.3f}) + {h['additive']:.2f}")
        elif "online" in pol:
            o = pol["online"]
            lines.append(f"- `{name}`: online, q0 = {o['q0']:.4f}, η = {o['eta']:g}, "
                         f"w = {o.get('site_weight', 0.5):g}, target {o['target']:g}; {pol['scale']}")
    sweeps = [(kind, m["online_tuning"]) for kind, m in report["models"].items() if m.get("online_tuning")]
    if sweeps:
        lines += ["", "The step size η and the site level's weight w were chosen on the training sites only: for each "
                  "w, q0 is taken from their pooled validation parts; the tracker runs from q0 over each site's "
                  "whole training part (fit, then validation), and the pair with the lowest over-provisioning "
                  "among those holding the target there wins.", "",
                  "| model | base | η | w | under-provisioned (training parts) | over-provisioning mean |",
                  "|---|---|---|---|---|---|"]
        for kind, sw in sweeps:
            for which, rows in sw.items():
                for r in rows:
                    lines.append(f"| {kind} | {which} | {r['eta']:g} | {r.get('site_weight', 0.5):g} | "
                                 f"{r['underprovisioning_rate']:.2%} | {r['overprovisioning_mean']:.1f} |")
    lines += ["", "## Figures", ""]
    for fig, title in [("mae_rmse.png", "MAE and RMSE"), ("overprovisioning.png", "Mean over-provisioning"),
                       ("radar.png", "Normalized metrics"), ("efficiency_box.png", "Efficiency per interval"),
                       ("forecast_vs_actual.png", "Forecast vs actual (test slice)")]:
        lines += [f"### {title}", "", f"![{title}]({fig})", ""]
    return "\n".join(lines)
