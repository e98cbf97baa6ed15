"""accelkit.compile: validate options, run the frontend, let the backend build, wrap the result."""
from __future__ import annotations

import dataclasses
import datetime
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

from accelkit.errors import AccelkitError, CompileError, OptionError

PRECISIONS = ("fp32", "fp16", "bf16", "int8")


def compile_model(
    model,
    *,
    backend: str = "cpu",
    precision: str = "fp32",
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    cache: bool = True,
    tune=None,
    calibration=None,
    calibration_method: str | None = None,
    accuracy: float | None = None,
    sparsity: float | None = None,
    **options: Any,
):
    """Compile an ONNX model (path, bytes or onnx.ModelProto) into a CompiledModel.

    precision: fp32, int8, bf16 or fp16 where the backend supports it (Backend.precisions). A reduced
          precision is always measured: the fp32 build and this one run on the same batches and
          the manifest's "accuracy" holds each output's cosine similarity and relative error.
    calibration: the batches that measurement (and int8 calibration) runs on (accelkit.accuracy
          lists the forms: a dict of input arrays, a list of them, an .npz file or a directory);
          default: random inputs.
    calibration_method: how int8 layers get their input ranges. "dynamic": each row (pixel,
          token) quantized with its own range when the layer runs; "minmax", "percentile",
          "entropy": one range per layer input, from the calibration batches at compile time
          (accelkit.accuracy.activation_ranges; a convolution then quantizes its input image
          once instead of every window; they need calibration=); "auto" (default): with
          calibration data the calibrated percentile range for convolutions, dynamic rows for
          MatMul/Gemm (transformer activations have outlier channels a per-tensor range would
          crush); without it dynamic rows everywhere. A pre-quantized (QDQ) model's own
          ranges are used whatever the method.
    accuracy: the least cosine similarity to fp32 every output must keep (e.g. 0.99). When the
          reduced build falls short, the layers whose own quantization error is largest (int8:
          dense layers and convolutions; bf16/fp16: dense layers) are kept in fp32, a few more
          per rebuild, until it holds; manifest["accuracy"] lists them ("kept_fp32") with their
          errors.
    sparsity: prune that fraction of each MatMul/Gemm/Conv weight (smallest magnitudes) before
          compiling; manifest["pruning"] reports the accuracy against the unpruned model and
          the speed (accelkit has no sparse kernel: unchanged).
    input_shapes: sizes for symbolic dims, e.g. {"input_ids": [1, 128]}.
    cache: reuse a previous compilation of the same thing (accelkit.cache; cache=False skips).
    tune: a tuning budget ("10m", seconds) or accelkit.TuneOptions: search first (resuming what
          earlier runs measured), then compile with the result. None (default): apply whatever
          the tuning database holds for this target; False: compile untuned, ignoring it.
    options: backend-specific options (Backend.options lists them).
    """
    from accelkit.backends import CompileOptions, get_backend

    if precision not in PRECISIONS:
        raise OptionError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    be = get_backend(backend)
    if precision not in be.precisions:
        raise OptionError(f"backend '{be.name}' does not support precision {precision!r} yet; "
                          f"it supports {', '.join(be.precisions)}")
    from accelkit.tuning import parse_tune

    tune_options = parse_tune(tune)
    if tune_options is not None and precision != "fp32":
        raise OptionError(f"tune= works on fp32 models in this accelkit version, not {precision!r}")
    if accuracy is not None:
        if precision == "fp32":
            raise OptionError("accuracy= is a budget for reduced precisions (int8, bf16, fp16); an fp32 "
                              "build is the reference it is measured against")
        if isinstance(accuracy, bool) or not isinstance(accuracy, (int, float)) or not 0 < accuracy <= 1:
            raise OptionError(f"accuracy must be the least cosine similarity to fp32 to keep, a number in "
                              f"(0, 1] such as 0.99; got {accuracy!r}")
    if sparsity is not None:
        from accelkit.pruning import check_sparsity

        check_sparsity(sparsity)
    from accelkit.accuracy import CALIBRATION_METHODS

    if calibration_method is not None:
        if calibration_method not in CALIBRATION_METHODS:
            raise OptionError(f"unknown calibration_method {calibration_method!r}; choose one of "
                              f"{', '.join(CALIBRATION_METHODS)}")
        if precision != "int8":
            raise OptionError(f"calibration_method= sets int8 activation ranges; precision is {precision!r}")
        if calibration_method in ("minmax", "percentile", "entropy") and calibration is None:
            raise OptionError(f"calibration_method={calibration_method!r} sets each int8 layer's input range "
                              f"from the calibration batches: pass calibration= (a few batches of real "
                              f"inputs), or use 'dynamic' (each row's own range, no data needed)")
    if calibration is not None and precision == "fp32":
        raise OptionError("calibration= is for reduced precisions (int8, bf16, fp16); an fp32 build "
                          "needs no calibration data")
    if not isinstance(cache, bool):
        raise OptionError(f"cache must be True or False, got {cache!r}")
    unknown = sorted(set(options) - set(be.options))
    if unknown:
        known = ", ".join(sorted(be.options)) or "none"
        raise OptionError(f"unknown option(s) {', '.join(unknown)} for backend '{be.name}'; "
                          f"its options are: {known}")
    if not be.is_available():
        from accelkit.errors import BackendError

        raise BackendError(f"backend '{be.name}' is not available on this machine "
                           f"(its device or driver is missing); try backend='cpu'")

    tuning_report = None
    if tune_options is not None:
        from accelkit import tuning

        tuning_report = tuning.tune(model, backend=be.name, input_shapes=input_shapes, options=tune_options)
    pruning = None
    if sparsity is not None:
        from accelkit import pruning as prune_mod

        original = model
        model, pruning = prune_mod.prune(model, float(sparsity))
    method = (calibration_method or "auto") if precision == "int8" else "dynamic"
    compiled = _compile(model, be, precision, input_shapes, cache, options, apply_tuning=tune is not False,
                        calibration=calibration, method=method)
    if accuracy is not None:
        compiled = _meet_accuracy(compiled, float(accuracy), model, be, precision, input_shapes, cache, options,
                                  apply_tuning=tune is not False, calibration=calibration, method=method)
    if pruning is not None:
        from accelkit import accuracy as acc
        from accelkit import pruning as prune_mod

        unpruned = _compile(original, be, precision, input_shapes, cache, options, apply_tuning=tune is not False,
                            calibration=calibration, method=method)
        batches = acc.load_batches(calibration, compiled.inputs) if calibration is not None else None
        compiled.manifest["pruning"] = prune_mod.report(pruning, compiled, unpruned, batches)
    if tuning_report is not None:
        compiled.tuning_report = tuning_report
    return compiled


