"""compile(sparsity=): magnitude pruning per layer, with the accuracy change against the
unpruned model measured and the speed claim honest (no sparse kernel)."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import accelkit
from accelkit.pruning import SPEED_NOTE, prune
from conftest import make_model


def _mlp():
    rng = np.random.default_rng(0)
    F = TensorProto.FLOAT
    nodes = [helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["y"])]
    inits = [numpy_helper.from_array((rng.standard_normal((48, 32)) / 6).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.standard_normal(48).astype(np.float32), "b1"),
             numpy_helper.from_array((rng.standard_normal((48, 10)) / 7).astype(np.float32), "W2")]
    return make_model(nodes, [helper.make_tensor_value_info("x", F, [4, 32])],
                      [helper.make_tensor_value_info("y", F, [4, 10])], inits)


def test_prune_zeroes_the_smallest_half_of_each_weight_and_leaves_biases():
    proto = _mlp()
    pruned, stats = prune(proto, 0.5)
    before = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    for name in ("W1", "W2"):
        w, p = before[name], after[name]
        assert (p == 0).sum() == w.size // 2
        kept = np.abs(w[p != 0])
        assert kept.min() >= np.abs(w[p == 0]).max()  # the smallest magnitudes went
        np.testing.assert_array_equal(p[p != 0], w[p != 0])
    np.testing.assert_array_equal(after["b1"], before["b1"])  # a bias is not a weight
    assert stats["layers"] == 2 and stats["zeroed_fraction"] == 0.5
    assert numpy_helper.to_array(proto.graph.initializer[0]).all()  # the input model is untouched


def test_sparsity_reports_the_accuracy_change_and_no_speed_gain():
    proto = _mlp()
    model = accelkit.compile(proto, cache=False, sparsity=0.5)
    report = model.manifest["pruning"]
    assert report["sparsity"] == 0.5 and report["zeroed_fraction"] == 0.5 and report["speed"] == SPEED_NOTE
    a = report["accuracy"]
    assert a["reference"] == "the unpruned model (fp32)" and 0.5 < a["min_cosine"] < 0.9999
    x = {"x": np.random.default_rng(1).standard_normal((4, 32)).astype(np.float32)}
    pruned, _ = prune(proto, 0.5)
    ort = pytest.importorskip("onnxruntime")
    want = ort.InferenceSession(pruned.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    np.testing.assert_allclose(model.run(x)[0], want, rtol=1e-4, atol=1e-5)
    # with int8 too: pruned int8 measured against unpruned int8
    q = accelkit.compile(proto, cache=False, sparsity=0.5, precision="int8")
    assert q.manifest["pruning"]["accuracy"]["reference"] == "the unpruned model (int8)"


@pytest.mark.parametrize("sparsity", [1.0, -0.1, "half", True])
def test_bad_sparsity_is_refused(sparsity):
    with pytest.raises(accelkit.OptionError, match=r"sparsity must be .* in \[0, 1\)"):
        accelkit.compile(_mlp(), cache=False, sparsity=sparsity)
