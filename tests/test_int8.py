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


def quantize_rows(x: np.ndarray, xq=None):
    """The kernel's row quantization, in float32 like the C code: (q, scale, zero point); with
    xq = [scale, zero point] (a calibrated range) every row on that grid, saturating."""
    x = x.astype(np.float32)
    if xq is not None:
        scale, zp = np.float32(xq[0]), float(xq[1])
        v = np.clip(x * (np.float32(1) / scale), -256, 256)
        v[np.isnan(v)] = -256  # NaN reads as the grid's low end (the C code's float clamp)
        q = np.clip(np.rint(v) + zp, 0, 255)
        rows = x.shape[0]
        return q.astype(np.int64), np.full(rows, float(scale)), np.full(rows, int(zp), np.int64)
    lo = np.minimum(x.min(axis=1), np.float32(0))
    hi = np.maximum(x.max(axis=1), np.float32(0))
    scale = ((hi - lo) / np.float32(255)).astype(np.float32)
    scale[~(scale > 0)] = 1
    inv = (np.float32(1) / scale).astype(np.float32)
    zp = np.clip(np.rint(-lo * inv), 0, 255)
    q = np.clip(np.rint(x * inv[:, None]) + zp[:, None], 0, 255)
    return q.astype(np.int64), scale.astype(np.float64), zp.astype(np.int64)


def int8_reference(x2: np.ndarray, w: np.ndarray, xq=None) -> np.ndarray:
    """x2[M, K] @ w[K, N] as the kernel computes it, in float64 from the quantized integers."""
    q, s, z = quantize_rows(x2, xq)
    packed, qp = quantize_weight_int8(w)
    n = w.shape[1]
    wq = np.clip(np.rint(w.astype(np.float64) / qp[0, :n].astype(np.float64)), -127, 127).astype(np.int64)
    acc = q @ wq
    return s[:, None] * qp[0, :n].astype(np.float64) * (acc - z[:, None] * wq.sum(axis=0))