def _meet_accuracy(compiled, budget: float, model, be, precision, input_shapes, cache, options, *,
                   apply_tuning: bool, calibration, method: str = "dynamic"):
    """Rebuild with the most quantization-sensitive layers in fp32 (worst first: 1, 3, 7,
    ... of them, then a bisection back to the fewest that hold) until every output's cosine to
    fp32 is at least `budget`."""
    import logging

    from accelkit import accuracy as acc
    from accelkit import frontend

    report = compiled.manifest.get("accuracy") or {}
    if report.get("min_cosine", 0.0) >= budget:
        compiled.manifest["accuracy"] = {**report, "budget": budget, "met": True, "kept_fp32": []}
        return compiled
    proto = frontend.prepare(model, input_shapes).proto
    batches = (acc.load_batches(calibration, compiled.inputs) if calibration is not None else
               acc.random_batches(compiled))
    ranked = [layer for layer in acc.layer_errors(proto, batches, precision) if layer["layer_error"] > 0]

    def build(count: int):
        keep = frozenset(d for layer in ranked[:count] for d in layer["digests"])
        model_ = _compile(model, be, precision, input_shapes, cache, options, apply_tuning=apply_tuning,
                          calibration=calibration, keep_fp32=keep, method=method)
        return model_, model_.manifest.get("accuracy") or {}

    # the worst 1, 3, 7, ... layers until the budget holds, then bisect back between the last
    # count that missed it and the first that met it: as few fp32 layers as the search finds
    failing, count, step = 0, 0, 1
    while report.get("min_cosine", 0.0) < budget and count < len(ranked):
        failing = count
        count = min(count + step, len(ranked))
        step *= 2
        compiled, report = build(count)
    best = (compiled, report, count)
    if report.get("min_cosine", 0.0) >= budget:
        while count - failing > 1:
            middle = (failing + count) // 2
            candidate, candidate_report = build(middle)
            if candidate_report.get("min_cosine", 0.0) >= budget:
                count, best = middle, (candidate, candidate_report, middle)
            else:
                failing = middle
    compiled, report, count = best
    kept = ranked[:count]
    met = report.get("min_cosine", 0.0) >= budget
    if not met:
        logging.getLogger("accelkit").warning(
            "accuracy=%s not met: min cosine %.5f with %d layer(s) in fp32 (all it ranks); the rest of "
            "the %s build stays as it is", budget, report.get("min_cosine", 0.0),
            len(kept), precision)
    compiled.manifest["accuracy"] = {
        **report, "budget": budget, "met": met,
        "kept_fp32": [{"node": layer["node"], "op": layer["op"], "layer_error": layer["layer_error"],
                       "why": f"its own {precision} error, {layer['layer_error']:.2e} relative, is among the "
                              f"largest of the model's {len(ranked)} {precision} layers"} for layer in kept],
    }
    return compiled


