"""Accuracy of a reduced-precision build, measured at compile time: the same model compiled in
fp32 and the reduced one run on the same batches (the user's `calibration=` data, else random
inputs of the model's shapes), compared per output (cosine similarity, relative L2 error).

`calibration` may be:
- a mapping input name -> array: one batch (the input's shape), or several stacked on a new
  leading axis ([batches, *shape]);
- a sequence of such mappings (one batch each);
- a path to an .npz file (the mapping form) or to a directory of .npz files (one batch each)."""
from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

from accelkit.errors import OptionError

RANDOM_BATCHES = 4


def load_batches(calibration, inputs) -> list[dict[str, Any]]:
    """The calibration data as a list of feed dicts, checked against the model's input specs
    (name, shape, dtype); OptionError naming what is wrong and what is expected."""
    import numpy as np

    if isinstance(calibration, (str, os.PathLike)):
        path = os.fspath(calibration)
        if os.path.isdir(path):
            files = sorted(f for f in os.listdir(path) if f.endswith(".npz"))
            if not files:
                raise OptionError(f"calibration directory {path!r} holds no .npz files (one batch each, "
                                  f"keys = input names)")
            return [b for f in files for b in load_batches(os.path.join(path, f), inputs)]
        try:
            with np.load(path) as data:
                calibration = {k: data[k] for k in data.files}
        except (OSError, ValueError) as exc:
            raise OptionError(f"cannot read calibration data {path!r}: {exc} (expected an .npz whose "
                              f"keys are the input names, or a directory of them)") from exc
    if isinstance(calibration, Mapping):
        batches = _split(calibration, inputs)
    elif isinstance(calibration, Sequence) and calibration and all(isinstance(b, Mapping) for b in calibration):
        batches = [b for one in calibration for b in _split(one, inputs)]
    else:
        raise OptionError(f"calibration must be a dict of input arrays, a list of them, or a path to an "
                          f".npz file or a directory of them; got {type(calibration).__name__}")
    return batches


def _split(data: Mapping[str, Any], inputs) -> list[dict[str, Any]]:
    import numpy as np

    names = [s.name for s in inputs]
    missing = [n for n in names if n not in data]
    extra = sorted(set(data) - set(names))
    if missing or extra:
        raise OptionError(f"calibration data must have exactly the model's inputs {names}; "
                          f"missing {missing}, unknown {extra}")
    counts = set()
    arrays = {}
    for spec in inputs:
        a = np.asarray(data[spec.name])
        shape = tuple(spec.shape)
        if a.shape == shape:
            a = a[None]
        elif a.shape[1:] != shape:
            raise OptionError(f"calibration input {spec.name!r} has shape {list(a.shape)}; expected "
                              f"{list(shape)} (one batch) or [batches, {', '.join(map(str, shape))}]")
        if a.dtype != np.dtype(spec.dtype):
            raise OptionError(f"calibration input {spec.name!r} is {a.dtype}; the model takes {spec.dtype}")
        counts.add(a.shape[0])
        arrays[spec.name] = a
    if len(counts) > 1:
        raise OptionError(f"calibration inputs hold different numbers of batches: "
                          f"{ {n: a.shape[0] for n, a in arrays.items()} }")
    n = counts.pop() if counts else 0
    return [{name: np.ascontiguousarray(a[i]) for name, a in arrays.items()} for i in range(n)]


def digest(batches: Sequence[Mapping[str, Any]] | None) -> str | None:
    """sha256 of the batches (names, dtypes, shapes, bytes): part of the cache key."""
    if batches is None:
        return None
    h = hashlib.sha256()
    for batch in batches:
        for name in sorted(batch):
            a = batch[name]
            h.update(f"{name}:{a.dtype}:{a.shape};".encode())
            h.update(a.tobytes())
    return h.hexdigest()


def random_batches(compiled) -> list[dict[str, Any]]:
    """What accuracy is measured on without calibration data: RANDOM_BATCHES batches of
    bench.random_feeds (token ids within their tables, from the manifest's index bounds)."""
    from accelkit.bench import random_feeds

    return [random_feeds(compiled.inputs, compiled.manifest.get("index_bounds"), seed=i)
            for i in range(RANDOM_BATCHES)]


