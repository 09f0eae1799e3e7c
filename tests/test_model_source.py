"""controller.model_source: how a worker finds, verifies and hands over models (real artifacts, real files)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from controller.model_source import ModelEvent, ModelSource, ModelSourceError, ModelUpdate, fingerprint
from export.artifact import load_artifact
from export.registry import Registry
from tests.test_registry import edit_manifest, variant, write_file


@pytest.fixture(scope="module")
def models(artifact_dir: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("source-variants")
    return {name: variant(artifact_dir, root / name, name, onnx_tag=name) for name in ("m1", "m2", "m3")}


class Events(list):
    def __call__(self, event: ModelEvent) -> None:
        self.append(event)

    def kinds(self) -> list[tuple[str, str, str | None]]:
        return [(e.kind, e.role, e.reason if e.kind == "refused" else e.version) for e in self]


def folder(models: dict[str, Path], name: str, dest: Path) -> Path:
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(models[name], dest)
    return dest


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    write_file(path, bytes(data))


def registry(tmp_path: Path, models: dict[str, Path], *names: str) -> Registry:
    reg = Registry(tmp_path / "reg")
    for n in names:
        reg.publish(models[n])
    return reg


def serves(artifact, window: np.ndarray) -> bool:
    return bool(np.all(np.isfinite(artifact.predict(window))))


def a_window(models) -> np.ndarray:
    manifest = json.loads((models["m1"] / "manifest.json").read_text())
    return np.asarray([manifest["canaries"][0]["input"]], dtype=np.float32)


# --- start ---------------------------------------------------------------------------------------


def test_folder_mode_loads_and_keeps_a_last_good_copy(tmp_path, models):
    events = Events()
    src = ModelSource(str(folder(models, "m1", tmp_path / "model")), None, tmp_path / "state", events)
    active, candidate = src.load_initial()
    assert (active.version, candidate) == ("m1", None)
    assert active.directory == (tmp_path / "model").resolve()
    assert events.kinds() == [("loaded", "active", "m1")]
    assert load_artifact(src.last_good_dir).version == "m1"
    assert not list((tmp_path / "state" / ".incoming").iterdir())


def test_registry_mode_loads_current_and_candidate(tmp_path, models):
    reg = registry(tmp_path, models, "m1", "m2")
    reg.promote("m1", force=True)
    reg.stage("m2")
    events = Events()
    src = ModelSource("ignored/when/a/registry/is/set", str(reg.root), tmp_path / "state", events)
    active, candidate = src.load_initial()
    assert (active.version, candidate.version) == ("m1", "m2")
    assert active.directory == reg.versions / "m1"
    assert events.kinds() == [("loaded", "active", "m1"), ("loaded", "candidate", "m2")]


def test_restart_with_a_corrupt_current_serves_the_last_good_version(tmp_path, models):
    reg = registry(tmp_path, models, "m1", "m2")
    reg.promote("m1", force=True)
    ModelSource(None, str(reg.root), tmp_path / "state").load_initial()
    flip_byte(reg.versions / "m1" / "model.onnx")

    events = Events()
    src = ModelSource(None, str(reg.root), tmp_path / "state", events)
    active, _ = src.load_initial()
    assert active.version == "m1" and serves(active, a_window(models))
    assert events.kinds() == [("refused", "active", "sha256"), ("last_good", "active", "m1")]
    assert "serving the last version that verified" in events[1].message and events[1].reason == "sha256"

    async def later() -> tuple[ModelUpdate | None, ModelUpdate | None]:
        unchanged = await src.poll()  # the same broken current is not retried
        reg.promote("m2", force=True)
        return unchanged, await src.poll()

    unchanged, update = asyncio.run(later())
    assert unchanged is None and update.active.version == "m2"
    assert load_artifact(src.last_good_dir).version == "m2"

    with pytest.raises(ModelSourceError, match=r"(?s)registry .* is refused \(sha256.*no last-good copy at"):
        reg.promote("m1", force=True)
        ModelSource(None, str(reg.root), tmp_path / "fresh-state").load_initial()
    flip_byte(src.last_good_dir / "model.onnx")
    with pytest.raises(ModelSourceError, match=r"last-good copy .* is refused too"):
        ModelSource(None, str(reg.root), tmp_path / "state").load_initial()


def test_a_missing_folder_without_last_good_is_a_clear_error(tmp_path):
    with pytest.raises(ModelSourceError, match=r"model folder .*nowhere is refused \(missing_file"):
        ModelSource(str(tmp_path / "nowhere"), None, tmp_path / "state").load_initial()
    with pytest.raises(ModelSourceError, match=r"current model of registry .* is not set"):
        ModelSource(None, str(tmp_path / "empty-reg"), tmp_path / "state").load_initial()


# --- changes -------------------------------------------------------------------------------------


class Poller:
    """Polls like the worker's timer and records when each update arrived."""

    def __init__(self, src: ModelSource) -> None:
        self.src = src
        self.updates: list[tuple[float, ModelUpdate]] = []
        self.task: asyncio.Task | None = None

    async def _run(self) -> None:
        while True:
            update = await self.src.poll()
            if update is not None:
                self.updates.append((time.monotonic(), update))
            await asyncio.sleep(self.src.poll_seconds)

    def __enter__(self) -> Poller:
        self.task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc) -> None:
        assert self.task is not None
        self.task.cancel()

    async def next(self, timeout: float = 3.0) -> tuple[float, ModelUpdate]:
        seen = len(self.updates)
        deadline = time.monotonic() + timeout
        while len(self.updates) == seen and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert len(self.updates) > seen, "no update within the timeout"
        return self.updates[seen]


