"""Loads accelkit's C kernel extension and registers its TVM-FFI functions (once per process)."""
from __future__ import annotations

import functools


@functools.cache
def load():
    """Import accelkit._kernels (which registers `accelkit.cpu.*` into TVM-FFI) and return it."""
    import tvm_ffi  # noqa: F401  -- loads libtvm_ffi.so, which the extension links by soname

    try:
        from accelkit import _kernels
    except ImportError as exc:  # pragma: no cover - only on a broken install
        from accelkit.errors import BackendError

        raise BackendError(
            f"accelkit's C kernels are not built ({exc}); reinstall accelkit with "
            "`pip install -e .` from the repository (needs gcc and cython)"
        ) from exc
    return _kernels
