"""Corrections to Faust 0.15.3 (pinned) that the controller applies when a worker starts
(:func:`apply`).

**The worker consumer's fetch wait** (``_bounded_fetch_wait``): Faust hard-codes 1.5 s; the
controller sets it from ``DTWIN_FETCH_MAX_WAIT_MS``.

**Skipped samples after an assignment** (found on Apache Kafka; see BENCHMARKS.md, Recovery). When a
worker's table recovery ends, Faust (``Recovery.on_recovery_completed``, and ``_resume_streams`` for
apps without tables) first resumes the source partitions and only then awaits ``perform_seek()``,
the seek to the committed offsets. In between, the fetcher hands over records from the old
position; the drain loop keeps yielding that pre-seek batch after the seek and advances its read
offset past the committed one, so the records re-fetched from the committed offset are dropped as
"already read" (``DROPPED MESSAGE ROFF``), and those of the pre-seek batch that a stream skipped
(flow control still suspended) were acked and are never seen again. Faust then commits past them
(its head-gap check is off by one). The worker logged it as ``records N..M never reached the
worker``; each lost sample cost the site about ten intervals of fallback commands.

The corrections:

1. ``on_recovery_completed`` and ``_resume_streams`` (``_seek_then_resume``): the seek to the
   committed offsets happens while the source partitions are still paused, then they are resumed,
   flow control is resumed and the fetcher runs, in that order, with no await in between, so no
   record of theirs is fetched from the old position.
2. ``_forget_acks_on_seek``: after the seek, acks recorded for the seeked partitions are dropped:
   they belong to records that the seek rewinds over (a stream skips and acks records of an older
   generation), and they will be delivered and acked again.
3. ``_new_offset``: nothing is committed while the committed offset itself is not acked
   (Faust tested ``min(acked) - committed > 1``, and treated a committed offset of 0 as none).
4. ``_fetch_snapshot``: the fetch asks aiokafka for the partitions that are active when it is made,
   as a copy. Faust passed its live set of active partitions to the consumer thread; pausing the
   last active ones while a fetch waited left the set empty, and aiokafka reads an empty set as
   "all partitions": it returned, and advanced past, records of paused source partitions, which
   Faust then dropped as inactive. Seen in the takeover scenario: ``seek_to_committed`` seeks one
   partition at a time, and a partition sought early had its records consumed and dropped while
   the others were still being sought.

Each is a copy of Faust's own method with only that change, or a wrapper, so the pin guards them.
"""

from __future__ import annotations

import asyncio
from typing import Any

FAUST_VERSION = "0.15.3"


def _check_version() -> None:
    import faust

    if faust.__version__ != FAUST_VERSION:
        raise RuntimeError(f"controller.faust_patches is written for faust-streaming {FAUST_VERSION}, "
                           f"found {faust.__version__}: review the patches before changing the pin")


async def _seek_then_resume(recovery: Any, consumer: Any, assignment: set) -> None:
    """Seek the source partitions to their committed offsets while they are paused, then resume
    them, the flow and the fetcher (Faust resumed first and sought second)."""
    app = recovery.app
    streams = {tp for tp in assignment if not recovery._is_changelog_tp(tp)}
    if assignment:
        recovery.log.info("Seek stream partitions to committed offsets.")
        await recovery._wait(consumer.perform_seek(), timeout=app.conf.broker_request_timeout)
    consumer.resume_partitions(streams)
    recovery.completed.set()
    app.flow_control.resume()
    consumer.resume_flow()
    await app._fetcher.maybe_start()


async def on_recovery_completed(self: Any, generation_id: int = 0) -> None:
    """Faust's ``Recovery.on_recovery_completed`` with the seek before the resume."""
    consumer = self.app.consumer
    self.log.info("Restore complete!")
    await self.app.on_rebalance_complete.send()
    self._set_recovery_ended()
    callback_coros = [
        asyncio.ensure_future(table.on_recovery_completed(self.actives_for_table[table],
                                                          self.standbys_for_table[table]))
        for table in self.tables.values()
    ]
    if callback_coros:
        await asyncio.wait(callback_coros)
    assignment = consumer.assignment()
    if self.app.consumer_generation_id != generation_id:
        self.log.warning(f"Recovery rebalancing again app id {self.app.consumer_generation_id} "
                         f"param {generation_id}")
        return
    await _seek_then_resume(self, consumer, assignment)
    self.tables.on_actives_ready()
    if not self.app.assignor.assigned_standbys():
        self.tables.on_standbys_ready()
    self.app.on_rebalance_end()
    self.log.info("Worker ready")