def run_dense_i8(k, x, w, b=None, r=None, act=None, res=0, scale=1.0, xq=None):
    packed, qp = quantize_weight_int8(w)
    n = w.shape[1]
    out = t(np.zeros((*x.shape[:-1], n), np.float32))
    k("dense_i8")(t(x), t(packed), t(qp), t(np.asarray(xq, np.float32)) if xq is not None else none(),
                  t(b) if b is not None else none(), t(r) if r is not None else none(),
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


@pytest.mark.parametrize("shape", [(5, 45), (64, 64), (130, 70), (3, 17)])
def test_dense_i8_with_a_calibrated_range_matches_the_reference_and_saturates(k, path, shape):
    """x_qparams = a calibrated range: every row on that one grid; values outside it (and inf,
    NaN) saturate to the grid's ends instead of wrapping."""
    from accelkit.backends.cpu import activation_qparams

    m, kk = shape
    rng = np.random.default_rng(4)
    x = rng.standard_normal((m, kk)).astype(np.float32)
    x[0, 0], x[-1, -1] = 40.0, -30.0  # far outside the range
    x[m // 2, 1], x[m // 2, 2] = np.inf, -np.inf
    w = rng.standard_normal((kk, 40)).astype(np.float32)
    xq = activation_qparams(-2.0, 3.0)
    assert xq[1] == np.rint(2.0 / xq[0]) and np.isclose(xq[0], 5.0 / 255)
    got = run_dense_i8(k, x, w, xq=xq)
    close(got, int8_reference(x, w, xq))
    clipped = np.clip(x, -2.0 - xq[0], 3.0 + xq[0])
    assert np.linalg.norm(got - clipped @ w) / np.linalg.norm(clipped @ w) < 0.02
    x[1, 3] = np.nan  # reads as the grid's low end, like the reference; no crash, no garbage
    close(run_dense_i8(k, x, w, xq=xq), int8_reference(x, w, xq))


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
    n = none
    cases = [
        ((t(x), t(packed.astype(np.float32)), t(qp), n(), n(), n(), 5, 0, 0, 0.0, 0.0, 1.0, out), "w_int8 must be int8"),
        ((t(x), t(packed[:, :1]), t(qp), n(), n(), n(), 5, 0, 0, 0.0, 0.0, 1.0, out), r"w_int8 must be \[1, 2, 32, 4\]"),
        ((t(x), t(packed), t(qp[:1]), n(), n(), n(), 5, 0, 0, 0.0, 0.0, 1.0, out), r"w_qparams must be \[2, 32\]"),
        ((t(x.astype(np.float64)), t(packed), t(qp), n(), n(), n(), 5, 0, 0, 0.0, 0.0, 1.0, out), "x must be float32"),
        ((t(x), t(packed), t(qp), n(), t(np.ones(3, np.float32)), n(), 5, 0, 0, 0.0, 0.0, 1.0, out), "bias must have N=5"),
        ((t(x), t(packed), t(qp), n(), n(), n(), 5, 0, 0, 0.0, 0.0, 1.0, t(np.zeros((3, 5), np.float32))), "out dim 0"),
        ((t(x), t(packed), t(qp), n(), n(), n(), 5, 99, 0, 0.0, 0.0, 1.0, out), "act"),
        ((t(x), t(packed), t(qp), n(), n(), n(), 5, 0, 0, 0.0, 0.0, out), "expected 13 arguments"),
    ]
    # x_qparams: [] or [scale > 0, integer zero point in 0..255]
    for bad in ([0.0, 3], [np.nan, 3], [np.inf, 3], [0.1, -1], [0.1, 256], [0.1, 2.5], [0.1, 3, 1], [0.1]):
        cases.append(((t(x), t(packed), t(qp), t(np.array(bad, np.float32)), n(), n(), 5, 0, 0, 0.0, 0.0, 1.0, out),
                      r"act_qparams must be \[\] \(dynamic\)"))
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
    assert "int8 input ranges: auto; every int8 layer per row at run time" in done.stdout  # no convolution
    data = tmp_path / "calibration.npz"
    np.savez(data, x=np.random.default_rng(9).standard_normal((3, 2, 7, 48)).astype(np.float32))
    done = subprocess.run([sys.executable, "-m", "accelkit", "compile", str(path), "--precision", "int8",
                           "--calibration-method", "minmax", "--calibration", str(data)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **env_cache})
    assert done.returncode == 0, done.stderr
    assert "int8 input ranges: minmax; 2 calibrated on 3 calibration batches; the other int8" in done.stdout


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


def _bottleneck_model():
    """A bottleneck block: 1x1 -> relu -> 3x3 -> relu -> 1x1 + x -> relu -> 1x1 stride 2."""
    from onnx import TensorProto, helper, numpy_helper

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
    return make_model(nodes, [helper.make_tensor_value_info("x", F, [1, 32, 10, 10])],
                      [helper.make_tensor_value_info("y", F, [1, 40, 5, 5])], inits)


def test_int8_runs_1x1_convolutions_as_dense_layers_and_the_others_in_the_int8_conv_kernel():
    """1x1 (the int8 dense kernel over the pixels) -> 3x3 (the int8 conv kernel) -> 1x1 +
    residual (dense); the 1x1 conv with stride 2 gathers, so the conv kernel."""
    import accelkit

    proto = _bottleneck_model()
    model = accelkit.compile(proto, cache=False, precision="int8")
    offloaded = model.manifest["offloaded"]
    assert offloaded.get("cpu.conv1x1_i8_bias_relu") == 1 and offloaded.get("cpu.conv1x1_i8_bias_add_pre_relu") == 1
    assert offloaded.get("cpu.conv2d_nhwc_i8_bias_relu") == 1 and offloaded.get("cpu.conv2d_nhwc_i8_bias") == 1
    assert model.manifest["accuracy"]["min_cosine"] > 0.999
    from accelkit.accuracy import int8_layers

    layers = {layer["node"]: layer for layer in int8_layers(proto)}
    assert list(layers) == ["reduce", "spatial", "expand", "down"]
    assert layers["spatial"]["window"] == {"kernel": (3, 3), "strides": (1, 1), "pads": (1, 1, 1, 1),
                                           "dilations": (1, 1)}
    assert layers["down"]["window"]["strides"] == (2, 2) and layers["down"]["weight"].shape == (32, 40)


def test_accuracy_budget_rescues_a_3x3_convolution_int8_breaks():
    """conv1 (3x3) gives one channel a bias of 3000 that conv2 (3x3) ignores (its weights for
    that channel are 0): conv2's input grid then has a step of about 12 and int8 breaks it.
    accuracy= ranks every int8 convolution by its windows' own error and keeps conv2 in fp32."""
    from onnx import TensorProto, helper, numpy_helper

    import accelkit
    from conftest import make_model

    rng = np.random.default_rng(45)
    w1 = (rng.standard_normal((24, 16, 3, 3)) / 12).astype(np.float32)
    b1 = (rng.standard_normal(24) * 0.1).astype(np.float32)
    b1[0] = 3000.0
    w2 = (rng.standard_normal((32, 24, 3, 3)) / 14).astype(np.float32)
    w2[:, 0] = 0.0
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "W2"], ["y"], pads=[1, 1, 1, 1], name="conv2")]
    F = TensorProto.FLOAT
    proto = make_model(nodes, [helper.make_tensor_value_info("x", F, [1, 16, 8, 8])],
                       [helper.make_tensor_value_info("y", F, [1, 32, 8, 8])],
                       [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(b1, "B1"),
                        numpy_helper.from_array(w2, "W2")])
    plain = accelkit.compile(proto, cache=False, precision="int8")
    assert plain.manifest["accuracy"]["min_cosine"] < 0.9
    rescued = accelkit.compile(proto, cache=False, precision="int8", accuracy=0.99)
    a = rescued.manifest["accuracy"]
    assert a["met"] and a["min_cosine"] >= 0.99
    assert [k["node"] for k in a["kept_fp32"]] == ["conv2"] and a["kept_fp32"][0]["op"] == "Conv"
    offloaded = rescued.manifest["offloaded"]
    assert sum(v for k, v in offloaded.items() if "_i8" in k) == 1  # conv1 stays int8


