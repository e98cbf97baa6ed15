"""The `cpu` backend: TVM's llvm target tuned to the host CPU, with the heavy subgraphs offloaded
to accelkit's C kernels (accelkit._kernels, one TVM-FFI call each, no Python in the hot path):

- dense: matmul(x[..., K], W) with a constant W (packed into panels at compile time), fused with
  its bias, a residual add before or after the activation, and the activation (relu, clip/relu6,
  gelu in erf or tanh form, silu, sigmoid);
- conv2d: the model's NCHW convolutions are turned channels-last (NHWC, `layout` option) and
  run as a GEMM over output pixels x output channels; any stride/padding/dilation, groups
  (depthwise has its own kernel, vectorised over channels), fused with bias, residual and
  activation the same way. With layout="nchw", an NCHW/OIHW kernel does the same;
- attention: multi-head attention (scores, scale, mask, softmax, context and the head
  split/merge transposes around them) as one call, reading q/k/v in the projections' layout;
- bmm: batched matmul of two activations (attention not in that form), with a scalar scale and
  a broadcast mask folded in;
- layer_norm and rms_norm over the last axis; softmax over the last axis.

Whatever is not matched (or fails a check: dtype, symbolic shape, an unsupported attribute)
stays with TVM-generated code, which the default schedules make parallel and vectorised."""
from __future__ import annotations

import functools
import itertools
import math
import numpy as np

from accelkit.backends.base import (
    CompileOptions,
    KernelPattern,
    TVMBackend,
    host_target,
    tensor_type,
)

NR = 32  # columns per packed weight panel (AK_NR in kernels/include/ak_kernels.h)

ACT_CODES = {None: 0, "relu": 1, "clip": 2, "gelu": 3, "gelu_tanh": 4, "silu": 5, "sigmoid": 6,
             "quick_gelu": 7}