def test_a_pointer_change_is_noticed_within_a_second(tmp_path, models):
    reg = registry(tmp_path, models, "m1", "m2", "m3")
    reg.promote("m1", force=True)
    events = Events()
    src = ModelSource(None, str(reg.root), tmp_path / "state", events)
    src.load_initial()
    rng = random.Random(1)

    async def scenario() -> list[float]:
        delays = []
        with Poller(src) as poller:
            await asyncio.sleep(0.2)
            for change, check in (
                (lambda: reg.stage("m2"), lambda u: u.candidate.version == "m2" and u.active is None),
                (lambda: reg.stage("m3"), lambda u: u.candidate.version == "m3"),
                (lambda: reg.promote("m3", force=True),
                 lambda u: u.active.version == "m3" and u.candidate_removed and u.candidate is None),
                (lambda: reg.stage("m1"), lambda u: u.candidate.version == "m1"),
                (lambda: reg.unstage(), lambda u: u.candidate_removed and u.active is None),
                (lambda: reg.rollback(), lambda u: u.active.version == "m1"),
            ):
                await asyncio.sleep(rng.uniform(0.0, src.poll_seconds))
                t0 = time.monotonic()
                change()
                at, update = await poller.next()
                assert check(update), update
                delays.append(at - t0)
        return delays

    delays = asyncio.run(scenario())
    assert max(delays) < 1.0, delays
    assert src.active.version == "m1" and src.candidate is None
    assert [k for k in events.kinds() if k[0] != "loaded"] == [("candidate_removed", "candidate", "m3"),
                                                               ("candidate_removed", "candidate", "m1")]


def test_a_symlinked_model_folder_switched_atomically(tmp_path, models):
    for name in ("m1", "m2"):
        folder(models, name, tmp_path / name)
    link = tmp_path / "current"
    os.symlink("m1", link)
    src = ModelSource(str(link), None, tmp_path / "state")
    assert src.load_initial()[0].version == "m1"
    os.symlink("m2", tmp_path / "tmp-link")
    os.replace(tmp_path / "tmp-link", link)
    update = asyncio.run(src.poll())
    assert update.active.version == "m2" and update.active.directory == (tmp_path / "m2").resolve()


