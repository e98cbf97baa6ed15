"""One thread pool per process: TVM's. TVM-generated parallel loops and accelkit's C kernels
both run on it (the kernels launch through TVMBackendParallelLaunch), so no second pool (OpenMP,
a BLAS) ever fights it for the cores.

The size is fixed when the pool starts, at the first parallel call: ACCELKIT_NUM_THREADS if set,
else TVM_NUM_THREADS if set, else the cores this process may run on. (TVM's own default halves
the core count on x86 to skip hyper-threads, which on a 2-core machine leaves one thread.)
`set_num_threads` changes it until then; after, it can only lower what the kernels use."""
from __future__ import annotations

import os

_ENV = "ACCELKIT_NUM_THREADS"
_started = False


def default_num_threads() -> int:
    """The count this process's pool gets: ACCELKIT_NUM_THREADS, TVM_NUM_THREADS, or the cores."""
    for name in (_ENV, "TVM_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value:
            return _parse(value, name)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _parse(value, what: str) -> int:
    from accelkit.errors import OptionError

    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise OptionError(f"{what} must be a positive integer number of threads (got {value!r})")
    return n


def configure() -> int:
    """Set the pool size before TVM's pool starts (idempotent); returns the count requested."""
    n = default_num_threads()
    if not _started:
        os.environ["TVM_NUM_THREADS"] = str(n)
    return n


def set_num_threads(n: int) -> int:
    """Use `n` threads. Before the first model runs this sizes the whole pool; afterwards only
    accelkit's kernels follow it (down to 1, up to the pool's size). Returns the count in effect
    for the kernels."""
    n = _parse(n, "num_threads")
    os.environ[_ENV] = str(n)
    if not _started:
        os.environ["TVM_NUM_THREADS"] = str(n)
        return n
    from accelkit import kernels

    return kernels.wire_threads(n)


def pool_size() -> int:
    """Threads in TVM's pool (starts it)."""
    import tvm  # noqa: F401  (loads the runtime, which registers runtime.NumThreads)
    import tvm_ffi

    global _started
    configure()
    _started = True
    return int(tvm_ffi.get_global_func("runtime.NumThreads")())


_caller: frozenset[int] | None = None
_caller_checked = False


def caller_cpus() -> frozenset[int] | None:
    """CPUs the thread calling a model should run on while the model runs: the ones TVM did not
    pin a pool worker to (TVM binds each worker to one core but leaves the calling thread, which
    does the first share of every parallel loop, free to land on a worker's core; on 2 cores
    that made whole runs 1.5x slower in some processes). None: do not pin (no pinned workers,
    no free CPU, not Linux, or ACCELKIT_PIN_CALLER=0). Decided once, after the pool started."""
    global _caller, _caller_checked
    if _caller_checked:
        return _caller
    _caller_checked = True
    if os.environ.get("ACCELKIT_PIN_CALLER", "1").strip() == "0" or not hasattr(os, "sched_setaffinity"):
        return None
    pinned: set[int] = set()
    try:
        mine = os.sched_getaffinity(0)
        for task in os.listdir("/proc/self/task"):
            cpus = os.sched_getaffinity(int(task))
            if len(cpus) == 1 and len(mine) > 1:
                pinned |= cpus
    except OSError:
        return None
    free = mine - pinned
    _caller = frozenset(free) if pinned and free else None
    return _caller


def run_on_caller_cpus(call):
    """call() with the calling thread kept off the pool workers' cores (see caller_cpus)."""
    cpus = caller_cpus()
    if not cpus:
        return call()
    before = os.sched_getaffinity(0)
    if before == cpus:
        return call()
    os.sched_setaffinity(0, cpus)
    try:
        return call()
    finally:
        os.sched_setaffinity(0, before)