def pack_weight(w: np.ndarray) -> np.ndarray:
    """W[K, N] -> panels [ceil(N/NR), K, NR] (zero padded), the dense kernel's layout."""
    k, n = w.shape
    panels = -(-n // NR)
    padded = np.zeros((k, panels * NR), np.float32)
    padded[:, :n] = w
    return np.ascontiguousarray(padded.reshape(k, panels, NR).transpose(1, 0, 2))


# int8 pays from this K (products per output) and N (outputs per input row) on: below, quantizing
# the rows costs more than the int8 products save (measured, 2 cores, AVX512-VNNI: K=16 x N=96
# at 12544 rows 0.82x fp32, K=32 x N=16 0.52x; K=24 x N=144 1.27x, K=144 x N=24 1.14x)
INT8_MIN_K = 24
INT8_MIN_N = 24


def _int8_pays(k: int, n: int) -> bool:
    return k >= INT8_MIN_K and n >= INT8_MIN_N


def quantize_per_channel(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """W[K, N] -> (wq int8 [K, N], scale float32 [N]): per output channel n a symmetric scale
    max|W[:, n]| / 127 (1 for an all-zero column) and wq = round(W / scale) in [-127, 127]."""
    k, n = w.shape
    w = w.astype(np.float64)
    amax = np.abs(w).max(axis=0) if k else np.zeros(n)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    return np.clip(np.rint(w / scale.astype(np.float64)), -127, 127).astype(np.int8), scale


MIN_ACT_SCALE = 1e-30  # the kernels need 1 / scale finite (they refuse smaller scales)


def activation_qparams(lo: float, hi: float) -> np.ndarray:
    """A calibrated input range [lo, hi] -> the int8 kernels' act_qparams [scale, zero point]: the
    asymmetric u8 grid of the kernels' dynamic rows (the range widened to hold 0, which maps to
    the zero point exactly)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = np.float32((hi - lo) / 255.0)
    if not (scale >= MIN_ACT_SCALE and np.isfinite(scale)):  # all zeros, or a range too narrow
        scale = np.float32(1.0) if not scale > 0 else np.float32(MIN_ACT_SCALE)
    zp = float(np.clip(np.rint(-lo / float(scale)), 0, 255))
    return np.array([scale, zp], np.float32)


def quantize_weight_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """W[K, N] -> (wq int8 [P, ceil(K/4), NR, 4], qparams float32 [2, P*NR]), the int8 dense
    kernel's layout: `quantize_per_channel`, 4 consecutive k of a column side by side (one VNNI
    dot product); qparams = (scales, column sums of wq); zero padded."""
    k, n = w.shape
    q, scale = quantize_per_channel(w)
    panels, k4 = -(-n // NR), -(-k // 4)
    padded = np.zeros((k4 * 4, panels * NR), np.int8)
    padded[:k, :n] = q
    packed = np.ascontiguousarray(padded.reshape(k4, 4, panels, NR).transpose(2, 0, 3, 1))
    qparams = np.zeros((2, panels * NR), np.float32)
    qparams[0] = 1.0
    qparams[0, :n] = scale
    qparams[1, :n] = q.astype(np.int64).sum(axis=0)
    return packed, qparams


W16_FORMATS = {"bf16": 0, "fp16": 1}  # AK_W16_BF16, AK_W16_FP16
# a dense layer takes 16-bit weights only when it is bound by reading them: at most this many
# rows (arithmetic intensity M/2 FLOP per fp32 weight byte, far under the FMA units' balance)
W16_MAX_ROWS = 8


def to_16bit(w: np.ndarray, fmt: str) -> np.ndarray:
    """The bits (uint16) of float32 w as bf16 (rounded to nearest even) or fp16."""
    w = np.ascontiguousarray(w, np.float32)
    if fmt == "fp16":
        return w.astype(np.float16).view(np.uint16)
    bits = w.view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def from_16bit(bits: np.ndarray, fmt: str) -> np.ndarray:
    """float32 values of bf16/fp16 bits (to_16bit's inverse on its results)."""
    if fmt == "fp16":
        return bits.view(np.float16).astype(np.float32)
    return (bits.astype(np.uint32) << 16).view(np.float32)


def pack_weight_16(w: np.ndarray, fmt: str) -> np.ndarray:
    """W[K, N] -> the bits of bf16 or fp16 panels [ceil(N/NR), K, NR] (uint16, `to_16bit`), the
    16-bit dense kernel's layout."""
    return np.ascontiguousarray(to_16bit(pack_weight(w.astype(np.float32)), fmt))


MR = 8  # rows per packed A micro-panel (AK_MR)


def pack_conv_weight(w: np.ndarray, groups: int) -> np.ndarray:
    """OIHW [Cout, C/g, KH, KW] -> [g, ceil(Cout/g/MR), C/g, KH, KW, MR] (zero padded): each group's
    weight matrix [Cout/g, C/g*KH*KW] cut into MR-row micro-panels stored k-major, so the conv
    kernel's broadcasts read consecutive floats."""
    cout, cg, kh, kw = w.shape
    per = cout // groups
    tiles = -(-per // MR)
    padded = np.zeros((groups, tiles * MR, cg, kh, kw), np.float32)
    padded[:, :per] = w.reshape(groups, per, cg, kh, kw)
    return np.ascontiguousarray(padded.reshape(groups, tiles, MR, cg, kh, kw).transpose(0, 1, 3, 4, 5, 2))


def pack_conv_weight_nhwc(w: np.ndarray, groups: int) -> np.ndarray:
    """OIHW [Cout, C/g, KH, KW] -> [g, ceil(Cout/g/NR), KH, KW, C/g, NR] (zero padded): per group
    the GEMM's B[K = (ky, kx, c), Cout/g] in NR-column panels, K ordered like the NHWC conv's
    gathered rows (each tap's C channels contiguous)."""
    cout, cg, kh, kw = w.shape
    per = cout // groups
    panels = -(-per // NR)
    padded = np.zeros((groups, panels * NR, cg, kh, kw), np.float32)
    padded[:, :per] = w.reshape(groups, per, cg, kh, kw)
    # [g, P, NR, cg, kh, kw] -> [g, P, kh, kw, cg, NR]
    return np.ascontiguousarray(padded.reshape(groups, panels, NR, cg, kh, kw).transpose(0, 1, 4, 5, 3, 2))


# Winograd F(4x4, 3x3) (Lavin & Gray, points 0, +-1, +-2, inf): Y = A^T [(G g G^T) * (B^T d B)] A
WINO_G = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                   [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]])


def winograd_weight_nhwc(w: np.ndarray) -> np.ndarray:
    """3x3 OIHW [Cout, C, 3, 3] -> U = G g G^T as the Winograd kernel's 36 GEMM right-hand sides,
    [36, ceil(Cout/NR), C, NR] (zero padded), computed in float64."""
    cout, c, kh, kw = w.shape
    assert (kh, kw) == (3, 3), w.shape
    u = (WINO_G @ w.astype(np.float64) @ WINO_G.T).transpose(2, 3, 1, 0)  # [6, 6, C, Cout]
    panels = -(-cout // NR)
    padded = np.zeros((36, c, panels * NR), np.float32)
    padded[:, :, :cout] = u.reshape(36, c, cout)
    return np.ascontiguousarray(padded.reshape(36, c, panels, NR).transpose(0, 2, 1, 3))


def depthwise_weight_nhwc(w: np.ndarray) -> np.ndarray:
    """Depthwise OIHW [C, 1, KH, KW] -> [KH, KW, C]: one channel vector per tap."""
    return np.ascontiguousarray(w[:, 0].transpose(1, 2, 0))


# ---- pattern pieces --------------------------------------------------------------------------

def _const_value(expr) -> np.ndarray | None:
    import tvm

    return expr.value.numpy() if isinstance(expr, tvm.ir.expr.Constant) else None


def _scalar(expr) -> float | None:
    value = _const_value(expr)
    return float(value.reshape(())) if value is not None and value.size == 1 else None


def _scale_factor(expr, divide: bool = False) -> float | None:
    """The factor a nonzero scalar constant multiplies by (its inverse for a divide), or None."""
    value = _scalar(expr)
    if value is None or value == 0.0:
        return None
    return 1.0 / value if divide else value


def _commutative(op: str, a, b):
    from tvm.relax.dpl import is_op

    return is_op(op)(a, b) | is_op(op)(b, a)


class _Act:
    """An activation pattern on top of `inner`, and how to read its parameters from a match."""

    _OPS = {"relu": "relax.nn.relu", "silu": "relax.nn.silu", "sigmoid": "relax.sigmoid",
            "clip": "relax.clip", "gelu_tanh": "relax.nn.gelu_tanh"}

    def __init__(self, name: str | None):
        self.name = name
        self.consts: list = []
        # ops every match of this activation contains (gelu has two forms: none required)
        self.ops: tuple[str, ...] = ((self._OPS[name],) if name in self._OPS
                                     else ("relax.sigmoid",) if name == "quick_gelu" else ())

    def wrap(self, inner):
        from tvm.relax.dpl import is_const, is_op, wildcard

        if self.name is None:
            return inner
        if self.name in ("relu", "silu", "sigmoid"):
            return is_op(self._OPS[self.name])(inner)
        if self.name == "clip":
            self.node = is_op("relax.clip")(inner, wildcard(), wildcard())
            return self.node
        if self.name == "gelu_tanh":
            return is_op("relax.nn.gelu_tanh")(inner)
        if self.name == "quick_gelu":  # x * sigmoid(1.702 x), as CLIP's exports write it
            self.consts = [is_const()]
            return _commutative("relax.multiply", inner,
                                is_op("relax.sigmoid")(_commutative("relax.multiply", inner, self.consts[0])))
        # gelu, erf form: relax.nn.gelu, or x * 0.5 * (1 + erf(x / sqrt(2))) as exported by torch
        c_div, c_one, c_half = is_const(), is_const(), is_const()
        self.consts = [c_div, c_one, c_half]
        erf = is_op("relax.erf")(is_op("relax.divide")(inner, c_div))
        one_plus = _commutative("relax.add", erf, c_one)
        decomposed = (_commutative("relax.multiply", _commutative("relax.multiply", inner, one_plus), c_half)
                      | _commutative("relax.multiply", _commutative("relax.multiply", inner, c_half), one_plus))
        return is_op("relax.nn.gelu")(inner) | decomposed

    def params(self, matches, root) -> tuple[int, float, float] | None:
        """(act code, lo, hi), or None when the matched constants are not this activation's."""
        if self.name == "clip":
            lo, hi = (float(getattr(v.value, "value", v.value)) for v in matches[self.node].args[1:3])
            return ACT_CODES["clip"], lo, hi
        if self.name == "quick_gelu":
            factor = _scalar(matches[self.consts[0]])
            if factor is None or not math.isclose(factor, 1.702, rel_tol=1e-6):
                return None
        if self.name == "gelu" and self.consts and self.consts[0] in matches:
            div, one, half = (_scalar(matches[c]) for c in self.consts)
            if None in (div, one, half) or not (math.isclose(div, math.sqrt(2), rel_tol=1e-5)
                                                and one == 1.0 and half == 0.5):
                return None
        return ACT_CODES[self.name], 0.0, 0.0


def _f32(expr, rank: tuple[int, ...] | None = None) -> tuple[int, ...] | None:
    dtype, shape = tensor_type(expr)
    if dtype != "float32" or shape is None or (rank is not None and len(shape) not in rank):
        return None
    return shape


def _bias_vector(expr, n: int, channel_axis: int, out_rank: int) -> np.ndarray | None:
    """A constant bias broadcast along `channel_axis` of the output, as a flat [n] vector."""
    value = _const_value(expr)
    if value is None or value.dtype != np.float32 or value.size != n or value.ndim > out_rank:
        return None
    shape = (1,) * (out_rank - value.ndim) + value.shape
    if shape[channel_axis] != n:
        return None
    return np.ascontiguousarray(value.reshape(n))


def _empty():
    from tvm import relax

    return relax.const(np.zeros((0,), np.float32))


def _ints(*values: int):
    import tvm
    from tvm import relax

    return [relax.prim_value(tvm.tirx.IntImm("int64", int(v))) for v in values]


def _floats(*values: float):
    import tvm
    from tvm import relax

    return [relax.prim_value(tvm.tirx.FloatImm("float32", float(v))) for v in values]


# ---- fused patterns: core op [+ bias] [+ residual] [+ act] [+ residual] -----------------------

def _epilogue_variants(gated: bool = False):
    """(bias, res, act) of the fused patterns; res "mul" (gated: act(...) * r, a gated MLP's
    product of its two projections) only where the kernel takes it."""
    acts = ("relu", "clip", "gelu", "gelu_tanh", "quick_gelu", "silu", "sigmoid", None)
    # most specific first: rewrite_call applies the patterns in order
    for res, bias, act in itertools.product(("mul", "pre", "post", None), (True, False), acts):
        if (res == "post" and act is None) or (res == "mul" and not gated):
            continue  # "post" without an activation is "pre"
        yield bias, res, act


def _fused(core, bias_const, res_node, res: str | None, act: _Act):
    node = core
    if bias_const is not None:
        node = _commutative("relax.add", node, bias_const)
    if res == "pre":
        node = _commutative("relax.add", node, res_node)
    node = act.wrap(node)
    if res == "post":
        node = _commutative("relax.add", node, res_node)
    if res == "mul":
        node = _commutative("relax.multiply", node, res_node)
    return node


def _name(prefix: str, kernel: str, bias: bool, res: str | None, act: str | None) -> str:
    parts = [kernel] + (["bias"] if bias else []) + ([f"add_{res}"] if res == "pre" and act else
                                                     ["add"] if res in ("pre", "post") else [])
    return f"{prefix}.{'_'.join(parts + ([act] if act else []) + (['mul'] if res == 'mul' else []))}"


def _fused_patterns(prefix: str, name: str, kernel: str, core_op: str, channel_axis: int,
                    core_args, gated: bool = False) -> list[KernelPattern]:
    """One KernelPattern per epilogue variant of core_op(x, const W). The kernel takes
    (x, weight, *weight constants, bias | [0], res | [0], *core ints, act, res_mode, lo, hi,
    scale). `core_args(x, w, core)` checks the matched core call and returns ([x, weight const,
    ...], core ints), or None to leave it to TVM; the epilogue is read here, with the bias broadcast along
    `channel_axis` of the output."""
    from tvm import relax
    from tvm.relax.dpl import WildcardPattern, is_const, is_op, wildcard

    result = []
    for bias, res, act_name in _epilogue_variants(gated):
        x, w, b, r = wildcard(), is_const(), is_const(), wildcard()
        act = _Act(act_name)
        core = is_op(core_op)(x, w)
        root = _fused(core, b if bias else None, r, res, act)

        def build(matches, x=x, w=w, b=b, r=r, core=core, bias=bias, res=res, act=act, root=root):
            out = _f32(matches[core])
            if out is None or _f32(matches[root]) != out:  # an epilogue constant may broadcast it up
                return None
            axis = channel_axis % len(out)
            bias_vec = _bias_vector(matches[b], out[axis], axis, len(out)) if bias else None
            if bias and bias_vec is None:
                return None
            if res and _f32(matches[r]) != out:
                return None
            if res and any(matches[r].same_as(v) for n, v in matches.items()
                           if n is not r and not isinstance(n, WildcardPattern)):
                return None  # h * h, act(h) * act(h): h would be computed twice, once for r
            params = act.params(matches, matches[root]) if act.name else (0, 0.0, 0.0)
            head = core_args(matches[x], matches[w], matches[core]) if params is not None else None
            if head is None:
                return None
            tensors, ints = head  # [operand, weight, *weight constants]
            code, lo, hi = params
            return ([*tensors, relax.const(bias_vec) if bias else _empty(),
                     matches[r] if res else _empty()]
                    + _ints(*ints, code, {"pre": 1, "post": 2, "mul": 3, None: 0}[res]) + _floats(lo, hi, 1.0))

        result.append(KernelPattern(_name(prefix, name, bias, res, act_name), root, (), kernel,
                                    build=build, requires=frozenset(
                                        [core_op, *act.ops] + (["relax.add"] if bias or res in ("pre", "post") else [])
                                        + (["relax.multiply"] if res == "mul" else []))))
    return result


def _dense_args(x, w, core):
    from tvm import relax

    xs, ws = _f32(x, range(2, 9)), _f32(w, (2,))
    if xs is None or ws is None or xs[-1] != ws[0]:
        return None
    return [x, relax.const(pack_weight(_const_value(w).astype(np.float32)))], (ws[1],)


def _kept(weight: np.ndarray, keep: frozenset) -> bool:
    """True when compile(accuracy=) keeps this layer (by its weight) in fp32."""
    if not keep:
        return False
    from accelkit.accuracy import weight_digest

    return weight_digest(weight) in keep


def _int8_layer(x, weight: np.ndarray, keep: frozenset, ranges) -> list | None:
    """[x, packed weight, weight qparams, act_qparams] for the int8 kernels, or None when
    compile(accuracy=) keeps the layer in fp32. `weight` is the layer's [K, N]; `ranges` maps
    weight digests to calibrated input ranges (accelkit.accuracy.activation_ranges): a layer
    found there quantizes its input with that one range, the others each row's own."""
    from tvm import relax

    from accelkit.accuracy import weight_digest

    digest = weight_digest(weight) if keep or ranges else None
    if keep and digest in keep:
        return None
    packed, qparams = quantize_weight_int8(weight)
    found = ranges.get(digest) if ranges else None
    xq = relax.const(activation_qparams(*found)) if found is not None else _empty()
    return [x, relax.const(packed), relax.const(qparams), xq]


def _dense_args_int8(x, w, core, keep: frozenset = frozenset(), ranges=None):
    xs, ws = _f32(x, range(2, 9)), _f32(w, (2,))
    if xs is None or ws is None or xs[-1] != ws[0] or ws[0] * 127 >= 1 << 24 or not _int8_pays(*ws):
        return None
    tensors = _int8_layer(x, _const_value(w).astype(np.float32), keep, ranges)
    return (tensors, (ws[1],)) if tensors is not None else None


def _dense_args_w16(x, w, core, fmt: str, keep: frozenset = frozenset()):
    from tvm import relax

    xs, ws = _f32(x, range(2, 9)), _f32(w, (2,))
    if xs is None or ws is None or xs[-1] != ws[0] or math.prod(xs[:-1]) > W16_MAX_ROWS:
        return None
    weight = _const_value(w).astype(np.float32)
    if _kept(weight, keep):
        return None
    return [x, relax.const(pack_weight_16(weight, fmt))], (ws[1], W16_FORMATS[fmt])


def _conv_call(x, w, conv, layout: str):
    """(input shape, weight shape, output shape, (groups, SH, SW, pad top, pad left, DH, DW)) of
    a float32 conv2d in `layout` with OIHW weights, or None when the kernels do not take it."""
    attrs = conv.attrs
    xs, ws, out = _f32(x, (4,)), _f32(w, (4,)), _f32(conv, (4,))
    if xs is None or ws is None or out is None:
        return None
    if (attrs.data_layout != layout or attrs.kernel_layout != "OIHW"
            or attrs.out_layout not in (layout, "") or str(attrs.out_dtype) not in ("float32", "", "None", "void")):
        return None
    stride = [int(v) for v in attrs.strides]
    pad = [int(v) for v in attrs.padding]
    dilation = [int(v) for v in attrs.dilation]
    if len(pad) == 2:
        pad = pad * 2
    if len(stride) != 2 or len(dilation) != 2 or len(pad) != 4:
        return None
    return xs, ws, out, (int(attrs.groups), stride[0], stride[1], pad[0], pad[1], dilation[0], dilation[1])


def _conv2d_args(x, w, conv):
    from tvm import relax

    call = _conv_call(x, w, conv, "NCHW")
    if call is None:
        return None
    xs, ws, out, ints = call
    groups = ints[0]
    weight = _const_value(w).astype(np.float32)
    depthwise = groups > 1 and groups == xs[1] == out[1] and ws[1] == 1
    if not depthwise:  # the GEMM path: weights as packed A micro-panels
        weight = pack_conv_weight(weight, groups)
    return [x, relax.const(weight)], ints


def winograd_pays(c: int, cout: int, pixels: int) -> bool:
    """Whether a 3x3 stride-1 conv of c -> cout channels over `pixels` output pixels (all
    images) runs faster as Winograd F(4x4, 3x3) than as the GEMM.
    - Small c * cout loses (0.6-0.95x for 3 -> 16, 8 -> 8, 16 -> 16): the transforms cost more
      than the products they save.
    - Few pixels lose: the transformed weights are 4x the GEMM's (36 vs 9 per channel pair) and
      are read once per call, so ResNet's 7x7 layers (49 pixels, 512 channels: 38 MB, more
      than the L3) measured 1.9 ms against 1.5 ms as GEMMs. The weight traffic stays under
      half the GEMM's compute from about 100 pixels.
    Measured (AVX2, 2 cores, per layer, same run): 2.0-2.5x at 28x28-56x56, about 1.3x at
    14x14 with 256 channels, 1.3x for the demo's 16 -> 32 at 8x8 x 397 images."""
    return c >= 16 and cout >= 32 and pixels >= 100


def _conv2d_nhwc_args(x, w, conv, winograd: bool = True):
    from tvm import relax

    call = _conv_call(x, w, conv, "NHWC")
    if call is None:
        return None
    xs, ws, out, ints = call
    groups, sh, sw, _, _, dh, dw = ints
    weight = _const_value(w).astype(np.float32)
    depthwise = groups > 1 and groups == xs[3] == out[3] and ws[1] == 1
    if depthwise:
        weight = depthwise_weight_nhwc(weight)
    elif (winograd and groups == 1 and tuple(ws[2:]) == (3, 3) and (sh, sw, dh, dw) == (1, 1, 1, 1)
          and winograd_pays(ws[1], ws[0], out[0] * out[1] * out[2])):
        weight = winograd_weight_nhwc(weight)
    else:
        weight = pack_conv_weight_nhwc(weight, groups)
    return [x, relax.const(weight)], ints




def _conv1x1_nhwc_args_int8(x, w, conv, keep: frozenset = frozenset(), ranges=None):
    """A 1x1, stride-1, unpadded channels-last conv is a dense layer over the pixels:
    x[N, H, W, C] @ W[C, Cout], so it runs the int8 dense kernel as it is."""
    call = _conv_call(x, w, conv, "NHWC")
    if call is None:
        return None
    xs, ws, out, ints = call
    if (ints[0] != 1 or tuple(ws[2:]) != (1, 1) or ints[1:3] != (1, 1) or tuple(out[:3]) != tuple(xs[:3])
            or ws[1] * 127 >= 1 << 24 or not _int8_pays(ws[1], ws[0])):
        return None
    weight = np.ascontiguousarray(_const_value(w).astype(np.float32)[:, :, 0, 0].T)  # [C, Cout]
    tensors = _int8_layer(x, weight, keep, ranges)
    return (tensors, (ws[0],)) if tensors is not None else None


def conv_weight_matrix(w: np.ndarray) -> np.ndarray:
    """OIHW [Cout, C, KH, KW] -> W[K, Cout] over K = (ky, kx, c), the order of the channels-last
    conv's gathered windows (for a 1x1 conv: W[C, Cout], the dense layer's)."""
    cout = w.shape[0]
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0).reshape(-1, cout))


def quantize_conv_weight_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """OIHW [Cout, C, KH, KW] -> the int8 kernels' packed weights over K = (ky, kx, c)
    (quantize_weight_int8 of conv_weight_matrix)."""
    return quantize_weight_int8(conv_weight_matrix(w))


def _conv_nhwc_args_int8(x, w, conv, keep: frozenset = frozenset(), ranges=None):
    call = _conv_call(x, w, conv, "NHWC")
    if call is None:
        return None
    xs, ws, out, (groups, sh, sw, pt, pl, dh, dw) = call
    if groups != 1 or ws[1] * ws[2] * ws[3] * 127 >= 1 << 24 or not _int8_pays(ws[1] * ws[2] * ws[3], ws[0]):
        return None  # grouped/depthwise convolutions, and those int8 does not pay for, stay fp32
    tensors = _int8_layer(x, conv_weight_matrix(_const_value(w).astype(np.float32)), keep, ranges)
    return (tensors, (ws[2], ws[3], sh, sw, pt, pl, dh, dw)) if tensors is not None else None


def conv_int8_patterns(prefix: str = "cpu", kernel: str = "accelkit.cpu.conv2d_nhwc_i8",
                       keep: frozenset = frozenset(), ranges=None) -> list[KernelPattern]:
    """Any other ungrouped channels-last conv2d with its epilogue -> the int8 conv kernel: each
    output pixel's window quantized to u8 as it is gathered (or, with a calibrated range, the
    input image once), s8 weights per output channel."""
    return _fused_patterns(prefix, "conv2d_nhwc_i8", kernel, "relax.nn.conv2d", -1,
                           functools.partial(_conv_nhwc_args_int8, keep=keep, ranges=ranges))


def conv1x1_int8_patterns(prefix: str = "cpu", kernel: str = "accelkit.cpu.dense_i8",
                          keep: frozenset = frozenset(), ranges=None) -> list[KernelPattern]:
    """1x1 stride-1 channels-last conv2d with its epilogue -> the int8 dense kernel (per-pixel
    u8 activations, per-output-channel s8 weights). Other convolutions stay fp32."""
    return _fused_patterns(prefix, "conv1x1_i8", kernel, "relax.nn.conv2d", -1,
                           functools.partial(_conv1x1_nhwc_args_int8, keep=keep, ranges=ranges))


INT8_KERNELS = {"accelkit.cpu.dense_i8": 8, "accelkit.cpu.conv2d_nhwc_i8": 15}  # -> res_mode's argument


def _int8_call(expr):
    """(kernel, argument list) of an R.call_dps_packed into an int8 kernel, else None."""
    from tvm import relax

    if (isinstance(expr, relax.Call) and getattr(expr.op, "name", "") == "relax.call_dps_packed"
            and getattr(expr.args[0], "global_symbol", None) in INT8_KERNELS):
        return expr.args[0].global_symbol, list(expr.args[1].fields)
    return None


def chain_int8(mod):
    """u8 activations from one int8 layer to the next: where an int8 kernel call's only reader
    is another int8 call that quantizes it on a calibrated grid (its act_qparams [scale, zero
    point]), the first writes u8 on that grid (act_qparams gets the grid as its second pair)
    and the second reads the u8 as it is: no float32 tensor between them, no quantizing pass.
    A producer with a residual add stays float32 (the add needs it), and so does one read by
    anything else. Returns (module, number of u8 edges)."""
    from tvm import relax

    from accelkit.partition import _bound_uses

    edges = 0
    for gvar, func in list(mod.functions.items()):
        if not isinstance(func, relax.Function):
            continue
        var2val = relax.analysis.get_var2val(func)
        _, uses = _bound_uses(func)
        replace = {}
        for value in var2val.values():
            consumer = _int8_call(value)
            if consumer is None:
                continue
            kernel, args = consumer
            x, grid = args[0], _const_value(args[3])
            producer = _int8_call(var2val.get(x)) if isinstance(x, relax.Var) else None
            if (producer is None or grid is None or grid.size != 2 or uses[x] != 1
                    or any(a.same_as(x) for a in args[1:])):  # read twice by the one call (x and res)
                continue
            pkernel, pargs = producer
            res_mode = pargs[INT8_KERNELS[pkernel]].value
            if int(getattr(res_mode, "value", res_mode)) != 0:  # a residual add
                continue
            shape = x.ty.shape
            if shape is None or (kernel == "accelkit.cpu.dense_i8" and int(shape[-1]) % 4):  # u8 rows: K % 4 == 0
                continue
            pgrid = _const_value(pargs[3])
            pgrid = pgrid if pgrid is not None and pgrid.size == 2 else np.zeros(2, np.float32)
            pargs[3] = relax.const(np.concatenate([pgrid, grid]).astype(np.float32))
            call = var2val[x]
            replace[call] = (call.args[0], pargs, relax.TensorType(shape, "uint8"))
        if not replace:
            continue

        @relax.expr_functor.mutator
        class _Chain(relax.PyExprMutator):
            def visit_var_binding_(self, binding):
                new = replace.get(binding.value)
                if new is None:
                    return super().visit_var_binding_(binding)
                # the producer's var changes type (uint8): a new var, and its reader remapped
                kernel, args, out_type = new
                call = relax.call_dps_packed(kernel, [self.visit_expr(a) for a in args], out_type)
                var = (self.builder_.emit(call, binding.var.name)
                       if isinstance(binding.var, relax.DataflowVar) or not self.builder_.current_block_is_dataflow()
                       else self.builder_.emit_output(call, binding.var.name))
                self.set_var_remap(binding.var, var)

        mod[gvar] = _Chain(mod).visit_expr(func)
        edges += len(replace)
    return mod, edges


def conv2d_nhwc_patterns(prefix: str = "cpu", kernel: str = "accelkit.cpu.conv2d_nhwc",
                         winograd: bool = True) -> list[KernelPattern]:
    """conv2d(x NHWC, const W OIHW) with its epilogue -> the channels-last conv kernel: a GEMM over
    output pixels x output channels, Winograd F(4x4, 3x3) for the 3x3 stride-1 convs where it
    pays (`winograd_pays`), or the depthwise kernel vectorised over channels."""
    return _fused_patterns(prefix, "conv2d_nhwc", kernel, "relax.nn.conv2d", -1,
                           functools.partial(_conv2d_nhwc_args, winograd=winograd))


def _rewrite_each(mod, *steps):
    """Each Relax function of mod rewritten by (pattern, rewriter) steps in order (rewrite_call)."""
    from tvm import relax
    from tvm.relax.dpl import rewrite_call

    for gvar, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            for pattern, rewriter in steps:
                func = rewrite_call(pattern, rewriter, func)
            mod[gvar] = func
    return mod


def drop_identity_ops(mod):
    """concat((x,)) -> x and astype(x, x's dtype) -> x: no-ops that exporters leave, a concat
    where a cache would be joined (GPT-2's past keys and values, empty in an export without
    them) and a cast back to float32 after the softmax (GPT-2's eager attention). TVM copies
    them; the attention pattern must see through them."""
    from tvm.relax.dpl import is_op, is_tuple, wildcard

    x, y = wildcard(), wildcard()
    identity = is_op("relax.concat")(is_tuple([x])) | is_op("relax.astype")(y)

    def rewriter(expr, matches):
        inner = matches[x] if x in matches else matches[y]
        return inner if tensor_type(inner) == tensor_type(expr) else expr

    return _rewrite_each(mod, (identity, rewriter))


def conv1d_as_conv2d(mod):
    """conv1d(x[N, C, W], w[O, C/g, KW]) -> conv2d over [N, C, 1, W] with a [O, C/g, 1, KW]
    kernel, squeezed back: the same sums, and then the convolution kernels (channels last)
    take it. TVM's generated conv1d ran Whisper's encoder stem (80 -> 384 channels over 3000
    frames, then stride 2) in 430 ms of a 516 ms encoder (onnxruntime: 83 ms in all)."""
    from tvm import relax
    from tvm.relax.dpl import is_op, wildcard

    x, w = wildcard(), wildcard()
    conv = is_op("relax.nn.conv1d")(x, w)

    def rewrite(expr, matches):
        a = expr.attrs
        if (a.data_layout != "NCW" or a.kernel_layout != "OIW" or a.out_layout not in ("NCW", "", None)
                or tensor_type(matches[x])[1] is None or tensor_type(matches[w])[1] is None):
            return expr
        weight = _const_value(matches[w])
        w4 = (relax.const(np.ascontiguousarray(weight[:, :, None, :])) if weight is not None
              else relax.op.expand_dims(matches[w], 2))
        left, right = (int(p) for p in a.padding)
        out = relax.op.nn.conv2d(relax.op.expand_dims(matches[x], 2), w4, strides=(1, int(a.strides[0])),
                                 padding=(0, left, 0, right), dilation=(1, int(a.dilation[0])),
                                 groups=int(a.groups), out_dtype=a.out_dtype)
        return relax.op.squeeze(out, [2])

    return _rewrite_each(mod, (conv, rewrite))


_UNARY_ACTS = ("relax.nn.gelu_tanh", "relax.nn.gelu", "relax.nn.relu", "relax.nn.silu", "relax.sigmoid")


def canonical_activations(mod):
    """Activations in the form the dense epilogues take:
    - tanh-GELU as exporters write it out, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
      (transformers' NewGELU: GPT-2, GPT-J, CodeGen; torch's gelu(approximate="tanh") with
      x * x * x: Gemma), -> relax.nn.gelu_tanh(x). TVM computes the written-out form with
      scalar pow and tanh calls: 3.5 ms per 128 x 3072 layer here;
    - SiLU as torch exports it, x * sigmoid(x) (Llama's, Qwen's and Mistral's gated MLPs),
      -> relax.nn.silu(x); erf-GELU, x * 0.5 * (1 + erf(x / sqrt(2))), -> relax.nn.gelu(x);
    - act(reshape(y)) -> reshape(act(y)) for a unary activation, and reshape(reshape(y)) ->
      reshape(y): GPT-2's Conv1D layers are 2-D Gemms whose outputs are reshaped to
      [B, S, N] before the activation and back after it, which hides the activation from the
      dense kernel's epilogue. Reshapes are views; the values are the same;
    - the same for the squeeze of a unit axis that conv1d_as_conv2d leaves after a convolution,
      and a constant added or multiplied after it (the bias: its constant gets the unit axis),
      so that bias and activation are the convolution kernel's epilogue."""
    from tvm import relax
    from tvm.relax.dpl import is_const, is_op, wildcard

    x, c3, ca, cb, c1, ch = wildcard(), is_const(), is_const(), is_const(), is_const(), is_const()
    # x^3 as pow (transformers' NewGELU) or x * (x * x) (torch's gelu(approximate="tanh"):
    # Gemma's gelu_pytorch_tanh)
    cube = is_op("relax.power")(x, c3) | _commutative("relax.multiply", x, is_op("relax.multiply")(x, x))
    t = is_op("relax.tanh")(_commutative("relax.multiply",
                                         _commutative("relax.add", x, _commutative("relax.multiply", cube, ca)), cb))
    one_plus = _commutative("relax.add", t, c1)
    gelu = (_commutative("relax.multiply", _commutative("relax.multiply", x, ch), one_plus)
            | _commutative("relax.multiply", _commutative("relax.multiply", x, one_plus), ch))

    def to_gelu(expr, matches):
        values = [_scalar(matches[c]) if c in matches else 3.0 for c in (c3, ca, cb, c1, ch)]
        if _f32(matches[x]) is None or _f32(expr) != _f32(matches[x]) or None in values:
            return expr  # (a constant of higher rank broadcasts x up: not an activation of x)
        three, a, b, one, half = values
        if not (three == 3.0 and math.isclose(a, 0.044715, rel_tol=1e-5) and one == 1.0 and half == 0.5
                and math.isclose(b, math.sqrt(2 / math.pi), rel_tol=1e-5)):
            return expr
        return relax.op.nn.gelu_tanh(matches[x])

    z = wildcard()
    silu = _commutative("relax.multiply", z, is_op("relax.sigmoid")(z))

    def to_silu(expr, matches):
        return relax.op.nn.silu(matches[z]) if _f32(matches[z]) is not None else expr

    erf_act = _Act("gelu")
    erf_gelu = erf_act.wrap(z)

    def to_erf_gelu(expr, matches):
        if (_f32(matches[z]) is None or _f32(expr) != _f32(matches[z])
                or getattr(expr.op, "name", "") == "relax.nn.gelu"):
            return expr
        return relax.op.nn.gelu(matches[z]) if erf_act.params(matches, expr) is not None else expr

    y, shape = wildcard(), wildcard()
    reshaped = is_op("relax.reshape")(y, shape)
    act = is_op(_UNARY_ACTS[0])(reshaped)
    for name in _UNARY_ACTS[1:]:
        act = act | is_op(name)(reshaped)
    twice = is_op("relax.reshape")(is_op("relax.reshape")(y, wildcard()), shape)

    def sink(expr, matches):
        inner = matches[y]
        if getattr(expr.op, "name", "") in _UNARY_ACTS:
            inner = relax.Call(expr.op, [inner], expr.attrs)
        return relax.op.reshape(inner, matches[shape])

    u, c = wildcard(), is_const()
    squeezed = is_op("relax.squeeze")(u)
    after_squeeze = _commutative("relax.add", squeezed, c) | _commutative("relax.multiply", squeezed, c)
    for name in _UNARY_ACTS:
        after_squeeze = after_squeeze | is_op(name)(squeezed)

    def sink_squeeze(expr, matches):
        axes = matches[squeezed].attrs.axis
        _, full = tensor_type(matches[u])
        if axes is None or len(axes) != 1 or full is None or _f32(expr) is None:
            return expr
        axis = int(axes[0]) % len(full)
        if full[axis] != 1:
            return expr
        op = getattr(expr.op, "name", "")
        if op in _UNARY_ACTS:
            inner = relax.Call(expr.op, [matches[u]], expr.attrs)
        else:
            value = _const_value(matches[c])
            if value is None or value.ndim > len(full) - 1:
                return expr
            value = np.expand_dims(value.reshape((1,) * (len(full) - 1 - value.ndim) + value.shape), axis)
            inner = relax.Call(expr.op, [matches[u], relax.const(value)])
        return relax.op.squeeze(inner, [axis])

    return _rewrite_each(mod, (gelu, to_gelu), (silu, to_silu), (erf_gelu, to_erf_gelu),
                         (act | twice | after_squeeze, lambda e, m: sink_squeeze(e, m) if squeezed in m else sink(e, m)))


def canonical_norms(mod):
    """RMSNorm as exporters write it out -> relax.nn.rms_norm(x, w, axes=[-1], epsilon=eps):
    w * (x * 1 / sqrt(mean(x^2, -1, keepdims) + eps)), as torch exports transformers'
    LlamaRMSNorm (Llama, Qwen, Mistral, Gemma) and T5LayerNorm; also with rsqrt, with x / sqrt,
    with x * x for the square, and without w. TVM computes the written-out form as two generated
    functions, 79 us per 128 x 768 block here; the kernel takes 8."""
    from tvm import relax
    from tvm.relax.dpl import is_const, is_op, wildcard

    x, two, eps, one, w = wildcard(), is_const(), is_const(), is_const(), is_const()
    mean = is_op("relax.mean")(is_op("relax.power")(x, two) | is_op("relax.multiply")(x, x))
    var = _commutative("relax.add", mean, eps)
    root = is_op("relax.sqrt")(var)
    inv = is_op("relax.divide")(one, root) | is_op("relax.rsqrt")(var)
    normed = _commutative("relax.multiply", x, inv) | is_op("relax.divide")(x, root)
    scaled = _commutative("relax.multiply", normed, w)

    def to_rms_norm(expr, matches):
        xs = _f32(matches[x], range(1, 9))
        if xs is None or _f32(expr) != xs:  # (a w of higher rank broadcasts x up: not a norm of x)
            return expr
        call = matches[mean]
        axes = call.attrs.axis
        if axes is None or [int(a) % len(xs) for a in axes] != [len(xs) - 1] or not bool(call.attrs.keepdims):
            return expr
        epsilon = _scalar(matches[eps])
        if (epsilon is None or not epsilon >= 0.0 or (two in matches and _scalar(matches[two]) != 2.0)
                or (one in matches and _scalar(matches[one]) != 1.0)):
            return expr
        gamma = np.ones(xs[-1], np.float32) if w not in matches else _bias_vector(matches[w], xs[-1], len(xs) - 1,
                                                                                 len(xs))
        if gamma is None:
            return expr
        return relax.op.nn.rms_norm(matches[x], relax.const(gamma), axes=[-1], epsilon=epsilon)

    return _rewrite_each(mod, (scaled, to_rms_norm), (normed, to_rms_norm))


def to_channels_last(mod):
    """Rewrite the NCHW convolutions of `mod` into NHWC ones, with the activations kept
    channels-last between them: TVM's ConvertLayout carries the layout through elementwise ops,
    pooling and reductions, so transposes remain only where the graph enters or leaves the
    convolutional part (the input image, a flatten). relax.clip (relu6) has no layout rule in TVM
    0.27 and would get a transpose on each side: it crosses as maximum/minimum and comes back."""
    from tvm import relax
    from tvm.relax.dpl import is_const, is_op, wildcard

    has_nchw_conv = [False]

    def visit(expr):
        if (isinstance(expr, relax.Call) and getattr(expr.op, "name", "") == "relax.nn.conv2d"
                and expr.attrs.data_layout == "NCHW"):
            has_nchw_conv[0] = True

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    if not has_nchw_conv[0]:
        return mod

    x, lo, hi = wildcard(), wildcard(), wildcard()
    clip = is_op("relax.clip")(x, lo, hi)

    def clip_to_minmax(expr, matches):
        dtype, _ = tensor_type(matches[x])
        bounds = []
        for v in (lo, hi):  # a FloatImm, or a PrimValue holding one
            b = getattr(matches[v], "value", None)
            bounds.append(getattr(b, "value", b))
        if str(dtype) not in ("float32", "float16") or not all(isinstance(b, (int, float)) for b in bounds):
            return expr
        low, high = (relax.const(float(b), str(dtype)) for b in bounds)
        return relax.op.minimum(relax.op.maximum(matches[x], low), high)

    y, c_lo, c_hi = wildcard(), is_const(), is_const()
    minmax = is_op("relax.minimum")(is_op("relax.maximum")(y, c_lo), c_hi)

    def minmax_to_clip(expr, matches):
        bounds = [_const_value(matches[c]) for c in (c_lo, c_hi)]
        if any(b is None or b.ndim != 0 for b in bounds):
            return expr
        return relax.op.clip(matches[y], float(bounds[0]), float(bounds[1]))

    original = mod
    try:
        mod = _rewrite_each(mod, (clip, clip_to_minmax))
        mod = relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "OIHW"]})(mod)
        mod = relax.transform.FoldConstant()(mod)
        return _rewrite_each(mod, (minmax, minmax_to_clip))
    except Exception as exc:  # noqa: BLE001 - TVM's layout inference fails on some graphs (e.g.
        # "Invalid SLayout" for an op it cannot follow); the NCHW module is correct, only slower
        import logging

        logging.getLogger("accelkit").warning(
            "channels-last conversion failed (%s: %s); the convolutions stay NCHW",
            type(exc).__name__, str(exc).strip().splitlines()[-1] if str(exc).strip() else "")
        return original


