"""Model-level benchmarks: accelkit (cpu backend, fp32, untuned) and onnxruntime (2 intra-op
threads) on the same model and inputs, in the same session, grouped per model so the table
reads as a comparison. Compilation and session creation stay outside the timed region; the
first accelkit benchmark of each model also checks its outputs against onnxruntime's. Each timed
run starts after a pause, so that the other system's idle threads (onnxruntime's, TVM's) have
stopped spinning: on 2 cores a spinning pool halves the other's speed.

    pytest benchmarks/test_models_bench.py --benchmark-only --benchmark-group-by=group \\
        --benchmark-json=bench.json"""
import time

import pytest

SETTLE_S = 1.0  # let the other system's thread pool stop spinning before a timed run

MODELS = ["mlp", "resnet50", "mobilenetv2", "bert-base", "minilm", "gpt2"]
ROUNDS = {"mlp": 200, "resnet50": 20, "mobilenetv2": 50, "bert-base": 10, "minilm": 30, "gpt2": 10}


@pytest.fixture(scope="module")
def compiled(zoo_model):
    """name -> (accelkit model, onnxruntime session, feeds, compile seconds), built once per
    model; compiled with cache=False and tune=False, so the compile time is a real untuned compile
    (a tuning database on this machine is not applied)."""
    import onnxruntime as ort
    from model_zoo import INPUT_SHAPES, example_inputs

    import accelkit

    built = {}

    def get(name):
        if name not in built:
            path = zoo_model(name)
            start = time.perf_counter()
            model = accelkit.compile(path, input_shapes=INPUT_SHAPES.get(name), cache=False, tune=False)
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
    time.sleep(SETTLE_S)
    benchmark.pedantic(model.run, args=(feeds,), rounds=ROUNDS[name], warmup_rounds=3, iterations=1)


@pytest.mark.parametrize("name", MODELS)
def test_onnxruntime(benchmark, compiled, name):
    _, session, feeds, _ = compiled(name)
    benchmark.group = f"model {name}"
    time.sleep(SETTLE_S)
    benchmark.pedantic(session.run, args=(None, feeds), rounds=ROUNDS[name], warmup_rounds=3,
                       iterations=1)


def interleaved_all(runs: dict, blocks: int = 6, per_block: int = 5, settle_s: float = 0.3) -> dict[str, float]:
    """Median ms of each system in `runs` (name -> run()), timed in alternating blocks, each
    after a pause: slow drifts of a shared machine (steal time, turbo) then hit all alike."""
    import numpy as np

    times = {name: [] for name in runs}
    for _ in range(blocks):
        for name, run in runs.items():
            time.sleep(settle_s)
            run()  # warm the pool back up
            for _ in range(per_block):
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) * 1e3 for name, t in times.items()}


def interleaved(run_a, run_b, blocks: int = 6, per_block: int = 5, settle_s: float = 0.3):
    """interleaved_all of two systems: (median ms of run_a, median ms of run_b)."""
    ms = interleaved_all({"a": run_a, "b": run_b}, blocks, per_block, settle_s)
    return ms["a"], ms["b"]


@pytest.mark.parametrize("name", MODELS)
def test_same_run_ratio(benchmark, compiled, name):
    """The record's ratio: accelkit and onnxruntime in alternating blocks, onnxruntime ms /
    accelkit ms (> 1: accelkit faster). The benchmark's own time is the whole comparison."""
    model, session, feeds, _ = compiled(name)
    per_block = max(2, ROUNDS[name] // 4)
    benchmark.group = "same-run ratio"
    result = benchmark.pedantic(interleaved, args=(lambda: model.run(feeds), lambda: session.run(None, feeds)),
                                kwargs={"per_block": per_block}, rounds=1, iterations=1)
    benchmark.extra_info.update(model=name, accelkit_ms=round(result[0], 3), onnxruntime_ms=round(result[1], 3),
                                ratio=round(result[1] / result[0], 3))
