"""ONNX frontend: load and check a model, fix its input shapes, normalise it on the ONNX side
(fold shape subgraphs, inline constant Ifs, expand RNNs, rewrite nodes TVM's importer converts
wrongly), refuse what TVM cannot compile or would compute wrongly, and import it into TVM Relax.

`import accelkit.frontend` imports neither tvm nor torch; `to_relax` imports tvm when called."""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import onnx
from onnx import helper

from ..errors import InputShapeError, ModelLoadError, UnsupportedModelError
from .decompose import decompose
from .fold import default_opset, fold_to_fixpoint, static_shape
from .rnn import UNSUPPORTED_TAG, expand_recurrent

if TYPE_CHECKING:
    import tvm

__all__ = [
    "TensorSpec", "Graph", "load_model", "prepare", "to_relax", "check_supported",
    "tvm_supported_ops", "newer_op_changes", "check_element_types", "TVM_ELEMENT_TYPES",
    "check_static_arguments", "check_tvm_semantics", "MIN_OPSET", "MAX_OPSET", "TVM_MAX_OPSET",
]

# ai.onnx opsets we accept. Below 7 the old op semantics (e.g. broadcast attributes) are not
# worth supporting. TVM 0.27's converters implement op versions up to opset 23; a model of a
# newer opset (up to MAX_OPSET, the newest checked against onnx's op schemas) is accepted when
# each of its ops is unchanged since opset 23 or only accepts more element types
# (`newer_op_changes`), as TVM then picks the converter that computes the same thing.
MIN_OPSET = 7
TVM_MAX_OPSET = 23
MAX_OPSET = 28