# ---- int8 input ranges: dynamic rows, or calibrated per layer -----------------------------------

@pytest.mark.parametrize("method, least_cosine", [("auto", 0.999), ("minmax", 0.999), ("percentile", 0.999),
                                                  ("entropy", 0.99), ("dynamic", 0.999)])
def test_calibration_methods_give_each_conv_input_a_range(tmp_path, method, least_cosine):
    """auto: the convolutions calibrated (percentile); each method's ranges are in the manifest,
    the build runs them (outputs differ from the dynamic build's), and accuracy holds."""
    import accelkit

    proto = _bottleneck_model()
    rng = np.random.default_rng(21)
    batches = [{"x": rng.standard_normal((1, 32, 10, 10)).astype(np.float32)} for _ in range(3)]
    model = accelkit.compile(proto, cache=False, precision="int8", calibration=batches, calibration_method=method)
    c = model.manifest["calibration"]
    assert c["method"] == method
    if method == "dynamic":
        assert c["layers"] == []
    else:
        assert c["inputs"] == "calibration" and c["batches"] == 3
        assert [layer["node"] for layer in c["layers"]] == ["reduce", "spatial", "expand", "down"]
        for layer in c["layers"]:
            assert layer["lo"] <= 0 <= layer["hi"] and layer["hi"] > 0
        # relu outputs are non-negative: their ranges start at 0
        assert [layer["lo"] == 0 for layer in c["layers"]] == [False, True, True, True]
    assert model.manifest["accuracy"]["min_cosine"] > least_cosine
    x = {"x": rng.standard_normal((1, 32, 10, 10)).astype(np.float32)}
    fp32 = accelkit.compile(proto, cache=False).run(x)[0]
    dynamic = accelkit.compile(proto, cache=False, precision="int8", calibration=batches,
                               calibration_method="dynamic").run(x)[0]
    got = model.run(x)[0]
    assert _cosine(got, fp32) > least_cosine - 0.01
    assert (method == "dynamic") == np.array_equal(got, dynamic)


def test_activation_ranges_by_method():
    """minmax keeps the outlier, percentile and entropy clip it; the negative side likewise."""
    from onnx import TensorProto, helper, numpy_helper

    from accelkit.accuracy import activation_ranges
    from conftest import make_model

    rng = np.random.default_rng(22)
    F = TensorProto.FLOAT
    proto = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
                       [helper.make_tensor_value_info("x", F, [256, 64])], [helper.make_tensor_value_info("y", F, [256, 32])],
                       [numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "W")])
    x = rng.standard_normal((256, 64)).astype(np.float32)
    x[3, 4], x[5, 6] = 100.0, -50.0
    ranges = {m: activation_ranges(proto, [{"x": x}], m)[0] for m in ("minmax", "percentile", "entropy")}
    assert all(r["node"] == "mm" and r["op"] == "MatMul" and len(r["digests"]) == 2 for r in ranges.values())
    assert (ranges["minmax"]["lo"], ranges["minmax"]["hi"]) == (-50.0, 100.0)
    for m in ("percentile", "entropy"):
        assert 2.0 < ranges[m]["hi"] < 100.0 and -50.0 < ranges[m]["lo"] < -2.0, (m, ranges[m])
    # the percentile method keeps PERCENTILE% of each side in range
    from accelkit.accuracy import PERCENTILE

    p = ranges["percentile"]
    assert np.mean(x[x > 0] <= p["hi"]) >= PERCENTILE / 100 - 1e-3
    assert np.mean(x[x < 0] >= p["lo"]) >= PERCENTILE / 100 - 1e-3
    with pytest.raises(accelkit_option_error(), match="calibration method 'kl'"):
        activation_ranges(proto, [{"x": x}], "kl")


