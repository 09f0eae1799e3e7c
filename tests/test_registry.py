"""Model registry (export.registry), the live comparison (export.compare) and `dtwin model`."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from export.artifact import MANIFEST_FILE, load_artifact, sha256_file
from export.compare import AllocatorScore, combine, compare_scores, two_proportion_z, wilson_interval
from export.registry import Registry, RegistryError

# --- helpers (also used by test_model_source) ----------------------------------------------------


def write_file(path: Path, data: bytes | str) -> None:
    """Overwrite a file in place, even one the registry made read-only."""
    if path.exists():
        os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
    if isinstance(data, str):
        data = data.encode()
    path.write_bytes(data)


def edit_manifest(directory: Path, edit: Callable[[dict], None]) -> dict:
    path = directory / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    edit(manifest)
    write_file(path, json.dumps(manifest, indent=2))
    return manifest


def variant(base: Path, dest: Path, version: str, onnx_tag: str | None = None,
            edit: Callable[[dict], None] | None = None) -> Path:
    """A copy of the artifact under another version; with ``onnx_tag`` a different ONNX file (its
    doc string changed, so its sha256 differs while its outputs do not)."""
    shutil.copytree(base, dest)
    for f in dest.iterdir():
        os.chmod(f, 0o644)
    if onnx_tag is not None:
        import onnx

        proto = onnx.load(str(dest / "model.onnx"))
        proto.doc_string = onnx_tag
        onnx.save(proto, str(dest / "model.onnx"))

    def change(m: dict) -> None:
        m["version"] = version
        m["sha256"] = sha256_file(dest / "model.onnx")
        m["bytes"] = (dest / "model.onnx").stat().st_size
        if edit is not None:
            edit(m)

    edit_manifest(dest, change)
    return dest


@pytest.fixture(scope="module")
def variants(artifact_dir: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("variants")
    return {name: variant(artifact_dir, root / name, name, onnx_tag=name) for name in ("v1", "v2", "v3")}


def scores(n: int, under: int, over_mean: float, allocator: str = "x") -> AllocatorScore:
    return AllocatorScore(allocator, n, under, over_mean * n, n)


# --- publish -------------------------------------------------------------------------------------


def test_publish_adds_an_immutable_verified_version(tmp_path, variants):
    reg = Registry(tmp_path / "reg")
    assert reg.publish(variants["v1"]) == "v1"
    folder = reg.versions / "v1"
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "model.onnx"]
    assert load_artifact(folder).version == "v1"
    assert all(not (f.stat().st_mode & 0o222) for f in folder.iterdir())
    assert reg.publish(variants["v1"]) == "v1"  # same content: idempotent
    assert not list((reg.root / ".tmp").iterdir())
    (info,) = reg.list()
    assert (info.version, info.sha256, info.pointers) == ("v1", sha256_file(folder / "model.onnx"), ())


def test_publish_refuses_other_content_under_an_existing_version(tmp_path, variants):
    reg = Registry(tmp_path / "reg")
    reg.publish(variants["v1"])
    other = variant(variants["v2"], tmp_path / "other", "v1")  # v2's model, named v1
    with pytest.raises(RegistryError, match="already exists"):
        reg.publish(other)
    recal = variant(variants["v1"], tmp_path / "recal", "v1", edit=lambda m: m.update(canary_tolerance=2e-3))
    with pytest.raises(RegistryError, match="already exists"):
        reg.publish(recal)
    assert load_artifact(reg.versions / "v1").manifest["canary_tolerance"] == 1e-3


def test_publish_refuses_a_corrupt_artifact_and_adds_nothing(tmp_path, variants):
    bad = variant(variants["v1"], tmp_path / "bad", "bad")
    data = bytearray((bad / "model.onnx").read_bytes())
    data[-10] ^= 0xFF
    write_file(bad / "model.onnx", bytes(data))
    reg = Registry(tmp_path / "reg")
    with pytest.raises(RegistryError, match="sha256"):
        reg.publish(bad)
    assert not (reg.versions / "bad").exists()
    unsafe = variant(variants["v1"], tmp_path / "unsafe", "../escape")
    with pytest.raises(RegistryError, match="version name"):
        reg.publish(unsafe)


# --- pointers ------------------------------------------------------------------------------------


def test_stage_promote_rollback_list(tmp_path, variants):
    reg = Registry(tmp_path / "reg")
    for v in ("v1", "v2", "v3"):
        reg.publish(variants[v])
    assert reg.resolve("current") is None
    with pytest.raises(RegistryError, match="nothing to promote"):
        reg.promote()
    reg.stage("v3")
    with pytest.raises(RegistryError, match="no version"):
        reg.promote("v9")
    assert reg.promote("v1") == "v1"  # the first current has nothing to beat
    assert reg.pointer_version("candidate") is None
    assert os.readlink(reg.root / "current") == "versions/v1"  # relative: the volume may be mounted anywhere
    assert reg.resolve("current") == reg.versions / "v1"
    with pytest.raises(RegistryError, match="already current"):
        reg.stage("v1")
    with pytest.raises(RegistryError, match="no version"):
        reg.stage("v9")
    reg.stage("v2")
    assert reg.pointer_version("candidate") == "v2"
    assert {i.version: i.pointers for i in reg.list()} == {"v1": ("current",), "v2": ("candidate",), "v3": ()}

    win = compare_scores(scores(5000, 40, 10.0), scores(5000, 30, 8.0))
    assert reg.promote(comparison=win) == "v2"
    assert (reg.pointer_version("current"), reg.pointer_version("previous"), reg.pointer_version("candidate")) == \
        ("v2", "v1", None)
    assert reg.rollback() == "v1"
    assert (reg.pointer_version("current"), reg.pointer_version("previous")) == ("v1", "v2")
    assert reg.rollback() == "v2"  # a rollback can be undone
    assert reg.unstage() is None
    reg.stage("v3")
    assert reg.unstage() == "v3"
    assert reg.resolve("candidate") is None


def test_promote_guard(tmp_path, variants):
    reg = Registry(tmp_path / "reg")
    for v in ("v1", "v2", "v3"):
        reg.publish(variants[v])
    reg.promote("v1", force=True)
    reg.stage("v2")
    with pytest.raises(RegistryError, match="no comparison"):
        reg.promote()
    with pytest.raises(RegistryError, match="not the staged candidate"):
        reg.promote("v3", comparison=compare_scores(scores(5000, 40, 10.0), scores(5000, 30, 8.0)))
    worse_under = compare_scores(scores(5000, 40, 10.0), scores(5000, 60, 8.0))
    with pytest.raises(RegistryError, match=r"does not beat.*higher miss rate"):
        reg.promote(comparison=worse_under)
    worse_over = compare_scores(scores(5000, 40, 10.0), scores(5000, 40, 11.0))
    with pytest.raises(RegistryError, match="over-provisioning not lower"):
        reg.promote(comparison=worse_over)
    other = compare_scores(scores(5000, 40, 10.0), scores(5000, 30, 8.0), candidate_versions=["v9"])
    with pytest.raises(RegistryError, match="scores are for candidate v9"):
        reg.promote(comparison=other)
    stale = compare_scores(scores(5000, 40, 10.0), scores(5000, 30, 8.0), current_versions=["v0"],
                           candidate_versions=["v2"])
    with pytest.raises(RegistryError, match="scored against v0"):
        reg.promote(comparison=stale)
    assert reg.pointer_version("current") == "v1" and reg.pointer_version("candidate") == "v2"
    assert reg.promote(force=True, comparison=worse_under) == "v2"


def test_pointer_always_resolves_to_a_complete_version_while_it_is_switched(tmp_path, variants):
    reg = Registry(tmp_path / "reg")
    for v in ("v1", "v2"):
        reg.publish(variants[v])
    reg.stage("v1")
    stop = threading.Event()
    switches = 0

    def switch() -> None:
        nonlocal switches
        while not stop.is_set():
            for v in ("v2", "v1"):
                reg.stage(v)
                switches += 1

    writer = threading.Thread(target=switch)
    writer.start()
    seen: set[str] = set()
    reads = 0
    try:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            link = reg.root / "candidate"
            manifest = json.loads((link / MANIFEST_FILE).read_text())  # raises if the pointer were ever absent
            assert (link / "model.onnx").is_file()
            seen.add(manifest["version"])
            reads += 1
    finally:
        stop.set()
        writer.join()
    assert seen == {"v1", "v2"} and switches > 100 and reads > 100
    assert not [p for p in reg.root.iterdir() if p.is_symlink() and p.name.endswith(".tmp")]


def test_a_pointer_that_is_a_folder_is_refused(tmp_path, variants):
    reg = Registry(tmp_path / "reg")
    reg.publish(variants["v1"])
    (reg.root / "current").mkdir()
    with pytest.raises(RegistryError, match="not a symlink"):
        reg.pointer_version("current")
    with pytest.raises(RegistryError):
        reg.promote("v1", force=True)
    assert (reg.root / "current").is_dir()


# --- comparison ----------------------------------------------------------------------------------


def test_wilson_and_z_test_numbers():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(50, 100)
    assert (lo, hi) == (pytest.approx(0.4038, abs=1e-4), pytest.approx(0.5962, abs=1e-4))
    assert two_proportion_z(100, 10000, 60, 10000) == pytest.approx(3.1750, abs=1e-3)  # pooled p 0.008, se 0.00126
    assert two_proportion_z(0, 100, 0, 100) == 0.0


def test_compare_rule():
    cur = scores(10000, 100, 20.0, "ai_sla")
    c = compare_scores(cur, scores(10000, 60, 15.0, "candidate"))
    assert c.wins and not c.reasons and c.same_intervals
    assert c.p_candidate_lower < 0.05 and "lower with 95% confidence" in c.confidence
    assert "10,000 intervals" in c.confidence and c.caveats
    c = compare_scores(cur, scores(10000, 95, 15.0))
    assert c.wins and "do not differ significantly" in c.confidence  # a point-estimate win, said plainly
    assert not compare_scores(cur, scores(10000, 95, 15.0), strict=True).wins
    c = compare_scores(cur, scores(10000, 140, 15.0))
    assert not c.wins and "HIGHER with 95% confidence" in c.confidence
    assert not compare_scores(cur, scores(10000, 100, 20.0)).wins  # a tie on over-provisioning is no win
    c = compare_scores(cur, scores(9000, 50, 15.0))
    assert not c.wins and not c.same_intervals and "same intervals" in c.reasons[0]
    c = compare_scores(scores(500, 5, 20.0), scores(500, 2, 15.0))
    assert not c.wins and "1,000 needed" in c.reasons[0]
    assert compare_scores(scores(500, 5, 20.0), scores(500, 2, 15.0), min_intervals=500).wins
    c = compare_scores(cur, AllocatorScore("candidate"))
    assert not c.wins and "no intervals" in c.reasons[0]
    c = compare_scores(cur, scores(10000, 60, 15.0), unreachable=["http://x (refused)"])
    assert not c.wins
    c = compare_scores(cur, scores(10000, 60, 15.0), candidate_versions=["a", "b"])
    assert not c.wins and "different candidates" in c.reasons[0]
    json.dumps(compare_scores(cur, AllocatorScore("candidate")).to_dict())  # NaNs become null


# --- a worker's metrics endpoint, as the controller exports it -----------------------------------


def exposition(allocs: dict[str, tuple[int, int, float]], active: str | None = None,
               candidate: str | None = None) -> bytes:
    """Prometheus text of one worker: per allocator (intervals, under-provisioned, mean over)."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Summary, generate_latest

    r = CollectorRegistry()
    scored = Counter("dtwin_allocation_intervals_scored", "", ["allocator"], registry=r)
    under = Counter("dtwin_allocation_underprovisioned_intervals", "", ["allocator"], registry=r)
    over = Summary("dtwin_allocation_overprovisioning_units", "", ["allocator"], registry=r)
    info = Gauge("dtwin_model_info", "", ["role", "name", "version", "sha256"], registry=r)
    for a, (n, u, mean) in allocs.items():
        scored.labels(a).inc(n)
        under.labels(a).inc(u)
        for _ in range(n):
            over.labels(a).observe(mean)
    for role, v in (("active", active), ("candidate", candidate)):
        if v:
            info.labels(role, "delta_mlp", v, "x").set(1)
    return generate_latest(r)


