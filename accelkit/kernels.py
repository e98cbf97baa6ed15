"""Loads accelkit's C kernel extension, registers its TVM-FFI functions and wires their parallel
loops to TVM's thread pool (once per process)."""
from __future__ import annotations

import functools

ISAS = ("portable", "avx2", "avx512")  # ACCELKIT_KERNEL_ISA's values and ak_isa()'s codes, in order


@functools.cache
def load():
    """Import accelkit._kernels (which registers `accelkit.cpu.*` into TVM-FFI) and return it."""
    import os

    from accelkit import threads

    cap = os.environ.get("ACCELKIT_KERNEL_ISA", "")
    if cap and cap not in ISAS:
        from accelkit.errors import OptionError

        raise OptionError(f"ACCELKIT_KERNEL_ISA={cap!r} is not an instruction set of accelkit's "
                          f"kernels; choose one of {', '.join(ISAS)} (the most they may use), or "
                          "unset it for the CPU's best")
    threads.configure()
    import tvm  # noqa: F401  -- loads libtvm_runtime.so (the pool's launch function)
    import tvm_ffi  # noqa: F401  -- loads libtvm_ffi.so, which the extension links by soname

    try:
        from accelkit import _kernels
    except ImportError as exc:  # pragma: no cover - only on a broken install
        from accelkit.errors import BackendError

        raise BackendError(
            f"accelkit's C kernels are not built ({exc}); reinstall accelkit with "
            "`pip install -e .` from the repository (needs gcc and cython)"
        ) from exc
    wire_threads(threads.default_num_threads(), module=_kernels)
    return _kernels


def wire_threads(n: int, module=None) -> int:
    """Point the kernels at TVM's pool with min(n, pool size) tasks; returns that count."""
    import ctypes

    import tvm

    from accelkit import threads

    kernels = module if module is not None else load()
    runtime = tvm.base._LOADED_LIBS.get("tvm_runtime")
    if runtime is None:  # pragma: no cover - a TVM without the runtime library loaded
        kernels.set_parallel_launch(0, 1)
        return 1
    launch = ctypes.cast(runtime.TVMBackendParallelLaunch, ctypes.c_void_p).value
    count = max(1, min(int(n), threads.pool_size()))
    kernels.set_parallel_launch(launch, count)
    return count