def accelkit_option_error():
    import accelkit

    return accelkit.OptionError


def test_calibration_method_is_in_the_cache_key(tmp_path, monkeypatch):
    import accelkit

    monkeypatch.setenv("ACCELKIT_CACHE_DIR", str(tmp_path / "cache"))
    proto = _bottleneck_model()
    data = {"x": np.random.default_rng(23).standard_normal((2, 1, 32, 10, 10)).astype(np.float32)}
    first = accelkit.compile(proto, precision="int8", calibration=data, calibration_method="minmax")
    assert first.cache_status == "miss"
    assert accelkit.compile(proto, precision="int8", calibration=data, calibration_method="minmax").cache_status == "hit"
    other = accelkit.compile(proto, precision="int8", calibration=data, calibration_method="percentile")
    assert other.cache_status == "miss" and other.manifest["calibration"]["method"] == "percentile"
    assert accelkit.compile(proto, precision="int8", calibration=data).cache_status == "miss"  # auto


@pytest.mark.parametrize("precision, method, message", [
    ("int8", "kl", "unknown calibration_method 'kl'; choose one of auto, dynamic, minmax, percentile, entropy"),
    ("fp32", "minmax", "calibration_method= sets int8 activation ranges; precision is 'fp32'"),
    ("bf16", "minmax", "calibration_method= sets int8 activation ranges; precision is 'bf16'"),
    ("int8", "entropy", r"calibration_method='entropy' sets each int8 layer's input range from the calibration "
                        r"batches: pass calibration="),
])
def test_bad_calibration_method_is_refused(precision, method, message):
    import accelkit

    with pytest.raises(accelkit.OptionError, match=message):
        accelkit.compile(ffn_model(), cache=False, precision=precision, calibration_method=method)


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
    (3, 8, 7, 5, 16, 3, (1, 1), (1, 1, 1, 1), (1, 1)),     # gathered rows run across images
])
@pytest.mark.parametrize("act,res", [(None, 0), ("relu", 1)])
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "calibrated"])
def test_conv2d_nhwc_i8_matches_the_quantized_reference(k, path, case, act, res, static):
    """Dynamic: each window on its own grid. Calibrated: the image quantized once on one grid
    (a range narrower than the data, so some values saturate), padding = the zero point."""
    from accelkit.backends.cpu import activation_qparams, quantize_conv_weight_int8

    n, c, h, wd, cout, ks, stride, pads, dil = case
    rng = np.random.default_rng(12)
    x = rng.standard_normal((n, h, wd, c)).astype(np.float32)
    w = (rng.standard_normal((cout, c, ks, ks)) / math.sqrt(c * ks * ks)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    rows, (n_, oh, ow) = _windows_nhwc(x, ks, ks, stride, pads, dil)
    flat = w.transpose(2, 3, 1, 0).reshape(-1, cout)
    xq = activation_qparams(-1.5, 2.5) if static else None
    want = int8_reference(rows, flat, xq) + b
    r = rng.standard_normal((n, oh, ow, cout)).astype(np.float32)
    want = with_epilogue(want, r.reshape(-1, cout), act, res).reshape(n, oh, ow, cout)
    packed, qp = quantize_conv_weight_int8(w)
    out = t(np.zeros((n, oh, ow, cout), np.float32))
    k("conv2d_nhwc_i8")(t(x), t(packed), t(qp), t(xq) if static else none(), t(b), t(r) if res else none(), ks, ks,
                        *stride, pads[0], pads[1], *dil, ACT_CODES[act], res, 0.0, 0.0, 1.0, out)
    close(out.numpy(), want)
    seen = np.clip(rows, -1.5, 2.5) if static else rows  # what the calibrated grid holds
    exact = with_epilogue(seen.astype(np.float64) @ flat + b, r.reshape(-1, cout), act, res).reshape(want.shape)
    assert np.linalg.norm(out.numpy() - exact) / np.linalg.norm(exact) < 0.02


def test_conv2d_nhwc_i8_refuses_bad_weights(k):
    from accelkit.backends.cpu import quantize_conv_weight_int8

    x = t(np.ones((1, 5, 5, 4), np.float32))
    packed, qp = quantize_conv_weight_int8(np.ones((8, 4, 3, 3), np.float32))
    out = t(np.zeros((1, 5, 5, 8), np.float32))
    with pytest.raises(ValueError, match=r"w_int8 must be \[1, 1, 32, 4\] for a 1x1 window over 4 channels and 8 outputs \(got \[1, 9, 32, 4\]\)"):
        k("conv2d_nhwc_i8")(x, t(packed), t(qp), none(), none(), none(), 1, 1, 1, 1, 0, 0, 1, 1, 0, 0, 0.0, 0.0, 1.0,
                            out)
    with pytest.raises(ValueError, match="stride_h=0 is out of range"):
        k("conv2d_nhwc_i8")(x, t(packed), t(qp), none(), none(), none(), 3, 3, 0, 1, 1, 1, 1, 1, 0, 0, 0.0, 0.0, 1.0,
                            out)
    with pytest.raises(ValueError, match=r"act_qparams must be \[\] \(dynamic\), \[scale > 0, zero point in 0..255\]"):
        k("conv2d_nhwc_i8")(x, t(packed), t(qp), t(np.array([0.1, 300], np.float32)), none(), none(), 3, 3, 1, 1, 1,
                            1, 1, 1, 0, 0, 0.0, 0.0, 1.0, out)


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


# ---- pre-quantized (QDQ) models -------------------------------------------------------------------

def _qdq_bottleneck(tmp_path):
    """_bottleneck_model quantized by onnxruntime's quantize_static (QDQ, u8 activations,
    per-channel s8 weights), as users bring them."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    rng = np.random.default_rng(31)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"x": rng.standard_normal((1, 32, 10, 10)).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.batches, None)

    src, dst = tmp_path / "float.onnx", tmp_path / "qdq.onnx"
    onnx.save(_bottleneck_model(), str(src))
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return str(dst)


def test_a_qdq_model_runs_the_int8_kernels_on_its_own_grid(tmp_path):
    """int8: every activation Quantize->Dequantize pair becomes a Clip to its range and that range
    is the next layer's (so the kernels quantize on the model's own scale and zero point); fp32:
    the pairs stay and TVM emulates them exactly."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    import accelkit
    from accelkit.backends.cpu import activation_qparams

    path = _qdq_bottleneck(tmp_path)
    proto = onnx.load(path)
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    model = accelkit.compile(path, cache=False, precision="int8")
    offloaded = model.manifest["offloaded"]
    assert sum(v for k, v in offloaded.items() if "_i8" in k) == 4 and "cpu.conv2d_nhwc_i8_bias_clip" in offloaded
    c = model.manifest["calibration"]
    assert [(layer["node"], layer["source"]) for layer in c["layers"]] == [
        ("reduce", "qdq"), ("spatial", "qdq"), ("expand", "qdq"), ("down", "qdq")]
    assert c["batches"] == 0  # nothing left to calibrate
    # the reduce conv reads x through the pair (x_scale, x_zero_point): that grid, exactly
    scale, zp = float(inits["x_scale"]), int(inits["x_zero_point"])
    first = c["layers"][0]
    np.testing.assert_allclose(activation_qparams(first["lo"], first["hi"]), [scale, zp], rtol=1e-6)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    emulated = accelkit.compile(path, cache=False)  # fp32: the QDQ arithmetic as written
    rng = np.random.default_rng(32)
    for _ in range(2):
        x = {"x": rng.standard_normal((1, 32, 10, 10)).astype(np.float32)}
        want = session.run(None, x)[0]
        close(emulated.run(x)[0], want, tol=1e-5)
        assert _cosine(model.run(x)[0], want) > 0.999
    # accuracy= ranks a QDQ model's layers too (onnx's evaluator runs it with the pairs as Clips:
    # it has no DequantizeLinear before opset 19, and this one is opset 17)
    from accelkit import frontend
    from accelkit.accuracy import layer_errors

    ranked = layer_errors(frontend.prepare(path).proto, [x], "int8")
    assert sorted(layer["node"] for layer in ranked) == ["down", "expand", "reduce", "spatial"]
    assert all(layer["layer_error"] > 0 for layer in ranked)


