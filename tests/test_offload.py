"""The cpu backend's kernel patterns on small ONNX graphs shaped like real exporters' output:
each fused subgraph goes to the expected kernel, the rest stays with TVM, and the outputs match
onnxruntime. Variants the kernels do not take fall back to TVM-generated code, still correct."""
from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import ffn_model, make_model, mha_model
from onnx import TensorProto, helper, numpy_helper

import accelkit
from accelkit.demo import relative_l2

ort = pytest.importorskip("onnxruntime")
F = TensorProto.FLOAT


def const(name, array):
    return numpy_helper.from_array(np.asarray(array, np.float32), name)


def check(proto, expected: dict[str, int], tol=1e-5, **options):
    model = accelkit.compile(proto, cache=False, **options)
    rng = np.random.default_rng(0)
    feeds = {s.name: rng.standard_normal(s.shape).astype(s.dtype) for s in model.inputs}
    want = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = model.run(feeds)
    for g, w in zip(got, want):
        assert g.shape == w.shape and relative_l2(g, w) < tol, relative_l2(g, w)
    assert model.manifest["offloaded"] == expected
    return model


def test_gemm_with_transposed_weight_and_relu():
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Gemm", ["x", "W", "b"], ["g"], transB=1),
             helper.make_node("Relu", ["g"], ["y"])]
    proto = make_model(nodes, [helper.make_tensor_value_info("x", F, [5, 40])],
                       [helper.make_tensor_value_info("y", F, [5, 70])],
                       [const("W", rng.standard_normal((70, 40))), const("b", rng.standard_normal(70))])
    check(proto, {"cpu.dense_bias_relu": 1})


def test_transformer_ffn_gelu_erf_and_residual_on_3d_input():
    """torch's export of nn.GELU(): x * 0.5 * (1 + erf(x / sqrt(2))) after a 3-D MatMul."""
    check(ffn_model(), {"cpu.dense_bias_gelu": 1, "cpu.dense_bias_add": 1})


def gpt2_mlp_model(a=0.044715, act="gelu_new"):
    """GPT-2's MLP as torch exports it: Conv1D layers are 2-D Gemms on x viewed as [B*S, E],
    reshaped to [B, S, N] around the activation, transformers' NewGELU written out as
    0.5 x (1 + tanh(sqrt(2/pi) (x + a x^3))) (act "relu": a Relu there instead)."""
    rng = np.random.default_rng(11)
    b, s, e, n = 2, 5, 16, 64
    nodes = [helper.make_node("Reshape", ["x", "flat"], ["x2"]),
             helper.make_node("Gemm", ["x2", "W1", "b1"], ["h2"]),
             helper.make_node("Reshape", ["h2", "wide"], ["h"])]
    if act == "gelu_new":
        nodes += [helper.make_node("Mul", ["half", "h"], ["hh"]),
                  helper.make_node("Pow", ["h", "three"], ["h3"]), helper.make_node("Mul", ["a", "h3"], ["ah3"]),
                  helper.make_node("Add", ["h", "ah3"], ["inner"]), helper.make_node("Mul", ["c", "inner"], ["u"]),
                  helper.make_node("Tanh", ["u"], ["t"]), helper.make_node("Add", ["one", "t"], ["t1"]),
                  helper.make_node("Mul", ["hh", "t1"], ["g"])]
    else:
        nodes.append(helper.make_node("Relu", ["h"], ["g"]))
    nodes += [helper.make_node("Reshape", ["g", "flat_n"], ["g2"]),
              helper.make_node("Gemm", ["g2", "W2", "b2"], ["o2"]),
              helper.make_node("Reshape", ["o2", "narrow"], ["y"])]
    inits = [const("W1", rng.standard_normal((e, n)) / 4), const("b1", rng.standard_normal(n)),
             const("W2", rng.standard_normal((n, e)) / 8), const("b2", rng.standard_normal(e)),
             const("half", 0.5), const("three", 3.0), const("a", a), const("c", math.sqrt(2 / math.pi)),
             const("one", 1.0)]
    inits += [numpy_helper.from_array(np.array(v, np.int64), name) for name, v in
              (("flat", [b * s, e]), ("wide", [b, s, n]), ("flat_n", [b * s, n]), ("narrow", [b, s, e]))]
    return make_model(nodes, [helper.make_tensor_value_info("x", F, [b, s, e])],
                      [helper.make_tensor_value_info("y", F, [b, s, e])], inits)


@pytest.mark.parametrize("act, fused", [("gelu_new", "cpu.dense_bias_gelu_tanh"), ("relu", "cpu.dense_bias_relu")])
def test_gpt2_mlp_activation_is_the_dense_epilogue(act, fused):
    """GPT-2's written-out tanh-GELU becomes gelu_tanh, and an activation between the reshapes
    around a 2-D Gemm moves inside them: both go into the first dense call's epilogue (TVM
    computed that GELU with scalar pow and tanh calls, 3.5 ms per GPT-2-small layer)."""
    check(gpt2_mlp_model(act=act), {fused: 1, "cpu.dense_bias": 1})


def test_tanh_gelu_with_other_constants_is_not_taken_for_gelu():
    """0.05 instead of 0.044715 is some other function: TVM computes it as written, correct."""
    model = check(gpt2_mlp_model(a=0.05), {"cpu.dense_bias": 2})
    assert "cpu.dense_bias_gelu_tanh" not in model.manifest["offloaded"]


