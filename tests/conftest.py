"""Shared test helpers: small ONNX graphs built with onnx.helper, and comparison helpers."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from accelkit.demo import relative_l2  # noqa: F401  (re-exported for the tests)


def make_model(nodes, inputs, outputs, initializers=(), opset=17, name="test", domains=()):
    graph = helper.make_graph(nodes, name, inputs, outputs, list(initializers))
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def ffn_model():
    """A transformer feed-forward block as torch exports it on a 3-D input: MatMul + bias, erf
    GELU (x * 0.5 * (1 + erf(x / sqrt(2)))), MatMul + bias, residual add; x [2, 7, 48]."""
    import math

    rng = np.random.default_rng(2)

    def const(name, array):
        return numpy_helper.from_array(np.asarray(array, np.float32), name)

    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["m1"]), helper.make_node("Add", ["b1", "m1"], ["h"]),
        helper.make_node("Div", ["h", "sqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["e1"]), helper.make_node("Mul", ["h", "e1"], ["he"]),
        helper.make_node("Mul", ["he", "half"], ["gelu"]),
        helper.make_node("MatMul", ["gelu", "W2"], ["m2"]), helper.make_node("Add", ["m2", "b2"], ["o"]),
        helper.make_node("Add", ["o", "x"], ["y"]),
    ]
    inits = [const("W1", rng.standard_normal((48, 96)) / 7), const("b1", rng.standard_normal(96)),
             const("W2", rng.standard_normal((96, 48)) / 10), const("b2", rng.standard_normal(48)),
             const("sqrt2", math.sqrt(2)), const("one", 1.0), const("half", 0.5)]
    F = TensorProto.FLOAT
    return make_model(nodes, [helper.make_tensor_value_info("x", F, [2, 7, 48])],
                      [helper.make_tensor_value_info("y", F, [2, 7, 48])], inits)


def mlp_model(batch=8, dims=(32, 64, 16), seed=0, last="Softmax"):
    """MatMul+Add+Relu, then MatMul+Add (bias first) and a `last` op TVM generates."""
    rng = np.random.default_rng(seed)
    d0, d1, d2 = dims
    inits = [
        numpy_helper.from_array((rng.standard_normal((d0, d1)) * 0.2).astype("float32"), "W1"),
        numpy_helper.from_array(rng.standard_normal(d1).astype("float32"), "b1"),
        numpy_helper.from_array((rng.standard_normal((d1, d2)) * 0.2).astype("float32"), "W2"),
        numpy_helper.from_array(rng.standard_normal(d2).astype("float32"), "b2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["m1"], name="fc1"),
        helper.make_node("Add", ["m1", "b1"], ["a1"], name="fc1_bias"),
        helper.make_node("Relu", ["a1"], ["h1"], name="fc1_relu"),
        helper.make_node("MatMul", ["h1", "W2"], ["m2"], name="fc2"),
        helper.make_node("Add", ["b2", "m2"], ["a2"], name="fc2_bias"),
        helper.make_node(last, ["a2"], ["y"], name="head"),
    ]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, d0])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, d2])], inits,
                      name="mlp")


def conv_model(seed=1):
    """Conv+Relu+GlobalAveragePool+Flatten+Gemm, plus a second output (two outputs, in order)."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.3).astype("float32"), "Wc"),
        numpy_helper.from_array(rng.standard_normal(8).astype("float32"), "bc"),
        numpy_helper.from_array((rng.standard_normal((4, 8)) * 0.3).astype("float32"), "Wg"),
        numpy_helper.from_array(rng.standard_normal(4).astype("float32"), "bg"),
    ]
    nodes = [
        helper.make_node("Conv", ["img", "Wc", "bc"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "Wg", "bg"], ["logits"], transB=1),
        helper.make_node("ReduceMax", ["r"], ["peak"], keepdims=0),
    ]
    return make_model(
        nodes, [helper.make_tensor_value_info("img", TensorProto.FLOAT, [2, 3, 12, 12])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 4]),
         helper.make_tensor_value_info("peak", TensorProto.FLOAT, [])], inits, name="conv")


