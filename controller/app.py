"""The Faust controller: ``dtwin controller`` builds a :class:`Controller` from its settings and runs
one worker. Importing this module does nothing; the app, its topics, table, agent and timers are
declared when a Controller is made, and the model is loaded when the worker starts.

Per batch of raw sample records, in this order (a controller never loses a decision):

1. parse and validate each record (bad ones become dead letters with their reason);
2. run the pure :class:`controller.engine.Engine` over the sites' stored states;
3. deliver the commands and dead letters and wait for the broker's acknowledgement;
4. store the new site states: changelog records (to the source record's partition), then the
   local table;
5. only then does the batch end, so Faust acks it and its offsets can be committed.

A delivery that still fails after ``delivery_attempts`` tries stops the worker at once, without
acking the batch: it is redelivered to whichever worker takes the partition, and the engine's
offset check makes redelivery idempotent.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from collections.abc import Sequence

import faust
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from contracts.messages import Rejected, check_key, encode_command, encode_dead_letter, parse_sample
from contracts.state import StateError, decode_state, encode_state
from contracts.topics import WINDOW_TABLE, Topics
from controller import faust_patches
from controller.engine import ALL_ALLOCATORS, CANDIDATE, CURRENT, Engine, EngineSettings
from controller.metrics import FleetMetrics
from controller.serving import persistence_headroom, served_model
from controller.settings import ControllerSettings

log = logging.getLogger("dtwin.controller")
LOG_LEVELS = {"crit": logging.CRITICAL, "error": logging.ERROR, "warn": logging.WARNING, "info": logging.INFO,
              "debug": logging.DEBUG}
# Not a site: sites are non-empty text, this key starts with a NUL byte. Its value is empty.
CHANGELOG_MARKER_KEY = b"\x00dtwin-changelog-marker"
EXIT_DELIVERY_FAILED = 70
EXIT_FAULT_INJECTED = 99


def faust_credentials(settings: ControllerSettings):
    """SASL/TLS settings for Faust's consumers and producers, from the same DTWIN_KAFKA_* variables
    that the replay producer and topic admin use."""
    sec = settings.security()
    if sec.security_protocol == "PLAINTEXT":
        return None
    import ssl

    context = None
    if sec.uses_ssl:
        context = ssl.create_default_context(cafile=sec.ssl_cafile)
        if sec.ssl_certfile:
            context.load_cert_chain(sec.ssl_certfile, sec.ssl_keyfile)
    if sec.security_protocol.startswith("SASL"):
        return faust.SASLCredentials(username=sec.sasl_username, password=sec.sasl_password, ssl_context=context,
                                     mechanism=sec.sasl_mechanism)
    return faust.SSLCredentials(context)


class Controller:
    """One worker's app, topics, table, agent, timers and web page, and the models it serves."""

    def __init__(self, settings: ControllerSettings) -> None:
        self.settings = s = settings
        self.topics = Topics(s.topic_prefix)
        self.app = faust.App(
            s.app_id,
            broker=f"kafka://{s.bootstrap}",
            broker_credentials=faust_credentials(s),
            web_port=s.web_port,
            store="memory://",
            topic_partitions=s.partitions,
            topic_allow_declare=False,  # topics are created up front by `dtwin topics create`
            topic_disable_leader=True,
            consumer_auto_offset_reset="earliest",
            datadir=s.state_dir,
            producer_acks=-1,
            # Faust's 60 s default keeps a dead worker's partitions idle for a minute or two; 10 s
            # moves them on quickly (Tansu also waits out the session of a worker that stopped cleanly).
            broker_session_timeout=s.session_timeout_seconds,
            broker_heartbeat_interval=min(3.0, s.session_timeout_seconds / 3),
            autodiscover=False,
        )
        self.samples_topic = self.app.topic(self.topics.samples, key_type=bytes, value_type=bytes,
                                            key_serializer="raw", value_serializer="raw", partitions=s.partitions)
        # Per-site state, encoded by contracts.state (bytes types make Faust use the raw codec). Its
        # changelog records are written by this worker to the source record's partition, so a site's
        # state always sits in the changelog partition that its samples' partition restores.
        self.windows = self.app.Table(WINDOW_TABLE, default=None, partitions=s.partitions, key_type=bytes,
                                      value_type=bytes)
        self.metrics = FleetMetrics(ALL_ALLOCATORS, s.sla_target, s.metrics_max_sites)
        self.engine: Engine | None = None
        self.active = None
        self.candidate = None
        self.model_source = None
        self.batches = 0
        self._next_offset: dict = {}  # source TP -> the offset its next record must have
        self.fault = self._parse_fault(s.fault_point)

        # Faust binds a page's first argument to its view and names tasks after their functions, so the
        # declarations take plain closures rather than bound methods.
        async def control(stream) -> None:
            await self._control(stream)

        async def on_start() -> None:
            await self._on_start()

        async def watch_model() -> None:
            await self._watch_model()

        async def update_lag() -> None:
            await self._update_lag()

        async def summary_page(web, request):
            return web.json(self.summary())

        self.app.agent(self.samples_topic, name=f"{s.app_id}.control")(control)
        self.app.task(on_start)
        self.app.timer(interval=s.model_poll_seconds)(watch_model)
        self.app.timer(interval=5.0)(update_lag)
        self.app.page("/dtwin/summary")(summary_page)
        self.app.on_partitions_assigned.connect(self._on_assigned)
        self.app.on_rebalance_complete.connect(self._on_rebalance_complete)

    @staticmethod
    def _parse_fault(text: str | None) -> tuple[str, int] | None:
        if not text:
            return None
        step, _, n = text.partition(":")
        if step not in ("after_commands", "after_state", "mid_send"):
            raise ValueError(f"DTWIN_FAULT_POINT step must be after_commands, after_state or mid_send, got {step!r}")
        return step, int(n or 1)

    def _maybe_fault(self, step: str) -> None:
        if self.fault is not None and self.fault == (step, self.batches):
            log.critical("fault injection: exiting at %s of batch %d", step, self.batches)
            os._exit(EXIT_FAULT_INJECTED)

    # --- models ---------------------------------------------------------------------------------
    def load_models(self) -> None:
        from controller.model_source import ModelSource

        s = self.settings

        def validate(artifact) -> None:  # what install() needs of a manifest, checked before any swap
            served_model(artifact, s.sla_target)
            persistence_headroom(artifact.manifest, s.sla_target)
            if int(artifact.manifest["step_seconds"]) <= 0:
                raise ValueError(f"step_seconds must be positive, got {artifact.manifest['step_seconds']!r}")

        self.model_source = ModelSource(None if s.model_registry else s.model_dir, s.model_registry, s.state_dir,
                                        on_event=self._on_model_event, poll_seconds=s.model_poll_seconds,
                                        validate=validate)
        active, candidate = self.model_source.load_initial()
        self.install(active, candidate, first=True)

    def install(self, active, candidate, first: bool = False) -> None:
        """Build the engine for these artifacts; the agent picks it up at its next batch."""
        s = self.settings
        timer = self.metrics.inference
        engine = Engine(
            EngineSettings(window=active.window, step_seconds=int(active.manifest["step_seconds"]),
                           persistence=persistence_headroom(active.manifest, s.sla_target), policy=s.policy,
                           warmup=s.baseline_warmup_intervals, horizon_intervals=s.future_horizon_intervals,
                           floor=s.capacity_floor, ceiling=s.capacity_ceiling),
            served_model(active, s.sla_target, timer),
            served_model(candidate, s.sla_target) if candidate is not None else None)
        if (candidate.sha256 if candidate else None) != (self.candidate.sha256 if self.candidate else None):
            self.metrics.reset_allocators((CANDIDATE, CURRENT))
        self.active, self.candidate, self.engine = active, candidate, engine
        self.metrics.set_model("active", active.name, active.version, active.sha256)
        if candidate is not None:
            self.metrics.set_model(CANDIDATE, candidate.name, candidate.version, candidate.sha256)
        else:
            self.metrics.set_model(CANDIDATE, None, None, None)
        if not first:
            self.metrics.model_swaps.inc()
        log.warning("serving model %s (%s)%s", active.version, active.sha256[:12],
                    f", candidate {candidate.version} in shadow" if candidate is not None else "")

    def _on_model_event(self, event) -> None:
        if event.kind == "refused":
            self.metrics.swap_refusals.labels(event.reason).inc()
            log.error("model artifact refused (%s, %s): %s; still serving %s", event.role, event.reason,
                      event.message, self.active.version if self.active else None)
        elif event.kind == "last_good":
            self.metrics.serving_last_good.set(1)
            log.error("current model failed verification; serving the last verified version: %s", event.message)
        elif event.kind == "loaded" and event.role == "active":
            self.metrics.serving_last_good.set(0)

    async def _watch_model(self) -> None:
        if self.model_source is None or self.settings.pipeline != "control":
            return
        try:
            update = await self.model_source.poll()
            if update is not None:
                active = update.active or self.active
                candidate = self.candidate if update.candidate is None and not update.candidate_removed \
                    else update.candidate
                self.install(active, candidate)
        except Exception:  # the watcher must never stop the worker
            log.exception("model watch failed; still serving %s", self.active.version if self.active else None)

    # --- the batch cycle --------------------------------------------------------------------------
    async def _control(self, stream) -> None:
        s = self.settings
        handler = self._forward if s.pipeline == "null" else self._process
        async for events in stream.take_events(s.batch_size, within=s.batch_within_ms / 1000.0):
            if events:
                self.batches += 1
                try:
                    self._check_sequence(events)
                    await handler(events)
                except Exception:
                    # take_events acks a batch whose handler raised; stop before it can.
                    log.critical("batch %d failed; stopping the worker without acking it", self.batches,
                                 exc_info=True)
                    logging.shutdown()
                    os._exit(EXIT_DELIVERY_FAILED)

    def _check_sequence(self, events) -> None:
        """Count and log a jump in a source partition's offsets: records the consumer never handed over.

        The samples topic is neither compacted nor transactional, so its offsets never jump. Faust 0.15.3
        skipped records after an assignment until controller.faust_patches; this guard makes any
        recurrence visible (`dtwin_fetch_skips_total`, an error log naming the offsets), and the fault
        tests assert it stays 0.
        """
        committed = getattr(self.app.consumer, "_committed_offset", {})
        for ev in events:
            msg = ev.message
            expected = self._next_offset.get(msg.tp)
            if expected is None:
                expected = committed.get(msg.tp)
            if expected is not None and msg.offset > expected:
                self.metrics.fetch_skips.inc()
                log.error("%s: records %d..%d never reached the worker (skipped by the consumer)", msg.tp,
                          expected, msg.offset - 1)
            self._next_offset[msg.tp] = msg.offset + 1

    async def _send_all(self, records: Sequence[tuple[str, bytes | None, bytes, int | None]],
                        mid_send_fault: bool = False) -> None:
        """Hand records to the producer and wait until the broker has acknowledged every one, retrying
        the whole group (identical bytes) on an error."""
        producer = self.app.producer
        first = True
        async for attempt in AsyncRetrying(stop=stop_after_attempt(self.settings.delivery_attempts),
                                           wait=wait_exponential(multiplier=0.2, max=5.0),
                                           retry=retry_if_exception_type(Exception), reraise=True):
            with attempt:
                if not first:
                    self.metrics.batch_retries.inc()
                    log.warning("retrying delivery of %d records (attempt %d)", len(records),
                                attempt.retry_state.attempt_number)
                first = False
                futures = []
                for k, (topic, key, value, partition) in enumerate(records):
                    if mid_send_fault and k == len(records) // 2:
                        self._maybe_fault("mid_send")
                    futures.append(await producer.send(topic, key, value, partition=partition, timestamp=None,
                                                       headers=None))
                if futures:
                    await asyncio.gather(*futures)

    async def _process(self, events) -> None:
        m = self.metrics
        engine = self.engine  # swaps take effect between batches only
        assert engine is not None
        now = time.time()
        dead: list[tuple[object, str, str]] = []
        samples, positions, sample_events = [], [], []
        for ev in events:
            msg = ev.message
            try:
                sample = parse_sample(msg.value)
                check_key(msg.key, sample.site)
            except Rejected as rej:
                dead.append((msg, rej.reason, rej.detail))
                m.rejected.labels(rej.reason).inc()  # the engine's rejects are counted by m.observe
                continue
            samples.append(sample)
            positions.append((msg.partition, msg.offset))
            sample_events.append(ev)

        states = {}
        for site in {smp.site for smp in samples}:
            raw = self.windows.data.get(site.encode())
            try:
                states[site] = decode_state(raw) if raw is not None else None
            except StateError as exc:
                m.state_resets.labels("corrupt").inc()
                log.error("site %r: stored state does not decode (%s); the site starts afresh", site, exc)
                states[site] = None
        result = engine.process(states, samples, positions, now)

        for idx, reason, detail in result.rejects:
            dead.append((sample_events[idx].message, reason, detail))
        outgoing: list[tuple[str, bytes | None, bytes, int | None]] = []
        for c in (*result.commands, *result.reemitted):
            outgoing.append((self.topics.commands, c.site.encode(), encode_command(
                c.site, c.ts, c.allocated, c.forecast, c.policy, c.model_version, c.decided_at), None))
        for msg, reason, detail in dead:
            outgoing.append((self.topics.dead_letter, msg.key, encode_dead_letter(
                msg.value, reason, detail, msg.topic, msg.partition, msg.offset, msg.key, now), None))
        await self._send_all(outgoing, mid_send_fault=self.fault is not None)
        self._maybe_fault("after_commands")

        changelog = self.windows.changelog_topic.get_topic_name()
        site_partition = {smp.site: pos[0] for smp, pos in zip(samples, positions, strict=True)}
        stored = [(changelog, site.encode(), encode_state(st), site_partition[site])
                  for site, st in result.states.items()]
        await self._send_all(stored)
        for _, key, value, _ in stored:
            self.windows.data[key] = value
        if self.settings.changelog_markers and stored:
            await self._send_all([(changelog, CHANGELOG_MARKER_KEY, b"", p) for p in sorted({r[3] for r in stored})])
        self._maybe_fault("after_state")

        m.observe_latency(sample_events[c.sample].message for c in result.commands)
        for c in result.commands:
            m.commands.labels(c.policy).inc()
        if result.reemitted:
            m.reemitted.inc(len(result.reemitted))
        m.observe(result, {site: {"ai_sla": st.q_ai, "persistence_sla": st.q_persistence}
                           for site, st in result.states.items() if site in m.labelled})
        m.batch_done(len(events))

    async def _forward(self, events) -> None:
        """The null pipeline: parse each sample and produce one message for it, no model, no table."""
        m = self.metrics
        out = []
        for ev in events:
            try:
                sample = parse_sample(ev.message.value)
            except Rejected as rej:
                m.rejected.labels(rej.reason).inc()
                continue
            out.append((self.topics.commands, ev.message.key, sample.to_json(), None))
        await self._send_all(out)
        m.observe_latency(ev.message for ev in events)
        m.commands.labels("null").inc(len(out))
        m.batch_done(len(events))

    # --- housekeeping -----------------------------------------------------------------------------
    async def _on_start(self) -> None:
        s = self.settings
        # Faust's start-up spinner leaves the root logger at DEBUG whatever -l says, and then every
        # aiokafka debug call in the produce path builds a LogRecord (about a tenth of the CPU).
        logging.getLogger().setLevel(LOG_LEVELS[s.log_level])
        # The worker allocates many short-lived objects per record; moving the start-up heap out of the
        # collector's view and collecting less often keeps collector pauses out of the latency tail.
        gc.collect()
        gc.freeze()
        gc.set_threshold(s.gc_gen0_threshold, 20, 100)
        if s.metrics_port:
            from prometheus_client import start_http_server

            start_http_server(s.metrics_port, addr=s.metrics_bind, registry=self.metrics.registry)
            log.warning("Prometheus metrics on %s:%d/metrics", s.metrics_bind, s.metrics_port)

    async def _on_assigned(self, app, assigned=(), *args, **kwargs) -> None:
        self._next_offset.clear()  # the next records continue from the committed offsets
        self.metrics.rebalances.inc()
        self.metrics.assigned.set(len([tp for tp in assigned if tp.topic == self.topics.samples]))

    async def _on_rebalance_complete(self, app, *args, **kwargs) -> None:
        self.metrics.recoveries.inc()

    async def _update_lag(self) -> None:
        try:
            consumer = self.app.consumer
            tps = [tp for tp in consumer.assignment() if tp.topic == self.topics.samples]
        except Exception:  # not started or mid-rebalance
            return
        self.metrics.lag.clear()
        for tp in tps:
            try:
                high = consumer.highwater(tp)
                read = consumer._read_offset.get(tp)
            except Exception:
                continue
            if high is None:
                continue
            behind = high - (read + 1 if read is not None else 0)
            self.metrics.lag.labels(tp.topic, str(tp.partition)).set(max(behind, 0))

    def summary(self) -> dict:
        return {"model": self.active.version if self.active else None,
                "candidate": self.candidate.version if self.candidate else None, **self.metrics.summary()}

    def run(self, argv: list[str]) -> None:
        """Start the worker (Faust's own CLI, which reads ``argv``)."""
        import sys

        faust_patches.apply(self.settings.fetch_max_wait_ms)
        if self.settings.pipeline == "control":
            self.load_models()
        sys.argv = argv
        self.app.main()