def gated_mlp_model(gate_input="g"):
    """Llama's MLP as torch exports it: down(silu(x W_gate) * (x W_up)), SiLU written out as
    g * Sigmoid(g). gate_input "u" makes it u * sigmoid(g), which is not SiLU."""
    rng = np.random.default_rng(12)
    e, n = 16, 40
    nodes = [helper.make_node("MatMul", ["x", "Wg"], ["g"]), helper.make_node("MatMul", ["x", "Wu"], ["u"]),
             helper.make_node("Sigmoid", ["g"], ["sg"]), helper.make_node("Mul", [gate_input, "sg"], ["a"]),
             helper.make_node("Mul", ["a", "u"], ["h"]), helper.make_node("MatMul", ["h", "Wd"], ["y"])]
    inits = [const("Wg", rng.standard_normal((e, n)) / 4), const("Wu", rng.standard_normal((e, n)) / 4),
             const("Wd", rng.standard_normal((n, e)) / 6)]
    return make_model(nodes, [helper.make_tensor_value_info("x", F, [1, 7, e])],
                      [helper.make_tensor_value_info("y", F, [1, 7, e])], inits)


def test_llama_gated_mlp_silu_is_the_gate_projections_epilogue():
    """x * sigmoid(x) becomes silu, the gate projection's epilogue (TVM computed the written-out
    form with a scalar exp: about 0.5 ms per 128 x 2048 layer), and the product with the up
    projection too (res_mode 3: about 70 us per 128 x 2048 layer as a TVM multiply). In
    u * sigmoid(g), not SiLU, sigmoid(g) * u is the epilogue and TVM multiplies by u again."""
    check(gated_mlp_model(), {"cpu.dense_silu_mul": 1, "cpu.dense": 2})
    check(gated_mlp_model(gate_input="u"), {"cpu.dense_sigmoid_mul": 1, "cpu.dense": 2})


def test_gemma_gated_mlp_torch_tanh_gelu_is_one_epilogue():
    """Gemma's MLP: gelu(x W_gate, approximate="tanh") * (x W_up), the GELU as torch exports it
    (x * (x * x) for the cube, constants on the left). It becomes gelu_tanh, and gate GELU and
    product are the gate projection's epilogue (TVM computed it: 16% of a 2-layer Gemma)."""
    rng = np.random.default_rng(16)
    e, n = 16, 40
    nodes = [helper.make_node("MatMul", ["x", "Wg"], ["g"]), helper.make_node("MatMul", ["x", "Wu"], ["u"]),
             helper.make_node("Mul", ["g", "g"], ["g2"]), helper.make_node("Mul", ["g", "g2"], ["g3"]),
             helper.make_node("Mul", ["a", "g3"], ["ag3"]), helper.make_node("Add", ["g", "ag3"], ["i"]),
             helper.make_node("Mul", ["c", "i"], ["ci"]), helper.make_node("Tanh", ["ci"], ["t"]),
             helper.make_node("Add", ["one", "t"], ["t1"]), helper.make_node("Mul", ["g", "t1"], ["gt"]),
             helper.make_node("Mul", ["half", "gt"], ["act"]), helper.make_node("Mul", ["act", "u"], ["h"]),
             helper.make_node("MatMul", ["h", "Wd"], ["y"])]
    inits = [const("Wg", rng.standard_normal((e, n)) / 4), const("Wu", rng.standard_normal((e, n)) / 4),
             const("Wd", rng.standard_normal((n, e)) / 6), const("a", 0.044715), const("c", math.sqrt(2 / math.pi)),
             const("one", 1.0), const("half", 0.5)]
    proto = make_model(nodes, [helper.make_tensor_value_info("x", F, [1, 7, e])],
                       [helper.make_tensor_value_info("y", F, [1, 7, e])], inits)
    check(proto, {"cpu.dense_gelu_tanh_mul": 1, "cpu.dense": 2})


@pytest.mark.parametrize("other", ["tanh", "self", "relu_self", "bias_self", "relu_bias_times_h"])
def test_a_product_with_the_dense_output_itself_is_not_a_multiply_epilogue(other):
    """h * tanh(h), h * h, relu(h) * relu(h), (h + b)^2, relu(h + b) * h multiply the dense
    output by something computed from it (or by itself): the kernel cannot take that as its
    input without computing h a second time, so it is one dense call and TVM multiplies."""
    rng = np.random.default_rng(15)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"])]
    nodes += {"tanh": [helper.make_node("Tanh", ["h"], ["t"]), helper.make_node("Mul", ["h", "t"], ["y"])],
              "self": [helper.make_node("Mul", ["h", "h"], ["y"])],
              "relu_self": [helper.make_node("Relu", ["h"], ["a"]), helper.make_node("Mul", ["a", "a"], ["y"])],
              "bias_self": [helper.make_node("Add", ["h", "b"], ["a"]), helper.make_node("Mul", ["a", "a"], ["y"])],
              "relu_bias_times_h": [helper.make_node("Add", ["h", "b"], ["hb"]), helper.make_node("Relu", ["hb"], ["a"]),
                                    helper.make_node("Mul", ["a", "h"], ["y"])]}[other]
    proto = make_model(nodes, [helper.make_tensor_value_info("x", F, [1, 7, 16])],
                       [helper.make_tensor_value_info("y", F, [1, 7, 24])],
                       [const("W", rng.standard_normal((16, 24)) / 4), const("b", rng.standard_normal(24))])
    model = accelkit.compile(proto, cache=False)
    offloaded = model.manifest["offloaded"]
    assert sum(n for name, n in offloaded.items() if name.startswith("cpu.dense")) == 1, offloaded
    check(proto, offloaded)