def dense_patterns(prefix: str = "cpu", kernel: str = "accelkit.cpu.dense") -> list[KernelPattern]:
    """matmul(x[..., K], const W[K, N]) with its epilogue -> the packed dense kernel; the
    epilogue may multiply by a tensor of the output's shape (a gated MLP's other projection)."""
    return _fused_patterns(prefix, "dense", kernel, "relax.matmul", -1, _dense_args, gated=True)


def dense_int8_patterns(prefix: str = "cpu", kernel: str = "accelkit.cpu.dense_i8",
                        keep: frozenset = frozenset(), ranges=None) -> list[KernelPattern]:
    """matmul(x[..., K], const W[K, N]) with its epilogue -> the int8 dense kernel: W quantized
    per output channel at compile time, x's rows quantized when it runs. Layers whose weight
    digest is in `keep` are refused (the fp32 patterns after these take them)."""
    return _fused_patterns(prefix, "dense_i8", kernel, "relax.matmul", -1,
                           functools.partial(_dense_args_int8, keep=keep, ranges=ranges))


def dense_w16_patterns(fmt: str, prefix: str = "cpu", kernel: str = "accelkit.cpu.dense_w16",
                       keep: frozenset = frozenset()) -> list[KernelPattern]:
    """matmul(x[..., K], const W[K, N]) with its epilogue and at most W16_MAX_ROWS rows -> the
    dense kernel with bf16/fp16 weights (fp32 activations and sums). Larger layers are left to
    the fp32 patterns: they are bound by arithmetic, where 16-bit weights only add conversions."""
    return _fused_patterns(prefix, f"dense_{fmt}", kernel, "relax.matmul", -1,
                           functools.partial(_dense_args_w16, fmt=fmt, keep=keep))


