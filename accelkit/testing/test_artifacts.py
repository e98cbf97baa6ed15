"""Saved artifacts and the compile cache: an .akx saved here loads and runs in a fresh Python
process (which has only the installed backend and the file), `accelkit info` describes it, and
compiling the same model twice hits the cache, in this process and in a fresh one."""
from __future__ import annotations

import contextlib
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

import accelkit
from accelkit.artifact import read_manifest
from accelkit.testing import graphs
from accelkit.testing.support import assert_outputs_match, run_python

# One fresh process checks both the artifact and the cache (importing TVM takes seconds).
FRESH = """
    import json, sys, traceback
    import numpy as np
    import accelkit

    akx, feeds_path, out_path, onnx_path, backend = sys.argv[1:]
    result = {}
    try:
        model = accelkit.load(akx)
        with np.load(feeds_path) as feeds:
            np.savez(out_path, *model.run(dict(feeds)))
        result["backend"] = model.backend
        result["fingerprint"] = accelkit.get_backend(model.backend).fingerprint()
    except Exception:
        result["load_error"] = traceback.format_exc()
    try:
        result["cache_status"] = accelkit.compile(onnx_path, backend=backend).cache_status
    except Exception:
        result["compile_error"] = traceback.format_exc()
    print(json.dumps(result))
"""


@contextlib.contextmanager
def cache_at(path):
    """The compile cache at `path` inside the with-block (ACCELKIT_CACHE_DIR set, then restored)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACCELKIT_CACHE_DIR", str(path))
        yield


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="module")
def saved(mlp_compiled, work):
    return mlp_compiled.save(work / "mlp.akx")


@pytest.fixture(scope="module")
def cached(backend_name, work):
    """The MLP compiled twice from one file into an empty cache: (first, second)."""
    path = work / "mlp.onnx"
    onnx.save(graphs.mlp(), str(path))
    with cache_at(work / "cache"):
        first = accelkit.compile(str(path), backend=backend_name)
        second = accelkit.compile(str(path), backend=backend_name)
    return first, second


@pytest.fixture(scope="module")
def fresh(saved, cached, mlp_feeds, backend_name, work):
    """What a new Python process saw: loading the artifact, and compiling the cached model."""
    np.savez(work / "feeds.npz", **mlp_feeds)
    with cache_at(work / "cache"):
        out = run_python(FRESH, saved, work / "feeds.npz", work / "out.npz", work / "mlp.onnx",
                         backend_name, cwd=work)
    return json.loads(out.strip().splitlines()[-1])


def test_artifact_runs_in_a_fresh_process(fresh, mlp_compiled, mlp_feeds, backend, work):
    assert "load_error" not in fresh, (
        f"backend '{backend.name}': a saved artifact must load in a new process that has only the "
        f"installed backend (its `accelkit.backends` entry point) and the .akx file; load() must "
        f"not depend on state that compile() left in this process:\n{fresh['load_error']}")
    assert fresh["backend"] == backend.name
    assert fresh["fingerprint"] == backend.fingerprint(), \
        "fingerprint() differs between processes: the cache could never hit in a new process"
    with np.load(work / "out.npz") as loaded:
        actual = [loaded[f"arr_{k}"] for k in range(len(loaded.files))]
    assert_outputs_match([s.name for s in mlp_compiled.outputs], actual,
                         mlp_compiled.run(mlp_feeds),
                         "the artifact loaded in a fresh process (vs the compiled model)")


def test_manifest_names_the_backend(saved, backend):
    manifest = read_manifest(saved)
    assert manifest["backend"] == backend.name
    assert manifest["backend_fingerprint"] == backend.fingerprint()
    assert manifest["precision"] == "fp32"
    assert [i["name"] for i in manifest["inputs"]] == ["features"]
    assert [o["name"] for o in manifest["outputs"]] == ["probs"]


def test_artifact_loads_in_this_process(saved, mlp_compiled, mlp_feeds):
    loaded = accelkit.load(saved)
    assert loaded.backend == mlp_compiled.backend
    assert_outputs_match([s.name for s in loaded.outputs], loaded.run(mlp_feeds),
                         mlp_compiled.run(mlp_feeds), "the artifact loaded in this process")


def test_info_describes_the_artifact(saved, backend, work):
    proc = subprocess.run([sys.executable, "-m", "accelkit", "info", str(saved)], cwd=work,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"accelkit info failed:\n{proc.stdout}\n{proc.stderr}"
    assert backend.name in proc.stdout and "features" in proc.stdout, proc.stdout


def test_second_compile_is_a_cache_hit(cached, mlp_feeds):
    first, second = cached
    assert first.cache_status == "miss", f"first compile into an empty cache: {first.cache_status}"
    assert second.cache_status == "hit", \
        f"the same compile again gave cache_status {second.cache_status!r}, expected 'hit'"
    assert_outputs_match([s.name for s in second.outputs], second.run(mlp_feeds),
                         first.run(mlp_feeds), "the cache hit (vs the first compile)")


def test_cache_hits_in_a_fresh_process(fresh):
    assert "compile_error" not in fresh, fresh["compile_error"]
    assert fresh["cache_status"] == "hit", \
        f"compiling the cached model again in a new process gave {fresh['cache_status']!r}"
