"""accelkit.schedules: every rule computes what the unscheduled code did (vs numpy), the loops it
promises are really parallel / vectorized in the TIR, and a failing rule never breaks a compile."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import make_model

tvm = pytest.importorskip("tvm")

from accelkit import frontend, schedules  # noqa: E402
from accelkit.backends.base import host_target  # noqa: E402

RNG = np.random.default_rng(0)
TARGET = host_target(num_cores=2)  # parallel loops are wanted even on a 1-core test machine


def _vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def _legalized(model):
    """ONNX -> Relax -> the cpu_generic legalize passes (LegalizeOps ... FuseTIR)."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    mod = frontend.to_relax(frontend.prepare(model))
    with TARGET:
        return tvm.transform.Sequential(cpu_generic.legalize_passes(TARGET))(mod)


def _run(mod, feeds: list[np.ndarray], schedule_pass=None) -> tuple[list[np.ndarray], object]:
    """The intended pipeline with `schedule_pass` after FuseTIR; returns outputs and the module
    the schedule pass produced."""
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    with TARGET:
        if schedule_pass is not None:
            mod = schedule_pass(mod)
        scheduled = mod
        lowered = tvm.transform.Sequential(cpu_generic.dataflow_lower_passes(TARGET)
                                           + cpu_generic.finalize_passes(TARGET))(mod)
    vm = relax.VirtualMachine(relax.build(lowered, TARGET, relax_pipeline=None), tvm.cpu(0))
    out = vm["main"](*[tvm.runtime.tensor(x, tvm.cpu(0)) for x in feeds])
    outs = [out] if isinstance(out, tvm.runtime.Tensor) else list(out)
    return [o.numpy() for o in outs], scheduled


def _prim_funcs(mod) -> dict:
    from tvm import tirx

    return {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}


def _largest_buffer(func) -> int:
    """Elements of a PrimFunc's largest parameter buffer (a lower bound of its work)."""
    return max(int(np.prod([int(d) for d in p.ty.shape])) for p in func.params)


def _check(model, feeds, expected, *, parallel=True, vector=True, rtol=1e-5, atol=1e-5):
    """Scheduled outputs match numpy; every PrimFunc is marked scheduled and, when asked, has a
    parallel / vectorized loop."""
    mod = _legalized(model)
    outs, scheduled = _run(mod, feeds, schedules.default_schedule(TARGET))
    for got, want in zip(outs, expected if isinstance(expected, list) else [expected]):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)
    funcs = _prim_funcs(scheduled)
    assert funcs, "the graph produced no TVM-generated function"
    for name, func in funcs.items():
        text = func.script()
        assert schedules.is_scheduled(func), f"{name} not marked scheduled"
        if parallel and _largest_buffer(func) >= schedules.MIN_PARALLEL_WORK:
            assert "T.parallel(" in text, f"{name} has no parallel loop:\n{text}"
        if vector:
            assert "T.vectorized(" in text, f"{name} has no vectorized loop:\n{text}"
    return scheduled


def _unary_model(op, shape, out_shape, **attrs):
    return make_model([helper.make_node(op, ["x"], ["y"], **attrs)], [_vi("x", shape)],
                      [_vi("y", out_shape)])


def test_elementwise():
    x = RNG.standard_normal((32, 64, 64)).astype("float32")
    _check(_unary_model("Exp", x.shape, x.shape), [x], np.exp(x))


def test_fused_elementwise_chain_is_one_parallel_vector_loop():
    x = RNG.standard_normal((32, 64, 64)).astype("float32")
    nodes = [helper.make_node("Mul", ["x", "x"], ["a"]), helper.make_node("Tanh", ["a"], ["b"]),
             helper.make_node("Sigmoid", ["b"], ["c"]), helper.make_node("Add", ["c", "x"], ["y"])]
    model = make_model(nodes, [_vi("x", x.shape)], [_vi("y", x.shape)])
    scheduled = _check(model, [x], 1 / (1 + np.exp(-np.tanh(x * x))) + x)
    (func,) = _prim_funcs(scheduled).values()
    assert func.script().count("T.parallel(") == 1  # the chain was inlined into one loop nest