def _compile(model, be, precision, input_shapes, cache, options, *, apply_tuning: bool, calibration=None,
             keep_fp32: frozenset = frozenset(), method: str = "dynamic"):
    from accelkit.backends import CompileOptions, TVMBackend
    from accelkit.tuning import applied_tuning

    tuning = None
    if apply_tuning and isinstance(be, TVMBackend) and precision == "fp32":
        tuning = applied_tuning(be, be.target(CompileOptions()))
    compile_options = CompileOptions(precision=precision, extra=dict(options), tuning=tuning, keep_fp32=keep_fp32,
                                     calibration_method=method)
    # a reduced precision is measured against fp32 on these (None: random inputs)
    accuracy = None
    if precision != "fp32":
        accuracy = _Accuracy(model, be, input_shapes, cache, options, apply_tuning, calibration)
    if not cache:
        return _build(model, input_shapes, be, compile_options, status="off", accuracy=accuracy)
    components = _key_components(model, input_shapes, be, compile_options)
    if components is None:  # unreadable path or bad input_shapes: the frontend reports it
        return _build(model, input_shapes, be, compile_options, status="off", accuracy=accuracy)
    if accuracy is not None:
        components["calibration"] = accuracy.digest()
    from accelkit.cache import Cache

    store = Cache()
    key = cache_key(components)
    hit = store.load(key)
    if hit is not None:
        return hit
    with store.lock(key) as locked:
        if locked:  # another process may have compiled it while we waited for the lock
            hit = store.load(key)
            if hit is not None:
                return hit
        compiled = _build(model, input_shapes, be, compile_options, status="miss", accuracy=accuracy)
        if _uses_external_data(model):  # weights outside the key's bytes: never cache
            compiled.cache_status = "off (external data)"
            return compiled
        info = {"key": key, "model": components.pop("source"), "backend": be.name,
                "precision": precision, "created": compiled.manifest["created"],
                "components": components}
        if store.publish(key, compiled._directory, compiled.manifest, info) is None:
            compiled.cache_status = "unwritable"
        return compiled


def cache_key(components: dict[str, Any]) -> str:
    from accelkit.cache import cache_key as _key

    return _key({k: v for k, v in components.items() if k != "source"})


def _key_components(model, input_shapes, be, options) -> dict[str, Any] | None:
    """Everything that changes what compile produces (the cache key hashes these)."""
    from accelkit import artifact
    from accelkit.backends import TVMBackend
    from accelkit.cache import cache_dir, model_digest

    try:
        digest, source = model_digest(model, memo_dir=os.path.join(cache_dir(), "digests"))
    except (OSError, TypeError):
        return None
    try:
        shapes = ({str(k): [int(d) for d in v] for k, v in sorted(dict(input_shapes).items())}
                  if input_shapes else None)
    except (TypeError, ValueError):  # malformed input_shapes: the frontend reports it properly
        return None
    return {
        "model": digest,
        "source": source,
        "input_shapes": shapes,
        "backend": be.name,
        "backend_fingerprint": be.fingerprint(),
        "target": str(be.target(options)) if isinstance(be, TVMBackend) else None,
        "precision": options.precision,
        "calibration": None,  # digest of the calibration batches (reduced precisions)
        "tuning_db": options.tuning.digest if options.tuning is not None else None,
        **({"keep_fp32": sorted(options.keep_fp32)} if options.keep_fp32 else {}),
        **({"calibration_method": options.calibration_method} if options.precision == "int8" else {}),
        "options": options.extra,
        "versions": artifact.versions(),
    }


def _uses_external_data(model) -> bool:
    if not isinstance(model, (str, os.PathLike)):
        return False  # bytes / ModelProto carry their tensors (or were loaded already)
    import onnx

    from accelkit.frontend import _all_initializers, _uses_external_data

    try:
        proto = onnx.load(os.fspath(model), load_external_data=False)
    except Exception:  # noqa: BLE001 - it compiled, so this is only a caching decision
        return True
    return any(_uses_external_data(t) for t in _all_initializers(proto.graph))


class _Accuracy:
    """Measures a reduced-precision build against the fp32 one (accelkit.accuracy)."""

    def __init__(self, model, be, input_shapes, cache, options, apply_tuning, calibration):
        self.args = (model, be, input_shapes, cache, options, apply_tuning)
        self.calibration = calibration
        self._batches = None

    def batches(self, inputs):
        from accelkit import accuracy

        if self.calibration is None:
            return None
        if self._batches is None:  # the same model's inputs every time
            self._batches = accuracy.load_batches(self.calibration, inputs)
        return self._batches

    def digest(self) -> str | None:
        from accelkit import accuracy, frontend

        if self.calibration is None:
            return None
        model, _, input_shapes = self.args[:3]
        return accuracy.digest(self.batches(frontend.input_specs(model, input_shapes)))

    def measure(self, compiled) -> dict[str, Any]:
        from accelkit import accuracy

        model, be, input_shapes, cache, options, apply_tuning = self.args
        reference = _compile(model, be, "fp32", input_shapes, cache, options, apply_tuning=apply_tuning)
        return accuracy.measure(compiled, reference, self.batches(compiled.inputs))


