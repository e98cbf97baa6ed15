"""Precision benchmarks (issue 7): accelkit fp32 and int8 against onnxruntime fp32 and
onnxruntime int8 (`quantize_dynamic`, its recommended mode for transformers) on the same model
and inputs, timed in alternating blocks in one run, with each one's cosine similarity to
onnxruntime's fp32 output.

    pytest benchmarks/test_precision_bench.py --benchmark-only --benchmark-json=precision.json

accelkit int8 quantizes the dense layers (MatMul/Gemm with constant weights): weights per
output channel at compile time, each activation row when the layer runs."""
import os
import time

import numpy as np
import pytest

from test_models_bench import SETTLE_S

MODELS = ["minilm", "bert-base", "mlp"]
PER_BLOCK = {"minilm": 8, "bert-base": 3, "mlp": 50}


def _cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def systems(zoo_model, tmp_path_factory):
    """name -> ({system: run()}, {system: cosine vs onnxruntime fp32}, accelkit int8 accuracy
    report), built once per model, outside the timed region."""
    import onnxruntime as ort
    from model_zoo import INPUT_SHAPES, example_inputs
    from onnxruntime.quantization import QuantType, quantize_dynamic

    import accelkit

    built = {}

    def session(path):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def get(name):
        if name not in built:
            path = zoo_model(name)
            shapes = INPUT_SHAPES.get(name)
            fp32 = accelkit.compile(path, input_shapes=shapes, cache=False, tune=False)
            int8 = accelkit.compile(path, input_shapes=shapes, cache=False, tune=False, precision="int8")
            qpath = str(tmp_path_factory.mktemp("ort-int8") / f"{name}.int8.onnx")
            quantize_dynamic(path, qpath, weight_type=QuantType.QInt8)
            ort32, ort8 = session(path), session(qpath)
            feeds = example_inputs(name, fp32)
            runs = {
                "accelkit_fp32": lambda: fp32.run(feeds), "accelkit_int8": lambda: int8.run(feeds),
                "onnxruntime_fp32": lambda: ort32.run(None, feeds),
                "onnxruntime_int8": lambda: ort8.run(None, feeds),
            }
            reference = ort32.run(None, feeds)[0]
            cosines = {k: _cosine(run()[0], reference) for k, run in runs.items()}
            built[name] = (runs, cosines, int8.manifest["accuracy"])
        return built[name]

    return get


def interleaved(runs: dict, blocks: int, per_block: int) -> dict[str, float]:
    """Median ms of each system, timed in alternating blocks after a pause (see test_models_bench)."""
    times = {k: [] for k in runs}
    for _ in range(blocks):
        for name, run in runs.items():
            time.sleep(SETTLE_S / 3)
            run()
            for _ in range(per_block):
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    return {k: float(np.median(v)) * 1e3 for k, v in times.items()}


@pytest.mark.parametrize("name", MODELS)
def test_precision_same_run(benchmark, systems, name):
    runs, cosines, accuracy = systems(name)
    benchmark.group = "precision, same run"
    ms = benchmark.pedantic(interleaved, args=(runs, 6, PER_BLOCK[name]), rounds=1, iterations=1)
    benchmark.extra_info.update(
        model=name, ms={k: round(v, 3) for k, v in ms.items()},
        cosine_vs_onnxruntime_fp32={k: round(v, 6) for k, v in cosines.items()},
        accelkit_int8_accuracy_report=accuracy,
        int8_speedup_vs_accelkit_fp32=round(ms["accelkit_fp32"] / ms["accelkit_int8"], 3),
        int8_speedup_vs_onnxruntime_int8=round(ms["onnxruntime_int8"] / ms["accelkit_int8"], 3),
        int8_speedup_vs_onnxruntime_fp32=round(ms["onnxruntime_fp32"] / ms["accelkit_int8"], 3),
        cpu_int8_path=_int8_path(),
    )


def _int8_path() -> str:
    from accelkit import kernels

    return kernels.load().int8_path()