def test_broadcast_add():
    x = RNG.standard_normal((32, 64, 64)).astype("float32")
    b = RNG.standard_normal(64).astype("float32")
    model = make_model([helper.make_node("Add", ["x", "b"], ["y"])], [_vi("x", x.shape)],
                       [_vi("y", x.shape)], [numpy_helper.from_array(b, "b")])
    _check(model, [x], x + b)


def test_transpose():
    x = RNG.standard_normal((16, 96, 64)).astype("float32")
    want = x.transpose(0, 2, 1)
    _check(_unary_model("Transpose", x.shape, want.shape, perm=[0, 2, 1]), [x], want)


@pytest.mark.parametrize("shape", [(1, 32, 32, 64), (2, 20, 24, 48)])
def test_nhwc_to_nchw_transpose_is_tiled(shape):
    """The lanes of an output vector read a strided column of the input: the source axis is split
    into tiles of the vector width and run just outside the vector loop, so a tile's source lines
    stay in L1 (untiled: a new line per lane, 2 GB/s on a 3 MB NHWC -> NCHW copy)."""
    import re

    x = RNG.standard_normal(shape).astype("float32")
    want = x.transpose(0, 3, 1, 2)
    scheduled = _check(_unary_model("Transpose", x.shape, want.shape, perm=[0, 3, 1, 2]), [x], want)
    (func,) = _prim_funcs(scheduled).values()
    text = func.script()
    tile = re.search(r"for (\w+) in T\.serial\(T\.int64\((\d+)\)\):\s+for \w+ in T\.vectorized\(T\.int64\((\d+)\)\)",
                     text) or re.search(r"T\.grid\(.*T\.int64\((\d+)\)\):\s+for \w+ in T\.vectorized\(T\.int64\((\d+)\)\)", text)
    assert tile, f"no serial tile loop right outside the vector loop:\n{text}"
    sizes = tile.groups()[-2:]
    assert sizes[0] == sizes[1], f"tile {sizes[0]} x vector {sizes[1]}:\n{text}"
    # the tile loop walks the input's innermost (channel) axis
    assert re.search(r"= T\.axis\.spatial\(T\.int64\(%d\), [^\n]*\* T\.int64\(%s\) \+ \w+\)\n"
                     % (shape[3], sizes[0]), text), text