def _build(model, input_shapes, be, compile_options, *, status: str, accuracy: _Accuracy | None = None):
    """Frontend + backend compile into a fresh temporary directory -> CompiledModel."""
    from accelkit import artifact, frontend
    from accelkit.guards import index_bounds
    from accelkit.model import CompiledModel

    graph = frontend.prepare(model, input_shapes)
    calibrated, qdq = None, {}
    if compile_options.precision == "int8":
        from accelkit.frontend import qdq as qdq_mod

        if qdq_mod.has_qdq(graph.proto):  # a pre-quantized model: its own ranges, its own grid
            proto, qdq = qdq_mod.activation_ranges(graph.proto)
            graph = dataclasses.replace(graph, proto=proto)
        if compile_options.calibration_method != "dynamic" or qdq:
            compile_options, calibrated = _calibrate(graph, compile_options, accuracy, qdq)
    out_dir = tempfile.mkdtemp(prefix="accelkit-build-")
    try:
        entries = be.compile(graph, compile_options, out_dir)
        files = {name: artifact.sha256_file(os.path.join(out_dir, name))
                 for name in sorted(os.listdir(out_dir))}
        manifest = {
            "format": artifact.FORMAT,
            "format_version": artifact.FORMAT_VERSION,
            "backend": be.name,
            "backend_fingerprint": be.fingerprint(),
            "precision": compile_options.precision,
            "model_name": graph.proto.graph.name or "model",
            "inputs": [_spec(s) for s in graph.inputs],
            "outputs": [_spec(s) for s in graph.outputs],
            "index_bounds": index_bounds(graph.proto),
            "versions": artifact.versions(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "files": files,
            **entries,
        }
        if compile_options.precision == "int8":
            manifest["calibration"] = calibrated or {"method": "dynamic", "layers": []}
        compiled = CompiledModel(be, out_dir, manifest, owns_directory=True)
        if accuracy is not None:
            manifest["accuracy"] = accuracy.measure(compiled)
    except AccelkitError:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    except Exception as exc:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise CompileError(f"backend '{be.name}' failed: {type(exc).__name__}: {exc}") from exc
    compiled.cache_status = status
    return compiled


def _calibrate(graph, compile_options, accuracy: _Accuracy | None, qdq: dict):
    """The int8 layers' input ranges -> (compile options holding them, the manifest's
    "calibration"): a pre-quantized model's own (`qdq`: tensor -> range, frontend.qdq), then
    for the other layers accelkit.accuracy.activation_ranges on the calibration batches."""
    from accelkit import accuracy as acc

    method = compile_options.calibration_method
    int8_layers = acc.int8_layers(graph.proto)
    layers = [{"node": layer["node"], "op": layer["op"], "lo": qdq[layer["input"]][0], "hi": qdq[layer["input"]][1],
               "digests": sorted(layer["digests"]), "source": "qdq"}
              for layer in int8_layers if layer["input"] in qdq]
    ops = ("Conv",) if method == "auto" else ("MatMul", "Gemm", "Conv")
    todo = [layer for layer in int8_layers if layer["op"] in ops and layer["input"] not in qdq]
    batches = accuracy.batches(graph.inputs) if accuracy is not None else None
    report = {"method": method, "inputs": None, "batches": 0}
    # no calibration data: dynamic rows (ranges from random inputs would not be the ranges of
    # real ones: a model fed 0..255 pixels would saturate); compile_model refuses an explicit
    # static method without data, so that is auto
    if method != "dynamic" and batches and todo:
        report.update(inputs="calibration", batches=len(batches))
        rule = "percentile" if method == "auto" else method
        layers += [{**r, "source": rule} for r in acc.activation_ranges(graph.proto, batches, rule, layers=todo)]
    # a weight shared by several layers (tied weights): one range holding all of theirs
    merged: dict[str, tuple[float, float]] = {}
    for r in layers:
        for d in r["digests"]:
            lo, hi = merged.get(d, (r["lo"], r["hi"]))
            merged[d] = (min(lo, r["lo"]), max(hi, r["hi"]))
    table = tuple((d, lo, hi) for d, (lo, hi) in sorted(merged.items()))
    report["layers"] = [{"node": r["node"], "op": r["op"], "lo": r["lo"], "hi": r["hi"], "source": r["source"]}
                        for r in layers]
    return dataclasses.replace(compile_options, act_ranges=table), report


def _spec(spec) -> dict[str, Any]:
    return {"name": spec.name, "shape": list(spec.shape), "dtype": spec.dtype}
