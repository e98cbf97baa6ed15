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


def measure(reduced, reference, batches: Sequence[Mapping[str, Any]] | None, index_bounds=None) -> dict[str, Any]:
    """Per output, the worst over the batches of cosine similarity and relative L2 error of
    `reduced` against `reference` (both CompiledModels)."""
    from accelkit.bench import compare_outputs, random_feeds

    source = "calibration" if batches else "random"
    if not batches:
        batches = [random_feeds(reduced.inputs, index_bounds, seed=i) for i in range(RANDOM_BATCHES)]
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
