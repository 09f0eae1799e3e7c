"""The corrections to Faust's consumer (controller/faust_patches.py) as units; the fault scenarios on
Apache Kafka (tests/test_faults.py) show their effect end to end."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from types import SimpleNamespace

from intervaltree import IntervalTree

from controller import faust_patches


def offsets_state(acked: list[int], committed: int | None) -> SimpleNamespace:
    tp = "tp"
    return SimpleNamespace(_acked={tp: list(acked)}, _acked_index={tp: set(acked)}, _gap=defaultdict(IntervalTree),
                           _committed_offset=defaultdict(lambda: None, {tp: committed}))


def test_nothing_is_committed_while_the_committed_offset_is_not_acked():
    # committed 31 = the next record to read; 31 itself is not acked (Faust 0.15.3 committed 35 here)
    assert faust_patches._new_offset(offsets_state([32, 33, 34], 31), "tp") is None
    # committed 0 is a committed offset too (Faust treated it as none)
    assert faust_patches._new_offset(offsets_state([1, 2], 0), "tp") is None


def test_the_first_consecutive_run_from_the_committed_offset_is_committed():
    state = offsets_state([31, 32, 33, 35], 31)
    assert faust_patches._new_offset(state, "tp") == 34
    assert state._acked["tp"] == [35]
    assert faust_patches._new_offset(offsets_state([0, 1, 2], None), "tp") == 3


def test_a_fetch_asks_for_a_snapshot_of_the_active_partitions():
    seen = []

    async def getmany(self, partitions, timeout):
        seen.append(partitions)
        if partitions:
            partitions.clear()  # what a pause in the main thread did to Faust's live set
        return {"records": True}

    wrapped = faust_patches._fetch_snapshot(getmany)
    live = {"a", "b"}
    assert asyncio.run(wrapped(None, live, 1.0)) == {"records": True}
    assert live == {"a", "b"} and seen[0] is not live
    # no active partition: no fetch at all (aiokafka would read an empty set as "all partitions")
    assert asyncio.run(wrapped(None, set(), 1.0)) == {}
    assert len(seen) == 1
    assert asyncio.run(wrapped(None, None, 1.0)) == {"records": True}  # None: a client-only app, all


def test_apply_installs_the_corrections_once():
    from faust.tables.recovery import Recovery
    from faust.transport.consumer import Consumer, ThreadDelegateConsumer
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    faust_patches.apply(20)
    getmany, seek = ThreadDelegateConsumer._getmany, Consumer.perform_seek
    faust_patches.apply(35)
    assert Recovery.on_recovery_completed is faust_patches.on_recovery_completed
    assert Recovery._resume_streams is faust_patches._resume_streams
    assert Consumer._new_offset is faust_patches._new_offset
    assert ThreadDelegateConsumer._getmany is getmany and Consumer.perform_seek is seek
    assert getmany.__wrapped__.__qualname__ == "ThreadDelegateConsumer._getmany"
    create = AIOKafkaConsumerThread._create_worker_consumer
    assert create.dtwin_patched and not getattr(create.__wrapped__, "dtwin_patched", False)  # wrapped once
