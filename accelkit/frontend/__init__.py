"""ONNX frontend: load and check a model, fix its input shapes, normalise it on the ONNX side
(fold shape subgraphs, inline constant Ifs, expand RNNs) and import it into TVM Relax.

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
from .fold import default_opset, fold_to_fixpoint, static_shape
from .rnn import UNSUPPORTED_TAG, expand_recurrent

if TYPE_CHECKING:
    import tvm

__all__ = [
    "TensorSpec", "Graph", "load_model", "prepare", "to_relax", "check_supported",
    "tvm_supported_ops", "MIN_OPSET", "MAX_OPSET",
]

# ai.onnx opsets we accept: TVM 0.27's converters implement versions up to 23; below 7 the
# old op semantics (e.g. broadcast attributes) are not worth supporting.
MIN_OPSET = 7
MAX_OPSET = 23

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

    proto = fold_to_fixpoint(proto, rewrite=expand_recurrent)
    types = {vi.name: vi.type for vi in list(proto.graph.value_info) + list(proto.graph.output)}
    for init in proto.graph.initializer:
        types.setdefault(init.name, helper.make_tensor_type_proto(init.data_type, list(init.dims)))
    outputs = []
    for vi in proto.graph.output:
        t = types.get(vi.name, vi.type)
        shape = static_shape(t)
        if shape is not None:
            _set_shape(vi, shape)
        if shape is None:  # data-dependent (e.g. NonZero): -1 marks each size unknown until run time
            dims = t.tensor_type.shape.dim if t.tensor_type.HasField("shape") else []
            shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims)
        outputs.append(TensorSpec(vi.name, shape, _elem_dtype(vi.type)))
    return Graph(proto=proto, inputs=inputs, outputs=outputs)


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
) -> None:
    """Raise one UnsupportedModelError listing every node (subgraphs included) whose op is not in
    `known_ops` ("Conv" for ai.onnx, "com.microsoft::FusedConv" or (domain, op) for others), and
    an error for an ai.onnx opset outside `opset_range`."""
    if opset_range is not None:
        opset = default_opset(proto)
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
    for k, node in enumerate(_walk_nodes(proto.graph)):
        key = _node_key(node.domain, node.op_type)
        if key not in known:
            reason = node.doc_string[len(UNSUPPORTED_TAG):] if node.doc_string.startswith(UNSUPPORTED_TAG) else ""
            bad.setdefault(key, []).append((node.name or f"<unnamed node #{k}>", reason))
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
    raise UnsupportedModelError(
        f"the model uses {len(bad)} op type{'s' * (len(bad) > 1)} that {backend} cannot compile:\n"
        + "\n".join(lines) + f"\n{advice}, or use a backend that supports them.",
        unsupported=unsupported,
    )


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
