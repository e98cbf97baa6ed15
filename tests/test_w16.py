"""The dense kernel with 16-bit weights (accelkit.cpu.dense_w16: bf16 or fp16 weights, fp32
activations and sums) against numpy on the rounded weights, on the AVX-512 path and the
portable one; precision="bf16"/"fp16" end to end: the few-row (weight-bound) layers take it,
the rest stay fp32."""
from __future__ import annotations

import math

import numpy as np
import pytest

from accelkit.backends.cpu import ACT_CODES, W16_FORMATS, pack_weight_16
from test_int8 import path  # noqa: F401  -- the native and portable kernel paths
from test_kernels import ACTS, close, k, none, t, with_epilogue  # noqa: F401


def rounded(w: np.ndarray, fmt: str) -> np.ndarray:
    """The weights the kernel computes with, as float64: bf16 (nearest even) or fp16."""
    w = w.astype(np.float32)
    if fmt == "fp16":
        return w.astype(np.float16).astype(np.float64)
    bits = w.view(np.uint32).astype(np.uint64)
    return (((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(np.float32).astype(np.float64)


def test_bf16_rounding_is_to_nearest_even_and_fp16_is_numpys():
    w = np.array([[1.0, 1.00390625, 1.005859375, -3.0e-3, 65504.0, 1e-6]], np.float32)
    p16 = pack_weight_16(w, "bf16")[0, 0, :6]
    # 1 + 2^-8 is a tie between bf16 1.0 and 1.0078125: even keeps 1.0; 1 + 1.5 * 2^-8 rounds up
    assert list(p16[:3]) == [0x3F80, 0x3F80, 0x3F81]
    np.testing.assert_array_equal(pack_weight_16(w, "fp16")[0, 0, :6], w[0].astype(np.float16).view(np.uint16))
    assert pack_weight_16(w, "bf16").shape == (1, 1, 32) and pack_weight_16(w, "bf16").dtype == np.uint16


@pytest.mark.parametrize("fmt", list(W16_FORMATS))
@pytest.mark.parametrize("shape", [(1, 300, 70), (5, 64, 33), (8, 17, 32), (2, 3, 40, 90), (20, 50, 40)])
@pytest.mark.parametrize("act", ["gelu", None])
def test_dense_w16_matches_the_rounded_weights(k, path, fmt, shape, act):
    rng = np.random.default_rng(0)
    *lead, kdim, n = shape
    x = rng.standard_normal((*lead, kdim)).astype(np.float32)
    w = (rng.standard_normal((kdim, n)) / math.sqrt(kdim)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    out = t(np.zeros((*lead, n), np.float32))
    k("dense_w16")(t(x), t(pack_weight_16(w, fmt)), t(b), none(), n, W16_FORMATS[fmt], ACT_CODES[act], 0,
                   0.0, 0.0, 1.0, out)
    close(out.numpy(), ACTS[act](x.astype(np.float64) @ rounded(w, fmt) + b))


@pytest.mark.parametrize("res", [1, 2])
def test_dense_w16_residual_and_scale(k, path, res):
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((3, 45)).astype(np.float32), rng.standard_normal((45, 37)).astype(np.float32)
    r = rng.standard_normal((3, 37)).astype(np.float32)
    out = t(np.zeros((3, 37), np.float32))
    k("dense_w16")(t(x), t(pack_weight_16(w, "bf16")), none(), t(r), 37, 0, ACT_CODES["relu"], res,
                   0.0, 0.0, 0.5, out)
    close(out.numpy(), with_epilogue(0.5 * (x.astype(np.float64) @ rounded(w, "bf16")), r, "relu", res))


def test_dense_w16_refuses_bad_arguments(k):
    x = np.ones((2, 8), np.float32)
    w = pack_weight_16(np.ones((8, 5), np.float32), "bf16")
    out = t(np.zeros((2, 5), np.float32))
    f = k("dense_w16")
    for args, message in [
        ((t(x), t(w.astype(np.int16)), none(), none(), 5, 0, 0, 0, 0.0, 0.0, 1.0, out), "w_16bit must be uint16"),
        ((t(x), t(w[:, :4]), none(), none(), 5, 0, 0, 0, 0.0, 0.0, 1.0, out), r"w_16bit must be \[1, 8, 32\]"),
        ((t(x), t(w), none(), none(), 5, 2, 0, 0, 0.0, 0.0, 1.0, out), r"fmt=2 is out of range \[0, 1\]"),
        ((t(x), t(w), none(), none(), 5, 0, 0, 0, 0.0, 0.0, 1.0, t(np.zeros((2, 6), np.float32))), "last dim N=5"),
    ]:
        with pytest.raises((TypeError, ValueError), match=message):
            f(*args)


def _mlp(rows: int):
    from onnx import TensorProto, helper, numpy_helper

    from conftest import make_model

    rng = np.random.default_rng(3)
    F = TensorProto.FLOAT
    nodes = [helper.make_node("Gemm", ["x", "W1", "b1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "W2", "b2"], ["y"])]
    inits = [numpy_helper.from_array((rng.standard_normal((64, 96)) / 8).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.standard_normal(96).astype(np.float32), "b1"),
             numpy_helper.from_array((rng.standard_normal((96, 10)) / 10).astype(np.float32), "W2"),
             numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "b2")]
    return make_model(nodes, [helper.make_tensor_value_info("x", F, [rows, 64])],
                      [helper.make_tensor_value_info("y", F, [rows, 10])], inits)


@pytest.mark.parametrize("fmt", list(W16_FORMATS))
def test_w16_precision_takes_the_weight_bound_layers_only(fmt):
    import accelkit
    from accelkit import kernels

    few = accelkit.compile(_mlp(2), cache=False, precision=fmt)
    many = accelkit.compile(_mlp(64), cache=False, precision=fmt)
    if kernels.load().w16_path() == "avx512":
        assert few.manifest["offloaded"] == {f"cpu.dense_{fmt}_bias_relu": 1, f"cpu.dense_{fmt}_bias": 1}
    else:  # 16-bit weights would only add conversions here: everything stays fp32
        assert few.manifest["offloaded"] == {"cpu.dense_bias_relu": 1, "cpu.dense_bias": 1}
    assert many.manifest["offloaded"] == {"cpu.dense_bias_relu": 1, "cpu.dense_bias": 1}
    assert few.precision == fmt and few.manifest["accuracy"]["min_cosine"] > 0.9999
    assert many.manifest["accuracy"]["min_cosine"] > 0.999999  # the same fp32 code
