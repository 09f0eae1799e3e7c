"""A real single-node Apache Kafka (KRaft, broker + controller in one JVM) on loopback, with on-disk storage.

The jars come from Maven Central through ``deploy/kafka/pom.xml`` (``ensure_kafka_jars``); Java 17+ runs them.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import IO

from dtwin.broker import BrokerError, free_port, make_broker

REPO_ROOT = Path(__file__).resolve().parents[1]
POM = REPO_ROOT / "deploy" / "kafka" / "pom.xml"
DEFAULT_LIB = REPO_ROOT / ".kafka" / "lib"
LIB_ENV = "DTWIN_KAFKA_LIB"
FALLBACK_KAFKA_VERSION = "4.4.0"

# The broker settings shared with the `kafka` service of docker-compose.yml (as its KAFKA_* environment);
# tests/test_kafka_broker.py checks that the two agree. Listeners, quorum voters and log.dirs depend on where
# the broker runs, so each side derives its own (see TOPOLOGY_SETTINGS).
BROKER_SETTINGS: dict[str, str] = {
    "node.id": "1",
    "process.roles": "broker,controller",
    "inter.broker.listener.name": "PLAINTEXT",
    "controller.listener.names": "CONTROLLER",
    "offsets.topic.replication.factor": "1",
    "transaction.state.log.replication.factor": "1",
    "transaction.state.log.min.isr": "1",
    "group.initial.rebalance.delay.ms": "0",
    "num.partitions": "4",
}
TOPOLOGY_SETTINGS = frozenset({
    "listeners", "advertised.listeners", "listener.security.protocol.map", "controller.quorum.voters", "log.dirs",
})
# Only for this local broker: fewer threads on a small machine, and the share-group state topic (Kafka 4.x)
# at one replica like the other internal topics, or a share group could never start on one node.
LOCAL_SETTINGS: dict[str, str] = {
    "num.network.threads": "2",
    "num.io.threads": "4",
    "background.threads": "4",
    "num.recovery.threads.per.data.dir": "1",
    "log.cleaner.threads": "1",
    "share.coordinator.state.topic.replication.factor": "1",
    "share.coordinator.state.topic.min.isr": "1",
    # Heartbeats gate the broker's unfencing at startup: shorter ones make it serve sooner. After a SIGKILL the
    # restarted broker cannot register until the old session expires: broker and controller share one JVM here,
    # so a short session (default 9 s) costs nothing.
    "broker.heartbeat.interval.ms": "500",
    "broker.session.timeout.ms": "3000",
}
JVM_OPTS_ENV = "DTWIN_KAFKA_JVM_OPTS"  # replaces JVM_OPTS, e.g. for a bigger heap
JVM_OPTS = ["-Xms128m", "-Xmx512m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-Djava.awt.headless=true"]
CONFIG_NAME = "dtwin-server.properties"
LOG4J_NAME = "dtwin-log4j2.properties"
LOG4J = """\
status = warn
appender.console.type = Console
appender.console.name = STDOUT
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = {level}
rootLogger.appenderRef.stdout.ref = STDOUT
logger.raft.name = kafka.server.KafkaRaftServer
logger.raft.level = info
"""


def kafka_version(pom: Path = POM) -> str:
    """The Kafka version that deploy/kafka/pom.xml resolves."""
    with contextlib.suppress(OSError):
        match = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", pom.read_text(encoding="utf-8"))
        if match:
            return match.group(1).strip()
    return FALLBACK_KAFKA_VERSION


def _jars_ready(lib: Path, version: str) -> bool:
    return (lib / f"kafka_2.13-{version}.jar").is_file()


def ensure_kafka_jars(lib_dir: str | Path | None = None) -> Path:
    """The folder of Kafka's jars ($DTWIN_KAFKA_LIB, else .kafka/lib); fetched once with Maven if not there."""
    chosen = lib_dir or os.environ.get(LIB_ENV)
    lib = Path(chosen).expanduser().resolve() if chosen else DEFAULT_LIB
    version = kafka_version()
    if _jars_ready(lib, version):
        return lib
    where = f"{lib}" + (f" (from ${LIB_ENV})" if not lib_dir and os.environ.get(LIB_ENV) else "")
    if not POM.is_file():
        raise BrokerError(f"Apache Kafka {version}'s jars are not in {where}, and {POM} (which fetches them) is "
                          f"missing: point ${LIB_ENV} at a folder of Kafka's jars")
    mvn = shutil.which("mvn")
    if mvn is None:
        raise BrokerError(f"Apache Kafka {version}'s jars are not in {where}, and Maven (mvn) is not installed to "
                          "fetch them: run `make tools` (or apt-get install maven), or set $" + LIB_ENV)
    lib.parent.mkdir(parents=True, exist_ok=True)
    # Into a fresh folder, then renamed: an interrupted or concurrent fetch never leaves a half-filled lib.
    staging = Path(tempfile.mkdtemp(prefix=".kafka-lib-", dir=lib.parent))
    try:
        cmd = [mvn, "-q", "-B", "-f", str(POM), "dependency:copy-dependencies", f"-DoutputDirectory={staging}"]
        print(f"fetching Apache Kafka {version} jars into {lib} (Maven Central)", file=sys.stderr)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            raise BrokerError("Maven did not fetch Kafka's jars within 15 min: is Maven Central reachable?") from None
        if proc.returncode != 0 or not _jars_ready(staging, version):
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise BrokerError(f"Maven could not fetch Apache Kafka {version}'s jars (network to Maven Central?): "
                              f"{' '.join(cmd)} exited with {proc.returncode}\n{tail}")
        if _jars_ready(lib, version):  # another process got there first
            return lib
        if lib.exists():  # jars of another version
            shutil.rmtree(lib)
        staging.rename(lib)
        return lib
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def java_binary() -> str:
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").is_file():
        return str(Path(home) / "bin" / "java")
    java = shutil.which("java")
    if java is None:
        raise BrokerError("Apache Kafka needs Java 17 or newer, and no `java` is on PATH (nor in $JAVA_HOME): "
                          "run `make tools` or apt-get install openjdk-17-jre-headless")
    return java