def test_qdq_pairs_that_are_not_an_activation_grid_stay():
    """A Quantize whose readers use another scale, or that is a graph output, is left to TVM."""
    from onnx import TensorProto, helper, numpy_helper

    from accelkit.frontend.qdq import activation_ranges
    from conftest import make_model

    F = TensorProto.FLOAT
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(0.2, np.float32), "s2"),
             numpy_helper.from_array(np.array(128, np.uint8), "z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s2", "z"], ["y"]),  # another scale
             helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q2"]),
             helper.make_node("DequantizeLinear", ["q2", "s", "z"], ["y2"])]
    proto = make_model(nodes, [helper.make_tensor_value_info("x", F, [4])],
                       [helper.make_tensor_value_info("y", F, [4]), helper.make_tensor_value_info("y2", F, [4])], inits)
    out, ranges = activation_ranges(proto)
    assert [n.op_type for n in out.graph.node] == ["QuantizeLinear", "DequantizeLinear", "Clip"]
    lo, hi = ranges["y2"]
    assert np.isclose(lo, -12.8) and np.isclose(hi, 12.7)
    clip = out.graph.node[2]
    bounds = {t.name: float(numpy_helper.to_array(t)) for t in out.graph.initializer}
    assert list(clip.input[:1]) == ["x"] and list(clip.output) == ["y2"]
    assert np.isclose(bounds[clip.input[1]], lo) and np.isclose(bounds[clip.input[2]], hi)


