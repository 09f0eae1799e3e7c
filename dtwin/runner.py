"""Running the loop's processes for `dtwin up`, the benchmarks and the tests: controller workers,
their metrics, the broker to use, and waiting on conditions."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from dtwin.args import env, load_sites_from_args

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
    web_port: int = 0
    state_dir: Path | None = None

    def metrics(self) -> dict | None:
        try:
            return scrape(self.metrics_port)
        except OSError:
            return None

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a crashed machine would stop."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self, timeout: float = 20.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_controller(bootstrap: str, model_dir: Path | None, run_dir: Path, topic_prefix: str, app_id: str,
                     partitions: int, pipeline: str = "control", extra_env: dict[str, str] | None = None,
                     log_name: str = "controller.log", worker: str = "", metrics_port: int | None = None,
                     web_port: int | None = None, python: str | None = None) -> ControllerProcess:
    """One worker process with its own web port, metrics port and state folder (``worker`` names it)."""
    from dtwin.broker import free_port

    metrics_port, web_port = metrics_port or free_port(), web_port or free_port()
    run_dir.mkdir(parents=True, exist_ok=True)
    state_dir = run_dir / f"state-{app_id}{'-' + worker if worker else ''}"
    env_vars = {**os.environ, "DTWIN_BOOTSTRAP": bootstrap,
                "DTWIN_METRICS_PORT": str(metrics_port), "DTWIN_WEB_PORT": str(web_port),
                "DTWIN_TOPIC_PREFIX": topic_prefix, "DTWIN_APP_ID": app_id, "DTWIN_PARTITIONS": str(partitions),
                "DTWIN_STATE_DIR": str(state_dir), "DTWIN_PIPELINE": pipeline,
                **({"DTWIN_MODEL_DIR": str(model_dir)} if model_dir is not None else {}), **(extra_env or {})}
    log_path = run_dir / log_name
    log = open(log_path, "ab")  # noqa: SIM115
    proc = subprocess.Popen([python or sys.executable, "-m", "dtwin", "controller", "--log-level",
                             env_vars.get("DTWIN_LOG_LEVEL", "warn")],
                            stdout=log, stderr=subprocess.STDOUT, env=env_vars, start_new_session=True)
    return ControllerProcess(proc, metrics_port, log_path, web_port, state_dir)


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


@contextlib.contextmanager
def broker_for(args: argparse.Namespace):
    if args.bootstrap:
        yield args.bootstrap
        return
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if getattr(args, "broker", "tansu") == "kafka":
        import shutil

        from dtwin.kafka_broker import KafkaBroker

        data_dir = run_dir / "kafka"
        shutil.rmtree(data_dir, ignore_errors=True)  # a fresh log: the run replays from the start
        with KafkaBroker(args.broker_port or None, data_dir=data_dir, log_path=run_dir / "kafka.log") as broker:
            print(f"Apache Kafka (KRaft, one node) on {broker.bootstrap}, log in {data_dir}", flush=True)
            yield broker.bootstrap
        return
    from dtwin.broker import EmbeddedBroker

    with EmbeddedBroker(args.broker_port or None, log_path=run_dir / "broker.log") as broker:
        print(f"embedded broker (Tansu) on {broker.bootstrap}", flush=True)
        yield broker.bootstrap


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


# Synthetic sites the default model is trained on: another seed than the replayed fleet's, so the
# live loop serves only sites the model never saw.
TRAINING_SEED_OFFSET = 1000
TRAINING_SYNTHETIC_SITES = 2


def training_sites(args: argparse.Namespace) -> list:
    """The sites the production model is trained on: the chosen real sites (their training parts), or
    synthetic sites the replay never sends."""
    from forecaster.data import resolve_data_dir

    if resolve_data_dir(args.data) is None:
        from forecaster.synthetic import generate_sites

        return generate_sites(TRAINING_SYNTHETIC_SITES, seed=args.synthetic_seed + TRAINING_SEED_OFFSET)
    return load_sites_from_args(args)


def ensure_model(model_dir: Path, args: argparse.Namespace) -> Path:
    """Use the artifact in ``model_dir``, or train (pooled over :func:`training_sites`) and export the
    production model into it."""
    if (model_dir / "manifest.json").is_file():
        return model_dir
    from export.onnx_export import export_model
    from forecaster.models import PRODUCTION_KIND
    from forecaster.train import make_checkpoint, prepare, save_checkpoint, train

    sites = training_sites(args)
    print(f"no model artifact in {model_dir}: training the production model ({PRODUCTION_KIND}) on "
          f"{', '.join(s.name for s in sites)} (first use)", flush=True)
    preps = [prepare(s) for s in sites]
    trained = train(PRODUCTION_KIND, preps)
    ckpt = make_checkpoint(trained, preps)
    save_checkpoint(ckpt, model_dir.parent / f"{model_dir.name}.pt")
    export_model(trained.model, ckpt, model_dir)
    return model_dir


def default_model_dir(args: argparse.Namespace) -> Path:
    from forecaster.data import resolve_data_dir

    data = resolve_data_dir(args.data)
    if data is None:
        return Path("artifacts") / "synthetic"
    chosen = ("sites-" + "-".join(map(str, args.site_ids))) if args.site_ids else (args.series or "paper")
    return Path("artifacts") / f"{data.name}-{chosen.replace(',', '-')}"


def add_loop_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap", default=None, help="use this Kafka instead of starting a broker")
    p.add_argument("--broker", choices=("tansu", "kafka"), default=env("DTWIN_BROKER_KIND", "tansu"),
                   help="broker to start: tansu (embedded, in memory, no dependencies) or kafka (Apache Kafka "
                        "from Maven Central, needs Java 17) (default $DTWIN_BROKER_KIND or %(default)s)")
    p.add_argument("--broker-port", type=int, default=0, help="broker port (default: a free one)")
    p.add_argument("--model-dir", default=None,
                   help="model artifact; trained and exported on first use if missing (default artifacts/<data>)")
    p.add_argument("--partitions", type=int, default=int(env("DTWIN_PARTITIONS", "4")))
    p.add_argument("--run-dir", default=str(ROOT_RUNS), help="logs and worker state (default %(default)s)")
    p.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds of waiting")