def rms_norm_model(form="llama", weight=True, axis=-1, eps=1e-6, power=2.0, w_shape=(24,)):
    """RMSNorm written out as torch exports it, then a MatMul: LlamaRMSNorm ("llama": x *
    Reciprocal... as 1 / Sqrt, then w *), T5LayerNorm ("t5": x * rsqrt as 1 / Sqrt, w * after),
    "div" (x / Sqrt(...)) and "square" (x * x for the square)."""
    rng = np.random.default_rng(14)
    d = 24
    sq = (helper.make_node("Mul", ["x", "x"], ["sq"]) if form == "square"
          else helper.make_node("Pow", ["x", "two"], ["sq"]))
    nodes = [sq, helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1),
             helper.make_node("Add", ["ms", "eps"], ["var"]), helper.make_node("Sqrt", ["var"], ["root"])]
    if form == "div":
        nodes.append(helper.make_node("Div", ["x", "root"], ["n"]))
    else:
        nodes += [helper.make_node("Div", ["one", "root"], ["inv"]),
                  helper.make_node("Mul", ["x", "inv"] if form != "t5" else ["inv", "x"], ["n"])]
    if weight:
        nodes.append(helper.make_node("Mul", ["w", "n"] if form != "t5" else ["n", "w"], ["h"]))
    nodes.append(helper.make_node("MatMul", ["h" if weight else "n", "W"], ["y"]))
    inits = [const("two", power), const("eps", eps), const("one", 1.0),
             const("w", rng.standard_normal(w_shape) + 1), const("W", rng.standard_normal((d, 8)) / 4),
             numpy_helper.from_array(np.array([axis], np.int64), "axes")]
    out = [1, 3, 5, 8] if w_shape == (24,) else [2, 3, 5, 8]
    return make_model(nodes, [helper.make_tensor_value_info("x", F, [1, 3, 5, d])],
                      [helper.make_tensor_value_info("y", F, out)], inits, opset=18)


@pytest.mark.parametrize("form", ["llama", "t5", "div", "square"])
@pytest.mark.parametrize("weight", [True, False])
def test_written_out_rms_norm_is_the_kernel(form, weight):
    """RMSNorm as exported (Llama, Qwen, Mistral, T5: no RMSNormalization op before opset 23)
    becomes one rms_norm call: TVM computed it as two generated functions, 79 us per 128 x 768
    block, against 25 for the kernel in a Llama layer. eps 0.5 (against mean squares near 1)
    checks that eps reaches the kernel."""
    check(rms_norm_model(form, weight), {"cpu.rms_norm": 1, "cpu.dense": 1})
    check(rms_norm_model(form, weight, eps=0.5), {"cpu.rms_norm": 1, "cpu.dense": 1})


@pytest.mark.parametrize("change", [dict(axis=1), dict(power=4.0), dict(eps=-1e-3)])
def test_what_is_not_rms_norm_stays_with_tvm(change):
    """Over another axis, a 4th power, a negative eps: not RMSNorm of x over its last axis, so
    TVM computes them as written (and correctly)."""
    model = check(rms_norm_model(**change), {"cpu.dense": 1}, tol=1e-5)
    assert "cpu.rms_norm" not in model.manifest["offloaded"]


def test_rms_norm_weight_that_broadcasts_x_up_stays_a_multiply():
    """A [2, 1, 1, 24] weight makes the output [2, 3, 5, 24] from x's [1, 3, 5, 24]: the
    normalisation is the kernel (its own weight all ones) and TVM multiplies by the weight."""
    model = check(rms_norm_model(w_shape=(2, 1, 1, 24)), {"cpu.rms_norm": 1, "cpu.dense": 1})
    assert model.outputs[0].shape == (2, 3, 5, 8)


@pytest.mark.parametrize("form", ["erf", "tanh"])
def test_gelu_whose_constant_broadcasts_up_is_not_an_epilogue(form):
    """GELU written out after a MatMul, but with its 0.5 a [1, 1, 1] constant: the product is
    [1, 4, 24], not the matmul's [4, 24], so it is neither gelu(x) nor the dense epilogue (this
    once compiled into a call whose output had the wrong shape)."""
    rng = np.random.default_rng(13)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Mul", ["h", "half"], ["hh"])]
    if form == "erf":
        nodes += [helper.make_node("Div", ["h", "sqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["t"])]
    else:
        nodes += [helper.make_node("Pow", ["h", "three"], ["h3"]), helper.make_node("Mul", ["h3", "a"], ["ah3"]),
                  helper.make_node("Add", ["h", "ah3"], ["i"]), helper.make_node("Mul", ["i", "c"], ["u"]),
                  helper.make_node("Tanh", ["u"], ["t"])]
    nodes += [helper.make_node("Add", ["t", "one"], ["t1"]), helper.make_node("Mul", ["hh", "t1"], ["y"])]
    inits = [const("W", rng.standard_normal((16, 24))), const("half", np.full((1, 1, 1), 0.5)),
             const("sqrt2", math.sqrt(2)), const("one", 1.0), const("three", 3.0), const("a", 0.044715),
             const("c", math.sqrt(2 / math.pi))]
    proto = make_model(nodes, [helper.make_tensor_value_info("x", F, [4, 16])],
                       [helper.make_tensor_value_info("y", F, [1, 4, 24])], inits)
    check(proto, {"cpu.dense": 1})


@pytest.mark.parametrize("factor, fused", [(1.702, {"cpu.dense_bias_quick_gelu": 1, "cpu.dense_bias": 1}),
                                           (1.5, {"cpu.dense_bias": 2})])
def test_clip_quick_gelu_is_the_dense_epilogue(factor, fused):
    """CLIP's quick_gelu as torch exports it, x * sigmoid(1.702 x), is the first dense call's
    epilogue (TVM computed it with a scalar exp: 16% of a CLIP text encoder); another factor is
    not quick_gelu and stays with TVM."""
    rng = np.random.default_rng(14)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["m"]), helper.make_node("Add", ["m", "b1"], ["h"]),
             helper.make_node("Mul", ["h", "k"], ["hk"]), helper.make_node("Sigmoid", ["hk"], ["s"]),
             helper.make_node("Mul", ["h", "s"], ["g"]), helper.make_node("MatMul", ["g", "W2"], ["m2"]),
             helper.make_node("Add", ["m2", "b2"], ["y"])]
    inits = [const("W1", rng.standard_normal((16, 40)) / 4), const("b1", rng.standard_normal(40)),
             const("k", factor), const("W2", rng.standard_normal((40, 16)) / 6), const("b2", rng.standard_normal(16))]
    check(make_model(nodes, [helper.make_tensor_value_info("x", F, [1, 7, 16])],
                     [helper.make_tensor_value_info("y", F, [1, 7, 16])], inits), fused)


def test_gelu_with_other_constants_is_not_taken_for_gelu():
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]),
             helper.make_node("Div", ["h", "c"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["e1"]), helper.make_node("Mul", ["h", "e1"], ["he"]),
             helper.make_node("Mul", ["he", "half"], ["y"])]
    inits = [const("W", rng.standard_normal((16, 24))), const("c", 3.0), const("one", 1.0), const("half", 0.5)]
    proto = make_model(nodes, [helper.make_tensor_value_info("x", F, [4, 16])],
                       [helper.make_tensor_value_info("y", F, [4, 24])], inits)
    check(proto, {"cpu.dense": 1})