async def _resume_streams(self: Any, generation_id: int = 0) -> None:
    """Faust's ``Recovery._resume_streams`` (apps without tables) with the seek before the resume."""
    app = self.app
    consumer = app.consumer
    await app.on_rebalance_complete.send()
    assignment = consumer.assignment()
    if self.app.consumer_generation_id != generation_id:
        self.log.warning("Recovery rebalancing again")
        return
    if not assignment:
        self.log.info("Resuming streams with empty assignment")
    await _seek_then_resume(self, consumer, assignment)
    self.tables.on_actives_ready()
    self.tables.on_standbys_ready()
    app.on_rebalance_end()
    self.log.info("Worker ready")


def _forget_acks_on_seek(perform_seek):
    async def perform_seek_forgetting_acks(self: Any) -> None:
        await perform_seek(self)
        for tp in list(self.assignment()):
            self._acked.pop(tp, None)
            self._acked_index.pop(tp, None)
            self._gap.pop(tp, None)

    perform_seek_forgetting_acks.__wrapped__ = perform_seek  # type: ignore[attr-defined]
    return perform_seek_forgetting_acks


def _new_offset(self: Any, tp: Any) -> int | None:
    """Faust's ``Consumer._new_offset``: the offset to commit for ``tp``, or None. Unchanged except
    that nothing is committed while the committed offset itself has not been acked."""
    from faust.utils.functional import consecutive_numbers

    acked = self._acked[tp]
    if not acked:
        return None
    max_offset = max(acked)
    gap_for_tp = self._gap[tp]
    if gap_for_tp:
        candidates = sorted(gap_for_tp.overlap(0, max_offset), key=lambda x: x.begin)
        if candidates:
            filled: list[int] = []
            for entry in candidates:
                filled.extend(range(entry.begin, entry.end))
            new_max_offset = max(filled[-1], max_offset + 1)
            acked.extend(filled)
            gap_for_tp.chop(0, new_max_offset)
    acked.sort()
    committed = self._committed_offset[tp]
    if committed is not None and acked[0] > committed:
        return None  # the record at the committed offset is not acked yet
    batch = next(consecutive_numbers(acked))
    acked[: len(batch)] = []
    self._acked_index[tp].difference_update(batch)
    return batch[-1] + 1


def _fetch_snapshot(getmany):
    async def getmany_of_a_snapshot(self: Any, active_partitions: set | None, timeout: float) -> Any:
        if active_partitions is not None:
            active_partitions = set(active_partitions)
            if not active_partitions:
                return {}
        return await getmany(self, active_partitions, timeout)

    getmany_of_a_snapshot.__wrapped__ = getmany  # type: ignore[attr-defined]
    return getmany_of_a_snapshot


def _bounded_fetch_wait(create, fetch_max_wait_ms: int):
    """Faust hard-codes fetch_max_wait_ms=1500 for its worker consumer. Tansu (the embedded broker)
    holds a fetch that long even while records arrive (tools/repro_tansu_fetch_wait.py), which adds
    up to a second of latency; a short wait costs Apache Kafka only a few more idle fetches."""

    def create_worker_consumer(self, transport):
        consumer = create(self, transport)
        consumer._fetch_max_wait_ms = fetch_max_wait_ms
        return consumer

    create_worker_consumer.dtwin_patched = True  # type: ignore[attr-defined]
    return create_worker_consumer


def apply(fetch_max_wait_ms: int) -> None:
    """Install the corrections (idempotent; the fetch wait takes the latest value)."""
    _check_version()
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    current = AIOKafkaConsumerThread._create_worker_consumer
    original = getattr(current, "__wrapped__", current)
    patched = _bounded_fetch_wait(original, fetch_max_wait_ms)
    patched.__wrapped__ = original  # type: ignore[attr-defined]
    AIOKafkaConsumerThread._create_worker_consumer = patched
    from faust.tables.recovery import Recovery
    from faust.transport.consumer import Consumer, ThreadDelegateConsumer

    if getattr(Recovery.on_recovery_completed, "dtwin_patched", False):
        return
    on_recovery_completed.dtwin_patched = True  # type: ignore[attr-defined]
    Recovery.on_recovery_completed = on_recovery_completed
    Recovery._resume_streams = _resume_streams
    Consumer.perform_seek = _forget_acks_on_seek(Consumer.perform_seek)
    Consumer._new_offset = _new_offset
    ThreadDelegateConsumer._getmany = _fetch_snapshot(ThreadDelegateConsumer._getmany)
