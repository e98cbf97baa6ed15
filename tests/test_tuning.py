"""Tuning: options, the database (resume, reuse across models, applied at compile), isolation of
crashing/hanging candidates, Ctrl-C, the correctness check, and measuring over TVM RPC."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import accelkit
from accelkit import tuning
from accelkit.errors import OptionError
from conftest import make_model

SEQ, HID, HEADS = 64, 128, 4


def attention_model(seed=0):
    """One causal attention block, as early transformers 4 GPT-2 attention wrote it:
    projections (kernels), head reshapes and transposes and the causal mask by Where with
    masked_bias -1e4 (TVM-generated: a fill that shifts masked scores instead of replacing them
    is not the fused attention kernel's form; finfo.min is), scores + softmax + context
    (kernels), output projection + residual."""
    rng = np.random.default_rng(seed)
    dh = HID // HEADS
    inits = [numpy_helper.from_array((rng.standard_normal((HID, HID)) * 0.1).astype("float32"), n)
             for n in ("Wq", "Wk", "Wv", "Wo")]
    inits += [numpy_helper.from_array(np.array([1, SEQ, HEADS, dh], np.int64), "split"),
              numpy_helper.from_array(np.array([1, SEQ, HID], np.int64), "merge"),
              numpy_helper.from_array(np.array(1 / np.sqrt(dh), np.float32), "scale"),
              numpy_helper.from_array(np.tril(np.ones((SEQ, SEQ), bool))[None, None], "causal"),
              numpy_helper.from_array(np.array(-1e4, np.float32), "masked")]
    nodes = []
    for n in "qkv":
        nodes += [helper.make_node("MatMul", ["x", f"W{n}"], [f"{n}0"]),
                  helper.make_node("Reshape", [f"{n}0", "split"], [f"{n}1"]),
                  helper.make_node("Transpose", [f"{n}1"], [n], perm=[0, 2, 1, 3] if n != "k" else [0, 2, 3, 1])]
    nodes += [helper.make_node("MatMul", ["q", "k"], ["s0"]),
              helper.make_node("Mul", ["s0", "scale"], ["s1"]),
              helper.make_node("Where", ["causal", "s1", "masked"], ["s"]),
              helper.make_node("Softmax", ["s"], ["p"], axis=-1),
              helper.make_node("MatMul", ["p", "v"], ["c0"]),
              helper.make_node("Transpose", ["c0"], ["c1"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["c1", "merge"], ["c"]),
              helper.make_node("MatMul", ["c", "Wo"], ["o"]),
              helper.make_node("Add", ["o", "x"], ["y"])]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, SEQ, HID])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, SEQ, HID])], inits,
                      name="attention")


@pytest.fixture
def cache(tmp_path):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACCELKIT_CACHE_DIR", str(tmp_path / "cache"))
        yield tmp_path / "cache"


def _db_dir(cache_dir) -> str:
    (target,) = os.listdir(os.path.join(cache_dir, "tuning"))
    return os.path.join(cache_dir, "tuning", target)


def _rows(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _feeds():
    return {"x": np.random.default_rng(1).standard_normal((1, SEQ, HID)).astype(np.float32)}


# ---- options -------------------------------------------------------------------------------

@pytest.mark.parametrize("tune, message", [
    ("ten minutes", "tune budget 'ten minutes'"),
    (0, "positive duration"),
    (-5, "positive duration"),
    (float("nan"), "positive duration"),
    (True, "must be a duration"),
    ([1], "must be a duration"),
])
def test_bad_budget_is_refused_before_anything_runs(tune, message):
    with pytest.raises(OptionError, match=message):
        accelkit.compile(attention_model(), tune=tune)


def test_bad_tune_options_are_named():
    with pytest.raises(OptionError, match="rpc_tracker and rpc_key go together"):
        tuning.TuneOptions(budget=10, rpc_tracker="127.0.0.1:9190")
    with pytest.raises(OptionError, match="HOST:PORT"):
        tuning.TuneOptions(budget=10, rpc_tracker="localhost", rpc_key="k")
    with pytest.raises(OptionError, match="trials must be a non-negative integer"):
        tuning.TuneOptions(budget=10, trials=-1)
    with pytest.raises(OptionError, match="does not support tuning"):
        accelkit.compile(attention_model(), backend="reference", tune="10s")
    with pytest.raises(OptionError, match="fp32"):
        accelkit.compile(attention_model(), precision="int8", tune="10s")


# ---- a real run: search, database, apply, resume, reuse ---------------------------------------

def test_tune_applies_resumes_and_is_reused(cache):
    model = attention_model()
    budget = 40.0
    start = time.monotonic()
    tuned = accelkit.compile(model, tune=tuning.TuneOptions(budget=budget, progress=False))
    wall = time.monotonic() - start
    report = tuned.tuning_report
    kinds = {r["kind"] for r in report.kernel_tasks + report.tir_tasks}
    assert kinds == {"kernel", "tir"}, report.format()
    assert report.trials > 0
    assert report.elapsed_s <= budget * 1.1 and wall <= budget * 1.1 + 15, (report.elapsed_s, wall)
    names = [r["name"] for r in report.kernel_tasks]
    assert any(n.startswith("dense") for n in names) and any(n.startswith("bmm") for n in names)
    assert any("transpose" in r["name"] for r in report.tir_tasks)
    # every measured task was decided, and decisions say why untuned was kept
    for r in report.kernel_tasks + report.tir_tasks:
        assert r.get("use") in ("tuned", "untuned"), r
        assert r["use"] == "tuned" or r.get("reason"), r

    db = _db_dir(cache)
    first_trials = _rows(os.path.join(db, "trials.jsonl"))
    first_kernels = _rows(os.path.join(db, "kernels.jsonl"))
    assert first_trials and first_kernels
    decisions = json.load(open(os.path.join(db, "decisions.json")))
    used = sum(v.get("use") == "tuned" for kind in decisions.values() for v in kind.values())

    # tuned output = untuned output (same kernels, other splits; checked schedules)
    untuned = accelkit.compile(model, tune=False)
    assert "tuning" not in untuned.manifest
    np.testing.assert_allclose(tuned.run(_feeds())[0], untuned.run(_feeds())[0], rtol=1e-4, atol=1e-4)
    applied = tuned.manifest.get("tuning", {}).get("applied", {})
    assert sum(len(v) for v in applied.values()) == used
    if used:
        assert tuned.manifest["tuning"]["database"] and tuned.cache_status == "miss"

    # resume: a second run measures nothing the first one measured
    again = tuning.tune(model, options=tuning.TuneOptions(budget=20, progress=False))
    second_trials = _rows(os.path.join(db, "trials.jsonl"))[len(first_trials):]
    second_kernels = _rows(os.path.join(db, "kernels.jsonl"))[len(first_kernels):]
    seen = {(r["workload"], r["candidate"]) for r in first_trials}
    assert not [r for r in second_trials if (r["workload"], r["candidate"]) in seen]
    assert not second_kernels  # every config of every kernel call was measured by run 1
    assert again.skipped > 0
    assert len({(r["workload"], r["candidate"]) for r in second_trials}) == len(second_trials)

    # a later plain compile applies the database (cache hit on the same key), and another model
    # with the same layer shapes (other weights) reuses it without tuning
    assert accelkit.compile(model).cache_status == "hit"
    other = accelkit.compile(attention_model(seed=5))
    if used:
        assert sum(len(v) for v in other.manifest["tuning"]["applied"].values()) == used


def test_cli_tune_and_info(cache, tmp_path):
    import onnx

    path = tmp_path / "attention.onnx"
    onnx.save(attention_model(), path)
    env = {**os.environ, "ACCELKIT_CACHE_DIR": str(cache)}
    done = subprocess.run([sys.executable, "-m", "accelkit", "tune", str(path), "--budget", "25s",
                           "--no-tir", "-o", str(tmp_path / "a.akx")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "kernels:" in done.stdout and "trials measured" in done.stdout
    assert "untuned " in done.stdout and "tuned " in done.stdout  # the closing comparison
    assert "90% interval" in done.stdout, done.stdout
    info = subprocess.run([sys.executable, "-m", "accelkit", "info", str(tmp_path / "a.akx")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert info.returncode == 0 and "tuned:" in info.stdout
    bad = subprocess.run([sys.executable, "-m", "accelkit", "tune", str(path), "--budget", "soon"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "tune budget 'soon'" in bad.stderr


# ---- isolation -------------------------------------------------------------------------------

def _faulty_evaluator(counter_file, crash_at, hang_at):
    """A runner evaluator that crashes the measuring process on call `crash_at` and hangs on call
    `hang_at` (a counter in a file: the worker process restarts after a crash)."""

    def evaluate(rt_mod, device, evaluator_config, repeated_args):
        import os
        import signal
        import time

        from tvm.s_tir.meta_schedule.runner.local_runner import default_run_evaluator

        with open(counter_file, "a+") as f:
            f.seek(0)
            calls = len(f.read()) + 1
            f.write("x")
        if calls == crash_at:
            os.kill(os.getpid(), signal.SIGSEGV)
        if calls == hang_at:
            time.sleep(3600)
        return default_run_evaluator(rt_mod, device, evaluator_config, repeated_args)

    return evaluate


def test_crashing_and_hanging_candidates_are_dropped(cache, tmp_path):
    from tvm.s_tir import meta_schedule as ms

    from accelkit import frontend
    from accelkit.backends import CompileOptions, get_backend
    from accelkit.tuning import tir as ttune

    # the first len(tasks) calls measure the untuned baselines; the next ones are candidates
    _, mod = get_backend("cpu").tuning_module(frontend.prepare(attention_model()), CompileOptions())
    baselines = len(ttune.extract(mod))
    counter = tmp_path / "calls"
    runner = ms.runner.LocalRunner(timeout_sec=4, f_run_evaluator=_faulty_evaluator(
        str(counter), crash_at=baselines + 1, hang_at=baselines + 2))
    options = tuning.TuneOptions(budget=45, kernels=False, trials_per_round=4, runner=runner, progress=False)
    report = tuning.tune(attention_model(), options=options)
    assert len(counter.read_text()) >= baselines + 3  # it went on after the crash and the hang
    assert any("Timeout" in d for d in report.dropped), report.dropped
    assert any("Subprocess terminated" in d for d in report.dropped), report.dropped  # the SIGSEGV
    assert report.tir_tasks and all(r.get("use") in ("tuned", "untuned") or r.get("reason") for r in report.tir_tasks)
    np.testing.assert_allclose(accelkit.compile(attention_model()).run(_feeds())[0],
                               accelkit.compile(attention_model(), tune=False).run(_feeds())[0], rtol=1e-4, atol=1e-4)


def test_ctrl_c_keeps_what_was_measured(cache):
    from tvm.s_tir import meta_schedule as ms

    class StopSecondTime(ms.runner.PyRunner):
        def __init__(self):
            super().__init__()
            self.inner = ms.runner.LocalRunner(timeout_sec=20)
            self.calls = 0

        def run(self, inputs):
            self.calls += 1
            if self.calls == 3:  # baseline round, one search round, then the user presses Ctrl-C
                raise KeyboardInterrupt
            return self.inner.run(inputs)

    options = tuning.TuneOptions(budget=60, kernels=False, trials_per_round=4, runner=StopSecondTime(),
                                 progress=False)
    with pytest.raises(tuning.TuneInterrupted) as stop:
        tuning.tune(attention_model(), options=options)
    assert stop.value.report.interrupted and stop.value.report.trials > 0
    db = _db_dir(cache)
    assert len(_rows(os.path.join(db, "trials.jsonl"))) == stop.value.report.trials
    decisions = json.load(open(os.path.join(db, "decisions.json")))
    assert decisions["tir"] and all(v.get("default_s") for v in decisions["tir"].values())


def test_attention_calls_are_tuned_over_thread_counts():
    """The fused attention call (exporters' form) is a kernel task like the others: its thread
    configs build, run and compute the untuned output."""
    import functools

    from conftest import mha_model

    from accelkit import frontend
    from accelkit.backends import CompileOptions, get_backend
    from accelkit.tuning import kernels as ktune

    target, mod = get_backend("cpu").tuning_module(frontend.prepare(mha_model()), CompileOptions())
    tasks = [t for t in ktune.extract(mod) if t.kernel == "accelkit.cpu.attention"]
    assert len(tasks) == 1 and tasks[0].name.startswith("attention"), [t.name for t in ktune.extract(mod)]
    assert tasks[0].configs(2) == [0, ktune.pack_config(threads=1), ktune.pack_config(threads=2)]
    rows, wrong = ktune.tune_task(tasks[0], target, 2, functools.partial(ktune.measure_local, target_ms=5.0), {})
    assert not wrong and set(rows) == set(tasks[0].configs(2)) and all(s and s > 0 for s in rows.values()), rows


def test_dense_calls_are_measured_and_keyed_as_the_model_splits_them(cache, monkeypatch):
    """A model whose weights stay in the last-level cache runs its dense layers with the rows
    split between the threads (ak_set_model_bytes), not the weight panels. Tuning measures them
    with the model's size told to the kernels, as the runner does, and keys those tasks apart
    from the same shapes measured in a model that does not stay cached; compile applies them."""
    from accelkit import frontend
    from accelkit.backends import CompileOptions, get_backend
    from accelkit.tuning import kernels as ktune

    model = attention_model()
    _, mod = get_backend("cpu").tuning_module(frontend.prepare(model), CompileOptions())
    weights = sum(np.prod(i.dims) * 4 for i in model.graph.initializer if i.data_type == TensorProto.FLOAT)
    assert weights <= ktune.model_bytes(mod) <= weights + 64 * 1024  # packed weights, a few constants
    assert ktune.weights_cached(mod)  # 260 KB
    cached = {t.kernel: t.key for t in ktune.extract(mod, True)}
    plain = {t.kernel: t.key for t in ktune.extract(mod, False)}
    assert cached["accelkit.cpu.dense"] == plain["accelkit.cpu.dense"] + " weights-cached"
    assert cached["accelkit.cpu.bmm"] == plain["accelkit.cpu.bmm"]  # only dense splits by it

    told = []
    measure = ktune.measure_local

    def recording(library, inputs, count, **how):
        told.append(how.get("model_bytes"))
        return measure(library, inputs, count, **{**how, "target_ms": 5.0})

    monkeypatch.setattr(ktune, "measure_local", recording)
    tuning.tune(model, options=tuning.TuneOptions(budget=30, tir=False, progress=False))
    assert told and set(told) == {ktune.model_bytes(mod)}
    db = _db_dir(cache)
    decisions = json.load(open(os.path.join(db, "decisions.json")))
    dense = [k for k in decisions["kernels"] if k.startswith("accelkit.cpu.dense")]
    assert dense and all(decisions["kernels"][k]["task"].endswith(" weights-cached") for k in dense), dense

    # compile finds a decision under the cached key (make one tuned, whatever was measured)
    entry = decisions["kernels"][dense[0]]
    entry.update(use="tuned", config=ktune.pack_config(threads=1), tuned_s=entry["default_s"] / 2)
    with open(os.path.join(db, "decisions.json"), "w") as f:
        json.dump(decisions, f)
    compiled = accelkit.compile(model)
    applied = compiled.manifest["tuning"]["applied"]["kernels"]
    assert any(line.startswith(entry["name"] + ": threads=1") for line in applied), applied
    # and the runner tells the kernels the size tuning measured with (not the library's)
    assert compiled.manifest["weights_bytes"] == ktune.model_bytes(mod)
    assert compiled._runner._model_bytes == ktune.model_bytes(mod)


def test_kernel_configs_are_measured_and_applied_per_instruction_set(cache, monkeypatch):
    """A kernel config's speed depends on the instruction set the kernels dispatch to
    (ACCELKIT_KERNEL_ISA caps it): what was tuned on AVX-512 is neither applied to nor resumed
    by an AVX2 run, tuning the AVX2 kernels keeps AVX-512's decisions, and the two builds are
    cached apart."""
    from accelkit import kernels
    from accelkit.backends import get_backend
    from accelkit.tuning import kernels as ktune
    from accelkit.tuning.database import TuningDB

    module = kernels.load()
    if module.isa() != "avx512":
        pytest.skip(f"the CPU's best path is {module.isa()}: no second instruction set to compare")
    model = attention_model()
    tuning.tune(model, options=tuning.TuneOptions(budget=30, tir=False, progress=False))
    db = _db_dir(cache)
    decisions = json.load(open(os.path.join(db, "decisions.json")))
    key = next(k for k in decisions["kernels"] if k.startswith("accelkit.cpu.dense"))
    entry = decisions["kernels"][key]
    entry.update(use="tuned", config=ktune.pack_config(threads=1), tuned_s=entry["default_s"] / 2)
    with open(os.path.join(db, "decisions.json"), "w") as f:
        json.dump(decisions, f)
    native = accelkit.compile(model)
    assert native.manifest["tuning"]["applied"]["kernels"], native.manifest["tuning"]
    backend = get_backend("cpu")
    native_digest = backend.kernels_digest()
    assert TuningDB(native.manifest["target"]).kernel_trials(native_digest)

    monkeypatch.setenv("ACCELKIT_KERNEL_ISA", "avx2")
    module.register()
    try:
        assert module.isa() == "avx2"
        capped = accelkit.compile(model)
        assert capped.manifest["backend_fingerprint"] != native.manifest["backend_fingerprint"]
        assert not capped.manifest.get("tuning", {}).get("applied", {}).get("kernels"), capped.manifest["tuning"]
        # a tune run here starts the kernel search over instead of resuming AVX-512's trials
        assert not TuningDB(capped.manifest["target"]).kernel_trials(backend.kernels_digest())
        np.testing.assert_allclose(capped.run(_feeds())[0], native.run(_feeds())[0], rtol=1e-4, atol=1e-4)
        # and its decisions sit beside AVX-512's instead of replacing them
        tuning.tune(model, options=tuning.TuneOptions(budget=20, tir=False, progress=False))
        both = json.load(open(os.path.join(db, "decisions.json")))["kernels"]
        assert {v["kernels"] for v in both.values()} == {native_digest, backend.kernels_digest()}
    finally:
        monkeypatch.delenv("ACCELKIT_KERNEL_ISA")
        module.register()
    again = accelkit.compile(model)
    assert again.manifest["tuning"]["applied"] == native.manifest["tuning"]["applied"]


def test_a_candidate_that_computes_something_else_is_refused():
    import tvm
    from tvm import te

    from accelkit.backends import host_target
    from accelkit.tuning import tir as ttune

    def module(k):
        a = te.placeholder((64,), "float32", name="a")
        b = te.compute((64,), lambda i: a[i] * tvm.tirx.const(k, "float32"), name="b")
        return tvm.IRModule({"main": te.create_prim_func([a, b]).with_attr("global_symbol", "main")})

    measurer = ttune.Measurer(host_target(), runner=None)
    assert ttune.verify(measurer, module(2.0), module(2.0)) is None
    problem = ttune.verify(measurer, module(2.0), module(2.5))
    assert problem and "differs from the untuned output" in problem


# ---- more machines: TVM's RPC tracker and two accelkit rpc-servers on loopback -----------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tune_through_an_rpc_tracker_and_two_servers(cache):
    from tvm import rpc
    from tvm.rpc.tracker import Tracker

    tracker = Tracker("127.0.0.1", port=_free_port(), port_end=65000, silent=True)
    servers = []
    try:
        for _ in range(2):
            servers.append(subprocess.Popen(
                [sys.executable, "-m", "accelkit", "rpc-server", "--tracker", f"127.0.0.1:{tracker.port}",
                 "--key", "accelkit-test", "--port", str(_free_port())],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            summary = rpc.connect_tracker("127.0.0.1", tracker.port).summary()
            free = [q for q in summary["queue_info"].values()]
            if sum(q["free"] for q in free) >= 2:
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"the rpc servers did not register: {summary}")
        options = tuning.TuneOptions(budget=35, rpc_tracker=f"127.0.0.1:{tracker.port}", rpc_key="accelkit-test",
                                     trials_per_round=4, progress=False)
        tuned = accelkit.compile(attention_model(), tune=options)
        report = tuned.tuning_report
        assert report.trials > 0 and not report.interrupted
        assert any(r.get("default_s") for r in report.kernel_tasks)  # kernels measured remotely
        assert any(r.get("default_s") for r in report.tir_tasks)     # and generated functions
        want = accelkit.compile(attention_model(), backend="reference").run(_feeds())[0]
        np.testing.assert_allclose(tuned.run(_feeds())[0], want, rtol=1e-4, atol=1e-4)
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
        tracker.terminate()
    for server in servers:
        assert "registered with tracker" in server.stdout.read()