def measure(reduced, reference, batches: Sequence[Mapping[str, Any]] | None) -> dict[str, Any]:
    """Per output, the worst over the batches (None: random_batches) of cosine similarity and
    relative L2 error of `reduced` against `reference` (both CompiledModels)."""
    from accelkit.bench import compare_outputs

    source = "calibration" if batches else "random"
    if not batches:
        batches = random_batches(reduced)
    names = [s.name for s in reduced.outputs]
    worst: dict[str, dict[str, float]] = {}
    for feeds in batches:
        result = compare_outputs(reduced.run(feeds), reference.run(feeds), names)
        for name, v in result["outputs"].items():
            if "error" in v:
                continue
            w = worst.setdefault(name, {"cosine": 1.0, "rel_l2": 0.0})
            w["cosine"] = min(w["cosine"], v["cosine"])
            w["rel_l2"] = max(w["rel_l2"], v["rel_l2"])
    return {
        "reference": "fp32",
        "inputs": source,
        "batches": len(batches),
        "outputs": worst,
        "min_cosine": min((v["cosine"] for v in worst.values()), default=float("nan")),
        "max_rel_l2": max((v["rel_l2"] for v in worst.values()), default=float("nan")),
    }


# ---- accuracy=: keeping the layers quantization hurts most in fp32 -----------------------------

def weight_digest(w) -> str:
    """The identity of a dense layer's constant weight as the backend's patterns see it
    ([K, N] float32; a Gemm with transB=1 is seen transposed, so callers add both)."""
    import numpy as np

    w = np.ascontiguousarray(np.asarray(w, np.float32))
    return hashlib.sha256(f"{w.shape}".encode() + w.tobytes()).hexdigest()[:24]


def int8_layers(proto, ops: Sequence[str] = ("MatMul", "Gemm", "Conv")) -> list[dict[str, Any]]:
    """The layers of an ONNX model that the int8 patterns take: MatMul/Gemm whose second operand
    is a 2-D float initializer, and ungrouped Convs with a float initializer weight. Per layer:
    node name, op, input name, weight [K, N] as the patterns see it (a Conv's over K = (ky, kx,
    c): cpu.conv_weight_matrix), the digests they identify it by (keep_fp32, calibrated ranges),
    and for a Conv its window (kernel, strides, pads, dilations) or None when auto_pad sets it."""
    import numpy as np
    from onnx import numpy_helper

    from accelkit.backends.cpu import conv_weight_matrix

    inits = {t.name: t for t in proto.graph.initializer}
    layers = []
    for i, node in enumerate(proto.graph.node):
        if node.op_type not in ops or len(node.input) < 2 or node.input[1] not in inits:
            continue
        attrs = {a.name: a for a in node.attribute}
        w = numpy_helper.to_array(inits[node.input[1]])
        if w.dtype.kind != "f":
            continue
        name = node.name or f"{node.op_type}_{i}"
        if node.op_type == "Conv":
            if w.ndim != 4 or (attrs["group"].i if "group" in attrs else 1) != 1:
                continue
            matrix = conv_weight_matrix(w.astype(np.float32))
            ints = {k: list(a.ints) for k, a in attrs.items() if a.ints}
            auto_pad = attrs["auto_pad"].s.decode() if "auto_pad" in attrs else "NOTSET"
            window = None
            if auto_pad in ("NOTSET", "VALID"):
                window = {"kernel": tuple(w.shape[2:]), "strides": tuple(ints.get("strides", [1, 1])),
                          "pads": tuple(ints.get("pads", [0, 0, 0, 0])) if auto_pad == "NOTSET" else (0, 0, 0, 0),
                          "dilations": tuple(ints.get("dilations", [1, 1]))}
            layers.append({"node": name, "op": "Conv", "input": node.input[0], "weight": matrix,
                           "digests": {weight_digest(matrix)}, "window": window})
            continue
        if (node.op_type == "Gemm" and "transA" in attrs and attrs["transA"].i) or w.ndim != 2:
            continue
        if node.op_type == "Gemm" and "transB" in attrs and attrs["transB"].i:
            w = w.T
        layers.append({"node": name, "op": node.op_type, "input": node.input[0], "weight": w.astype(np.float32),
                       "digests": {weight_digest(w), weight_digest(w.T)}})
    return layers


def _windows(a, window):
    """A Conv's NCHW input -> the rows its int8 kernel quantizes: one per output pixel, K =
    (ky, kx, c) (the im2col of the channels-last conv)."""
    import numpy as np

    a = np.moveaxis(np.asarray(a, np.float32), 1, -1)  # NHWC
    (kh, kw), (sh, sw), (pt, pl, pb, pr), (dh, dw) = (window["kernel"], window["strides"], window["pads"],
                                                      window["dilations"])
    n, h, w, c = a.shape
    padded = np.zeros((n, h + pt + pb, w + pl + pr, c), np.float32)
    padded[:, pt:pt + h, pl:pl + w] = a
    oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
    taps = [padded[:, ky * dh: ky * dh + sh * (oh - 1) + 1: sh, kx * dw: kx * dw + sw * (ow - 1) + 1: sw]
            for ky in range(kh) for kx in range(kw)]
    return np.concatenate(taps, axis=-1).reshape(n * oh * ow, kh * kw * c)


