"""``dtwin whatif``: try a model, a candidate or a policy on a scenario before it touches the network.

The scenario runs offline through the controller's own engine (:mod:`controller.whatif`); it prints
the SLA and efficiency table, and writes it as JSON and a PNG."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from dtwin.args import add_data_args, load_sites_from_args

REGISTRY_ENV = "DTWIN_MODEL_REGISTRY"
PLOTTED = ("ai_sla", "candidate", "ai_raw", "b2", "persistence_sla")


def write_figure(path: Path, result) -> Path:
    """The first site's demand and allocations over the scored part (event shaded), and per allocator
    the under-provisioning rate and mean over-provisioning with and without the event."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("dtwin whatif: --figure needs matplotlib (pip install -e '.[train]')") from None
    import numpy as np

    prepared, run, ref = result.prepared, result.run, result.reference
    sc = prepared.scenario
    site = run.sites[0]
    table = run.table()
    ref_table = ref.table() if ref is not None else {}
    fig, (ax, ax_under, ax_over) = plt.subplots(3, 1, figsize=(11, 10), height_ratios=[2.2, 1, 1])
    actual, _ = run.series(result.live_name, site)
    hours = np.arange(len(actual)) * prepared.sites[0].step_seconds / 3600
    if ref is not None:
        ref_actual, _ = ref.series(result.live_name, site)
        ax.plot(hours, ref_actual, color="0.6", lw=1, ls="--", label="demand without the event")
    ax.plot(hours, actual, color="black", lw=1.4, label="demand")
    for name in PLOTTED:
        if name in run.scores:
            _, alloc = run.series(name, site)
            ax.plot(hours, alloc, lw=1, label=f"{name}" + (" (live)" if name == result.live_name else ""))
    if prepared.event is not None:
        first, last = (r - sc.warmup for r in prepared.event)
        step_h = prepared.sites[0].step_seconds / 3600
        ax.axvspan(first * step_h, last * step_h, color="orange", alpha=0.15, label=sc.kind)
    ax.set_xlabel("hours after the warm-up")
    ax.set_ylabel("demand / allocation (units)")
    ax.set_title(f"what-if '{sc.kind}': site {site}")
    ax.legend(fontsize=8, ncol=3)
    names = list(table)
    x = np.arange(len(names))
    width = 0.4 if ref_table else 0.8
    for axis, key, label, scale in ((ax_under, "underprovisioning_rate", "under-provisioned (%)", 100.0),
                                    (ax_over, "overprovisioning_mean", "mean over-provisioning (units)", 1.0)):
        axis.bar(x - (width / 2 if ref_table else 0), [scale * table[n][key] for n in names], width,
                 label="with the event" if ref_table else sc.kind)
        if ref_table:
            axis.bar(x + width / 2, [scale * ref_table.get(n, {}).get(key, np.nan) for n in names], width,
                     label="without", color="0.7")
        axis.set_xticks(x, names, fontsize=8)
        axis.set_ylabel(label)
        axis.legend(fontsize=8)
    ax_under.axhline(100 * result.settings.sla_target, color="red", lw=0.8, ls=":")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cmd_whatif(args: argparse.Namespace) -> int:
    from controller.whatif import Scenario, Settings, WhatIfError, load_model, resolve_model, run_whatif
    from export.artifact import ArtifactError

    registry = args.registry or os.environ.get(REGISTRY_ENV) or None
    try:
        scenario = Scenario(args.scenario, start=args.start, warmup=args.warmup, intervals=args.intervals,
                            event_at=args.event_at, event_length=args.event_length, magnitude=args.magnitude,
                            ramp=args.ramp)
        spec = args.model
        if spec is None and registry is None:
            spec = os.environ.get("DTWIN_MODEL_DIR")
            if spec is None:
                from dtwin.runner import default_model_dir, ensure_model

                spec = str(ensure_model(default_model_dir(args), args))
        current_ref = resolve_model(spec, registry, "current")
        candidate_ref = resolve_model(args.candidate, registry, "candidate")
        assert current_ref is not None
        current = load_model(current_ref)
        candidate = load_model(candidate_ref) if candidate_ref is not None else None
        sites = load_sites_from_args(args, synthetic_count=args.sites)
        print(f"replaying {len(sites)} site(s) x {scenario.length} intervals through the controller engine",
              file=sys.stderr, flush=True)
        result = run_whatif(scenario, sites, current, candidate,
                            Settings(policy=args.policy, sla_target=args.sla_target, floor=args.floor,
                                     ceiling=args.ceiling))
    except (WhatIfError, ArtifactError) as exc:
        print(f"dtwin whatif: {exc}", file=sys.stderr)
        return 2
    result.models = {"current": {"version": current.version, "path": str(current_ref.path),
                                 "source": current_ref.source}}
    if candidate is not None and candidate_ref is not None:
        result.models["candidate"] = {"version": candidate.version, "path": str(candidate_ref.path),
                                      "source": candidate_ref.source}
    print(result.text())
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.figure:
        print(f"wrote {write_figure(Path(args.figure), result)}")
    return 0


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    from controller.whatif import (
        DEFAULT_EVENT_LENGTH,
        DEFAULT_INTERVALS,
        DEFAULT_MAGNITUDE,
        DEFAULT_RAMP,
        DEFAULT_WARMUP,
        SCENARIOS,
    )

    p = sub.add_parser("whatif", help="replay a surge, an outage or a recorded slice offline through the controller "
                                      "engine: SLA and efficiency of current vs candidate and the baselines")
    p.add_argument("--scenario", choices=SCENARIOS, required=True,
                   help="surge: demand up by --magnitude for --event-length intervals; outage: zero demand as long; "
                        "recorded: the slice as it was")
    add_data_args(p)
    p.add_argument("--sites", type=int, default=1, help="synthetic sites when no --data is given (default 1)")
    p.add_argument("--registry", default=None, help=f"model registry (default ${REGISTRY_ENV})")
    p.add_argument("--model", default=None,
                   help="the current model: an artifact folder, a registry version or pointer (default: the "
                        "registry's current, else $DTWIN_MODEL_DIR, else the artifact `dtwin up` uses)")
    p.add_argument("--candidate", default=None,
                   help="a candidate scored beside it (folder, version or pointer; default: the registry's candidate)")
    p.add_argument("--policy", choices=("sla", "raw"), default="sla", help="live policy (default %(default)s)")
    p.add_argument("--sla-target", type=float, default=0.01, help="target under-provisioned share (default 0.01)")
    p.add_argument("--floor", type=float, default=0.0, help="lowest allocation (default 0)")
    p.add_argument("--ceiling", type=float, default=None, help="highest allocation (default none)")
    p.add_argument("--start", type=int, default=0, help="first interval of the slice in each site (default 0)")
    p.add_argument("--warmup", type=int, default=DEFAULT_WARMUP,
                   help="intervals that fix each site's B1/B2 levels before scoring starts (default %(default)s = "
                        "one day; the live default is 2016 = one week)")
    p.add_argument("--intervals", type=int, default=DEFAULT_INTERVALS,
                   help="scored intervals after the warm-up (default %(default)s = two days)")
    p.add_argument("--event-at", type=int, default=None,
                   help="first event interval, counted from the end of the warm-up (default: centred on the peak "
                        "of the sites' total demand in the first scored day)")
    p.add_argument("--event-length", type=int, default=DEFAULT_EVENT_LENGTH,
                   help="event length in intervals (default %(default)s = 3 h)")
    p.add_argument("--magnitude", type=float, default=DEFAULT_MAGNITUDE,
                   help="surge: relative rise of every KPI (default %(default)s = +40 %%)")
    p.add_argument("--ramp", type=int, default=DEFAULT_RAMP,
                   help="surge: intervals to build up to the full rise; it ends at once (default %(default)s)")
    p.add_argument("--json", default=None, help="write the table (and the scenario) as JSON")
    p.add_argument("--figure", default=None, help="write a PNG: demand vs allocations, and the table as bars")
    p.set_defaults(func=cmd_whatif)