def conv2d_patterns(prefix: str = "cpu", kernel: str = "accelkit.cpu.conv2d") -> list[KernelPattern]:
    """conv2d(x NCHW, const W OIHW) with its epilogue -> the conv kernel (im2col GEMM, or the
    direct depthwise kernel)."""
    return _fused_patterns(prefix, "conv2d", kernel, "relax.nn.conv2d", 1, _conv2d_args)


def _mask_broadcasts(mask: tuple[int, ...], out: tuple[int, ...]) -> bool:
    """Whether the bmm kernel can add `mask` to an `out`-shaped result: [..., M or 1, N], its
    leading dims out's (aligned from the right) or all 1: an attention mask."""
    if not mask or len(mask) > len(out) or mask[-1] != out[-1]:
        return False
    if len(mask) >= 2 and mask[-2] not in (out[-2], 1):
        return False
    lead = mask[:-2]
    return math.prod(lead) == 1 or (len(lead) == len(out) - 2 and lead == out[:-2])


def bmm_patterns(prefix: str = "cpu", kernel: str = "accelkit.cpu.bmm") -> list[KernelPattern]:
    """matmul(a, b) of two computed tensors (attention), optionally scaled by a constant, and
    optionally plus a mask that broadcasts to it (attention's scores + mask, added in the
    kernel's epilogue)."""
    from tvm.relax.dpl import is_const, is_op, wildcard

    result = []
    for masked, scale in itertools.product((True, False), ("divide", "multiply", None)):
        a, b, c, mask = wildcard(), wildcard(), is_const(), wildcard()
        core = is_op("relax.matmul")(a, b)
        scaled = {"divide": is_op("relax.divide")(core, c),
                  "multiply": _commutative("relax.multiply", core, c), None: core}[scale]
        root = _commutative("relax.add", scaled, mask) if masked else scaled

        def build(matches, a=a, b=b, c=c, core=core, scale=scale, mask=mask, root=root,
                  masked=masked):
            import tvm

            as_, bs, out = _f32(matches[a], range(2, 9)), _f32(matches[b], range(2, 9)), _f32(matches[core])
            if as_ is None or bs is None or out is None or len(as_) != len(bs):
                return None
            if isinstance(matches[b], tvm.ir.expr.Constant):
                return None  # the dense kernel's job
            batch_a, batch_b = math.prod(as_[:-2]), math.prod(bs[:-2])
            if as_[-1] != bs[-2] or (batch_b != batch_a and batch_b != 1) or (batch_b == 1 and bs[:-2] != (1,) * (len(bs) - 2)):
                return None
            if batch_b == batch_a and as_[:-2] != bs[:-2]:
                return None
            factor = _scale_factor(matches[c], scale == "divide") if scale else 1.0
            if factor is None:
                return None
            res = _empty()
            if masked:
                ms = _f32(matches[mask], range(1, 9))
                if ms is None or _f32(matches[root]) != out or not _mask_broadcasts(ms, out):
                    return None
                res = matches[mask]
            return [matches[a], matches[b], res] + _ints(0) + _floats(factor)

        ops = ["relax.matmul"] + ([f"relax.{scale}"] if scale else []) + (["relax.add"] if masked else [])
        result.append(KernelPattern(f"{prefix}.bmm{'_scaled' if scale else ''}{'_masked' if masked else ''}",
                                    root, (), kernel, build=build, requires=frozenset(ops)))
    return result