@contextlib.contextmanager
def metrics_server(body: Callable[[], bytes]) -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            data = body()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/metrics"
    finally:
        server.shutdown()
        server.server_close()


def test_scores_are_summed_over_workers():
    a = exposition({"ai_sla": (300, 3, 10.0), "candidate": (300, 1, 8.0)}, "v1", "v2").decode()
    b = exposition({"ai_sla": (700, 7, 20.0), "candidate": (700, 5, 16.0)}, "v1", "v2").decode()
    live = combine([a, b])
    cur, cand = live.score("ai_sla"), live.score("candidate")
    assert (cur.intervals, cur.underprovisioned, cand.intervals, cand.underprovisioned) == (1000, 10, 1000, 6)
    assert cur.over_mean == pytest.approx(17.0) and cand.over_mean == pytest.approx(13.6)
    assert set(live.versions["active"]) == {"v1"} and set(live.versions["candidate"]) == {"v2"}


# --- the CLI ------------------------------------------------------------------------------------


def run_cli(*argv: str) -> int:
    from dtwin.commands import model

    parser = argparse.ArgumentParser(prog="dtwin")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench").add_subparsers(dest="bench")
    model.register(sub, bench)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


def test_cli_publish_stage_compare_promote_rollback(tmp_path, variants, capsys, monkeypatch):
    reg_dir = str(tmp_path / "reg")
    monkeypatch.setenv("DTWIN_MODEL_REGISTRY", reg_dir)
    assert run_cli("model", "publish", str(variants["v1"]), "--stage") == 0
    assert run_cli("model", "promote") == 0  # the first: nothing to compare against
    assert run_cli("model", "publish", str(variants["v2"]), "--stage") == 0
    reg = Registry(reg_dir)
    assert (reg.pointer_version("current"), reg.pointer_version("candidate")) == ("v1", "v2")

    state = {"candidate": (2000, 30, 12.0)}

    def body() -> bytes:
        return exposition({"current": (2000, 20, 10.0), "candidate": state["candidate"]}, "v1", "v2")

    with metrics_server(body) as url:
        capsys.readouterr()
        out_json = tmp_path / "cmp.json"
        assert run_cli("model", "compare", "--metrics", url, "--json", str(out_json)) == 1
        text = capsys.readouterr().out
        assert "does not win" in text and "higher miss rate" in text and "2,000" in text
        report = json.loads(out_json.read_text())
        assert report["wins"] is False and report["candidate"]["intervals"] == 2000
        assert run_cli("model", "promote", "--metrics", url) == 2  # refused: the candidate loses
        assert "refused" in capsys.readouterr().err
        assert reg.pointer_version("current") == "v1"

        assert run_cli("model", "list", "--metrics", url, "--json", str(tmp_path / "list.json")) == 0
        listing = json.loads((tmp_path / "list.json").read_text())
        assert {v["version"]: v["pointers"] for v in listing["versions"]} == {"v1": ["current"], "v2": ["candidate"]}
        assert listing["comparison"]["wins"] is False

        state["candidate"] = (2000, 15, 8.0)
        assert run_cli("model", "compare", "--metrics", url) == 0
        assert "WINS" in capsys.readouterr().out
        assert run_cli("model", "promote", "--metrics", url) == 0
    assert (reg.pointer_version("current"), reg.pointer_version("previous"), reg.pointer_version("candidate")) == \
        ("v2", "v1", None)
    assert run_cli("model", "rollback") == 0
    assert reg.pointer_version("current") == "v1"

    # No worker reachable: the comparison cannot win; --force still promotes.
    reg.stage("v2")
    dead = "http://127.0.0.1:9/metrics"
    assert run_cli("model", "promote", "--metrics", dead) == 2
    assert run_cli("model", "list", "--metrics", dead) == 0
    assert "no worker reachable" in capsys.readouterr().out
    assert run_cli("model", "promote", "--force") == 0
    assert reg.pointer_version("current") == "v2"


def test_cli_refusals_exit_2(tmp_path, variants, capsys):
    reg_dir = str(tmp_path / "reg")
    assert run_cli("model", "stage", "nope", "--registry", reg_dir) == 2
    assert run_cli("model", "publish", str(tmp_path / "missing"), "--registry", reg_dir) == 2
    assert run_cli("model", "rollback", "--registry", reg_dir) == 2
    err = capsys.readouterr().err
    assert "no version 'nope'" in err and "no previous version" in err
