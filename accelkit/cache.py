"""The compiled-model cache: content-addressed entries, published atomically, verified on use.

Layout (ACCELKIT_CACHE_DIR, else $XDG_CACHE_HOME/accelkit/compiled, else ~/.cache/...; 0700):
    <dir>/entries/<key>/   manifest.json + the backend's files (+ entry.json: what it is)
    <dir>/locks/<key>.lock a per-key flock: N processes compiling one model compile it once
    <dir>/tmp/             entries being written (moved into entries/ by one rename)
    <dir>/digests/         memoised sha256 of model files, keyed by path + stat stamp
An entry is immutable once published; its `last_used` file's mtime is its LRU clock.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import shutil
import tempfile
import uuid
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from accelkit import artifact
from accelkit.errors import ArtifactError, OptionError

CACHE_FORMAT = 1
ENTRY_INFO = "entry.json"
LAST_USED = "last_used"


# (entry path, its files' sha256) -> the Runner loaded from it, while any model still uses it
_LOADED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


class CacheWarning(UserWarning):
    """The cache could not be used (unwritable, full, damaged entry); compilation went on."""


def cache_dir() -> str:
    explicit = os.environ.get("ACCELKIT_CACHE_DIR")
    if explicit:
        return os.path.abspath(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "accelkit", "compiled")


def model_digest(model, memo_dir: str | None = None) -> tuple[str, str]:
    """(sha256 of the model's bytes, a short description of where it came from).

    For a file, the digest is memoised in `memo_dir` under its path and stat stamp (size, mtime,
    ctime, inode, device): an unchanged file is not re-read on a cache hit. ctime cannot be set
    from user space, so even an edit that restores the mtime is seen."""
    import onnx

    if isinstance(model, onnx.ModelProto):
        serialized = model.SerializeToString(deterministic=True)
        return hashlib.sha256(serialized).hexdigest(), model.graph.name or "ModelProto"
    if isinstance(model, (bytes, bytearray, memoryview)):
        return hashlib.sha256(model).hexdigest(), f"<{len(model)} bytes>"
    path = os.path.abspath(os.fspath(model))
    before = _stamp(path)
    memo = (os.path.join(memo_dir, hashlib.sha256(path.encode()).hexdigest() + ".json")
            if memo_dir else None)
    if memo:
        try:
            with open(memo) as f:
                known = json.load(f)
            if known["path"] == path and known["stamp"] == before:
                return known["digest"], path
        except (OSError, ValueError, KeyError, TypeError):
            pass
    result = artifact.sha256_file(path)
    if memo and _stamp(path) == before:  # not memoised if the file changed while being read
        tmp = f"{memo}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            os.makedirs(memo_dir, mode=0o700, exist_ok=True)
            _write(tmp, json.dumps({"path": path, "stamp": before, "digest": result}))
            os.replace(tmp, memo)
        except OSError:  # a read-only or full cache only loses the memo
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return result, path


def _stamp(path: str) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def cache_key(components: dict[str, Any]) -> str:
    """sha256 over every component that changes what compile produces (JSON, sorted keys)."""
    blob = json.dumps({"cache_format": CACHE_FORMAT, **components}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class Entry:
    key: str
    path: str
    info: dict[str, Any]
    size: int
    last_used: float


class Cache:
    def __init__(self, root: str | None = None):
        self.root = root or cache_dir()
        self.entries = os.path.join(self.root, "entries")

    # -- lookup / publish --------------------------------------------------------------
    def entry_path(self, key: str) -> str:
        return os.path.join(self.entries, key)

    def load(self, key: str):
        """The CompiledModel cached under `key`, verified; None on a miss. A damaged entry is
        removed (with a CacheWarning) and reported as a miss so the caller rebuilds it."""
        from accelkit.model import CompiledModel

        path = self.entry_path(key)
        if not os.path.isdir(path):
            return None
        try:
            manifest, backend = _check_entry(path)
        except ArtifactError as exc:
            warnings.warn(f"accelkit: {exc}; removing it and compiling again", CacheWarning,
                          stacklevel=3)
            self.remove(key)
            return None
        with contextlib.suppress(OSError):  # LRU clock; a read-only cache still serves hits
            os.utime(os.path.join(path, LAST_USED))
        # the files were verified just now; if this very build is already loaded in this
        # process, share its executable instead of loading (and copying its weights) again
        loaded_as = (path, tuple(sorted(manifest["files"].items())))
        try:
            model = CompiledModel(backend, path, manifest, owns_directory=False,
                                  runner=_LOADED.get(loaded_as))
        except ArtifactError as exc:  # e.g. it calls kernels this accelkit no longer has
            warnings.warn(f"accelkit: {exc}; removing it and compiling again", CacheWarning,
                          stacklevel=3)
            self.remove(key)
            return None
        _LOADED[loaded_as] = model._runner
        model.cache_status = "hit"
        return model

    def publish(self, key: str, build_dir: str, manifest: dict[str, Any],
                info: dict[str, Any]) -> str | None:
        """Copy a finished build into the cache atomically; returns the entry path, or None
        (with a CacheWarning) when the cache cannot be written. Never leaves a partial entry."""
        tmp = None
        try:
            tmp_root = os.path.join(self.root, "tmp")
            self._makedirs(tmp_root)
            self._makedirs(self.entries)
            tmp = tempfile.mkdtemp(prefix=f"{key[:16]}-", dir=tmp_root)
            for name in manifest["files"]:
                shutil.copyfile(os.path.join(build_dir, name), os.path.join(tmp, name))
            _write(os.path.join(tmp, artifact.MANIFEST), json.dumps(manifest, indent=2))
            _write(os.path.join(tmp, ENTRY_INFO), json.dumps(info, indent=2, default=str))
            _write(os.path.join(tmp, LAST_USED), "")
            for name in os.listdir(tmp):
                _fsync_file(os.path.join(tmp, name))
            _fsync_dir(tmp)
            final = self.entry_path(key)
            try:
                os.rename(tmp, final)  # atomic; fails if another writer published first
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
            tmp = None
            _fsync_dir(self.entries)
            return final
        except OSError as exc:
            warnings.warn(f"accelkit: cannot write the compile cache at {self.root} "
                          f"({exc.strerror or exc}); the model was compiled but not cached. Set "
                          f"ACCELKIT_CACHE_DIR to a writable folder or pass cache=False",
                          CacheWarning, stacklevel=3)
            return None
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[bool]:
        """Hold the per-key lock (yields True), or yield False if the cache can't be locked."""
        try:
            locks = os.path.join(self.root, "locks")
            self._makedirs(locks)
            fd = os.open(os.path.join(locks, f"{key}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            yield False  # unwritable cache: publish() will warn
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield True
        finally:
            os.close(fd)  # closing releases the flock

    def _makedirs(self, path: str) -> None:
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        os.makedirs(path, mode=0o700, exist_ok=True)

    # -- maintenance ------------------------------------------------------------------
    def list(self) -> list[Entry]:
        result = []
        if not os.path.isdir(self.entries):
            return result
        for key in sorted(os.listdir(self.entries)):
            path = self.entry_path(key)
            try:
                size = sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path)
                           if os.path.isfile(os.path.join(path, n)))
            except OSError:  # not an entry (a stray file), or removed while we looked at it
                continue
            try:
                with open(os.path.join(path, ENTRY_INFO)) as f:
                    info = json.load(f)
            except (OSError, ValueError):
                info = {}
            try:
                last_used = os.path.getmtime(os.path.join(path, LAST_USED))
            except OSError:
                last_used = 0.0
            result.append(Entry(key, path, info, size, last_used))
        return result

    def verify(self) -> list[tuple[Entry, str | None]]:
        """(entry, problem or None) for every entry; nothing is loaded or removed."""
        report = []
        for entry in self.list():
            try:
                _check_entry(entry.path)
                problem = None
            except ArtifactError as exc:
                problem = str(exc)
            report.append((entry, problem))
        return report

    def remove(self, key: str) -> None:
        """Remove one entry: renamed away first, so no reader ever sees half of it."""
        path = self.entry_path(key)
        doomed = os.path.join(self.root, "tmp", f"removed-{key[:16]}-{uuid.uuid4().hex[:8]}")
        try:
            os.makedirs(os.path.dirname(doomed), exist_ok=True)
            os.rename(path, doomed)
        except OSError:
            doomed = path
        shutil.rmtree(doomed, ignore_errors=True)

    def clear(self) -> int:
        entries = self.list()
        for entry in entries:
            self.remove(entry.key)
        shutil.rmtree(os.path.join(self.root, "tmp"), ignore_errors=True)
        return len(entries)

    def prune(self, max_size: int) -> list[Entry]:
        """Remove least recently used entries until the total is <= max_size bytes."""
        entries = sorted(self.list(), key=lambda e: e.last_used)
        total = sum(e.size for e in entries)
        removed = []
        for entry in entries:
            if total <= max_size:
                break
            self.remove(entry.key)
            total -= entry.size
            removed.append(entry)
        return removed


def _check_entry(path: str) -> tuple[dict[str, Any], Any]:
    """(manifest, backend) of the entry at `path` once its manifest, versions, target and every
    file's sha256 check out; ArtifactError says what is wrong. Loads no native code."""
    where = f"cache entry {path}"
    try:
        with open(os.path.join(path, artifact.MANIFEST), "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ArtifactError(f"{where} is unreadable: {exc}") from exc
    manifest = artifact.parse_manifest(raw, where)
    backend = artifact.compatible_backend(manifest, where)
    artifact.verify_files(path, manifest, where)
    return manifest, backend


def parse_size(text: str) -> int:
    """'2G', '500M', '1.5GiB', '1024' -> bytes."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = value[-1:] if value[-1:] in units and value[-1:] else ""
    number = value[: len(value) - len(unit)]
    try:
        size = float(number) * units[unit]
    except ValueError:
        raise OptionError(f"cannot read size {text!r}: use e.g. 500M, 2G or 1024") from None
    if not math.isfinite(size):
        raise OptionError(f"cannot read size {text!r}: use e.g. 500M, 2G or 1024")
    if size < 0:
        raise OptionError(f"size {text!r} is negative")
    return int(size)


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

