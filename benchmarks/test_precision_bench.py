"""Precision benchmarks (issue 7): accelkit fp32 and int8 against onnxruntime fp32 and
onnxruntime int8 (`quantize_dynamic` for transformers and the MLP, `quantize_static` QDQ for
ResNet-50: its recommended modes) on the same model and inputs, timed in alternating blocks in one run, with each one's cosine similarity to
onnxruntime's fp32 output.

    pytest benchmarks/test_precision_bench.py --benchmark-only --benchmark-json=precision.json

accelkit int8 quantizes the dense layers (MatMul/Gemm with constant weights) and the ungrouped
convolutions: weights per output channel at compile time; a convolution's input on one range
calibrated at compile time on the calibration images (calibration_method="auto": percentile),
a dense layer's each row when the layer runs. For ResNet-50, accelkit int8 also runs onnxruntime's own QDQ model (its
scales and zero points, accelkit's kernels)."""
import os
import time

import numpy as np
import pytest

from test_models_bench import interleaved_all

MODELS = ["minilm", "bert-base", "mlp", "resnet50"]
PER_BLOCK = {"minilm": 8, "bert-base": 3, "mlp": 50, "resnet50": 5}
AGREEMENT_IMAGES = 16  # random images for ResNet-50's top-1 agreement with fp32


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
            # ResNet-50: calibrated on the 8 random images onnxruntime's static QDQ model is
            # calibrated on (the convolutions' input ranges); the dense models need no data
            calibration = ([{fp32.inputs[0].name: b} for b in _calibration_images()]
                           if name == "resnet50" else None)
            int8 = accelkit.compile(path, input_shapes=shapes, cache=False, tune=False, precision="int8",
                                    calibration=calibration)
            qpath = str(tmp_path_factory.mktemp("ort-int8") / f"{name}.int8.onnx")
            qdq = None
            if name == "resnet50":
                _quantize_static_qdq(path, qpath)
                # onnxruntime's own QDQ model, compiled by accelkit int8 (its grid, our kernels)
                qdq = accelkit.compile(qpath, cache=False, tune=False, precision="int8")
            else:
                quantize_dynamic(path, qpath, weight_type=QuantType.QInt8)
            ort32, ort8 = session(path), session(qpath)
            feeds = example_inputs(name, fp32)
            runs = {
                "accelkit_fp32": lambda: fp32.run(feeds), "accelkit_int8": lambda: int8.run(feeds),
                "onnxruntime_fp32": lambda: ort32.run(None, feeds),
                "onnxruntime_int8": lambda: ort8.run(None, feeds),
            }
            if qdq is not None:
                runs["accelkit_int8_of_onnxruntime_qdq"] = lambda: qdq.run(feeds)
            reference = ort32.run(None, feeds)[0]
            cosines = {k: _cosine(run()[0], reference) for k, run in runs.items()}
            extra = {}
            if name == "resnet50":  # top-1 agreement with accelkit fp32 over random images
                rng = np.random.default_rng(7)
                images = [rng.standard_normal((1, 3, 224, 224)).astype(np.float32) for _ in range(AGREEMENT_IMAGES)]
                key = fp32.inputs[0].name
                top = {k: [int(np.argmax(m.run({key: im})[0])) for im in images] for k, m in (("fp32", fp32), ("int8", int8))}
                top["onnxruntime_int8"] = [int(np.argmax(ort8.run(None, {key: im})[0])) for im in images]
                extra = {"top1_agreement_with_fp32": {
                    k: sum(a == b for a, b in zip(top[k], top["fp32"])) / len(images) for k in ("int8", "onnxruntime_int8")}}
            built[name] = (runs, cosines, {**int8.manifest["accuracy"], **extra})
        return built[name]

    return get


def _calibration_images() -> list:
    """8 random images: the calibration data of both int8 ResNet-50 builds."""
    rng = np.random.default_rng(3)
    return [rng.standard_normal((1, 3, 224, 224)).astype(np.float32) for _ in range(8)]


