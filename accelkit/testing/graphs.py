"""The conformance kit's graphs: small ONNX models built in code (one per op family), plus the
bundled digits CNN with its real data. Each is a `Case`: the model, the feeds, what it covers."""
from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples")


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    covers: str  # the ops and features it exercises, for the reader of a failure
    build: Callable[[], Any]  # -> onnx.ModelProto (or a path)
    feeds: Callable[[], dict[str, np.ndarray]]
    input_shapes: dict[str, list[int]] | None = None  # for models with symbolic dims


# --------------------------------------------------------------------------- building blocks

def make_model(nodes, inputs, outputs, initializers=(), name="kit", domains=()):
    """A checked opset-17 model; `inputs`/`outputs` are (name, TensorProto type, shape)."""
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in dict(initializers).items()])
    opsets = [helper.make_opsetid("", OPSET)] + [helper.make_opsetid(d, 1) for d in domains]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="accelkit.testing")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def node(op, ins, outs, **attrs):
    return helper.make_node(op, list(ins), list(outs), name=f"{op.lower()}_{outs[0]}", **attrs)


def _rng(seed):
    return np.random.default_rng(seed)


def _normal(seed, *shape, scale=1.0):
    return (_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def _float_feeds(seed, **shapes):
    return lambda: {name: _normal(seed + k, *shape)
                    for k, (name, shape) in enumerate(shapes.items())}


F, I64, BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL


# --------------------------------------------------------------------------- the cases

def conv_bias_relu():
    return make_model(
        [node("Conv", ["x", "W", "b"], ["c"], pads=[1, 1, 1, 1]), node("Relu", ["c"], ["y"])],
        [("x", F, [2, 3, 10, 10])], [("y", F, [2, 8, 10, 10])],
        {"W": _normal(1, 8, 3, 3, 3, scale=0.3), "b": _normal(2, 8)})


def conv_stride_pad():
    """Stride 2 with asymmetric pads and no bias, a dilated conv, then a 1x1 conv with bias."""
    return make_model(
        [node("Conv", ["x", "W1"], ["c1"], strides=[2, 2], pads=[1, 0, 2, 1]),
         node("Conv", ["c1", "W2"], ["c2"], dilations=[2, 2], pads=[2, 2, 2, 2]),
         node("Conv", ["c2", "W3", "b3"], ["y"])],
        [("x", F, [2, 4, 11, 11])], [("y", F, [2, 5, 6, 5])],
        {"W1": _normal(3, 6, 4, 3, 3, scale=0.3), "W2": _normal(4, 6, 6, 3, 3, scale=0.2),
         "W3": _normal(5, 5, 6, 1, 1, scale=0.3), "b3": _normal(6, 5)})


def conv_groups():
    """A grouped conv (2 groups) + bias + Relu, then a depthwise conv + bias + Clip(0, 6)."""
    return make_model(
        [node("Conv", ["x", "Wg", "bg"], ["g"], group=2, pads=[1, 1, 1, 1]),
         node("Relu", ["g"], ["r"]),
         node("Conv", ["r", "Wd", "bd"], ["d"], group=8, pads=[1, 1, 1, 1], strides=[2, 2]),
         node("Clip", ["d", "lo", "hi"], ["y"])],
        [("x", F, [2, 8, 9, 9])], [("y", F, [2, 8, 5, 5])],
        {"Wg": _normal(7, 8, 4, 3, 3, scale=0.3), "bg": _normal(8, 8),
         "Wd": _normal(9, 8, 1, 3, 3, scale=0.5), "bd": _normal(10, 8),
         "lo": np.float32(0), "hi": np.float32(6)})


def gemm():
    """Gemm with transB + bias + alpha/beta, Gemm with transA and a row bias."""
    return make_model(
        [node("Gemm", ["x", "W1", "b1"], ["y1"], transB=1, alpha=0.5, beta=2.0),
         node("Gemm", ["xt", "W2", "b2"], ["y2"], transA=1)],
        [("x", F, [4, 16]), ("xt", F, [16, 3])], [("y1", F, [4, 12]), ("y2", F, [3, 8])],
        {"W1": _normal(11, 12, 16, scale=0.3), "b1": _normal(12, 12),
         "W2": _normal(13, 16, 8, scale=0.3), "b2": _normal(14, 1, 8)})


def matmul():
    """MatMul of two activations (batched, attention-like) and a 3-D input times a weight + bias."""
    return make_model(
        [node("MatMul", ["a", "b"], ["y1"]),
         node("MatMul", ["x", "W"], ["m"]), node("Add", ["m", "bias"], ["y2"])],
        [("a", F, [2, 3, 5, 8]), ("b", F, [2, 3, 8, 6]), ("x", F, [2, 5, 8])],
        [("y1", F, [2, 3, 5, 6]), ("y2", F, [2, 5, 7])],
        {"W": _normal(15, 8, 7, scale=0.3), "bias": _normal(16, 7)})


def elementwise():
    """Add/Sub/Mul/Div/Max/Min/Pow/Sqrt/Exp/Abs/Neg, broadcasting [2,3,4] with [4] and [3,1]."""
    return make_model(
        [node("Add", ["a", "b"], ["s"]), node("Mul", ["s", "c"], ["p"]),
         node("Abs", ["c"], ["ac"]), node("Add", ["ac", "one"], ["ac1"]),
         node("Div", ["a", "ac1"], ["q"]), node("Sub", ["p", "q"], ["y1"]),
         node("Max", ["a", "b"], ["mx"]), node("Min", ["a", "c"], ["mn"]),
         node("Sub", ["mx", "mn"], ["y2"]),
         node("Abs", ["a"], ["aa"]), node("Sqrt", ["aa"], ["sq"]), node("Neg", ["aa"], ["na"]),
         node("Exp", ["na"], ["ex"]), node("Pow", ["ac1", "two"], ["pw"]),
         node("Add", ["sq", "ex"], ["t"]), node("Mul", ["t", "pw"], ["y3"])],
        [("a", F, [2, 3, 4]), ("b", F, [4]), ("c", F, [3, 1])],
        [("y1", F, [2, 3, 4]), ("y2", F, [2, 3, 4]), ("y3", F, [2, 3, 4])],
        {"one": np.float32(1), "two": np.float32(2)})


def activations():
    """Relu, Sigmoid, Tanh, LeakyRelu, Clip, silu, and Gelu in torch's exported erf form after
    MatMul + bias (the form fused kernels look for)."""
    r2 = np.float32(math.sqrt(2.0))
    return make_model(
        [node("Relu", ["x"], ["relu"]), node("Sigmoid", ["x"], ["sigmoid"]),
         node("Tanh", ["x"], ["tanh"]), node("LeakyRelu", ["x"], ["leaky"], alpha=0.1),
         node("Clip", ["x", "lo", "hi"], ["clip"]),
         node("Sigmoid", ["x"], ["sg"]), node("Mul", ["x", "sg"], ["silu"]),
         node("MatMul", ["x", "W"], ["m"]), node("Add", ["m", "bias"], ["h"]),
         node("Div", ["h", "sqrt2"], ["hd"]), node("Erf", ["hd"], ["e"]),
         node("Add", ["e", "one"], ["e1"]), node("Mul", ["h", "e1"], ["he"]),
         node("Mul", ["he", "half"], ["gelu"])],
        [("x", F, [3, 17])],
        [(n, F, [3, 17]) for n in ("relu", "sigmoid", "tanh", "leaky", "clip", "silu")]
        + [("gelu", F, [3, 9])],
        {"lo": np.float32(-1), "hi": np.float32(1.5), "W": _normal(17, 17, 9, scale=0.3),
         "bias": _normal(18, 9), "sqrt2": r2, "one": np.float32(1), "half": np.float32(0.5)})


def reductions():
    """ReduceSum/Mean/Max/Min over different axes, keepdims 0 and 1, and ArgMax (int64 out)."""
    return make_model(
        [node("ReduceSum", ["x", "axes2"], ["sum"], keepdims=0),
         node("ReduceMean", ["x"], ["mean"], axes=[1], keepdims=1),
         node("ReduceMax", ["x"], ["max"], axes=[1, 2], keepdims=0),
         node("ReduceMin", ["x"], ["min"], axes=[0], keepdims=0),
         node("ArgMax", ["x"], ["argmax"], axis=2, keepdims=0)],
        [("x", F, [2, 5, 6])],
        [("sum", F, [2, 5]), ("mean", F, [2, 1, 6]), ("max", F, [2]), ("min", F, [5, 6]),
         ("argmax", I64, [2, 5])],
        {"axes2": np.array([2], np.int64)})


def softmax():
    return make_model(
        [node("Softmax", ["x"], ["last"], axis=-1), node("Softmax", ["x"], ["middle"], axis=1),
         node("LogSoftmax", ["x"], ["log"], axis=-1)],
        [("x", F, [2, 4, 10])], [("last", F, [2, 4, 10]), ("middle", F, [2, 4, 10]),
                                 ("log", F, [2, 4, 10])])


def layer_norm():
    """LayerNormalization over the last axis and over the last two axes."""
    return make_model(
        [node("LayerNormalization", ["x", "g", "b"], ["y1"], axis=-1, epsilon=1e-5),
         node("LayerNormalization", ["x", "g2", "b2"], ["y2"], axis=1, epsilon=1e-3)],
        [("x", F, [2, 6, 16])], [("y1", F, [2, 6, 16]), ("y2", F, [2, 6, 16])],
        {"g": _normal(19, 16), "b": _normal(20, 16), "g2": _normal(21, 6, 16),
         "b2": _normal(22, 6, 16)})


def pooling():
    return make_model(
        [node("MaxPool", ["x"], ["max2"], kernel_shape=[2, 2], strides=[2, 2]),
         node("MaxPool", ["x"], ["max3"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
         node("AveragePool", ["x"], ["avg"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
              count_include_pad=0),
         node("GlobalAveragePool", ["x"], ["gap"]), node("GlobalMaxPool", ["x"], ["gmp"])],
        [("x", F, [2, 3, 12, 12])],
        [("max2", F, [2, 3, 6, 6]), ("max3", F, [2, 3, 6, 6]), ("avg", F, [2, 3, 12, 12]),
         ("gap", F, [2, 3, 1, 1]), ("gmp", F, [2, 3, 1, 1])])


def shape_ops():
    """Concat, Transpose, Reshape, Slice (with steps and negative indices), Gather with constant
    indices, Unsqueeze/Squeeze, Flatten, Split."""
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    return make_model(
        [node("Concat", ["a", "b"], ["cat"], axis=1),
         node("Transpose", ["cat"], ["tr"], perm=[0, 2, 3, 1]),
         node("Reshape", ["tr", "shape"], ["flat"]),
         node("Slice", ["cat", "starts", "ends", "axes", "steps"], ["sl"]),
         node("Gather", ["a", "idx"], ["ga"], axis=1),
         node("Unsqueeze", ["ga", "ax0"], ["un"]), node("Squeeze", ["un", "ax0"], ["sq"]),
         node("Flatten", ["sq"], ["fl"], axis=2),
         node("Split", ["b", "split"], ["s1", "s2"], axis=3)],
        [("a", F, [2, 3, 4, 5]), ("b", F, [2, 3, 4, 5])],
        [("flat", F, [2, 120]), ("sl", F, [2, 3, 2, 5]), ("fl", F, [4, 20]),
         ("s1", F, [2, 3, 4, 2]), ("s2", F, [2, 3, 4, 3])],
        {"shape": i64(2, -1), "starts": i64(0, -1), "ends": i64(6, 0), "axes": i64(1, 2),
         "steps": i64(2, -2), "idx": i64(2, 0), "ax0": i64(0), "split": i64(2, 3)})


def int_and_bool():
    """int64 and bool inputs and outputs: an embedding Gather by int64 ids, Where on a bool
    mask, Greater/Not/And (bool out), Cast + ReduceSum (int64 out), integer arithmetic."""
    return make_model(
        [node("Gather", ["table", "token_ids"], ["emb"], axis=0),
         node("Unsqueeze", ["keep_mask", "axm"], ["m3"]),
         node("Where", ["m3", "emb", "zero"], ["masked"]),
         node("Greater", ["x", "zero"], ["pos"]), node("Not", ["keep_mask"], ["nm"]),
         node("And", ["pos", "nm"], ["both"]),
         node("Cast", ["keep_mask"], ["mi"], to=I64),
         node("ReduceSum", ["mi", "axs"], ["count"], keepdims=0),
         node("Mul", ["token_ids", "three"], ["i3"]), node("Add", ["i3", "count_b"], ["idsum"])],
        [("token_ids", I64, [2, 5]), ("keep_mask", BOOL, [2, 5]), ("x", F, [2, 5])],
        [("masked", F, [2, 5, 4]), ("both", BOOL, [2, 5]), ("count", I64, [2]),
         ("idsum", I64, [2, 5])],
        {"table": _normal(23, 10, 4), "axm": np.array([2], np.int64), "zero": np.float32(0),
         "axs": np.array([1], np.int64), "three": np.int64(3),
         "count_b": np.array([[1], [-2]], np.int64)})


def int_and_bool_feeds():
    rng = _rng(24)
    return {"token_ids": rng.integers(0, 10, (2, 5)).astype(np.int64),
            "keep_mask": rng.random((2, 5)) < 0.5, "x": _normal(25, 2, 5)}


def mlp():
    """MatMul+Add+Relu, MatMul+Add+Relu, MatMul+Add, Softmax (batch 8)."""
    return make_model(
        [node("MatMul", ["features", "W1"], ["m1"]), node("Add", ["m1", "b1"], ["a1"]),
         node("Relu", ["a1"], ["h1"]),
         node("MatMul", ["h1", "W2"], ["m2"]), node("Add", ["b2", "m2"], ["a2"]),
         node("Relu", ["a2"], ["h2"]),
         node("MatMul", ["h2", "W3"], ["m3"]), node("Add", ["m3", "b3"], ["a3"]),
         node("Softmax", ["a3"], ["probs"], axis=-1)],
        [("features", F, [8, 32])], [("probs", F, [8, 10])],
        {"W1": _normal(26, 32, 64, scale=0.2), "b1": _normal(27, 64),
         "W2": _normal(28, 64, 48, scale=0.2), "b2": _normal(29, 48),
         "W3": _normal(30, 48, 10, scale=0.2), "b3": _normal(31, 10)}, name="mlp")


def small_cnn():
    """Conv + BatchNormalization + Relu, MaxPool, Conv + Relu + residual Add, GlobalAveragePool,
    Flatten, Gemm, Softmax (batch 2)."""
    rng = _rng(32)
    return make_model(
        [node("Conv", ["x", "W1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
         node("BatchNormalization", ["c1", "gamma", "beta", "mean", "var"], ["bn"]),
         node("Relu", ["bn"], ["r1"]),
         node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
         node("Conv", ["p1", "W2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
         node("Relu", ["c2"], ["r2"]), node("Add", ["r2", "p1"], ["res"]),
         node("GlobalAveragePool", ["res"], ["gap"]), node("Flatten", ["gap"], ["f"]),
         node("Gemm", ["f", "Wf", "bf"], ["logits"], transB=1),
         node("Softmax", ["logits"], ["y"], axis=1)],
        [("x", F, [2, 3, 16, 16])], [("y", F, [2, 10])],
        {"W1": _normal(33, 8, 3, 3, 3, scale=0.3), "b1": _normal(34, 8),
         "gamma": (1 + 0.1 * rng.standard_normal(8)).astype(np.float32),
         "beta": _normal(35, 8, scale=0.1), "mean": _normal(36, 8, scale=0.1),
         "var": (0.5 + rng.random(8)).astype(np.float32),
         "W2": _normal(37, 8, 8, 3, 3, scale=0.2), "b2": _normal(38, 8),
         "Wf": _normal(39, 10, 8, scale=0.5), "bf": _normal(40, 10)}, name="small_cnn")


DIGITS_MODEL = os.path.join(EXAMPLES, "digits_cnn.onnx")
DIGITS_DATA = os.path.join(EXAMPLES, "digits_test.npz")
DIGITS_BATCH = 64  # of the 397 held-out images: enough for a real batch, quick on the reference


def digits_feeds():
    with np.load(DIGITS_DATA) as data:
        return {"pixels": np.ascontiguousarray(data["pixels"][:DIGITS_BATCH])}


def digits_labels():
    with np.load(DIGITS_DATA) as data:
        return data["labels"][:DIGITS_BATCH]


CASES = [
    Case("conv_bias_relu", "Conv 3x3 pad 1 + bias + Relu", conv_bias_relu,
         _float_feeds(100, x=(2, 3, 10, 10))),
    Case("conv_stride_pad", "Conv stride 2, asymmetric pads, no bias; dilated Conv; 1x1 Conv",
         conv_stride_pad, _float_feeds(101, x=(2, 4, 11, 11))),
    Case("conv_groups", "grouped Conv + Relu, depthwise Conv stride 2 + Clip(0, 6)", conv_groups,
         _float_feeds(102, x=(2, 8, 9, 9))),
    Case("gemm", "Gemm transB/transA, bias, alpha/beta", gemm,
         _float_feeds(103, x=(4, 16), xt=(16, 3))),
    Case("matmul", "batched MatMul of two inputs; MatMul + bias on a 3-D input", matmul,
         _float_feeds(104, a=(2, 3, 5, 8), b=(2, 3, 8, 6), x=(2, 5, 8))),
    Case("elementwise", "arithmetic and unary ops with broadcasting", elementwise,
         _float_feeds(105, a=(2, 3, 4), b=(4,), c=(3, 1))),
    Case("activations", "Relu, Sigmoid, Tanh, LeakyRelu, Clip, silu, Gelu (erf form)",
         activations, _float_feeds(106, x=(3, 17))),
    Case("reductions", "ReduceSum/Mean/Max/Min, ArgMax", reductions,
         _float_feeds(107, x=(2, 5, 6))),
    Case("softmax", "Softmax (last and middle axis), LogSoftmax", softmax,
         lambda: {"x": _normal(108, 2, 4, 10, scale=3.0)}),
    Case("layer_norm", "LayerNormalization over 1 and 2 axes", layer_norm,
         lambda: {"x": _normal(109, 2, 6, 16, scale=2.0) + 0.5}),
    Case("pooling", "MaxPool, AveragePool (pads, count_include_pad=0), global pools", pooling,
         _float_feeds(110, x=(2, 3, 12, 12))),
    Case("shape_ops", "Concat, Transpose, Reshape, Slice, Gather, (Un)Squeeze, Flatten, Split",
         shape_ops, _float_feeds(111, a=(2, 3, 4, 5), b=(2, 3, 4, 5))),
    Case("int_and_bool", "int64/bool inputs and outputs: Gather by ids, Where, Greater, Not, And, "
         "Cast, integer arithmetic", int_and_bool, int_and_bool_feeds),
    Case("mlp", "a 3-layer MLP, batch 8", mlp, _float_feeds(112, features=(8, 32))),
    Case("small_cnn", "Conv + BatchNorm + Relu, MaxPool, residual Add, Gemm, Softmax", small_cnn,
         _float_feeds(113, x=(2, 3, 16, 16))),
    Case("digits_cnn", f"the bundled torch-exported digits CNN on {DIGITS_BATCH} real images",
         lambda: DIGITS_MODEL, digits_feeds, input_shapes={"pixels": [DIGITS_BATCH, 1, 8, 8]}),
]
CASES_BY_NAME = {case.name: case for case in CASES}


def unsupported_op_model():
    """A model with one op no backend has: `FooBar` in domain `ai.accelkit.testing`."""
    return make_model(
        [node("Relu", ["x"], ["r"]),
         helper.make_node("FooBar", ["r"], ["y"], name="mystery_node",
                          domain="ai.accelkit.testing")],
        [("x", F, [2, 3])], [("y", F, [2, 3])], domains=("ai.accelkit.testing",))