# ---- u8 activations between int8 layers (no fp32 round trip) ---------------------------------------

def _u8(x, grid):
    """x on the grid [scale, zero point], as the kernels quantize it."""
    q, _, _ = quantize_rows(np.asarray(x, np.float32).reshape(-1, np.shape(x)[-1]), grid)
    return q.astype(np.uint8).reshape(np.shape(x))


def test_dense_i8_reads_u8_rows_and_writes_u8_on_the_next_grid(k, path):
    """x already u8 on its grid gives what the float x on that grid gives; a u8 out is the float
    result (bias, activation) quantized on the out grid."""
    from accelkit.backends.cpu import activation_qparams

    rng = np.random.default_rng(41)
    x = rng.standard_normal((37, 48)).astype(np.float32)
    w = rng.standard_normal((48, 40)).astype(np.float32)
    b = rng.standard_normal(40).astype(np.float32)
    packed, qp = quantize_weight_int8(w)
    xg, yg = activation_qparams(-2.5, 3.0), activation_qparams(0.0, 12.0)
    f32 = run_dense_i8(k, x, w, b, act="relu", xq=xg)
    out = t(np.zeros((37, 40), np.float32))
    k("dense_i8")(t(_u8(x, xg)), t(packed), t(qp), t(xg), t(b), none(), 40, ACT_CODES["relu"], 0, 0.0, 0.0, 1.0, out)
    np.testing.assert_array_equal(out.numpy(), f32)
    for xin, grid in ((x, np.concatenate([xg, yg])), (_u8(x, xg), np.concatenate([xg, yg])),
                      (x, np.concatenate([[0, 0], yg]).astype(np.float32))):  # dynamic rows, u8 out
        u8 = t(np.zeros((37, 40), np.uint8))
        k("dense_i8")(t(xin), t(packed), t(qp), t(grid), t(b), none(), 40, ACT_CODES["relu"], 0, 0.0, 0.0, 1.0, u8)
        ref = f32 if grid[0] else run_dense_i8(k, x, w, b, act="relu")
        want = _u8(ref, yg).astype(np.int64)
        got = u8.numpy().astype(np.int64)
        assert np.abs(got - want).max() <= 1 and np.mean(got == want) > 0.99


def test_conv2d_nhwc_i8_reads_a_u8_image_and_writes_u8(k, path):
    from accelkit.backends.cpu import activation_qparams, quantize_conv_weight_int8

    rng = np.random.default_rng(42)
    x = rng.standard_normal((1, 9, 11, 16)).astype(np.float32)
    w = (rng.standard_normal((24, 16, 3, 3)) / 12).astype(np.float32)
    b = rng.standard_normal(24).astype(np.float32)
    packed, qp = quantize_conv_weight_int8(w)
    xg, yg = activation_qparams(-2.0, 2.5), activation_qparams(0.0, 4.0)

    def conv(xin, grid, dtype):
        out = t(np.zeros((1, 9, 11, 24), dtype))
        k("conv2d_nhwc_i8")(t(xin), t(packed), t(qp), t(np.asarray(grid, np.float32)), t(b), none(), 3, 3, 1, 1,
                            1, 1, 1, 1, ACT_CODES["relu"], 0, 0.0, 0.0, 1.0, out)
        return out.numpy()

    f32 = conv(x, xg, np.float32)
    np.testing.assert_array_equal(conv(_u8(x, xg), xg, np.float32), f32)  # the u8 image: same integers
    for xin in (x, _u8(x, xg)):
        got = conv(xin, np.concatenate([xg, yg]), np.uint8).astype(np.int64)
        want = _u8(f32, yg).astype(np.int64)
        assert np.abs(got - want).max() <= 1 and np.mean(got == want) > 0.99


