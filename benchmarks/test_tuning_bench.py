"""Tuned vs untuned vs onnxruntime (2 intra-op threads), in one run, on the MLP (batch 64,
512-1024-1024-10) and one BERT-base encoder layer (seq 128).

The tuning itself runs once per model in a fixture with a 10-minute budget (ACCELKIT_TUNE_BUDGET
overrides it), against the tuning database in the user's cache: a second benchmark run resumes it
and only measures what is new. Its report is attached to the benchmark's extra_info.

    pytest benchmarks/test_tuning_bench.py --benchmark-only --benchmark-json=tune.json"""
import os
import time

import pytest

from test_models_bench import SETTLE_S, interleaved

MODELS = ["mlp", "bert-layer"]
ROUNDS = {"mlp": 200, "bert-layer": 60}
BUDGET = os.environ.get("ACCELKIT_TUNE_BUDGET", "10m")


@pytest.fixture(scope="module")
def systems(zoo_model):
    """name -> (untuned, tuned, onnxruntime session, feeds, tune report)."""
    import onnxruntime as ort
    from model_zoo import example_inputs

    import accelkit
    from accelkit import tuning

    built = {}

    def get(name):
        if name not in built:
            path = zoo_model(name)
            untuned = accelkit.compile(path, tune=False)
            report = tuning.tune(path, options=tuning.TuneOptions(budget=BUDGET))
            tuned = accelkit.compile(path)
            options = ort.SessionOptions()
            options.intra_op_num_threads = 2
            session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            built[name] = (untuned, tuned, session, example_inputs(name, tuned), report)
        return built[name]

    return get


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("system", ["untuned", "tuned", "onnxruntime"])
def test_tuning(benchmark, systems, name, system):
    from accelkit.demo import relative_l2

    untuned, tuned, session, feeds, report = systems(name)
    run = {"untuned": lambda: untuned.run(feeds), "tuned": lambda: tuned.run(feeds),
           "onnxruntime": lambda: session.run(None, feeds)}[system]
    if system == "tuned":
        want = session.run(None, feeds)
        errors = [relative_l2(g, w) for g, w in zip(tuned.run(feeds), want)]
        assert max(errors) < 1e-4, f"{name}: tuned output off by {max(errors):.2e} vs onnxruntime"
        applied = tuned.manifest.get("tuning", {}).get("applied", {})
        benchmark.extra_info.update(rel_l2_vs_onnxruntime=max(errors), applied=applied,
                                    tune_elapsed_s=round(report.elapsed_s, 1), tune_trials=report.trials,
                                    tune_skipped=report.skipped)
    benchmark.group = f"tuning {name}"
    time.sleep(SETTLE_S)
    benchmark.pedantic(run, rounds=ROUNDS[name], warmup_rounds=3, iterations=1)


@pytest.mark.parametrize("name", MODELS)
def test_tuned_vs_untuned_same_run(benchmark, systems, name):
    """The record's ratios: untuned ms / tuned ms and onnxruntime ms / tuned ms, each pair in
    alternating blocks (> 1: tuned faster)."""
    untuned, tuned, session, feeds, report = systems(name)
    per_block = max(2, ROUNDS[name] // 4)
    benchmark.group = "tuning same-run ratio"

    def both():
        return (interleaved(lambda: tuned.run(feeds), lambda: untuned.run(feeds), blocks=20, per_block=per_block),
                interleaved(lambda: tuned.run(feeds), lambda: session.run(None, feeds), per_block=per_block))

    (t1, u), (t2, o) = benchmark.pedantic(both, rounds=1, iterations=1)
    benchmark.extra_info.update(model=name, tuned_ms=round(t1, 3), untuned_ms=round(u, 3), onnxruntime_ms=round(o, 3),
                                untuned_over_tuned=round(u / t1, 3), onnxruntime_over_tuned=round(o / t2, 3),
                                tune_report=report.format())
