"""`pip install '.[controller]'` in a fresh virtual environment loads, verifies and serves an artifact
without torch: the controller image's install, done for real."""

from __future__ import annotations

import json
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from contracts.topics import Topics
from dtwin.runner import start_controller, value, wait_until
from dtwin.topics import create_topics
from replay.producer import make_producer, replay
from replay.sites import replay_sites
from tests.kafka_util import read_topic

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def controller_venv(tmp_path_factory) -> Path:
    env_dir = tmp_path_factory.mktemp("controller-venv") / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    out = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                          f"{ROOT}[controller]"], capture_output=True, text=True, timeout=840)
    assert out.returncode == 0, f"pip install '.[controller]' failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return py


def test_the_controller_install_has_no_torch_and_verifies_an_artifact(controller_venv, artifact_dir):
    code = ("import importlib.util, json, sys\n"
            "assert importlib.util.find_spec('torch') is None, 'torch is installed'\n"
            "import numpy as np\n"
            "from export.artifact import load_artifact\n"
            f"a = load_artifact({str(artifact_dir)!r})\n"
            "x = np.asarray([c['input'] for c in a.manifest['canaries']], dtype=np.float32)\n"
            "print(json.dumps({'version': a.version, 'forecast': a.predict(x).tolist()}))\n")
    out = subprocess.run([str(controller_venv), "-c", code], capture_output=True, text=True, timeout=120,
                         cwd="/")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    manifest = json.loads((artifact_dir / "manifest.json").read_text())
    assert got["version"] == manifest["version"]
    expected = [c["expected"] for c in manifest["canaries"]]
    assert got["forecast"] == pytest.approx(expected, abs=float(manifest["canary_tolerance"]))


def test_the_controller_install_serves_commands(controller_venv, artifact_dir, kafka, real_site, tmp_path):
    topics = Topics("install.")
    create_topics(kafka.bootstrap, topics, 2, app_id="install")
    ctl = start_controller(kafka.bootstrap, artifact_dir, tmp_path, topics.prefix, "install", 2,
                           extra_env={"DTWIN_CHANGELOG_MARKERS": "0"}, python=str(controller_venv))
    try:
        sites = [s.slice(0, 30) for s in replay_sites(2, bases=[real_site])]
        producer = make_producer(kafka.bootstrap)
        stats = replay(producer, topics.samples, sites, progress=False)
        producer.close()
        wait_until(lambda: value(ctl.metrics() or {}, "dtwin_samples_received_total") >= stats.acked, 240, 0.5,
                   "the controller-only worker to process the samples", ctl.alive)
        commands = [json.loads(r.value) for r in read_topic(kafka.bootstrap, topics.commands, stats.acked)]
        assert len(commands) == stats.acked == 60
        assert {c["policy"] for c in commands} == {"fallback", "ai_sla"}
    finally:
        ctl.stop()
        assert "Traceback" not in ctl.log_path.read_text(errors="replace")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