def _scores_broadcast(mask: tuple[int, ...], scores: tuple[int, ...]) -> bool:
    """Whether `mask` broadcasts (numpy) to the attention scores [B, H, S, Sk], its last dim Sk."""
    if not mask or len(mask) > len(scores) or mask[-1] != scores[-1]:
        return False
    return all(m in (s, 1) for m, s in zip(reversed(mask), reversed(scores)))


# a Where mask's fill at or below this (finfo(float32).min, -inf): fill + score rounds to the fill
# for any score below 1e22, so adding it as a mask gives the Where's values
_WHERE_FILL_MAX = -1e30


def _where_mask(matches, cond, fill, scores: tuple[int, ...]):
    """where(cond, s, fill) as an additive mask: where(cond, 0, fill), a constant when cond is
    one. None unless cond is a bool tensor that broadcasts to the scores and fill a scalar
    constant at most _WHERE_FILL_MAX (e.g. -1e4 would shift masked scores, not replace them)."""
    from tvm import relax

    dtype, shape = tensor_type(matches[cond])
    value = _scalar(matches[fill])
    if dtype != "bool" or shape is None or not _scores_broadcast(shape, scores) \
            or value is None or not value <= _WHERE_FILL_MAX:
        return None
    zero, filled = np.float32(0), np.float32(value)
    known = _const_value(matches[cond])
    if known is not None:
        return relax.const(np.where(known, zero, filled).astype(np.float32))
    return relax.op.where(matches[cond], relax.const(zero), relax.const(filled))


