"""ONNX-side normalisation once input shapes are static: shape inference, constant folding of
shape-computing subgraphs, inlining of If on a constant condition, dead-code removal."""
from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import onnx
from onnx import helper, numpy_helper

# Largest tensor (elements) we materialise as an initializer while folding. Shape computations
# are tiny; the cap keeps "light" models (weights made by ConstantOfShape) and big weight
# transposes from blowing up the proto. TVM's FoldConstant folds what we leave.
FOLD_LIMIT_ELEMENTS = 1 << 20

MAX_ITERATIONS = 30
# Initializers up to this size keep their values for shape inference's data propagation.
_INFERENCE_DATA_LIMIT = 1 << 12

# Ops whose result is not a pure function of their inputs.
_NONDETERMINISTIC = {
    "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
    "Multinomial", "Bernoulli",
}
_SEQUENCE_OPS = {
    "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert", "SequenceAt",
    "SequenceLength", "SplitToSequence", "ConcatFromSequence", "SequenceMap",
    "Optional", "OptionalGetElement", "OptionalHasElement",
}


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 1


def static_shape(type_proto: onnx.TypeProto) -> tuple[int, ...] | None:
    """The fully static shape of a tensor type, or None if the rank or any dim is unknown."""
    if not type_proto.HasField("tensor_type") or not type_proto.tensor_type.HasField("shape"):
        return None
    dims = []
    for d in type_proto.tensor_type.shape.dim:
        if not d.HasField("dim_value") or d.dim_value < 0:
            return None
        dims.append(d.dim_value)
    return tuple(dims)


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX shape inference with data propagation; refreshes model's value_info and output types
    in place and returns it. Inference runs on a skeleton whose large initializers are declared as
    inputs (type and shape only), so big models are not copied or serialized with their weights."""
    g = model.graph
    skel = onnx.ModelProto()
    skel.ir_version = max(model.ir_version, 4)
    skel.opset_import.extend(model.opset_import)
    skel.functions.extend(model.functions)
    sg = skel.graph
    sg.name = g.name
    sg.node.extend(g.node)
    sg.input.extend(g.input)
    sg.output.extend(g.output)
    declared = {vi.name for vi in g.input}
    for init in g.initializer:
        if _numel(init.dims) <= _INFERENCE_DATA_LIMIT and not init.HasField("data_location"):
            sg.initializer.append(init)
        elif init.name not in declared:
            sg.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    try:
        inferred = onnx.shape_inference.infer_shapes(skel, check_type=False, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - inference is best effort; folding still works without it
        return model
    del g.value_info[:]
    g.value_info.extend(inferred.graph.value_info)
    for out, inf in zip(g.output, inferred.graph.output):
        if inf.type.HasField("tensor_type") and inf.type.tensor_type.HasField("shape"):
            out.type.CopyFrom(inf.type)
    return model


def tensor_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    g = model.graph
    types: dict[str, onnx.TypeProto] = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type
    for init in g.initializer:
        types[init.name] = helper.make_tensor_type_proto(init.data_type, list(init.dims))
    return types


def all_names(graph: onnx.GraphProto, into: set[str] | None = None) -> set[str]:
    """Every value and node name used anywhere in graph, nested subgraphs included."""
    names = into if into is not None else set()
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        names.add(vi.name)
    for init in graph.initializer:
        names.add(init.name)
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        names.add(node.name)
        for attr in node.attribute:
            for sub in _subgraphs(attr):
                all_names(sub, names)
    return names


def _subgraphs(attr: onnx.AttributeProto) -> list[onnx.GraphProto]:
    if attr.type == onnx.AttributeProto.GRAPH:
        return [attr.g]
    if attr.type == onnx.AttributeProto.GRAPHS:
        return list(attr.graphs)
    return []


def used_names(graph: onnx.GraphProto, into: set[str] | None = None) -> set[str]:
    """Names consumed by nodes of graph or any nested subgraph (outer-scope references included)."""
    used = into if into is not None else set()
    for node in graph.node:
        used.update(i for i in node.input if i)
        for attr in node.attribute:
            for sub in _subgraphs(attr):
                used_names(sub, used)
                used.update(o.name for o in sub.output)
    return used


def rename_uses(graph: onnx.GraphProto, mapping: dict[str, str]) -> None:
    """Rename consumed values (node inputs, graph outputs) in graph and its subgraphs."""
    if not mapping:
        return
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in mapping:
                node.input[k] = mapping[name]
        for attr in node.attribute:
            for sub in _subgraphs(attr):
                rename_uses(sub, mapping)
                for out in sub.output:
                    if out.name in mapping:
                        out.name = mapping[out.name]


# Names a fresh name must also avoid: while a subgraph is normalised as a model of its own, the
# names of the enclosing graphs (outer scopes and sibling branches).
_RESERVED: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("accelkit_reserved_names",
                                                                          default=frozenset())


@contextlib.contextmanager
def reserve_names(names: Iterable[str]) -> Iterator[None]:
    token = _RESERVED.set(_RESERVED.get() | frozenset(names))
    try:
        yield
    finally:
        _RESERVED.reset(token)


class NameSupply:
    """Fresh value names that collide with nothing already in the model (nor any reserved name)."""

    def __init__(self, taken: Iterable[str]):
        self.taken = set(taken) | _RESERVED.get()

    def __call__(self, hint: str) -> str:
        name, k = hint, 0
        while name in self.taken or not name:
            k += 1
            name = f"{hint}_{k}"
        self.taken.add(name)
        return name


def _numel(shape: Iterable[int]) -> int:
    return int(math.prod(int(d) for d in shape))


class _Constants:
    """Initializers as lazily-converted numpy arrays, plus values folded in this pass."""

    def __init__(self, graph: onnx.GraphProto):
        self.protos = {init.name: init for init in graph.initializer}
        self.arrays: dict[str, np.ndarray] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.protos or name in self.arrays

    def numel(self, name: str) -> int:
        if name in self.arrays:
            return int(self.arrays[name].size)
        return _numel(self.protos[name].dims)

    def get(self, name: str) -> np.ndarray:
        if name not in self.arrays:
            self.arrays[name] = numpy_helper.to_array(self.protos[name])
        return self.arrays[name]


def _evaluate(node: onnx.NodeProto, feeds: dict[str, np.ndarray], opset: int) -> list[np.ndarray] | None:
    from onnx.reference import ReferenceEvaluator

    try:
        ev = ReferenceEvaluator(node, opsets={"": opset})
        outs = ev.run(None, feeds)
    except Exception:  # noqa: BLE001 - an op the reference cannot run is simply left unfolded
        return None
    result = []
    for out in outs:
        if not isinstance(out, (np.ndarray, np.generic)):
            return None
        result.append(np.asarray(out))
    return result


def _shape_value(node: onnx.NodeProto, shape: tuple[int, ...]) -> np.ndarray:
    if node.op_type == "Size":
        return np.array(_numel(shape), dtype=np.int64)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    rank = len(shape)
    start = attrs.get("start", 0)
    end = attrs.get("end", rank)
    start = min(max(start + rank if start < 0 else start, 0), rank)
    end = min(max(end + rank if end < 0 else end, 0), rank)
    return np.array(shape[start:end], dtype=np.int64)


def _predicted_too_big(node: onnx.NodeProto, types: dict[str, onnx.TypeProto], limit: int) -> bool:
    for out in node.output:
        if out and out in types:
            shape = static_shape(types[out])
            if shape is not None and _numel(shape) > limit:
                return True
    return False


def inline_if(node: onnx.NodeProto, cond: bool, fresh: NameSupply) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The taken branch's nodes and initializers, renamed to be unique in the outer graph, plus
    Identity nodes that bind the branch outputs to the If node's outputs."""
    branch_name = "then_branch" if cond else "else_branch"
    branch = next(helper.get_attribute_value(a) for a in node.attribute if a.name == branch_name)
    sub = onnx.GraphProto()
    sub.CopyFrom(branch)
    local = [init.name for init in sub.initializer] + [o for n in sub.node for o in n.output if o]
    mapping = {name: fresh(name) for name in local}
    rename_uses(sub, mapping)
    for out in sub.output:
        out.name = mapping.get(out.name, out.name)
    for n in sub.node:
        for k, o in enumerate(n.output):
            if o in mapping:
                n.output[k] = mapping[o]
        n.name = fresh(n.name or f"{node.name}_{n.op_type}")
    inits = []
    for init in sub.initializer:
        init.name = mapping[init.name]
        inits.append(init)
    nodes = list(sub.node)
    for out_vi, target in zip(sub.output, node.output):
        if target:
            nodes.append(helper.make_node("Identity", [out_vi.name], [target], name=fresh(f"{node.name}_out")))
    return nodes, inits