def test_a_corrupt_model_is_refused_the_old_one_keeps_serving_and_a_fix_is_accepted(tmp_path, models):
    model_dir = folder(models, "m1", tmp_path / "model")
    events = Events()
    src = ModelSource(str(model_dir), None, tmp_path / "state", events)
    src.load_initial()

    async def scenario() -> None:
        shutil.copyfile(models["m2"] / "manifest.json", model_dir / "manifest.json")
        shutil.copyfile(models["m2"] / "model.onnx", model_dir / "model.onnx")
        flip_byte(model_dir / "model.onnx")
        assert await src.poll() is None
        assert events[-1].kind == "refused" and events[-1].reason == "sha256" and "sha256" in events[-1].message
        assert src.active.version == "m1" and serves(src.active, a_window(models))
        for _ in range(3):
            assert await src.poll() is None
        assert len(events) == 2  # refused once, not every poll
        shutil.copyfile(models["m2"] / "model.onnx", model_dir / "model.onnx")
        update = await src.poll()
        assert update.active.version == "m2" and update.events[0].kind == "loaded"

    asyncio.run(scenario())
    assert load_artifact(src.last_good_dir).version == "m2"


def test_a_half_copied_folder_is_refused_then_accepted_once_complete(tmp_path, models):
    model_dir = folder(models, "m1", tmp_path / "model")
    events = Events()
    src = ModelSource(str(model_dir), None, tmp_path / "state", events)
    src.load_initial()

    async def scenario() -> None:
        (model_dir / "model.onnx").unlink()
        shutil.copyfile(models["m2"] / "manifest.json", model_dir / "manifest.json")  # the manifest lands first
        assert await src.poll() is None
        assert (events[-1].kind, events[-1].reason) == ("refused", "missing_file")
        data = (models["m2"] / "model.onnx").read_bytes()
        (model_dir / "model.onnx").write_bytes(data[: len(data) // 2])  # then half the model
        assert await src.poll() is None
        assert (events[-1].kind, events[-1].reason) == ("refused", "sha256")
        (model_dir / "model.onnx").write_bytes(data)
        update = await src.poll()
        assert update is not None and update.active.version == "m2"
        assert await src.poll() is None

    asyncio.run(scenario())
    assert src.active.version == "m2"


@pytest.mark.parametrize(("key", "value"), [
    ("window", None), ("features", 5), ("canaries", [1]), ("input", []), ("opset", "x"),
    ("canary_tolerance", "tight"), ("model_file", "../m1/model.onnx"), ("window", 1e400),
])
def test_a_malformed_manifest_is_refused_and_never_raises(tmp_path, models, key, value):
    model_dir = folder(models, "m1", tmp_path / "model")
    events = Events()
    src = ModelSource(str(model_dir), None, tmp_path / "state", events)
    src.load_initial()
    text = json.dumps({**json.loads((model_dir / "manifest.json").read_text()), key: value}).replace(
        "Infinity", "1e400")
    write_file(model_dir / "manifest.json", text)
    assert asyncio.run(src.poll()) is None
    assert (events[-1].kind, events[-1].role, events[-1].reason) == ("refused", "active", "manifest")
    assert src.active.version == "m1"


def test_a_manifest_only_change_is_a_change(tmp_path, models):
    model_dir = folder(models, "m1", tmp_path / "model")
    src = ModelSource(str(model_dir), None, tmp_path / "state")
    active, _ = src.load_initial()
    before = active.manifest["calibration"]

    def recalibrate(m: dict) -> None:
        for entry in m["calibration"].values():
            for k, v in entry.items():
                if isinstance(v, float):
                    entry[k] = v * 1.01

    edit_manifest(model_dir, recalibrate)
    update = asyncio.run(src.poll())
    assert update is not None and update.active.sha256 == active.sha256
    assert update.active.manifest["calibration"] != before
    assert json.loads((src.last_good_dir / "manifest.json").read_text())["calibration"] != before
    os.utime(model_dir / "model.onnx")  # touched, same content: no update
    assert asyncio.run(src.poll()) is None


def test_a_refused_candidate_leaves_the_old_candidate_and_validate_can_refuse(tmp_path, models):
    reg = registry(tmp_path, models, "m1", "m2", "m3")
    reg.promote("m1", force=True)
    reg.stage("m2")
    flip_byte(reg.versions / "m3" / "model.onnx")
    events = Events()

    def validate(artifact) -> None:
        if artifact.manifest.get("reject_me"):
            raise ValueError("the manifest has no calibration for SLA target 0.01")

    src = ModelSource(None, str(reg.root), tmp_path / "state", events, validate=validate)
    src.load_initial()

    async def scenario() -> None:
        reg.stage("m3")
        assert await src.poll() is None
        assert (events[-1].kind, events[-1].role, events[-1].reason, events[-1].version) == \
            ("refused", "candidate", "sha256", "m3")
        assert src.candidate.version == "m2"
        bad = variant(models["m1"], tmp_path / "m4", "m4", edit=lambda m: m.update(reject_me=True))
        reg.publish(bad)
        reg.stage("m4")
        assert await src.poll() is None
        assert (events[-1].reason, "SLA target" in events[-1].message) == ("manifest", True)

    asyncio.run(scenario())


def test_an_event_handler_that_raises_does_not_stop_polling(tmp_path, models):
    reg = registry(tmp_path, models, "m1", "m2")
    reg.promote("m1", force=True)

    def boom(event: ModelEvent) -> None:
        raise RuntimeError("handler bug")

    src = ModelSource(None, str(reg.root), tmp_path / "state", boom)
    src.load_initial()
    reg.promote("m2", force=True)
    assert asyncio.run(src.poll()).active.version == "m2"


# --- whatever is on disk -------------------------------------------------------------------------


def _corruptions(models: dict[str, Path]):
    good = json.loads((models["m1"] / "manifest.json").read_text())
    junk = [None, "x", [], {}, -1, 0, 1e308, "../../etc/passwd", [[1, 2]], {"name": 1}, True]

    def flip(d: Path, rng: random.Random) -> None:
        flip_byte(d / "model.onnx")

    def truncate(d: Path, rng: random.Random) -> None:
        data = (d / "model.onnx").read_bytes()
        write_file(d / "model.onnx", data[: rng.randrange(len(data))])

    def rm_model(d: Path, rng: random.Random) -> None:
        (d / "model.onnx").unlink()

    def rm_manifest(d: Path, rng: random.Random) -> None:
        (d / "manifest.json").unlink()

    def garbage_manifest(d: Path, rng: random.Random) -> None:
        write_file(d / "manifest.json", rng.randbytes(rng.randrange(1, 200)))

    def list_manifest(d: Path, rng: random.Random) -> None:
        write_file(d / "manifest.json", "[1, 2, 3]")

    def junk_value(d: Path, rng: random.Random) -> None:
        write_file(d / "manifest.json", json.dumps({**good, rng.choice(list(good)): rng.choice(junk)}))

    def drop_key(d: Path, rng: random.Random) -> None:
        write_file(d / "manifest.json", json.dumps({k: v for k, v in good.items() if k != rng.choice(list(good))}))

    def model_is_a_folder(d: Path, rng: random.Random) -> None:
        (d / "model.onnx").unlink()
        (d / "model.onnx").mkdir()

    def manifest_is_a_folder(d: Path, rng: random.Random) -> None:
        (d / "manifest.json").unlink()
        (d / "manifest.json").mkdir()

    def not_onnx(d: Path, rng: random.Random) -> None:
        data = rng.randbytes(300)
        write_file(d / "model.onnx", data)
        import hashlib

        write_file(d / "manifest.json", json.dumps({**good, "sha256": hashlib.sha256(data).hexdigest()}))

    def gone(d: Path, rng: random.Random) -> None:
        shutil.rmtree(d)

    def a_file(d: Path, rng: random.Random) -> None:
        shutil.rmtree(d)
        d.write_text("not a folder")

    def symlink_loop(d: Path, rng: random.Random) -> None:
        shutil.rmtree(d)
        os.symlink(d.name, d)

    return [flip, truncate, rm_model, rm_manifest, garbage_manifest, list_manifest, junk_value, junk_value,
            drop_key, model_is_a_folder, manifest_is_a_folder, not_onnx, gone, a_file, symlink_loop]


def _reset(d: Path) -> None:
    if d.is_symlink() or d.is_file():
        d.unlink()
    elif d.exists():
        shutil.rmtree(d)


def test_poll_never_raises_whatever_is_on_disk(tmp_path, models):
    model_dir = tmp_path / "model"
    folder(models, "m1", model_dir)
    events = Events()
    src = ModelSource(str(model_dir), None, tmp_path / "state", events)
    src.load_initial()
    rng = random.Random(20250101)
    corruptions = _corruptions(models)
    window = a_window(models)
    served = {"m1"}

    async def scenario() -> None:
        for _ in range(60):
            if rng.random() < 0.3 or not model_dir.is_dir() or model_dir.is_symlink():
                _reset(model_dir)
                name = rng.choice(["m1", "m2", "m3"])
                shutil.copytree(models[name], model_dir)
            else:
                with contextlib.suppress(OSError):  # some are impossible in the state the last one left
                    rng.choice(corruptions)(model_dir, rng)
            update = await src.poll()
            assert update is None or isinstance(update, ModelUpdate)
            if update is not None and update.active is not None:
                served.add(update.active.version)
            assert src.active is not None and serves(src.active, window)
        _reset(model_dir)
        shutil.copytree(models["m3"] if src.active.version != "m3" else models["m2"], model_dir)
        update = await src.poll()
        assert update is not None and update.active.version in {"m2", "m3"}

    asyncio.run(scenario())
    refused = {e.reason for e in events if e.kind == "refused"}
    assert len(served) >= 2 and {"sha256", "missing_file", "manifest"} <= refused, (served, refused)
    assert load_artifact(src.last_good_dir).version == src.active.version


def test_bad_registry_pointers_are_refused(tmp_path, models):
    reg = registry(tmp_path, models, "m1")
    reg.promote("m1", force=True)
    events = Events()
    src = ModelSource(None, str(reg.root), tmp_path / "state", events)
    src.load_initial()

    async def scenario() -> None:
        for make in (lambda p: os.symlink("versions/nope", p), lambda p: os.symlink("/etc", p),
                     lambda p: p.write_text("m1"), lambda p: p.mkdir()):
            link = reg.root / "current"
            _reset(link)
            make(link)
            assert await src.poll() is None
            assert events[-1].kind == "refused" and events[-1].reason in {"missing_file", "pointer"}
            for pointer in ("candidate",):
                _reset(reg.root / pointer)
                make(reg.root / pointer)
                assert await src.poll() is None
                _reset(reg.root / pointer)
        _reset(reg.root / "current")
        reg.promote("m1", force=True)
        await src.poll()  # the same content as served: no update
        assert src.active.version == "m1"

    asyncio.run(scenario())
    assert {e.reason for e in events if e.kind == "refused"} == {"missing_file", "pointer"}


def test_fingerprint_sees_content_changes_without_reading(tmp_path, models):
    d = folder(models, "m1", tmp_path / "model")
    fp = fingerprint(d)
    assert fingerprint(d) == fp
    shutil.copyfile(models["m2"] / "model.onnx", d / "model.onnx")
    assert fingerprint(d) != fp
    assert fingerprint(tmp_path / "missing")[0] == "unreadable"
