"""The `reference` backend: onnx's ReferenceEvaluator (pure numpy). Slow; the correctness
oracle the other backends are tested against."""
from __future__ import annotations

import os

from accelkit.backends.base import Backend, CompileOptions


class ReferenceBackend(Backend):
    name = "reference"
    description = "onnx.reference.ReferenceEvaluator: slow, exact; the test oracle"

    def fingerprint(self) -> str:
        import onnx

        return f"reference;onnx={onnx.__version__}"

    def compile(self, graph, options: CompileOptions, out_dir: str):
        import onnx

        onnx.save(graph.proto, os.path.join(out_dir, "model.onnx"))
        return {"target": "onnx.reference", "model_file": "model.onnx"}

    def load(self, directory, manifest):
        import onnx

        return _ReferenceRunner(onnx.load(os.path.join(directory, manifest["model_file"])))


class _ReferenceRunner:
    def __init__(self, proto):
        from onnx.reference import ReferenceEvaluator

        self._names = [i.name for i in proto.graph.input
                       if i.name not in {t.name for t in proto.graph.initializer}]
        self._evaluator = ReferenceEvaluator(proto)

    def run(self, inputs):
        import numpy as np

        outputs = self._evaluator.run(None, dict(zip(self._names, inputs)))
        return [np.asarray(o) for o in outputs]
