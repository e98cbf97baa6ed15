"""pytest-benchmark suites: `pytest benchmarks/ --benchmark-only` (needs the `bench` extra for
the model zoo). Compilation stays outside the timed regions; machine info records accelkit's
view of the machine (CPU, versions) next to pytest-benchmark's own."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


def pytest_benchmark_update_machine_info(config, machine_info):
    import tvm_ffi

    from accelkit.backends import CompileOptions, get_backend
    from accelkit.bench import machine_info as accelkit_machine_info

    backend = get_backend("cpu")
    machine_info["accelkit"] = {
        **accelkit_machine_info(), "backend": backend.name, "precision": "fp32", "tuned": False,
        "target": str(backend.target(CompileOptions())), "fingerprint": backend.fingerprint(),
        "tvm_ffi": tvm_ffi.__version__, "onnxruntime_intra_op_threads": 2}


@pytest.fixture(scope="session")
def zoo_dir():
    from model_zoo import DEFAULT_DIR

    return DEFAULT_DIR


@pytest.fixture(scope="session")
def zoo_model(zoo_dir):
    """zoo_model(name) -> path of the exported ONNX model (built once, cached on disk)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from model_zoo import build

    return lambda name: build(name, zoo_dir)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Same-run ratios: onnxruntime median / accelkit median per model (> 1: accelkit faster),
    their geometric mean, and the dense kernel's GFLOP/s next to numpy's."""
    import math

    session = getattr(config, "_benchmarksession", None)
    benches = getattr(session, "benchmarks", None) or []
    medians: dict[str, dict[str, float]] = {}
    for bench in benches:
        stats = getattr(bench, "stats", None)
        median = getattr(stats, "median", None)
        if median is None or not bench.group:
            continue
        system = bench.name.split("[")[0].removeprefix("test_")
        medians.setdefault(bench.group, {})[system] = median
    interleaved = {b.extra_info["model"]: b.extra_info for b in benches
                   if b.group == "same-run ratio" and "ratio" in b.extra_info}
    if interleaved:
        terminalreporter.section("accelkit vs onnxruntime: same run, alternating blocks (ratio > 1 = faster)")
        for name, info in interleaved.items():
            terminalreporter.write_line(f"{name:>12}: accelkit {info['accelkit_ms']:9.2f} ms  onnxruntime "
                                        f"{info['onnxruntime_ms']:9.2f} ms  ratio {info['ratio']:5.2f}")
        ratios = [info["ratio"] for info in interleaved.values()]
        geomean = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        terminalreporter.write_line(f"{'geomean':>12}: {geomean:.2f} over {len(ratios)} models")
    tuned = [b.extra_info for b in benches if b.group == "tuning same-run ratio" and "tuned_ms" in b.extra_info]
    if tuned:
        terminalreporter.section("tuned vs untuned vs onnxruntime: same run, alternating blocks (> 1 = tuned faster)")
        for info in tuned:
            terminalreporter.write_line(
                f"{info['model']:>12}: tuned {info['tuned_ms']:8.3f} ms  untuned {info['untuned_ms']:8.3f} ms "
                f"({info['untuned_over_tuned']:5.3f}x)  onnxruntime {info['onnxruntime_ms']:8.3f} ms "
                f"({info['onnxruntime_over_tuned']:5.3f}x)")
    ratios = {g.removeprefix("model "): m["onnxruntime"] / m["accelkit"] for g, m in medians.items()
              if "accelkit" in m and "onnxruntime" in m}
    if ratios:
        terminalreporter.section("accelkit vs onnxruntime: per-benchmark medians (one block each)")
        for name, ratio in ratios.items():
            m = medians[f"model {name}"]
            terminalreporter.write_line(f"{name:>12}: accelkit {m['accelkit'] * 1e3:9.2f} ms  onnxruntime "
                                        f"{m['onnxruntime'] * 1e3:9.2f} ms  ratio {ratio:5.2f}")
    dense = {g: m for g, m in medians.items() if g.startswith("dense ") and "accelkit_dense_bias_relu" in m}
    if dense:
        terminalreporter.section("fused dense vs numpy matmul (GFLOP/s at the median)")
        for group, m in dense.items():
            mm, k, n = (int(v) for v in group.split()[1].split("x"))
            flop = 2 * mm * k * n
            terminalreporter.write_line(f"{group:>20}: accelkit {flop / m['accelkit_dense_bias_relu'] / 1e9:6.1f}  "
                                        f"numpy {flop / m.get('numpy_matmul', float('nan')) / 1e9:6.1f}")
