"""Report figures (matplotlib, written as PNG)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from forecaster.core.metrics import interval_metrics, summarize

STEPS_PER_DAY = 288


def _bars(ax, names: list[str], values: list[float], title: str, ylabel: str) -> None:
    bars = ax.bar(names, values, color=plt.cm.tab10(np.arange(len(names)) % 10))
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", rotation=30)


def write_all(out: Path, actual: np.ndarray, allocations: dict[str, np.ndarray],
              forecasts: dict[str, np.ndarray], last: np.ndarray, site: str | None = None) -> list[Path]:
    """The report's figures over ``actual`` (several sites' test parts one after the other); the time
    series figure shows the first two days, of the first site (``site``)."""
    names = list(allocations)
    summaries = {n: summarize(actual, allocations[n]) for n in names}
    paths = []

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    _bars(axes[0], names, [summaries[n]["mae"] for n in names], "MAE of the allocation", "demand units")
    _bars(axes[1], names, [summaries[n]["rmse"] for n in names], "RMSE of the allocation", "demand units")
    fig.tight_layout()
    paths.append(_save(fig, out / "mae_rmse.png"))

    fig, ax = plt.subplots(figsize=(9, 4.5))
    _bars(ax, names, [summaries[n]["overprovisioning_mean"] for n in names],
          "Mean over-provisioning (test)", "demand units")
    paths.append(_save(fig, out / "overprovisioning.png"))

    axes_keys = [("efficiency_mean", True), ("utilization_mean", True), ("wastage_mean", False),
                 ("overprovisioning_mean", False), ("underprovisioning_rate", False), ("mae", False)]
    matrix = np.array([[summaries[n][k] for k, _ in axes_keys] for n in names], dtype=float)
    matrix = np.nan_to_num(matrix)
    lo, hi = matrix.min(0), matrix.max(0)
    span = np.where(hi > lo, hi - lo, 1.0)
    scores = (matrix - lo) / span
    for j, (_, higher_better) in enumerate(axes_keys):
        if not higher_better:
            scores[:, j] = 1.0 - scores[:, j]
    angles = np.linspace(0, 2 * np.pi, len(axes_keys), endpoint=False).tolist()
    fig = plt.figure(figsize=(7, 7))
    ax = fig.add_subplot(111, polar=True)
    for i, n in enumerate(names):
        vals = scores[i].tolist()
        ax.plot(angles + angles[:1], vals + vals[:1], label=n)
        ax.fill(angles + angles[:1], vals + vals[:1], alpha=0.05)
    ax.set_xticks(angles)
    ax.set_xticklabels([k.replace("_", " ") for k, _ in axes_keys], fontsize=8)
    ax.set_title("Normalized metrics (outer is better)")
    ax.legend(loc="upper right", bbox_to_anchor=(1.35, 1.1), fontsize=8)
    paths.append(_save(fig, out / "radar.png"))

    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.boxplot([interval_metrics(actual, allocations[n]).efficiency for n in names], tick_labels=names,
               showfliers=False)
    ax.set_title("Efficiency per test interval")
    ax.set_ylabel("min(actual / allocated, 1)")
    ax.tick_params(axis="x", rotation=30)
    paths.append(_save(fig, out / "efficiency_box.png"))

    span_len = min(len(actual), 2 * STEPS_PER_DAY)
    t = np.arange(span_len)
    fig, ax = plt.subplots(figsize=(12, 4.5))
    ax.plot(t, actual[:span_len], color="black", lw=1.2, label="actual")
    ax.plot(t, last[:span_len], lw=0.8, ls=":", label="persistence")
    for name, f in forecasts.items():
        ax.plot(t, f[:span_len], lw=0.9, label=f"{name} forecast")
    for name in names:
        if name.endswith("_sla") and not name.startswith("persistence"):
            ax.plot(t, allocations[name][:span_len], lw=0.9, ls="--", label=f"{name} allocation")
    ax.set_xlabel("test interval (5 min)")
    ax.set_ylabel("internet demand")
    ax.set_title("Forecast vs actual, first two days of the test split" + (f" (site {site})" if site else ""))
    ax.legend(fontsize=8, ncol=3)
    paths.append(_save(fig, out / "forecast_vs_actual.png"))
    return paths


def per_site_underprovisioning(out: Path, per_site: dict[str, dict[str, dict]], target: float) -> Path:
    """Grouped bars: per site (group), each allocator's share of under-provisioned test intervals."""
    sites = list(per_site)
    names = list(per_site[sites[0]])
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(8.0, 1.2 * len(sites) * len(names) / 3), 4.8))
    x = np.arange(len(sites))
    for j, name in enumerate(names):
        vals = [100.0 * per_site[s][name]["underprovisioning_rate"] for s in sites]
        bars = ax.bar(x + (j - (len(names) - 1) / 2) * width, vals, width, label=name,
                      color=plt.cm.tab20(j % 20))
        ax.bar_label(bars, fmt="%.1f", fontsize=6, rotation=90, padding=2)
    ax.axhline(100.0 * target, color="black", lw=0.8, ls="--", label=f"target {target:.1%}")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_xticks(x, [f"site {s}" for s in sites])
    ax.set_ylabel("under-provisioned test intervals, % (symlog)")
    ax.set_title("Per-site under-provisioning by allocator")
    ax.legend(fontsize=7, ncol=4, loc="upper left", bbox_to_anchor=(0, -0.08))
    return _save(fig, out / "per_site_underprovisioning.png")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