def _int8_product_error(a, w) -> float:
    """Relative L2 error of the int8 dense kernel's product (rows of a to u8, channels of w to
    s8) against the float product: how much quantizing this one layer changes its output."""
    import numpy as np

    a = np.asarray(a, np.float32).reshape(-1, w.shape[0])
    from accelkit.backends.cpu import quantize_per_channel

    lo, hi = np.minimum(a.min(axis=1), 0), np.maximum(a.max(axis=1), 0)
    scale = (hi - lo) / np.float32(255)
    scale[~(scale > 0)] = 1
    zp = np.clip(np.rint(-lo / scale), 0, 255)
    qa = (np.clip(np.rint(a / scale[:, None]) + zp[:, None], 0, 255) - zp[:, None]) * scale[:, None]
    wq, ws = quantize_per_channel(w)
    qw = wq.astype(np.float64) * ws.astype(np.float64)
    exact = a.astype(np.float64) @ w.astype(np.float64)
    return float(np.linalg.norm(qa.astype(np.float64) @ qw - exact) / max(np.linalg.norm(exact), 1e-30))


def _intermediates(proto, batches: Sequence[Mapping[str, Any]], what: str):
    """Every tensor of the model on each batch (onnx's reference evaluator), one dict per batch;
    [] with a warning when the evaluator cannot run the model. A pre-quantized model is
    evaluated with its activation Quantize/Dequantize pairs as Clips (frontend.qdq): the
    evaluator has no Quantize/DequantizeLinear before opset 19, where exporters write 13-17."""
    import logging

    from onnx.reference import ReferenceEvaluator

    from accelkit.frontend import qdq

    if qdq.has_qdq(proto):
        proto = qdq.activation_ranges(proto)[0]
    try:
        evaluator = ReferenceEvaluator(proto)
        for feeds in batches:
            yield evaluator.run(None, dict(feeds), intermediate=True)
    except Exception as exc:  # noqa: BLE001 - an op the evaluator lacks: say so, do without
        logging.getLogger("accelkit").warning(
            "%s: onnx's reference evaluator cannot run this model (%s: %s); %s", what, type(exc).__name__,
            str(exc).splitlines()[0] if str(exc) else "", "skipped")
        return


def layer_errors(proto, batches: Sequence[Mapping[str, Any]], precision: str) -> list[dict[str, Any]]:
    """Each reduced-precision layer's own error on the batches (onnx's reference evaluator gives
    every layer's input), worst first. int8: the int8 kernels' product (rows to u8, channels to
    s8) on the layer's rows, a Conv's windows (every ungrouped conv: int8 runs them all);
    bf16/fp16 (dense layers only): the weights' rounding error."""
    import numpy as np

    from accelkit.backends.cpu import from_16bit, to_16bit

    layers = int8_layers(proto) if precision == "int8" else int8_layers(proto, ("MatMul", "Gemm"))
    layers = [layer for layer in layers if layer["op"] != "Conv" or layer["window"] is not None]
    if not layers:
        return []
    errors = {layer["node"]: 0.0 for layer in layers}
    for values in _intermediates(proto, batches, "ranking the layers for accuracy="):
        for layer in layers:
            a = values.get(layer["input"])
            if a is None:
                continue
            if layer["op"] == "Conv":
                a = _windows(a, layer["window"])
            w = layer["weight"]
            if precision == "int8":
                e = _int8_product_error(a, w)
            else:
                rounded = from_16bit(to_16bit(w, precision), precision).astype(np.float64)
                a2 = np.asarray(a, np.float64).reshape(-1, w.shape[0])
                exact = a2 @ w
                e = float(np.linalg.norm(a2 @ rounded - exact) / max(np.linalg.norm(exact), 1e-30))
            errors[layer["node"]] = max(errors[layer["node"]], e)
    ranked = sorted(layers, key=lambda layer: -errors[layer["node"]])
    return [{"node": layer["node"], "op": layer["op"], "layer_error": errors[layer["node"]],
             "digests": sorted(layer["digests"])} for layer in ranked]


# ---- int8 activation ranges from calibration batches -------------------------------------------

