"""Kernel-level benchmarks: accelkit's fused dense (GEMM + bias + activation, weights packed once)
against numpy's matmul (OpenBLAS) on the same shapes, in the same run. Each group is one shape
(M x K x N); extra_info carries GFLOP/s. The GEMM-library comparison (MKL, OpenBLAS) is in
docs/KERNELS.md.

    pytest benchmarks/test_kernels_bench.py --benchmark-only --benchmark-group-by=group"""
import time

import numpy as np
import pytest

SETTLE_S = 0.5  # numpy's OpenBLAS threads and TVM's pool spin a while after their last call

SHAPES = [(64, 1024, 512), (64, 512, 1024), (128, 768, 3072), (128, 3072, 768), (1, 768, 768)]


def _ids(shape):
    return "x".join(map(str, shape))


@pytest.fixture(scope="module")
def dense():
    import tvm_ffi

    from accelkit import kernels

    kernels.load()
    return tvm_ffi.get_global_func("accelkit.cpu.dense")


def _operands(shape):
    m, k, n = shape
    rng = np.random.default_rng(0)
    return (rng.standard_normal((m, k)).astype(np.float32),
            (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32),
            rng.standard_normal(n).astype(np.float32))


def _record(benchmark, shape):
    m, k, n = shape
    benchmark.group = f"dense {_ids(shape)}"
    benchmark.extra_info["gflops_at_median"] = None
    benchmark.extra_info["flop"] = 2 * m * k * n


def _gflops(benchmark):
    stats = benchmark.stats.stats if hasattr(benchmark.stats, "stats") else benchmark.stats
    benchmark.extra_info["gflops_at_median"] = round(benchmark.extra_info["flop"] / stats.median / 1e9, 1)


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_accelkit_dense_bias_relu(benchmark, dense, shape):
    import tvm

    from accelkit.backends.cpu import ACT_CODES, pack_weight

    x, w, b = _operands(shape)
    args = [tvm.runtime.tensor(a) for a in (x, pack_weight(w), b, np.zeros(0, np.float32))]
    out = tvm.runtime.tensor(np.zeros((shape[0], shape[2]), np.float32))
    call = lambda: dense(*args, shape[2], ACT_CODES["relu"], 0, 0.0, 0.0, 1.0, out)  # noqa: E731
    call()
    np.testing.assert_allclose(out.numpy(), np.maximum(x @ w + b, 0), rtol=1e-3, atol=1e-3)
    _record(benchmark, shape)
    time.sleep(SETTLE_S)
    benchmark.pedantic(call, rounds=50, warmup_rounds=5, iterations=1)
    _gflops(benchmark)


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_numpy_matmul(benchmark, shape):
    x, w, _ = _operands(shape)
    assert x.dtype == w.dtype == np.float32  # a float64 operand would time numpy's dgemm
    out = np.empty((shape[0], shape[2]), np.float32)
    _record(benchmark, shape)
    time.sleep(SETTLE_S)
    benchmark.pedantic(np.matmul, args=(x, w), kwargs={"out": out}, rounds=50, warmup_rounds=5,
                       iterations=1)
    _gflops(benchmark)
