"""``dtwin up``: the whole loop (broker, topics, model, controller, replay) with a fleet summary at the end."""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import urllib.request
from pathlib import Path

from contracts.topics import Topics
from dtwin.args import add_data_args, env
from dtwin.runner import (
    ControllerProcess,
    add_loop_args,
    broker_for,
    default_model_dir,
    ensure_model,
    start_controller,
    value,
    wait_until,
)

SUMMARY_COLUMNS = (("efficiency", "efficiency_mean", "{:.3f}"), ("wastage", "wastage_mean", "{:.3f}"),
                   ("utilization", "utilization_mean", "{:.3f}"),
                   ("over-provisioning", "overprovisioning_mean", "{:.1f}"),
                   ("under-provisioned", "underprovisioning_rate", "{:.2%}"), ("intervals", "n", "{:.0f}"))
ORDER = ("ai_sla", "ai_raw", "ai_sla_static", "persistence_sla", "b1", "b2", "fallback", "candidate", "current")


def fetch_summary(ctl: ControllerProcess, timeout: float = 10.0) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{ctl.web_port}/dtwin/summary", timeout=timeout) as resp:
        return json.loads(resp.read())


def summary_table(summary: dict, live: str) -> str:
    allocs = summary["allocators"]
    names = [a for a in ORDER if a in allocs] + sorted(set(allocs) - set(ORDER))
    head = ("| allocator | " + " | ".join(c for c, _, _ in SUMMARY_COLUMNS)
            + " | per-site under-provisioned: min / median / p90 / max |")
    lines = [head, "|---" * (len(SUMMARY_COLUMNS) + 2) + "|"]
    for a in names:
        role = "live" if a in (live, "fallback") else "shadow"
        cells = [fmt.format(allocs[a][key]) for _, key, fmt in SUMMARY_COLUMNS]
        spread = summary["per_site"].get(a, {}).get("underprovisioning_rate")
        dist = " / ".join(f"{spread[k]:.2%}" for k in ("min", "median", "p90", "max")) if spread else "-"
        lines.append(f"| {a} ({role}) | " + " | ".join(cells) + f" | {dist} |")
    return "\n".join(lines)


