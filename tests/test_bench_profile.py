"""`accelkit bench` and `accelkit profile`: statistics, same-run alternation, accuracy, the
JSON/PNG/trace outputs, and their errors."""
import json
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest

from accelkit import bench
from accelkit.errors import OptionError
from conftest import conv_model


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "accelkit", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def conv_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "conv.onnx"
    onnx.save(conv_model(), str(path))
    return str(path)


def test_demo_times_accelkit_and_onnxruntime_in_alternating_blocks(monkeypatch):
    """The demo's latencies come from bench.measure over both systems (alternating blocks,
    pauses), not from a short burst each; without onnxruntime only accelkit is timed."""
    from accelkit import demo

    monkeypatch.setattr(demo, "TIMING_S", 0.2)
    calls = []

    class Model:
        def run(self, feeds):
            calls.append("accelkit")
            time.sleep(0.002)
            return [feeds["x"]]

    class Session:
        def run(self, names, feeds):
            calls.append("onnxruntime")
            time.sleep(0.004)
            return [feeds["x"]]

    feeds = {"x": np.zeros(3, np.float32)}
    ak, ort_ms = demo.median_latencies(Model(), Session(), feeds)
    assert 2 <= ak < 4 <= ort_ms < 8, (ak, ort_ms)
    switches = sum(a != b for a, b in zip(calls, calls[1:]))
    assert switches >= 3, "the two systems were not timed in alternating blocks"
    calls.clear()
    ak, none = demo.median_latencies(Model(), None, feeds)
    assert none is None and ak >= 2 and set(calls) == {"accelkit"}


def test_statistics_of_known_latencies():
    stats = bench.statistics([float(v) for v in range(1, 101)], batch=4)
    assert stats["runs"] == 100
    assert stats["min_ms"] == 1 and stats["max_ms"] == 100
    assert stats["p50_ms"] == pytest.approx(50.5)
    assert stats["p90_ms"] == pytest.approx(90.1)
    assert stats["p99_ms"] == pytest.approx(99.01)
    assert stats["mean_ms"] == pytest.approx(50.5)
    assert stats["inferences_per_s"] == pytest.approx(1e3 / 50.5)
    assert stats["samples_per_s"] == pytest.approx(4e3 / 50.5)


def test_ratio_interval_says_whether_a_difference_is_measurable():
    """Paired block medians: a drift that hits both systems in the same stretch (10 -> 14 ms
    here) stays out of the ratio, so one distribution drawn twice gives an interval around 1,
    and a system 10% slower one above 1.05; fewer blocks give a wider interval."""
    rng = np.random.default_rng(3)
    drift = np.linspace(10, 14, 12)
    b = drift * rng.normal(1, 0.01, 12)
    lo, hi = bench.ratio_interval(drift * rng.normal(1, 0.01, 12), b)
    assert lo < 1.0 < hi and hi - lo < 0.04
    slow = bench.ratio_interval(1.1 * drift * rng.normal(1, 0.01, 12), b)
    assert 1.05 < slow[0] < 1.1 < slow[1] < 1.15
    few = bench.ratio_interval(drift[:3] * rng.normal(1, 0.01, 3), b[:3])
    assert few[1] - few[0] > hi - lo
    with pytest.raises(ValueError, match="no timed blocks"):
        bench.ratio_interval([], b)
    with pytest.raises(ValueError, match="level must be between 0 and 1"):
        bench.ratio_interval(b, b, level=1.5)


def test_measure_records_the_alternating_blocks():
    calls = []
    systems = [bench.System(name, lambda feeds, name=name: calls.append(name), 0.0) for name in "ab"]
    bench.measure(systems, {}, runs=30, warmup=0, settle_s=0.0)
    for system in systems:
        assert len(system.times_ms) == 30
        assert system.blocks[0] == 0 and system.blocks == sorted(set(system.blocks)) and len(system.blocks) >= 2
        assert len(system.block_medians()) == len(system.blocks)
    # first runs a, b; then a block each (1 run), then the rest in the other order (b, a): the
    # same system is not always second after the pause
    groups = [c for i, c in enumerate(calls[2:]) if i == 0 or c != calls[2:][i - 1]]
    assert groups == ["a", "b", "a"], groups


