"""The vendor conformance kit (accelkit.testing), run as a vendor runs it: the real
`pytest --pyargs accelkit.testing --accelkit-backend NAME` in a new process, from a scratch
folder. The installed example plugin acme and the built-in cpu backend pass all of it; a
deliberately broken backend fails exactly the checks its defects break."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from accelkit.testing.graphs import CASES

PLUGIN_SRC = Path(__file__).parent / "plugins" / "accelkit-acme"
CORRECTNESS = {f"test_correctness.test_matches_the_reference[{case.name}]" for case in CASES}

# A backend with one defect per kit section, installed through a real entry point.
BROKEN = '''
import hashlib, os, time
import numpy as np
from accelkit import UnsupportedModelError
from accelkit.backends.reference import ReferenceBackend

_COMPILED_HERE = set()  # defect 4: what load() needs lives only in the compiling process


class BrokenBackend(ReferenceBackend):
    name = "kit_broken"
    description = "a backend with deliberate defects (accelkit's kit test)"
    precisions = ("fp32", "fp8")  # defect 7: fp8 is no accelkit precision

    def fingerprint(self):  # defect 3: changes on every call
        return f"kit_broken;{time.time_ns()}"

    def compile(self, graph, options, out_dir):
        ops = {(n.domain, n.op_type) for n in graph.proto.graph.node}
        if any(domain not in ("", "ai.onnx") for domain, _ in ops):
            raise RuntimeError("cannot compile this model")  # defect 6: the op is not named
        if ("", "LayerNormalization") in ops:  # declared unsupported: the kit skips, not fails
            raise UnsupportedModelError("kit_broken does not support LayerNormalization")
        entries = super().compile(graph, options, out_dir)
        _COMPILED_HERE.add(_digest(os.path.join(out_dir, entries["model_file"])))
        return entries

    def load(self, directory, manifest):
        if _digest(os.path.join(directory, manifest["model_file"])) not in _COMPILED_HERE:
            raise RuntimeError("this model was not compiled in this process")
        return _WrongRunner(super().load(directory, manifest))


class _WrongRunner:
    def __init__(self, inner):
        self._inner, self._buffers = inner, None

    def run(self, inputs):
        outputs = [o * np.float32(1.001) if o.dtype.kind == "f" else o  # defect 1: 0.1% off
                   for o in self._inner.run(inputs)]
        if self._buffers is None:  # defect 5: every run returns the same (reused) arrays
            self._buffers = [np.empty_like(o) for o in outputs]
        for buffer, o in zip(self._buffers, outputs):
            np.copyto(buffer, o)
        return self._buffers


def _digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()
'''


@pytest.fixture(scope="module")
def acme_site(tmp_path_factory) -> Path:
    """accelkit-acme pip-installed into a private folder, as in test_plugin.py."""
    root = tmp_path_factory.mktemp("acme")
    src = shutil.copytree(PLUGIN_SRC, root / "src",
                          ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
         "--no-input", "--disable-pip-version-check", "--target", str(root / "site"), str(src)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"pip install accelkit-acme failed:\n{proc.stdout}\n{proc.stderr}"
    return root / "site"


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory) -> Path:
    """The broken backend as an installed distribution: a module plus its dist-info, whose
    entry_points.txt is all importlib.metadata needs to find it."""
    site = tmp_path_factory.mktemp("broken")
    (site / "accelkit_kit_broken.py").write_text(textwrap.dedent(BROKEN))
    info = site / "accelkit_kit_broken-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: accelkit-kit-broken\n"
                                   "Version: 0.1.0\n")
    (info / "entry_points.txt").write_text(
        "[accelkit.backends]\nkit_broken = accelkit_kit_broken:BrokenBackend\n")
    return site


def run_kit(backend: str, site: Path | None, cwd: Path, *extra: str):
    """The vendor command in a new process; (process, {test id: (outcome, message)})."""
    pytest_script = Path(sys.executable).parent / "pytest"
    command = [str(pytest_script)] if pytest_script.exists() else [sys.executable, "-m", "pytest"]
    report = cwd / "kit.xml"
    command += ["--pyargs", "accelkit.testing", "--accelkit-backend", backend,
                "-p", "no:cacheprovider", f"--junitxml={report}", *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS", "PYTEST_PLUGINS")}
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    results = {}
    if report.exists():
        for case in ET.parse(report).iter("testcase"):
            test_id = f"{case.get('classname').rsplit('.', 1)[-1]}.{case.get('name')}"
            outcome, message = "passed", ""
            for tag in ("failure", "error", "skipped"):
                found = case.find(tag)
                if found is not None:
                    outcome, message = tag, found.get("message", "")
            results[test_id] = (outcome, message)
    return proc, results


def outcomes(results, wanted):
    return {test_id for test_id, (outcome, _) in results.items() if outcome == wanted}


@pytest.mark.parametrize("backend", ["cpu", "acme"])
def test_the_kit_passes_on_the_cpu_and_example_backends(backend, acme_site, tmp_path):
    proc, results = run_kit(backend, acme_site if backend == "acme" else None, tmp_path)
    output = f"{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, output
    assert f"accelkit conformance kit: backend '{backend}'" in proc.stdout, output
    assert len(results) >= 45, output  # every section collected
    assert outcomes(results, "passed") == set(results), output  # nothing skipped or failed
    assert CORRECTNESS <= set(results)
    assert {t.split(".")[0] for t in results} == {
        "test_correctness", "test_artifacts", "test_bad_input", "test_contract"}


def test_the_kit_catches_each_defect_of_a_broken_backend(broken_site, tmp_path):
    proc, results = run_kit("kit_broken", broken_site, tmp_path)
    output = f"{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 1, output  # tests failed (not a usage error or a crash)
    failed, skipped = outcomes(results, "failure"), outcomes(results, "skipped")
    assert not outcomes(results, "error"), output
    message = {test_id: text for test_id, (_, text) in results.items()}
    layer_norm = "test_correctness.test_matches_the_reference[layer_norm]"
    assert skipped == {layer_norm}, output  # what the backend declares unsupported
    assert "declares this model unsupported" in message[layer_norm]
    assert "LayerNormalization" in message[layer_norm]
    expected = (CORRECTNESS - {layer_norm}) | {  # defect 1: wrong results
        "test_contract.test_fingerprint_is_a_stable_string",  # 3
        "test_artifacts.test_manifest_names_the_backend",  # 3
        "test_artifacts.test_second_compile_is_a_cache_hit",  # 3
        "test_artifacts.test_cache_hits_in_a_fresh_process",  # 3
        "test_artifacts.test_artifact_runs_in_a_fresh_process",  # 4
        "test_correctness.test_outputs_survive_the_next_run",  # 5
        "test_bad_input.test_unsupported_op_is_named",  # 6
        "test_contract.test_precisions_include_fp32",  # 7
    }
    assert failed == expected, (f"unexpected failures {sorted(failed - expected)}, "
                                f"missing failures {sorted(expected - failed)}\n{output}")
    assert outcomes(results, "passed") == set(results) - failed - skipped
    # the failures say what is wrong
    assert "does not match the reference backend" in message[
        "test_correctness.test_matches_the_reference[mlp]"]
    assert "changes between calls" in message["test_contract.test_fingerprint_is_a_stable_string"]
    assert "must name it (FooBar)" in message["test_bad_input.test_unsupported_op_is_named"]
    assert "not compiled in this process" in proc.stdout


def test_python_m_wrapper_and_usage_errors(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTEST_ADDOPTS", "ACCELKIT_TEST_BACKEND")}

    def run(*args):
        return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=120)

    collected = run("-m", "accelkit.testing", "cpu", "--collect-only", "-q",
                    "-p", "no:cacheprovider")
    assert collected.returncode == 0, collected.stdout + collected.stderr
    assert "test_correctness.py::" in collected.stdout, collected.stdout
    no_backend = run("-m", "pytest", "--pyargs", "accelkit.testing", "-p", "no:cacheprovider")
    assert no_backend.returncode == 4, no_backend.stdout + no_backend.stderr
    assert "--accelkit-backend NAME" in no_backend.stderr and "cpu" in no_backend.stderr
    unknown = run("-m", "pytest", "--pyargs", "accelkit.testing", "--accelkit-backend", "tpu9",
                  "-p", "no:cacheprovider")
    assert unknown.returncode == 4 and "unknown backend 'tpu9'" in unknown.stderr, unknown.stderr
