"""The ONNX frontend: loading errors, static shapes, ONNX-side normalisation (folding, If inlining,
RNN expansion) checked against onnxruntime, the unsupported-op report, and import into TVM."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from accelkit.errors import InputShapeError, ModelLoadError, UnsupportedModelError
from accelkit.frontend import (
    MAX_OPSET, Graph, TensorSpec, check_supported, load_model, prepare, to_relax, tvm_supported_ops,
)

ort = pytest.importorskip("onnxruntime")

LIGHT_DIR = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
LIGHT_MODELS = sorted(f for f in os.listdir(LIGHT_DIR) if f.endswith(".onnx")) if os.path.isdir(LIGHT_DIR) else []
F32 = TensorProto.FLOAT


def make_model(nodes, inputs, outputs, initializers=(), opset=17, extra_opsets=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in extra_opsets]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    # outputs declared without a shape get the inferred one (onnx.checker wants a shape field)
    inferred = {o.name: o.type for o in onnx.shape_inference.infer_shapes(model).graph.output}
    for o in model.graph.output:
        if not o.type.tensor_type.HasField("shape"):
            if inferred[o.name].tensor_type.HasField("shape"):
                o.type.CopyFrom(inferred[o.name])
            else:
                o.type.tensor_type.shape.SetInParent()
    return model


def vi(name, shape, elem=F32):
    return helper.make_tensor_value_info(name, elem, shape)


def init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def run_ort(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def assert_same_as_original(model, graph: Graph, feeds, atol=1e-5):
    want = run_ort(model, feeds)
    got = run_ort(graph.proto, feeds)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=atol)


def op_types(graph: Graph) -> set[str]:
    return {n.op_type for n in graph.proto.graph.node}


def run_tvm(graph: Graph, feeds):
    tvm = pytest.importorskip("tvm")
    from tvm import relax

    mod = to_relax(graph)
    target = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu",
                                "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(feeds[s.name], tvm.cpu()) for s in graph.inputs])
    return [out.numpy()] if hasattr(out, "numpy") else [o.numpy() for o in out]


# --------------------------------------------------------------------------- load_model

@pytest.fixture
def add_model():
    return make_model([helper.make_node("Add", ["x", "x"], ["y"], name="add")], [vi("x", [2, 3])], [vi("y", [2, 3])])


def test_load_from_path_bytes_and_proto(tmp_path, add_model):
    path = tmp_path / "m.onnx"
    onnx.save(add_model, path)
    for source in (path, str(path), add_model.SerializeToString(), add_model):
        m = load_model(source)
        assert [n.op_type for n in m.graph.node] == ["Add"]
    assert load_model(add_model) is not add_model  # the caller's proto is never mutated


def test_load_external_data(tmp_path):
    w = np.arange(4096, dtype=np.float32).reshape(64, 64)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [vi("x", [1, 64])], [vi("y", [1, 64])], [init("w", w)])
    path = tmp_path / "ext.onnx"
    onnx.save(model, path, save_as_external_data=True, location="ext.data", size_threshold=0)
    assert (tmp_path / "ext.data").exists()
    m = load_model(path)
    np.testing.assert_array_equal(numpy_helper.to_array(m.graph.initializer[0]), w)
    (tmp_path / "ext.data").unlink()
    with pytest.raises(ModelLoadError, match="external data"):
        load_model(path)


def test_load_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist") as e:
        load_model(tmp_path / "nope.onnx")
    assert "nope.onnx" in str(e.value)


def test_load_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="is a directory") as e:
        load_model(tmp_path)
    assert str(tmp_path) in str(e.value)


@pytest.mark.parametrize("content", [
    b"hello, this is a text file\nnot a model\n",
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10\x00\x00\x00\x10\x08\x06\x00\x00\x00\x1f\xf3\xffa",
    b"",
], ids=["text", "png", "empty"])
def test_load_not_onnx(tmp_path, content):
    path = tmp_path / "notamodel.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match="not (a readable ONNX|an ONNX) model") as e:
        load_model(path)
    assert "notamodel.onnx" in str(e.value)
    assert "Traceback" not in str(e.value)


def test_load_truncated(tmp_path):
    w = np.ones((32, 32), np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [vi("x", [1, 32])], [vi("y", [1, 32])], [init("w", w)])
    data = model.SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError) as e:
        load_model(path)
    assert "cut.onnx" in str(e.value) and "re-export" in str(e.value)


def test_load_fails_checker(tmp_path):
    bad = make_model([helper.make_node("Add", ["x", "undefined_input"], ["y"], name="add")], [vi("x", [2])], [vi("y", [2])])
    path = tmp_path / "bad.onnx"
    path.write_bytes(bad.SerializeToString())
    with pytest.raises(ModelLoadError, match="onnx.checker") as e:
        load_model(path)
    assert "bad.onnx" in str(e.value)
    with pytest.raises(ModelLoadError, match="onnx.checker"):
        load_model(bad)


def test_load_wrong_type():
    with pytest.raises(ModelLoadError, match="int"):
        load_model(42)


# --------------------------------------------------------------------------- input shapes

def test_static_specs_and_initializer_inputs(add_model):
    w = init("w", np.ones((2, 3), np.float32))
    model = make_model([helper.make_node("Add", ["x", "w"], ["y"])], [vi("x", [2, 3]), vi("w", [2, 3])],
                       [vi("y", None)], [w])
    g = prepare(model)
    assert g.inputs == [TensorSpec("x", (2, 3), "float32")]  # the initializer is not an input
    assert g.outputs == [TensorSpec("y", (2, 3), "float32")]
    assert [i.name for i in g.proto.graph.input] == ["x"]


def test_symbolic_dim_error():
    model = make_model([helper.make_node("Relu", ["tokens"], ["y"])], [vi("tokens", ["batch", 16, "seq"])], [vi("y", None)])
    with pytest.raises(InputShapeError) as e:
        prepare(model)
    msg = str(e.value)
    assert "'tokens'" in msg and "dim 0" in msg and "'batch'" in msg and "dim 2" in msg and "'seq'" in msg
    assert "input_shapes={'tokens': [batch, 16, seq]}" in msg


def test_input_shapes_override_and_fix():
    model = make_model([helper.make_node("Relu", ["a"], ["y"]), helper.make_node("Neg", ["b"], ["z"])],
                       [vi("a", ["n", 4]), vi("b", [2, 5])], [vi("y", ["n", 4]), vi("z", [2, 5])])
    g = prepare(model, input_shapes={"a": [3, 4], "b": (7, 5)})
    assert g.inputs == [TensorSpec("a", (3, 4), "float32"), TensorSpec("b", (7, 5), "float32")]
    assert g.outputs == [TensorSpec("y", (3, 4), "float32"), TensorSpec("z", (7, 5), "float32")]
    b = np.random.rand(7, 5).astype(np.float32)
    (z,) = run_ort(g.proto, {"a": np.ones((3, 4), np.float32), "b": b})[1:]
    np.testing.assert_array_equal(z, -b)


def test_input_shapes_errors():
    model = make_model([helper.make_node("Relu", ["a"], ["y"])], [vi("a", ["n", 4])], [vi("y", None)])
    with pytest.raises(InputShapeError, match=r"\['bogus'\].*inputs are \['a'\]"):
        prepare(model, input_shapes={"a": [1, 4], "bogus": [1]})
    with pytest.raises(InputShapeError, match="rank 3.*rank 2"):
        prepare(model, input_shapes={"a": [1, 4, 1]})


# --------------------------------------------------------------------------- folding

def test_shape_chain_folds_to_constant_reshape():
    # y = Reshape(x, [x.shape[0], -1]) built the way exporters do: Shape->Gather->Unsqueeze->Concat
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "axes0"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus1"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["r"]),
        helper.make_node("Relu", ["r"], ["y"]),
    ]
    inits = [init("zero", np.array(0, np.int64)), init("axes0", np.array([0], np.int64)), init("minus1", np.array([-1], np.int64))]
    model = make_model(nodes, [vi("x", ["N", 3, 4, 5])], [vi("y", ["N", "M"])], inits)
    g = prepare(model, {"x": [2, 3, 4, 5]})
    assert op_types(g) == {"Reshape", "Relu"}
    reshape = next(n for n in g.proto.graph.node if n.op_type == "Reshape")
    consts = {i.name: numpy_helper.to_array(i) for i in g.proto.graph.initializer}
    np.testing.assert_array_equal(consts[reshape.input[1]], [2, -1])
    assert g.outputs == [TensorSpec("y", (2, 60), "float32")]
    x = np.random.randn(2, 3, 4, 5).astype(np.float32)
    assert_same_as_original(model, g, {"x": x})
    np.testing.assert_allclose(run_tvm(g, {"x": x})[0], np.maximum(x.reshape(2, -1), 0), rtol=1e-6)


def test_constant_of_shape_expand_range_pad_fold():
    # BERT-style mask: ConstantOfShape(Shape(x)) and Expand/Range/Pad with computed arguments
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("ConstantOfShape", ["s"], ["ones"], value=helper.make_tensor("v", F32, [1], [1.0])),
        helper.make_node("Shape", ["x"], ["s2"], start=1),
        helper.make_node("Squeeze", ["s2"], ["len"]),
        helper.make_node("Range", ["zero_i", "len", "one_i"], ["pos"]),
        helper.make_node("Cast", ["pos"], ["posf"], to=F32),
        helper.make_node("Expand", ["posf", "s"], ["pos2d"]),
        helper.make_node("Mul", ["x", "ones"], ["xo"]),
        helper.make_node("Add", ["xo", "pos2d"], ["sum"]),
        helper.make_node("Concat", ["zeros2", "zeros1", "s2"], ["pads"], axis=0),  # [0, 0, 0, len]
        helper.make_node("Pad", ["sum", "pads"], ["y"]),
    ]
    inits = [init("zero_i", np.array(0, np.int64)), init("one_i", np.array(1, np.int64)),
             init("zeros2", np.zeros(2, np.int64)), init("zeros1", np.zeros(1, np.int64))]
    model = make_model(nodes, [vi("x", ["b", "t"])], [vi("y", None)], inits)
    g = prepare(model, {"x": [2, 6]})
    assert op_types(g) == {"Mul", "Add", "Pad"}
    assert not op_types(g) & {"Shape", "ConstantOfShape", "Range", "Expand", "Concat"}
    assert g.outputs == [TensorSpec("y", (2, 12), "float32")]
    x = np.random.randn(2, 6).astype(np.float32)
    assert_same_as_original(model, g, {"x": x})
    want = np.pad(x + np.arange(6, dtype=np.float32), [(0, 0), (0, 6)])
    np.testing.assert_allclose(run_tvm(g, {"x": x})[0], want, rtol=1e-6)


def test_fold_size_cap_keeps_big_constants_as_ops():
    from accelkit.frontend import fold

    shape = init("shape", np.array([2048, 1024], np.int64))  # 2M elements > cap
    model = make_model([helper.make_node("ConstantOfShape", ["shape"], ["big"]),
                        helper.make_node("ReduceSum", ["big"], ["y"], keepdims=0)],
                       [], [vi("y", [])], [shape])
    out = fold.fold_to_fixpoint(model)
    assert "ConstantOfShape" in {n.op_type for n in out.graph.node}
    assert all(np.prod(i.dims) <= fold.FOLD_LIMIT_ELEMENTS for i in out.graph.initializer)


def _if_model(threshold: int):
    # cond = x.shape[1] > threshold ; then: x * 2 + c_then ; else: x - 1 (branch names shadow nothing)
    then_g = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["t0"]), helper.make_node("Add", ["t0", "c_then"], ["out_then"])],
        "then", [], [vi("out_then", None)], [init("c_then", np.array(0.5, np.float32))])
    else_g = helper.make_graph([helper.make_node("Sub", ["x", "one_f"], ["out_else"])], "else", [], [vi("out_else", None)])
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "one_i"], ["d1"], axis=0),
        helper.make_node("Greater", ["d1", "thr"], ["cond"]),
        helper.make_node("If", ["cond"], ["branch_out"], then_branch=then_g, else_branch=else_g, name="the_if"),
        helper.make_node("Relu", ["branch_out"], ["y"]),
    ]
    inits = [init("one_i", np.array(1, np.int64)), init("thr", np.array(threshold, np.int64)),
             init("two", np.array(2, np.float32)), init("one_f", np.array(1, np.float32))]
    return make_model(nodes, [vi("x", ["n", "m"])], [vi("y", None)], inits)


@pytest.mark.parametrize("threshold,branch", [(3, "then"), (10, "else")])
def test_if_on_constant_is_inlined(threshold, branch):
    model = _if_model(threshold)
    g = prepare(model, {"x": [2, 5]})
    assert "If" not in op_types(g) and "Shape" not in op_types(g)
    assert ("Mul" in op_types(g)) == (branch == "then")
    x = np.random.randn(2, 5).astype(np.float32)
    assert_same_as_original(model, g, {"x": x})
    want = np.maximum(x * 2 + 0.5 if branch == "then" else x - 1, 0)
    np.testing.assert_allclose(run_ort(g.proto, {"x": x})[0], want, rtol=1e-6)
    if branch == "then":
        np.testing.assert_allclose(run_tvm(g, {"x": x})[0], want, rtol=1e-6)


# --------------------------------------------------------------------------- RNN expansion

def _rnn_model(kind, seq=4, batch=3, inp=5, hidden=6, direction="forward", layout=0, bias=True,
               init_state=True, peephole=False, seed=0, **attrs):
    rng = np.random.default_rng(seed)
    G = {"LSTM": 4, "GRU": 3, "RNN": 1}[kind]
    D = 2 if direction == "bidirectional" else 1
    inits = [init("W", rng.standard_normal((D, G * hidden, inp)).astype(np.float32) * 0.5),
             init("R", rng.standard_normal((D, G * hidden, hidden)).astype(np.float32) * 0.5)]
    names = ["X", "W", "R", "B" if bias else "", "", "", "", ""]
    if bias:
        inits.append(init("B", rng.standard_normal((D, 2 * G * hidden)).astype(np.float32) * 0.5))
    state_shape = [batch, D, hidden] if layout else [D, batch, hidden]
    inputs = [vi("X", [batch, seq, inp] if layout else [seq, batch, inp])]
    if init_state:
        names[5] = "h0"
        inputs.append(vi("h0", state_shape))
        if kind == "LSTM":
            names[6] = "c0"
            inputs.append(vi("c0", state_shape))
    if peephole:
        names[7] = "P"
        inits.append(init("P", rng.standard_normal((D, 3 * hidden)).astype(np.float32) * 0.5))
    while names and names[-1] == "":
        names.pop()
    outs = ["Y", "Y_h", "Y_c"] if kind == "LSTM" else ["Y", "Y_h"]
    node = helper.make_node(kind, names, outs, name=f"my_{kind.lower()}", hidden_size=hidden,
                            direction=direction, layout=layout, **attrs)
    model = make_model([node], inputs, [vi(o, None) for o in outs], inits, opset=14)
    feeds = {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
             for i in inputs}
    return model, feeds


def _rnn_reference(kind, model, feeds, kwargs):
    """onnxruntime's result; ORT has no layout=1, so then run the same weights with layout=0 on
    transposed inputs and transpose the outputs back."""
    if not kwargs.get("layout"):
        return run_ort(model, feeds)
    model0, _ = _rnn_model(kind, **{**kwargs, "layout": 0})
    outs = run_ort(model0, {k: v.transpose(1, 0, 2) for k, v in feeds.items()})
    return [outs[0].transpose(2, 0, 1, 3)] + [o.transpose(1, 0, 2) for o in outs[1:]]


RNN_CASES = [
    ("LSTM", {}),
    ("LSTM", {"direction": "reverse", "peephole": True}),
    ("LSTM", {"direction": "bidirectional", "layout": 1, "init_state": False}),
    ("LSTM", {"direction": "bidirectional", "clip": 0.7, "bias": False}),
    ("GRU", {}),
    ("GRU", {"linear_before_reset": 1, "direction": "bidirectional"}),
    ("GRU", {"linear_before_reset": 1, "direction": "reverse", "layout": 1, "bias": False}),
    ("GRU", {"activations": ["Relu", "Sigmoid"], "init_state": False}),
    ("RNN", {"direction": "bidirectional", "activations": ["Relu", "Tanh"]}),
    ("RNN", {"layout": 1, "clip": 0.5}),
]


@pytest.mark.parametrize("kind,kwargs", RNN_CASES, ids=[f"{k}-{'-'.join(f'{a}={v}' for a, v in kw.items()) or 'default'}" for k, kw in RNN_CASES])
def test_rnn_expansion_matches_onnxruntime(kind, kwargs):
    model, feeds = _rnn_model(kind, **kwargs)
    g = prepare(model)
    assert not op_types(g) & {"LSTM", "GRU", "RNN"}
    assert op_types(g) <= {"MatMul", "Add", "Mul", "Sub", "Slice", "Gather", "Sigmoid", "Tanh", "Relu", "Clip",
                           "Concat", "Reshape", "Transpose", "Identity", "Squeeze"}
    assert [o.name for o in g.outputs] == [o.name for o in model.graph.output]
    want = _rnn_reference(kind, model, feeds, kwargs)
    got = run_ort(g.proto, feeds)
    for spec, w, x in zip(g.outputs, want, got):
        assert spec.shape == w.shape == x.shape
        np.testing.assert_allclose(x, w, rtol=1e-5, atol=1e-5)
    assert float(np.abs(want[0]).max()) > 0.05  # the check compares real values


def test_rnn_expansion_compiles_with_tvm():
    model, feeds = _rnn_model("LSTM", seq=3, direction="bidirectional", peephole=True)
    g = prepare(model)
    want = run_ort(model, feeds)
    got = run_tvm(g, feeds)
    assert len(got) == 3
    for x, w in zip(got, want):
        np.testing.assert_allclose(x, w, rtol=1e-5, atol=1e-5)


def test_unexpandable_rnn_is_kept_and_reported():
    model, feeds = _rnn_model("LSTM", activations=["Sigmoid", "Tanh", "Affine"], activation_alpha=[2.0], activation_beta=[0.5])
    g = prepare(model)
    assert "LSTM" in op_types(g)  # kept as is: still computes the right thing elsewhere
    assert_same_as_original(model, g, feeds)
    with pytest.raises(UnsupportedModelError) as e:
        to_relax(g)
    assert "ai.onnx::LSTM" in str(e.value) and "my_lstm" in str(e.value) and "activation_alpha" in str(e.value)
    assert e.value.unsupported == [("ai.onnx", "LSTM", "my_lstm")]


def _runtime_if_model(hidden=4):
    """silero-vad's pattern: If(flag == 1) on a run-time input, each branch a whole model with
    Shape->Gather->Concat chains (Reshape argument), an If on a shape check, Constant weights and
    an LSTM / GRU. Both branches use the same local names (as exporters that inline submodules do)."""
    rng = np.random.default_rng(3)

    def const(name, array):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(array, np.float32)))

    def branch(kind, tag):
        G = {"LSTM": 4, "GRU": 3}[kind]
        check_then = helper.make_graph([helper.make_node("Identity", ["x"], ["chk_t"])], "chk_then", [], [vi("chk_t", None)])
        check_else = helper.make_graph([helper.make_node("Neg", ["x"], ["chk_e"])], "chk_else", [], [vi("chk_e", None)])
        nodes = [
            const("w", rng.standard_normal((1, G * hidden, 5)) * 0.5),
            const("r", rng.standard_normal((1, G * hidden, hidden)) * 0.5),
            const("b", rng.standard_normal((1, 2 * G * hidden)) * 0.5),
            helper.make_node("Shape", ["x"], ["sh"]),
            helper.make_node("Gather", ["sh", "i1"], ["batch"], axis=0),  # scalar
            helper.make_node("Equal", ["batch", "i2"], ["is2"]),
            helper.make_node("If", ["is2"], ["xi"], then_branch=check_then, else_branch=check_else, name="shape_check"),
            helper.make_node(kind, ["xi", "w", "r", "b"], ["y_all", "y_h"], hidden_size=hidden, name="rec"),
            helper.make_node("Gather", ["sh", "i0"], ["seq"], axis=0),
            helper.make_node("Unsqueeze", ["seq", "i0_1d"], ["seq_1d"]),
            helper.make_node("Concat", ["seq_1d", "minus1"], ["new_shape"], axis=0),
            helper.make_node("Reshape", ["y_all", "new_shape"], [f"out_{tag}"]),
        ]
        return helper.make_graph(nodes, f"{tag}_branch", [], [vi(f"out_{tag}", None)])

    nodes = [helper.make_node("Equal", ["flag", "one"], ["cond"]),
             helper.make_node("If", ["cond"], ["picked"], then_branch=branch("LSTM", "then"),
                              else_branch=branch("GRU", "else"), name="rate_if"),
             helper.make_node("Relu", ["picked"], ["y"])]
    inits = [init("one", np.array(1, np.int64)), init("i0", np.array(0, np.int64)), init("i1", np.array(1, np.int64)),
             init("i2", np.array(2, np.int64)), init("i0_1d", np.array([0], np.int64)),
             init("minus1", np.array([-1], np.int64))]
    return make_model(nodes, [vi("x", ["seq", 2, 5]), vi("flag", [], TensorProto.INT64)], [vi("y", ["seq", 2 * hidden])],
                      inits, opset=14)


def _all_nodes(graph):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                yield from _all_nodes(sub)


def test_runtime_if_branches_are_normalised():
    model = _runtime_if_model()
    g = prepare(model, {"x": [3, 2, 5]})
    ops = [n.op_type for n in _all_nodes(g.proto.graph)]
    assert ops.count("If") == 1  # the data-dependent one stays; the shape check inside is inlined
    branches = [a.g for a in next(n for n in g.proto.graph.node if n.op_type == "If").attribute]
    in_branches = {n.op_type for b in branches for n in _all_nodes(b)}
    assert not in_branches & {"LSTM", "GRU", "Shape", "Gather", "Constant", "Equal", "If"}
    outputs = [o for n in _all_nodes(g.proto.graph) for o in n.output if o]
    assert len(outputs) == len(set(outputs))  # no name shadows another scope's
    assert g.outputs[0].shape == (3, 8)
    x = np.random.default_rng(0).standard_normal((3, 2, 5)).astype(np.float32)
    tvm = pytest.importorskip("tvm")
    from tvm import relax

    target = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu",
                                "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    vm = relax.VirtualMachine(tvm.compile(to_relax(g), target=target), tvm.cpu())
    results = []
    for flag in (1, 0):
        feeds = {"x": x, "flag": np.array(flag, np.int64)}
        assert_same_as_original(model, g, feeds)
        want = run_ort(model, feeds)[0]
        got = vm["main"](*[tvm.runtime.tensor(feeds[s.name], tvm.cpu()) for s in g.inputs]).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        results.append(want)
    assert not np.allclose(results[0], results[1])  # the two branches really differ


def test_lstm_of_wrong_rank_in_runtime_branch_is_reported():
    model = _runtime_if_model()
    branch = next(a.g for a in model.graph.node[1].attribute if a.name == "then_branch")  # LSTM fed 4-D
    k = next(k for k, n in enumerate(branch.node) if n.op_type == "LSTM")
    branch.node.insert(k, helper.make_node("Unsqueeze", ["xi", "i0_1d"], ["xi4"]))
    branch.node[k + 1].input[0] = "xi4"
    g = prepare(model, {"x": [3, 2, 5]})
    with pytest.raises(UnsupportedModelError) as e:
        to_relax(g)
    assert "ai.onnx::LSTM (1 node: rec" in str(e.value) and "4-D" in str(e.value)


# --------------------------------------------------------------------------- supported-op check

def test_unsupported_ops_listed_at_once():
    nodes = [
        helper.make_node("FusedConv", ["x", "w"], ["a"], name="fused1", domain="com.microsoft"),
        helper.make_node("FusedConv", ["a", "w"], ["b"], name="fused2", domain="com.microsoft"),
        helper.make_node("Det", ["m"], ["d"], name="det0"),
        helper.make_node("Relu", ["b"], ["y"], name="ok_relu"),
        helper.make_node("Col2Im", ["cols", "isz", "bsz"], ["im"], name="c2i"),
    ]
    model = make_model(nodes, [vi("x", [1, 1, 4, 4]), vi("m", [3, 3]), vi("cols", [1, 4, 9])],
                       [vi("y", None), vi("d", None), vi("im", None)],
                       [init("w", np.ones((1, 1, 1, 1), np.float32)), init("isz", np.array([4, 4], np.int64)),
                        init("bsz", np.array([2, 2], np.int64))], extra_opsets=[("com.microsoft", 1)])
    with pytest.raises(UnsupportedModelError) as e:
        check_supported(model, tvm_supported_ops())
    msg = str(e.value)
    assert "com.microsoft::FusedConv (2 nodes: fused1, fused2)" in msg
    assert "ai.onnx::Det (1 node: det0)" in msg and "ai.onnx::Col2Im (1 node: c2i)" in msg
    assert "Relu" not in msg and "3 op types" in msg
    assert sorted(e.value.unsupported) == sorted([("com.microsoft", "FusedConv", "fused1"), ("com.microsoft", "FusedConv", "fused2"),
                                                  ("ai.onnx", "Det", "det0"), ("ai.onnx", "Col2Im", "c2i")])
    # a non-TVM backend passes its own op set; contrib ops are named domain::op
    check_supported(model, {"Relu", "Det", "Col2Im", "com.microsoft::FusedConv"})


def test_unsupported_via_to_relax_and_inside_subgraph():
    then_g = helper.make_graph([helper.make_node("Det", ["m"], ["o1"], name="det_in_branch")], "t", [], [vi("o1", None)])
    else_g = helper.make_graph([helper.make_node("Identity", ["s"], ["o2"])], "e", [], [vi("o2", None)])
    nodes = [helper.make_node("ReduceSum", ["m"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["cond"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g, name="dyn_if")]
    model = make_model(nodes, [vi("m", [3, 3])], [vi("y", None)], [init("zero", np.array(0, np.float32))])
    g = prepare(model)
    assert "If" in op_types(g)  # condition depends on data: not inlined
    with pytest.raises(UnsupportedModelError, match="Det.*det_in_branch"):
        to_relax(g)


def test_opset_out_of_range():
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [2])], [vi("y", [2])], opset=6)
    with pytest.raises(UnsupportedModelError, match="opset 6.*convert_version"):
        check_supported(model, tvm_supported_ops())
    model.opset_import[0].version = MAX_OPSET + 1
    with pytest.raises(UnsupportedModelError, match=f"opset {MAX_OPSET + 1}"):
        check_supported(model, tvm_supported_ops())


# --------------------------------------------------------------------------- real models, hygiene

@pytest.mark.parametrize("name", LIGHT_MODELS)
def test_light_models_prepare_and_import(name):
    path = os.path.join(LIGHT_DIR, name)
    g = prepare(path)
    assert len(g.inputs) == 1 and g.inputs[0].shape == (1, 3, 224, 224)
    onnx.checker.check_model(g.proto)
    x = np.random.default_rng(0).random(g.inputs[0].shape, dtype=np.float32)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    want = sess.run(None, {g.inputs[0].name: x})
    got = run_ort(g.proto, {g.inputs[0].name: x})
    assert [o.shape for o in g.outputs] == [w.shape for w in want]
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
    mod = to_relax(g)
    params = mod["main"].params
    assert len(params) == 1 and [int(d) for d in params[0].ty.shape] == [1, 3, 224, 224]


def test_import_does_not_load_tvm_or_torch():
    code = "import sys, accelkit.frontend; print(sorted(m for m in ('tvm', 'torch', 'tvm_ffi') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == "[]"


def test_dropout_and_identity_are_removed():
    nodes = [helper.make_node("Dropout", ["x"], ["d", "mask"]), helper.make_node("Identity", ["d"], ["i"]),
             helper.make_node("Relu", ["i"], ["y"])]
    model = make_model(nodes, [vi("x", [2, 3])], [vi("y", [2, 3])], opset=9)
    g = prepare(model)
    assert op_types(g) == {"Relu"}
    x = np.random.randn(2, 3).astype(np.float32)
    assert_same_as_original(model, g, {"x": x})


# --------------------------------------------------------------------------- found by ONNX's backend tests
# (tests/test_onnx_backend.py): forms TVM's importer gets wrong, newer opsets, element types

def test_rnn_runtime_sequence_lens_match_onnxruntime():
    for kind in ("LSTM", "GRU"):
        model, feeds = _rnn_model(kind, seq=4, batch=3, direction="bidirectional")
        node = model.graph.node[0]
        node.input[4] = "lens"
        model.graph.input.append(vi("lens", [3], TensorProto.INT32))
        feeds["lens"] = np.array([4, 2, 1], np.int32)
        g = prepare(model)
        assert not op_types(g) & {"LSTM", "GRU"}
        want = run_ort(model, feeds)  # zeros past each sequence's end; Y_h at its last step
        for got in (run_ort(g.proto, feeds), run_tvm(g, feeds)):
            for x, w in zip(got, want):
                np.testing.assert_allclose(x, w, rtol=1e-5, atol=1e-5)
        assert not want[0][1:, :, 2].any() and want[0][0, :, 2].any()


def test_layer_norm_mean_and_inv_std_dev_outputs():
    node = helper.make_node("LayerNormalization", ["x", "scale", "bias"], ["y", "mean", "inv_std"],
                            axis=1, epsilon=1e-3)
    model = make_model([node], [vi("x", [2, 3, 4])], [vi("y", None), vi("mean", None), vi("inv_std", None)],
                       [init("scale", np.linspace(0.5, 1.5, 12, dtype=np.float32).reshape(3, 4)),
                        init("bias", np.full((3, 4), 0.25, np.float32))])
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    g = prepare(model)
    assert_same_as_original(model, g, {"x": x})
    want = run_ort(model, {"x": x})
    got = run_tvm(g, {"x": x})  # TVM's converter alone returns 0-d placeholders for mean/inv_std
    assert [o.shape for o in got] == [(2, 3, 4), (2, 1, 1), (2, 1, 1)]
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("data_shape,shape", [((3, 1), [2, 1, 6]), ((3, 1), [4]), ((2, 3), [2, 1, 1])])
def test_expand_to_a_runtime_shape(data_shape, shape):
    model = make_model([helper.make_node("Expand", ["x", "shape"], ["y"])],
                       [vi("x", list(data_shape)), vi("shape", [len(shape)], TensorProto.INT64)], [vi("y", None)])
    x = np.arange(np.prod(data_shape), dtype=np.float32).reshape(data_shape)
    feeds = {"x": x, "shape": np.array(shape, np.int64)}
    want = x * np.ones(shape, np.float32)
    g = prepare(model)
    assert_same_as_original(model, g, feeds)
    got = run_tvm(g, feeds)[0]  # TVM's converter alone takes a 1 in the shape literally
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def test_newer_opsets_accepted_when_their_ops_compute_the_same():
    x = vi("x", [1, 4, 2, 2])
    reshape = make_model([helper.make_node("Reshape", ["x", "s"], ["r"]), helper.make_node("Relu", ["r"], ["y"])],
                         [x], [vi("y", None)], [init("s", np.array([1, 16], np.int64))], opset=25)
    data = np.random.default_rng(0).standard_normal((1, 4, 2, 2)).astype(np.float32)
    np.testing.assert_allclose(run_tvm(prepare(reshape), {"x": data})[0], np.maximum(data, 0).reshape(1, 16))

    def space_to_depth(**attrs):
        return make_model([helper.make_node("SpaceToDepth", ["x"], ["y"], blocksize=2, name="s2d", **attrs)],
                          [x], [vi("y", None)], opset=28)

    check_supported(space_to_depth(), tvm_supported_ops())
    check_supported(space_to_depth(mode="DCR"), tvm_supported_ops())  # the new attribute's default
    with pytest.raises(UnsupportedModelError, match=r"SpaceToDepth \(1 node: s2d\).*version 28.*new attribute mode"
                       r"(.|\n)*opset_version <= 23") as e:
        check_supported(space_to_depth(mode="CRD"), tvm_supported_ops())
    assert e.value.unsupported == [("ai.onnx", "SpaceToDepth", "s2d")]


def test_element_types_tvm_cannot_compute_are_refused():
    model = make_model([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT8E4M3FN, name="to_f8")],
                       [vi("x", [2, 3])], [vi("y", None, TensorProto.FLOAT8E4M3FN)])
    with pytest.raises(UnsupportedModelError, match=r"float8e4m3fn: output 'y', Cast node 'to_f8'(.|\n)*"
                                                   r"backend='reference'") as e:
        to_relax(prepare(model))
    assert e.value.unsupported == [("ai.onnx", "element type float8e4m3fn", "")]


def test_runtime_values_tvm_needs_as_constants_are_refused():
    slice_model = make_model([helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["y"], name="cut")],
                             [vi("x", [4, 5]), vi("starts", [1], TensorProto.INT64)], [vi("y", None)],
                             [init("ends", np.array([3], np.int64)), init("axes", np.array([1], np.int64))])
    with pytest.raises(UnsupportedModelError, match=r"Slice node 'cut': input 'starts'\n.*initializers") as e:
        to_relax(prepare(slice_model))
    assert e.value.unsupported == [("ai.onnx", "Slice", "cut")]
    # TVM replaces a run-time max_output_boxes_per_class by 0 (no box, no error)
    nms = make_model([helper.make_node("NonMaxSuppression", ["boxes", "scores", "n"], ["sel"], name="nms")],
                     [vi("boxes", [1, 6, 4]), vi("scores", [1, 1, 6]), vi("n", [1], TensorProto.INT64)],
                     [vi("sel", None, TensorProto.INT64)])
    with pytest.raises(UnsupportedModelError, match="NonMaxSuppression node 'nms': input 'n'"):
        to_relax(prepare(nms))


def test_forms_tvm_computes_wrongly_are_refused():
    isinf = make_model([helper.make_node("IsInf", ["x"], ["y"], detect_negative=0, name="pos_inf")],
                       [vi("x", [4])], [vi("y", None, TensorProto.BOOL)])
    with pytest.raises(UnsupportedModelError, match="IsInf node 'pos_inf': detect_negative"):
        to_relax(prepare(isinf))
    # Dropout in inference mode (training_mode a constant False) stays fine
    dropout = make_model([helper.make_node("Dropout", ["x", "ratio", "train"], ["y"])], [vi("x", [4])],
                         [vi("y", None)], [init("ratio", np.array(0.5, np.float32)), init("train", np.array(False))])
    x = np.arange(4, dtype=np.float32)
    np.testing.assert_array_equal(run_tvm(prepare(dropout), {"x": x})[0], x)


def test_non_tensor_outputs_are_refused():
    graph = helper.make_graph([helper.make_node("SplitToSequence", ["x"], ["seq"], axis=0)], "g", [vi("x", [2, 3])],
                              [helper.make_tensor_sequence_value_info("seq", F32, [None, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(UnsupportedModelError, match="output 'seq' is a sequence, not a tensor"):
        prepare(model)
