"""The int8 dense kernel (accelkit.cpu.dense_i8) called directly: against a numpy model of the
same quantization (rows of x to u8 at run time, per-channel s8 weights), on the VNNI path and the
portable one, every epilogue, and bad arguments refused before any memory is touched."""
from __future__ import annotations

import math

import numpy as np
import pytest

from accelkit.backends.cpu import ACT_CODES, quantize_weight_int8
from conftest import ffn_model
from test_kernels import ACTS, NATIVE_ISA, close, k, none, t, with_epilogue  # noqa: F401


@pytest.fixture(params=["native", "portable"])
def path(request, monkeypatch):
    """The kernel module on the CPU's best path (VNNI, AVX-512 where it has them), then on the
    forced portable one."""
    from accelkit import kernels

    module = kernels.load()
    if request.param == "portable":
        monkeypatch.setenv("ACCELKIT_PORTABLE_KERNELS", "1")
        module.register()
    yield module
    monkeypatch.delenv("ACCELKIT_PORTABLE_KERNELS", raising=False)
    module.register()


def quantize_rows(x: np.ndarray):
    """The kernel's row quantization, in float32 like the C code: (q, scale, zero point)."""
    x = x.astype(np.float32)
    lo = np.minimum(x.min(axis=1), np.float32(0))
    hi = np.maximum(x.max(axis=1), np.float32(0))
    scale = ((hi - lo) / np.float32(255)).astype(np.float32)
    scale[~(scale > 0)] = 1
    inv = (np.float32(1) / scale).astype(np.float32)
    zp = np.clip(np.rint(-lo * inv), 0, 255)
    q = np.clip(np.rint(x * inv[:, None]) + zp[:, None], 0, 255)
    return q.astype(np.int64), scale.astype(np.float64), zp.astype(np.int64)


