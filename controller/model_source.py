"""Where a worker's models come from: find, verify and hand over new ones without blocking the loop.

Two sources: a plain artifact folder (``DTWIN_MODEL_DIR``), or a registry
(``DTWIN_MODEL_REGISTRY``, :mod:`export.registry`) whose ``current`` pointer names the model to
serve and whose ``candidate`` pointer the model to score in shadow. :meth:`ModelSource.poll` stats
the watched folders (cheap), and only when something changed copies the artifact into a private
snapshot and verifies that copy off the event loop. A refused artifact is reported, the old model
keeps serving, and the same folder is tried again only once its files change. Every verified active
model is also kept as ``STATE_DIR/last-good``, which a restart serves when ``current`` fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from export.artifact import MANIFEST_FILE, ArtifactError, ModelArtifact, load_artifact
from export.registry import Registry, RegistryError

log = logging.getLogger("dtwin.controller.models")

ACTIVE, CANDIDATE = "active", "candidate"
LAST_GOOD = "last-good"
_INCOMING = ".incoming"
_STALE_SNAPSHOT_SECONDS = 3600.0

Fingerprint = tuple


@dataclasses.dataclass(frozen=True)
class ModelEvent:
    """``kind``: ``loaded`` (role, version), ``refused`` (role, reason, message), ``last_good`` (the active
    model came from the last-good copy; version, reason and message say why) or ``candidate_removed``."""

    kind: str
    role: str  # "active" or "candidate"
    version: str | None = None
    reason: str | None = None
    message: str = ""
    path: str | None = None


@dataclasses.dataclass(frozen=True)
class ModelUpdate:
    """What changed in one poll. The caller swaps between batches: ``active`` (if not None) replaces
    the served model, ``candidate`` (if not None) the shadow one, and ``candidate_removed`` drops it."""

    active: ModelArtifact | None = None
    candidate: ModelArtifact | None = None
    candidate_removed: bool = False
    events: tuple[ModelEvent, ...] = ()


class ModelSourceError(RuntimeError):
    """No model can be served at start: neither the configured one nor the last-good copy verifies."""


class ModelRefused(Exception):
    """A load failed; ``reason`` is its label, the message names the source folder (not the snapshot)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def refusal_reason(exc: BaseException) -> str:
    """The reason label of a failed load."""
    if isinstance(exc, ModelRefused):
        return exc.reason
    if isinstance(exc, ArtifactError):
        return exc.check
    if isinstance(exc, RegistryError):
        return "pointer"
    if type(exc).__module__.startswith("onnxruntime"):
        return "load_error"
    if isinstance(exc, FileNotFoundError | NotADirectoryError | IsADirectoryError):
        return "missing_file"
    if isinstance(exc, OSError):
        return "io_error"
    if isinstance(exc, TypeError | KeyError | ValueError | IndexError | AttributeError | OverflowError):
        return "manifest"  # a manifest with the right keys but values of the wrong shape
    return "load_error"


def fingerprint(path: Path) -> Fingerprint:
    """Identity of a folder's current content from stat calls alone: its symlink target, inode and
    mtime, and each entry's inode, size, mtime and ctime (ctime catches copies that keep mtimes)."""
    try:
        link = os.readlink(path) if os.path.islink(path) else None
        st = os.stat(path)
    except OSError as exc:
        return ("unreadable", type(exc).__name__)
    entries = []
    try:
        with os.scandir(path) as it:
            for entry in it:
                try:
                    s = entry.stat()
                    entries.append((entry.name, s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns))
                except OSError as exc:
                    entries.append((entry.name, type(exc).__name__, 0, 0, 0))
    except OSError as exc:
        return (link, st.st_ino, "unlistable", type(exc).__name__)
    return (link, st.st_ino, st.st_mtime_ns, tuple(sorted(entries)))