def mha_model(b=2, s=12, heads=3, d=8, scale_op="Div", mask_shape=(2, 1, 1, 12), k_perms=((0, 2, 3, 1),),
              merge=True, v_perm=(0, 2, 1, 3), softmax_axis=-1, noops=False, where=None,
              fill=float(np.finfo(np.float32).min)):
    """Multi-head self-attention as torch exports a transformer layer: projections reshaped to
    [B, S, H, D], the heads transposed out, scores scaled and masked, softmax, the context
    transposed back and merged, then the output projection. scale_op "Operands" is torch's
    scaled_dot_product_attention export (transformers 5): q and k^T each times sqrt(scale), and
    the context reshaped to its own shape before the merge. v_perm and softmax_axis make
    variants that are not attention (with s == d they still type-check). noops adds GPT-2's
    no-ops: a one-tensor Concat after each head transpose of K and V (the empty key/value
    cache) and a Cast to float after the softmax. where "const" applies a causal mask as
    transformers 4's eager GPT-2 does, Where(tril, scores, fill) before the mask's Add; where
    "input" takes that condition as a bool input "cond" [1, 1, s, s]."""
    F = TensorProto.FLOAT

    def const(name, array):
        return numpy_helper.from_array(np.asarray(array, np.float32), name)

    import math

    rng = np.random.default_rng(21)
    e = heads * d
    scale = {"Div": math.sqrt(d), "Mul": 1 / math.sqrt(d), "Operands": d ** -0.25}[scale_op]
    nodes, inits = [], [const("scale", scale),
                        numpy_helper.from_array(np.array([b, s, heads, d], np.int64), "split"),
                        numpy_helper.from_array(np.array([b, heads, s, d], np.int64), "ctx_shape"),
                        numpy_helper.from_array(np.array([b, s, e], np.int64), "merged")]
    for name in "qkv":
        inits += [const(f"W{name}", rng.standard_normal((e, e)) * 0.3), const(f"b{name}", rng.standard_normal(e))]
        nodes += [helper.make_node("MatMul", ["x", f"W{name}"], [f"{name}m"]),
                  helper.make_node("Add", [f"{name}m", f"b{name}"], [f"{name}p"]),
                  helper.make_node("Reshape", [f"{name}p", "split"], [f"{name}s"])]
    nodes += [helper.make_node("Transpose", ["qs"], ["q4"], perm=[0, 2, 1, 3]),
              helper.make_node("Transpose", ["vs"], ["v4"], perm=list(v_perm))]
    if noops:
        nodes.append(helper.make_node("Concat", ["v4"], ["v4c"], axis=-2))
    src = "ks"
    for i, perm in enumerate(k_perms):
        nodes.append(helper.make_node("Transpose", [src], [f"kt{i}"], perm=list(perm)))
        src = f"kt{i}"
        if noops and i == 0:
            nodes.append(helper.make_node("Concat", [src], ["kc"], axis=-2))
            src = "kc"
    if scale_op == "Operands":
        nodes += [helper.make_node("Mul", ["q4", "scale"], ["q4s"]), helper.make_node("Mul", ["scale", src], ["kts"]),
                  helper.make_node("MatMul", ["q4s", "kts"], ["sc"])]
    else:
        nodes += [helper.make_node("MatMul", ["q4", src], ["qk"]), helper.make_node(scale_op, ["qk", "scale"], ["sc"])]
    inputs = [helper.make_tensor_value_info("x", F, [b, s, e])]
    scores = "sc"
    if where is not None:
        inits.append(const("fill", fill))
        if where == "const":
            inits.append(numpy_helper.from_array(np.tril(np.ones((s, s), bool))[None, None], "cond"))
        else:
            inputs.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, [1, 1, s, s]))
        nodes.append(helper.make_node("Where", ["cond", "sc", "fill"], ["sw"]))
        scores = "sw"
    if mask_shape is not None:
        inputs.append(helper.make_tensor_value_info("mask", F, list(mask_shape)))
        nodes.append(helper.make_node("Add", [scores, "mask"], ["sm"]))
        scores = "sm"
    nodes += [helper.make_node("Softmax", [scores], ["p0"], axis=softmax_axis),
              helper.make_node("Cast", ["p0"], ["p"], to=TensorProto.FLOAT) if noops
              else helper.make_node("Identity", ["p0"], ["p"]),
              helper.make_node("MatMul", ["p", "v4c" if noops else "v4"], ["ctx0"]),
              helper.make_node("Reshape", ["ctx0", "ctx_shape"], ["ctx"]) if scale_op == "Operands"
              else helper.make_node("Identity", ["ctx0"], ["ctx"])]
    if merge:
        inits.append(const("Wo", rng.standard_normal((e, e)) * 0.3))
        nodes += [helper.make_node("Transpose", ["ctx"], ["ctxt"], perm=[0, 2, 1, 3]),
                  helper.make_node("Reshape", ["ctxt", "merged"], ["ctxm"]),
                  helper.make_node("MatMul", ["ctxm", "Wo"], ["y"])]
        out = helper.make_tensor_value_info("y", F, [b, s, e])
    else:
        out = helper.make_tensor_value_info("ctx", F, [b, heads, s, d])
    return make_model(nodes, inputs, [out], inits)


def random_feeds(model, seed=0):
    rng = np.random.default_rng(seed)
    return {s.name: rng.standard_normal(s.shape).astype(s.dtype) for s in model.inputs}


@pytest.fixture(scope="session", autouse=True)
def private_cache_dir(tmp_path_factory):
    """Tests (and the subprocesses they start) never touch the user's compile cache."""
    path = str(tmp_path_factory.mktemp("accelkit-cache"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACCELKIT_CACHE_DIR", path)
        yield path


@pytest.fixture(scope="session")
def mlp_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "mlp.onnx"
    onnx.save(mlp_model(), str(path))
    return str(path)


@pytest.fixture(scope="session")
def mlp_compiled(mlp_path):
    import accelkit

    return accelkit.compile(mlp_path)


@pytest.fixture(scope="session")
def mlp_akx(mlp_compiled, tmp_path_factory):
    return mlp_compiled.save(str(tmp_path_factory.mktemp("artifacts") / "mlp.akx"))
