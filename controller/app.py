"""The Faust app: ``faust -A controller.app worker`` or ``dtwin controller``.

Settings come from ``DTWIN_*`` environment variables (see :mod:`controller.config`). The agent
takes batches of raw samples, runs them through the pure :class:`controller.engine.Engine`,
stores each site's window in a changelogged table, and produces commands and dead letters.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import time
from pathlib import Path

import faust
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

from contracts.messages import Rejected, encode_command, encode_dead_letter, parse_sample
from contracts.state import decode_state, encode_state
from contracts.topics import WINDOW_TABLE, Topics
from controller.config import ControllerConfig
from controller.engine import Engine
from controller.metrics import LoopMetrics
from controller.policy import SHADOW_NAMES, allocators_from_manifest, live_name
from export.artifact import MANIFEST_FILE, ArtifactError, ModelArtifact, load_artifact

log = logging.getLogger("dtwin.controller")
LOG_LEVELS = {"crit": logging.CRITICAL, "error": logging.ERROR, "warn": logging.WARNING, "info": logging.INFO,
              "debug": logging.DEBUG}

config = ControllerConfig.from_env()
topics = Topics(config.topic_prefix)


def _bounded_fetch_wait(create):
    """Faust hard-codes fetch_max_wait_ms=1500 for its worker consumer. Tansu (the embedded broker)
    holds a fetch that long even while records arrive (tools/repro_tansu_fetch_wait.py), which adds
    up to a second of latency; a short wait costs Apache Kafka only a few more idle fetches."""

    def create_worker_consumer(self, transport):
        consumer = create(self, transport)
        consumer._fetch_max_wait_ms = config.fetch_max_wait_ms
        return consumer

    return create_worker_consumer


AIOKafkaConsumerThread._create_worker_consumer = _bounded_fetch_wait(AIOKafkaConsumerThread._create_worker_consumer)

app = faust.App(
    config.app_id,
    broker=f"kafka://{config.bootstrap}",
    web_port=config.web_port,
    store="memory://",
    topic_partitions=config.partitions,
    topic_allow_declare=False,  # topics are created up front by `dtwin topics create`
    topic_disable_leader=True,
    consumer_auto_offset_reset="earliest",
    datadir=config.state_dir,
    producer_acks=-1,
    # Faust's 60 s default keeps a dead worker's partitions idle for a minute or two (Tansu also
    # waits out the session of a worker that stopped cleanly); 10 s moves them on quickly.
    broker_session_timeout=config.session_timeout_seconds,
    broker_heartbeat_interval=min(3.0, config.session_timeout_seconds / 3),
)

samples_topic = app.topic(topics.samples, key_type=bytes, value_type=bytes, key_serializer="raw",
                          value_serializer="raw", partitions=config.partitions)

# Per-site window and pending decision, encoded by controller.state. Keys are the site as bytes,
# exactly the record key, and the changelog uses the producer's partitioner, so a key's changelog
# partition is its source partition.
# Commands, dead letters and changelog records go out through send_raw (see there).
windows = app.Table(WINDOW_TABLE, default=None, partitions=config.partitions, use_partitioner=True,
                    key_type=bytes, value_type=bytes)  # bytes types make Faust use the raw codec


class Runtime:
    """The live model, its allocators and the metrics; swapped atomically on a new artifact."""

    def __init__(self, cfg: ControllerConfig) -> None:
        self.cfg = cfg
        self.metrics = LoopMetrics([live_name(cfg.policy), *SHADOW_NAMES], cfg.sla_target, cfg.metrics_max_sites)
        self.artifact: ModelArtifact | None = None
        self.engine: Engine | None = None
        self.manifest_stamp: str | None = None

    def _timed_predict(self, artifact: ModelArtifact):
        def predict(x):
            with self.metrics.inference.time():
                return artifact.predict(x)
        return predict

    def install(self, artifact: ModelArtifact) -> None:
        live, shadows = allocators_from_manifest(artifact.manifest, self.cfg.policy, self.cfg.sla_target,
                                                 self.cfg.capacity_floor, self.cfg.capacity_ceiling)
        engine = Engine(self._timed_predict(artifact), live, shadows, artifact.window,
                        int(artifact.manifest["step_seconds"]))
        self.artifact, self.engine = artifact, engine
        self.manifest_stamp = artifact.sha256
        self.metrics.set_model(artifact.name, artifact.version, artifact.sha256)
        log.info("serving model %s (%s)", artifact.version, artifact.sha256[:12])

    def load_initial(self) -> None:
        self.install(load_artifact(self.cfg.model_dir))

    async def maybe_swap(self) -> None:
        """Load a new artifact if the manifest's sha256 changed; keep serving the old one if it fails."""
        manifest_path = Path(self.cfg.model_dir) / MANIFEST_FILE
        try:
            stamp = json.loads(manifest_path.read_text())["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            return
        if stamp == self.manifest_stamp:
            return
        try:
            artifact = await asyncio.get_running_loop().run_in_executor(None, load_artifact, self.cfg.model_dir)
            self.install(artifact)
            self.metrics.model_swaps.labels("loaded").inc()
        except (ArtifactError, ValueError, KeyError) as exc:
            self.manifest_stamp = stamp  # do not retry the same bad artifact every poll
            self.metrics.model_swaps.labels("rejected").inc()
            log.error("new model artifact rejected, still serving %s: %s",
                      self.artifact.version if self.artifact else None, exc)


runtime = Runtime(config)


async def send_raw(topic: str, key: bytes | None, value: bytes):
    """Hand an already-encoded record to the producer; returns its delivery future.

    Faust's ``Topic.send`` wraps every record in channel, schema and future-message layers that
    cost about as much as the rest of the pipeline; these records need none of them.
    """
    return await app.producer.send(topic, key, value, partition=None, timestamp=None, headers=None)


# Not a site: sites are non-empty text, this key starts with a NUL byte. Its value is empty.
CHANGELOG_MARKER_KEY = b"\x00dtwin-changelog-marker"


async def write_markers(changelog: str, partitions: set[int]) -> None:
    """One marker record alone in its produce batch per changelog partition, after the batch's state.

    Tansu reports a partition's end offset as the last produce batch's base offset + 1
    (tools/repro_tansu_high_watermark.py), and Faust's recovery reads only up to that offset: it
    would miss the state records that shared the last batch. A lone marker last puts the reported
    end past all of them. Off (DTWIN_CHANGELOG_MARKERS=0) on Apache Kafka, which needs none.
    """
    await _deliver([await app.producer.send(changelog, CHANGELOG_MARKER_KEY, b"", partition=p, timestamp=None,
                                            headers=None) for p in sorted(partitions)])


async def _deliver(futures: list) -> None:
    if futures:
        await asyncio.gather(*futures)


async def process_events(events) -> None:
    metrics = runtime.metrics
    engine = runtime.engine
    assert engine is not None and runtime.artifact is not None
    samples = []
    sample_events = []
    futures = []
    now = time.time()
    for ev in events:
        msg = ev.message
        try:
            sample = parse_sample(ev.value)
            if msg.key is not None and msg.key != sample.site.encode():
                raise Rejected("key_mismatch", f"record key {msg.key!r} is not the site {sample.site!r}")
        except Rejected as rej:
            metrics.rejected.labels(rej.reason).inc()
            futures.append(await send_raw(topics.dead_letter, msg.key, encode_dead_letter(
                ev.value, rej.reason, rej.detail, msg.topic, msg.partition, msg.offset, msg.key, now)))
            continue
        samples.append(sample)
        sample_events.append(ev)

    sites = {s.site for s in samples}
    stored = {site: windows.data.get(site.encode()) for site in sites}
    states = {site: decode_state(raw) if raw is not None else None for site, raw in stored.items()}
    result = engine.process(states, samples)
    changelog = windows.changelog_topic.get_topic_name()
    state_futures = []
    for site, state in result.states.items():
        # What Table.__setitem__ does (local store + changelog record), but through the same raw
        # send path as the commands and awaited with them, so offsets commit only after it is stored.
        key, value = site.encode(), encode_state(state)
        windows.data[key] = value
        state_futures.append(await send_raw(changelog, key, value))

    for idx, reason, detail in result.rejects:
        msg = sample_events[idx].message
        futures.append(await send_raw(topics.dead_letter, msg.key, encode_dead_letter(
            sample_events[idx].value, reason, detail, msg.topic, msg.partition, msg.offset, msg.key, now)))
    version = runtime.artifact.version
    live = engine.live.name
    decided_at = time.time()
    command_futures = []
    for d in result.decisions:
        command_futures.append(await send_raw(topics.commands, d.site.encode(), encode_command(
            d.site, d.ts, d.allocations[live], d.forecast, live, version, decided_at)))
    await _deliver(futures + command_futures + state_futures)
    if config.changelog_markers and state_futures:
        await write_markers(changelog, {fut.result().partition for fut in state_futures})
    metrics.observe_latency(sample_events[i].message for i in result.decision_sample)
    metrics.commands.inc(len(command_futures))
    metrics.observe(result)
    metrics.batch_done(len(events))


async def forward_events(events) -> None:
    """The null pipeline: parse each sample and produce one message for it, no model, no table."""
    metrics = runtime.metrics
    futures = []
    for ev in events:
        try:
            sample = parse_sample(ev.value)
        except Rejected as rej:
            metrics.rejected.labels(rej.reason).inc()
            continue
        futures.append(await send_raw(topics.commands, ev.message.key, sample.to_json()))
    await _deliver(futures)
    metrics.observe_latency(ev.message for ev in events)
    metrics.commands.inc(len(futures))
    metrics.batch_done(len(events))


@app.agent(samples_topic)
async def control(stream):
    handler = forward_events if config.pipeline == "null" else process_events
    async for events in stream.take_events(config.batch_size, within=config.batch_within_ms / 1000.0):
        if events:
            await handler(events)


@app.task
async def start_metrics_endpoint() -> None:
    # Faust's start-up spinner leaves the root logger at DEBUG whatever -l says, and then every
    # aiokafka debug call in the produce path builds a LogRecord (about a tenth of the CPU).
    logging.getLogger().setLevel(LOG_LEVELS[config.log_level])
    # The worker allocates many short-lived objects per record; moving the start-up heap out of the
    # collector's view and collecting less often keeps collector pauses out of the latency tail.
    gc.collect()
    gc.freeze()
    gc.set_threshold(config.gc_gen0_threshold, 20, 100)
    if config.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(config.metrics_port, addr="0.0.0.0", registry=runtime.metrics.registry)
        log.info("Prometheus metrics on :%d/metrics", config.metrics_port)


@app.timer(interval=config.model_poll_seconds)
async def watch_model() -> None:
    if config.pipeline == "control":
        await runtime.maybe_swap()


@app.page("/dtwin/summary")
async def summary(web, request):
    return web.json({"model": runtime.artifact.version if runtime.artifact else None,
                     "allocators": runtime.metrics.summaries()})


if config.pipeline == "control":
    runtime.load_initial()
