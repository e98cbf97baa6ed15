"""The .akx artifact: one zip file holding the compiled files and manifest.json (inputs,
outputs, backend + fingerprint, target, precision, versions, sha256 of every file).
`load` verifies every checksum before any native code is loaded."""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import tempfile
import zipfile
import zlib
from typing import Any

from accelkit.errors import ArtifactError

FORMAT = "accelkit-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def sha256_file(path: str) -> str:
    """sha256 of a file, hashed through mmap: no copy of the bytes through Python."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
                digest.update(view)
    return digest.hexdigest()


def versions() -> dict[str, str]:
    import onnx
    import tvm
    import tvm_ffi

    from accelkit import __version__

    return {"accelkit": __version__, "tvm": tvm.__version__, "tvm_ffi": tvm_ffi.__version__,
            "onnx": onnx.__version__}


def save(directory: str, manifest: dict[str, Any], path: str | os.PathLike) -> str:
    """Zip `directory`'s files (listed in manifest['files']) + the manifest, atomically."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ArtifactError(f"cannot save to '{path}': folder '{parent}' does not exist")
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=".akx-", suffix=".tmp")
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
            for name in manifest["files"]:
                zf.write(os.path.join(directory, name), name)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise ArtifactError(f"cannot save the artifact to '{path}': {exc}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the .akx at `path`, validated (no native code touched)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ArtifactError(f"artifact '{path}' does not exist (create one with "
                            f"`accelkit compile MODEL.onnx -o {os.path.basename(path)}`)")
    try:
        with zipfile.ZipFile(path) as zf:
            raw = zf.read(MANIFEST)
    except KeyError:
        raise ArtifactError(f"'{path}' has no {MANIFEST}: not an accelkit artifact") from None
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as exc:
        raise ArtifactError(f"'{path}' is not a readable accelkit artifact (truncated or not an "
                            f".akx file: {exc}); recompile the model") from exc
    return parse_manifest(raw, f"'{path}'")


def parse_manifest(raw: bytes, where: str) -> dict[str, Any]:
    """Parse and validate manifest.json bytes; `where` names the artifact in errors."""
    try:
        manifest = json.loads(raw)
        ok = isinstance(manifest, dict) and manifest.get("format") == FORMAT
    except (ValueError, UnicodeDecodeError):
        ok = False
    if not ok:
        raise ArtifactError(f"{where} has a malformed {MANIFEST}; recompile the model")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{where} uses artifact format {manifest.get('format_version')}, "
                            f"this accelkit reads format {FORMAT_VERSION}; recompile the model")
    for key in ("backend", "files", "inputs", "outputs", "versions", "precision"):
        if key not in manifest:
            raise ArtifactError(f"{where}: {MANIFEST} lacks '{key}'; recompile the model")
    for name in manifest["files"]:
        if not isinstance(name, str) or os.path.basename(name) != name or name == MANIFEST:
            raise ArtifactError(f"{where} lists an invalid file name {name!r}")
    return manifest


def compatible_backend(manifest: dict[str, Any], where: str):
    """The backend that runs this artifact here; ArtifactError if versions/target don't fit."""
    from accelkit.backends import get_backend
    from accelkit.errors import BackendError

    ours = versions()
    for lib in ("tvm", "tvm_ffi"):
        if manifest["versions"].get(lib) != ours[lib]:
            raise ArtifactError(
                f"{where} was built with {lib} {manifest['versions'].get(lib)}, this install has "
                f"{ours[lib]}; recompile the model with this install")
    try:
        backend = get_backend(manifest["backend"])
    except BackendError as exc:
        raise ArtifactError(f"{where} needs backend '{manifest['backend']}': {exc}") from exc
    reason = backend.check_artifact(manifest)
    if reason:
        raise ArtifactError(f"cannot load {where}: {reason}; recompile the model on this machine")
    return backend


def verify_files(directory: str, manifest: dict[str, Any], where: str) -> None:
    """Every file the manifest lists exists in `directory` with its recorded sha256."""
    for name, expected in manifest["files"].items():
        path = os.path.join(directory, name)
        try:
            actual = sha256_file(path)
        except OSError as exc:
            raise ArtifactError(f"{where} is incomplete: cannot read {name} ({exc.strerror})") from exc
        if actual != expected:
            raise ArtifactError(f"{where} is corrupted: {name} does not match its sha256 "
                                f"in the manifest; recompile the model")


def load(path: str | os.PathLike):
    """Load an .akx written by CompiledModel.save, after verifying it fully."""
    from accelkit.model import CompiledModel

    path = os.fspath(path)
    where = f"'{path}'"
    manifest = read_manifest(path)
    backend = compatible_backend(manifest, where)
    directory = tempfile.mkdtemp(prefix="accelkit-load-")
    try:
        with zipfile.ZipFile(path) as zf:
            for name in manifest["files"]:
                with zf.open(name) as src, open(os.path.join(directory, name), "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        verify_files(directory, manifest, where)
    except ArtifactError:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    except (KeyError, zipfile.BadZipFile, zlib.error, OSError, EOFError) as exc:
        shutil.rmtree(directory, ignore_errors=True)
        raise ArtifactError(f"{where} is damaged ({exc}); recompile the model") from exc
    return CompiledModel(backend, directory, manifest, owns_directory=True)
