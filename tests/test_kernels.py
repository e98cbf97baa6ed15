"""accelkit's C kernels called directly through TVM-FFI: every kernel and epilogue against a
numpy reference, on the AVX-512 path and on the forced portable path, and bad arguments refused
with a clear error before any memory is touched."""
from __future__ import annotations

import math

import numpy as np
import pytest

from accelkit.backends.cpu import (ACT_CODES, depthwise_weight_nhwc, pack_conv_weight, pack_conv_weight_nhwc,
                                   pack_weight, winograd_weight_nhwc)

_erf = np.vectorize(math.erf, otypes=[np.float64])

ACTS = {
    None: lambda v: v,
    "relu": lambda v: np.maximum(v, 0),
    "clip": lambda v: np.clip(v, 0.0, 6.0),
    "gelu": lambda v: 0.5 * v * (1 + _erf(v / math.sqrt(2))),
    "gelu_tanh": lambda v: 0.5 * v * (1 + np.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3))),
    "silu": lambda v: v / (1 + np.exp(-v)),
    "sigmoid": lambda v: 1 / (1 + np.exp(-v)),
    "quick_gelu": lambda v: v / (1 + np.exp(-1.702 * v)),
}


@pytest.fixture(scope="module")
def k():
    from accelkit import kernels

    kernels.load()
    import tvm_ffi

    return lambda name: tvm_ffi.get_global_func(f"accelkit.cpu.{name}")


def _cpu_flags() -> set[str]:
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


CPU_FLAGS = _cpu_flags()
NATIVE_ISA = "avx512" if "avx512f" in CPU_FLAGS else "avx2" if {"avx2", "fma"} <= CPU_FLAGS else "portable"


@pytest.fixture(params=["native", "avx2", "portable"])
def isa(request, monkeypatch):
    """Run a test on the CPU's best path, again on the AVX2 one (an AVX-512 CPU runs both), and
    on the forced portable one."""
    from accelkit import kernels

    module = kernels.load()
    monkeypatch.delenv("ACCELKIT_PORTABLE_KERNELS", raising=False)
    monkeypatch.delenv("ACCELKIT_KERNEL_ISA", raising=False)
    if request.param == "avx2":
        if NATIVE_ISA != "avx512":
            pytest.skip(f"the native path is {NATIVE_ISA}: no separate AVX2 run")
        monkeypatch.setenv("ACCELKIT_KERNEL_ISA", "avx2")
    elif request.param == "portable":
        monkeypatch.setenv("ACCELKIT_PORTABLE_KERNELS", "1")
    module.register()
    yield module.isa()
    monkeypatch.delenv("ACCELKIT_PORTABLE_KERNELS", raising=False)
    monkeypatch.delenv("ACCELKIT_KERNEL_ISA", raising=False)
    module.register()


def t(a):
    import tvm

    return tvm.runtime.tensor(np.ascontiguousarray(a))


def none():
    return t(np.zeros(0, np.float32))


def close(got, want, tol=2e-5):
    want = np.asarray(want, np.float64)
    err = np.linalg.norm(got.astype(np.float64) - want) / max(np.linalg.norm(want), 1e-30)
    assert err < tol, f"relative L2 error {err:.2e}"


def test_portable_path_is_selected_by_the_environment(isa, request):
    want = {"native": NATIVE_ISA, "avx2": "avx2", "portable": "portable"}
    assert isa == want[request.node.callspec.params["isa"]]


def test_kernel_isa_cap_is_checked(monkeypatch):
    """ACCELKIT_KERNEL_ISA caps the dispatch (never above the CPU's best); a value that is not an
    instruction set is refused with the choices, not ignored."""
    import accelkit
    from accelkit import kernels

    module = kernels.load()
    try:
        monkeypatch.setenv("ACCELKIT_KERNEL_ISA", "portable")
        module.register()
        assert module.isa() == "portable"
        monkeypatch.setenv("ACCELKIT_KERNEL_ISA", "avx512")
        module.register()
        assert module.isa() == NATIVE_ISA
    finally:
        monkeypatch.delenv("ACCELKIT_KERNEL_ISA")
        module.register()
    monkeypatch.setenv("ACCELKIT_KERNEL_ISA", "sse9")
    kernels.load.cache_clear()
    try:
        with pytest.raises(accelkit.OptionError, match="ACCELKIT_KERNEL_ISA='sse9' .* portable, avx2, avx512"):
            kernels.load()
    finally:
        monkeypatch.delenv("ACCELKIT_KERNEL_ISA")
        kernels.load.cache_clear()
        kernels.load()


@pytest.mark.parametrize("shape", [(5, 7, 45), (64, 96, 64), (1, 33, 31), (3, 2, 17, 40)])
@pytest.mark.parametrize("act", list(ACTS))
def test_dense_every_activation(k, isa, shape, act):
    rng = np.random.default_rng(0)
    *lead, kdim, n = shape
    x = rng.standard_normal((*lead, kdim)).astype(np.float32)
    w = rng.standard_normal((kdim, n)).astype(np.float32) / math.sqrt(kdim)
    b = rng.standard_normal(n).astype(np.float32)
    out = t(np.zeros((*lead, n), np.float32))
    k("dense")(t(x), t(pack_weight(w)), t(b), none(), n, ACT_CODES[act], 0, 0.0, 6.0, 1.0, out)
    close(out.numpy(), ACTS[act](x.astype(np.float64) @ w + b))