# Contrib (com.microsoft) ops that TVM's importer converts, written for ORT's contrib semantics.
_TVM_CONTRIB_OPS = {"Attention", "SkipLayerNormalization", "EmbedLayerNormalization", "FastGelu", "BiasGelu"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # fully static
    dtype: str  # numpy dtype name: "float32", "int64", ...


@dataclass
class Graph:
    proto: onnx.ModelProto  # normalized model, still valid ONNX (onnxruntime / ReferenceEvaluator run it)
    inputs: list[TensorSpec]  # real graph inputs in order (not initializers)
    outputs: list[TensorSpec]  # graph outputs in order


# --------------------------------------------------------------------------- loading

def load_model(model: str | os.PathLike | bytes | onnx.ModelProto) -> onnx.ModelProto:
    """Read a model (path with external data beside it, serialized bytes, or a ModelProto; the
    latter is copied) and check it with onnx.checker. Raises ModelLoadError."""
    if isinstance(model, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
        _check_proto(proto, "the given ModelProto")
        return proto
    if isinstance(model, (bytes, bytearray, memoryview)):
        what = f"the given bytes ({len(model)} bytes)"
        proto = _parse(bytes(model), what)
        _check_proto(proto, what)
        return proto
    if isinstance(model, (str, os.PathLike)):
        return _load_path(os.fspath(model))
    raise ModelLoadError(
        f"cannot load a model from a {type(model).__name__}: pass a path to an .onnx file, "
        "its bytes, or an onnx.ModelProto"
    )


def _load_path(path: str) -> onnx.ModelProto:
    if not os.path.exists(path):
        raise ModelLoadError(f"model file {path!r} does not exist: check the path")
    if os.path.isdir(path):
        raise ModelLoadError(f"model path {path!r} is a directory: pass the .onnx file inside it")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise ModelLoadError(f"cannot read model file {path!r}: {err.strerror or err}") from err
    what = f"model file {path!r}"
    proto = _parse(data, what)
    if any(_uses_external_data(t) for t in _all_initializers(proto.graph)):
        try:
            from onnx.external_data_helper import load_external_data_for_model

            load_external_data_for_model(proto, os.path.dirname(os.path.abspath(path)))
        except Exception as err:  # noqa: BLE001 - any failure here means missing/bad data files
            raise ModelLoadError(
                f"{what} stores weights in external data files that could not be loaded "
                f"({type(err).__name__}: {err}); keep the data files next to the .onnx file"
            ) from err
    _check_proto(proto, what, path=path, size=len(data))
    return proto


def _parse(data: bytes, what: str) -> onnx.ModelProto:
    from google.protobuf.message import DecodeError

    proto = onnx.ModelProto()
    hint = "re-export or re-download it (is the file complete, and is it really an .onnx model?)"
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as err:
        raise ModelLoadError(f"{what} is not a readable ONNX model: protobuf parsing failed ({err}); {hint}") from err
    if not data or proto.ir_version <= 0 or not proto.HasField("graph"):
        raise ModelLoadError(f"{what} is not an ONNX model (no ir_version/graph found); {hint}")
    return proto


def _all_initializers(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                yield from _all_initializers(sub)


def _uses_external_data(t: onnx.TensorProto) -> bool:
    return t.HasField("data_location") and t.data_location == onnx.TensorProto.EXTERNAL


def _check_proto(proto: onnx.ModelProto, what: str, path: str | None = None, size: int = 0) -> None:
    try:
        if path is not None and (size > onnx.checker.MAXIMUM_PROTOBUF
                                 or any(_uses_external_data(t) for t in _all_initializers(proto.graph))):
            onnx.checker.check_model(path)
        else:
            onnx.checker.check_model(proto)
    except Exception as err:  # noqa: BLE001 - ValidationError and friends
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(
            f"{what} fails onnx.checker: {first}. Fix or re-export the model "
            "(e.g. a newer exporter / onnx.version_converter)"
        ) from err


# --------------------------------------------------------------------------- shapes

def _elem_dtype(type_proto: onnx.TypeProto) -> str:
    try:
        return helper.tensor_dtype_to_np_dtype(type_proto.tensor_type.elem_type).name
    except Exception:  # noqa: BLE001
        return onnx.TensorProto.DataType.Name(type_proto.tensor_type.elem_type).lower()


def _real_inputs(proto: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {i.name for i in proto.graph.initializer}
    return [vi for vi in proto.graph.input if vi.name not in inits]


def _resolve_shapes(proto: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None) -> list[TensorSpec]:
    inputs = _real_inputs(proto)
    names = [vi.name for vi in inputs]
    given = dict(input_shapes or {})
    unknown = [k for k in given if k not in names]
    if unknown:
        raise InputShapeError(
            f"input_shapes names {unknown} which {'is' if len(unknown) == 1 else 'are'} not inputs of the model; "
            f"its inputs are {names}"
        )
    specs, missing = [], []
    for vi in inputs:
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise UnsupportedModelError(f"input {vi.name!r} is not a tensor (sequence/map inputs are not supported)")
        has_shape = tt.HasField("shape")
        if vi.name in given:
            try:
                shape = tuple(int(d) for d in given[vi.name])
            except (TypeError, ValueError) as err:
                raise InputShapeError(f"input_shapes[{vi.name!r}] = {given[vi.name]!r} is not a sequence of ints") from err
            if has_shape and len(shape) != len(tt.shape.dim):
                raise InputShapeError(
                    f"input_shapes[{vi.name!r}] = {list(shape)} has rank {len(shape)} but input {vi.name!r} "
                    f"has rank {len(tt.shape.dim)} in the model"
                )
            if any(d < 0 for d in shape):
                raise InputShapeError(f"input_shapes[{vi.name!r}] = {list(shape)} has a negative size")
        elif not has_shape:
            missing.append((vi.name, None, None))
            continue
        else:
            shape = []
            for k, d in enumerate(tt.shape.dim):
                if d.HasField("dim_value") and d.dim_value >= 0:
                    shape.append(d.dim_value)
                else:
                    missing.append((vi.name, k, d.dim_param or None))
                    shape.append(None)
            shape = tuple(shape)
        specs.append((vi, shape))
    if missing:
        lines = []
        for name, k, sym in missing:
            if k is None:
                lines.append(f"input {name!r} has unknown rank")
            else:
                lines.append(f"input {name!r} dim {k} is {'symbolic ' + repr(sym) if sym else 'unknown'}")
        example = {}
        for vi, shape in specs:
            if any(d is None for d in shape):
                dims = [str(d) if d is not None else (vi.type.tensor_type.shape.dim[k].dim_param or "?")
                        for k, d in enumerate(shape)]
                example[vi.name] = "[" + ", ".join(dims) + "]"
        for name, k, _ in missing:
            if k is None:
                example[name] = "[...]"
        shown = "{" + ", ".join(f"{n!r}: {v}" for n, v in example.items()) + "}"
        flags = " ".join(f"--input-shape {n}={v.strip('[]').replace(' ', '')}" for n, v in example.items())
        raise InputShapeError(
            "the model's input shapes are not static: " + "; ".join(lines)
            + f". Give the sizes: accelkit.compile(model, input_shapes={shown}) or on the command "
            f"line {flags}, with each symbolic name replaced by its size"
        )
    return [TensorSpec(vi.name, tuple(shape), _elem_dtype(vi.type)) for vi, shape in specs]


def _set_shape(vi: onnx.ValueInfoProto, shape: Sequence[int | None]) -> None:
    """Set a static shape; None entries become unknown dims (the rank is kept: onnx.checker
    requires graph outputs to have a shape field)."""
    tt = vi.type.tensor_type
    tt.ClearField("shape")
    tt.shape.SetInParent()
    for d in shape:
        dim = tt.shape.dim.add()
        if d is not None:
            dim.dim_value = int(d)


# --------------------------------------------------------------------------- prepare

def input_specs(model, input_shapes: Mapping[str, Sequence[int]] | None = None) -> list[TensorSpec]:
    """The model's inputs with static shapes, as prepare gives them, without the folding."""
    return _resolve_shapes(load_model(model), input_shapes)


def prepare(model, input_shapes: Mapping[str, Sequence[int]] | None = None) -> Graph:
    """Load `model`, make its input shapes static and normalise it for import (see module doc)."""
    proto = load_model(model)
    inputs = _resolve_shapes(proto, input_shapes)
    g = proto.graph
    # Initializers listed as inputs (IR < 4 style) become plain constants so they fold.
    init_names = {i.name for i in g.initializer}
    real = [vi for vi in g.input if vi.name not in init_names]
    del g.input[:]
    g.input.extend(real)
    proto.ir_version = max(proto.ir_version, 4)
    by_name = {s.name: s for s in inputs}
    for vi in g.input:
        _set_shape(vi, by_name[vi.name].shape)
    for vi in g.output:  # re-inferred from the now static inputs
        if vi.type.tensor_type.HasField("shape"):
            _set_shape(vi, [None] * len(vi.type.tensor_type.shape.dim))

    proto = fold_to_fixpoint(proto, rewrite=_rewrite)
    types = {vi.name: vi.type for vi in list(proto.graph.value_info) + list(proto.graph.output)}
    for init in proto.graph.initializer:
        types.setdefault(init.name, helper.make_tensor_type_proto(init.data_type, list(init.dims)))
    outputs = []
    for vi in proto.graph.output:
        t = types.get(vi.name, vi.type)
        kind = t.WhichOneof("value") or vi.type.WhichOneof("value")
        if kind not in (None, "tensor_type"):
            what = kind.replace("_type", "")
            raise UnsupportedModelError(
                f"output {vi.name!r} is {'an' if what[0] in 'aeiou' else 'a'} {what}, not a tensor: accelkit "
                "compiles models whose outputs are tensors (sequence/map/optional outputs are not supported)")
        shape = static_shape(t)
        if shape is not None:
            _set_shape(vi, shape)
        if shape is None:  # data-dependent (e.g. NonZero): -1 marks each size unknown until run time
            dims = t.tensor_type.shape.dim if t.tensor_type.HasField("shape") else []
            shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims)
        outputs.append(TensorSpec(vi.name, shape, _elem_dtype(vi.type)))
    return Graph(proto=proto, inputs=inputs, outputs=outputs)


def _rewrite(model: onnx.ModelProto) -> bool:
    """The ONNX-side rewrites applied while folding (each returns whether it changed the model)."""
    expanded = expand_recurrent(model)
    return decompose(model) or expanded


# --------------------------------------------------------------------------- support check

def _node_key(domain: str, op_type: str) -> tuple[str, str]:
    return ("" if domain in ("", "ai.onnx") else domain, op_type)


def _normalise_known(known_ops: Iterable) -> set[tuple[str, str]]:
    out = set()
    for k in known_ops:
        if isinstance(k, tuple):
            out.add(_node_key(*k))
        elif "::" in k:
            out.add(_node_key(*k.split("::", 1)))
        else:
            out.add(("", k))
    return out


def _walk_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                yield from _walk_nodes(sub)


def check_supported(
    proto: onnx.ModelProto,
    known_ops: Iterable[str | tuple[str, str]],
    opset_range: tuple[int, int] | None = (MIN_OPSET, MAX_OPSET),
    backend: str = "this backend",
    converters_up_to: int | None = TVM_MAX_OPSET,
) -> None:
    """Raise one UnsupportedModelError listing every node (subgraphs included) whose op is not in
    `known_ops` ("Conv" for ai.onnx, "com.microsoft::FusedConv" or (domain, op) for others) or, in
    a model newer than opset `converters_up_to`, whose op changed since then (newer_op_changes);
    and an error for an ai.onnx opset outside `opset_range`."""
    opset = default_opset(proto)
    if opset_range is not None:
        lo, hi = opset_range
        if not lo <= opset <= hi:
            raise UnsupportedModelError(
                f"the model uses ai.onnx opset {opset}; {backend} supports opsets {lo}..{hi}. Re-export it with "
                f"opset_version between {lo} and {hi} (e.g. 17), or convert it: "
                f"onnx.version_converter.convert_version(model, 17)",
                unsupported=[("ai.onnx", f"opset {opset}", "")],
            )
    known = _normalise_known(known_ops)
    bad: dict[tuple[str, str], list[tuple[str, str]]] = {}
    newer = False
    for k, node in enumerate(_walk_nodes(proto.graph)):
        key = _node_key(node.domain, node.op_type)
        if key not in known:
            reason = node.doc_string[len(UNSUPPORTED_TAG):] if node.doc_string.startswith(UNSUPPORTED_TAG) else ""
            bad.setdefault(key, []).append((node.name or f"<unnamed node #{k}>", reason))
        elif converters_up_to is not None and opset > converters_up_to and key[0] == "":
            change = newer_op_changes(node, opset, converters_up_to)
            if change:
                bad.setdefault(key, []).append((node.name or f"<unnamed node #{k}>", change))
                newer = True
    if not bad:
        return
    lines, unsupported = [], []
    for (domain, op), nodes in sorted(bad.items()):
        shown = ", ".join(n for n, _ in nodes[:5]) + (f", ... ({len(nodes)} in all)" if len(nodes) > 5 else "")
        reasons = sorted({r for _, r in nodes if r})
        lines.append(f"  {domain or 'ai.onnx'}::{op} ({len(nodes)} node{'s' * (len(nodes) > 1)}: {shown})"
                     + (f" - {'; '.join(reasons)}" if reasons else ""))
        unsupported.extend((domain or "ai.onnx", op, n) for n, _ in nodes)
    contrib = any(d for d, _ in bad)
    advice = ("Re-export the model with standard ai.onnx ops (vendor/contrib ops such as com.microsoft fusions "
              "come from runtime-specific optimisation: export from the framework without them)"
              if contrib else "Re-export the model avoiding these ops (or a newer opset that decomposes them)")
    if newer:
        advice += f" or with opset_version <= {converters_up_to}"
    raise UnsupportedModelError(
        f"the model uses {len(bad)} op type{'s' * (len(bad) > 1)} that {backend} cannot compile:\n"
        + "\n".join(lines) + f"\n{advice}, or use a backend that supports them.",
        unsupported=unsupported,
    )


# Element types TVM computes with (onnx.TensorProto names). The others (float8/float6/float4,
# 4- and 2-bit integers, string, complex) either fail deep inside TVM or, for float8, compile
# into silently wrong conversions: they are refused before TVM sees them.
TVM_ELEMENT_TYPES = frozenset({
    "FLOAT", "DOUBLE", "FLOAT16", "BFLOAT16", "BOOL",
    "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64",
})


def check_element_types(proto: onnx.ModelProto, supported: Iterable[str] = TVM_ELEMENT_TYPES,
                        backend: str = "this backend") -> None:
    """Raise one UnsupportedModelError naming every element type outside `supported` that the
    model uses (graph inputs, outputs, inferred values, initializers, Constant and Cast nodes,
    subgraphs included) and where it is used."""
    supported = set(supported)
    where: dict[str, list[str]] = {}

    def note(elem_type: int, what: str) -> None:
        if elem_type == onnx.TensorProto.UNDEFINED:
            return
        name = onnx.TensorProto.DataType.Name(elem_type) if elem_type in onnx.TensorProto.DataType.values() \
            else f"type #{elem_type}"
        if name not in supported:
            where.setdefault(name, []).append(what)

    def visit(graph: onnx.GraphProto) -> None:
        for kind, values in (("input", graph.input), ("output", graph.output), ("value", graph.value_info)):
            for vi in values:
                if vi.type.HasField("tensor_type"):
                    note(vi.type.tensor_type.elem_type, f"{kind} {vi.name!r}")
        for init in graph.initializer:
            note(init.data_type, f"initializer {init.name!r}")
        for k, node in enumerate(graph.node):
            label = f"{node.op_type} node {node.name!r}" if node.name else f"{node.op_type} node #{k}"
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    note(attr.t.data_type, label)
                elif attr.name == "to" and node.op_type == "Cast" and attr.type == onnx.AttributeProto.INT:
                    note(attr.i, label)
                for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                    visit(sub)

    visit(proto.graph)
    if not where:
        return
    lines = []
    for name, uses in sorted(where.items()):
        shown = ", ".join(dict.fromkeys(uses))
        lines.append(f"  {name.lower()}: {shown if len(shown) < 200 else shown[:200] + ' ...'}")
    raise UnsupportedModelError(
        f"the model uses element type{'s' * (len(where) > 1)} that {backend} cannot compute:\n"
        + "\n".join(lines)
        + f"\nSupported: {', '.join(sorted(t.lower() for t in supported))}. Convert the model to one of "
        "these types, or use backend='reference' (onnx's evaluator) for it.",
        unsupported=[("ai.onnx", f"element type {name.lower()}", "") for name in sorted(where)],
    )


# Inputs (by position) that TVM's importer needs as constants: they decide an output's shape, an
# axis or a count, and a run-time value fails deep inside TVM, at code generation (Slice), or is
# silently replaced by a default (NonMaxSuppression). Squeeze/Unsqueeze/Tile/Range/Expand have
# run-time paths and are not listed.
_STATIC_INPUTS = {
    "Reshape": (1,), "ConstantOfShape": (0,), "Slice": (1, 2, 3, 4), "Pad": (1, 3),
    "Resize": (2, 3), "Upsample": (1,), "TopK": (1,), "OneHot": (1,), "Split": (1,), "CumSum": (1,),
    "NonMaxSuppression": (2, 3, 4),
    **{op: (1,) for op in ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd",
                           "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")},
}


def _attr_value(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _conv_transpose_shape_without_output_shape(node: onnx.NodeProto, ctx) -> tuple[int, ...] | None:
    """The output shape ConvTranspose has from its pads alone (what TVM computes), if known."""
    x, w = (ctx["shapes"].get(name) for name in node.input[:2])
    if x is None or w is None or _attr_value(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return None
    spatial = len(x) - 2
    strides = _attr_value(node, "strides", [1] * spatial)
    dilations = _attr_value(node, "dilations", [1] * spatial)
    pads = _attr_value(node, "pads", [0] * 2 * spatial)
    extra = _attr_value(node, "output_padding", [0] * spatial)
    kernel = _attr_value(node, "kernel_shape", list(w[2:]))
    sizes = [strides[i] * (x[2 + i] - 1) + extra[i] + (kernel[i] - 1) * dilations[i] + 1
             - pads[i] - pads[spatial + i] for i in range(spatial)]
    return (x[0], w[1] * int(_attr_value(node, "group", 1)), *sizes)


# Node forms TVM 0.27's importer accepts but computes wrongly, without an error (each seen in
# ONNX's backend tests): refused with the reason instead of returning wrong numbers.
_TVM_WRONG = [
    ("IsInf", lambda n, _: not _attr_value(n, "detect_negative", 1) or not _attr_value(n, "detect_positive", 1),
     "detect_negative=0 / detect_positive=0 are ignored (every infinity is reported)"),
    ("ConvTranspose", lambda n, ctx: _attr_value(n, "output_shape") is not None
     and _conv_transpose_shape_without_output_shape(n, ctx) != ctx["shapes"].get(n.output[0]),
     "the output_shape attribute is ignored (give the pads that produce it instead)"),
    ("Dropout", lambda n, _: len(n.output) > 1 and bool(n.output[1]),
     "its mask output comes back as float32, not bool"),
    ("Dropout", lambda n, ctx: len(n.input) > 2 and bool(n.input[2]) and ctx["consts"].get(n.input[2], True),
     "training_mode is ignored (accelkit compiles models for inference)"),
    ("BatchNormalization", lambda n, _: bool(_attr_value(n, "training_mode", 0)),
     "training_mode=1 is ignored (accelkit compiles models for inference)"),
    ("RoiAlign", lambda n, _: _attr_value(n, "mode", b"avg") in (b"max", "max"),
     "mode='max' computes another pooling"),
]


def check_tvm_semantics(proto: onnx.ModelProto, backend: str = "TVM's Relax ONNX importer") -> None:
    """Raise one UnsupportedModelError naming every node (subgraphs included) in one of the forms
    of _TVM_WRONG."""
    from onnx import numpy_helper

    from .fold import tensor_types

    ctx = {
        # scalar initializers of the main graph (e.g. a Dropout's training_mode=False)
        "consts": {t.name: bool(numpy_helper.to_array(t).reshape(-1)[0]) for t in proto.graph.initializer
                   if len(t.dims) == 0 or list(t.dims) == [1]},
        "shapes": {name: static_shape(t) for name, t in tensor_types(proto).items()},
    }
    found, unsupported = [], []
    for k, node in enumerate(_walk_nodes(proto.graph)):
        if _node_key(node.domain, node.op_type)[0] != "":
            continue
        for op, wrong, why in _TVM_WRONG:
            if node.op_type == op and wrong(node, ctx):
                label = node.name or f"<unnamed node #{k}>"
                found.append(f"  {op} node {label!r}: {why}")
                unsupported.append(("ai.onnx", op, label))
    if found:
        raise UnsupportedModelError(
            f"{backend} would compute these nodes wrongly:\n" + "\n".join(found)
            + "\nRe-export the model without these forms, or use backend='reference' for it.",
            unsupported=unsupported,
        )


def check_static_arguments(proto: onnx.ModelProto, backend: str = "TVM's Relax ONNX importer") -> None:
    """Raise one UnsupportedModelError naming every main-graph node that gets a run-time value for
    an input listed in _STATIC_INPUTS (after folding, constants are initializers)."""
    g = proto.graph
    constant = {init.name for init in g.initializer}
    constant.update(o for n in g.node if n.op_type == "Constant" and _node_key(n.domain, n.op_type)[0] == ""
                    for o in n.output)
    found, unsupported = [], []
    for k, node in enumerate(g.node):
        if _node_key(node.domain, node.op_type)[0] != "" or node.op_type not in _STATIC_INPUTS:
            continue
        names = [node.input[i] for i in _STATIC_INPUTS[node.op_type] if i < len(node.input) and node.input[i]]
        runtime = [n for n in names if n not in constant]
        if runtime:
            label = node.name or f"<unnamed node #{k}>"
            found.append(f"  {node.op_type} node {label!r}: input{'s' * (len(runtime) > 1)} "
                         f"{', '.join(map(repr, runtime))}")
            unsupported.append(("ai.onnx", node.op_type, label))
    if found:
        raise UnsupportedModelError(
            f"{backend} needs these inputs as constants, but the model computes them at run time "
            "(accelkit compiles for static shapes, and these values set an output's shape or axes):\n"
            + "\n".join(found) + "\nStore them as initializers (or compute them from the input shapes "
            "only, which accelkit folds), or use backend='reference'.",
            unsupported=unsupported,
        )


def newer_op_changes(node: onnx.NodeProto, opset: int, base: int = TVM_MAX_OPSET) -> str:
    """Why ai.onnx `node` at `opset` may compute something else than its version at opset `base`
    ("" when it computes the same: same version, or a newer one that only accepts more element
    types and whose new attributes the node leaves at their defaults)."""
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, "")
    except onnx.defs.SchemaError:
        return ""  # an op onnx does not know: onnx.checker and the op list report it
    if schema.since_version <= base:
        return ""
    why = (f"opset {opset} gives {node.op_type} version {schema.since_version}, newer than opset {base} "
           f"(the newest TVM's converters implement), and")
    try:
        old = onnx.defs.get_schema(node.op_type, base, "")
    except onnx.defs.SchemaError:
        return f"{why} {node.op_type} did not exist before"
    if [i.name for i in schema.inputs] != [i.name for i in old.inputs] or \
            [o.name for o in schema.outputs] != [o.name for o in old.outputs]:
        return f"{why} its inputs or outputs changed"
    for attr in node.attribute:
        if attr.name in schema.attributes and attr.name not in old.attributes:
            default = schema.attributes[attr.name].default_value
            if not default.name or helper.get_attribute_value(attr) != helper.get_attribute_value(default):
                return f"{why} the node sets its new attribute {attr.name}"
    return ""


def tvm_supported_ops() -> set[tuple[str, str]]:
    """(domain, op_type) pairs TVM's Relax ONNX importer converts."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    ops = {("", op) for op in _get_convert_map()} | {("", "If"), ("", "Constant")}
    ops -= {("", op) for op in _TVM_CONTRIB_OPS}
    ops |= {("com.microsoft", op) for op in _TVM_CONTRIB_OPS}
    return ops


# --------------------------------------------------------------------------- TVM import

@contextlib.contextmanager
def _clip_as_relax_op():
    """Import ONNX Clip with constant scalar bounds as one `relax.clip` op (TVM's importer emits
    two opaque TE calls, which no later pass or kernel pattern can see through: ReLU6 is then
    no longer fusable into the convolution before it)."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import onnx_frontend

    clip = onnx_frontend.Clip
    original_v1, original_v13 = clip.__dict__["_impl_v1"], clip.__dict__["_impl_v13"]

    def bound(expr, default):
        if expr is None:
            return default
        if isinstance(expr, tvm.ir.expr.Constant) and expr.value.numpy().size == 1:
            value = float(expr.value.numpy().reshape(()))
            return None if value != value else value  # NaN bound: keep TVM's handling
        return None

    def emit(bb, x, lo, hi):
        dtype = str(x.ty.dtype)
        if dtype not in ("float32", "float16", "float64"):
            return None
        clamp = {"float16": 65504.0, "float32": 3.4028234663852886e38, "float64": 1.7976931348623157e308}[dtype]
        lo, hi = max(lo, -clamp), min(hi, clamp)
        return bb.emit(relax.op.clip(x, relax.prim_value(tvm_float(dtype, lo)), relax.prim_value(tvm_float(dtype, hi))))

    def tvm_float(dtype, value):
        return tvm.tirx.FloatImm(dtype, value)

    @classmethod
    def impl_v1(cls, bb, inputs, attr, params):
        out = emit(bb, inputs[0], float(attr.get("min", -float("inf"))), float(attr.get("max", float("inf"))))
        return out if out is not None else original_v1.__func__(cls, bb, inputs, attr, params)

    @classmethod
    def impl_v13(cls, bb, inputs, attr, params):
        lo = bound(inputs[1] if len(inputs) > 1 else None, -float("inf"))
        hi = bound(inputs[2] if len(inputs) > 2 else None, float("inf"))
        out = emit(bb, inputs[0], lo, hi) if lo is not None and hi is not None else None
        return out if out is not None else original_v13.__func__(cls, bb, inputs, attr, params)

    clip._impl_v1, clip._impl_v13 = impl_v1, impl_v13
    try:
        yield
    finally:
        clip._impl_v1, clip._impl_v13 = original_v1, original_v13


def to_relax(graph: Graph) -> "tvm.IRModule":
    """Import a prepared Graph into a Relax IRModule ("main" takes graph.inputs in order), with
    weights bound as constants and folded."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    check_supported(graph.proto, tvm_supported_ops(), backend="TVM's Relax ONNX importer")
    check_element_types(graph.proto, backend="TVM")
    check_static_arguments(graph.proto)
    check_tvm_semantics(graph.proto)
    shape_dict = {s.name: list(s.shape) for s in graph.inputs}
    dtype_dict = {s.name: s.dtype for s in graph.inputs}
    log = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(log), _clip_as_relax_op():
            warnings.simplefilter("ignore")
            mod = from_onnx(graph.proto, shape_dict=shape_dict, dtype_dict=dtype_dict, keep_params_in_input=False)
    except (tvm.error.OpNotImplemented, NotImplementedError) as err:
        raise UnsupportedModelError(f"TVM's ONNX importer does not support part of the model: {err}") from err
    except Exception as err:  # noqa: BLE001 - converter failures: keep the reason, name the op
        where = " ".join(line for line in log.getvalue().splitlines() if line.startswith("Error converting operator"))
        where = where.split(", with inputs")[0]
        raise UnsupportedModelError(
            f"TVM's ONNX importer failed{' (' + where + ')' if where else ''}: {type(err).__name__}: "
            f"{str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
        ) from err
    try:
        mod = relax.transform.FoldConstant()(mod)
    except Exception as err:  # noqa: BLE001
        raise UnsupportedModelError(f"TVM constant folding failed after import: {type(err).__name__}: {err}") from err
    return mod