def content_key(artifact: ModelArtifact) -> str:
    """Same key = same model and same manifest (the manifest holds the verified ONNX sha256)."""
    return hashlib.sha256(json.dumps(artifact.manifest, sort_keys=True).encode()).hexdigest()


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ModelSource:
    """The models a worker serves (``active``) and scores in shadow (``candidate``).

    ``registry`` takes precedence over ``model_dir``. ``validate`` (optional) runs in the loading
    thread after verification, e.g. to build the allocators; whatever it raises refuses the model
    like a failed check. ``poll_seconds`` is the interval the caller should poll at.
    """

    def __init__(self, model_dir: str | None, registry: str | None, state_dir: str | Path,
                 on_event: Callable[[ModelEvent], None] | None = None, *, poll_seconds: float = 0.5,
                 threads: int = 1, validate: Callable[[ModelArtifact], object] | None = None) -> None:
        if not registry and not model_dir:
            raise ValueError("a model folder (DTWIN_MODEL_DIR) or a registry (DTWIN_MODEL_REGISTRY) is needed")
        self.registry = Registry(registry) if registry else None
        self.model_dir = None if registry else Path(str(model_dir))
        self.state_dir = Path(state_dir)
        self.on_event = on_event
        self.poll_seconds = poll_seconds
        self.threads = threads
        self.validate = validate
        self.roles = (ACTIVE, CANDIDATE) if self.registry else (ACTIVE,)
        self.active: ModelArtifact | None = None
        self.candidate: ModelArtifact | None = None
        self._seen: dict[str, Fingerprint | None] = {}
        self._keys: dict[str, str | None] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._busy = False

    @property
    def last_good_dir(self) -> Path:
        return self.state_dir / LAST_GOOD

    def describe(self) -> str:
        return f"registry {self.registry.root}" if self.registry else f"folder {self.model_dir}"

    # --- start -----------------------------------------------------------------------------------

    def load_initial(self) -> tuple[ModelArtifact, ModelArtifact | None]:
        """Verify and load the active model and, with a registry, the candidate (blocking).

        If the active one fails, the last-good copy is served (a ``last_good`` event); if that fails
        too, :class:`ModelSourceError` names both.
        """
        self._clean_incoming()
        where = self._where(ACTIVE)
        path, fp = self._observe(ACTIVE)
        self._seen[ACTIVE] = fp
        try:
            if path is None:
                raise self._unavailable(ACTIVE, fp)
            active = self._load(ACTIVE, path)
        except Exception as exc:
            reason, message = refusal_reason(exc), str(exc)
            self._emit(ModelEvent("refused", ACTIVE, self._pointer_version(ACTIVE), reason, message, _s(path)))
            try:
                active = self._load_last_good()
            except Exception as exc2:
                lg = (f"there is no last-good copy at {self.last_good_dir}" if not self.last_good_dir.exists()
                      else f"the last-good copy {self.last_good_dir} is refused too ({refusal_reason(exc2)}: {exc2})")
                raise ModelSourceError(f"no model to serve: {where} is refused ({reason}: {message}), "
                                       f"and {lg}") from exc
            self._emit(ModelEvent("last_good", ACTIVE, active.version, reason,
                                  f"{where} is refused ({reason}: {message}); serving the last version that "
                                  f"verified, {active.version}, from {self.last_good_dir}", str(self.last_good_dir)))
        else:
            self._emit(ModelEvent("loaded", ACTIVE, active.version, path=_s(path)))
        self.active, self._keys[ACTIVE] = active, content_key(active)
        if CANDIDATE in self.roles:
            path, fp = self._observe(CANDIDATE)
            self._seen[CANDIDATE] = fp
            if path is not None:
                try:
                    self.candidate = self._load(CANDIDATE, path)
                    self._keys[CANDIDATE] = content_key(self.candidate)
                    self._emit(ModelEvent("loaded", CANDIDATE, self.candidate.version, path=str(path)))
                except Exception as exc:
                    self._emit(ModelEvent("refused", CANDIDATE, self._pointer_version(CANDIDATE),
                                          refusal_reason(exc), str(exc), str(path)))
        return active, self.candidate

    # --- polling ---------------------------------------------------------------------------------

    async def poll(self) -> ModelUpdate | None:
        """Look for changed pointers or folders; load and verify them off the loop. Never raises
        (cancellation excepted); refusals are reported through ``on_event`` and the log."""
        if self._busy:
            return None
        self._busy = True
        try:
            return await self._poll()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("model source poll failed; still serving %s", self.active.version if self.active else None)
            return None
        finally:
            self._busy = False

    async def _poll(self) -> ModelUpdate | None:
        loop = asyncio.get_running_loop()
        events: list[ModelEvent] = []
        new: dict[str, ModelArtifact] = {}
        removed = False
        for role in self.roles:
            path, fp = self._observe(role)
            if fp == self._seen.get(role):
                continue
            if path is None:
                self._seen[role] = fp
                if role == CANDIDATE and fp == ("unset",):
                    if self.candidate is not None:
                        events.append(ModelEvent("candidate_removed", CANDIDATE, self.candidate.version))
                        self.candidate, self._keys[CANDIDATE], removed = None, None, True
                else:
                    exc = self._unavailable(role, fp)
                    events.append(ModelEvent("refused", role, None, refusal_reason(exc), str(exc)))
                continue
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dtwin-model-load")
            try:
                artifact = await loop.run_in_executor(self._executor, self._load, role, path)
            except Exception as exc:
                self._seen[role] = fp  # taken before the load: a folder that changes during it is tried again
                events.append(ModelEvent("refused", role, self._pointer_version(role), refusal_reason(exc), str(exc),
                                         str(path)))
                continue
            self._seen[role] = fp
            key = content_key(artifact)
            if key == self._keys.get(role):
                continue  # the same content again (files touched, or a copy completed after it was read)
            self._keys[role] = key
            new[role] = artifact
            if role == ACTIVE:
                self.active = artifact
            else:
                self.candidate, removed = artifact, False
            events.append(ModelEvent("loaded", role, artifact.version, path=str(path)))
        for event in events:
            self._emit(event)
        if not new and not removed:
            return None
        return ModelUpdate(active=new.get(ACTIVE), candidate=new.get(CANDIDATE), candidate_removed=removed,
                           events=tuple(events))

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    # --- internals -------------------------------------------------------------------------------

    def _pointer(self, role: str) -> str:
        return "current" if role == ACTIVE else "candidate"

    def _where(self, role: str) -> str:
        if self.registry:
            return f"the {self._pointer(role)} model of registry {self.registry.root}"
        return f"model folder {self.model_dir}"

    def _pointer_version(self, role: str) -> str | None:
        if not self.registry:
            return None
        try:
            return self.registry.pointer_version(self._pointer(role))
        except RegistryError:
            return None

    def _observe(self, role: str) -> tuple[Path | None, Fingerprint]:
        if self.registry is None:
            assert self.model_dir is not None
            # A symlinked folder is resolved once, for the same reason as a registry pointer below.
            return Path(os.path.realpath(self.model_dir)), fingerprint(self.model_dir)
        try:
            version = self.registry.pointer_version(self._pointer(role))
        except RegistryError as exc:
            return None, ("bad_pointer", str(exc), fingerprint(self.registry.root / self._pointer(role)))
        if version is None:
            return None, ("unset",)
        # The pointer is resolved once, to the immutable version folder: reading through the link
        # could take the manifest from one version and the model from the next.
        path = self.registry.versions / version
        return path, (version, fingerprint(path))

    def _unavailable(self, role: str, fp: Fingerprint) -> Exception:
        if fp and fp[0] == "bad_pointer":
            return RegistryError(str(fp[1]))
        return FileNotFoundError(f"{self._where(role)} is not set")

    def _load(self, role: str, path: Path) -> ModelArtifact:
        """Copy, verify and (for the active role) keep as last good. Runs in the loading thread."""
        snapshot = self._snapshot(path)
        try:
            try:
                artifact = load_artifact(snapshot, threads=self.threads)
                if self.validate is not None:
                    self.validate(artifact)
            except Exception as exc:
                raise ModelRefused(refusal_reason(exc), str(exc).replace(str(snapshot), str(path))) from exc
            if role == ACTIVE:
                try:
                    self._save_last_good(snapshot)
                except OSError as exc:
                    log.warning("could not keep %s as the last good model in %s: %s", artifact.version,
                                self.last_good_dir, exc)
            return dataclasses.replace(artifact, directory=path)
        finally:
            shutil.rmtree(snapshot, ignore_errors=True)

    def _snapshot(self, path: Path) -> Path:
        """A private copy of the artifact's two files, so that verification and the served model see
        one consistent state of a folder that may be changing."""
        incoming = self.state_dir / _INCOMING
        incoming.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=incoming))
        try:
            shutil.copyfile(path / MANIFEST_FILE, tmp / MANIFEST_FILE)
            try:
                manifest = json.loads((tmp / MANIFEST_FILE).read_text(encoding="utf-8"))
            except (UnicodeDecodeError, ValueError):
                return tmp  # load_artifact names the problem
            model_file = manifest.get("model_file") if isinstance(manifest, dict) else None
            if isinstance(model_file, str):
                if Path(model_file).name != model_file or model_file in ("", ".", "..", MANIFEST_FILE):
                    raise ArtifactError("manifest", f"model_file {model_file!r} must be a file name beside the "
                                                    "manifest")
                shutil.copyfile(path / model_file, tmp / model_file)
            return tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _save_last_good(self, snapshot: Path) -> None:
        """Keep the verified snapshot as ``last-good``: a symlink to a private folder, switched with
        ``os.replace`` (a folder cannot be replaced atomically)."""
        link = self.last_good_dir
        with contextlib.suppress(OSError):
            if (link / MANIFEST_FILE).read_bytes() == (snapshot / MANIFEST_FILE).read_bytes():
                return  # the manifest pins the ONNX sha256, and both were verified
        old = os.readlink(link) if link.is_symlink() else None
        if link.exists() and old is None:  # a plain folder (copied in by hand): moved out of the way
            os.rename(link, self.state_dir / f".{LAST_GOOD}-{uuid.uuid4().hex}")
        dest = self.state_dir / f".{LAST_GOOD}-{uuid.uuid4().hex}"
        for entry in snapshot.iterdir():
            _fsync(entry)
        os.rename(snapshot, dest)
        _fsync(dest, directory=True)
        tmp_link = self.state_dir / f".{LAST_GOOD}-link-{uuid.uuid4().hex}"
        os.symlink(dest.name, tmp_link)
        os.replace(tmp_link, link)
        _fsync(self.state_dir, directory=True)
        if old and old != dest.name and "/" not in old:
            shutil.rmtree(self.state_dir / old, ignore_errors=True)

    def _load_last_good(self) -> ModelArtifact:
        artifact = load_artifact(self.last_good_dir, threads=self.threads)
        if self.validate is not None:
            self.validate(artifact)
        return artifact

    def _clean_incoming(self) -> None:
        """Snapshots left behind by a crash (old ones only: another worker may share the state folder)."""
        incoming = self.state_dir / _INCOMING
        with contextlib.suppress(OSError):
            for entry in incoming.iterdir():
                with contextlib.suppress(OSError):
                    if time.time() - entry.stat().st_mtime > _STALE_SNAPSHOT_SECONDS:
                        shutil.rmtree(entry, ignore_errors=True)
            for entry in self.state_dir.glob(f".{LAST_GOOD}-*"):
                with contextlib.suppress(OSError):
                    if (entry.name != _readlink(self.last_good_dir)
                            and time.time() - entry.lstat().st_mtime > _STALE_SNAPSHOT_SECONDS):
                        if entry.is_symlink():
                            entry.unlink()
                        else:
                            shutil.rmtree(entry, ignore_errors=True)

    def _emit(self, event: ModelEvent) -> None:
        if event.kind == "loaded":
            log.info("model %s verified and loaded as %s (%s)", event.version, event.role, event.path)
        elif event.kind == "refused":
            serving = self.active.version if self.active else None
            if event.role == CANDIDATE:
                serving = self.candidate.version if self.candidate else None
            log.error("%s model refused (%s), still using %s: %s", event.role, event.reason, serving, event.message)
        elif event.kind == "last_good":
            log.warning("%s", event.message)
        else:
            log.info("candidate %s removed", event.version)
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:
                log.exception("model event handler failed on %s", event)


def _s(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _readlink(path: Path) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None