def int8_reference(x2: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x2[M, K] @ w[K, N] as the kernel computes it, in float64 from the quantized integers."""
    q, s, z = quantize_rows(x2)
    packed, qp = quantize_weight_int8(w)
    n = w.shape[1]
    wq = np.clip(np.rint(w.astype(np.float64) / qp[0, :n].astype(np.float64)), -127, 127).astype(np.int64)
    acc = q @ wq
    return s[:, None] * qp[0, :n].astype(np.float64) * (acc - z[:, None] * wq.sum(axis=0))


def run_dense_i8(k, x, w, b=None, r=None, act=None, res=0, scale=1.0):
    packed, qp = quantize_weight_int8(w)
    n = w.shape[1]
    out = t(np.zeros((*x.shape[:-1], n), np.float32))
    k("dense_i8")(t(x), t(packed), t(qp), t(b) if b is not None else none(), t(r) if r is not None else none(),
                  n, ACT_CODES[act], res, 0.0, 6.0, scale, out)
    return out.numpy()


def test_weight_quantization_is_per_channel_and_exact_on_the_grid():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((37, 45)).astype(np.float32)
    w[:, 3] = 0  # an all-zero column: scale 1, no division by zero
    packed, qp = quantize_weight_int8(w)
    assert packed.dtype == np.int8 and packed.shape == (2, 10, 32, 4) and qp.shape == (2, 64)
    unpacked = packed.transpose(1, 3, 0, 2).reshape(40, 64)[:37, :45].astype(np.float64)
    assert np.abs(unpacked).max() == 127
    np.testing.assert_array_equal(qp[1, :45], unpacked.sum(axis=0))
    assert qp[0, 3] == 1 and not unpacked[:, 3].any()
    # dequantized weights within half a step of the originals, per channel
    assert (np.abs(unpacked * qp[0, :45] - w) <= qp[0, :45] / 2 + 1e-6).all()


@pytest.mark.parametrize("shape", [(5, 7, 45), (64, 96, 64), (1, 33, 31), (3, 2, 17, 40), (130, 768, 70)])
@pytest.mark.parametrize("act", ["relu", "gelu", None, "clip"])
def test_dense_i8_matches_the_quantized_reference(k, path, shape, act):
    rng = np.random.default_rng(1)
    *lead, kdim, n = shape
    x = (rng.standard_normal((*lead, kdim)) + 0.3).astype(np.float32)
    w = (rng.standard_normal((kdim, n)) / math.sqrt(kdim)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    got = run_dense_i8(k, x, w, b, act=act)
    want = ACTS[act](int8_reference(x.reshape(-1, kdim), w) + b).reshape(got.shape)
    close(got, want)
    # and near the float result: 8-bit rows and channels keep about 1% of the signal's scale
    exact = ACTS[act](x.astype(np.float64) @ w + b)
    assert np.linalg.norm(got - exact) / np.linalg.norm(exact) < 0.02


@pytest.mark.parametrize("res", [1, 2])
def test_dense_i8_residual_and_scale(k, path, res):
    rng = np.random.default_rng(2)
    x, w = rng.standard_normal((19, 50)).astype(np.float32), rng.standard_normal((50, 33)).astype(np.float32)
    r = rng.standard_normal((19, 33)).astype(np.float32)
    b = rng.standard_normal(33).astype(np.float32)
    got = run_dense_i8(k, x, w, b, r, act="silu", res=res, scale=0.5)
    want = with_epilogue(0.5 * int8_reference(x, w) + b, r, "silu", res)
    close(got, want)


def test_dense_i8_rows_of_zeros_constants_and_k_not_a_multiple_of_4(k, path):
    x = np.zeros((9, 13), np.float32)
    x[1] = 2.5   # a constant positive row: zero point 0
    x[2] = -1.0  # a constant negative row: zero point 255
    x[3, ::2] = 7.0
    w = np.random.default_rng(3).standard_normal((13, 20)).astype(np.float32)
    got = run_dense_i8(k, x, w)
    close(got, int8_reference(x, w))
    assert not got[0].any()


def test_int8_path_is_vnni_where_the_cpu_has_it(path, request):
    from test_kernels import CPU_FLAGS

    native = "vnni" if NATIVE_ISA == "avx512" and "avx512_vnni" in CPU_FLAGS else "portable"
    assert path.int8_path() == (native if request.node.callspec.params["path"] == "native" else "portable")


def test_dense_i8_refuses_bad_arguments(k):
    x = np.ones((4, 8), np.float32)
    w = np.ones((8, 5), np.float32)
    packed, qp = quantize_weight_int8(w)
    out = t(np.zeros((4, 5), np.float32))
    f = k("dense_i8")
    cases = [
        ((t(x), t(packed.astype(np.float32)), t(qp), none(), none(), 5, 0, 0, 0.0, 0.0, 1.0, out), "w_int8 must be int8"),
        ((t(x), t(packed[:, :1]), t(qp), none(), none(), 5, 0, 0, 0.0, 0.0, 1.0, out), r"w_int8 must be \[1, 2, 32, 4\]"),
        ((t(x), t(packed), t(qp[:1]), none(), none(), 5, 0, 0, 0.0, 0.0, 1.0, out), r"w_qparams must be \[2, 32\]"),
        ((t(x.astype(np.float64)), t(packed), t(qp), none(), none(), 5, 0, 0, 0.0, 0.0, 1.0, out), "x must be float32"),
        ((t(x), t(packed), t(qp), t(np.ones(3, np.float32)), none(), 5, 0, 0, 0.0, 0.0, 1.0, out), "bias must have N=5"),
        ((t(x), t(packed), t(qp), none(), none(), 5, 0, 0, 0.0, 0.0, 1.0, t(np.zeros((3, 5), np.float32))), "out dim 0"),
        ((t(x), t(packed), t(qp), none(), none(), 5, 99, 0, 0.0, 0.0, 1.0, out), "act"),
        ((t(x), t(packed), t(qp), none(), none(), 5, 0, 0, 0.0, 0.0, out), "expected 12 arguments"),
    ]
    for args, message in cases:
        with pytest.raises((TypeError, ValueError), match=message):
            f(*args)


# ---- precision="int8" end to end ------------------------------------------------------------

def _cosine(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / norms) if norms > 0 else 0.0  # an all-zero output matches nothing


def test_int8_model_runs_the_int8_kernel_and_reports_its_accuracy():
    import accelkit

    proto = ffn_model()
    fp32 = accelkit.compile(proto, cache=False)
    int8 = accelkit.compile(proto, cache=False, precision="int8")
    assert int8.precision == "int8"
    assert int8.manifest["offloaded"] == {"cpu.dense_i8_bias_gelu": 1, "cpu.dense_i8_bias_add": 1}
    assert "accelkit.cpu.dense_i8" in int8.manifest["kernels"]
    x = {"x": np.random.default_rng(9).standard_normal((2, 7, 48)).astype(np.float32)}
    got, want = int8.run(x)[0], fp32.run(x)[0]
    assert not np.array_equal(got, want)  # it did quantize
    assert _cosine(got, want) > 0.999
    accuracy = int8.manifest["accuracy"]
    assert accuracy["reference"] == "fp32" and accuracy["inputs"] == "random" and accuracy["batches"] == 4
    assert set(accuracy["outputs"]) == {"y"}
    assert 0.999 < accuracy["min_cosine"] < 1.0 and 0.0 < accuracy["max_rel_l2"] < 0.05
    assert "accuracy" not in fp32.manifest


def test_calibration_batches_are_what_accuracy_is_measured_on(tmp_path):
    import accelkit

    proto = ffn_model()
    rng = np.random.default_rng(4)
    stacked = {"x": rng.standard_normal((3, 2, 7, 48)).astype(np.float32)}
    model = accelkit.compile(proto, cache=False, precision="int8", calibration=stacked)
    a = model.manifest["accuracy"]
    assert a["inputs"] == "calibration" and a["batches"] == 3
    # a directory of .npz files, one batch each, is the same data
    for i in range(3):
        np.savez(tmp_path / f"b{i}.npz", x=stacked["x"][i])
    again = accelkit.compile(proto, cache=False, precision="int8", calibration=str(tmp_path))
    assert again.manifest["accuracy"]["outputs"] == a["outputs"]
    # a large-magnitude batch changes what is measured
    loud = accelkit.compile(proto, cache=False, precision="int8", calibration={"x": stacked["x"] * 50})
    assert loud.manifest["accuracy"]["outputs"] != a["outputs"]


@pytest.mark.parametrize("calibration, message", [
    ({"z": np.zeros((2, 7, 48), np.float32)}, r"exactly the model's inputs \['x'\]; missing \['x'\], unknown \['z'\]"),
    ({"x": np.zeros((2, 7, 4), np.float32)}, r"'x' has shape \[2, 7, 4\]; expected \[2, 7, 48\]"),
    ({"x": np.zeros((2, 7, 48), np.float64)}, "'x' is float64; the model takes float32"),
    ("/nonexistent/cal.npz", "cannot read calibration data '/nonexistent/cal.npz'"),
    (42, "calibration must be a dict of input arrays"),
])
def test_bad_calibration_is_refused_with_what_is_expected(calibration, message):
    import accelkit

    with pytest.raises(accelkit.OptionError, match=message):
        accelkit.compile(ffn_model(), cache=False, precision="int8", calibration=calibration)


def test_calibration_is_for_reduced_precisions_only():
    import accelkit

    with pytest.raises(accelkit.OptionError, match="calibration= is for reduced precisions"):
        accelkit.compile(ffn_model(), cache=False, calibration={"x": np.zeros((2, 7, 48), np.float32)})


def test_int8_on_the_command_line(tmp_path):
    import subprocess
    import sys

    import onnx

    path = tmp_path / "ffn.onnx"
    onnx.save(ffn_model(), str(path))
    env_cache = {"ACCELKIT_CACHE_DIR": str(tmp_path / "cache")}
    import os

    done = subprocess.run([sys.executable, "-m", "accelkit", "compile", str(path), "--precision", "int8"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, **env_cache})
    assert done.returncode == 0, done.stderr
    assert "precision: int8" in done.stdout and "cpu.dense_i8_bias_gelu x1" in done.stdout
    assert "accuracy vs fp32 (4 random batches): y cosine 0.99" in done.stdout
    broken = tmp_path / "broken.onnx"
    onnx.save(_model_with_a_layer_int8_breaks(), str(broken))
    done = subprocess.run([sys.executable, "-m", "accelkit", "compile", str(broken), "--precision", "int8",
                           "--accuracy", "0.99"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env_cache})
    assert done.returncode == 0, done.stderr
    assert "accuracy budget: min cosine 0.99 met; kept in fp32: mm2 (MatMul, own error" in done.stdout


# ---- accuracy=: the layer int8 breaks is kept in fp32 ------------------------------------------

def _model_with_a_layer_int8_breaks():
    """x -> mm1 (+ a bias with one huge channel, 3000) -> relu -> mm2 -> y, where mm2 ignores
    that channel (its weight row is 0). fp32 is fine; int8's per-row range for mm2's input is
    then [0, 3000], one step 12: every other activation (about 1) rounds to 0, and mm2 breaks.
    mm1's input is ordinary."""
    from onnx import TensorProto, helper, numpy_helper

    from conftest import make_model

    rng = np.random.default_rng(5)
    w1 = (rng.standard_normal((32, 64)) / 6).astype(np.float32)
    b1 = (rng.standard_normal(64) * 0.1).astype(np.float32)
    b1[0] = 3000.0
    w2 = (rng.standard_normal((64, 32)) / 8).astype(np.float32)
    w2[0] = 0.0
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["m1"], name="mm1"),
             helper.make_node("Add", ["m1", "b1"], ["h"], name="bias1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu1"),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="mm2")]
    F = TensorProto.FLOAT
    return make_model(nodes, [helper.make_tensor_value_info("x", F, [8, 32])],
                      [helper.make_tensor_value_info("y", F, [8, 32])],
                      [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(b1, "b1"),
                       numpy_helper.from_array(w2, "W2")])