CALIBRATION_METHODS = ("auto", "dynamic", "minmax", "percentile", "entropy")
PERCENTILE = 99.99  # the percentile method keeps this share of each input's values in range
_SAMPLE = 1 << 21  # values per layer input kept (over all batches) for the percentile/entropy methods


def activation_ranges(proto, batches: Sequence[Mapping[str, Any]], method: str,
                      ops: Sequence[str] = ("MatMul", "Gemm", "Conv"), layers=None) -> list[dict[str, Any]]:
    """Each int8 layer's input range [lo, hi] from the batches (onnx's reference evaluator gives
    every layer's input), by `method`:
    - minmax: the least and greatest value seen;
    - percentile: the PERCENTILE-th percentile of the values above 0 and of those below (an
      outlier no longer stretches the grid of all the others);
    - entropy: the clipping threshold whose 8-bit histogram is closest to the full one in
      Kullback-Leibler divergence (TensorRT's calibration), on |x|.
    `layers`: the int8_layers entries to calibrate (default: int8_layers(proto, ops)).
    Returns [{"node", "op", "input", "lo", "hi", "digests"}] in graph order."""
    import numpy as np

    if method not in ("minmax", "percentile", "entropy"):
        raise OptionError(f"calibration method {method!r}: choose minmax, percentile or entropy")
    layers = int8_layers(proto, ops) if layers is None else layers
    if not layers or not batches:
        return []
    rng = np.random.default_rng(0)
    lo = {layer["input"]: np.inf for layer in layers}
    hi = {layer["input"]: -np.inf for layer in layers}
    samples: dict[str, list] = {name: [] for name in lo}
    for values in _intermediates(proto, batches, "int8 calibration (those layers quantize each row at run time)"):
        for name in lo:
            a = values.get(name)
            if a is None:
                continue
            a = np.asarray(a, np.float32).ravel()
            a = a[np.isfinite(a)]
            if not a.size:
                continue
            lo[name], hi[name] = min(lo[name], float(a.min())), max(hi[name], float(a.max()))
            if method != "minmax":  # at most _SAMPLE values per layer over all the batches
                take = max(_SAMPLE // len(batches), 1)
                samples[name].append(a if a.size <= take else rng.choice(a, take, replace=False))
    result = []
    for layer in layers:
        name = layer["input"]
        if not np.isfinite(lo[name]):
            continue
        a_lo, a_hi = lo[name], hi[name]
        if method != "minmax":
            v = np.concatenate(samples[name])
            if method == "percentile":
                a_lo = -float(np.percentile(-v[v < 0], PERCENTILE)) if (v < 0).any() else 0.0
                a_hi = float(np.percentile(v[v > 0], PERCENTILE)) if (v > 0).any() else 0.0
            else:
                t = _entropy_threshold(np.abs(v), levels=256 if a_lo >= 0 else 128)
                a_lo, a_hi = max(a_lo, -t), min(a_hi, t)
        result.append({"node": layer["node"], "op": layer["op"], "input": name, "lo": float(min(a_lo, 0.0)),
                       "hi": float(max(a_hi, 0.0)), "digests": sorted(layer["digests"])})
    return result


def _entropy_threshold(v, levels: int, bins: int = 2048) -> float:
    """The threshold T of |x| values v whose `levels`-level quantization of the histogram
    clipped at T is closest (Kullback-Leibler) to the histogram clipped at T with its tail
    folded into the last bin (zeros left out)."""
    import numpy as np

    # exact zeros (half of a relu's outputs) sit on the zero point at every threshold; in the
    # histogram their spike would be smeared over the first level's bins and favour tiny ones
    v = v[v != 0]
    amax = float(v.max()) if v.size else 0.0
    if not amax > 0:
        return 0.0
    hist, edges = np.histogram(v, bins=bins, range=(0.0, amax))
    hist = hist.astype(np.float64)
    best, best_kl = bins, np.inf
    for i in range(levels, bins + 1, 16):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        starts = (np.arange(levels) * i) // levels
        merged = np.add.reduceat(hist[:i], starts)
        nonzero = p > 0  # after the tail is folded in: its bin holds mass even where hist has none
        counts = np.add.reduceat(nonzero.astype(np.float64), starts)
        level = np.repeat(np.arange(levels), np.diff(np.append(starts, i)))
        q = np.where(nonzero, merged[level] / np.maximum(counts[level], 1), 0.0)
        ps, qs = p.sum(), q.sum()
        if not (ps > 0 and qs > 0):
            continue
        p, q = p / ps, q / qs
        mask = p > 0
        kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
        if kl < best_kl:
            best, best_kl = i, kl
    return float(edges[best])