def attention_patterns(prefix: str = "cpu", kernel: str = "accelkit.cpu.attention") -> list[KernelPattern]:
    """Multi-head attention as the exporters write it, heads split from and merged back into the
    projections' [B, S, H, D] layout:

        q4 = permute(q, [0, 2, 1, 3]); v4 = permute(v, [0, 2, 1, 3])
        kt = permute(k, [0, 2, 3, 1]), or permute(permute(k, [0, 2, 1, 3]), [0, 1, 3, 2])
        s = matmul(q4, kt) [* or / scale]
        out = permute(softmax(s [+ mask]) @ v4, [0, 2, 1, 3])

    or with the scale split over the operands, as torch exports scaled_dot_product_attention
    (transformers 5's ViT and BERT): matmul(q4 * sqrt(scale), kt * sqrt(scale)), and a reshape
    of the context to its own shape before the last permute; or with a causal mask applied as
    where(cond, s, finfo.min) [+ mask] (transformers 4's eager GPT-2), which becomes the additive
    mask where(cond, 0, finfo.min) [+ mask]. -> one kernel call: the four transposes, both
    matmuls and the softmax (the scores stay in the thread's cache). q, k and v are the
    projections' outputs reshaped to [B, S, H, D], a view."""
    from tvm import relax
    from tvm.relax.dpl import is_const, is_op, wildcard

    result = []
    masks = ("add", "where_add", "where", None)
    for masked, scale, k_steps in itertools.product(masks, ("divide", "multiply", "operands", None), (1, 2)):
        q, k, v, c, c_k, mask = wildcard(), wildcard(), wildcard(), is_const(), is_const(), wildcard()
        cond, fill = wildcard(), is_const()
        q4, k4, v4 = (is_op("relax.permute_dims")(x) for x in (q, k, v))
        kt = k4 if k_steps == 1 else is_op("relax.permute_dims")(k4)
        if scale == "operands":
            core = is_op("relax.matmul")(_commutative("relax.multiply", q4, c), _commutative("relax.multiply", kt, c_k))
        else:
            core = is_op("relax.matmul")(q4, kt)
        scaled = {"divide": is_op("relax.divide")(core, c),
                  "multiply": _commutative("relax.multiply", core, c)}.get(scale, core)
        gated = is_op("relax.where")(cond, scaled, fill) if masked in ("where", "where_add") else scaled
        scores = _commutative("relax.add", gated, mask) if masked in ("add", "where_add") else gated
        probs = is_op("relax.nn.softmax")(scores)
        context = is_op("relax.matmul")(probs, v4)
        reshaped = is_op("relax.reshape")(context, wildcard())
        root = is_op("relax.permute_dims")(context | reshaped)

        def build(matches, q=q, k=k, v=v, c=c, c_k=c_k, mask=mask, cond=cond, fill=fill, q4=q4, k4=k4,
                  kt=kt, v4=v4, core=core, gated=gated, scores=scores, probs=probs, context=context,
                  reshaped=reshaped, root=root, scale=scale, masked=masked, k_steps=k_steps):
            head_major = [0, 2, 1, 3]
            k_perms = ((k4, [0, 2, 3, 1]),) if k_steps == 1 else ((k4, head_major), (kt, [0, 1, 3, 2]))
            for node, axes in ((q4, head_major), *k_perms, (v4, head_major), (root, head_major)):
                got = matches[node].attrs.axes
                if got is None or [int(a) for a in got] != axes:
                    return None
            qs, ks, vs = (_f32(matches[x], (4,)) for x in (q, k, v))
            ss, out = _f32(matches[core], (4,)), _f32(matches[root], (4,))
            if qs is None or ks is None or vs is None or ss is None or out is None:
                return None
            (b, s, h, d), sk = qs, ks[1]
            if ks != (b, sk, h, d) or vs[:3] != (b, sk, h) or out != (b, s, h, vs[3]) or d == 0:
                return None
            if int(matches[probs].attrs.axis) % 4 != 3 or _f32(matches[scores]) != ss \
                    or _f32(matches[gated]) != ss:
                return None
            if reshaped in matches and _f32(matches[reshaped]) != _f32(matches[context]):
                return None  # only a reshape to the context's own shape is a no-op
            factor = _scale_factor(matches[c], scale == "divide") if scale else 1.0
            if factor is None:
                return None
            if scale == "operands":  # (q c)(k^T c_k) = c c_k q k^T; the operands keep their shapes
                other = _scale_factor(matches[c_k])
                if other is None or any(_f32(matches[n]) != _f32(matches[x])
                                        for n, x in ((core.args[0], q4), (core.args[1], kt))):
                    return None
                factor *= other
            res = _empty()
            if masked in ("add", "where_add"):
                ms = _f32(matches[mask], range(1, 5))
                if ms is None or not _scores_broadcast(ms, ss):
                    return None
                res = matches[mask]
            if masked in ("where", "where_add"):
                gate = _where_mask(matches, cond, fill, ss)
                if gate is None:
                    return None
                # (s + 0) + m = s + m for a kept score; a masked one is fill + m either way
                res = gate if masked == "where" else relax.op.add(gate, res)
            return [matches[q], matches[k], matches[v], res] + _floats(factor)

        op = {"divide": "relax.divide", "multiply": "relax.multiply", "operands": "relax.multiply"}
        ops = (["relax.permute_dims", "relax.matmul", "relax.nn.softmax"] + ([op[scale]] if scale else [])
               + (["relax.add"] if masked in ("add", "where_add") else [])
               + (["relax.where"] if masked in ("where", "where_add") else []))
        name = {"add": "_masked", "where": "_where", "where_add": "_where_masked", None: ""}[masked]
        result.append(KernelPattern(f"{prefix}.attention{'_scaled' if scale else ''}{name}",
                                    root, (), kernel, build=build, requires=frozenset(ops)))
    return result


