"""ONNX's own backend test suite (onnx.backend.test.BackendTest) run through
accelkit.onnx_backend on the cpu backend, plus the adapter's own behaviour.

Every test that is known to fail is listed, with its reason, in onnx_backend_expected_failures.py
and runs as a strict xfail: it must fail with the listed exception type, and one that starts to
pass fails the run until its entry is removed. Any other failure is a regression.

By default a deterministic subset runs (about 2 minutes on 2 cores): every node test of an op
the benchmark models use, the first node test of every other op and a fixed sample of the rest.
ACCELKIT_ONNX_SUITE=full runs all 1884 node tests and the nine light_* models (about 7 minutes;
the light_* ones are also marked slow, and tests/test_models.py already compiles those models by
default, with random weights and a stronger comparison)."""
from __future__ import annotations

import os
import re
import warnings
import zlib

import numpy as np
import onnx
import onnx.backend.test
import pytest
from onnx import TensorProto, helper

import accelkit
from accelkit import onnx_backend
from onnx_backend_expected_failures import BENCHMARK_OPS, EXCLUDED, EXPECTED_FAILURES

FULL = os.environ.get("ACCELKIT_ONNX_SUITE", "").lower() == "full"


def _load_suite():
    """{test name (without the device suffix): (kind, test function)} for the CPU tests of the
    node and real (light_*) categories, and {node test name: the op it tests}."""
    with warnings.catch_warnings():  # the node cases' generators overflow casts on purpose
        warnings.simplefilter("ignore")
        suite = onnx.backend.test.BackendTest(onnx_backend.AccelkitBackend, __name__)
        cases = onnx.backend.test.loader.load_model_tests(kind="node")
    tests = {}
    for kind, category in (("node", "OnnxBackendNodeModelTest"), ("real", "OnnxBackendRealModelTest")):
        cls = suite.test_cases[category]
        for attr in dir(cls):
            if attr.startswith("test_") and attr.endswith("_cpu"):
                tests[attr[:-len("_cpu")]] = (kind, getattr(cls, attr))
    by_name = {case.name: case for case in cases}
    CASES.update(by_name)
    ops = {}
    for case in cases:
        # an *_expanded test runs the function body of the op its base test runs
        base = by_name.get(re.sub(r"_expanded(_ver\d+)?$", "", case.name), case)
        node = base.model.graph.node[0]
        ops[case.name] = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
    return tests, ops


CASES = {}  # node test name -> onnx.backend.test TestCase (model + data sets)
TESTS, OPS = _load_suite()


SAMPLE_ONE_IN = 10  # the share of the other ops' node tests run by default (the full run: ~5 min)


def _default_subset() -> set[str]:
    """Every node test of a benchmark op, the first node test of every other op, and one in
    SAMPLE_ONE_IN of the rest, picked by a hash of the name (the same tests on every run)."""
    chosen = {name for name, op in OPS.items() if op in BENCHMARK_OPS}
    first = {}
    for name in sorted(OPS):
        first.setdefault(OPS[name], name)
    sample = {name for name in OPS if zlib.crc32(name.encode()) % SAMPLE_ONE_IN == 0}
    return chosen | set(first.values()) | sample


def _match(patterns, name):
    for entry in patterns:
        if re.fullmatch(entry[0], name):
            return entry
    return None