def test_accuracy_budget_keeps_the_layer_int8_breaks_in_fp32_and_names_it():
    import accelkit

    proto = _model_with_a_layer_int8_breaks()
    plain = accelkit.compile(proto, cache=False, precision="int8")
    assert plain.manifest["accuracy"]["min_cosine"] < 0.9  # int8 breaks it
    rescued = accelkit.compile(proto, cache=False, precision="int8", accuracy=0.99)
    a = rescued.manifest["accuracy"]
    assert a["budget"] == 0.99 and a["met"] and a["min_cosine"] >= 0.99
    assert [k["node"] for k in a["kept_fp32"]] == ["mm2"] and a["kept_fp32"][0]["layer_error"] > 0.5
    assert "int8 error" in a["kept_fp32"][0]["why"]
    # mm1 stays int8, mm2 runs the fp32 kernel
    assert rescued.manifest["offloaded"] == {"cpu.dense_i8_bias_relu": 1, "cpu.dense": 1}
    x = {"x": np.random.default_rng(6).standard_normal((8, 32)).astype(np.float32)}
    fp32 = accelkit.compile(proto, cache=False).run(x)[0]
    assert _cosine(rescued.run(x)[0], fp32) > 0.99 > _cosine(plain.run(x)[0], fp32)


def test_accuracy_budget_already_met_keeps_everything_int8():
    import accelkit

    model = accelkit.compile(ffn_model(), cache=False, precision="int8", accuracy=0.99)
    a = model.manifest["accuracy"]
    assert a["met"] and a["kept_fp32"] == []
    assert model.manifest["offloaded"] == {"cpu.dense_i8_bias_gelu": 1, "cpu.dense_i8_bias_add": 1}