def fold_once(model: onnx.ModelProto, limit: int = FOLD_LIMIT_ELEMENTS) -> bool:
    """One pass over the main graph, in place; returns whether anything changed."""
    g = model.graph
    opset = default_opset(model)
    types = tensor_types(model)
    consts = _Constants(g)
    fresh = NameSupply(all_names(g))
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    changed = False

    def materialise(names: list[str], values: list[np.ndarray]) -> None:
        for name, value in zip(names, values):
            if name:
                consts.arrays[name] = value
                new_inits.append(numpy_helper.from_array(value, name))

    for node in g.node:
        is_default = node.domain in ("", "ai.onnx")
        inputs = [i for i in node.input if i]
        if not is_default:
            new_nodes.append(node)
            continue
        op = node.op_type

        if op == "Constant":
            values = _evaluate(node, {}, opset)
            if values is not None:
                materialise(list(node.output), values)
                changed = True
                continue
        if op in ("Shape", "Size") and inputs and inputs[0] in types:
            shape = static_shape(types[inputs[0]])
            if shape is not None:
                materialise([node.output[0]], [_shape_value(node, shape)])
                changed = True
                continue
        if op == "If" and node.input[0] in consts:
            cond = consts.get(node.input[0])
            if cond.size == 1:
                nodes, inits = inline_if(node, bool(cond.reshape(-1)[0]), fresh)
                new_nodes.extend(nodes)
                new_inits.extend(inits)
                changed = True
                continue
        if (
            op in _NONDETERMINISTIC or op in _SEQUENCE_OPS
            or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)
            or (op == "Dropout" and len(node.input) >= 3 and node.input[2])
            or not all(i in consts for i in inputs)
            or any(consts.numel(i) > limit for i in inputs)
            or _predicted_too_big(node, types, limit)
        ):
            new_nodes.append(node)
            continue
        if op == "ConstantOfShape" and inputs and _numel(consts.get(inputs[0]).reshape(-1)) > limit:
            new_nodes.append(node)
            continue
        feeds = {i: consts.get(i) for i in inputs}
        values = _evaluate(node, feeds, opset)
        if values is None or any(v.size > limit for v in values) or len(values) < len([o for o in node.output if o]):
            new_nodes.append(node)
            continue
        materialise(list(node.output), values)
        changed = True

    if changed:
        del g.node[:]
        g.node.extend(new_nodes)
        g.initializer.extend(new_inits)
    return remove_dead(model) or changed