def _quantize_static_qdq(path: str, qpath: str) -> None:
    """onnxruntime's static int8 (QDQ, per-channel weights) calibrated on 8 random images."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    name = onnx.load(path, load_external_data=False).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{name: image} for image in _calibration_images()])

        def get_next(self):
            return next(self.batches, None)

    reader = Reader()
    quantize_static(path, qpath, reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


@pytest.mark.parametrize("name", MODELS)
def test_precision_same_run(benchmark, systems, name):
    runs, cosines, accuracy = systems(name)
    benchmark.group = "precision, same run"
    ms = benchmark.pedantic(interleaved_all, args=(runs, 6, PER_BLOCK[name]), rounds=1, iterations=1)
    benchmark.extra_info.update(
        model=name, ms={k: round(v, 3) for k, v in ms.items()},
        cosine_vs_onnxruntime_fp32={k: round(v, 6) for k, v in cosines.items()},
        accelkit_int8_accuracy_report=accuracy,
        int8_speedup_vs_accelkit_fp32=round(ms["accelkit_fp32"] / ms["accelkit_int8"], 3),
        int8_speedup_vs_onnxruntime_int8=round(ms["onnxruntime_int8"] / ms["accelkit_int8"], 3),
        int8_speedup_vs_onnxruntime_fp32=round(ms["onnxruntime_fp32"] / ms["accelkit_int8"], 3),
        **({"qdq_model_speedup_vs_onnxruntime_int8": round(
            ms["onnxruntime_int8"] / ms["accelkit_int8_of_onnxruntime_qdq"], 3)}
           if "accelkit_int8_of_onnxruntime_qdq" in ms else {}),
        cpu_int8_path=_int8_path(),
    )


def _int8_path() -> str:
    from accelkit import kernels

    return kernels.load().int8_path()


# ---- 16-bit weights (bf16 / fp16) -----------------------------------------------------------

def mlp4096(path: str) -> str:
    """A batch-1 MLP 4096-4096-4096-4096-10 (relu), random weights: 192 MB of fp32 weights read
    once per run, the memory-bound case bf16/fp16 weights are for."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    dims = [4096, 4096, 4096, 4096, 10]
    nodes, inits, prev = [], [], "x"
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        inits += [numpy_helper.from_array((rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32), f"W{i}"),
                  numpy_helper.from_array((rng.standard_normal(b) * 0.1).astype(np.float32), f"b{i}")]
        nodes.append(helper.make_node("Gemm", [prev, f"W{i}", f"b{i}"], [f"g{i}"]))
        prev = f"g{i}"
        if i < len(dims) - 2:
            nodes.append(helper.make_node("Relu", [prev], [f"r{i}"]))
            prev = f"r{i}"
    graph = helper.make_graph(nodes, "mlp4096", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4096])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


W16_MODELS = {"mlp4096-batch1": 20, "bert-base": 6}


@pytest.fixture(scope="module")
def w16_systems(zoo_model, tmp_path_factory):
    from model_zoo import INPUT_SHAPES, example_inputs

    import accelkit

    built = {}

    def get(name):
        if name not in built:
            if name == "mlp4096-batch1":
                path, shapes = mlp4096(str(tmp_path_factory.mktemp("mlp4096") / "mlp4096.onnx")), None
            else:
                path, shapes = zoo_model(name), INPUT_SHAPES.get(name)
            models = {p: accelkit.compile(path, input_shapes=shapes, cache=False, tune=False, precision=p)
                      for p in ("fp32", "bf16", "fp16")}
            if name == "mlp4096-batch1":
                feeds = {"x": np.random.default_rng(1).standard_normal((1, 4096)).astype(np.float32)}
            else:
                feeds = example_inputs(name, models["fp32"])
            reference = models["fp32"].run(feeds)[0]
            runs = {f"accelkit_{p}": (lambda m=m: m.run(feeds)) for p, m in models.items()}
            cosines = {f"accelkit_{p}": _cosine(m.run(feeds)[0], reference) for p, m in models.items()}
            built[name] = (runs, cosines, {p: m.manifest["offloaded"] for p, m in models.items()})
        return built[name]

    return get


@pytest.mark.parametrize("name", list(W16_MODELS))
def test_w16_same_run(benchmark, w16_systems, name):
    runs, cosines, offloaded = w16_systems(name)
    benchmark.group = "bf16/fp16 weights, same run"
    ms = benchmark.pedantic(interleaved_all, args=(runs, 6, W16_MODELS[name]), rounds=1, iterations=1)
    benchmark.extra_info.update(
        model=name, ms={k: round(v, 3) for k, v in ms.items()},
        cosine_vs_accelkit_fp32={k: round(v, 7) for k, v in cosines.items()},
        offloaded=offloaded,
        bf16_speedup_vs_fp32=round(ms["accelkit_fp32"] / ms["accelkit_bf16"], 3),
        fp16_speedup_vs_fp32=round(ms["accelkit_fp32"] / ms["accelkit_fp16"], 3),
    )
