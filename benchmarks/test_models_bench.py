"""Model-level benchmarks: accelkit (cpu backend, fp32, untuned) and onnxruntime (2 intra-op
threads) on the same model and inputs, in the same session, grouped per model so the table
reads as a comparison. Compilation and session creation stay outside the timed region; the
first accelkit benchmark of each model also checks its outputs against onnxruntime's.

    pytest benchmarks/test_models_bench.py --benchmark-only --benchmark-group-by=group \\
        --benchmark-json=bench.json"""
import time

import pytest

MODELS = ["mlp", "resnet50", "mobilenetv2", "bert-base", "minilm"]
ROUNDS = {"mlp": 200, "resnet50": 20, "mobilenetv2": 50, "bert-base": 10, "minilm": 30}


@pytest.fixture(scope="module")
def compiled(zoo_model, tmp_path_factory):
    """name -> (accelkit model, onnxruntime session, feeds), built once per model."""
    import os

    import onnxruntime as ort
    from model_zoo import INPUT_SHAPES, example_inputs

    import accelkit

    os.environ.setdefault("ACCELKIT_CACHE_DIR", str(tmp_path_factory.mktemp("bench-cache")))
    built = {}

    def get(name):
        if name not in built:
            path = zoo_model(name)
            start = time.perf_counter()
            model = accelkit.compile(path, input_shapes=INPUT_SHAPES.get(name))
            compile_s = time.perf_counter() - start
            options = ort.SessionOptions()
            options.intra_op_num_threads = 2
            session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            built[name] = (model, session, example_inputs(name, model), compile_s)
        return built[name]

    return get


@pytest.mark.parametrize("name", MODELS)
def test_accelkit(benchmark, compiled, name):
    from accelkit.demo import relative_l2

    model, session, feeds, compile_s = compiled(name)
    got, want = model.run(feeds), session.run(None, feeds)
    errors = [relative_l2(g, w) for g, w in zip(got, want)]
    assert max(errors) < 1e-4, f"{name}: relative L2 error {max(errors):.2e} vs onnxruntime"
    benchmark.group = f"model {name}"
    benchmark.extra_info.update(rel_l2_vs_onnxruntime=max(errors), compile_s=round(compile_s, 1),
                                cache=model.cache_status, offloaded=model.manifest["offloaded"])
    benchmark.pedantic(model.run, args=(feeds,), rounds=ROUNDS[name], warmup_rounds=3, iterations=1)


@pytest.mark.parametrize("name", MODELS)
def test_onnxruntime(benchmark, compiled, name):
    _, session, feeds, _ = compiled(name)
    benchmark.group = f"model {name}"
    benchmark.pedantic(session.run, args=(None, feeds), rounds=ROUNDS[name], warmup_rounds=3,
                       iterations=1)
