"""Model registry: a directory of immutable, verified versions and atomically switched pointers.

Layout (it works as a shared volume; every link is relative, so it may be mounted anywhere)::

    ROOT/versions/<version>/manifest.json, model.onnx   immutable once published
    ROOT/current   -> versions/<version>                 the model the workers serve
    ROOT/candidate -> versions/<version>                 scored in shadow beside it
    ROOT/previous  -> versions/<version>                 what the last promote replaced
    ROOT/.tmp/                                           publish staging, on the same filesystem
    ROOT/.lock                                           serializes writers (flock)

A pointer is a symlink, switched by creating a temporary symlink and ``os.replace``-ing it over
the old one: rename(2) swaps a single directory entry atomically, so a reader sees the old
target or the new one, never nothing. A folder cannot be switched that way: renaming over a
non-empty directory fails (ENOTEMPTY), and removing it first leaves a moment with no model.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from export.artifact import MANIFEST_FILE, ArtifactError, load_artifact, sha256_file
from export.compare import Comparison

VERSIONS_DIR = "versions"
POINTERS = ("current", "candidate", "previous")
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,199}$")
_TMP_DIR = ".tmp"
_LOCK_FILE = ".lock"


class RegistryError(Exception):
    """A registry operation was refused; nothing was changed."""


@dataclass(frozen=True)
class VersionInfo:
    version: str
    path: Path
    name: str | None
    created: str | None  # from the manifest (export time)
    published: float  # Unix time the version folder was added
    sha256: str | None
    bytes: int | None
    pointers: tuple[str, ...]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_version_name(version: str) -> str:
    if not isinstance(version, str) or not VERSION_RE.match(version):
        raise RegistryError(f"{version!r} is not a usable version name (letters, digits, . _ + -; at most 200)")
    return version


def _read_manifest(directory: Path) -> dict | None:
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) else None


class Registry:
    """A registry rooted at ``root``. Nothing is created until the first write."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.versions = self.root / VERSIONS_DIR

    def __repr__(self) -> str:
        return f"Registry({str(self.root)!r})"

    # --- reading ---------------------------------------------------------------------------------

    def version_path(self, version: str) -> Path:
        return self.versions / check_version_name(version)

    def has_version(self, version: str) -> bool:
        return VERSION_RE.match(version) is not None and (self.versions / version).is_dir()

    def pointer_version(self, pointer: str) -> str | None:
        """The version a pointer names (even one whose folder is gone), or ``None`` when it is unset."""
        path = self._pointer_path(pointer)
        try:
            target = os.readlink(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise RegistryError(f"{path} is not a symlink into {VERSIONS_DIR}/ ({exc})") from None
        head, _, version = target.partition("/")
        if head != VERSIONS_DIR or not VERSION_RE.match(version):
            raise RegistryError(f"{path} points at {target!r}, not at {VERSIONS_DIR}/<version>")
        return version

    def resolve(self, pointer: str) -> Path | None:
        """The version folder a pointer names, or ``None`` when it is unset or its folder is missing."""
        version = self.pointer_version(pointer)
        if version is None:
            return None
        path = self.versions / version
        return path if path.is_dir() else None

    def list(self) -> list[VersionInfo]:
        """Every version, oldest export first, with the pointers that name it."""
        named: dict[str, list[str]] = {}
        for p in POINTERS:
            with contextlib.suppress(RegistryError):
                v = self.pointer_version(p)
                if v is not None:
                    named.setdefault(v, []).append(p)
        infos = []
        if self.versions.is_dir():
            for entry in self.versions.iterdir():
                if entry.name.startswith(".") or not entry.is_dir():
                    continue
                m = _read_manifest(entry) or {}
                infos.append(VersionInfo(
                    version=entry.name, path=entry, name=_opt_str(m.get("name")), created=_opt_str(m.get("created")),
                    published=entry.stat().st_mtime, sha256=_opt_str(m.get("sha256")),
                    bytes=m.get("bytes") if isinstance(m.get("bytes"), int) else None,
                    pointers=tuple(named.get(entry.name, ()))))
        return sorted(infos, key=lambda i: (i.created or "", i.published, i.version))

    # --- writing ---------------------------------------------------------------------------------

    def publish(self, src_dir: str | Path) -> str:
        """Verify the artifact in ``src_dir`` and add it as the version its manifest names.

        Publishing the same content again returns the version; different content under an existing
        version name is refused.
        """
        src = Path(src_dir)
        try:
            artifact = load_artifact(src)
        except ArtifactError as exc:
            raise RegistryError(f"{src} refused: {exc}") from exc
        version = check_version_name(artifact.version)
        model_file = str(artifact.manifest["model_file"])
        if Path(model_file).name != model_file or model_file.startswith(".") or model_file == MANIFEST_FILE:
            raise RegistryError(f"{src}: model_file {model_file!r} must be a plain file name beside the manifest")
        tmp_root = self.root / _TMP_DIR
        tmp_root.mkdir(parents=True, exist_ok=True)
        self.versions.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{version}.", dir=tmp_root))
        try:
            for name in (MANIFEST_FILE, model_file):
                shutil.copyfile(src / name, tmp / name)
                _fsync_file(tmp / name)
            # The copy is verified again: the source could have changed between the check and the copy.
            try:
                copied = load_artifact(tmp)
            except ArtifactError as exc:
                raise RegistryError(f"{src} changed while it was copied: {exc}") from exc
            if copied.manifest != artifact.manifest:
                raise RegistryError(f"{src} changed while it was copied (its manifest differs)")
            for name in (MANIFEST_FILE, model_file):
                os.chmod(tmp / name, 0o444)
            os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide it from other users of a shared volume
            _fsync_dir(tmp)
            with self._lock():
                dest = self.versions / version
                if dest.exists():
                    self._same_content(dest, tmp, model_file)
                    return version
                os.rename(tmp, dest)
                _fsync_dir(self.versions)
        except FileNotFoundError as exc:
            raise RegistryError(f"{src} changed while it was copied: {exc}") from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return version

    def stage(self, version: str) -> None:
        """Make ``version`` the candidate the workers score in shadow."""
        with self._lock():
            self._require(version)
            if version == self.pointer_version("current"):
                raise RegistryError(f"{version} is already current")
            self._set_pointer("candidate", version)

    def unstage(self) -> str | None:
        """Clear the candidate; returns the version it named."""
        with self._lock():
            old = self.pointer_version("candidate")
            self._set_pointer("candidate", None)
            return old

    def promote(self, version: str | None = None, *, force: bool = False,
                comparison: Comparison | None = None) -> str:
        """Make ``version`` (default: the candidate) current; the old current becomes ``previous``.

        Without ``force`` it must be the staged candidate and ``comparison`` (its live scores against
        the current model) must say it wins, unless there is no current model yet. The candidate
        pointer is cleared: its scores were against the replaced model.
        """
        with self._lock():
            candidate = self.pointer_version("candidate")
            current = self.pointer_version("current")
            target = version if version is not None else candidate
            if target is None:
                raise RegistryError("nothing to promote: no candidate is staged (stage one, or name a version)")
            self._require(target)
            if target == current:
                if candidate == target:
                    self._set_pointer("candidate", None)
                return target
            if not force and current is not None:  # the first current has nothing to beat
                self._guard(target, candidate, current, comparison)
            if current is not None:
                self._set_pointer("previous", current)
            self._set_pointer("current", target)
            self._set_pointer("candidate", None)
            return target

    def rollback(self) -> str:
        """Make ``previous`` current again; the replaced current becomes ``previous`` (so it can be undone)."""
        with self._lock():
            previous = self.pointer_version("previous")
            if previous is None:
                raise RegistryError("nothing to roll back to: no previous version is recorded")
            self._require(previous)
            current = self.pointer_version("current")
            self._set_pointer("current", previous)
            self._set_pointer("previous", current)
            return previous

    # --- internals -------------------------------------------------------------------------------

    def _guard(self, target: str, candidate: str | None, current: str | None, comparison: Comparison | None) -> None:
        if target != candidate:
            raise RegistryError(f"refusing to promote {target}: it is not the staged candidate "
                                f"({candidate or 'none'}), so it has no live scores; force overrides")
        if comparison is None:
            raise RegistryError(f"refusing to promote {target}: no comparison with the current model's live scores; "
                                "compare first, or force")
        if comparison.candidate_versions and comparison.candidate_versions != (target,):
            raise RegistryError(f"refusing to promote {target}: the live scores are for candidate "
                                f"{', '.join(comparison.candidate_versions)}")
        if comparison.current_versions and current is not None and comparison.current_versions != (current,):
            raise RegistryError(f"refusing to promote {target}: it was scored against "
                                f"{', '.join(comparison.current_versions)}, but current is {current}")
        if not comparison.wins:
            raise RegistryError(f"refusing to promote {target}: it does not beat the current model ("
                                + "; ".join(comparison.reasons) + "); force overrides")

    def _pointer_path(self, pointer: str) -> Path:
        if pointer not in POINTERS:
            raise RegistryError(f"unknown pointer {pointer!r} (one of {', '.join(POINTERS)})")
        return self.root / pointer

    def _require(self, version: str) -> None:
        check_version_name(version)
        if not (self.versions / version).is_dir():
            raise RegistryError(f"no version {version!r} in {self.versions}")

    def _set_pointer(self, pointer: str, version: str | None) -> None:
        link = self._pointer_path(pointer)
        if version is None:
            with contextlib.suppress(FileNotFoundError):
                if link.is_dir() and not link.is_symlink():
                    raise RegistryError(f"{link} is a folder, not a pointer; move it away")
                link.unlink()
                _fsync_dir(self.root)
            return
        tmp = self.root / f".{pointer}.{uuid.uuid4().hex}.tmp"
        os.symlink(f"{VERSIONS_DIR}/{version}", tmp)
        try:
            os.replace(tmp, link)
        except OSError as exc:
            tmp.unlink()
            raise RegistryError(f"cannot switch {link} ({exc}); it must be a symlink, not a folder") from None
        _fsync_dir(self.root)

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / _LOCK_FILE).open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    @staticmethod
    def _same_content(existing: Path, new: Path, model_file: str) -> None:
        old_manifest, new_manifest = _read_manifest(existing), _read_manifest(new)
        old_model = existing / model_file
        if (old_manifest != new_manifest or not old_model.is_file()
                or sha256_file(old_model) != sha256_file(new / model_file)):
            raise RegistryError(f"version {existing.name} already exists in {existing.parent} with different "
                                "content; versions are immutable (export under a new version)")


def _opt_str(value: object) -> str | None:
    return value if isinstance(value, str) else None