def _params():
    selected = set(TESTS) if FULL else _default_subset()
    params = []
    for name in sorted(selected):
        kind, _ = TESTS[name]
        marks = [pytest.mark.slow] if kind == "real" else []
        excluded = _match(EXCLUDED, name)
        expected = _match(EXPECTED_FAILURES, name)
        if excluded:
            marks.append(pytest.mark.skip(reason=f"excluded: {excluded[1]}"))
        elif expected:
            marks.append(pytest.mark.xfail(strict=True, raises=expected[2], reason=expected[1]))
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.fixture
def onnx_models_dir(tmp_path, monkeypatch):
    # the runner writes the light_* models' test data under $ONNX_MODELS (default ~/.onnx)
    monkeypatch.setenv("ONNX_MODELS", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("name", _params())
def test_onnx_backend_suite(name, onnx_models_dir):
    _, func = TESTS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        func(None)


def _constant_argument_variants() -> list[str]:
    """Node tests of benchmark ops expected to fail only because they feed a shape argument at run
    time (the form accelkit refuses): the same tests with those arguments as initializers."""
    names = []
    for name, op in OPS.items():
        entry = _match(EXPECTED_FAILURES, name)
        if op in BENCHMARK_OPS and entry and "given at run time" in entry[1]:
            names.append(name)
    return sorted(names)


@pytest.mark.parametrize("name", _constant_argument_variants())
def test_benchmark_op_node_test_with_constant_arguments(name):
    """The benchmark models' ops pass these node tests in the form accelkit compiles (shape
    arguments folded to constants), compared exactly as ONNX's runner compares."""
    from accelkit.frontend import _STATIC_INPUTS

    arguments = {**_STATIC_INPUTS, "Pad": (1, 2, 3)}  # + Pad's constant_value (TVM wants it constant too)
    case = CASES[name]
    model = onnx.ModelProto()
    model.CopyFrom(case.model)
    (inputs, expected), = case.data_sets
    feeds = dict(zip([i.name for i in model.graph.input], inputs))
    constant = {node.input[k] for node in model.graph.node
                for k in arguments.get(node.op_type, ()) if k < len(node.input) and node.input[k]}
    assert constant & set(feeds)
    model.graph.initializer.extend(onnx.numpy_helper.from_array(np.asarray(feeds[n]), n) for n in constant)
    kept = [vi for vi in model.graph.input if vi.name not in constant]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    rep = onnx_backend.prepare(model)
    outputs = rep.run([feeds[vi.name] for vi in kept])
    onnx.backend.test.runner.Runner.assert_similar_outputs(expected, outputs, rtol=case.rtol, atol=case.atol)


# --------------------------------------------------------------------------- the lists themselves

def test_every_list_entry_matches_a_test():
    """A stale pattern (renamed test, typo) would silently stop meaning anything."""
    stale = [entry[0] for entry in list(EXPECTED_FAILURES) + list(EXCLUDED)
             if not any(re.fullmatch(entry[0], name) for name in TESTS)]
    assert not stale


def test_benchmark_ops_are_never_excluded():
    """The requirement: every node test of an op the benchmark models use runs (and passes or
    fails only for a listed reason)."""
    assert not [name for name, op in OPS.items() if op in BENCHMARK_OPS and _match(EXCLUDED, name)]


# --------------------------------------------------------------------------- the adapter

def _relu_model(shape=(2, 3)):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_devices():
    assert onnx_backend.supports_device("CPU")
    assert not onnx_backend.supports_device("CUDA")
    assert not onnx_backend.supports_device("CUDA:1")
    assert not onnx_backend.supports_device("TPU")
    with pytest.raises(accelkit.BackendError, match="device 'CUDA'.*device='CPU'"):
        onnx_backend.prepare(_relu_model(), "CUDA")


def test_prepare_and_run_take_a_list_a_dict_or_one_array():
    x = np.array([[-1.0, 2.0, -3.0], [4.0, -5.0, 6.0]], np.float32)
    rep = onnx_backend.prepare(_relu_model())
    assert rep.compiled.cache_status == "off"  # conformance runs never fill the compile cache
    for inputs in ([x], (x,), x, {"x": x}):
        outputs = rep.run(inputs)
        assert isinstance(outputs, tuple) and len(outputs) == 1
        np.testing.assert_array_equal(outputs[0], np.maximum(x, 0))
    with pytest.raises(accelkit.FeedError, match="got 2 input.*takes 1: x: float32"):
        rep.run([x, x])
    np.testing.assert_array_equal(onnx_backend.run_model(_relu_model(), [x])[0], np.maximum(x, 0))


def test_another_accelkit_backend():
    reference = onnx_backend.backend_class("reference")
    rep = reference.prepare(_relu_model())
    assert rep.compiled.backend == "reference"
    assert onnx_backend.prepare(_relu_model(), backend="reference").compiled.backend == "reference"
    with pytest.raises(accelkit.BackendError, match="nope"):
        onnx_backend.backend_class("nope")


def test_run_node_types_outputs_by_inference_or_outputs_info():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.ones(3, np.float32)
    node = helper.make_node("Add", ["a", "b"], ["c"])
    (c,) = onnx_backend.run_node(node, [a, b])
    np.testing.assert_array_equal(c, a + b)
    (c,) = onnx_backend.run_node(node, {"a": a, "b": b}, outputs_info=[(np.float32, (2, 3))])
    np.testing.assert_array_equal(c, a + b)
    # an optional input left out by an empty name
    clip = helper.make_node("Clip", ["a", "", "hi"], ["y"])
    (y,) = onnx_backend.run_node(clip, [a, np.array(2.5, np.float32)])
    np.testing.assert_array_equal(y, np.minimum(a, 2.5))
    with pytest.raises(accelkit.FeedError, match="takes 2 input"):
        onnx_backend.run_node(node, [a])