def write_figure(path: Path, summary: dict, site, commands: list[dict], warmup: int, base_ts: int) -> Path | None:
    """Per-site under-provisioning by allocator, and one site's demand against its allocations."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'dtwin[train]'): no figure written", file=sys.stderr)
        return None
    import numpy as np

    from forecaster.core.baselines import live_levels

    rates = summary.get("site_rates", {})
    names = [a for a in ORDER if a in rates and a not in ("current",)]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(12, 9))
    sites = sorted({s for a in names for s in rates[a]})
    width = 0.8 / max(len(names), 1)
    x = np.arange(len(sites))
    for k, a in enumerate(names):
        vals = [100 * rates[a][s]["underprovisioned"] / rates[a][s]["scored"] if s in rates[a] else np.nan
                for s in sites]
        ax1.bar(x + k * width, vals, width, label=a)
    target = 100 * summary.get("sla_target", 0.01)
    ax1.axhline(target, color="k", ls="--", lw=1, label=f"target {target:g} %")
    ax1.set_xticks(x + 0.4 - width / 2, sites, rotation=60, fontsize=7, ha="right")
    ax1.set_ylabel("under-provisioned intervals (%)")
    ax1.set_yscale("symlog", linthresh=1.0)
    ax1.set_title("Per-site under-provisioning by allocator (after each site's warm-up)")
    ax1.legend(fontsize=7, ncol=4)
    if site is not None and commands:
        demand = site.values[:, 0]
        start = max(warmup, len(demand) - 864)  # the last three days
        idx = np.arange(start, len(demand))
        ax2.plot(idx, demand[idx], color="k", lw=1, label=f"demand, site {site.name}")
        by_ts = {c["ts"]: c["allocated"] for c in commands}
        live = [by_ts.get(base_ts + int(site.timestamps[i]), np.nan) for i in idx]
        ax2.plot(idx, live, color="tab:blue", lw=1, label="live allocation (commands)")
        levels = live_levels(demand, warmup)
        ax2.axhline(levels.b1, color="tab:red", lw=1, ls=":", label=f"B1 {levels.b1:.0f}")
        ax2.axhline(levels.b2, color="tab:orange", lw=1, ls=":", label=f"B2 {levels.b2:.0f}")
        ax2.set_xlabel("interval")
        ax2.set_ylabel("demand units")
        ax2.legend(fontsize=8)
        ax2.set_title(f"Site {site.name}: demand and allocations")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def read_commands(bootstrap: str, topic: str, site: str, timeout: float = 300.0) -> list[dict]:
    """Every command of one site, read from its partition of the commands topic (no consumer group).
    Commands are keyed by site, so they are all in the keyed partition of its name; reading every
    partition of a 30-site run took longer than the time allowed and lost the last days."""
    from kafka import KafkaConsumer, TopicPartition

    from replay.producer import site_partition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, consumer_timeout_ms=2000)
    out: list[dict] = []
    try:
        n = len(consumer.partitions_for_topic(topic) or [])
        parts = [TopicPartition(topic, site_partition(site.encode(), n))] if n else []
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        ends = consumer.end_offsets(parts)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(consumer.position(p) < ends[p] for p in parts):
            for recs in consumer.poll(timeout_ms=500).values():
                out.extend(json.loads(r.value) for r in recs if r.key == site.encode())
    finally:
        consumer.close()
    return out


def cmd_up(args: argparse.Namespace) -> int:
    from dtwin.commands.replay import replay_site_list
    from dtwin.topics import create_topics
    from replay.producer import install_sigint, make_producer, parse_speed, replay

    stop = threading.Event()
    install_sigint(stop)
    run_dir = Path(args.run_dir)
    model_dir = Path(args.model_dir) if args.model_dir else ensure_model(default_model_dir(args), args)
    if not (model_dir / "manifest.json").is_file():
        print(f"dtwin up: no model artifact in {model_dir} (model.onnx + manifest.json)", file=sys.stderr)
        return 2
    sites = replay_site_list(args)
    last_summary: dict | None = None
    with broker_for(args) as bootstrap:
        topics = Topics(args.topic_prefix)
        create_topics(bootstrap, topics, args.partitions)
        extra = {"DTWIN_POLICY": args.policy, "DTWIN_SLA_TARGET": str(args.sla_target),
                 "DTWIN_BASELINE_WARMUP_INTERVALS": str(args.warmup),
                 "DTWIN_CHANGELOG_MARKERS": "1" if args.broker == "tansu" else "0"}
        controller = start_controller(bootstrap, model_dir, run_dir, topics.prefix, "dtwin-controller",
                                      args.partitions, extra_env=extra)
        print(f"controller started (metrics on :{controller.metrics_port}/metrics, summary on "
              f":{controller.web_port}/dtwin/summary, log {controller.log_path})", flush=True)
        try:
            producer = make_producer(bootstrap)
            stats = replay(producer, topics.samples, sites, speed=parse_speed(args.speed), stop=stop)
            producer.close()
            print(f"replayed {stats.acked} samples from {len(sites)} sites; waiting for the controller "
                  "(a fresh worker's first group join takes a few to 40 s)", flush=True)

            def drained() -> bool:
                m = controller.metrics()
                return stop.is_set() or (m is not None and value(m, "dtwin_samples_received_total") >= stats.acked)

            wait_until(drained, args.timeout, 0.5, "the controller to process every sample", controller.alive)
            time.sleep(1.0)
            last_summary = fetch_summary(controller)
            metrics = controller.metrics() or {}
            commands = read_commands(bootstrap, topics.commands, sites[0].name) if args.figure else []
        except (TimeoutError, RuntimeError, OSError) as exc:
            print(f"dtwin up: {exc}; see {controller.log_path}", file=sys.stderr)
            return 1
        finally:
            controller.stop()
    live = "ai_sla" if args.policy == "sla" else "ai_raw"
    sent = sum(v for k, v in metrics.get("dtwin_commands_sent_total", {}).items())
    print()
    print(f"Summary over {value(metrics, 'dtwin_samples_received_total'):.0f} samples and {sent:.0f} commands "
          f"from {last_summary['sites']} sites scored after a {args.warmup}-interval warm-up, model "
          f"{last_summary['model']}" + (" (stopped early)" if stop.is_set() else ""))
    print(summary_table(last_summary, live))
    out = {"model": last_summary["model"], "sites": last_summary["sites"], "allocators": last_summary["allocators"],
           "per_site": last_summary["per_site"], "site_rates": last_summary["site_rates"],
           "samples": value(metrics, "dtwin_samples_received_total"), "commands": sent,
           "warmup_intervals": args.warmup, "sla_target": args.sla_target, "broker": args.broker}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2, allow_nan=True) + "\n")
        print(f"wrote {args.json}")
    if args.figure:
        from replay.producer import DEFAULT_BASE_TS

        fig = write_figure(Path(args.figure), {**out, "sla_target": args.sla_target}, sites[0], commands,
                           args.warmup, DEFAULT_BASE_TS)
        if fig:
            print(f"wrote {fig}")
    return 0


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="run the whole loop on a broker of its own and print a fleet summary")
    add_data_args(p)
    add_loop_args(p)
    p.add_argument("--sites", type=int, default=4, help="sites to replay (default %(default)s)")
    p.add_argument("--speed", default="max", help="replay pace: real, max or a factor (default %(default)s)")
    p.add_argument("--topic-prefix", default=env("DTWIN_TOPIC_PREFIX", "dtwin."))
    p.add_argument("--policy", choices=("sla", "raw"), default=env("DTWIN_POLICY", "sla"))
    p.add_argument("--sla-target", type=float, default=float(env("DTWIN_SLA_TARGET", "0.01")))
    p.add_argument("--warmup", type=int, default=int(env("DTWIN_BASELINE_WARMUP_INTERVALS", "2016")),
                   help="intervals per site that fix its B1/B2 levels before scoring (default %(default)s)")
    p.add_argument("--json", default=None, help="also write the summary as JSON")
    p.add_argument("--figure", default=str(Path("runs") / "up.png"),
                   help="PNG of per-site under-provisioning and one site's allocations (default %(default)s; "
                        "empty: none)")
    p.set_defaults(func=cmd_up)
