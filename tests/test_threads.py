"""Thread count: ACCELKIT_NUM_THREADS / accelkit.set_num_threads size the one pool (TVM's) that
both TVM-generated code and accelkit's kernels run on; bad values get a clear error."""
import subprocess
import sys

import pytest

import accelkit
from accelkit.errors import OptionError

PROBE = r"""
import accelkit, tvm_ffi
from accelkit import kernels
{setup}
k = kernels.load()
print(tvm_ffi.get_global_func("runtime.NumThreads")(), k.num_threads())
"""


def _probe(setup="", env=None):
    import os

    full = {k: v for k, v in os.environ.items() if k not in ("ACCELKIT_NUM_THREADS", "TVM_NUM_THREADS")}
    full.update(env or {})
    done = subprocess.run([sys.executable, "-c", PROBE.format(setup=setup)], capture_output=True,
                          text=True, env=full, timeout=120)
    assert done.returncode == 0, done.stderr
    return tuple(int(v) for v in done.stdout.split())


def test_default_pool_uses_every_core():
    import os

    cores = len(os.sched_getaffinity(0))
    # TVM alone would halve the cores on x86 (hyper-threads), leaving 1 thread on 2 cores
    assert _probe() == (cores, cores)


def test_environment_and_api_set_the_count():
    assert _probe(env={"ACCELKIT_NUM_THREADS": "1"}) == (1, 1)
    assert _probe(setup="accelkit.set_num_threads(1)") == (1, 1)


def test_bad_thread_counts_are_refused():
    with pytest.raises(OptionError, match="num_threads must be a positive integer"):
        accelkit.set_num_threads(0)
    with pytest.raises(OptionError, match="positive integer"):
        accelkit.set_num_threads("many")
    done = subprocess.run([sys.executable, "-m", "accelkit", "--threads", "0", "backends"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "num_threads must be a positive integer" in done.stderr