@pytest.mark.parametrize("kdim", [20, 1100])  # 1100: K-blocked, the epilogue on the last block
@pytest.mark.parametrize("mode", [1, 2, 3])
def test_dense_residual_before_and_after_activation_or_multiplied(k, isa, mode, kdim):
    """res_mode 1: act(h + r), 2: act(h) + r, 3: act(h) * r (a gated MLP's two projections)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((9, kdim)).astype(np.float32)
    w = (rng.standard_normal((kdim, 37)) / math.sqrt(kdim)).astype(np.float32)
    r = rng.standard_normal((9, 37)).astype(np.float32)
    out = t(np.zeros((9, 37), np.float32))
    k("dense")(t(x), t(pack_weight(w)), none(), t(r), 37, ACT_CODES["relu"], mode, 0.0, 0.0, 1.0, out)
    h = x.astype(np.float64) @ w
    close(out.numpy(), {1: np.maximum(h + r, 0), 2: np.maximum(h, 0) + r, 3: np.maximum(h, 0) * r}[mode])
    with pytest.raises(Exception, match="res_mode"):
        k("dense")(t(x), t(pack_weight(w)), none(), t(r), 37, 0, 4, 0.0, 0.0, 1.0, out)


@pytest.mark.parametrize("rows", [64, 67, 200])
def test_dense_splits_rows_for_a_cached_model_with_the_same_result(k, isa, rows):
    """A model small enough to stay in the last-level cache (set_model_bytes, as the runner does
    before each run) has its dense layers split by rows instead of weight panels: the same sums,
    bit for bit (K = 1100: K-blocked), including odd row counts and a partial last panel."""
    import tvm_ffi

    tell = tvm_ffi.get_global_func("accelkit.cpu.set_model_bytes")
    rng = np.random.default_rng(8)
    x, w = rng.standard_normal((rows, 1100)).astype(np.float32), rng.standard_normal((1100, 75)).astype(np.float32)
    b, r = rng.standard_normal(75).astype(np.float32), rng.standard_normal((rows, 75)).astype(np.float32)
    outs = []
    try:
        for size in (0, 1):  # unknown: the weight panels are split; a 1-byte model: the rows
            tell(size)
            out = t(np.zeros((rows, 75), np.float32))
            k("dense")(t(x), t(pack_weight(w)), t(b), t(r), 75, ACT_CODES["relu"], 2, 0.0, 0.0, 1.0, out)
            outs.append(out.numpy())
    finally:
        tell(0)
    close(outs[1], np.maximum(x.astype(np.float64) @ w + b, 0) + r)
    assert np.array_equal(outs[0], outs[1])
    with pytest.raises(Exception, match="bytes=-1 is out of range"):
        tell(-1)

def test_dense_k_blocks_outer_same_result(k, isa):
    """Untuned with K > 1024 (K blocks of 512) the thread runs its K blocks outer and its weight
    panels inner (10 panels: 5 a thread); a tuned config keeps the panels outer: the same sums,
    bit for bit."""
    from accelkit.tuning.kernels import pack_config

    rng = np.random.default_rng(9)
    x, w = rng.standard_normal((40, 2100)).astype(np.float32), rng.standard_normal((2100, 300)).astype(np.float32)
    b = rng.standard_normal(300).astype(np.float32)
    outs = []
    for config in (None, pack_config(threads=2, grain=4, kc=512)):
        out = t(np.zeros((40, 300), np.float32))
        k("dense")(t(x), t(pack_weight(w)), t(b), none(), 300, ACT_CODES["gelu"], 0, 0.0, 0.0, 1.0,
                   *([] if config is None else [config]), out)
        outs.append(out.numpy())
    close(outs[0], ACTS["gelu"](x.astype(np.float64) @ w + b))
    assert np.array_equal(outs[0], outs[1])

@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("b_batch", ["same", "broadcast"])
def test_bmm(k, isa, trans_b, b_batch):
    rng = np.random.default_rng(2)
    a = rng.standard_normal((2, 3, 17, 40)).astype(np.float32)
    b = rng.standard_normal((2, 3, 40, 35) if b_batch == "same" else (1, 1, 40, 35)).astype(np.float32)
    out = t(np.zeros((2, 3, 17, 35), np.float32))
    bb = np.swapaxes(b, -1, -2) if trans_b else b
    k("bmm")(t(a), t(bb), none(), trans_b, 0.125, out)
    close(out.numpy(), 0.125 * (a.astype(np.float64) @ b))



@pytest.mark.parametrize("array", [np.arange(300_000, dtype=np.float32).reshape(3, 100_000),
                                   np.arange(70, dtype=np.int64), np.eye(9, dtype=bool),
                                   np.zeros((0, 4), np.float32)], ids=["f32-1.2MB", "i64", "bool", "empty"])
def test_copy_stages_any_dtype_over_the_pool(k, array):
    """The runner's input staging: every byte arrives, whatever the dtype or size (the chunks
    split over the threads, a short last chunk)."""
    import tvm
    import tvm_ffi

    dst = tvm.runtime.empty(array.shape, str(array.dtype), tvm.cpu(0))
    k("copy")(tvm_ffi.from_dlpack(array), dst)
    np.testing.assert_array_equal(dst.numpy(), array)


def test_copy_refuses_mismatches(k):
    import tvm
    import tvm_ffi

    src = tvm_ffi.from_dlpack(np.ones((4, 6), np.float32))
    with pytest.raises(Exception, match="dst must have the shape of src"):
        k("copy")(src, tvm.runtime.empty((4, 5), "float32", tvm.cpu(0)))
    with pytest.raises(Exception, match="dst must have src's dtype"):
        k("copy")(src, tvm.runtime.empty((4, 6), "int32", tvm.cpu(0)))
    with pytest.raises(Exception, match="src must be contiguous"):
        k("copy")(tvm_ffi.from_dlpack(np.ones((4, 12), np.float32)[:, ::2]),
                  tvm.runtime.empty((4, 6), "float32", tvm.cpu(0)))

@pytest.mark.parametrize("res_shape", [(2, 3, 17, 35), (1, 1, 17, 35), (1, 1, 1, 35), (17, 35), (35,)])
def test_bmm_adds_a_broadcast_residual(k, isa, res_shape):
    """scale * a @ b + res, res broadcast like numpy over rows and batch (attention's mask)."""
    rng = np.random.default_rng(4)
    a = rng.standard_normal((2, 3, 17, 40)).astype(np.float32)
    b = rng.standard_normal((2, 3, 35, 40)).astype(np.float32)
    r = rng.standard_normal(res_shape).astype(np.float32)
    out = t(np.zeros((2, 3, 17, 35), np.float32))
    k("bmm")(t(a), t(b), t(r), 1, 0.5, out)
    close(out.numpy(), 0.5 * (a.astype(np.float64) @ np.swapaxes(b, -1, -2)) + r)


def attention_ref(q, k, v, mask, scale):
    """Multi-head attention in float64, q/k/v/out heads-interleaved [B, S, H, D]."""
    q4, kt, v4 = (np.asarray(x, np.float64) for x in (q.transpose(0, 2, 1, 3), k.transpose(0, 2, 3, 1),
                                                       v.transpose(0, 2, 1, 3)))
    s = scale * (q4 @ kt) + (0.0 if mask is None else mask)
    p = np.exp(s - s.max(-1, keepdims=True))
    return ((p / p.sum(-1, keepdims=True)) @ v4).transpose(0, 2, 1, 3)


@pytest.mark.parametrize("shape,mask_shape", [
    ((1, 128, 128, 12, 32, 32), (1, 1, 128, 128)),  # all-MiniLM-L6-v2's heads, its mask
    ((2, 17, 45, 3, 20, 40), (2, 1, 1, 45)),        # per batch item; Sk, D, Dv off the tiles
    ((1, 5, 33, 1, 64, 7), None),                   # one head, no mask, a short last V panel
    ((2, 9, 70, 4, 8, 8), (4, 9, 70)),              # per head and row
    ((3, 1, 1, 2, 5, 3), (1,)),                     # one query, one key
    ((1, 37, 20, 3, 16, 16), (37, 20)),             # 3 heads: on 2 threads, rows split unevenly
])
def test_attention(k, isa, shape, mask_shape):
    """The fused kernel against float64 numpy: both head layouts, every broadcast of the mask,
    tails of every tile (rows, key panels, value panels) and a split of a head's rows."""
    b, s, sk, h, d, dv = shape
    rng = np.random.default_rng(11)
    q, kk = (rng.standard_normal((b, n, h, d)).astype(np.float32) for n in (s, sk))
    v = rng.standard_normal((b, sk, h, dv)).astype(np.float32)
    mask = rng.standard_normal(mask_shape).astype(np.float32) * 3 if mask_shape else None
    out = t(np.full((b, s, h, dv), np.nan, np.float32))
    k("attention")(t(q), t(kk), t(v), t(mask) if mask_shape else none(), 0.3, out)
    close(out.numpy(), attention_ref(q, kk, v, mask, 0.3), tol=1e-6)


def test_attention_matches_the_unfused_calls_bit_for_bit(k, isa):
    """The same micro-kernel and softmax as bmm -> softmax -> bmm, in the same order: a fused
    model's outputs equal the unfused one's exactly, a row masked with -inf included (whatever
    the instruction set makes of it). A fully masked row (the exporters' -FLT_MAX) averages the
    values, as onnxruntime does."""
    b, s, h, d = 2, 24, 3, 16
    rng = np.random.default_rng(12)
    q, kk, v = (rng.standard_normal((b, s, h, d)).astype(np.float32) for _ in range(3))
    mask = np.where(rng.random((b, 1, s, s)) < 0.3, np.finfo(np.float32).min, 0).astype(np.float32)
    mask[:, :, 5] = np.finfo(np.float32).min
    mask[:, :, 7] = -np.inf
    out = t(np.zeros((b, s, h, d), np.float32))
    k("attention")(t(q), t(kk), t(v), t(mask), 0.25, out)
    scores, probs, ctx = (t(np.zeros(shape, np.float32)) for shape in ((b, h, s, s), (b, h, s, s), (b, h, s, d)))
    k("bmm")(t(q.transpose(0, 2, 1, 3)), t(kk.transpose(0, 2, 3, 1)), t(np.broadcast_to(mask, (b, h, s, s))), 0, 0.25,
             scores)
    k("softmax")(scores, probs)
    k("bmm")(probs, t(v.transpose(0, 2, 1, 3)), none(), 0, 1.0, ctx)
    np.testing.assert_array_equal(out.numpy(), ctx.numpy().transpose(0, 2, 1, 3))
    np.testing.assert_allclose(out.numpy()[:, 5], np.broadcast_to(v.mean(1), (b, h, d)), rtol=1e-5, atol=1e-6)
    finite = np.arange(s) != 7
    close(out.numpy()[:, finite], attention_ref(q, kk, v, np.maximum(mask, -1e30), 0.25)[:, finite], tol=1e-6)


def test_attention_same_result_under_every_thread_count(k, isa):
    """One thread, all of them, and two (3 heads on 2 threads: each head's rows split in blocks):
    the same bits."""
    from accelkit.tuning.kernels import pack_config

    rng = np.random.default_rng(13)
    q, kk, v = (rng.standard_normal((1, 40, 3, 24)).astype(np.float32) for _ in range(3))
    ref = None
    for config in (0, pack_config(threads=1), pack_config(threads=2)):
        out = t(np.zeros((1, 40, 3, 24), np.float32))
        k("attention")(t(q), t(kk), t(v), none(), 0.5, config, out)
        ref = out.numpy() if ref is None else (np.testing.assert_array_equal(out.numpy(), ref) or ref)
    close(ref, attention_ref(q, kk, v, None, 0.5), tol=1e-6)


def test_attention_refuses_bad_arguments(k):
    q, kk, v = (np.zeros((1, 4, 2, 8), np.float32) for _ in range(3))
    out = t(np.zeros((1, 4, 2, 8), np.float32))
    att = k("attention")
    with pytest.raises(ValueError, match=r"k must be \[B=1, Sk, H=2, D=8\] like q"):
        att(t(q), t(np.zeros((1, 4, 2, 6), np.float32)), t(v), none(), 1.0, out)
    with pytest.raises(ValueError, match=r"v must be \[B=1, Sk=5, H=2, Dv\]"):
        att(t(q), t(np.zeros((1, 5, 2, 8), np.float32)), t(v), none(), 1.0, out)
    with pytest.raises(ValueError, match=r"out must be \[B, S, H, Dv\] = \[1, 4, 2, 8\]"):
        att(t(q), t(kk), t(v), none(), 1.0, t(np.zeros((1, 2, 4, 8), np.float32)))
    with pytest.raises(ValueError, match=r"mask must broadcast to the scores \[B, H, S, Sk\] = \[1, 2, 4, 4\]"):
        att(t(q), t(kk), t(v), t(np.zeros((3, 4, 4), np.float32)), 1.0, out)
    with pytest.raises(ValueError, match="mask must broadcast"):
        att(t(q), t(kk), t(v), t(np.zeros((4, 1), np.float32)), 1.0, out)
    with pytest.raises(ValueError, match="head size D=0"):
        att(t(np.zeros((1, 4, 2, 0), np.float32)), t(np.zeros((1, 4, 2, 0), np.float32)), t(v), none(), 1.0, out)
    with pytest.raises(ValueError, match="q must have rank 4..4"):
        att(t(q[0]), t(kk), t(v), none(), 1.0, out)
    with pytest.raises(TypeError, match="v must be float32"):
        att(t(q), t(kk), t(v.astype(np.float64)), none(), 1.0, out)
    with pytest.raises(ValueError, match="k must be contiguous"):
        import tvm_ffi
        att(t(q), tvm_ffi.from_dlpack(np.zeros((1, 2, 4, 8), np.float32).transpose(0, 2, 1, 3)), t(v), none(), 1.0, out)
    with pytest.raises(TypeError, match="expected 6 arguments"):
        att(t(q), t(kk), t(v), none(), out)
    with pytest.raises(ValueError, match="mask must broadcast"):  # empty but not the absent [0]
        att(t(q), t(kk), t(v), t(np.zeros((0, 4), np.float32)), 1.0, out)
    with pytest.raises(ValueError, match="out overlaps q: attention cannot run in place"):
        shared = t(q)
        att(shared, t(kk), t(v), none(), 1.0, shared)
    # no keys: the softmax is over nothing and the context is zeros
    out = t(np.full((1, 4, 2, 8), np.nan, np.float32))
    att(t(q), t(np.zeros((1, 0, 2, 8), np.float32)), t(np.zeros((1, 0, 2, 8), np.float32)), none(), 1.0, out)
    np.testing.assert_array_equal(out.numpy(), 0)


def with_epilogue(want, r, act, res):
    """The kernels' epilogue on a reference result: residual r before (res 1) or after (res 2)
    the activation."""
    if res == 1:
        want = want + r
    want = ACTS[act](want)
    return want + r if res == 2 else want


def conv_ref(x, w, b, stride, pads, dilation, groups):
    """Direct NCHW convolution in float64; pads = (top, left, bottom, right)."""
    n, c, h, wd = x.shape
    cout, cg, kh, kw = w.shape
    xp = np.zeros((n, c, h + pads[0] + pads[2], wd + pads[1] + pads[3]))
    xp[:, :, pads[0]:pads[0] + h, pads[1]:pads[1] + wd] = x
    oh = (xp.shape[2] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (xp.shape[3] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    out = np.zeros((n, cout, oh, ow))
    per = cout // groups
    for o in range(cout):
        g = o // per
        for ky in range(kh):
            for kx in range(kw):
                patch = xp[:, g * cg:(g + 1) * cg,
                           ky * dilation[0]: ky * dilation[0] + stride[0] * (oh - 1) + 1: stride[0],
                           kx * dilation[1]: kx * dilation[1] + stride[1] * (ow - 1) + 1: stride[1]]
                out[:, o] += np.einsum("nchw,c->nhw", patch, w[o, :, ky, kx])
    return out + b.reshape(1, -1, 1, 1)


CONVS = [  # (n, c, h, w, cout, k, stride, pads, dilation, groups)
    (1, 8, 9, 11, 16, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),
    (2, 8, 9, 11, 16, 1, (1, 1), (0, 0, 0, 0), (1, 1), 1),
    (1, 3, 20, 18, 8, 7, (2, 2), (3, 3, 3, 3), (1, 1), 1),
    (1, 8, 9, 11, 16, 3, (2, 1), (0, 1, 1, 0), (1, 2), 2),
    (2, 12, 10, 13, 12, 3, (1, 1), (1, 1, 1, 1), (1, 1), 12),   # depthwise
    (1, 12, 10, 13, 12, 3, (2, 2), (0, 0, 1, 1), (1, 1), 12),   # depthwise, asymmetric pad
    (1, 12, 10, 13, 12, 3, (2, 2), (2, 2, 2, 2), (2, 2), 12),   # depthwise, dilated
    (1, 12, 10, 13, 12, 3, (1, 2), (1, 0, 1, 2), (1, 1), 12),   # depthwise, uneven strides
    (1, 4, 7, 7, 4, 5, (3, 3), (2, 2, 2, 2), (1, 1), 4),        # depthwise, stride 3
    (1, 16, 5, 6, 72, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),      # many channels, few pixels:
    (2, 40, 4, 4, 100, 1, (1, 1), (0, 0, 0, 0), (1, 1), 1),     # the B-resident GEMM order
    (1, 16, 15, 13, 24, 1, (2, 2), (0, 0, 0, 0), (1, 1), 1),    # 1x1 stride 2 (downsample)
    (1, 5, 23, 37, 16, 3, (2, 2), (1, 2, 0, 1), (1, 2), 1),     # stride 2, odd sizes, dilated
    (2, 3, 41, 40, 8, 7, (2, 2), (3, 3, 3, 3), (1, 1), 1),      # the ResNet stem, batch 2
]


@pytest.mark.parametrize("case", CONVS, ids=lambda c: "x".join(map(str, c[:6])) + f"g{c[-1]}")
@pytest.mark.parametrize("act,res", [(None, 0), ("clip", 0), ("relu", 1), (None, 2)])
@pytest.mark.parametrize("packed", [False, True], ids=["oihw", "packed"])
def test_conv2d(k, isa, case, act, res, packed):
    n, c, h, wd, cout, ks, stride, pads, dil, groups = case
    rng = np.random.default_rng(3)
    x = rng.standard_normal((n, c, h, wd)).astype(np.float32)
    w = rng.standard_normal((cout, c // groups, ks, ks)).astype(np.float32) * 0.3
    b = rng.standard_normal(cout).astype(np.float32)
    want = conv_ref(x.astype(np.float64), w.astype(np.float64), b, stride, pads, dil, groups)
    r = rng.standard_normal(want.shape).astype(np.float32)
    out = t(np.zeros(want.shape, np.float32))
    if packed:
        w = pack_conv_weight(w, groups)  # the compiler's layout for the GEMM path (incl. groups)
    k("conv2d")(t(x), t(w), t(b), t(r) if res else none(), groups, *stride, pads[0], pads[1], *dil,
                ACT_CODES[act], res, 0.0, 6.0, 1.0, out)
    want = with_epilogue(want, r, act, res)
    close(out.numpy(), want)


NHWC_CONVS = CONVS + [  # channel counts around the 16-lane vectors and 64-channel chunks
    (1, 6, 5, 5, 4, 3, (1, 1), (1, 1, 1, 1), (1, 1), 2),        # grouped, not depthwise
    (1, 64, 14, 14, 70, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),    # a partial last panel
    (1, 100, 9, 9, 100, 3, (1, 1), (1, 1, 1, 1), (1, 1), 100),  # depthwise 64 + 36 channels
    (1, 60, 6, 7, 60, 3, (1, 1), (1, 1, 1, 1), (1, 1), 60),     # depthwise, 4 vectors, last partial
    (2, 64, 6, 7, 64, 3, (2, 1), (1, 0, 1, 1), (1, 1), 64),     # depthwise, whole vectors, batch 2
    (1, 48, 7, 9, 48, 3, (1, 1), (2, 2, 2, 2), (2, 2), 48),     # depthwise, dilated: no 3-tap fast path
    (1, 3, 30, 31, 32, 3, (2, 2), (0, 0, 1, 1), (1, 1), 1),     # the MobileNetV2 stem (short runs)
    (1, 160, 5, 5, 40, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),     # K = 1440: K-blocked by default
    (3, 8, 7, 5, 16, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),       # gathered rows run across images
    # 1x1, more output channels than pixels: panel-major items; an odd panel count shares its
    # middle panel between two row blocks
    (1, 96, 7, 7, 160, 1, (1, 1), (0, 0, 0, 0), (1, 1), 1),     # 5 panels over 49 rows
    (2, 40, 3, 5, 70, 1, (1, 1), (0, 0, 0, 0), (1, 1), 1),      # 3 panels (last partial), batch 2
    # few channels on wide images (kernel rows read in place on AVX-512, edge pixels gathered):
    (1, 3, 5, 90, 40, 7, (2, 2), (3, 3, 3, 3), (1, 1), 1),      # a stem: 7x7 stride 2, 2 panels
    (2, 4, 7, 75, 24, 5, (1, 2), (2, 1, 2, 1), (1, 1), 1),      # 5x5, stride (1, 2), batch 2
    (1, 1, 4, 70, 16, 3, (1, 1), (0, 0, 1, 1), (1, 1), 1),      # 1 channel, no top/left pad
]


@pytest.mark.parametrize("case", NHWC_CONVS, ids=lambda c: "x".join(map(str, c[:6])) + f"g{c[-1]}")
@pytest.mark.parametrize("act,res", [(None, 0), ("clip", 0), ("relu", 1), ("silu", 2)])
def test_conv2d_nhwc(k, isa, case, act, res):
    """The channels-last kernel against the NCHW reference, transposed: the GEMM path (packed
    weights, in-place A for 1x1 or gathered rows) and the depthwise path (weights [KH, KW, C])."""
    n, c, h, wd, cout, ks, stride, pads, dil, groups = case
    rng = np.random.default_rng(3)
    x = rng.standard_normal((n, c, h, wd)).astype(np.float32)
    w = rng.standard_normal((cout, c // groups, ks, ks)).astype(np.float32) * 0.3
    b = rng.standard_normal(cout).astype(np.float32)
    want = conv_ref(x.astype(np.float64), w.astype(np.float64), b, stride, pads, dil, groups)
    r = rng.standard_normal(want.shape).astype(np.float32)
    depthwise = groups == c == cout and groups > 1
    weight = depthwise_weight_nhwc(w) if depthwise else pack_conv_weight_nhwc(w, groups)
    out = t(np.zeros(want.transpose(0, 2, 3, 1).shape, np.float32))
    k("conv2d_nhwc")(t(x.transpose(0, 2, 3, 1)), t(weight), t(b),
                     t(r.transpose(0, 2, 3, 1)) if res else none(), groups, *stride, pads[0], pads[1],
                     *dil, ACT_CODES[act], res, 0.0, 6.0, 1.0, out)
    want = with_epilogue(want, r, act, res)
    close(out.numpy(), want.transpose(0, 2, 3, 1))


WINOGRAD_CONVS = [  # (n, c, h, w, cout, pads): 3x3 stride 1; sizes that are not whole 4x4 tiles
    (1, 8, 9, 11, 16, (1, 1, 1, 1)),
    (2, 16, 5, 6, 72, (1, 1, 1, 1)),      # batch 2, three panels (the last partial)
    (1, 3, 7, 5, 40, (0, 0, 0, 0)),       # unpadded, 3 channels (partial vectors)
    (1, 21, 13, 9, 33, (2, 1, 0, 2)),     # asymmetric pads, odd channel counts
    (1, 32, 40, 40, 64, (1, 1, 1, 1)),    # 100 tiles: several tile blocks
    (1, 200, 6, 6, 40, (1, 1, 1, 1)),     # long C (K of the 36 GEMMs)
]


@pytest.mark.parametrize("case", WINOGRAD_CONVS, ids=lambda c: "x".join(map(str, c[:5])))
@pytest.mark.parametrize("act,res", [(None, 0), ("clip", 0), ("relu", 1), ("silu", 2)])
def test_conv2d_nhwc_winograd(k, isa, case, act, res):
    """Winograd F(4x4, 3x3) (weights transformed at compile time, rank 4) against the float64
    direct conv: the same results as the GEMM path, to the transforms' rounding (~1e-6)."""
    n, c, h, wd, cout, pads = case
    rng = np.random.default_rng(11)
    x = rng.standard_normal((n, c, h, wd)).astype(np.float32)
    w = (rng.standard_normal((cout, c, 3, 3)) / math.sqrt(9 * c)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    want = conv_ref(x.astype(np.float64), w.astype(np.float64), b, (1, 1), pads, (1, 1), 1)
    r = rng.standard_normal(want.shape).astype(np.float32)
    out = t(np.zeros(want.transpose(0, 2, 3, 1).shape, np.float32))
    k("conv2d_nhwc")(t(x.transpose(0, 2, 3, 1)), t(winograd_weight_nhwc(w)), t(b),
                     t(r.transpose(0, 2, 3, 1)) if res else none(), 1, 1, 1, pads[0], pads[1], 1, 1,
                     ACT_CODES[act], res, 0.0, 6.0, 1.0, out)
    want = with_epilogue(want, r, act, res)
    close(out.numpy(), want.transpose(0, 2, 3, 1))


def test_winograd_weight_transform_is_exact():
    """U = G g G^T, then the kernel's B^T / A^T: a 1x1 input patch through the transforms of one
    tile must give the direct 3x3 products (checked in float64 on the packed layout)."""
    rng = np.random.default_rng(12)
    w = rng.standard_normal((5, 2, 3, 3))
    u = winograd_weight_nhwc(w.astype(np.float32)).astype(np.float64)  # [36, 1, 2, 32]
    assert u.shape == (36, 1, 2, 32) and not u[..., 5:].any()
    bt = np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                   [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], np.float64)
    at = np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
                  np.float64)
    d = rng.standard_normal((2, 6, 6))  # one tile's 6x6 input patch, 2 channels
    v = np.einsum("ai,cij,bj->abc", bt, d, bt).reshape(36, 2)
    m = np.einsum("xc,xco->xo", v, u[:, 0, :, :5]).reshape(6, 6, 5)
    y = np.einsum("ai,ijo,bj->oab", at, m, at)
    direct = np.zeros((5, 4, 4))
    for oy in range(4):
        for ox in range(4):
            direct[:, oy, ox] = np.einsum("cij,ocij->o", d[:, oy:oy + 3, ox:ox + 3], w)
    np.testing.assert_allclose(y, direct, rtol=1e-5, atol=1e-5)


def test_conv2d_nhwc_refuses_bad_arguments(k):
    import tvm_ffi

    conv = k("conv2d_nhwc")
    x = t(np.ones((1, 5, 5, 4), np.float32))
    out = t(np.zeros((1, 5, 5, 6), np.float32))
    packed = t(pack_conv_weight_nhwc(np.ones((6, 2, 3, 3), np.float32), 2))
    conv(x, packed, none(), none(), 2, 1, 1, 1, 1, 1, 1, 0, 0, 0.0, 0.0, 1.0, out)
    assert np.allclose(out.numpy()[0, 2, 2], 18.0)  # 2 channels x 9 taps of ones
    with pytest.raises(ValueError, match="do not split into 3 groups"):
        conv(x, packed, none(), none(), 3, 1, 1, 1, 1, 1, 1, 0, 0, 0.0, 0.0, 1.0, out)
    with pytest.raises(ValueError, match=r"packed w must be \[1, 1, KH, KW, 4, 32\]"):
        conv(x, packed, none(), none(), 1, 1, 1, 1, 1, 1, 1, 0, 0, 0.0, 0.0, 1.0, out)
    with pytest.raises(ValueError, match="a rank-3 w .* is the depthwise form"):
        conv(x, t(np.ones((3, 3, 4), np.float32)), none(), none(), 2, 1, 1, 1, 1, 1, 1, 0, 0, 0.0, 0.0, 1.0, out)
    with pytest.raises(ValueError, match="not rank 5"):
        conv(x, t(np.ones((6, 2, 3, 3, 1), np.float32)), none(), none(), 2, 1, 1, 1, 1, 1, 1, 0, 0, 0.0, 0.0, 1.0, out)
    # the Winograd form: its shape, and only for 3x3 stride-1 undilated ungrouped convs
    wino = t(winograd_weight_nhwc(np.ones((6, 4, 3, 3), np.float32)))
    conv(x, wino, none(), none(), 1, 1, 1, 1, 1, 1, 1, 0, 0, 0.0, 0.0, 1.0, out)
    assert np.allclose(out.numpy()[0, 2, 2], 36.0) and np.allclose(out.numpy()[0, 0, 0], 16.0)
    with pytest.raises(ValueError, match=r"Winograd F\(4x4, 3x3\) form: it must be \[36, 1, 4, 32\]"):
        conv(x, t(np.ones((6, 2, 3, 3), np.float32)), none(), none(), 1, 1, 1, 1, 1, 1, 1, 0, 0, 0.0, 0.0, 1.0, out)
    for groups, strides, dilations in ((2, (1, 1), (1, 1)), (1, (2, 1), (1, 1)), (1, (1, 1), (1, 2))):
        with pytest.raises(ValueError, match="Winograd form is for ungrouped, stride-1, undilated"):
            conv(x, wino, none(), none(), groups, *strides, 1, 1, *dilations, 0, 0, 0.0, 0.0, 1.0, out)
    with pytest.raises(ValueError, match="bias must have 6 elements"):
        conv(x, packed, t(np.ones(4, np.float32)), none(), 2, 1, 1, 1, 1, 1, 1, 0, 0, 0.0, 0.0, 1.0, out)
    with pytest.raises(ValueError, match="res must have the shape of out"):
        conv(x, packed, none(), t(np.ones((1, 5, 5, 4), np.float32)), 2, 1, 1, 1, 1, 1, 1, 0, 1, 0.0, 0.0, 1.0, out)
    # packed panels are read with aligned vector loads: a misaligned buffer is refused, not read
    flat = np.zeros(packed.numpy().size + 16, np.float32)
    view = flat[1:1 + packed.numpy().size].reshape(packed.shape)
    with pytest.raises(ValueError, match="must be 64-byte aligned"):
        conv(x, tvm_ffi.from_dlpack(view), none(), none(), 2, 1, 1, 1, 1, 1, 1, 0, 0, 0.0, 0.0, 1.0, out)


def test_layer_norm_and_softmax(k, isa):
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((3, 5, 70)) * 4 + 2).astype(np.float32)
    g, b = rng.standard_normal(70).astype(np.float32), rng.standard_normal(70).astype(np.float32)
    out = t(np.zeros_like(x))
    k("layer_norm")(t(x), t(g), t(b), 1e-5, out)
    xd = x.astype(np.float64)
    mean, var = xd.mean(-1, keepdims=True), xd.var(-1, keepdims=True)
    close(out.numpy(), (xd - mean) / np.sqrt(var + 1e-5) * g + b)
    k("softmax")(t(x), out)
    e = np.exp(xd - xd.max(-1, keepdims=True))
    close(out.numpy(), e / e.sum(-1, keepdims=True))
    for d, eps in ((3, 0.7), (16, 1e-6), (33, 0.7), (70, 1e-6), (768, 0.7)):  # tails, vectors, Llama's width
        xr = (rng.standard_normal((4, d)) * 0.5).astype(np.float32)  # mean square near eps: eps counts
        gr = rng.standard_normal(d).astype(np.float32)
        out_r = t(np.zeros_like(xr))
        k("rms_norm")(t(xr), t(gr), eps, out_r)
        xd_r = xr.astype(np.float64)
        close(out_r.numpy(), xd_r / np.sqrt((xd_r ** 2).mean(-1, keepdims=True) + eps) * gr)
    wide = rng.standard_normal((2, 18710)).astype(np.float32) * 10  # a long classifier axis
    out = t(np.zeros_like(wide))
    k("softmax")(t(wide), out)
    e = np.exp(wide - wide.max(-1, keepdims=True))
    close(out.numpy(), e / e.sum(-1, keepdims=True), 1e-6)


def test_kernels_flush_denormals_and_restore_the_callers_mode(k, isa):
    """Subnormal inputs read as zero and subnormal results become zero inside the kernels (each
    one costs an x86 core a microcode assist: a masked softmax's exp(-100) made the next matmul
    27x slower), and the caller's floating-point mode is left as it was."""
    tiny = np.float32(1e-39)  # subnormal: below float32's smallest normal, 1.18e-38
    x = np.full((64, 48), tiny, np.float32)
    w = np.full((48, 40), 1e30, np.float32)  # 1e-39 * 1e30 * 48 would be 4.8e-8 without flushing
    out = t(np.ones((64, 40), np.float32))
    k("dense")(t(x), t(pack_weight(w)), none(), none(), 40, 0, 0, 0.0, 0.0, 1.0, out)
    assert not out.numpy().any(), "dense read subnormal inputs as numbers"
    row = np.tile(np.array([0.0, -100.0, -20.0], np.float32), (32, 1))  # exp(-100) = 3.7e-44
    sm = t(np.zeros_like(row))
    k("softmax")(t(row), sm)
    got = sm.numpy()
    assert (got[:, 1] == 0).all() and (got[:, 2] > 0).all(), "softmax kept a subnormal result"
    close(got[:, [0, 2]], np.exp(np.array([0.0, -20.0])) / (1 + math.exp(-20) + math.exp(-100)))
    assert np.multiply(tiny, np.float32(1.0)) == tiny, "a kernel call left the caller's thread flushing subnormals"


def test_kernels_refuse_bad_arguments_with_clear_errors(k):
    x, w = np.ones((4, 3), np.float32), pack_weight(np.ones((3, 5), np.float32))
    b, out = t(np.ones(5, np.float32)), t(np.zeros((4, 5), np.float32))
    dense = k("dense")
    dense(t(x), t(w), b, none(), 5, 1, 0, 0.0, 0.0, 1.0, out)
    assert np.allclose(out.numpy(), 4.0)
    cases = [
        ((t(x), t(pack_weight(np.ones((4, 5), np.float32))), b, none(), 5, 1, 0, 0.0, 0.0, 1.0, out),
         r"w_packed must be \[1, 3, 32\]"),
        ((t(x.astype(np.float64)), t(w), b, none(), 5, 1, 0, 0.0, 0.0, 1.0, out), "x must be float32"),
        ((t(x), t(w), b, none(), 5, 1, 0, 0.0, 0.0, 1.0, t(np.zeros((5, 4), np.float32))), "out must be"),
        ((t(x), t(w), t(np.ones(4, np.float32)), none(), 5, 1, 0, 0.0, 0.0, 1.0, out), "bias must have N=5"),
        ((t(x), t(w), b, none(), 5, 99, 0, 0.0, 0.0, 1.0, out), r"act=99 is out of range"),
        ((t(x), t(w), b, none(), 5, 1, 1, 0.0, 0.0, 1.0, out), "res must have the shape of out"),
        ((t(x), t(w), b), "expected 11 arguments"),
        ((t(x), t(w), b, none(), "5", 1, 0, 0.0, 0.0, 1.0, out), r"\(N\) must be an int"),
    ]
    for args, message in cases:
        with pytest.raises(Exception, match=message):
            dense(*args)
    strided = t(np.ones((4, 6), np.float32)[:, ::2])  # numpy copies on the way in: still valid
    dense(strided, t(w), b, none(), 5, 0, 0, 0.0, 0.0, 1.0, out)
    conv = k("conv2d")
    xc, wc = t(np.ones((1, 4, 5, 5), np.float32)), t(np.ones((6, 2, 3, 3), np.float32))
    with pytest.raises(Exception, match="does not fit 4 input channels in 3 groups"):
        conv(xc, wc, none(), none(), 3, 1, 1, 1, 1, 1, 1, 0, 0, 0.0, 0.0, 1.0, t(np.zeros((1, 6, 5, 5), np.float32)))
    with pytest.raises(Exception, match="stride_h=0 is out of range"):
        conv(xc, wc, none(), none(), 2, 0, 1, 1, 1, 1, 1, 0, 0, 0.0, 0.0, 1.0, t(np.zeros((1, 6, 5, 5), np.float32)))
    with pytest.raises(Exception, match="x must have rank 4"):
        conv(t(np.ones((4, 5, 5), np.float32)), wc, none(), none(), 2, 1, 1, 1, 1, 1, 1, 0, 0, 0.0, 0.0, 1.0,
             t(np.zeros((1, 6, 5, 5), np.float32)))
    with pytest.raises(Exception, match="a has K=40 but b has 41"):
        k("bmm")(t(np.ones((2, 3, 40), np.float32)), t(np.ones((2, 41, 5), np.float32)), none(), 0, 1.0,
                 t(np.zeros((2, 3, 5), np.float32)))
    for bad in ((2, 1, 3, 5), (3, 5, 1), (2, 3, 4), (5, 2, 3, 5)):  # res that does not broadcast
        with pytest.raises(Exception, match=r"res must broadcast to out \[\.\.\., 3, 5\]"):
            k("bmm")(t(np.ones((2, 2, 3, 4), np.float32)), t(np.ones((2, 2, 4, 5), np.float32)),
                     t(np.ones(bad, np.float32)), 0, 1.0, t(np.zeros((2, 2, 3, 5), np.float32)))
    with pytest.raises(Exception, match="gamma/beta must have D=7"):
        k("layer_norm")(t(np.ones((2, 7), np.float32)), t(np.ones(6, np.float32)), none(), 1e-5,
                        t(np.zeros((2, 7), np.float32)))
    with pytest.raises(Exception, match="out must have the shape of x"):
        k("softmax")(t(np.ones((2, 7), np.float32)), t(np.zeros((2, 8), np.float32)))
    with pytest.raises(Exception, match="gamma must have D=7 elements, got 6"):
        k("rms_norm")(t(np.ones((2, 7), np.float32)), t(np.ones(6, np.float32)), 1e-6,
                      t(np.zeros((2, 7), np.float32)))
    with pytest.raises(Exception, match="out must have the shape of x"):
        k("rms_norm")(t(np.ones((2, 7), np.float32)), t(np.ones(7, np.float32)), 1e-6,
                      t(np.zeros((2, 8), np.float32)))


# ---- tuning configs (ak_tuning): same result under every config, bad configs refused -----------

def _configs(kernel):
    from accelkit.tuning.kernels import pack_config

    grid = [0, pack_config(threads=1), pack_config(threads=2, grain=1), pack_config(threads=2, grain=16)]
    if kernel == "dense":
        grid += [pack_config(threads=2, grain=2, loop=1), pack_config(threads=1, grain=1, loop=1),
                 pack_config(threads=2, grain=4, kc=64), pack_config(threads=2, grain=2, loop=1, kc=128)]
    if kernel in ("bmm", "conv2d"):
        grid += [pack_config(threads=2, grain=2, order=1), pack_config(threads=2, grain=4, order=2),
                 pack_config(threads=1, grain=1, order=2), pack_config(threads=2, grain=1, order=1, kc=64)]
    return grid


def test_dense_same_result_under_every_tuning_config(k, isa):
    """K blocks included: the partial sums go through the output exactly, so even those match
    bit for bit (K = 150: two and a half 64-blocks)."""
    rng = np.random.default_rng(7)
    x, w = rng.standard_normal((70, 150)).astype(np.float32), rng.standard_normal((150, 75)).astype(np.float32)
    b, r = rng.standard_normal(75).astype(np.float32), rng.standard_normal((70, 75)).astype(np.float32)
    outs = []
    for config in _configs("dense"):
        out = t(np.zeros((70, 75), np.float32))
        k("dense")(t(x), t(pack_weight(w)), t(b), t(r), 75, ACT_CODES["gelu"], 2, 0.0, 0.0, 0.5, config, out)
        outs.append(out.numpy())
    close(outs[0], ACTS["gelu"](0.5 * (x.astype(np.float64) @ w) + b) + r)
    for got in outs[1:]:
        np.testing.assert_array_equal(got, outs[0])  # a config changes the split, not the sums


def test_bmm_and_conv_same_result_under_every_tuning_config(k, isa):
    rng = np.random.default_rng(8)
    a = rng.standard_normal((3, 40, 24)).astype(np.float32)
    b = rng.standard_normal((3, 33, 24)).astype(np.float32)
    ref = None
    for config in _configs("bmm"):
        out = t(np.zeros((3, 40, 33), np.float32))
        k("bmm")(t(a), t(b), none(), 1, 0.5, config, out)
        ref = out.numpy() if ref is None else (np.testing.assert_array_equal(out.numpy(), ref) or ref)
    close(ref, 0.5 * (a.astype(np.float64) @ np.swapaxes(b, -1, -2)))
    x = rng.standard_normal((2, 16, 9, 10)).astype(np.float32)
    w = (rng.standard_normal((40, 16, 3, 3)) * 0.2).astype(np.float32)
    bias = rng.standard_normal(40).astype(np.float32)
    ref = None
    for config in _configs("conv2d"):
        out = t(np.zeros((2, 40, 9, 10), np.float32))
        k("conv2d")(t(x), t(pack_conv_weight(w, 1)), t(bias), none(), 1, 1, 1, 1, 1, 1, 1, 0, 0,
                    0.0, 0.0, 1.0, config, out)
        ref = out.numpy() if ref is None else (np.testing.assert_array_equal(out.numpy(), ref) or ref)
    close(ref, conv_ref(x, w, bias, (1, 1), (1, 1, 1, 1), (1, 1), 1), tol=1e-5)
    from accelkit.tuning.kernels import pack_config

    # channels last, K = 144 * 9 = 1296: K blocks of 64..1024 and the default one
    x = rng.standard_normal((2, 6, 7, 144)).astype(np.float32)
    w = (rng.standard_normal((40, 144, 3, 3)) * 0.1).astype(np.float32)
    ref = None
    for config in _configs("conv2d_nhwc") + [pack_config(threads=2, grain=4, kc=kc) for kc in (64, 256, 1024)]:
        out = t(np.zeros((2, 6, 7, 40), np.float32))
        k("conv2d_nhwc")(t(x), t(pack_conv_weight_nhwc(w, 1)), t(bias), none(), 1, 1, 1, 1, 1, 1, 1, 0, 0,
                         0.0, 0.0, 1.0, config, out)
        ref = out.numpy() if ref is None else (np.testing.assert_array_equal(out.numpy(), ref) or ref)
    close(ref.transpose(0, 3, 1, 2), conv_ref(x.transpose(0, 3, 1, 2), w, bias, (1, 1), (1, 1, 1, 1), (1, 1), 1),
          tol=1e-5)
    # Winograd: threads and work items per thread move tiles and panels between threads, and
    # never change a sum
    ref_wino = None
    for config in _configs("conv2d_nhwc"):
        out = t(np.zeros((2, 6, 7, 40), np.float32))
        k("conv2d_nhwc")(t(x), t(winograd_weight_nhwc(w)), t(bias), none(), 1, 1, 1, 1, 1, 1, 1, 0, 0,
                         0.0, 0.0, 1.0, config, out)
        if ref_wino is None:
            ref_wino = out.numpy()
        np.testing.assert_array_equal(out.numpy(), ref_wino)
    close(ref_wino, ref, tol=1e-5)


@pytest.mark.parametrize("threads", [0, 1, 2])
def test_row_kernels_and_depthwise_under_thread_configs(k, isa, threads):
    rng = np.random.default_rng(9)
    x = rng.standard_normal((64, 300)).astype(np.float32)
    out = t(np.zeros_like(x))
    k("softmax")(t(x), threads, out)
    e = np.exp(x - x.max(-1, keepdims=True))
    close(out.numpy(), e / e.sum(-1, keepdims=True))
    g = rng.standard_normal(300).astype(np.float32)
    k("layer_norm")(t(x), t(g), none(), 1e-5, threads, out)
    close(out.numpy(), (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * g)
    k("rms_norm")(t(x), t(g), 1e-5, threads, out)
    close(out.numpy(), x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5) * g)
    xi = rng.standard_normal((1, 12, 10, 13)).astype(np.float32)
    w = rng.standard_normal((12, 1, 3, 3)).astype(np.float32)
    b = rng.standard_normal(12).astype(np.float32)
    out = t(np.zeros((1, 12, 10, 13), np.float32))
    k("conv2d")(t(xi), t(w), t(b), none(), 12, 1, 1, 1, 1, 1, 1, 0, 0, 0.0, 0.0, 1.0, threads, out)
    close(out.numpy(), conv_ref(xi, w, b, (1, 1), (1, 1, 1, 1), (1, 1), 12))


@pytest.mark.parametrize("config, message", [
    (-1, "config=-1 is out of range"),
    (1 << 28, "is out of range"),
    (6 << 24, "K-block code 6 (max 5)"),
    (65 << 8, "grain 65 (max 64)"),
    (3 << 16, "order 3 (max 2)"),
    (2 << 20, "loop 2 (max 1)"),
])
def test_bad_tuning_config_is_refused(k, config, message):
    x = t(np.ones((4, 8), np.float32))
    out = t(np.zeros((4, 32), np.float32))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        k("dense")(x, t(pack_weight(np.ones((8, 32), np.float32))), none(), none(), 32, 0, 0, 0.0, 0.0, 1.0,
                   config, out)
    with pytest.raises(TypeError, match="expected 11 arguments .*, or 12 with a tuning config"):
        k("dense")(x, out)
