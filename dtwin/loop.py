"""``dtwin up`` (the whole loop on an embedded broker) and ``dtwin bench loop``."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from dtwin.cli import add_data_args, env, load_site_from_args
from dtwin.topics import Topics

ROOT_RUNS = Path("runs")


def scrape(port: int, timeout: float = 2.0) -> dict[str, dict[tuple, float]]:
    """Prometheus text → {metric sample name: {label tuple: value}}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as resp:
        text = resp.read().decode()
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def value(metrics: dict, name: str, **labels: str) -> float:
    return metrics.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


@dataclass
class ControllerProcess:
    process: subprocess.Popen
    metrics_port: int
    log_path: Path

    def metrics(self) -> dict | None:
        try:
            return scrape(self.metrics_port)
        except OSError:
            return None

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_controller(bootstrap: str, model_dir: Path, run_dir: Path, topic_prefix: str, app_id: str,
                     partitions: int, pipeline: str = "control", extra_env: dict[str, str] | None = None,
                     log_name: str = "controller.log") -> ControllerProcess:
    from dtwin.broker import free_port

    metrics_port, web_port = free_port(), free_port()
    run_dir.mkdir(parents=True, exist_ok=True)
    env_vars = {**os.environ, "DTWIN_BOOTSTRAP": bootstrap, "DTWIN_MODEL_DIR": str(model_dir),
                "DTWIN_METRICS_PORT": str(metrics_port), "DTWIN_WEB_PORT": str(web_port),
                "DTWIN_TOPIC_PREFIX": topic_prefix, "DTWIN_APP_ID": app_id, "DTWIN_PARTITIONS": str(partitions),
                "DTWIN_STATE_DIR": str(run_dir / f"state-{app_id}"), "DTWIN_PIPELINE": pipeline,
                **(extra_env or {})}
    log_path = run_dir / log_name
    log = open(log_path, "ab")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "dtwin", "controller", "--log-level", "warn"],
                            stdout=log, stderr=subprocess.STDOUT, env=env_vars, start_new_session=True)
    return ControllerProcess(proc, metrics_port, log_path)


def wait_until(predicate, timeout: float, interval: float = 0.2, what: str = "condition",
               alive=lambda: True) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if not alive():
            raise RuntimeError(f"process exited while waiting for {what}")
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def ensure_model(model_dir: Path, args: argparse.Namespace) -> Path:
    """Use the artifact in ``model_dir``, or train and export the production model into it."""
    if (model_dir / "manifest.json").is_file():
        return model_dir
    print(f"no model artifact in {model_dir}: training the production model (first use)", flush=True)
    from export.onnx_export import export_model
    from forecaster.models import PRODUCTION_KIND
    from forecaster.train import make_checkpoint, prepare, save_checkpoint, train

    prep = prepare(load_site_from_args(args))
    trained = train(PRODUCTION_KIND, prep)
    ckpt = make_checkpoint(trained, prep)
    save_checkpoint(ckpt, model_dir.parent / f"{model_dir.name}.pt")
    export_model(trained.model, ckpt, model_dir)
    return model_dir


def default_model_dir(args: argparse.Namespace) -> Path:
    from forecaster.data import resolve_data_dir

    data = resolve_data_dir(args.data)
    tag = "synthetic" if data is None else f"{data.name}-{args.series.replace(',', '-')}"
    return Path("artifacts") / tag


@contextlib.contextmanager
def broker_for(args: argparse.Namespace):
    if args.bootstrap:
        yield args.bootstrap
        return
    from dtwin.broker import EmbeddedBroker

    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with EmbeddedBroker(args.broker_port or None, log_path=run_dir / "broker.log") as broker:
        print(f"embedded broker (Tansu) on {broker.bootstrap}", flush=True)
        yield broker.bootstrap


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
    from dtwin.live_commands import replay_site_list
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


def histogram_quantiles(before: dict, after: dict, name: str, qs: tuple[float, ...]) -> dict[float, float]:
    """Quantiles of the observations between two scrapes, interpolated in buckets (as histogram_quantile)."""
    buckets = []
    for key, v in after.get(f"{name}_bucket", {}).items():
        le = float(dict(key)["le"])
        buckets.append((le, v - before.get(f"{name}_bucket", {}).get(key, 0.0)))
    buckets.sort()
    total = buckets[-1][1] if buckets else 0.0
    out = {}
    for q in qs:
        if total <= 0:
            out[q] = float("nan")
            continue
        rank = q * total
        prev_le, prev_c = 0.0, 0.0
        for le, c in buckets:
            if c >= rank:
                if le == float("inf"):
                    out[q] = prev_le
                else:
                    out[q] = prev_le + (le - prev_le) * ((rank - prev_c) / max(c - prev_c, 1e-12))
                break
            prev_le, prev_c = le, c
    return out


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
    sites = replay_sites(args.sites, base=None, seed=args.synthetic_seed, n_steps=per_site + 2000)
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


def add_loop_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap", default=None, help="use this Kafka instead of starting the embedded broker")
    p.add_argument("--broker-port", type=int, default=0, help="embedded broker port (default: a free one)")
    p.add_argument("--model-dir", default=None,
                   help="model artifact; trained and exported on first use if missing (default artifacts/<data>)")
    p.add_argument("--partitions", type=int, default=int(env("DTWIN_PARTITIONS", "4")))
    p.add_argument("--run-dir", default=str(ROOT_RUNS), help="logs and worker state (default %(default)s)")
    p.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds of waiting")


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

    p = bench.add_parser("loop", help="controller drain rate vs a null pipeline and inference; latency at 50% load")
    add_data_args(p)
    add_loop_args(p)
    p.add_argument("--samples", type=int, default=50_000, help="samples to pre-load (default %(default)s)")
    p.add_argument("--sites", type=int, default=100, help="sites (default %(default)s)")
    p.add_argument("--latency-seconds", type=float, default=20.0, help="length of the paced phase (default 20)")
    p.add_argument("--repeat", type=int, default=2,
                   help="interleaved null/control rounds; rates are their medians (default %(default)s)")
    p.add_argument("--json", default=None, help="write the results as JSON")
    p.set_defaults(func=cmd_bench_loop)
