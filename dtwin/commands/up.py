"""``dtwin up``: the whole loop (broker, topics, model, controller, replay) with a summary at the end."""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

from contracts.topics import Topics
from dtwin.args import add_data_args, env
from dtwin.runner import add_loop_args, broker_for, default_model_dir, ensure_model, start_controller, value, wait_until

SUMMARY_ROWS = (("efficiency", "dtwin_allocation_efficiency_mean_ratio", "{:.3f}"),
                ("wastage", "dtwin_allocation_wastage_mean_ratio", "{:.3f}"),
                ("utilization", "dtwin_allocation_utilization_mean_ratio", "{:.3f}"),
                ("over-provisioning", "dtwin_allocation_overprovisioning_mean_units", "{:.1f}"),
                ("under-provisioned", "dtwin_allocation_underprovisioning_ratio", "{:.2%}"),
                ("intervals", "dtwin_allocation_intervals_scored_total", "{:.0f}"))


def summary_table(metrics: dict) -> tuple[str, dict]:
    allocators = sorted({dict(k)["allocator"] for k in metrics.get("dtwin_allocation_intervals_scored_total", {})},
                        key=lambda a: (not a.startswith("ai"), a))
    data = {a: {label: value(metrics, name, allocator=a) for label, name, _ in SUMMARY_ROWS} for a in allocators}
    head = "| allocator | " + " | ".join(label for label, _, _ in SUMMARY_ROWS) + " |"
    lines = [head, "|---" * (len(SUMMARY_ROWS) + 1) + "|"]
    for a in allocators:
        role = "live" if a.startswith("ai") else "shadow"
        cells = [fmt.format(data[a][label]) for label, _, fmt in SUMMARY_ROWS]
        lines.append(f"| {a} ({role}) | " + " | ".join(cells) + " |")
    return "\n".join(lines), data


def cmd_up(args: argparse.Namespace) -> int:
    from dtwin.commands.replay import replay_site_list
    from dtwin.topics import create_topics
    from replay.producer import install_sigint, make_producer, parse_speed, replay

    stop = threading.Event()
    install_sigint(stop)
    run_dir = Path(args.run_dir)
    model_dir = ensure_model(Path(args.model_dir) if args.model_dir else default_model_dir(args), args)
    sites = replay_site_list(args)
    if args.limit_samples:
        sites = [s.slice(0, args.limit_samples) for s in sites]
    controller = None
    last_metrics: dict | None = None
    with broker_for(args) as bootstrap:
        topics = Topics(args.topic_prefix)
        create_topics(bootstrap, topics, args.partitions)
        controller = start_controller(bootstrap, model_dir, run_dir, topics.prefix, "dtwin-controller",
                                      args.partitions, extra_env={"DTWIN_POLICY": args.policy,
                                                                  "DTWIN_SLA_TARGET": str(args.sla_target)})
        print(f"controller started (metrics on :{controller.metrics_port}/metrics, log {controller.log_path})",
              flush=True)
        try:
            producer = make_producer(bootstrap)
            stats = replay(producer, topics.samples, sites, speed=parse_speed(args.speed), stop=stop)
            producer.close()
            print(f"replayed {stats.acked} samples from {len(sites)} sites; waiting for the controller "
                  "(its first group join takes 30-40 s)", flush=True)

            def drained() -> bool:
                nonlocal last_metrics
                m = controller.metrics()
                if m is not None:
                    last_metrics = m
                return stop.is_set() or (m is not None and value(m, "dtwin_samples_received_total") >= stats.acked)

            wait_until(drained, args.timeout, 0.5, "the controller to process every sample", controller.alive)
            time.sleep(1.0)
            last_metrics = controller.metrics() or last_metrics
        except (TimeoutError, RuntimeError) as exc:
            print(f"dtwin up: {exc}; see {controller.log_path}", file=sys.stderr)
            return 1
        finally:
            controller.stop()
    if last_metrics is None:
        print("no metrics were scraped from the controller", file=sys.stderr)
        return 1
    table, data = summary_table(last_metrics)
    print()
    print(f"Summary over {value(last_metrics, 'dtwin_samples_received_total'):.0f} samples, "
          f"{value(last_metrics, 'dtwin_commands_sent_total'):.0f} commands, model "
          f"{next((dict(k)['version'] for k in last_metrics.get('dtwin_model_info', {})), '?')}"
          + (" (stopped early)" if stop.is_set() else ""))
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
    return 0


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="run the whole loop on an embedded broker and print a summary")
    add_data_args(p)
    add_loop_args(p)
    p.add_argument("--sites", type=int, default=4, help="sites to replay (default %(default)s)")
    p.add_argument("--speed", default="max", help="replay pace: real, max or a factor (default %(default)s)")
    p.add_argument("--topic-prefix", default=env("DTWIN_TOPIC_PREFIX", "dtwin."))
    p.add_argument("--policy", choices=("sla", "raw"), default=env("DTWIN_POLICY", "sla"))
    p.add_argument("--sla-target", type=float, default=float(env("DTWIN_SLA_TARGET", "0.01")))
    p.add_argument("--json", default=None, help="also write the summary as JSON")
    p.set_defaults(func=cmd_up)
