"""The plugin story: a third-party backend package (tests/plugins/accelkit-acme), installed for
real through its `accelkit.backends` entry point, is listed, compiles a model (its pattern in its
kernel, the rest TVM host code), and its saved artifacts load in a fresh process. Plus the
registry's validation of what plugins register."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import mlp_model, relative_l2

import accelkit
from accelkit.backends import registry

PLUGIN_SRC = Path(__file__).parent / "plugins" / "accelkit-acme"


# --------------------------------------------------------------------------- installed plugin

@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    """accelkit-acme pip-installed into a private folder (never the venv's site-packages)."""
    root = tmp_path_factory.mktemp("acme")
    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources.
    src = shutil.copytree(PLUGIN_SRC, root / "src",
                          ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = root / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
         "--no-input", "--disable-pip-version-check", "--target", str(site), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"pip install accelkit-acme failed:\n{proc.stdout}\n{proc.stderr}"
    assert (site / "accelkit_acme" / "__init__.py").is_file()
    return site


def _env(site: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH")) if p)
    return env


def _run(args: list[str], site: Path | None, cwd: Path) -> subprocess.CompletedProcess:
    # cwd is a scratch folder, so nothing is importable from the repository by accident
    proc = subprocess.run(args, env=_env(site), cwd=cwd, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def _python(code: str, site: Path | None, cwd: Path, *args) -> str:
    command = [sys.executable, "-c", textwrap.dedent(code), *map(str, args)]
    return _run(command, site, cwd).stdout


def test_cli_lists_the_installed_plugin(plugin_site, tmp_path):
    commands = [[sys.executable, "-m", "accelkit"]]
    script = Path(sys.executable).parent / "accelkit"  # the console script, when installed
    if script.exists():
        commands.append([str(script)])
    for command in commands:
        with_plugin = _run(command + ["backends"], plugin_site, tmp_path).stdout
        without = _run(command + ["backends"], None, tmp_path).stdout
        assert "acme" in _listed(with_plugin) and "cpu" in _listed(with_plugin), with_plugin
        assert "acme" not in _listed(without) and "cpu" in _listed(without), without


def _listed(cli_output: str) -> list[str]:
    """Backend names from `accelkit backends` (one backend per line, name first)."""
    return [line.split()[0] for line in cli_output.splitlines() if line.strip()]


def test_list_backends_finds_the_installed_plugin(plugin_site, tmp_path):
    out = _python("import accelkit; print(accelkit.list_backends())", plugin_site, tmp_path)
    assert "'acme'" in out and "'cpu'" in out


COMPILE = """
    import json, sys
    import numpy as np
    import accelkit

    onnx_path, x_path, akx_path, out_dir = sys.argv[1:]
    feed = {"x": np.load(x_path)}
    model = accelkit.compile(onnx_path, backend="acme")
    np.save(out_dir + "/acme.npy", model.run(feed)[0])
    np.save(out_dir + "/reference.npy",
            accelkit.compile(onnx_path, backend="reference").run(feed)[0])
    model.save(akx_path)
    print(json.dumps({"backend": model.backend, "offloaded": model.manifest["offloaded"]}))
"""

LOAD = """
    import json, sys
    import numpy as np
    import accelkit

    akx_path, x_path, out_dir = sys.argv[1:]
    model = accelkit.load(akx_path)
    np.save(out_dir + "/loaded.npy", model.run({"x": np.load(x_path)})[0])
    print(json.dumps({"backend": model.backend, "offloaded": model.manifest["offloaded"]}))
"""


def test_plugin_compiles_offloads_one_pattern_and_reloads(plugin_site, tmp_path):
    onnx_path, x_path, akx_path = tmp_path / "mlp.onnx", tmp_path / "x.npy", tmp_path / "mlp.akx"
    # MatMul+Add+Relu (acme's pattern), then MatMul+Add+Softmax, which acme leaves to TVM
    onnx.save(mlp_model(batch=4, last="Softmax"), onnx_path)
    np.save(x_path, np.random.default_rng(1).standard_normal((4, 32)).astype(np.float32))

    compiled = json.loads(_python(COMPILE, plugin_site, tmp_path,
                                  onnx_path, x_path, akx_path, tmp_path).splitlines()[-1])
    assert compiled == {"backend": "acme", "offloaded": {"acme.dense_bias_relu": 1}}
    y, expected = np.load(tmp_path / "acme.npy"), np.load(tmp_path / "reference.npy")
    assert y.shape == expected.shape == (4, 16) and y.dtype == np.float32
    assert relative_l2(y, expected) < 1e-5
    assert akx_path.is_file()

    # a fresh process: only the installed entry point and the .akx, nothing compiled in memory
    loaded = json.loads(_python(LOAD, plugin_site, tmp_path,
                                akx_path, x_path, tmp_path).splitlines()[-1])
    assert loaded == compiled
    np.testing.assert_array_equal(np.load(tmp_path / "loaded.npy"), y)


def test_without_the_plugin_acme_is_unknown_and_the_error_lists_backends(tmp_path):
    _python("""
    import importlib.util
    import accelkit

    assert importlib.util.find_spec("accelkit_acme") is None, "accelkit_acme is installed globally"
    assert "acme" not in accelkit.list_backends()
    try:
        accelkit.get_backend("acme")
    except accelkit.BackendError as exc:
        message = str(exc)
    else:
        raise AssertionError("get_backend('acme') did not raise")
    assert "'acme'" in message and "cpu" in message and "reference" in message, message
    """, None, tmp_path)


def test_acme_kernel_rejects_bad_shapes_and_dtypes(monkeypatch):
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # no __pycache__ in the source tree
    spec = importlib.util.spec_from_file_location(  # the module only, not an installed plugin
        "acme_under_test", PLUGIN_SRC / "accelkit_acme" / "__init__.py")
    acme = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(acme)
    import tvm

    def t(shape, dtype="float32"):
        return tvm.runtime.tensor(np.ones(shape, dtype))

    out = t((2, 4))
    acme.dense_bias_relu(t((2, 3)), t((3, 4)), t((4,)), out)
    np.testing.assert_array_equal(out.numpy(), np.full((2, 4), 4, np.float32))
    with pytest.raises(ValueError, match=r"acme\.dense_bias_relu: expected x\[M,K\].*w\[5, 4\]"):
        acme.dense_bias_relu(t((2, 3)), t((5, 4)), t((4,)), t((2, 4)))
    with pytest.raises(ValueError, match=r"out\[2, 5\]"):
        acme.dense_bias_relu(t((2, 3)), t((3, 4)), t((4,)), t((2, 5)))
    with pytest.raises(TypeError, match=r"float32 only.*float64"):
        acme.dense_bias_relu(t((2, 3), "float64"), t((3, 4)), t((4,)), t((2, 4)))


# --------------------------------------------------------------------------- registry (in-process)

@pytest.fixture
def clean_registry(monkeypatch):
    """The registry's state, as fresh copies that are thrown away after the test."""
    for attr in ("_classes", "_lazy", "_instances"):
        monkeypatch.setattr(registry, attr, dict(getattr(registry, attr)))
    monkeypatch.setattr(registry, "_discovered", registry._discovered)
    return registry


def _backend_class(name="dummy", base=accelkit.Backend, **attrs):
    def compile(self, graph, options, out_dir):
        return {}

    def load(self, directory, manifest):
        return None

    body = {"compile": compile, "load": load, **attrs}
    if name is not None:
        body["name"] = name
    return type(f"Backend_{name}", (base,), body)


@pytest.mark.parametrize("thing", [object, int, "dummy", _backend_class()()])
def test_register_rejects_what_is_not_a_backend_class(clean_registry, thing):
    with pytest.raises(accelkit.BackendError, match="expects a subclass of accelkit.Backend"):
        accelkit.register_backend(thing)


@pytest.mark.parametrize("name", [None, "", "Acme", "1acme", "acme-npu", "acme.npu", 3])
def test_register_rejects_a_missing_or_invalid_name(clean_registry, name):
    with pytest.raises(accelkit.BackendError, match=r"needs a `name` class attribute"):
        accelkit.register_backend(_backend_class(name))


def test_register_rejects_an_abstract_class_naming_the_missing_methods(clean_registry):
    bare = type("Bare", (accelkit.Backend,), {"name": "bare"})
    with pytest.raises(accelkit.BackendError, match=r"'bare' .*does not implement: compile, load"):
        accelkit.register_backend(bare)
    no_target = type("NoTarget", (accelkit.TVMBackend,), {"name": "no_target"})
    with pytest.raises(accelkit.BackendError, match=r"does not implement: target"):
        accelkit.register_backend(no_target)
    assert "bare" not in accelkit.list_backends() and "no_target" not in accelkit.list_backends()


def test_register_refuses_a_duplicate_name_unless_override(clean_registry):
    first, second = _backend_class("dup_test"), _backend_class("dup_test")
    assert accelkit.register_backend(first) is first
    assert accelkit.register_backend(first) is first  # the same class again is harmless
    assert isinstance(accelkit.get_backend("dup_test"), first)
    with pytest.raises(accelkit.BackendError, match=r"'dup_test' is already registered.*override"):
        accelkit.register_backend(second)
    assert isinstance(accelkit.get_backend("dup_test"), first)
    accelkit.register_backend(second, override=True)
    assert isinstance(accelkit.get_backend("dup_test"), second)  # no stale instance


def test_register_refuses_to_replace_a_not_yet_loaded_builtin(clean_registry, monkeypatch):
    # a fresh process: nothing discovered or loaded yet, whatever earlier tests looked up
    for attr in ("_classes", "_lazy", "_instances"):
        monkeypatch.setattr(registry, attr, {})
    monkeypatch.setattr(registry, "_discovered", False)
    with pytest.raises(accelkit.BackendError, match="already registered"):
        accelkit.register_backend(_backend_class("reference"))


def test_unknown_backend_lists_the_valid_ones(clean_registry):
    with pytest.raises(accelkit.BackendError) as info:
        accelkit.get_backend("no_such_backend")
    message = str(info.value)
    assert "unknown backend 'no_such_backend'" in message
    for name in accelkit.list_backends():
        assert name in message
    with pytest.raises(accelkit.BackendError, match="must be a name"):
        accelkit.get_backend(None)


@pytest.fixture
def fake_entry_points(clean_registry, monkeypatch):
    """Make discovery see the given entry points instead of the installed ones."""
    def install(*specs: tuple[str, str]):
        eps = [importlib.metadata.EntryPoint(name, value, registry.ENTRY_POINT_GROUP)
               for name, value in specs]
        monkeypatch.setattr(importlib.metadata, "entry_points",
                            lambda group=None: eps if group == registry.ENTRY_POINT_GROUP else [])
        monkeypatch.setattr(registry, "_classes", {})
        monkeypatch.setattr(registry, "_lazy", {})
        monkeypatch.setattr(registry, "_instances", {})
        monkeypatch.setattr(registry, "_discovered", False)
    return install


def test_broken_entry_point_is_listed_and_its_lookup_names_it(fake_entry_points):
    fake_entry_points(("broken", "accelkit_no_such_module:Backend"))
    assert "broken" in accelkit.list_backends()  # recorded without importing it
    with pytest.raises(accelkit.BackendError) as info:
        accelkit.get_backend("broken")
    message = str(info.value)
    assert "backend 'broken'" in message and "accelkit_no_such_module:Backend" in message
    assert "ModuleNotFoundError" in message and "Reinstall" in message
    assert accelkit.get_backend("reference").name == "reference"  # the others still work


def test_entry_point_name_must_match_the_backend_name(fake_entry_points):
    fake_entry_points(("other", "accelkit.backends.reference:ReferenceBackend"))
    with pytest.raises(accelkit.BackendError, match=r"entry point 'other'.*must match"):
        accelkit.get_backend("other")


def test_an_entry_point_cannot_shadow_a_builtin(fake_entry_points):
    fake_entry_points(("reference", "accelkit_no_such_module:Backend"))
    assert type(accelkit.get_backend("reference")).__module__ == "accelkit.backends.reference"