def test_mobilenet_block_pad_conv_relu6_depthwise_and_residual():
    """TF-style explicit Pad before each conv (fused into the conv), Clip(0, 6), a depthwise
    conv, and the inverted-residual Add."""
    rng = np.random.default_rng(4)
    nodes = [
        helper.make_node("Conv", ["x", "We", "be"], ["c1"]),
        helper.make_node("Clip", ["c1", "zero", "six"], ["r1"]),
        helper.make_node("Pad", ["r1", "pads"], ["p"], mode="constant"),
        helper.make_node("Conv", ["p", "Wd", "bd"], ["c2"], group=24),
        helper.make_node("Clip", ["c2", "zero", "six"], ["r2"]),
        helper.make_node("Conv", ["r2", "Wp", "bp"], ["c3"]),
        helper.make_node("Add", ["x", "c3"], ["y"]),
    ]
    inits = [const("We", rng.standard_normal((24, 8, 1, 1)) * 0.3), const("be", rng.standard_normal(24)),
             const("Wd", rng.standard_normal((24, 1, 3, 3)) * 0.3), const("bd", rng.standard_normal(24)),
             const("Wp", rng.standard_normal((8, 24, 1, 1)) * 0.3), const("bp", rng.standard_normal(8)),
             const("zero", 0.0), const("six", 6.0),
             numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 0, 2, 2], np.int64), "pads")]
    proto = make_model(nodes, [helper.make_tensor_value_info("x", F, [1, 8, 10, 10])],
                       [helper.make_tensor_value_info("y", F, [1, 8, 10, 10])], inits)
    # channels last (the default): the clips cross the layout change and stay fused; the
    # residual add of the graph's own NCHW input and output stays NCHW after the last transpose
    check(proto, {"cpu.conv2d_nhwc_bias_clip": 2, "cpu.conv2d_nhwc_bias": 1})
    check(proto, {"cpu.conv2d_bias_clip": 2, "cpu.conv2d_bias_add": 1}, layout="nchw")
    from accelkit import frontend

    prepared = frontend.prepare(proto).proto.graph.node
    assert [n.op_type for n in prepared].count("Pad") == 0
    assert [list(a.ints) for n in prepared if n.op_type == "Conv" for a in n.attribute
            if a.name == "pads"] == [[0, 0, 2, 2]]


def test_attention_block_layer_norm_and_softmax():
    rng = np.random.default_rng(5)
    s, d = 12, 16
    nodes = [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["qk"]), helper.make_node("Div", ["qk", "scale"], ["sc"]),
        helper.make_node("Add", ["sc", "mask"], ["sm"]), helper.make_node("Softmax", ["sm"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["ctx"]),
        helper.make_node("LayerNormalization", ["ctx", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-12),
    ]
    inits = [const("scale", math.sqrt(d)), const("mask", np.where(np.arange(s) < 9, 0.0, -1e4)),
             const("gamma", rng.standard_normal(d)), const("beta", rng.standard_normal(d))]
    inputs = [helper.make_tensor_value_info(n, F, [1, 2, s, d]) for n in ("q", "k", "v")]
    proto = make_model(nodes, inputs, [helper.make_tensor_value_info("y", F, [1, 2, s, d])], inits)
    check(proto, {"cpu.bmm_scaled_masked": 1, "cpu.softmax": 1, "cpu.bmm": 1, "cpu.layer_norm": 1})


@pytest.mark.parametrize("mask_shape,fused", [
    ((1, 1, 12, 12), True),    # the exporters' mask: per query row, shared by the batch and heads
    ((1, 1, 1, 12), True),     # one row for every query
    ((2, 3, 12, 12), True),    # a mask per batch item and head
    ((12,), True),             # rank 1
    ((2, 1, 12, 12), False),   # per batch item, shared by the heads: added by TVM instead
])
def test_attention_mask_is_added_in_the_scores_kernel(mask_shape, fused):
    """scores = q @ k^T / sqrt(d) + mask: the mask is the bmm kernel's residual, broadcast over
    rows and batch; a mask it cannot broadcast stays a separate add, and the result is right
    either way."""
    s, d = 12, 8
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["q", "kt"], ["qk"]), helper.make_node("Div", ["qk", "scale"], ["sc"]),
             helper.make_node("Add", ["mask", "sc"], ["sm"]), helper.make_node("Softmax", ["sm"], ["y"], axis=-1)]
    inputs = [helper.make_tensor_value_info(n, F, [2, 3, s, d]) for n in ("q", "k")]
    inputs.append(helper.make_tensor_value_info("mask", F, list(mask_shape)))
    proto = make_model(nodes, inputs, [helper.make_tensor_value_info("y", F, [2, 3, s, s])],
                       [const("scale", math.sqrt(d))])
    check(proto, {"cpu.bmm_scaled_masked" if fused else "cpu.bmm_scaled": 1, "cpu.softmax": 1})


