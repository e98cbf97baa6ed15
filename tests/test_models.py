"""End to end on the 9 light_* models shipped in onnx's backend test data: compile for the cpu
backend (untuned TVM + accelkit kernels) and match onnxruntime.

The shipped models fill every weight with ConstantOfShape, so their outputs are a uniform
softmax (0.001 everywhere) that any wrong convolution would still reproduce. The test gives each
weight deterministic random values of the same shape and also compares the logits before the
final Softmax, so a numerical error cannot hide."""
import glob
import os

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import accelkit
from conftest import random_feeds, relative_l2

LIGHT_DIR = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
LIGHT = sorted(glob.glob(os.path.join(LIGHT_DIR, "light_*.onnx")))


def reweighted(proto, seed=0):
    """Replace ConstantOfShape-filled weights by random ones; expose the pre-Softmax logits."""
    rng = np.random.default_rng(seed)
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    model.ir_version = max(model.ir_version, 4)  # IR 3 wants every initializer listed as an input
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    keep = []
    for node in graph.node:
        if node.op_type == "ConstantOfShape" and node.input[0] in inits:
            shape = [int(d) for d in numpy_helper.to_array(inits[node.input[0]])]
            if len(shape) >= 2:  # conv / dense weight: He initialisation keeps activations sane
                values = rng.standard_normal(shape) * np.sqrt(2.0 / max(np.prod(shape[1:]), 1))
            else:  # biases, batch-norm scale/shift/mean/variance: positive, near 1
                values = rng.uniform(0.5, 1.5, shape)
            graph.initializer.append(numpy_helper.from_array(values.astype("float32"), node.output[0]))
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    softmax = [n for n in graph.node if n.op_type == "Softmax"]
    if softmax:
        # Softmax keeps the shape: the logits take the type of the probabilities it outputs
        probs = [v for v in graph.output if v.name == softmax[-1].output[0]]
        if probs:
            logits = onnx.ValueInfoProto()
            logits.CopyFrom(probs[0])
            logits.name = softmax[-1].input[0]
            graph.output.append(logits)
    return model


def test_all_nine_light_models_are_present():
    assert len(LIGHT) == 9, LIGHT


@pytest.mark.slow
@pytest.mark.parametrize("path", LIGHT, ids=lambda p: os.path.basename(p)[6:-5])
def test_light_model_matches_onnxruntime(path):
    ort = pytest.importorskip("onnxruntime")
    proto = reweighted(onnx.load(path))
    model = accelkit.compile(proto)
    feeds = random_feeds(model)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    expected = ort.InferenceSession(proto.SerializeToString(), options,
                                    providers=["CPUExecutionProvider"]).run(None, feeds)
    outputs = model.run(feeds)
    assert len(outputs) == len(expected) == len(model.outputs)
    for spec, got, want in zip(model.outputs, outputs, expected):
        assert got.shape == want.shape, spec
        assert relative_l2(got, want) < 1e-4, spec.name
    assert np.std(expected[-1]) > 1e-3  # the comparison is not against a constant
