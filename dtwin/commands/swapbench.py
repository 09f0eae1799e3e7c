"""``dtwin bench swap``: hot model swaps under load on Apache Kafka: swap latency, and throughput with
swaps vs without in one run. Also :func:`derive_artifact`, which makes the distinct, verifiable
versions the benchmark (and the swap and shadow tests) switch between."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import threading
import time
from pathlib import Path

import numpy as np

from contracts.topics import Topics
from dtwin.args import add_data_args
from dtwin.runner import ControllerProcess, default_model_dir, ensure_model, start_controller, value, wait_until

KAFKA_ENV = {"DTWIN_CHANGELOG_MARKERS": "0"}  # the marker record is a Tansu workaround


def derive_artifact(base: str | Path, dest: str | Path, version: str, *, scale: float = 1.0, bias: float = 0.0,
                    noise: float = 0.0, q0_shift: float = 0.0) -> Path:
    """A real artifact derived from ``base``: its ONNX graph's forecast becomes
    ``scale * forecast + bias + noise * sin(0.37 * sum(window))`` (a deterministic pseudo-noise of
    amplitude ``noise``), with the canaries recomputed, a new sha256 and version; ``q0_shift`` is
    added to the manifest's online headroom starts. It verifies like any export."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from export.artifact import MANIFEST_FILE, load_artifact, sha256_file

    base, dest = Path(base), Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    manifest = json.loads((base / MANIFEST_FILE).read_text())
    proto = onnx.load(str(base / manifest["model_file"]))
    g = proto.graph
    out_name, in_name = g.output[0].name, manifest["input"]["name"]
    for node in g.node:
        node.output[:] = [f"{o}__base" if o == out_name else o for o in node.output]
    consts = {"__scale": np.float32(scale), "__bias": np.float32(bias), "__noise": np.float32(noise),
              "__freq": np.float32(0.37)}
    for name, v in consts.items():
        g.initializer.append(numpy_helper.from_array(np.asarray(v, dtype=np.float32), name))
    g.initializer.append(numpy_helper.from_array(np.asarray([1, 2], dtype=np.int64), "__axes"))
    g.node.extend([
        helper.make_node("Mul", [f"{out_name}__base", "__scale"], ["__scaled"]),
        helper.make_node("Add", ["__scaled", "__bias"], ["__biased"]),
        helper.make_node("ReduceSum", [in_name, "__axes"], ["__sum"], keepdims=0),
        helper.make_node("Mul", ["__sum", "__freq"], ["__phase"]),
        helper.make_node("Sin", ["__phase"], ["__sin"]),
        helper.make_node("Mul", ["__sin", "__noise"], ["__wiggle"]),
        helper.make_node("Add", ["__biased", "__wiggle"], [out_name]),
    ])
    assert g.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    proto.doc_string = f"{version}: derived from {manifest['version']}"
    onnx.checker.check_model(proto, full_check=True)
    model_path = dest / manifest["model_file"]
    onnx.save(proto, str(model_path))

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    x = np.asarray([c["input"] for c in manifest["canaries"]], dtype=np.float32)
    (expected,) = sess.run([g.output[0].name], {in_name: x})
    manifest["canaries"] = [{"input": c["input"], "expected": float(e)}
                            for c, e in zip(manifest["canaries"], np.asarray(expected).reshape(-1), strict=True)]
    manifest.update(version=version, sha256=sha256_file(model_path), bytes=model_path.stat().st_size,
                    derived_from={"version": manifest["version"], "scale": scale, "bias": bias, "noise": noise,
                                  "q0_shift": q0_shift})
    if q0_shift:
        for per_target in (manifest.get("online_headroom") or {}).values():
            model = per_target.get("model") if isinstance(per_target, dict) else None
            if isinstance(model, dict) and "q0" in model:
                model["q0"] = float(model["q0"]) + q0_shift
    (dest / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    load_artifact(dest)
    return dest


def _drain_rate(points: list[tuple[float, float]], n: int) -> float:
    """Samples/s between 10 % and 90 % of ``n`` received, from (worker batch time, received) points."""
    start = next(p for p in points if p[1] >= 0.1 * n)
    end = next(p for p in points if p[1] >= 0.9 * n)
    if end[0] <= start[0]:
        start, end = points[0], points[-1]
    return (end[1] - start[1]) / (end[0] - start[0])


def _drain(ctl: ControllerProcess, n: int, timeout: float, on_progress=None) -> float:
    points: list[tuple[float, float]] = []

    def progress() -> float:
        m = ctl.metrics() or {}
        got = value(m, "dtwin_samples_received_total")
        if got > 0 and (not points or got > points[-1][1]):
            points.append((value(m, "dtwin_last_batch_processed_timestamp_seconds"), got))
        if on_progress is not None:
            on_progress(got)
        return got

    wait_until(lambda: progress() >= n, timeout, 0.1, "the worker to drain the topic", ctl.alive)
    return _drain_rate(points, n)


def _commands(bootstrap: str, topic: str, expected: int) -> list[tuple[int, dict]]:
    """(record timestamp ms, command) of every record in the topic."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, consumer_timeout_ms=2000,
                             max_partition_fetch_bytes=8 << 20)
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        out: list[tuple[int, dict]] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            for recs in consumer.poll(timeout_ms=500, max_records=50_000).values():
                out.extend((r.timestamp, json.loads(r.value)) for r in recs)
            ends = consumer.end_offsets(parts)
            if len(out) >= expected and all(consumer.position(p) >= ends[p] for p in parts):
                break
        return out
    finally:
        consumer.close()


def _lost_duplicated(commands: list[tuple[int, dict]], expected: set[tuple[str, int]]) -> tuple[int, int]:
    keys = [(c["site"], c["ts"]) for _, c in commands]
    return len(expected - set(keys)), len(keys) - len(set(keys))


def cmd_bench_swap(args: argparse.Namespace) -> int:
    from dtwin.kafka_broker import KafkaBroker
    from dtwin.topics import create_topics
    from export.registry import Registry
    from replay.producer import DEFAULT_BASE_TS, make_producer, replay
    from replay.sites import replay_sites

    run_dir = Path(args.run_dir) / "bench-swap"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    base = ensure_model(Path(args.model_dir) if args.model_dir else default_model_dir(args), args)
    n_versions = args.swaps + 1
    print(f"deriving {n_versions} versions of {base} and a corrupt one", flush=True)
    exports = {f"s{k:02d}": derive_artifact(base, run_dir / "exports" / f"s{k:02d}", f"s{k:02d}",
                                            scale=1.0 + 0.002 * k) for k in range(n_versions)}
    corrupt = derive_artifact(base, run_dir / "exports" / "corrupt", "corrupt", scale=0.99)
    data = bytearray((corrupt / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (corrupt / "model.onnx").write_bytes(bytes(data))
    reg = Registry(run_dir / "registry")
    reg.promote(reg.publish(exports["s00"]), force=True)

    per_site = int(np.ceil(args.samples / args.sites))
    sites = replay_sites(args.sites, bases=None, seed=args.synthetic_seed, n_steps=per_site + 1)
    n = per_site * args.sites
    t0 = DEFAULT_BASE_TS + int(sites[0].timestamps[0])
    expected = {(s.name, t0 + (i + 1) * sites[0].step_seconds) for s in sites for i in range(per_site)}
    env = {**KAFKA_ENV, "DTWIN_MODEL_REGISTRY": str(reg.root), "DTWIN_MODEL_POLL_SECONDS": str(args.poll)}
    result: dict = {}
    swap_times: dict[str, float] = {}
    refused = 0
    lost = duplicated = 0
    with KafkaBroker(args.broker_port or None, data_dir=run_dir / "kafka", log_path=run_dir / "kafka.log") as broker:
        print(f"Apache Kafka on {broker.bootstrap}; {n:,} samples from {args.sites} sites per phase", flush=True)
        rates: dict[str, float] = {}
        for phase in ("without", "with"):
            topics = Topics(f"bench-swap-{phase}.")
            app_id = f"bench-swap-{phase}"
            create_topics(broker.bootstrap, topics, args.partitions, app_id=app_id)
            producer = make_producer(broker.bootstrap)
            stats = replay(producer, topics.samples, sites, limit=per_site, progress=False)
            producer.close()
            print(f"{phase} swaps: pre-loaded {stats.acked:,} samples; draining", flush=True)
            ctl = start_controller(broker.bootstrap, None, run_dir, topics.prefix, app_id, args.partitions,
                                   extra_env=env, log_name=f"{app_id}.log")
            swapper = None
            try:
                if phase == "with":
                    swapper = _Swapper(reg, exports, corrupt, args.swaps, args.swap_every, swap_times, n)
                rates[phase] = _drain(ctl, stats.acked, args.timeout,
                                      on_progress=swapper.progress if swapper else None)
                if swapper is not None:
                    swapper.stop()
                    if swapper.error is not None:
                        raise swapper.error
                time.sleep(1.0)
                refused += int(sum((ctl.metrics() or {}).get("dtwin_model_swap_refusals_total", {}).values()))
            finally:
                if swapper is not None:
                    swapper.stop()
                ctl.stop()
            print(f"{phase} swaps: {rates[phase]:,.0f} samples/s", flush=True)
            commands = _commands(broker.bootstrap, topics.commands, n)
            lo, du = _lost_duplicated(commands, expected)
            lost, duplicated = lost + lo, duplicated + du
            if phase == "with":
                first: dict[str, float] = {}
                for ts_ms, c in sorted(commands, key=lambda tc: tc[0]):
                    first.setdefault(c["model_version"], ts_ms / 1000)
                if "corrupt" in first:
                    raise SystemExit("dtwin bench swap: a command names the corrupt version")
                latencies = [1000 * (first[v] - t) for v, t in swap_times.items() if v in first]
                if len(latencies) < min(10, args.swaps):
                    raise SystemExit(f"dtwin bench swap: only {len(latencies)} swaps took effect during the drain; "
                                     "give more --samples or a shorter --swap-every")
                result = {"swaps": len(latencies), "refused": refused, "lost": lost, "duplicated": duplicated,
                          "swap_latency_ms": {"median": float(statistics.median(latencies)),
                                              "max": float(max(latencies))},
                          "throughput_with_swaps": rates["with"], "throughput_without": rates["without"]}
    print(json.dumps(result, indent=2))
    print(f"{result['swaps']} swaps (publish -> first command from the new version: median "
          f"{result['swap_latency_ms']['median']:.0f} ms, max {result['swap_latency_ms']['max']:.0f} ms), "
          f"{refused} refused, {lost} lost, {duplicated} duplicated; drain {result['throughput_with_swaps']:,.0f} "
          f"samples/s with swaps vs {result['throughput_without']:,.0f} without "
          f"({result['throughput_with_swaps'] / result['throughput_without']:.2f}x); machine "
          f"{platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


class _Swapper:
    """Publishes and promotes a new version every ``every`` s once 10 % of the samples are drained, with
    the corrupt artifact in the middle, until ``swaps`` good ones are done or 85 % are drained."""

    def __init__(self, reg, exports: dict[str, Path], corrupt: Path, swaps: int, every: float,
                 times: dict[str, float], n: int) -> None:
        self.reg, self.every, self.times, self.n = reg, every, times, n
        good = [v for v in exports if v != "s00"][:swaps]
        self.plan = [(v, exports[v]) for v in good]
        self.plan.insert(len(good) // 2, ("corrupt", corrupt))
        self.received = 0.0
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def progress(self, received: float) -> None:
        self.received = received

    def _run(self) -> None:
        try:
            while self.received < 0.1 * self.n and not self.done.is_set():
                time.sleep(0.05)
            for version, path in self.plan:
                if self.done.is_set() or self.received >= 0.85 * self.n:
                    break
                t = time.time()
                if version == "corrupt":  # copied in by hand: publish would refuse it
                    shutil.copytree(path, self.reg.versions / version)
                else:
                    self.reg.publish(path)
                self.reg.promote(version, force=True)
                if version != "corrupt":
                    self.times[version] = t
                print(f"  swap to {version} at {self.received:,.0f} samples", flush=True)
                self.done.wait(self.every)
        except BaseException as exc:  # reported by the caller
            self.error = exc

    def stop(self) -> None:
        self.done.set()
        self.thread.join(30)


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser("swap", help="hot model swaps on Apache Kafka: publish -> first command latency, "
                                      "throughput with swaps vs without")
    add_data_args(p)
    p.add_argument("--model-dir", default=None, help="base artifact the versions are derived from "
                                                     "(default: the one `dtwin up` uses, trained on first use)")
    p.add_argument("--samples", type=int, default=60_000, help="samples pre-loaded per phase (default %(default)s)")
    p.add_argument("--sites", type=int, default=100, help="synthetic sites (default %(default)s)")
    p.add_argument("--swaps", type=int, default=12, help="good versions published and promoted (default %(default)s;"
                                                         " one corrupt artifact is swapped in among them)")
    p.add_argument("--swap-every", type=float, default=1.0, help="seconds between swaps (default %(default)s)")
    p.add_argument("--poll", type=float, default=0.5, help="worker's DTWIN_MODEL_POLL_SECONDS (default 0.5)")
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--broker-port", type=int, default=0, help="Kafka port (default: a free one)")
    p.add_argument("--run-dir", default="runs", help="logs, registry and broker data (default %(default)s)")
    p.add_argument("--timeout", type=float, default=600.0, help="give up draining after this many seconds")
    p.add_argument("--json", default=None, help="write the results as JSON")
    p.set_defaults(func=cmd_bench_swap)