def norm_patterns(prefix: str = "cpu") -> list[KernelPattern]:
    """layer_norm and rms_norm over the last axis (constant gamma/beta) and softmax over the last
    axis."""
    from tvm.relax.dpl import is_const, is_op, wildcard

    x, g, b = wildcard(), is_const(), is_const()
    ln = is_op("relax.nn.layer_norm")(x, g, b)

    def build_ln(matches):
        from tvm import relax

        call = matches[ln]
        xs = _f32(matches[x], range(1, 9))
        if xs is None or _f32(call) != xs:
            return None
        axes = [int(a) % len(xs) for a in call.attrs.axes]
        if axes != [len(xs) - 1]:
            return None
        d = xs[-1]
        gamma = _bias_vector(matches[g], d, 0, 1) if bool(call.attrs.scale) else np.ones(d, np.float32)
        beta = _bias_vector(matches[b], d, 0, 1) if bool(call.attrs.center) else None
        if gamma is None or (bool(call.attrs.center) and beta is None):
            return None
        return [matches[x], relax.const(gamma), relax.const(beta) if beta is not None else _empty()] + _floats(
            float(call.attrs.epsilon))

    r_x, r_g = wildcard(), is_const()
    rms = is_op("relax.nn.rms_norm")(r_x, r_g)

    def build_rms(matches):
        from tvm import relax

        call = matches[rms]
        xs = _f32(matches[r_x], range(1, 9))
        if xs is None or _f32(call) != xs or [int(a) % len(xs) for a in call.attrs.axes] != [len(xs) - 1]:
            return None
        gamma = _bias_vector(matches[r_g], xs[-1], 0, 1)
        if gamma is None:
            return None
        return [matches[r_x], relax.const(gamma)] + _floats(float(call.attrs.epsilon))

    s_x = wildcard()
    sm = is_op("relax.nn.softmax")(s_x)

    def build_sm(matches):
        call = matches[sm]
        xs = _f32(matches[s_x], range(1, 9))
        if xs is None or int(call.attrs.axis) % len(xs) != len(xs) - 1:
            return None
        return [matches[s_x]]

    return [KernelPattern(f"{prefix}.layer_norm", ln, (), "accelkit.cpu.layer_norm", build=build_ln,
                          requires=frozenset(["relax.nn.layer_norm"])),
            KernelPattern(f"{prefix}.rms_norm", rms, (), "accelkit.cpu.rms_norm", build=build_rms,
                          requires=frozenset(["relax.nn.rms_norm"])),
            KernelPattern(f"{prefix}.softmax", sm, (), "accelkit.cpu.softmax", build=build_sm,
                          requires=frozenset(["relax.nn.softmax"]))]