@pytest.mark.parametrize("precision, accuracy, message", [
    ("fp32", 0.99, "accuracy= is a budget for reduced precisions"),
    ("int8", 1.5, r"a number in \(0, 1\]"),
    ("int8", "high", r"a number in \(0, 1\]"),
])
def test_bad_accuracy_budget_is_refused(precision, accuracy, message):
    import accelkit

    with pytest.raises(accelkit.OptionError, match=message):
        accelkit.compile(ffn_model(), cache=False, precision=precision, accuracy=accuracy)


def test_int8_runs_1x1_convolutions_as_dense_layers_and_the_others_in_the_int8_conv_kernel():
    """A bottleneck block: 1x1 (the int8 dense kernel over the pixels) -> 3x3 (the int8 conv
    kernel) -> 1x1 + residual (dense); the 1x1 conv with stride 2 gathers, so the conv kernel."""
    from onnx import TensorProto, helper, numpy_helper

    import accelkit
    from conftest import make_model

    rng = np.random.default_rng(11)

    def w(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) / math.sqrt(np.prod(shape[1:]))).astype(np.float32), name)

    def b(name, n):
        return numpy_helper.from_array((rng.standard_normal(n) * 0.1).astype(np.float32), name)

    nodes = [helper.make_node("Conv", ["x", "W1", "b1"], ["c1"], name="reduce"), helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "W2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="spatial"),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Conv", ["r2", "W3", "b3"], ["c3"], name="expand"), helper.make_node("Add", ["c3", "x"], ["s"]),
             helper.make_node("Relu", ["s"], ["r3"]),
             helper.make_node("Conv", ["r3", "W4", "b4"], ["y"], strides=[2, 2], name="down")]
    inits = [w("W1", 24, 32, 1, 1), b("b1", 24), w("W2", 24, 24, 3, 3), b("b2", 24), w("W3", 32, 24, 1, 1),
             b("b3", 32), w("W4", 40, 32, 1, 1), b("b4", 40)]
    F = TensorProto.FLOAT
    proto = make_model(nodes, [helper.make_tensor_value_info("x", F, [1, 32, 10, 10])],
                       [helper.make_tensor_value_info("y", F, [1, 40, 5, 5])], inits)
    model = accelkit.compile(proto, cache=False, precision="int8")
    offloaded = model.manifest["offloaded"]
    assert offloaded.get("cpu.conv1x1_i8_bias_relu") == 1 and offloaded.get("cpu.conv1x1_i8_bias_add_pre_relu") == 1
    assert offloaded.get("cpu.conv2d_nhwc_i8_bias_relu") == 1 and offloaded.get("cpu.conv2d_nhwc_i8_bias") == 1
    assert model.manifest["accuracy"]["min_cosine"] > 0.999
    from accelkit.accuracy import dense_layers

    assert [layer["node"] for layer in dense_layers(proto)] == ["reduce", "expand"]


