"""Pre-quantized (QDQ) ONNX models for precision="int8".

A QDQ model (onnxruntime's quantize_static, TensorRT's and PyTorch's exporters) marks each
quantized activation with QuantizeLinear -> DequantizeLinear: the pair rounds x to the grid
(scale s, zero point z) and saturates it to [(qmin - z) * s, (qmax - z) * s]. Its weights are
DequantizeLinear of int8 initializers, which the frontend's folding turns into float constants.

Compiled in fp32 the pairs stay: TVM emulates them exactly (onnxruntime's fp32 reference). For
int8 accelkit runs its own int8 kernels instead: each activation pair becomes a Clip to the
pair's range (the saturation stays: exporters drop a ReLU whose zero the u8 grid already holds),
and the range is the calibrated range of the layers that read it, so the kernels quantize on
the model's own grid (activation_qparams of the range gives back s and z).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .fold import NameSupply, _subgraphs, all_names, default_opset, tensor_types, used_names

_LIMITS = {onnx.TensorProto.UINT8: (0, 255), onnx.TensorProto.INT8: (-128, 127)}


def has_qdq(proto: onnx.ModelProto) -> bool:
    return any(n.op_type == "QuantizeLinear" for n in proto.graph.node)


def activation_ranges(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, tuple[float, float]]]:
    """Replace every QuantizeLinear -> DequantizeLinear pair on an activation (per-tensor scale
    and zero point, both initializers; every reader of the QuantizeLinear a DequantizeLinear with
    the same ones) by Clip to the pair's range -> (the model, {Clip output: (lo, hi)}). Other
    Quantize/DequantizeLinear nodes stay as they are (TVM emulates them)."""
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in g.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in g.output}
    # names read inside If/Loop bodies: a Quantize read there keeps its node
    nested: set[str] = set()
    for node in g.node:
        for attr in node.attribute:
            for sub in _subgraphs(attr):
                used_names(sub, nested)
    types = tensor_types(proto)

    def float32(name: str) -> bool:
        t = types.get(name)
        return t is not None and t.tensor_type.elem_type == onnx.TensorProto.FLOAT

    def scalar(name: str):
        t = inits.get(name)
        if t is None:
            return None
        a = numpy_helper.to_array(t)
        return (a.reshape(()).item(), t.data_type) if a.size == 1 else None

    fresh = NameSupply(all_names(g))
    opset = default_opset(proto)
    drop: set[int] = set()
    clips: dict[int, onnx.NodeProto] = {}
    bounds: list[onnx.TensorProto] = []
    ranges: dict[str, tuple[float, float]] = {}
    for node in g.node:
        # activations only: a float32 value computed by the graph (a weight's pair folds, or
        # stays emulated), read by nothing but its DequantizeLinear nodes
        if (node.op_type != "QuantizeLinear" or len(node.input) < 3 or node.output[0] in outputs
                or node.output[0] in nested or node.input[0] in inits or not float32(node.input[0])):
            continue
        s, z = scalar(node.input[1]), scalar(node.input[2])
        if s is None or z is None or z[1] not in _LIMITS or not (s[0] > 0 and np.isfinite(s[0])):
            continue
        pairs = readers.get(node.output[0], [])
        if not pairs or any(r.op_type != "DequantizeLinear" or len(r.input) < 3 or scalar(r.input[1]) != s
                            or scalar(r.input[2]) != z for r in pairs):
            continue
        qmin, qmax = _LIMITS[z[1]]
        lo, hi = float(np.float32((qmin - z[0]) * s[0])), float(np.float32((qmax - z[0]) * s[0]))
        drop.add(id(node))
        if opset >= 11:  # Clip's bounds are inputs
            lo_name, hi_name = fresh(node.output[0] + "_lo"), fresh(node.output[0] + "_hi")
            bounds += [numpy_helper.from_array(np.array(lo, np.float32), lo_name),
                       numpy_helper.from_array(np.array(hi, np.float32), hi_name)]
        for r in pairs:
            name = fresh((r.name or "qdq") + "_clip")
            clips[id(r)] = (helper.make_node("Clip", [node.input[0], lo_name, hi_name], [r.output[0]], name=name)
                            if opset >= 11 else
                            helper.make_node("Clip", [node.input[0]], [r.output[0]], name=name, min=lo, max=hi))
            ranges[r.output[0]] = (lo, hi)
    if not ranges:
        return proto, {}
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    nodes = [clips.get(id(n), n) for n in g.node if id(n) not in drop]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(bounds)
    return out, ranges
