"""``dtwin bench loop``: the controller's drain rate against a null pipeline and inference; latency."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from contracts.topics import Topics
from dtwin.args import add_data_args
from dtwin.runner import (
    ControllerProcess,
    add_loop_args,
    broker_for,
    default_model_dir,
    ensure_model,
    histogram_quantiles,
    start_controller,
    value,
    wait_until,
)


def measure_drain(controller: ControllerProcess, n: int, timeout: float) -> float:
    """Samples/s while the worker drains ``n`` pre-loaded samples, between 10 % and 90 % done.

    The ends are left out because a fresh worker ramps up as its partitions are assigned and the
    last batches are partial. Times are the worker's own last-batch timestamps, so the polling
    interval adds no error.
    """
    points: list[tuple[float, float]] = []

    def progress() -> float:
        m = controller.metrics() or {}
        received = value(m, "dtwin_samples_received_total")
        if received > 0 and (not points or received > points[-1][1]):
            points.append((value(m, "dtwin_last_batch_processed_timestamp_seconds"), received))
        return received

    wait_until(lambda: progress() >= n, timeout, 0.25, "the worker to drain the topic", controller.alive)
    start = next(p for p in points if p[1] >= 0.1 * n)
    end = next(p for p in points if p[1] >= 0.9 * n)
    if end[0] <= start[0]:  # drained between two polls: fall back to the whole span
        start, end = points[0], points[-1]
    return (end[1] - start[1]) / (end[0] - start[0])


def measure_paced_latency(ctl: ControllerProcess, bootstrap: str, topics: Topics, sites: list, start: int,
                          already: int, rate: float, seconds: float, timeout: float) -> dict:
    """Replay at ``rate`` samples/s to a drained worker; end-to-end latency quantiles of that phase."""
    from replay.producer import make_producer, replay

    before = ctl.metrics() or {}
    producer = make_producer(bootstrap)
    intervals = max(int(seconds * rate / len(sites)), 10)
    stats = replay(producer, topics.samples, sites, speed=rate / len(sites) * sites[0].step_seconds, start=start,
                   limit=intervals, progress=False)
    producer.close()
    expected = already + stats.acked
    wait_until(lambda: value(ctl.metrics() or {}, "dtwin_samples_received_total") >= expected, timeout, 0.5,
               "the paced samples", ctl.alive)
    time.sleep(0.5)
    after = ctl.metrics() or {}
    qs = (0.5, 0.95, 0.99)
    q = histogram_quantiles(before, after, "dtwin_end_to_end_latency_seconds", qs)
    qp = histogram_quantiles(before, after, "dtwin_produce_to_command_latency_seconds", qs)
    return {"latency_ms": {"p50": q[0.5] * 1e3, "p95": q[0.95] * 1e3, "p99": q[0.99] * 1e3},
            "latency_from_produce_ms": {"p50": qp[0.5] * 1e3, "p95": qp[0.95] * 1e3, "p99": qp[0.99] * 1e3},
            "paced_rate": stats.acked / stats.seconds, "paced_samples": stats.acked}


def cmd_bench_loop(args: argparse.Namespace) -> int:
    import numpy as np

    from dtwin.topics import create_topics
    from export.artifact import load_artifact
    from replay.producer import make_producer, replay
    from replay.sites import replay_sites

    run_dir = Path(args.run_dir)
    model_dir = ensure_model(Path(args.model_dir) if args.model_dir else default_model_dir(args), args)
    per_site = int(np.ceil(args.samples / args.sites))
    sites = replay_sites(args.sites, bases=None, seed=args.synthetic_seed, n_steps=per_site + 2000)
    n = per_site * args.sites
    result: dict = {"samples": n, "sites": args.sites, "partitions": args.partitions, "batch_size": 1000}
    rates: dict[str, list[float]] = {"null": [], "control": []}
    for round_ in range(args.repeat):
        for pipeline in ("null", "control"):
            # A fresh embedded broker per phase: Tansu's in-memory log slows as it fills, which
            # would penalize whichever phase runs later.
            with broker_for(args) as bootstrap:
                name = f"bench-{pipeline}-{round_}"
                topics = Topics(f"{name}.")
                create_topics(bootstrap, topics, args.partitions, app_id=name)
                producer = make_producer(bootstrap)
                stats = replay(producer, topics.samples, sites, limit=per_site, progress=False)
                producer.close()
                ctl = start_controller(bootstrap, model_dir, run_dir, topics.prefix, name, args.partitions,
                                       pipeline=pipeline, log_name=f"{name}.log")
                try:
                    rates[pipeline].append(measure_drain(ctl, stats.acked, args.timeout))
                    print(f"round {round_ + 1}/{args.repeat} {pipeline}: drained {stats.acked} samples at "
                          f"{rates[pipeline][-1]:,.0f} samples/s", flush=True)
                    if pipeline == "control" and round_ == args.repeat - 1:
                        paced = 0.5 * float(np.median(rates["control"]))
                        result.update(measure_paced_latency(ctl, bootstrap, topics, sites, per_site, stats.acked,
                                                            paced, args.latency_seconds, args.timeout))
                finally:
                    ctl.stop()
    art = load_artifact(model_dir)
    x = np.random.default_rng(0).uniform(0, 1000, (1000, art.window, len(art.features))).astype(np.float32)
    art.predict(x)
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 2.0:
        art.predict(x)
        done += len(x)
    inference = done / (time.perf_counter() - t0)
    drain, null = float(np.median(rates["control"])), float(np.median(rates["null"]))
    result.update({
        "drain_rate": drain, "null_rate": null, "inference_rate": inference,
        "ratio_drain_to_null": drain / null, "ratio_drain_to_inference": drain / inference,
        "drain_rates": rates["control"], "null_rates": rates["null"], "repeat": args.repeat,
        "model_version": art.version,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
    })
    print(json.dumps(result, indent=2))
    print(f"drain {result['drain_rate']:,.0f}/s = {result['ratio_drain_to_null']:.2f} x null pipeline "
          f"({result['null_rate']:,.0f}/s); inference alone {inference:,.0f} windows/s; "
          f"at 50% load, arrival to command acked p50 {result['latency_ms']['p50']:.1f} ms, "
          f"p99 {result['latency_ms']['p99']:.1f} ms; from the producer's record timestamp p50 "
          f"{result['latency_from_produce_ms']['p50']:.1f} ms, p99 {result['latency_from_produce_ms']['p99']:.1f} ms")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser("loop", help="controller drain rate vs a null pipeline and inference; latency at 50 %% load")
    add_data_args(p)
    add_loop_args(p)
    p.add_argument("--samples", type=int, default=50_000, help="samples to pre-load (default %(default)s)")
    p.add_argument("--sites", type=int, default=100, help="sites (default %(default)s)")
    p.add_argument("--latency-seconds", type=float, default=20.0, help="length of the paced phase (default 20)")
    p.add_argument("--repeat", type=int, default=2,
                   help="interleaved null/control rounds; rates are their medians (default %(default)s)")
    p.add_argument("--json", default=None, help="write the results as JSON")
    p.set_defaults(func=cmd_bench_loop)