@pytest.mark.parametrize("scale_op,mask_shape,k_perms,name", [
    ("Div", (2, 1, 1, 12), [(0, 2, 3, 1)], "attention_scaled_masked"),     # BERT's export, batch 2
    ("Mul", (1, 1, 12, 12), [(0, 2, 3, 1)], "attention_scaled_masked"),    # all-MiniLM-L6-v2's
    ("Mul", (2, 3, 12, 12), [(0, 2, 1, 3), (0, 1, 3, 2)], "attention_scaled_masked"),  # K^T in two steps
    ("Div", None, [(0, 2, 3, 1)], "attention_scaled"),
    ("Operands", (2, 1, 1, 12), [(0, 2, 3, 1)], "attention_scaled_masked"),  # torch's SDPA export
    ("Operands", None, [(0, 2, 1, 3), (0, 1, 3, 2)], "attention_scaled"),
    ("Operands-noops", (1, 1, 12, 12), [(0, 2, 1, 3), (0, 1, 3, 2)], "attention_scaled_masked"),  # GPT-2's
])
def test_multi_head_attention_is_one_kernel_call(scale_op, mask_shape, k_perms, name):
    """The head split, scores, scale, mask, softmax, context and head merge: one attention call
    between the projections (no transpose, bmm or softmax left), the output onnxruntime's.
    GPT-2's export adds no-ops (one-tensor Concats for the empty key/value cache, a Cast to
    float after the softmax), which the cpu backend drops first."""
    noops = scale_op.endswith("-noops")
    check(mha_model(scale_op=scale_op.removesuffix("-noops"), mask_shape=mask_shape, k_perms=k_perms, noops=noops),
          {f"cpu.{name}": 1, "cpu.dense_bias": 3, "cpu.dense": 1})


def _without_attention(proto):
    from accelkit.backends import cpu

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu, "attention_patterns", lambda *args, **kwargs: [])
        return accelkit.compile(proto, cache=False)


@pytest.mark.parametrize("where,mask_shape,name", [
    ("const", (2, 1, 1, 12), "attention_scaled_where_masked"),  # causal tril + padding mask
    ("const", None, "attention_scaled_where"),
    ("input", (1, 1, 12, 12), "attention_scaled_where_masked"),  # the condition computed at run time
    ("input", None, "attention_scaled_where"),
])
def test_causal_mask_by_where_is_fused_as_an_additive_mask(where, mask_shape, name):
    """transformers 4's eager GPT-2: where(causal, scores, finfo.min) [+ mask]. The attention
    kernel adds where(causal, 0, finfo.min) [+ mask] instead (a constant when the condition is
    one), which gives the same scores bit for bit: a kept score plus 0 is itself, and finfo.min
    plus a score rounds to finfo.min. So the output equals the unfused kernels' exactly, for a
    row with every key masked too."""
    proto = mha_model(where=where, mask_shape=mask_shape)
    model = check(proto, {f"cpu.{name}": 1, "cpu.dense_bias": 3, "cpu.dense": 1})
    unfused = _without_attention(proto)
    assert "cpu.bmm_scaled" in unfused.manifest["offloaded"]
    rng = np.random.default_rng(3)
    feeds = {"x": rng.standard_normal((2, 12, 24)).astype(np.float32)}
    if mask_shape is not None:
        feeds["mask"] = rng.standard_normal(mask_shape).astype(np.float32)
    if where == "input":
        cond = rng.random((1, 1, 12, 12)) > 0.4
        cond[..., 5, :] = False  # a query that sees no key: uniform weights either way
        feeds["cond"] = cond
    got, want = model.run(feeds)[0], unfused.run(feeds)[0]
    assert np.isfinite(got).all() and np.array_equal(got, want)


@pytest.mark.parametrize("fill", [-1e4, 0.0])
def test_where_fills_that_shift_scores_stay_unfused(fill):
    """A fill above -1e30 (GPT-2's old masked_bias -1e4) does not swamp the score it replaces, so
    adding it would change the masked scores: that Where stays with TVM, correct."""
    check(mha_model(where="const", fill=fill),
          {"cpu.bmm_scaled": 1, "cpu.softmax": 1, "cpu.bmm": 1, "cpu.dense_bias": 3, "cpu.dense": 1})


def test_attention_not_in_the_exporters_form_stays_unfused():
    """A context left head-major (no merge transpose) and a mask that is one value per query row
    ([B, 1, S, 1], not [..., Sk]) are not the attention kernel's: bmm, softmax and TVM take
    them (the bmm kernel adds neither mask), still correct."""
    check(mha_model(merge=False), {"cpu.bmm_scaled": 1, "cpu.softmax": 1, "cpu.bmm": 1, "cpu.dense_bias": 3})
    check(mha_model(mask_shape=(2, 1, 12, 1)),
          {"cpu.bmm_scaled": 1, "cpu.softmax": 1, "cpu.bmm": 1, "cpu.dense_bias": 3, "cpu.dense": 1})