def test_u8_activations_are_refused_without_their_grids(k):
    from accelkit.backends.cpu import activation_qparams

    packed, qp = quantize_weight_int8(np.ones((8, 5), np.float32))
    xg = activation_qparams(-1, 1)
    both = t(np.concatenate([xg, xg]))
    f32, u8 = t(np.zeros((4, 5), np.float32)), t(np.zeros((4, 5), np.uint8))
    x8, xf = t(np.zeros((4, 8), np.uint8)), t(np.zeros((4, 8), np.float32))
    n = none
    for args, message in [
        ((x8, t(packed), t(qp), n(), n(), n(), 5, 0, 0, 0.0, 0.0, 1.0, f32), "a uint8 x needs its grid"),
        ((xf, t(packed), t(qp), t(xg), n(), n(), 5, 0, 0, 0.0, 0.0, 1.0, u8), "out must be float32 with 2 act_qparams"),
        ((xf, t(packed), t(qp), both, n(), n(), 5, 0, 0, 0.0, 0.0, 1.0, f32), "out must be uint8 with 4 act_qparams"),
        ((xf, t(packed), t(qp), both, n(), t(np.zeros((4, 5), np.float32)), 5, 0, 1, 0.0, 0.0, 1.0, u8),
         "a uint8 out takes no residual"),
        ((t(np.zeros((4, 6), np.uint8)), t(quantize_weight_int8(np.ones((6, 5), np.float32))[0]),
          t(quantize_weight_int8(np.ones((6, 5), np.float32))[1]), t(xg), n(), n(), 5, 0, 0, 0.0, 0.0, 1.0, f32),
         r"a uint8 x needs K % 4 == 0"),
        ((t(np.zeros((4, 8), np.int8)), t(packed), t(qp), t(xg), n(), n(), 5, 0, 0, 0.0, 0.0, 1.0, f32),
         "x must be float32 or uint8"),
    ]:
        with pytest.raises(ValueError if "must be float32 or" not in message else TypeError, match=message):
            k("dense_i8")(*args)


def test_int8_layers_pass_u8_activations_to_each_other(tmp_path):
    """In the bottleneck, reduce -> spatial and spatial -> expand are int8 layers whose only
    reader is a calibrated int8 layer: they write u8 on the reader's grid (no fp32 tensor, no
    quantizing pass). expand has a residual add and down reads the relu of a sum: fp32 there.
    The u8 written is what the reader would have made of the float32 (the same quantization of
    the same value), so the result is the unchained build's, exactly."""
    import accelkit
    from accelkit.backends import cpu

    proto = _bottleneck_model()
    data = {"x": np.random.default_rng(24).standard_normal((3, 1, 32, 10, 10)).astype(np.float32)}
    chained = accelkit.compile(proto, cache=False, precision="int8", calibration=data)
    assert chained.manifest["int8_u8_edges"] == 2
    # without calibration data, auto quantizes rows dynamically: no grid to write u8 on
    assert accelkit.compile(proto, cache=False, precision="int8").manifest["int8_u8_edges"] == 0
    original = cpu.CPUBackend.after_offload
    try:
        cpu.CPUBackend.after_offload = lambda self, mod, options: (mod, {})
        plain = accelkit.compile(proto, cache=False, precision="int8", calibration=data)
    finally:
        cpu.CPUBackend.after_offload = original
    assert "int8_u8_edges" not in plain.manifest
    fp32 = accelkit.compile(proto, cache=False)
    rng = np.random.default_rng(43)
    x = {"x": rng.standard_normal((1, 32, 10, 10)).astype(np.float32)}
    got = chained.run(x)[0]
    np.testing.assert_array_equal(got, plain.run(x)[0])
    assert _cosine(got, fp32.run(x)[0]) > 0.999
    chained.save(str(tmp_path / "m.akx"))  # the u8 edges survive the artifact
    np.testing.assert_array_equal(accelkit.load(str(tmp_path / "m.akx")).run(x)[0], got)
    # dynamic rows have no grid to write on: nothing is chained
    assert accelkit.compile(proto, cache=False, precision="int8", calibration=data,
                            calibration_method="dynamic").manifest["int8_u8_edges"] == 0


