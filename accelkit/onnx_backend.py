"""accelkit as an `onnx.backend.base.Backend`, so ONNX's own backend test suite (and any tool
written against that interface) runs models through `accelkit.compile`.

    from accelkit import onnx_backend
    outputs = onnx_backend.run_model(model, [x])            # backend "cpu", device "CPU"
    rep = onnx_backend.prepare(model, backend="reference")  # any accelkit backend
    Backend = onnx_backend.backend_class("reference")       # a Backend class bound to one backend

Models are compiled with cache=False unless `cache=True` is passed: conformance runs compile
thousands of one-node models that nobody will ask for again."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx.backend.base import Backend, BackendRep, Device, DeviceType

from accelkit.errors import BackendError, FeedError

__all__ = ["AccelkitBackend", "AccelkitRep", "backend_class",
           "prepare", "run_model", "run_node", "supports_device", "is_compatible"]

# Keyword arguments ONNX's test runner may pass to prepare() that are its own comparison
# tolerances, not compile options.
_RUNNER_KWARGS = ("rtol", "atol")


class AccelkitRep(BackendRep):
    """A compiled model: `run(inputs)` takes the inputs in graph input order (a list or tuple, a
    single array for a one-input model, or a dict name -> array) and returns the outputs as a
    tuple in graph output order."""

    def __init__(self, compiled):
        self.compiled = compiled  # the accelkit.CompiledModel

    def run(self, inputs: Any, **kwargs: Any) -> tuple[Any, ...]:
        if kwargs:
            raise TypeError(f"AccelkitRep.run() takes no options, got {', '.join(sorted(kwargs))}")
        specs = self.compiled.inputs
        if isinstance(inputs, Mapping):
            feeds = dict(inputs)
        else:
            if isinstance(inputs, np.ndarray) or np.isscalar(inputs):
                inputs = [inputs]
            inputs = list(inputs)
            if len(inputs) != len(specs):
                described = ", ".join(f"{s.name}: {s.dtype}{list(s.shape)}" for s in specs)
                raise FeedError(f"run() got {len(inputs)} input(s) but the model takes "
                                f"{len(specs)}: {described} (pass them in this order, or a dict)")
            feeds = {spec.name: value for spec, value in zip(specs, inputs)}
        return tuple(self.compiled.run(feeds))


class AccelkitBackend(Backend):
    """ONNX backend over accelkit. `accelkit_backend` is the accelkit backend models compile for;
    `backend_class(name)` makes a subclass bound to another one (ONNX's test runner takes a
    class, not an instance)."""

    accelkit_backend = "cpu"

    @classmethod
    def supports_device(cls, device: str) -> bool:
        try:
            return Device(device).type == DeviceType.CPU
        except (AttributeError, ValueError):  # an unknown device name such as "TPU"
            return False

    @classmethod
    def prepare(cls, model, device: str = "CPU", **kwargs: Any) -> AccelkitRep:
        """Compile `model` (ModelProto, bytes or path). kwargs go to accelkit.compile
        (backend=, input_shapes=, precision=, cache=, backend options); cache defaults to
        False."""
        import accelkit

        cls._check_device(device)
        for name in _RUNNER_KWARGS:
            kwargs.pop(name, None)
        kwargs.setdefault("backend", cls.accelkit_backend)
        kwargs.setdefault("cache", False)
        return AccelkitRep(accelkit.compile(model, **kwargs))

    @classmethod
    def run_model(cls, model, inputs: Any, device: str = "CPU", **kwargs: Any) -> tuple[Any, ...]:
        return cls.prepare(model, device, **kwargs).run(inputs)

    @classmethod
    def run_node(cls, node: onnx.NodeProto, inputs: Any, device: str = "CPU",
                 outputs_info: Sequence[tuple[Any, Sequence[int]]] | None = None,
                 **kwargs: Any) -> tuple[Any, ...]:
        """Run one node: a one-node model is built around it, with the inputs' dtypes and shapes
        (inputs: a list in node.input order, skipping empty optional names, or a dict) and the
        outputs' types from `outputs_info` [(dtype, shape), ...] or from shape inference.
        `opset_version` picks the ai.onnx opset (default: the newest accelkit accepts)."""
        super().run_node(node, inputs, device=device, outputs_info=outputs_info, **kwargs)
        opset = kwargs.pop("opset_version", None)
        model = node_model(node, inputs, outputs_info, opset)
        feeds = {vi.name: np.asarray(value) for vi, value in
                 zip(model.graph.input, _node_feeds(node, inputs))}
        return cls.prepare(model, device, **kwargs).run(feeds)

    @classmethod
    def _check_device(cls, device: str) -> None:
        if not cls.supports_device(device):
            raise BackendError(f"device {device!r} is not supported by accelkit's ONNX backend "
                               f"(accelkit backend '{cls.accelkit_backend}'); use device='CPU'")


def backend_class(name: str) -> type[AccelkitBackend]:
    """An AccelkitBackend subclass that compiles for accelkit backend `name`
    (e.g. onnx.backend.test.BackendTest(backend_class("reference"), __name__))."""
    from accelkit.backends import get_backend

    get_backend(name)  # an unknown name fails here, with the list of valid ones
    return type(f"AccelkitBackend_{name}", (AccelkitBackend,), {"accelkit_backend": name})


def _node_feeds(node: onnx.NodeProto, inputs: Any) -> list:
    names = [n for n in node.input if n]
    if isinstance(inputs, Mapping):
        missing = [n for n in names if n not in inputs]
        if missing:
            raise FeedError(f"run_node: no value for input(s) {', '.join(map(repr, missing))} of "
                            f"node {node.op_type} (it takes {names})")
        return [inputs[n] for n in names]
    if isinstance(inputs, np.ndarray):
        inputs = [inputs]
    inputs = list(inputs)
    if len(inputs) != len(names):
        raise FeedError(f"run_node: node {node.op_type} takes {len(names)} input(s) {names}, "
                        f"got {len(inputs)}")
    return inputs


def node_model(node: onnx.NodeProto, inputs: Any,
               outputs_info: Sequence[tuple[Any, Sequence[int]]] | None = None,
               opset: int | None = None) -> onnx.ModelProto:
    """A model holding `node` alone, typed from the input values (see AccelkitBackend.run_node)."""
    from onnx import helper

    from accelkit.frontend import MAX_OPSET

    values = [np.asarray(v) for v in _node_feeds(node, inputs)]
    graph_inputs = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(v.dtype),
                                                  list(v.shape))
                    for name, v in zip([n for n in node.input if n], values)]
    outputs = [n for n in node.output if n]
    opsets = [helper.make_opsetid("", opset or min(MAX_OPSET, onnx.defs.onnx_opset_version()))]
    if node.domain not in ("", "ai.onnx"):
        opsets.append(helper.make_opsetid(node.domain, 1))
    if outputs_info is not None:
        if len(outputs_info) != len(outputs):
            raise FeedError(f"run_node: outputs_info has {len(outputs_info)} entries but node "
                            f"{node.op_type} has {len(outputs)} output(s) {outputs}")
        graph_outputs = [helper.make_tensor_value_info(
            name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), list(shape))
            for name, (dtype, shape) in zip(outputs, outputs_info)]
        return _model(node, graph_inputs, graph_outputs, opsets)
    # Types from shape inference on a model whose outputs are declared untyped.
    untyped = [onnx.ValueInfoProto(name=name) for name in outputs]
    inferred = onnx.shape_inference.infer_shapes(_model(node, graph_inputs, untyped, opsets, check=False))
    types = {vi.name: vi.type for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
    graph_outputs = []
    for name in outputs:
        vi = onnx.ValueInfoProto(name=name)
        if name in types and types[name].WhichOneof("value") is not None:
            vi.type.CopyFrom(types[name])
        graph_outputs.append(vi)
    return _model(node, graph_inputs, graph_outputs, opsets)


def _model(node, graph_inputs, graph_outputs, opsets, check=True) -> onnx.ModelProto:
    from onnx import helper

    model = helper.make_model(helper.make_graph([node], f"run_node_{node.op_type}", graph_inputs,
                                                graph_outputs), opset_imports=opsets)
    if check:
        onnx.checker.check_model(model)
    return model


prepare = AccelkitBackend.prepare
run_model = AccelkitBackend.run_model
run_node = AccelkitBackend.run_node
supports_device = AccelkitBackend.supports_device
is_compatible = AccelkitBackend.is_compatible