def test_attention_key_transpose_with_its_reshape_is_tiled():
    """Attention's K^T: [s, h * d] reshaped to [s, h, d] and transposed to [h, d, s]. After FuseTIR
    the read index is `h * 32 + d`; d is still the input's unit-stride iter, so it is tiled by the
    vector width (untiled it ran 27.6 us, tiled 15.7 us on all-MiniLM-L6-v2's 128 x 384)."""
    import re

    seq, heads, dim = 64, 4, 32
    x = RNG.standard_normal((1, seq, heads * dim)).astype("float32")
    want = x.reshape(1, seq, heads, dim).transpose(0, 2, 3, 1)
    shape = helper.make_tensor("shape", TensorProto.INT64, [4], [1, seq, heads, dim])
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"]),
             helper.make_node("Transpose", ["r"], ["y"], perm=[0, 2, 3, 1])]
    graph = helper.make_graph(nodes, "key_t", [_vi("x", list(x.shape))], [_vi("y", list(want.shape))],
                              [shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    scheduled = _check(model, [x], want, parallel=False)
    (func,) = _prim_funcs(scheduled).values()
    text = func.script()
    # the d axis is split into tiles of the vector width: d = d_0 * lanes + d_1
    match = re.search(r"v1 = T\.axis\.spatial\(T\.int64\(%d\), \w+ \* T\.int64\((\d+)\) \+ \w+\)" % dim, text)
    assert match, f"the d axis is not tiled:\n{text}"
    vector = re.search(r"T\.vectorized\(T\.int64\((\d+)\)\)", text)
    assert vector and vector.group(1) == match.group(1), text

def test_gather_int64_indices():
    data = RNG.standard_normal((500, 64)).astype("float32")
    idx = RNG.integers(0, 500, (32, 64)).astype("int64")
    model = make_model([helper.make_node("Gather", ["data", "idx"], ["y"], axis=0)],
                       [_vi("idx", idx.shape, TensorProto.INT64)], [_vi("y", [32, 64, 64])],
                       [numpy_helper.from_array(data, "data")])
    _check(model, [idx], data[idx])


def test_concat_and_pad():
    a = RNG.standard_normal((16, 32, 64)).astype("float32")
    b = RNG.standard_normal((16, 48, 64)).astype("float32")
    pads = numpy_helper.from_array(np.array([0, 1, 0, 0, 2, 0], "int64"), "pads")
    nodes = [helper.make_node("Concat", ["a", "b"], ["c"], axis=1),
             helper.make_node("Relu", ["c"], ["r"]),  # keeps pad out of concat's function
             helper.make_node("Pad", ["r", "pads"], ["y"])]
    want = np.pad(np.maximum(np.concatenate([a, b], 1), 0), [(0, 0), (1, 2), (0, 0)])
    model = make_model(nodes, [_vi("a", a.shape), _vi("b", b.shape)], [_vi("y", want.shape)],
                       [pads])
    _check(model, [a, b], want)


@pytest.mark.parametrize("op, fn", [("ReduceSum", np.sum), ("ReduceMax", np.max),
                                    ("ReduceMean", np.mean)])
@pytest.mark.parametrize("axis", [-1, 1])
def test_reductions(op, fn, axis):
    x = RNG.standard_normal((32, 48, 64)).astype("float32")
    axes = numpy_helper.from_array(np.array([axis], "int64"), "axes")
    if op == "ReduceSum":
        node = helper.make_node(op, ["x", "axes"], ["y"], keepdims=0)
        inits = [axes]
    else:  # opset 17: axes is an attribute of ReduceMax/ReduceMean
        node = helper.make_node(op, ["x"], ["y"], axes=[axis], keepdims=0)
        inits = []
    want = fn(x, axis=axis)
    model = make_model([node], [_vi("x", x.shape)], [_vi("y", want.shape)], inits)
    # reducing the middle axis: the output's last (contiguous) axis is vectorized across the
    # reduction; reducing the last axis: the reduction reads contiguously, stays scalar
    _check(model, [x], want, vector=(axis == 1))


def test_max_pool2d():
    x = RNG.standard_normal((1, 32, 64, 64)).astype("float32")
    model = _unary_model("MaxPool", x.shape, [1, 32, 32, 32], kernel_shape=[3, 3],
                         strides=[2, 2], pads=[1, 1, 1, 1])
    padded = np.pad(x, [(0, 0), (0, 0), (1, 1), (1, 1)], constant_values=-np.inf)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))
    # stride-2 window reads would be gathers: parallel only, the inner loops stay for LLVM
    _check(model, [x], windows[:, :, ::2, ::2].max(axis=(-1, -2)), vector=False)


def test_global_average_pool():
    x = RNG.standard_normal((1, 2048, 7, 7)).astype("float32")
    # output [1, 2048, 1, 1]: its last axis has extent 1, nothing to vectorize
    _check(_unary_model("GlobalAveragePool", x.shape, [1, 2048, 1, 1]), [x],
           x.mean(axis=(2, 3), keepdims=True), vector=False)


def test_softmax():
    x = RNG.standard_normal((4, 12, 64, 64)).astype("float32")
    e = np.exp(x - x.max(-1, keepdims=True))
    _check(_unary_model("Softmax", x.shape, x.shape, axis=-1), [x], e / e.sum(-1, keepdims=True))


def test_layer_norm():
    x = RNG.standard_normal((8, 128, 128)).astype("float32")
    scale, bias = (RNG.standard_normal(128).astype("float32") for _ in range(2))
    model = make_model([helper.make_node("LayerNormalization", ["x", "s", "b"], ["y"], axis=-1,
                                         epsilon=1e-5)],
                       [_vi("x", x.shape)], [_vi("y", x.shape)],
                       [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(bias, "b")])
    mean = x.mean(-1, keepdims=True)
    want = (x - mean) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * scale + bias
    _check(model, [x], want, rtol=1e-4, atol=1e-4)


def test_argmax():
    x = RNG.standard_normal((64, 32, 48)).astype("float32")
    model = make_model([helper.make_node("ArgMax", ["x"], ["y"], axis=1, keepdims=0)],
                       [_vi("x", x.shape)], [_vi("y", [64, 48], TensorProto.INT64)])
    _check(model, [x], x.argmax(1))