def _windows_nhwc(x, kh, kw, stride, pads, dil):
    """im2col of a channels-last image batch: rows = output pixels, K = (ky, kx, c)."""
    n, h, w, c = x.shape
    pt, pl, pb, pr = pads
    xp = np.zeros((n, h + pt + pb, w + pl + pr, c), x.dtype)
    xp[:, pt:pt + h, pl:pl + w] = x
    oh = (h + pt + pb - dil[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + pl + pr - dil[1] * (kw - 1) - 1) // stride[1] + 1
    cols = [xp[:, ky * dil[0]: ky * dil[0] + stride[0] * (oh - 1) + 1: stride[0],
               kx * dil[1]: kx * dil[1] + stride[1] * (ow - 1) + 1: stride[1]]
            for ky in range(kh) for kx in range(kw)]
    return np.concatenate(cols, axis=-1).reshape(n * oh * ow, kh * kw * c), (n, oh, ow)


@pytest.mark.parametrize("case", [  # (n, c, h, w, cout, k, stride, pads, dil)
    (1, 16, 9, 11, 40, 3, (1, 1), (1, 1, 1, 1), (1, 1)),
    (2, 3, 17, 15, 64, 7, (2, 2), (3, 3, 3, 3), (1, 1)),   # the ResNet stem's shape
    (1, 32, 8, 8, 33, 1, (2, 2), (0, 0, 0, 0), (1, 1)),    # a strided 1x1 projection
    (1, 8, 10, 10, 16, 3, (1, 1), (2, 2, 2, 2), (2, 2)),   # dilated
])
@pytest.mark.parametrize("act,res", [(None, 0), ("relu", 1)])
def test_conv2d_nhwc_i8_matches_the_quantized_reference(k, path, case, act, res):
    from accelkit.backends.cpu import quantize_conv_weight_int8

    n, c, h, wd, cout, ks, stride, pads, dil = case
    rng = np.random.default_rng(12)
    x = rng.standard_normal((n, h, wd, c)).astype(np.float32)
    w = (rng.standard_normal((cout, c, ks, ks)) / math.sqrt(c * ks * ks)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    rows, (n_, oh, ow) = _windows_nhwc(x, ks, ks, stride, pads, dil)
    flat = w.transpose(2, 3, 1, 0).reshape(-1, cout)
    want = int8_reference(rows, flat) + b
    r = rng.standard_normal((n, oh, ow, cout)).astype(np.float32)
    want = with_epilogue(want, r.reshape(-1, cout), act, res).reshape(n, oh, ow, cout)
    packed, qp = quantize_conv_weight_int8(w)
    out = t(np.zeros((n, oh, ow, cout), np.float32))
    k("conv2d_nhwc_i8")(t(x), t(packed), t(qp), t(b), t(r) if res else none(), ks, ks, *stride, pads[0], pads[1],
                        *dil, ACT_CODES[act], res, 0.0, 0.0, 1.0, out)
    close(out.numpy(), want)
    exact = with_epilogue(rows.astype(np.float64) @ flat + b, r.reshape(-1, cout), act, res).reshape(want.shape)
    assert np.linalg.norm(out.numpy() - exact) / np.linalg.norm(exact) < 0.02


def test_conv2d_nhwc_i8_refuses_bad_weights(k):
    from accelkit.backends.cpu import quantize_conv_weight_int8

    x = t(np.ones((1, 5, 5, 4), np.float32))
    packed, qp = quantize_conv_weight_int8(np.ones((8, 4, 3, 3), np.float32))
    out = t(np.zeros((1, 5, 5, 8), np.float32))
    with pytest.raises(ValueError, match=r"w_int8 must be \[1, 1, 32, 4\] for a 1x1 window over 4 channels and 8 outputs \(got \[1, 9, 32, 4\]\)"):
        k("conv2d_nhwc_i8")(x, t(packed), t(qp), none(), none(), 1, 1, 1, 1, 0, 0, 1, 1, 0, 0, 0.0, 0.0, 1.0, out)
    with pytest.raises(ValueError, match="stride_h=0 is out of range"):
        k("conv2d_nhwc_i8")(x, t(packed), t(qp), none(), none(), 3, 3, 0, 1, 1, 1, 1, 1, 0, 0, 0.0, 0.0, 1.0, out)


def test_int8_leaves_the_layers_it_does_not_pay_for_in_fp32():
    """A dense layer with fewer than INT8_MIN_K inputs or INT8_MIN_N outputs stays fp32: there,
    quantizing the rows costs more than the int8 products save."""
    from onnx import TensorProto, helper, numpy_helper

    import accelkit
    from accelkit.backends.cpu import INT8_MIN_N
    from conftest import make_model

    rng = np.random.default_rng(13)
    F = TensorProto.FLOAT
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("MatMul", ["h", "W2"], ["y"])]
    proto = make_model(nodes, [helper.make_tensor_value_info("x", F, [16, 64])],
                       [helper.make_tensor_value_info("y", F, [16, INT8_MIN_N - 1])],
                       [numpy_helper.from_array(rng.standard_normal((64, 48)).astype(np.float32), "W1"),
                        numpy_helper.from_array(rng.standard_normal((48, INT8_MIN_N - 1)).astype(np.float32), "W2")])
    model = accelkit.compile(proto, cache=False, precision="int8")
    assert model.manifest["offloaded"] == {"cpu.dense_i8": 1, "cpu.dense": 1}