def remove_dead(model: onnx.ModelProto) -> bool:
    """Drop nodes whose outputs nobody uses, and unused initializers; in place."""
    g = model.graph
    needed = {o.name for o in g.output}
    keep: list[onnx.NodeProto] = []
    for node in reversed(g.node):
        if any(o in needed for o in node.output if o):
            keep.append(node)
            needed.update(i for i in node.input if i)
            for attr in node.attribute:
                for sub in _subgraphs(attr):
                    used_names(sub, needed)
    keep.reverse()
    changed = len(keep) != len(g.node)
    if changed:
        del g.node[:]
        g.node.extend(keep)
    # delete in place: re-adding big initializers would copy their data
    for k in reversed([k for k, init in enumerate(g.initializer) if init.name not in needed]):
        del g.initializer[k]
        changed = True
    return changed


def remove_identities(model: onnx.ModelProto) -> None:
    """Bypass Identity nodes (and Dropout without a used mask) whose output is not a graph output."""
    g = model.graph
    outputs = {o.name for o in g.output}
    used = used_names(g) | outputs
    mapping: dict[str, str] = {}
    keep = []
    for node in g.node:
        bypass = node.domain in ("", "ai.onnx") and (
            node.op_type == "Identity"
            or (node.op_type == "Dropout" and (len(node.output) < 2 or node.output[1] not in used)
                and (len(node.input) < 3 or not node.input[2]))
        )
        if bypass and node.output[0] not in outputs:
            src = node.input[0]
            mapping[node.output[0]] = mapping.get(src, src)
            continue
        keep.append(node)
    if mapping:
        del g.node[:]
        g.node.extend(keep)
        rename_uses(g, mapping)