def random_cluster_id() -> str:
    # Kafka's own Uuid.randomUuid() rejects ids whose base64url form starts with '-'.
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def server_properties(port: int, controller_port: int, data_dir: Path, host: str = "127.0.0.1") -> dict[str, str]:
    return {
        **BROKER_SETTINGS,
        "listeners": f"PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://{host}:{port}",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        # A static quorum, like the compose service: it does not remember the controller's address, so a
        # restart on the same data dir may use other ports.
        "controller.quorum.voters": f"{BROKER_SETTINGS['node.id']}@{host}:{controller_port}",
        "log.dirs": str(data_dir),
        **LOCAL_SETTINGS,
    }


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _tail(path: Path | None, lines: int = 20) -> str:
    if path is None:
        return ""
    with contextlib.suppress(OSError):
        text = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        return "\n".join(text[-lines:])
    return ""


def _short_bootstrap(client: type) -> dict[str, int]:
    # A client blocks in its constructor until it bootstraps (30 s by default in kafka-python 3, and a first
    # attempt against a broker still starting can hang that long): short tries, repeated, see it up sooner.
    for name in ("bootstrap_timeout_ms", "api_version_auto_timeout_ms"):
        if name in getattr(client, "DEFAULT_CONFIG", {}):
            return {name: 2000}
    return {}


