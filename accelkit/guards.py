"""Guards that keep bad input values from becoming out-of-bounds memory access.

TVM imports ONNX Gather as `take(mode="fast")`, which reads out of bounds (and may segfault) on
an index past the end, where onnxruntime raises an error. accelkit (1) finds the integer graph
inputs that index a Gather and checks their values in CompiledModel.run, for a clear error, and
(2) compiles every data-dependent `take` in "clip" mode, so no index can leave its tensor."""
from __future__ import annotations

import onnx
from onnx import numpy_helper

# ops through which an input's values reach a Gather unchanged
_VALUE_PRESERVING = {"Cast", "Identity", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Expand",
                     "Transpose"}
_INDEXING = {"Gather": 1, "GatherElements": 1}  # op -> position of its indices input


def index_bounds(proto: onnx.ModelProto) -> dict[str, int]:
    """{input name: n} for integer graph inputs whose values index an axis of size n
    (the smallest such axis when several); valid values are then -n .. n-1."""
    graph = proto.graph
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    for vi in list(graph.value_info) + list(graph.input):
        dims = vi.type.tensor_type.shape.dim
        if vi.name not in shapes and dims and all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = [d.dim_value for d in dims]
    for node in graph.node:  # Constant nodes hold data too
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    shapes[node.output[0]] = list(numpy_helper.to_array(attr.t).shape)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    initializers = {t.name for t in graph.initializer}
    bounds: dict[str, int] = {}
    for vi in graph.input:
        if vi.name in initializers or vi.type.tensor_type.elem_type not in (
                onnx.TensorProto.INT64, onnx.TensorProto.INT32):
            continue
        frontier, seen = [vi.name], set()
        while frontier:
            name = frontier.pop()
            if name in seen:
                continue
            seen.add(name)
            for node in consumers.get(name, []):
                if node.op_type in _VALUE_PRESERVING and node.input[0] == name:
                    frontier.extend(node.output)
                elif (node.op_type in _INDEXING and len(node.input) > 1
                      and node.input[_INDEXING[node.op_type]] == name):
                    data_shape = shapes.get(node.input[0])
                    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                    if data_shape and -len(data_shape) <= axis < len(data_shape):
                        size = int(data_shape[axis])
                        bounds[vi.name] = min(bounds.get(vi.name, size), size)
    return bounds


def clip_take_indices(mod):
    """Rewrite every `take(mode="fast")` with non-constant indices to mode "clip"."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class _ClipTake(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.take"
                    and call.attrs.mode == "fast" and not isinstance(call.args[1], tvm.ir.expr.Constant)):
                return relax.op.take(call.args[0], call.args[1], call.attrs.axis, "clip")
            return call

    mutator_ = _ClipTake(mod)
    for gvar, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            mod[gvar] = mutator_.visit_expr(func)
    return mod