def defined_names(graph: onnx.GraphProto, into: set[str] | None = None) -> set[str]:
    """Values defined in graph or any nested subgraph: inputs, initializers, node outputs."""
    names = into if into is not None else set()
    names.update(vi.name for vi in graph.input)
    names.update(init.name for init in graph.initializer)
    for node in graph.node:
        names.update(o for o in node.output if o)
        for attr in node.attribute:
            for sub in _subgraphs(attr):
                defined_names(sub, names)
    return names


def free_names(graph: onnx.GraphProto) -> set[str]:
    """Outer-scope values a subgraph (or its nested subgraphs) reads."""
    used = used_names(graph) | {o.name for o in graph.output}
    return used - defined_names(graph)


def _normalise_branch(
    branch: onnx.GraphProto,
    model: onnx.ModelProto,
    types: dict[str, onnx.TypeProto],
    limit: int,
    rewrite: Callable[[onnx.ModelProto], bool] | None,
) -> onnx.GraphProto | None:
    """An If branch normalised like a model of its own: its outer-scope values become inputs
    (small outer constants become initializers, so they fold). None if an outer value's type is
    unknown (the branch is then left as is)."""
    outer_consts = {init.name: init for init in model.graph.initializer}
    free = free_names(branch)
    sm = onnx.ModelProto()
    sm.ir_version = max(model.ir_version, 4)
    sm.opset_import.extend(model.opset_import)
    sm.functions.extend(model.functions)
    sg = sm.graph
    sg.name = branch.name or "branch"
    for name in sorted(free):
        const = outer_consts.get(name)
        if const is not None and _numel(const.dims) <= limit and not const.HasField("data_location"):
            sg.initializer.append(const)
        elif name in types:
            sg.input.append(helper.make_value_info(name, types[name]))
        else:
            return None
    sg.node.extend(branch.node)
    sg.initializer.extend(branch.initializer)
    sg.output.extend(branch.output)
    with reserve_names(all_names(model.graph)):
        sm = fold_to_fixpoint(sm, limit, rewrite)
    out = onnx.GraphProto()
    out.name = branch.name
    out.doc_string = branch.doc_string
    out.node.extend(sm.graph.node)
    out.initializer.extend(init for init in sm.graph.initializer if init.name not in free)
    out.output.extend(sm.graph.output)
    out.value_info.extend(vi for vi in sm.graph.value_info if vi.name not in free)
    return out


def _fingerprint(graph: onnx.GraphProto) -> bytes:
    g = onnx.GraphProto()
    g.node.extend(graph.node)
    g.initializer.extend(graph.initializer)
    g.output.extend(graph.output)
    return g.SerializeToString(deterministic=True)


def normalise_subgraphs(
    model: onnx.ModelProto,
    limit: int = FOLD_LIMIT_ELEMENTS,
    rewrite: Callable[[onnx.ModelProto], bool] | None = None,
) -> bool:
    """Normalise the branches of the main graph's If nodes (whose condition is only known at run
    time) in place: fold their shape subgraphs, inline their constant Ifs, apply `rewrite` (RNN
    expansion), recursively. Loop/Scan bodies are left alone. Needs value_info; returns whether
    anything changed."""
    types = tensor_types(model)
    changed = False
    for node in model.graph.node:
        if node.op_type != "If" or node.domain not in ("", "ai.onnx"):
            continue
        for attr in node.attribute:
            if attr.type != onnx.AttributeProto.GRAPH:
                continue
            new = _normalise_branch(attr.g, model, types, limit, rewrite)
            if new is not None and _fingerprint(new) != _fingerprint(attr.g):
                attr.g.CopyFrom(new)
                changed = True
    return changed


