"""CompiledModel: a loaded executable plus its manifest; validates feeds and runs."""
from __future__ import annotations

import os
import shutil
import weakref
from collections.abc import Mapping
from typing import Any

from accelkit.errors import FeedError


class CompiledModel:
    """What `accelkit.compile` and `accelkit.load` return. `run(feeds)` returns the outputs as a
    list of numpy arrays in graph output order, like onnxruntime's InferenceSession.run."""

    def __init__(self, backend, directory: str, manifest: dict[str, Any], *, owns_directory: bool,
                 runner=None):
        from accelkit.frontend import TensorSpec

        self._backend = backend
        self._directory = directory
        self.manifest = manifest
        self.inputs = [TensorSpec(d["name"], tuple(d["shape"]), d["dtype"]) for d in manifest["inputs"]]
        self.outputs = [TensorSpec(d["name"], tuple(d["shape"]), d["dtype"]) for d in manifest["outputs"]]
        self._index_bounds = manifest.get("index_bounds", {})
        # how compile() got this model: "hit", "miss" (compiled, then cached), "off"
        # (cache=False), "unwritable" (compiled; the cache could not be written); None if loaded
        self.cache_status: str | None = None
        self.tuning_report = None  # accelkit.tuning.TuneReport when compiled with tune=
        self._runner = runner if runner is not None else backend.load(directory, manifest)
        if owns_directory:
            # the loaded library stays mapped until the process exits; the files can go with us
            self._cleanup = weakref.finalize(self, shutil.rmtree, directory, True)

    @property
    def backend(self) -> str:
        return self.manifest["backend"]

    @property
    def precision(self) -> str:
        return self.manifest["precision"]

    def run(self, feeds: Mapping[str, Any]) -> list:
        """Run once. `feeds` maps every input name to an array of exactly its shape and dtype."""
        return self._runner.run(self._check_feeds(feeds))

    def _check_feeds(self, feeds: Mapping[str, Any]) -> list:
        import numpy as np

        if not isinstance(feeds, Mapping):
            raise FeedError(f"run() takes a dict of input name -> numpy array, got "
                            f"{type(feeds).__name__}; inputs are {self._describe_inputs()}")
        expected = [spec.name for spec in self.inputs]
        missing = [n for n in expected if n not in feeds]
        extra = [n for n in feeds if n not in expected]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing input(s) {', '.join(map(repr, missing))}")
            if extra:
                parts.append(f"unknown input(s) {', '.join(map(repr, extra))}")
            raise FeedError(f"{'; '.join(parts)}: the model takes {self._describe_inputs()}")
        arrays = []
        for spec in self.inputs:
            value = feeds[spec.name]
            array = value if isinstance(value, np.ndarray) else np.asarray(value)
            if array.dtype != np.dtype(spec.dtype):
                raise FeedError(
                    f"input '{spec.name}' has dtype {array.dtype}, expected {spec.dtype}; "
                    f"convert it with .astype(numpy.{spec.dtype})"
                )
            if tuple(array.shape) != spec.shape:
                raise FeedError(
                    f"input '{spec.name}' has shape {tuple(array.shape)}, expected {spec.shape}; "
                    f"the model was compiled for that shape (pass input_shapes= to compile to "
                    f"build it for another)"
                )
            bound = self._index_bounds.get(spec.name)
            if bound is not None and array.size:
                low, high = int(array.min()), int(array.max())
                if low < -bound or high >= bound:
                    bad = low if low < -bound else high
                    raise FeedError(
                        f"input '{spec.name}' holds {bad}, but its values index an axis of size "
                        f"{bound} in the model (valid: {-bound} .. {bound - 1}); e.g. a token id "
                        f"outside the vocabulary"
                    )
            # np.ascontiguousarray would turn a 0-d (scalar) input into shape (1,)
            arrays.append(array if array.flags.c_contiguous else array.copy(order="C"))
        return arrays

    def _describe_inputs(self) -> str:
        return ", ".join(f"{s.name}: {s.dtype}{list(s.shape)}" for s in self.inputs)

    def save(self, path: str | os.PathLike) -> str:
        """Write a self-describing .akx artifact (library + manifest); returns its path."""
        from accelkit import artifact

        return artifact.save(self._directory, self.manifest, path)

    def __repr__(self) -> str:
        ins = ", ".join(f"{s.name}:{s.dtype}{list(s.shape)}" for s in self.inputs)
        outs = ", ".join(f"{s.name}:{s.dtype}{list(s.shape)}" for s in self.outputs)
        return (f"<CompiledModel backend={self.backend} precision={self.precision} "
                f"target={self.manifest.get('target')!r} inputs=[{ins}] outputs=[{outs}]>")
