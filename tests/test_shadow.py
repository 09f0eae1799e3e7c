"""Candidates in shadow on Apache Kafka: a worse candidate is scored live beside the current model,
`dtwin model compare` says it loses and `dtwin model promote` refuses it; a better one wins and is
promoted, and the worker then serves it."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pytest

from contracts.state import decode_state, encode_state
from contracts.topics import Topics
from controller import whatif
from dtwin.commands.swapbench import KAFKA_ENV, derive_artifact
from dtwin.runner import ControllerProcess, start_controller, value, wait_until
from dtwin.topics import create_topics
from export.artifact import load_artifact
from export.registry import Registry
from replay.producer import make_producer, replay
from replay.sites import replay_sites
from tests.test_swap import model_info

SITES, INTERVALS, WARMUP = 6, 270, 20  # 6 x 250 = 1,500 intervals scored for both sides


def run_cli(*argv: str) -> int:
    from dtwin.commands import model

    parser = argparse.ArgumentParser(prog="dtwin")
    sub = parser.add_subparsers(dest="command", required=True)
    model.register(sub, sub.add_parser("bench").add_subparsers(dest="bench"))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


@pytest.fixture(scope="module")
def worse(artifact_dir, tmp_path_factory) -> Path:
    """A real artifact that verifies, with biased and noisy forecasts (30 units low, +-40 units)."""
    return derive_artifact(artifact_dir, tmp_path_factory.mktemp("worse") / "worse", "worse", bias=-30.0,
                           noise=40.0)


def registry(root: Path, current: Path, candidate: Path) -> Registry:
    reg = Registry(root)
    reg.promote(reg.publish(current), force=True)
    reg.stage(reg.publish(candidate))
    return reg


def scored(ctl: ControllerProcess, allocator: str) -> float:
    return value(ctl.metrics() or {}, "dtwin_allocation_intervals_scored_total", allocator=allocator)


@pytest.mark.kafka
@pytest.mark.timeout(300)
def test_a_worse_candidate_is_refused_and_a_better_one_promoted(kafka, artifact_dir, worse, real_site, tmp_path,
                                                               capsys):
    good_version = load_artifact(artifact_dir).version
    # Two workers with fresh state: one scores the worse candidate against the real model, the other the
    # real model as candidate against the worse one as current (see
    # test_a_new_candidate_starts_from_its_own_headroom for why not one worker after the other).
    setups = {"lose": registry(tmp_path / "reg-lose", artifact_dir, worse),
              "win": registry(tmp_path / "reg-win", worse, artifact_dir)}
    sites = replay_sites(SITES, bases=[real_site])
    workers: dict[str, ControllerProcess] = {}
    try:
        for name, reg in setups.items():
            topics = Topics(f"shadow-{name}.")
            create_topics(kafka.bootstrap, topics, 2, app_id=f"shadow-{name}")
            workers[name] = start_controller(
                kafka.bootstrap, None, tmp_path, topics.prefix, f"shadow-{name}", 2, log_name=f"{name}.log",
                extra_env={**KAFKA_ENV, "DTWIN_MODEL_REGISTRY": str(reg.root),
                           "DTWIN_BASELINE_WARMUP_INTERVALS": str(WARMUP)})
            producer = make_producer(kafka.bootstrap)
            replay(producer, topics.samples, [s.slice(0, INTERVALS) for s in sites], progress=False)
            producer.close()
        expected = SITES * (INTERVALS - WARMUP)
        for ctl in workers.values():
            wait_until(lambda c=ctl: scored(c, "candidate") >= expected, 180, 0.5,
                       "the candidate to be scored on every interval", ctl.alive)
            assert scored(ctl, "current") == scored(ctl, "ai_sla") == expected

        lose, win = workers["lose"], workers["win"]
        url = f"http://127.0.0.1:{lose.metrics_port}/metrics"
        reg = setups["lose"]
        capsys.readouterr()
        assert run_cli("model", "compare", "--registry", str(reg.root), "--metrics", url,
                       "--min-intervals", "1000") == 1
        out = capsys.readouterr().out
        assert "does not win" in out and "1,500 intervals" in out and "worse" in out
        assert run_cli("model", "promote", "--registry", str(reg.root), "--metrics", url,
                       "--min-intervals", "1000") == 2
        assert "refused" in capsys.readouterr().err
        assert (reg.pointer_version("current"), reg.pointer_version("candidate")) == (good_version, "worse")

        url = f"http://127.0.0.1:{win.metrics_port}/metrics"
        reg = setups["win"]
        assert run_cli("model", "compare", "--registry", str(reg.root), "--metrics", url,
                       "--min-intervals", "1000") == 0
        assert "the candidate WINS" in capsys.readouterr().out
        assert run_cli("model", "promote", "--registry", str(reg.root), "--metrics", url,
                       "--min-intervals", "1000") == 0
        assert (reg.pointer_version("current"), reg.pointer_version("previous"),
                reg.pointer_version("candidate")) == (good_version, "worse", None)
        wait_until(lambda: model_info(win.metrics() or {}) == {"active": good_version}, 30, 0.2,
                   "the worker to serve the promoted model", win.alive)
    finally:
        for ctl in workers.values():
            ctl.stop()
    for name in workers:
        assert "Traceback" not in (tmp_path / f"{name}.log").read_text(errors="replace")


def test_a_new_candidate_starts_from_its_own_headroom(artifact_dir, worse, real_site):
    """Each site's candidate headroom ``q_candidate`` lives in the site state, tagged with the candidate's
    version: a newly staged candidate starts from its own ``q0``, not from the previous candidate's adapted
    headroom (which made a good candidate staged after a noisy one over-provision for hundreds of
    intervals and lose a comparison it should win)."""
    good, bad = load_artifact(artifact_dir), load_artifact(worse)
    sites = [s.slice(0, 300) for s in replay_sites(3, bases=[real_site])]
    batch = whatif.samples(sites)
    first, rest = batch[:3 * 250], batch[3 * 250:]
    engine = whatif.make_engine(good, bad, WARMUP, whatif.Settings())
    result = engine.process({}, first, [(0, i) for i in range(len(first))], 1.0)
    states = result.states
    # What Controller.install does when a new candidate is staged: a new engine over the stored states.
    staged = whatif.make_engine(good, good, WARMUP, whatif.Settings())
    after = staged.process(states, rest, [(0, len(first) + i) for i in range(len(rest))], 2.0)
    # The same with the candidate's headroom started afresh (NaN: the engine takes the candidate's q0).
    fresh_states = {site: decode_state(encode_state(st)) for site, st in states.items()}
    for st in fresh_states.values():
        st.q_candidate = math.nan
    fresh = staged.process(fresh_states, rest, [(0, len(first) + i) for i in range(len(rest))], 2.0)
    q0 = staged.candidate.online.q0
    carried = {site: round(st.q_candidate, 3) for site, st in states.items()}
    assert all(abs(q - q0) > 0.05 for q in carried.values()), "the noisy candidate adapts its headroom away from q0"
    np.testing.assert_allclose(after.scores["candidate"].allocated, fresh.scores["candidate"].allocated, rtol=1e-9,
                               err_msg=f"the new candidate started from the previous candidate's headroom {carried} "
                                       f"instead of its own q0 {q0}")