def test_a_layer_read_twice_keeps_its_fp32_output():
    """conv a -> relu -> (conv b, conv c): a's output has two readers, so it stays float32;
    b and c (read once each, by nothing int8) too."""
    from onnx import TensorProto, helper, numpy_helper

    import accelkit
    from conftest import make_model

    rng = np.random.default_rng(44)

    def w(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) / math.sqrt(np.prod(shape[1:]))).astype(np.float32), name)

    nodes = [helper.make_node("Conv", ["x", "Wa"], ["a"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Conv", ["r", "Wb"], ["b"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["r", "Wc"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Add", ["b", "c"], ["y"])]
    F = TensorProto.FLOAT
    proto = make_model(nodes, [helper.make_tensor_value_info("x", F, [1, 32, 8, 8])],
                       [helper.make_tensor_value_info("y", F, [1, 32, 8, 8])],
                       [w("Wa", 32, 32, 3, 3), w("Wb", 32, 32, 3, 3), w("Wc", 32, 32, 3, 3)])
    data = {"x": rng.standard_normal((2, 1, 32, 8, 8)).astype(np.float32)}
    model = accelkit.compile(proto, cache=False, precision="int8", calibration=data)
    assert sum(v for k, v in model.manifest["offloaded"].items() if "_i8" in k) == 3
    assert len(model.manifest["calibration"]["layers"]) == 3 and model.manifest["int8_u8_edges"] == 0
    assert model.manifest["accuracy"]["min_cosine"] > 0.999


def test_a_layer_read_as_x_and_residual_by_one_call_stays_fp32():
    """z = y @ W2 + y: the int8 call reads y twice (x and the residual), so y stays float32."""
    from onnx import TensorProto, helper, numpy_helper

    import accelkit
    from conftest import make_model

    rng = np.random.default_rng(46)
    F = TensorProto.FLOAT
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["m"]), helper.make_node("Relu", ["m"], ["y"]),
             helper.make_node("MatMul", ["y", "W2"], ["m2"]), helper.make_node("Add", ["m2", "y"], ["z"])]
    proto = make_model(nodes, [helper.make_tensor_value_info("x", F, [16, 32])],
                       [helper.make_tensor_value_info("z", F, [16, 48])],
                       [numpy_helper.from_array((rng.standard_normal((32, 48)) / 6).astype(np.float32), "W1"),
                        numpy_helper.from_array((rng.standard_normal((48, 48)) / 7).astype(np.float32), "W2")])
    data = {"x": rng.standard_normal((3, 16, 32)).astype(np.float32)}
    model = accelkit.compile(proto, cache=False, precision="int8", calibration=data, calibration_method="minmax")
    assert sum(v for k, v in model.manifest["offloaded"].items() if "_i8" in k) == 2
    assert model.manifest["int8_u8_edges"] == 0
    x = {"x": data["x"][0]}
    assert _cosine(model.run(x)[0], accelkit.compile(proto, cache=False).run(x)[0]) > 0.999


def test_layers_that_share_a_weight_get_one_range_holding_both():
    """One weight W read by two MatMuls whose inputs differ 5x in scale: both quantize on the
    union of their ranges (the patterns find a layer's range by its weight), not on the last
    one's, which would clip the first layer's input at a fifth of its range."""
    from onnx import TensorProto, helper, numpy_helper

    import accelkit
    from conftest import make_model

    rng = np.random.default_rng(47)
    F = TensorProto.FLOAT
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"]), helper.make_node("Mul", ["a", "s"], ["b"]),
             helper.make_node("MatMul", ["b", "W"], ["y"])]
    proto = make_model(nodes, [helper.make_tensor_value_info("x", F, [16, 40])],
                       [helper.make_tensor_value_info("y", F, [16, 40])],
                       [numpy_helper.from_array((rng.standard_normal((40, 40)) / 6).astype(np.float32), "W"),
                        numpy_helper.from_array(np.array(0.2, np.float32), "s")])
    data = {"x": rng.standard_normal((3, 16, 40)).astype(np.float32)}
    model = accelkit.compile(proto, cache=False, precision="int8", calibration=data, calibration_method="minmax")
    layers = model.manifest["calibration"]["layers"]
    assert len(layers) == 2 and layers[0]["hi"] > 3 * layers[1]["hi"]
    assert model.manifest["accuracy"]["min_cosine"] > 0.99
