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


PIN_PROBE = r"""
import os, numpy as np, accelkit
from accelkit import threads
from conftest import mlp_model
model = accelkit.compile(mlp_model(batch=64, dims=(256, 512, 16)), cache=False)
feeds = {"x": np.ones((64, 256), np.float32)}
before = os.sched_getaffinity(0)
for _ in range(3):
    out = model.run(feeds)
workers = set()
for task in os.listdir("/proc/self/task"):
    cpus = os.sched_getaffinity(int(task))
    if len(cpus) == 1:
        workers |= cpus
caller = threads.caller_cpus()
import json
print(json.dumps([sorted(before), sorted(os.sched_getaffinity(0)), sorted(workers), sorted(caller or [])]))
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_setaffinity"), reason="Linux only")
def test_calling_thread_runs_off_the_pinned_workers_and_gets_its_affinity_back():
    import os

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs")
    here = os.path.dirname(__file__)
    done = subprocess.run([sys.executable, "-c", PIN_PROBE], capture_output=True, text=True,
                          timeout=300, cwd=here, env={**os.environ, "PYTHONPATH": here})
    assert done.returncode == 0, done.stderr
    import json

    before, after, workers, caller = json.loads(done.stdout.strip().splitlines()[-1])
    assert after == before  # restored after each run
    if workers:  # TVM pinned its workers: the caller ran on the other CPUs
        assert caller and not set(caller) & set(workers) and set(caller) <= set(before)

