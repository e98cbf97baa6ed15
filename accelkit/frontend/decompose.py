"""ONNX-side rewrites of nodes that TVM's importer converts into something else than ONNX
specifies, into equivalent ones it converts right:

- LayerNormalization's optional Mean and InvStdDev outputs: TVM returns 0-d placeholders for them.
  They are computed with ReduceMean/Sqrt/Reciprocal; the node keeps its first output.
- Expand with a shape known only at run time: TVM broadcasts to the shape's values literally, so
  a 1 where the data has a larger size gives a wrong shape. The shape is first aligned with the
  data's static shape (ONNX broadcasting: a data size of 1 takes the requested size, any other
  size stays).
- Sum of two or more inputs: TVM stacks the inputs and reduces the stack, which its layout pass
  cannot follow (ConvertLayout fails with "Invalid SLayout") and which no Add pattern matches
  (old ResNet exports sum the residual). It becomes a chain of Adds, the same broadcasting sum
  in the same order.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .fold import NameSupply, all_names, default_opset, static_shape, tensor_types

_EXPAND_DONE = "accelkit: run-time shape aligned with the data's shape"


def decompose(model: onnx.ModelProto) -> bool:
    """Apply the rewrites above to the main graph, in place (needs value_info from shape
    inference); returns whether anything changed."""
    g = model.graph
    if not any(_layer_norm_with_statistics(n) or _runtime_expand(n) or _multi_sum(n) for n in g.node):
        return False
    types = tensor_types(model)
    inits = {init.name for init in g.initializer}
    opset = default_opset(model)
    fresh = NameSupply(all_names(g))
    nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    changed = False
    for node in g.node:
        added = None
        if _layer_norm_with_statistics(node):
            added = _split_layer_norm(node, types, opset, fresh)
        elif _runtime_expand(node) and node.input[1] not in inits:
            added = _align_expand_shape(node, types, fresh)
        elif _multi_sum(node):
            added = _sum_as_adds(node, fresh)
        if added is None:
            nodes.append(node)
            continue
        extra_nodes, extra_inits = added
        nodes.extend(extra_nodes)
        new_inits.extend(extra_inits)
        changed = True
    if changed:
        del g.node[:]
        g.node.extend(nodes)
        g.initializer.extend(new_inits)
    return changed


def _default_domain(node: onnx.NodeProto) -> bool:
    return node.domain in ("", "ai.onnx")


def _layer_norm_with_statistics(node: onnx.NodeProto) -> bool:
    return (_default_domain(node) and node.op_type == "LayerNormalization"
            and any(node.output[1:]))


def _runtime_expand(node: onnx.NodeProto) -> bool:
    return _default_domain(node) and node.op_type == "Expand" and node.doc_string != _EXPAND_DONE


def _multi_sum(node: onnx.NodeProto) -> bool:
    return _default_domain(node) and node.op_type == "Sum" and len(node.input) >= 2


def _sum_as_adds(node, fresh):
    acc = node.input[0]
    nodes = []
    for i, term in enumerate(node.input[1:], start=1):
        last = i == len(node.input) - 1
        out = node.output[0] if last else fresh(f"{node.output[0]}_sum{i}")
        nodes.append(helper.make_node("Add", [acc, term], [out], name=f"{node.name}_add{i}" if node.name else ""))
        acc = out
    return nodes, []


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _split_layer_norm(node, types, opset, fresh):
    x = node.input[0]
    shape = static_shape(types[x]) if x in types else None
    if shape is None:
        return None
    rank = len(shape)
    axis = int(_attr(node, "axis", -1))
    axis = axis + rank if axis < 0 else axis
    axes = list(range(axis, rank))
    eps = float(_attr(node, "epsilon", 1e-5))
    stash = int(_attr(node, "stash_type", onnx.TensorProto.FLOAT))
    stash_np = helper.tensor_dtype_to_np_dtype(stash)
    prefix = node.name or "layer_norm"
    nodes, inits = [], []

    def op(op_type, inputs, out=None, **attrs):
        name = out or fresh(f"{prefix}_{op_type.lower()}")
        nodes.append(helper.make_node(op_type, inputs, [name], name=fresh(f"{prefix}/{op_type}"), **attrs))
        return name

    def const(value, hint):
        name = fresh(f"{prefix}_{hint}")
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def mean(v, out=None):
        if opset >= 18:
            return op("ReduceMean", [v, const(np.array(axes, np.int64), "axes")], out, keepdims=1)
        return op("ReduceMean", [v], out, axes=axes, keepdims=1)

    y = helper.make_node("LayerNormalization", list(node.input), [node.output[0]], name=node.name)
    y.attribute.extend(node.attribute)
    nodes.append(y)
    outputs = list(node.output) + ["", ""]
    xs = x if types[x].tensor_type.elem_type == stash else op("Cast", [x], to=stash)
    m = mean(xs, outputs[1] or None)
    if outputs[2]:
        d = op("Sub", [xs, m])
        var = mean(op("Mul", [d, d]))
        std = op("Sqrt", [op("Add", [var, const(np.array(eps, stash_np), "epsilon")])])
        op("Reciprocal", [std], outputs[2])
    return nodes, inits


def _align_expand_shape(node, types, fresh):
    data, shape_in = node.input[0], node.input[1]
    data_shape = static_shape(types[data]) if data in types else None
    shape_len = static_shape(types[shape_in]) if shape_in in types else None
    if data_shape is None or shape_len is None or len(shape_len) != 1:
        return None
    n, r = shape_len[0], len(data_shape)
    prefix = node.name or "expand"
    nodes, inits = [], []

    def const(value, hint):
        name = fresh(f"{prefix}_{hint}")
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    requested = shape_in
    if n < r:  # a shorter shape is right-aligned: pad it with ones
        requested = fresh(f"{prefix}_shape_padded")
        nodes.append(helper.make_node("Concat", [const(np.ones(r - n, np.int64), "ones"), shape_in],
                                      [requested], name=fresh(f"{prefix}/Concat"), axis=0))
    aligned = np.array([1] * max(n - r, 0) + list(data_shape), np.int64)
    target = fresh(f"{prefix}_shape_aligned")
    # valid ONNX input: where the data's size is not 1 the requested size is 1 or that size
    nodes.append(helper.make_node("Where", [const(aligned == 1, "takes_request"), requested,
                                            const(aligned, "data_shape")],
                                  [target], name=fresh(f"{prefix}/Where")))
    expand = helper.make_node("Expand", [data, target], list(node.output), name=node.name,
                              doc_string=_EXPAND_DONE)
    nodes.append(expand)
    return nodes, inits