def _has_if(model: onnx.ModelProto) -> bool:
    return any(n.op_type == "If" and n.domain in ("", "ai.onnx") for n in model.graph.node)


def fold_to_fixpoint(
    model: onnx.ModelProto,
    limit: int = FOLD_LIMIT_ELEMENTS,
    rewrite: Callable[[onnx.ModelProto], bool] | None = None,
) -> onnx.ModelProto:
    """Shape inference + folding (+ an optional rewrite such as RNN expansion), repeated until
    nothing changes; then the branches of the If nodes left (data-dependent conditions) get the
    same treatment, and the main graph another round if that changed them (their output shapes
    may now be known). Returns a new model with fresh value_info."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    remove_dead(m)
    for _ in range(MAX_ITERATIONS):
        m = infer_shapes(m)
        changed = fold_once(m, limit)
        if rewrite is not None:
            m = infer_shapes(m) if changed else m
            changed = rewrite(m) or changed
        if not changed and _has_if(m):
            changed = normalise_subgraphs(m, limit, rewrite)
        if not changed:
            break
    remove_identities(m)
    fuse_pads_into_convs(m)
    remove_dead(m)
    return infer_shapes(m)


def fuse_pads_into_convs(model: onnx.ModelProto) -> bool:
    """Pad (constant mode, zeros, spatial dims only) feeding only a Conv -> the Conv's own pads,
    as ONNX Runtime's PadFusion does: the padded copy of the activation disappears (exporters of
    TF-style "same" padding, e.g. transformers' MobileNetV2, emit one before every conv)."""
    g = model.graph
    consts = _Constants(g)
    producers = {o: n for n in g.node for o in n.output}
    uses: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
        for attr in n.attribute:
            for name in (used_names(sub) for sub in _subgraphs(attr)):
                for i in name:
                    uses[i] = uses.get(i, 0) + 2
    for o in g.output:
        uses[o.name] = uses.get(o.name, 0) + 2
    changed = False
    for conv in g.node:
        if conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx") or not conv.input:
            continue
        pad = producers.get(conv.input[0])
        if pad is None or pad.op_type != "Pad" or pad.domain not in ("", "ai.onnx") or uses.get(pad.output[0]) != 1:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in pad.attribute}
        mode = attrs.get("mode", b"constant")
        if (mode.decode() if isinstance(mode, bytes) else mode) != "constant":
            continue
        if "pads" in attrs:  # opset < 11
            pads, value = list(attrs["pads"]), float(attrs.get("value", 0.0))
        else:
            if len(pad.input) < 2 or pad.input[1] not in consts or (len(pad.input) > 3 and pad.input[3]):
                continue
            pads = [int(v) for v in consts.get(pad.input[1]).reshape(-1)]
            value = 0.0
            if len(pad.input) > 2 and pad.input[2]:
                if pad.input[2] not in consts:
                    continue
                value = float(consts.get(pad.input[2]).reshape(-1)[0])
        conv_attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
        auto_pad = conv_attrs.get("auto_pad", b"NOTSET")
        rank = len(pads) // 2
        if (value != 0.0 or rank < 3 or any(p < 0 for p in pads) or any(pads[i] or pads[rank + i] for i in (0, 1))
                or (auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad) != "NOTSET"):
            continue
        spatial = rank - 2
        own = list(conv_attrs.get("pads", [0] * (2 * spatial)))
        merged = [own[i] + pads[2 + i] for i in range(spatial)] + [own[spatial + i] + pads[rank + 2 + i] for i in range(spatial)]
        for k in reversed([k for k, a in enumerate(conv.attribute) if a.name == "pads"]):
            del conv.attribute[k]
        conv.attribute.append(helper.make_attribute("pads", merged))
        conv.input[0] = pad.input[0]
        changed = True
    return changed