def test_matmul_left_to_tvm_is_parallel_and_vectorized():
    a = RNG.standard_normal((8, 128, 96)).astype("float32")
    w = RNG.standard_normal((96, 80)).astype("float32")
    model = make_model([helper.make_node("MatMul", ["a", "w"], ["y"])], [_vi("a", a.shape)],
                       [_vi("y", [8, 128, 80])], [numpy_helper.from_array(w, "w")])
    _check(model, [a], a @ w, rtol=1e-4, atol=1e-4)


def test_tiny_function_is_vectorized_but_not_parallel():
    x = RNG.standard_normal((4, 64)).astype("float32")  # 256 elements: a thread launch is a loss
    _check(_unary_model("Exp", x.shape, x.shape), [x], np.exp(x), parallel=False)


def test_failing_rule_falls_back_and_compile_succeeds():
    x = RNG.standard_normal((32, 64, 64)).astype("float32")
    calls = []

    def broken(func, config):
        calls.append(func)
        raise RuntimeError("rule bug")

    model = _unary_model("Softmax", x.shape, x.shape, axis=-1)
    mod = _legalized(model)
    e = np.exp(x - x.max(-1, keepdims=True))
    want = e / e.sum(-1, keepdims=True)

    (got,), scheduled = _run(mod, [x], schedules.default_schedule(
        TARGET, rules=(broken, schedules.outer_parallel)))
    assert calls, "the broken rule was never tried"
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for name, func in _prim_funcs(scheduled).items():
        assert schedules.is_scheduled(func) and "T.parallel(" in func.script(), name

    # every rule failing: the functions stay as they were, and the model still compiles and runs
    (got,), scheduled = _run(mod, [x], schedules.default_schedule(TARGET, rules=(broken,)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for name, func in _prim_funcs(scheduled).items():
        assert not schedules.is_scheduled(func), name
        assert func.same_as(mod[name]), name


def test_block_that_refuses_its_schedule_gets_parallel_outer_loop(monkeypatch):
    def refuse(sch, info, config):
        raise ValueError("no")

    monkeypatch.setattr(schedules, "schedule_block", refuse)
    x = RNG.standard_normal((32, 64, 64)).astype("float32")
    _check(_unary_model("Exp", x.shape, x.shape), [x], np.exp(x), vector=False)


def test_scheduled_functions_are_left_alone_and_input_module_unchanged():
    x = RNG.standard_normal((32, 64, 64)).astype("float32")
    mod = _legalized(_unary_model("Exp", x.shape, x.shape))
    (name,) = _prim_funcs(mod)
    marked = mod.clone()
    marked[name] = mod[name].with_attr("tirx.is_scheduled", True)
    with TARGET:
        again = schedules.default_schedule(TARGET)(marked)
        fresh = schedules.default_schedule(TARGET)(mod)
    assert again[name].same_as(marked[name])
    assert "T.parallel(" not in mod[name].script()  # the pass did not change its input
    assert "T.parallel(" in fresh[name].script()


def test_config_from_target():
    config = schedules.ScheduleConfig.from_target(
        tvm.target.Target({"kind": "llvm", "mcpu": "znver4", "mtriple": "x86_64-linux-gnu",
                           "num-cores": 6}))
    assert config.num_cores == 6 and config.vector_bits == 512 and config.lanes(32) == 16


def test_bfloat16_functions_compile_and_match_the_reference():
    """TVM stores bf16 as uint16 after legalization and rejects a vectorized bf16 store
    ("dtype mismatch on BufferStore", found by ONNX's einsum/attention bf16 tests): such blocks
    stay serial for LLVM."""
    import ml_dtypes

    import accelkit

    bf16 = TensorProto.BFLOAT16
    model = make_model([helper.make_node("Einsum", ["a", "b"], ["y"], equation="bij,bjk->bik")],
                       [_vi("a", [5, 2, 3], bf16), _vi("b", [5, 3, 4], bf16)], [_vi("y", [5, 2, 4], bf16)])
    feeds = {"a": RNG.standard_normal((5, 2, 3)).astype(ml_dtypes.bfloat16),
             "b": RNG.standard_normal((5, 3, 4)).astype(ml_dtypes.bfloat16)}
    got = accelkit.compile(model, cache=False).run(feeds)[0]
    want = accelkit.compile(model, backend="reference", cache=False).run(feeds)[0]
    assert got.dtype == want.dtype == ml_dtypes.bfloat16
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=2e-2, atol=5e-2)