@pytest.mark.parametrize("text,seconds", [("10s", 10), ("500ms", 0.5), ("2m", 120), ("1.5", 1.5)])
def test_parse_duration(text, seconds):
    assert bench.parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "ten", "-3s", "0", "nan", "5 parsecs"])
def test_parse_duration_rejects(text):
    with pytest.raises(OptionError, match="duration"):
        bench.parse_duration(text)


def test_compare_outputs():
    a = np.array([1.0, 2.0, 3.0], np.float32)
    same = bench.compare_outputs([a], [a.copy()], ["y"])
    assert same["min_cosine"] == pytest.approx(1.0) and same["max_abs_err"] == 0.0
    assert same["all_compared"]
    off = bench.compare_outputs([a, np.array([1.0, 0.0])], [a + 0.5, np.array([0.0, 1.0])], ["y", "z"])
    assert off["outputs"]["y"]["max_abs_err"] == pytest.approx(0.5)
    assert off["outputs"]["z"]["cosine"] == pytest.approx(0.0)
    assert off["min_cosine"] == pytest.approx(0.0)
    wrong = bench.compare_outputs([a], [np.zeros(4)], ["y"])
    assert "error" in wrong["outputs"]["y"] and not wrong["all_compared"]
    nan = bench.compare_outputs([np.array([np.nan, 1.0])], [np.array([0.0, 1.0])], ["y"])
    assert not nan["all_compared"]  # a NaN where the other has a number is a mismatch


def test_random_feeds_respect_dtypes_and_index_bounds():
    from accelkit.frontend import TensorSpec

    specs = [TensorSpec("ids", (2, 5), "int64"), TensorSpec("mask", (2, 5), "int64"),
             TensorSpec("x", (3,), "float32"), TensorSpec("flag", (), "bool")]
    feeds = bench.random_feeds(specs, {"ids": 7})
    assert feeds["ids"].dtype == np.int64 and feeds["ids"].min() >= 0 and feeds["ids"].max() < 7
    assert (feeds["mask"] == 1).all()
    assert feeds["x"].dtype == np.float32 and feeds["x"].shape == (3,)
    assert feeds["flag"].shape == () and feeds["flag"].dtype == bool


def _fake(name, log, sleep_s=0.0):
    def run(feeds):
        log.append(name)
        if sleep_s:
            time.sleep(sleep_s)
        return [np.zeros(1)]

    return bench.System(name, run, 0.0)


def test_measure_alternates_systems_and_counts_runs():
    log = []
    a, b = _fake("a", log), _fake("b", log)
    bench.measure([a, b], {}, runs=10, warmup=2, settle_s=0.0)
    assert len(a.times_ms) == 10 and len(b.times_ms) == 10
    assert a.first_run_ms is not None and a.outputs is not None
    # first run + warm-up of each before any timed run; then alternating blocks
    assert log[:6] == ["a"] * 3 + ["b"] * 3
    timed = log[6:]
    assert timed.index("b") < len(timed) - 1 - timed[::-1].index("a"), "b ran only after all of a"


def test_measure_by_duration():
    log = []
    a, b = _fake("a", log, 0.002), _fake("b", log, 0.002)
    bench.measure([a, b], {}, duration_s=0.1, warmup=0, settle_s=0.0)
    for system in (a, b):
        assert len(system.times_ms) >= bench.MIN_RUNS
        assert 50 <= sum(system.times_ms) < 50 + 1000 * bench.BLOCK_S + 50


def test_measure_rejects_bad_settings():
    a = _fake("a", [])
    with pytest.raises(OptionError):
        bench.measure([a], {}, runs=0)
    with pytest.raises(OptionError):
        bench.measure([a], {}, runs=3, duration_s=1.0)
    with pytest.raises(OptionError):
        bench.measure([a], {}, runs=3, warmup=-1)


