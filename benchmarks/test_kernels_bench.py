"""Kernel-level benchmarks: accelkit's fused dense (GEMM + bias + activation, weights packed once)
against numpy's matmul (OpenBLAS) on the same shapes, in the same run. Each group is one shape
(M x K x N); extra_info carries GFLOP/s. The GEMM-library comparison (MKL, OpenBLAS) is in
docs/KERNELS.md. The attention groups time the fused attention kernel against the three unfused
kernel calls it replaces (bmm, softmax, bmm) at the MiniLM, BERT-base and ViT-B/16 head shapes.

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


# ---- attention: the fused kernel against the three unfused kernel calls ------------------------

ATTENTION = [(128, 12, 32), (128, 12, 64), (197, 12, 64)]  # (S, H, D): MiniLM, BERT-base, ViT-B/16


def _attention_ids(shape):
    return "S{}xH{}xD{}".format(*shape)


@pytest.fixture(scope="module")
def kernel():
    import tvm_ffi

    from accelkit import kernels

    kernels.load()
    return lambda name: tvm_ffi.get_global_func(f"accelkit.cpu.{name}")


def _attention_operands(shape):
    import tvm

    s, h, d = shape
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, s, h, d)).astype(np.float32) for _ in range(3))
    mask = np.where(np.arange(s) < s - 7, 0.0, np.finfo(np.float32).min).astype(np.float32)[None, None, None]
    t = lambda a: tvm.runtime.tensor(np.ascontiguousarray(a))  # noqa: E731
    return q, k, v, mask, t


def _attention_record(benchmark, shape):
    s, h, d = shape
    benchmark.group = f"attention {_attention_ids(shape)}"
    benchmark.extra_info["flop"] = 4 * h * s * s * d


@pytest.mark.parametrize("shape", ATTENTION, ids=_attention_ids)
def test_accelkit_attention_fused(benchmark, kernel, shape):
    """One call: heads read in place from [1, S, H, D], scores in cache, context written merged."""
    q, k, v, mask, t = _attention_operands(shape)
    out = t(np.zeros_like(q))
    args = (t(q), t(k), t(v), t(mask), 1 / np.sqrt(shape[2]), out)
    call = lambda: kernel("attention")(*args)  # noqa: E731
    call()
    _attention_record(benchmark, shape)
    time.sleep(SETTLE_S)
    benchmark.pedantic(call, rounds=50, warmup_rounds=5, iterations=1)
    _gflops(benchmark)


@pytest.mark.parametrize("shape", ATTENTION, ids=_attention_ids)
def test_accelkit_attention_unfused(benchmark, kernel, shape):
    """bmm (scale + mask fused) -> softmax -> bmm on heads already transposed: what the model
    ran before the fused kernel, less its transposes (TVM's, about 30 us per MiniLM layer)."""
    q, k, v, mask, t = _attention_operands(shape)
    s, h, d = shape
    q4, kt, v4 = t(q.transpose(0, 2, 1, 3)), t(k.transpose(0, 2, 3, 1)), t(v.transpose(0, 2, 1, 3))
    scores, probs, ctx = t(np.zeros((1, h, s, s), np.float32)), t(np.zeros((1, h, s, s), np.float32)), t(np.zeros((1, h, s, d), np.float32))
    m, none, scale = t(mask), t(np.zeros(0, np.float32)), 1 / np.sqrt(d)
    bmm, softmax = kernel("bmm"), kernel("softmax")

    def call():
        bmm(q4, kt, m, 0, scale, scores)
        softmax(scores, probs)
        bmm(probs, v4, none, 0, 1.0, ctx)

    call()
    fused = t(np.zeros_like(q))
    kernel("attention")(t(q), t(k), t(v), m, scale, fused)
    np.testing.assert_array_equal(fused.numpy(), ctx.numpy().transpose(0, 2, 1, 3))
    _attention_record(benchmark, shape)
    time.sleep(SETTLE_S)
    benchmark.pedantic(call, rounds=50, warmup_rounds=5, iterations=1)
    _gflops(benchmark)
