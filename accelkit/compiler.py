"""accelkit.compile: validate options, run the frontend, let the backend build, wrap the result."""
from __future__ import annotations

import datetime
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

from accelkit.errors import AccelkitError, CompileError, OptionError

PRECISIONS = ("fp32", "fp16", "bf16", "int8")


def compile_model(
    model,
    *,
    backend: str = "cpu",
    precision: str = "fp32",
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    cache: bool = True,
    tune=None,
    **options: Any,
):
    """Compile an ONNX model (path, bytes or onnx.ModelProto) into a CompiledModel.

    precision: fp32 (others listed in PRECISIONS arrive with quantization support).
    input_shapes: sizes for symbolic dims, e.g. {"input_ids": [1, 128]}.
    cache: reuse a previous compilation of the same thing (see README: not yet implemented).
    tune: a tuning budget (not yet implemented).
    options: backend-specific options (Backend.options lists them).
    """
    from accelkit import artifact, frontend
    from accelkit.guards import index_bounds
    from accelkit.backends import CompileOptions, get_backend
    from accelkit.model import CompiledModel

    if precision not in PRECISIONS:
        raise OptionError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    be = get_backend(backend)
    if precision not in be.precisions:
        raise OptionError(f"backend '{be.name}' does not support precision {precision!r} yet; "
                          f"it supports {', '.join(be.precisions)}")
    if tune is not None:
        raise OptionError("tune= is not supported yet in this accelkit version; omit it")
    if not isinstance(cache, bool):
        raise OptionError(f"cache must be True or False, got {cache!r}")
    unknown = sorted(set(options) - set(be.options))
    if unknown:
        known = ", ".join(sorted(be.options)) or "none"
        raise OptionError(f"unknown option(s) {', '.join(unknown)} for backend '{be.name}'; "
                          f"its options are: {known}")
    if not be.is_available():
        from accelkit.errors import BackendError

        raise BackendError(f"backend '{be.name}' is not available on this machine "
                           f"(its device or driver is missing); try backend='cpu'")

    graph = frontend.prepare(model, input_shapes)
    out_dir = tempfile.mkdtemp(prefix="accelkit-build-")
    try:
        entries = be.compile(graph, CompileOptions(precision=precision, extra=dict(options)), out_dir)
        files = {name: artifact.sha256_file(os.path.join(out_dir, name))
                 for name in sorted(os.listdir(out_dir))}
        manifest = {
            "format": artifact.FORMAT,
            "format_version": artifact.FORMAT_VERSION,
            "backend": be.name,
            "backend_fingerprint": be.fingerprint(),
            "precision": precision,
            "model_name": graph.proto.graph.name or "model",
            "inputs": [_spec(s) for s in graph.inputs],
            "outputs": [_spec(s) for s in graph.outputs],
            "index_bounds": index_bounds(graph.proto),
            "versions": artifact.versions(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "files": files,
            **entries,
        }
        return CompiledModel(be, out_dir, manifest, owns_directory=True)
    except AccelkitError:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    except Exception as exc:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise CompileError(f"backend '{be.name}' failed: {type(exc).__name__}: {exc}") from exc


def _spec(spec) -> dict[str, Any]:
    return {"name": spec.name, "shape": list(spec.shape), "dtype": spec.dtype}