def test_bench_vs_onnxruntime_json_and_plot(mlp_path, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    done = cli("bench", mlp_path, "--vs", "onnxruntime", "--runs", "20", "--json", str(out), "--plot", str(png))
    assert done.returncode == 0, done.stderr
    for fragment in ("accelkit[cpu]", "onnxruntime", "p50", "p99", "ratio (p50 onnxruntime / p50 accelkit)",
                     "min cosine", "max abs err"):
        assert fragment in done.stdout, (fragment, done.stdout)
    record = json.loads(out.read_text())
    names = [s["name"] for s in record["systems"]]
    assert names == ["accelkit[cpu]", "onnxruntime"]
    for system in record["systems"]:
        assert len(system["times_ms"]) == 20 and system["stats"]["runs"] == 20
        assert system["first_run_ms"] > 0 and system["setup_s"] >= 0
        assert system["stats"]["min_ms"] <= system["stats"]["p50_ms"] <= system["stats"]["p99_ms"]
    ours, theirs = record["systems"]
    assert record["comparison"]["ratio_p50"] == pytest.approx(theirs["stats"]["p50_ms"] / ours["stats"]["p50_ms"])
    accuracy = record["comparison"]["accuracy"]
    assert accuracy["min_cosine"] > 0.99999 and accuracy["max_abs_err"] < 1e-4
    assert record["machine"]["threads"] >= 1 and record["settings"]["batch"] == 8
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_bench_vs_reference_detects_a_different_model(tmp_path):
    """The accuracy columns compare the two systems' outputs: a model whose outputs differ
    between accelkit and the reference evaluator must show it (here: the reference backend runs
    a model with different weights, by benchmarking through the Python API with our feeds)."""
    import accelkit
    from conftest import mlp_model

    good, other = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(mlp_model(seed=0), str(good))
    onnx.save(mlp_model(seed=1), str(other))
    ours, theirs = accelkit.compile(str(good)), accelkit.compile(str(other), backend="reference")
    feeds = bench.random_feeds(ours.inputs)
    a = bench.System("a", ours.run, 0.0)
    b = bench.System("b", theirs.run, 0.0)
    bench.measure([a, b], feeds, runs=2, warmup=0, settle_s=0.0)
    diff = bench.compare_outputs(a.outputs, b.outputs, ["y"])
    assert diff["min_cosine"] < 0.99


def test_bench_artifact_and_given_inputs(mlp_akx, tmp_path):
    x = np.random.default_rng(0).standard_normal((8, 32)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    done = cli("bench", mlp_akx, "--runs", "5", "--warmup", "0", "--input", f"x={tmp_path / 'x.npy'}")
    assert done.returncode == 0, done.stderr
    assert "accelkit[cpu]" in done.stdout and "loaded artifact" in done.stdout
    assert "ratio" not in done.stdout  # nothing to compare with


@pytest.mark.parametrize("artifact,args,message", [
    (True, ["--vs", "onnxruntime"], "needs the ONNX model"),
    (False, ["--duration", "soon"], "duration 'soon'"),
    (False, ["--runs", "0"], "--runs must be at least 1"),
    (False, ["--runs", "2", "--vs", "nosuchbackend"], "nosuchbackend"),
])
def test_bench_bad_options(mlp_akx, mlp_path, artifact, args, message):
    done = cli("bench", mlp_akx if artifact else mlp_path, *args)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert message in done.stderr and "Traceback" not in done.stderr


def test_bench_wrong_feed_is_a_feed_error(mlp_path, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((3, 3), np.float32))
    done = cli("bench", mlp_path, "--runs", "2", "--input", f"x={tmp_path / 'x.npy'}")
    assert done.returncode == 2 and "input 'x' has shape (3, 3)" in done.stderr


@pytest.fixture(scope="module")
def conv_profile(conv_path):
    from accelkit.profile import profile

    return profile(conv_path, runs=3, warmup=1)


def test_profile_accounts_for_every_call(conv_profile, conv_path):
    import accelkit

    record = conv_profile
    shares = record["shares"]
    assert set(shares) == {"kernel", "generated", "runtime", "overhead"}
    assert sum(shares.values()) == pytest.approx(1.0)
    assert all(v >= 0 for v in shares.values())
    rows = record["rows"]
    assert [r["ms_per_run"] for r in rows] == sorted((r["ms_per_run"] for r in rows), reverse=True)
    assert sum(r["ms_per_run"] for r in rows) <= record["instrumented_ms"] * 1.001
    kernels = {r["name"]: r for r in rows if r["category"] == "kernel"}
    # the conv and the Gemm run in accelkit's kernels, once each per run; the pool and the
    # reduction are TVM-generated
    assert set(kernels) == {"accelkit.cpu.conv2d_nhwc", "accelkit.cpu.dense"}
    assert all(r["calls_per_run"] == 1 for r in kernels.values())
    assert kernels["accelkit.cpu.conv2d_nhwc"]["shapes"].startswith("[2,12,12,3]")  # channels last
    compiled = accelkit.compile(conv_path)
    assert sum(compiled.manifest["offloaded"].values()) == sum(r["calls_per_run"] for r in kernels.values())
    assert any(r["category"] == "generated" for r in rows)
    assert any(r["name"].startswith("vm.builtin.") and r["category"] == "runtime" for r in rows)
    assert record["latency_ms"] > 0 and record["compile_s"] > 0


def test_profile_trace_is_chrome_trace_json(conv_profile, tmp_path):
    from accelkit.profile import write_trace

    path = write_trace(conv_profile, str(tmp_path / "trace.json"))
    events = json.loads(open(path).read())["traceEvents"]
    run, calls = events[0], events[1:]
    assert run["name"] == "model.run" and run["ph"] == "X"
    assert len(calls) == conv_profile["calls_per_run"]
    for event in calls:
        assert event["ph"] == "X" and event["dur"] >= 0
        assert 0 <= event["ts"] and event["ts"] + event["dur"] <= run["dur"] + 1e-3
    assert [e["ts"] for e in calls] == sorted(e["ts"] for e in calls)


def test_profile_cli(conv_path, tmp_path):
    trace, out = tmp_path / "t.json", tmp_path / "p.json"
    done = cli("profile", conv_path, "--runs", "2", "--top", "4", "--trace", str(trace), "--json", str(out))
    assert done.returncode == 0, done.stderr
    assert "accelkit kernels" in done.stdout and "TVM-generated" in done.stdout
    assert "more functions" in done.stdout  # only --top 4 rows printed
    assert json.loads(trace.read_text())["traceEvents"]
    assert json.loads(out.read_text())["rows"]


@pytest.mark.parametrize("args,message", [
    (["--backend", "reference"], "cannot be profiled"),
    (["--runs", "0"], "runs >= 1"),
])
def test_profile_bad_options(conv_path, args, message):
    done = cli("profile", conv_path, *args)
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_profile_refuses_artifact(mlp_akx):
    done = cli("profile", mlp_akx)
    assert done.returncode == 2 and "cannot be instrumented" in done.stderr


def test_benchmark_comparison_plot(tmp_path):
    """benchmarks/plot.py turns a pytest-benchmark JSON into the committed comparison PNG."""
    import importlib.util
    import os

    pytest.importorskip("matplotlib")
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "plot.py")
    spec = importlib.util.spec_from_file_location("bench_plot", path)
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)
    record = {"datetime": "2026-11-23T00:00:00", "machine_info": {"cpu": {"brand_raw": "test cpu"}},
              "benchmarks": [{"group": "same-run ratio", "extra_info": {"model": m, "accelkit_ms": a,
                                                                         "onnxruntime_ms": o, "ratio": o / a}}
                             for m, a, o in (("mlp", 1.0, 1.2), ("resnet50", 50.0, 40.0))]
              + [{"group": "model mlp", "extra_info": {}}]}
    assert plot.ratios(record)["resnet50"]["ratio"] == pytest.approx(0.8)
    out = plot.plot(record, str(tmp_path / "cmp.png"))
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="no same-run ratios"):
        plot.ratios({"benchmarks": []})


def test_backend_options_on_the_command_line(conv_path, tmp_path):
    import subprocess
    import sys

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "accelkit", *args], capture_output=True, text=True,
                              timeout=300)

    nchw = cli("compile", conv_path, "--option", "layout=nchw", "-o", str(tmp_path / "a.akx"))
    assert nchw.returncode == 0, nchw.stderr
    assert "cpu.conv2d_bias" in nchw.stdout and "conv2d_nhwc" not in nchw.stdout
    nhwc = cli("compile", conv_path, "-o", str(tmp_path / "b.akx"))
    assert nhwc.returncode == 0 and "cpu.conv2d_nhwc" in nhwc.stdout, nhwc.stdout + nhwc.stderr
    bad = cli("compile", conv_path, "--option", "layout")
    assert bad.returncode != 0 and "expected NAME=VALUE" in bad.stderr, bad.stderr
    unknown = cli("profile", conv_path, "--option", "tiles=4", "--runs", "1")
    assert unknown.returncode != 0 and "unknown option(s) tiles" in unknown.stderr, unknown.stderr
    listed = cli("backends")
    assert "--option layout=" in listed.stdout
