"""The .akx artifact: one zip file holding the compiled files and manifest.json (inputs,
outputs, backend + fingerprint, target, precision, versions, sha256 of every file).
`load` verifies every checksum before any native code is loaded."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
import zlib
from typing import Any

from accelkit.errors import ArtifactError

FORMAT = "accelkit-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
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
    try:
        manifest = json.loads(raw)
        ok = isinstance(manifest, dict) and manifest.get("format") == FORMAT
    except (ValueError, UnicodeDecodeError):
        ok = False
    if not ok:
        raise ArtifactError(f"'{path}' has a malformed {MANIFEST}; recompile the model")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"'{path}' uses artifact format {manifest.get('format_version')}, "
                            f"this accelkit reads format {FORMAT_VERSION}; recompile the model")
    for key in ("backend", "files", "inputs", "outputs", "versions", "precision"):
        if key not in manifest:
            raise ArtifactError(f"'{path}': {MANIFEST} lacks '{key}'; recompile the model")
    return manifest


def load(path: str | os.PathLike):
    """Load an .akx written by CompiledModel.save, after verifying it fully."""
    from accelkit.backends import get_backend
    from accelkit.errors import BackendError
    from accelkit.model import CompiledModel

    path = os.fspath(path)
    manifest = read_manifest(path)
    ours = versions()
    for lib in ("tvm", "tvm_ffi"):
        if manifest["versions"].get(lib) != ours[lib]:
            raise ArtifactError(
                f"'{path}' was built with {lib} {manifest['versions'].get(lib)}, this install has "
                f"{ours[lib]}; recompile the model with this install")
    try:
        backend = get_backend(manifest["backend"])
    except BackendError as exc:
        raise ArtifactError(f"'{path}' needs backend '{manifest['backend']}': {exc}") from exc
    reason = backend.check_artifact(manifest)
    if reason:
        raise ArtifactError(f"cannot load '{path}': {reason}; recompile the model on this machine")
    directory = tempfile.mkdtemp(prefix="accelkit-load-")
    try:
        with zipfile.ZipFile(path) as zf:
            for name, expected in manifest["files"].items():
                if os.path.basename(name) != name or name == MANIFEST:
                    raise ArtifactError(f"'{path}' lists an invalid file name {name!r}")
                target = os.path.join(directory, name)
                with zf.open(name) as src, open(target, "wb") as dst:
                    dst.write(src.read())
                if sha256_file(target) != expected:
                    raise ArtifactError(f"'{path}' is corrupted: {name} does not match its sha256 "
                                        f"in the manifest; recompile the model")
    except ArtifactError:
        _rmtree(directory)
        raise
    except (KeyError, zipfile.BadZipFile, zlib.error, OSError, EOFError) as exc:
        _rmtree(directory)
        raise ArtifactError(f"'{path}' is damaged ({exc}); recompile the model") from exc
    return CompiledModel(backend, directory, manifest, owns_directory=True)


def _rmtree(directory):
    import shutil

    shutil.rmtree(directory, ignore_errors=True)