class KafkaBroker:
    """Apache Kafka in KRaft mode on loopback; its log dir ``data_dir`` keeps topics and offsets across restarts."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", data_dir: str | Path | None = None,
                 log_path: str | Path | None = None, lib_dir: str | Path | None = None) -> None:
        self.host = host
        self.port = port or free_port()
        self.controller_port = free_port()
        self.data_dir = Path(data_dir).resolve() if data_dir else Path(tempfile.mkdtemp(prefix="dtwin-kafka-"))
        # Kafka only reads the subfolders of its log dir, so the config and log may sit beside the partitions.
        self.log_path: Path | None = Path(log_path) if log_path else self.data_dir / "dtwin-broker.log"
        self.lib_dir = lib_dir
        self.process: subprocess.Popen | None = None
        self.start_seconds: float | None = None
        self._log: IO[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.data_dir / CONFIG_NAME

    def formatted(self) -> bool:
        return (self.data_dir / "meta.properties").is_file()

    def _write_config(self) -> None:
        if self.controller_port == self.port:
            self.controller_port = free_port()
        props = server_properties(self.port, self.controller_port, self.data_dir, self.host)
        self.config_path.write_text("".join(f"{k}={v}\n" for k, v in props.items()), encoding="utf-8")
        level = os.environ.get("DTWIN_KAFKA_LOG_LEVEL", "warn")
        (self.data_dir / LOG4J_NAME).write_text(LOG4J.format(level=level), encoding="utf-8")

    def _java(self, lib: Path, main: str, *args: str) -> list[str]:
        opts = shlex.split(os.environ.get(JVM_OPTS_ENV, "")) or JVM_OPTS
        return [java_binary(), *opts, f"-Dlog4j2.configurationFile={self.data_dir / LOG4J_NAME}",
                "-cp", str(lib / "*"), main, *args]

    def _format(self, lib: Path) -> None:
        cmd = self._java(lib, "kafka.tools.StorageTool", "format", "-t", random_cluster_id(),
                         "-c", str(self.config_path))
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise BrokerError(f"kafka-storage format of {self.data_dir} failed ({proc.returncode}):\n"
                              f"{(proc.stdout + proc.stderr).strip()[-2000:]}")

    def start(self, timeout: float = 60.0) -> KafkaBroker:
        if self.process is not None and self.process.poll() is None:
            return self
        t0 = time.monotonic()
        java_binary()  # the clearer error first: Maven needs Java too
        lib = ensure_kafka_jars(self.lib_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        if not self.formatted():
            self._format(lib)
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "ab")  # noqa: SIM115
        out = self._log or subprocess.DEVNULL
        self.process = subprocess.Popen(self._java(lib, "kafka.Kafka", str(self.config_path)), stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_ready(t0 + timeout)
        except BaseException:
            self.kill()
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    def _wait_ready(self, deadline: float) -> None:
        from kafka import KafkaAdminClient
        from kafka.errors import KafkaConfigurationError, KafkaError

        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise BrokerError(f"Kafka exited with code {self.process.returncode} while starting "
                                  f"(log {self.log_path}):\n{_tail(self.log_path)}")
            if not _port_open(self.host, self.port):
                time.sleep(0.1)
                continue
            try:
                admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, client_id="dtwin-ready",
                                         request_timeout_ms=3000, **_short_bootstrap(KafkaAdminClient))
                try:
                    admin.list_topics()
                    if admin.describe_cluster().get("brokers"):
                        return
                finally:
                    admin.close()
            except KafkaConfigurationError:
                raise
            except (KafkaError, OSError) as e:
                last = e
            time.sleep(0.2)
        raise BrokerError(f"Kafka on {self.bootstrap} did not answer a metadata request in time ({last!r}); "
                          f"log {self.log_path}:\n{_tail(self.log_path)}")

    def _signal(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self, timeout: float = 30.0) -> None:
        """Clean shutdown (SIGTERM): Kafka flushes and closes its logs, so a restart recovers nothing."""
        if self.process is not None and self.process.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close_log()

    def kill(self) -> None:
        """SIGKILL the broker's process group: a crash, as a power cut would leave it."""
        if self.process is not None and self.process.poll() is None:
            self._signal(signal.SIGKILL)
            self.process.wait()
        self._close_log()

    def restart(self, timeout: float = 60.0) -> KafkaBroker:
        self.stop()
        return self.start(timeout)

    def __enter__(self) -> KafkaBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_broker_cli(kind: str, port: int | None, data_dir: str | None) -> int:
    """``dtwin broker``: run one broker in the foreground until SIGTERM or SIGINT, then stop it cleanly."""
    try:
        broker = make_broker(kind, port=port, data_dir=data_dir)
        broker.start()
    except BrokerError as e:
        print(f"dtwin broker: {e}", file=sys.stderr)
        return 1
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        print(f"bootstrap {broker.bootstrap}", flush=True)
        if isinstance(broker, KafkaBroker):
            print(f"data dir {broker.data_dir}", flush=True)
            print(f"log {broker.log_path}", flush=True)
        while not stop.wait(1.0):
            if broker.process is not None and broker.process.poll() is not None:
                print(f"dtwin broker: the {kind} broker exited with code {broker.process.returncode}", file=sys.stderr)
                return 1
        return 0
    finally:
        broker.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