@functools.cache
def kernels_digest() -> str:
    """sha256 (16 hex) of the built kernel extension: part of the backend's fingerprint, so a
    rebuilt kernel library (new kernels, new calling conventions) never reuses a cached build."""
    import hashlib
    import importlib.util

    spec = importlib.util.find_spec("accelkit._kernels")
    if spec is None or not spec.origin:
        return "missing"
    digest = hashlib.sha256()
    with open(spec.origin, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


LAYOUTS = ("nhwc", "nchw")
WINOGRAD = ("auto", "off")


def _w16_pays() -> bool:
    """16-bit weights pay only where the kernels convert them in vector registers (AVX-512);
    elsewhere a bf16/fp16 build keeps every layer fp32, so it is never slower."""
    from accelkit import kernels

    return kernels.load().w16_path() == "avx512"


def _choice(options: CompileOptions, name: str, choices: tuple[str, ...]) -> str:
    """The value of a string option (default: the first choice), or OptionError naming them."""
    value = options.extra.get(name, choices[0])
    if value not in choices:
        from accelkit.errors import OptionError

        raise OptionError(f"{name}={value!r} is not a value the cpu backend offers for {name}; "
                          f"choose {' or '.join(repr(v) for v in choices)}")
    return value


class CPUBackend(TVMBackend):
    name = "cpu"
    precisions = ("fp32", "int8", "bf16", "fp16")
    description = "host CPU: TVM llvm codegen + accelkit fused C kernels"
    options = {"layout": "activation layout of convolutional models: 'nhwc' (default: channels "
                         "last between convolutions) or 'nchw' (the model's own)",
               "winograd": "3x3 stride-1 convolutions (channels last) by Winograd F(4x4, 3x3) where "
                           "it pays: 'auto' (default) or 'off' (the GEMM for every conv; "
                           "outputs differ from it by about 1e-6 relative)"}

    def target(self, options: CompileOptions):
        return host_target()

    def patterns(self, winograd: bool = True, precision: str = "fp32", keep: frozenset = frozenset(),
                 ranges=None):
        convs = conv2d_nhwc_patterns(winograd=winograd) + conv2d_patterns()
        if precision == "int8":  # the fp32 ones take the layers kept in fp32 or too small
            dense = dense_int8_patterns(keep=keep, ranges=ranges) + dense_patterns()
            convs = (conv1x1_int8_patterns(keep=keep, ranges=ranges) + conv_int8_patterns(keep=keep, ranges=ranges)
                     + convs)
        elif precision in W16_FORMATS and _w16_pays():
            dense = dense_w16_patterns(precision, keep=keep) + dense_patterns()
        else:
            dense = dense_patterns()
        return convs + dense + attention_patterns() + bmm_patterns() + norm_patterns()

    def patterns_for(self, options: CompileOptions):
        return self.patterns(winograd=_choice(options, "winograd", WINOGRAD) == "auto",
                             precision=options.precision, keep=options.keep_fp32,
                             ranges={d: (lo, hi) for d, lo, hi in options.act_ranges})

    def prepare(self, mod, options: CompileOptions):
        _choice(options, "winograd", WINOGRAD)  # refused before the long part, not after it
        if options.precision in W16_FORMATS and not _w16_pays():
            import logging

            logging.getLogger("accelkit").warning(
                "precision=%r: this CPU has no AVX-512, where 16-bit weights would only add "
                "conversions; every layer stays fp32", options.precision)
        if options.precision == "int8":
            from accelkit import kernels

            if kernels.load().int8_path() != "vnni":
                import logging

                logging.getLogger("accelkit").warning(
                    "precision='int8': this CPU has no AVX512-VNNI, so the int8 dense layers run "
                    "the portable C path, which is slower than fp32 here; the build is correct and "
                    "runs fast on a CPU with AVX512-VNNI")
        layout = _choice(options, "layout", LAYOUTS)
        mod = canonical_norms(canonical_activations(conv1d_as_conv2d(drop_identity_ops(mod))))
        return to_channels_last(mod) if layout == "nhwc" else mod

    def after_offload(self, mod, options: CompileOptions):
        if options.precision != "int8":
            return mod, {}
        mod, edges = chain_int8(mod)
        return mod, {"int8_u8_edges": edges}

    def load_kernels(self):
        from accelkit import kernels

        kernels.load()

    def kernels_digest(self) -> str:
        """The kernel library and the instruction set its dispatch uses in this process
        (ACCELKIT_KERNEL_ISA caps it): a kernel config's speed depends on both, so tuning measures
        and applies per both, and the compile cache keys on both (tuned builds differ)."""
        from accelkit import kernels

        return f"{kernels_digest()}+{kernels.load().isa()}"

    def fingerprint(self) -> str:
        from accelkit import __version__

        return f"{super().fingerprint()};kernels={__version__}+{self.kernels_digest()}"