@pytest.mark.parametrize("variant", [
    {"v_perm": (0, 2, 3, 1)},                       # V transposed like K: P @ V^T, not attention
    {"softmax_axis": 2},                            # softmax over the queries
    {"k_perms": [(0, 2, 1, 3), (0, 1, 2, 3)]},      # K not transposed: Q @ K (S == D here)
])
def test_look_alikes_of_attention_are_not_fused(variant):
    """Graphs with attention's shape but other math (S == D, so they type-check): not the
    attention kernel's; the unfused kernels and TVM compute them right."""
    proto = mha_model(s=8, d=8, mask_shape=None, **variant)
    model = check(proto, {"cpu.dense_bias": 3, "cpu.dense": 1} | _unfused(variant))
    assert "cpu.attention_scaled" not in model.manifest["offloaded"]


def _unfused(variant):
    if "softmax_axis" in variant:  # the softmax kernel takes the last axis only
        return {"cpu.bmm_scaled": 1, "cpu.bmm": 1}
    return {"cpu.bmm_scaled": 1, "cpu.softmax": 1, "cpu.bmm": 1}


def conv1d_model(c, o, w, k, groups=1, act="Relu", **attrs):
    """Conv (1-D) + bias + an activation, as torch exports nn.Conv1d (speech encoders: Whisper,
    wav2vec2); act "Gelu" is torch's erf GELU written out."""
    rng = np.random.default_rng(6)
    nodes = [helper.make_node("Conv", ["x", "W", "b"], ["c"], group=groups, **attrs)]
    if act == "Gelu":
        nodes += [helper.make_node("Div", ["c", "sqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
                  helper.make_node("Add", ["e", "one"], ["e1"]), helper.make_node("Mul", ["c", "e1"], ["ce"]),
                  helper.make_node("Mul", ["ce", "half"], ["y"])]
    else:
        nodes.append(helper.make_node(act, ["c"], ["y"]))
    s, (p0, p1), dil = attrs.get("strides", [1])[0], attrs.get("pads", [0, 0]), attrs.get("dilations", [1])[0]
    ow = (w + p0 + p1 - dil * (k - 1) - 1) // s + 1
    inits = [const("W", rng.standard_normal((o, c // groups, k))), const("b", rng.standard_normal(o)),
             const("sqrt2", math.sqrt(2)), const("one", 1.0), const("half", 0.5)]
    return make_model(nodes, [helper.make_tensor_value_info("x", F, [2, c, w])],
                      [helper.make_tensor_value_info("y", F, [2, o, ow])], inits)


@pytest.mark.parametrize("shape, act, fused", [
    (dict(c=4, o=6, w=20, k=3, pads=[1, 1], dilations=[2]), "Relu", "cpu.conv2d_nhwc_bias_relu"),
    (dict(c=8, o=16, w=31, k=3, strides=[2], pads=[1, 0]), "Gelu", "cpu.conv2d_nhwc_bias_gelu"),  # Whisper's 2nd
    (dict(c=8, o=8, w=25, k=5, groups=8, pads=[2, 2]), "Relu", "cpu.conv2d_nhwc_bias_relu"),  # depthwise
    (dict(c=6, o=6, w=40, k=3, groups=2, strides=[3]), "Sigmoid", "cpu.conv2d_nhwc_bias_sigmoid"),
    (dict(c=8, o=12, w=19, k=1), "Relu", "cpu.conv2d_nhwc_bias_relu"),
])
def test_conv1d_is_a_conv2d_over_one_row(shape, act, fused):
    """conv1d becomes a conv2d of height 1 (conv1d_as_conv2d), and its bias and activation move
    inside the squeeze back, so the channels-last convolution kernel takes all three. TVM's
    generated conv1d ran Whisper's encoder stem in 430 ms (the whole encoder: 0.16x
    onnxruntime; 1.1x now)."""
    check(conv1d_model(act=act, **shape), {fused: 1})


def test_variants_without_a_kernel_fall_back_to_tvm():
    """A float64 MatMul stays with TVM-generated code and stays correct."""
    rng = np.random.default_rng(6)
    d = TensorProto.DOUBLE
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"])]
    proto = make_model(nodes, [helper.make_tensor_value_info("x", d, [3, 5])],
                       [helper.make_tensor_value_info("y", d, [3, 4])],
                       [numpy_helper.from_array(rng.standard_normal((5, 4)), "W")])
    check(proto, {}, tol=1e-12)


FRESH = r"""
import sys, numpy as np, accelkit
model = accelkit.load(sys.argv[1])
feeds = dict(np.load(sys.argv[2]))
np.save(sys.argv[3], model.run(feeds)[0])
"""


def test_saved_artifact_with_every_kernel_runs_in_a_fresh_process(tmp_path):
    """conv (packed weights + depthwise), dense, bmm, softmax and layer norm in one artifact: the
    packed constants and kernel calls survive save -> load in a new process, on the portable
    path too."""
    import os
    import subprocess
    import sys

    rng = np.random.default_rng(7)
    nodes = [
        helper.make_node("Conv", ["x", "W1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "Wd", "bd"], ["c2"], pads=[1, 1, 1, 1], group=8),
        helper.make_node("Reshape", ["c2", "shape"], ["seq"]),              # [1, 8, 36]
        helper.make_node("MatMul", ["seq", "Wq"], ["q"]),                   # [1, 8, 16]
        helper.make_node("Transpose", ["q"], ["qt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "qt"], ["s"]),
        helper.make_node("Softmax", ["s"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "q"], ["ctx"]),
        helper.make_node("LayerNormalization", ["ctx", "g", "b"], ["y"], axis=-1),
    ]
    inits = [const("W1", rng.standard_normal((8, 3, 3, 3)) * 0.3), const("b1", rng.standard_normal(8)),
             const("Wd", rng.standard_normal((8, 1, 3, 3)) * 0.3), const("bd", rng.standard_normal(8)),
             const("Wq", rng.standard_normal((36, 16)) * 0.2), const("g", rng.standard_normal(16)),
             const("b", rng.standard_normal(16)),
             numpy_helper.from_array(np.array([1, 8, 36], np.int64), "shape")]
    proto = make_model(nodes, [helper.make_tensor_value_info("x", F, [1, 3, 6, 6])],
                       [helper.make_tensor_value_info("y", F, [1, 8, 16])], inits)
    model = check(proto, {"cpu.conv2d_nhwc_bias_relu": 1, "cpu.conv2d_nhwc_bias": 1, "cpu.dense": 1,
                          "cpu.bmm": 2, "cpu.softmax": 1, "cpu.layer_norm": 1})
    feeds = {"x": rng.standard_normal((1, 3, 6, 6)).astype(np.float32)}
    want = model.run(feeds)[0]
    artifact = model.save(tmp_path / "m.akx")
    np.savez(tmp_path / "feeds.npz", **feeds)
    for portable in ("0", "1"):
        out = tmp_path / f"out{portable}.npy"
        env = {**os.environ, "ACCELKIT_PORTABLE_KERNELS": portable}
        done = subprocess.run([sys.executable, "-c", FRESH, str(artifact), str(tmp_path / "feeds.npz"), str(out)],
                              capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr
        assert relative_l2(np.load(out), want) < 1e-5


def test_build_that_calls_a_kernel_this_accelkit_lacks_is_refused_clearly(tmp_path):
    """A build from another accelkit (its kernels renamed or gone) fails at load with an
    ArtifactError naming the kernel, and the compile cache recompiles it instead of failing;
    the cpu backend's fingerprint (hence the cache key) includes the kernel library's digest."""
    import json
    import os

    from accelkit.backends.cpu import CPUBackend, kernels_digest
    from accelkit.errors import ArtifactError
    from conftest import mlp_model

    assert len(kernels_digest()) == 16 and kernels_digest() in CPUBackend().fingerprint()
    proto = mlp_model()
    model = accelkit.compile(proto)
    assert model.manifest["kernels"] == ["accelkit.cpu.dense", "accelkit.cpu.softmax"]
    with pytest.raises(ArtifactError, match=r"calls kernel\(s\) accelkit.cpu.gone.*compile the model again"):
        CPUBackend()._check_kernels({"kernels": ["accelkit.cpu.dense", "accelkit.cpu.gone"]})
    # a stale cache entry (same key, its manifest naming a kernel that no longer exists), hit
    # by a new process: removed with a CacheWarning and compiled again
    onnx_path = tmp_path / "mlp.onnx"
    onnx_path.write_bytes(proto.SerializeToString())
    assert accelkit.compile(str(onnx_path)).cache_status in ("hit", "miss")
    hit = accelkit.compile(str(onnx_path))
    assert hit.cache_status == "hit"
    path = os.path.join(hit._directory, "manifest.json")
    manifest = json.load(open(path))
    manifest["kernels"] = ["accelkit.cpu.gone"]
    json.dump(manifest, open(path, "w"))
    probe = ("import sys, warnings, accelkit\n"
             "with warnings.catch_warnings(record=True) as caught:\n"
             "    warnings.simplefilter('always')\n"
             "    model = accelkit.compile(sys.argv[1])\n"
             "print(model.cache_status, [str(w.message) for w in caught])")
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", probe, str(onnx_path)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("miss") and "accelkit.cpu.gone" in done.stdout


def _ops(mod) -> dict[str, int]:
    from collections import Counter

    from tvm import relax

    ops: Counter = Counter()
    relax.analysis.post_order_visit(
        mod["main"], lambda e: isinstance(e, relax.Call) and hasattr(e.op, "name") and ops.update([e.op.name]))
    return dict(ops)


def test_channels_last_keeps_transposes_at_the_edges_only():
    """A ResNet-style stage with relu6, max pooling, a residual add and a classifier: after the
    layout change every conv is NHWC and the only transposes are the image's and the one before
    the flatten; the compiled model matches onnxruntime in both layouts."""
    from accelkit import frontend
    from accelkit.backends.cpu import to_channels_last

    rng = np.random.default_rng(11)
    nodes = [
        helper.make_node("Conv", ["x", "W1", "b1"], ["c1"], pads=[3, 3, 3, 3], strides=[2, 2]),
        helper.make_node("Clip", ["c1", "zero", "six"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["p1", "W2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Conv", ["r2", "W3", "b3"], ["c3"]),
        helper.make_node("Add", ["c3", "p1"], ["s"]),
        helper.make_node("Relu", ["s"], ["r3"]),
        helper.make_node("GlobalAveragePool", ["r3"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "Wf", "bf"], ["y"], transB=1),
    ]
    inits = [const("W1", rng.standard_normal((16, 3, 7, 7)) * 0.1), const("b1", rng.standard_normal(16)),
             const("W2", rng.standard_normal((16, 16, 3, 3)) * 0.1), const("b2", rng.standard_normal(16)),
             const("W3", rng.standard_normal((16, 16, 1, 1)) * 0.1), const("b3", rng.standard_normal(16)),
             const("Wf", rng.standard_normal((5, 16))), const("bf", rng.standard_normal(5)),
             const("zero", 0.0), const("six", 6.0)]
    proto = make_model(nodes, [helper.make_tensor_value_info("x", F, [2, 3, 32, 32])],
                       [helper.make_tensor_value_info("y", F, [2, 5])], inits)
    mod = frontend.to_relax(frontend.prepare(proto))
    assert _ops(mod).get("relax.permute_dims", 0) == 0
    nhwc = to_channels_last(mod)
    ops = _ops(nhwc)
    assert ops["relax.permute_dims"] == 2 and ops["relax.clip"] == 1, ops
    assert "relax.maximum" not in ops and "relax.minimum" not in ops  # the clip came back
    check(proto, {"cpu.conv2d_nhwc_bias_clip": 1, "cpu.conv2d_nhwc_bias_relu": 1,
                  "cpu.conv2d_nhwc_bias_add_pre_relu": 1, "cpu.dense_bias": 1})
    check(proto, {"cpu.conv2d_bias_clip": 1, "cpu.conv2d_bias_relu": 1,
                  "cpu.conv2d_bias_add_pre_relu": 1, "cpu.dense_bias": 1}, layout="nchw")


def test_unknown_layout_option_is_refused_with_the_choices():
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    proto = make_model(nodes, [helper.make_tensor_value_info("x", F, [1, 4])],
                       [helper.make_tensor_value_info("y", F, [1, 4])], [])
    with pytest.raises(accelkit.OptionError, match="layout='nchwc' .* choose 'nhwc' or 'nchw'"):
        accelkit.compile(proto, cache=False, layout="nchwc")


def test_winograd_convolutions_match_and_can_be_turned_off():
    """3x3 stride-1 convs wide enough to pay run as Winograd F(4x4, 3x3) by default: the same
    fused names and outputs within 1e-5 of onnxruntime, not bit-identical to the GEMM path that
    winograd='off' keeps; the narrow first conv (3 channels) and the stride-2 one stay GEMMs."""
    rng = np.random.default_rng(13)
    nodes = [
        helper.make_node("Conv", ["x", "W1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "W2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Conv", ["r2", "W3", "b3"], ["c3"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c3", "r2"], ["s"]),
        helper.make_node("Conv", ["s", "W4", "b4"], ["y"], pads=[1, 1, 1, 1], strides=[2, 2]),
    ]
    inits = [const("W1", rng.standard_normal((16, 3, 3, 3)) * 0.3), const("b1", rng.standard_normal(16)),
             const("W2", rng.standard_normal((32, 16, 3, 3)) * 0.1), const("b2", rng.standard_normal(32)),
             const("W3", rng.standard_normal((32, 32, 3, 3)) * 0.1), const("b3", rng.standard_normal(32)),
             const("W4", rng.standard_normal((8, 32, 3, 3)) * 0.1), const("b4", rng.standard_normal(8))]
    proto = make_model(nodes, [helper.make_tensor_value_info("x", F, [2, 3, 18, 21])],
                       [helper.make_tensor_value_info("y", F, [2, 8, 9, 11])], inits)
    expected = {"cpu.conv2d_nhwc_bias_relu": 2, "cpu.conv2d_nhwc_bias_add": 1, "cpu.conv2d_nhwc_bias": 1}
    wino = check(proto, expected)
    gemm = check(proto, expected, winograd="off")
    feeds = {"x": rng.standard_normal((2, 3, 18, 21)).astype(np.float32)}
    a, b = wino.run(feeds)[0], gemm.run(feeds)[0]
    assert relative_l2(a, b) < 1e-5 and not np.array_equal(a, b)
    with pytest.raises(accelkit.OptionError, match="winograd='on' .* choose 'auto' or 'off'"):
        accelkit.compile(proto, cache=False, winograd="on")


def test_sum_of_a_residual_is_added_and_a_failing_layout_pass_falls_back(monkeypatch, caplog):
    """Old ResNet exports sum the residual with ONNX Sum, which TVM imports as stack + sum: the
    frontend makes it Adds (three inputs, broadcasting), so the layout pass follows it and the
    add fuses into the conv. If TVM's layout pass fails anyway, the model compiles NCHW."""
    rng = np.random.default_rng(12)
    nodes = [helper.make_node("Conv", ["x", "W", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Sum", ["c", "x", "bias"], ["s"]),
             helper.make_node("Relu", ["s"], ["y"])]
    inits = [const("W", rng.standard_normal((4, 4, 3, 3)) * 0.2), const("b", rng.standard_normal(4)),
             const("bias", rng.standard_normal((4, 1, 1)))]
    proto = make_model(nodes, [helper.make_tensor_value_info("x", F, [1, 4, 6, 6])],
                       [helper.make_tensor_value_info("y", F, [1, 4, 6, 6])], inits)
    model = check(proto, {"cpu.conv2d_nhwc_bias_add": 1})  # the constant joins the bias add
    assert model.manifest["offloaded"]

    from tvm import relax

    def broken(*args, **kwargs):
        raise RuntimeError("Invalid SLayout (injected)")

    monkeypatch.setattr(relax.transform, "ConvertLayout", broken)
    with caplog.at_level("WARNING", logger="accelkit"):
        check(proto, {"cpu.conv2d_bias_add": 1})
    assert "channels-last conversion failed (RuntimeError: Invalid SLayout (injected))" in caplog.text
