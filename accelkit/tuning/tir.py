"""Meta-schedule search for the functions TVM generates (the ones accelkit's kernels do not take):
one task per distinct unscheduled PrimFunc, driven round by round here (not by meta-schedule's
task scheduler) so that the time budget, the progress bar, Ctrl-C and resume are ours:

    TuneContext(evolutionary search, xgboost cost model when installed)
      -> candidates -> skip the ones measured in an earlier run (trials.jsonl)
      -> LocalBuilder -> LocalRunner / RPCRunner (separate processes: a candidate that crashes
         or hangs is an error result, with a timeout) -> records in the JSONDatabase.

The baseline of every task is accelkit's default schedule, measured through the same runner.
Before a tuned schedule is used, its output is compared with the default one's on the same
inputs, in a separate process; one that differs is dropped and the next best is tried."""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from typing import Any

import numpy as np

logger = logging.getLogger("accelkit.tune")

MARGIN = 0.03  # a tuned schedule must be this much faster than the default one to be used
FAILED = 1e10  # run time meta-schedule records for a failed candidate


@dataclasses.dataclass
class TirTask:
    name: str
    workload: str        # structural hash of the unscheduled PrimFunc
    mod: Any             # IRModule {"main": the PrimFunc}
    count: int = 1
    default_s: float | None = None
    best_s: float | None = None
    trials: int = 0      # measured in this run
    ctx: Any = None
    finished: bool = False


def workload_key(func) -> str:
    import tvm_ffi

    return f"{tvm_ffi.structural_hash(func) & 0xFFFFFFFFFFFFFFFF:016x}"


def extract(mod) -> list[TirTask]:
    import tvm
    from tvm import tirx

    from accelkit.schedules import is_scheduled

    tasks: dict[str, TirTask] = {}
    for gvar, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc) or is_scheduled(func):
            continue
        key = workload_key(func)
        if key in tasks:
            tasks[key].count += 1
            continue
        main = func.with_attr("global_symbol", "main")
        tasks[key] = TirTask(gvar.name_hint, key, tvm.IRModule({"main": main}))
    return list(tasks.values())


def default_scheduled(task: TirTask, target):
    """The task's module under accelkit's default schedule (the untuned code)."""
    from accelkit.schedules import ScheduleConfig, schedule_func

    import tvm

    func = schedule_func(task.mod["main"], ScheduleConfig.from_target(target))
    return tvm.IRModule({"main": func}) if func is not None else task.mod


def candidate_key(mod) -> str:
    return workload_key(mod["main"])


class Measurer:
    """Builds candidates (here: about 30 ms each) and measures them with a meta-schedule runner
    (in other processes, or machines).

    Not meta-schedule's LocalBuilder: it starts a fresh process pool for every batch, and its
    build function imports tvm.s_tir.tensor_intrin, which takes about 40 s per process on this
    2-core machine (it registers every target's tensor intrinsics; fp32 CPU schedules use none)."""

    def __init__(self, target, runner):
        self.target = target
        self.runner = runner

    def build(self, mods) -> list[tuple[str | None, str | None]]:
        import tempfile

        import tvm
        from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock
        from tvm.support.tar import tar

        out: list[tuple[str | None, str | None]] = []
        for mod in mods:
            folder = tempfile.mkdtemp(prefix="accelkit-candidate-")
            try:
                lib = tvm.compile(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), self.target)
                path = os.path.join(folder, "candidate.tar")
                lib.export_library(path, fcompile=tar)
                out.append((path, None))
            except Exception as exc:  # noqa: BLE001 - a candidate TVM cannot build is dropped
                shutil.rmtree(folder, ignore_errors=True)
                out.append((None, f"{type(exc).__name__}: {_first_line(str(exc))}"))
        return out

    def run(self, built, args_infos) -> list[tuple[float | None, str | None]]:
        from tvm.s_tir import meta_schedule as ms

        inputs, where = [], []
        out: list[tuple[float | None, str | None]] = [(None, None)] * len(built)
        for i, ((path, error), info) in enumerate(zip(built, args_infos)):
            if path is None:
                out[i] = (None, f"build failed: {_first_line(error)}")
            else:
                inputs.append(ms.runner.RunnerInput(path, "cpu", info))
                where.append(i)
        if inputs:
            futures = self.runner.run(inputs)
            for i, future in zip(where, futures):
                result = future.result()
                if result.error_msg:
                    out[i] = (None, _first_line(str(result.error_msg)))
                else:
                    secs = [float(s) for s in result.run_secs]
                    out[i] = (float(np.median(secs)), None)
        return out

    @staticmethod
    def cleanup(built) -> None:
        for path, _ in built:
            if path:
                shutil.rmtree(os.path.dirname(path), ignore_errors=True)


def _first_line(text: str | None) -> str:
    lines = [line.strip() for line in str(text or "").splitlines() if line.strip()]
    # TVM errors end with the reason; keep the last meaningful line, short
    return (lines[-1] if lines else "unknown error")[:200]


def _cpu_tensor_intrinsics() -> None:
    """Register only this CPU's tensor intrinsics. TuneContext imports tvm.s_tir.tensor_intrin,
    whose __init__ registers every target's (CUDA, ROCm, Hexagon, ...) by parsing hundreds of
    TVMScript functions: 40+ s per process here, against 0.3 s for x86 alone. The package is
    entered without its __init__; any other submodule can still be imported on demand."""
    import importlib
    import importlib.util
    import platform
    import sys

    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None:  # pragma: no cover - a TVM without it: TuneContext imports what exists
        return
    sys.modules[name] = importlib.util.module_from_spec(spec)
    machine = platform.machine().lower()
    importlib.import_module(name + (".arm_cpu" if machine in ("aarch64", "arm64") else ".x86"))


def new_context(task: TirTask, target, database, cost_model, *, trials_per_round: int, seed: int = 0):
    from tvm.s_tir import meta_schedule as ms

    _cpu_tensor_intrinsics()

    ctx = ms.TuneContext(
        mod=task.mod, target=target, space_generator="post-order-apply",
        search_strategy=ms.search_strategy.EvolutionarySearch(population_size=128, init_min_unmeasured=32,
                                                              genetic_num_iters=3),
        task_name=task.name, rand_state=seed, num_threads=os.cpu_count() or 1)
    ctx.pre_tuning(max_trials=100000, num_trials_per_iter=trials_per_round,
                   design_spaces=ctx.generate_design_space(), database=database, cost_model=cost_model)
    return ctx


def cost_model():
    from tvm.s_tir import meta_schedule as ms

    try:
        import xgboost  # noqa: F401
    except ImportError:  # pragma: no cover - xgboost-cpu is a dependency
        return ms.cost_model.RandomModel()
    return ms.cost_model.XGBModel(num_warmup_samples=16)


def search_round(task: TirTask, measurer: Measurer, db, measured: dict[str, dict[str, Any]],
                 cost: Any, target) -> tuple[list[dict[str, Any]], int]:
    """One round of the search on `task`: (the trial rows measured, new ones only; how many
    candidates were skipped because an earlier round or run measured them)."""
    from tvm.s_tir import meta_schedule as ms

    ctx = task.ctx
    candidates = ctx.generate_measure_candidates()
    if not candidates:
        task.finished = True
        return [], 0
    known = measured.setdefault(task.workload, {})
    keys = [candidate_key(c.sch.mod) for c in candidates]
    first = {k: i for i, k in reversed(list(enumerate(keys)))}  # one of each, not yet measured
    fresh = sorted(i for k, i in first.items() if k not in known)
    built = measurer.build([candidates[i].sch.mod for i in fresh])
    try:
        timed = measurer.run(built, [candidates[i].args_info for i in fresh])
    finally:
        measurer.cleanup(built)
    rows = []
    workload = ms_workload(db, task)
    for i, (secs, error) in zip(fresh, timed):
        row = {"workload": task.workload, "candidate": keys[i], "secs": secs, "error": error}
        known[keys[i]] = row
        rows.append(row)
        db.commit_tuning_record(ms.database.TuningRecord(
            candidates[i].sch.trace, workload, [secs if secs is not None else FAILED], target,
            candidates[i].args_info))
        if error:
            logger.info("tune: %s: candidate %s dropped: %s", task.name, keys[i][:8], error)
    results = []
    for key in keys:
        row = known[key]
        results.append(ms.runner.RunnerResult([row["secs"]] if row["secs"] is not None else None,
                                              row["error"]))
    ctx.notify_runner_results(candidates, results)
    cost.update(ctx, candidates, results)
    task.trials += len(rows)
    good = [r["secs"] for r in known.values() if r["secs"] is not None]
    task.best_s = min(good) if good else None
    return rows, len(candidates) - len(fresh)


def ms_workload(db, task: TirTask):
    """The database's workload entry for the task (commit_workload returns a stored one as is)."""
    return db.commit_workload(task.mod)


def best_records(db, task: TirTask, k: int = 4) -> list[Any]:
    """The task's k fastest successful records (fastest first)."""
    if not db.has_workload(task.mod):
        return []
    records = db.get_top_k(db.commit_workload(task.mod), k)
    return [r for r in records if r.run_secs and float(r.run_secs[0]) < FAILED / 10]


def apply_record(task_mod, record):
    """The module scheduled by a record's trace (None when it no longer applies)."""
    from tvm import s_tir

    sch = s_tir.Schedule(task_mod)
    try:
        record.trace.apply_to_schedule(sch, remove_postproc=False)
    except Exception:  # noqa: BLE001 - a trace from another TVM version
        return None
    return sch.mod


def _verify_worker(reference: str, candidate: str, args_info: list[tuple[str, list[int]]]) -> str | None:
    """In a separate process: run both libraries on the same inputs; None when they agree."""
    import numpy as np
    import tvm

    dev = tvm.cpu(0)
    rng = np.random.default_rng(0)
    host = []
    for dtype, shape in args_info:
        if dtype.startswith("float"):
            host.append(rng.standard_normal(shape).astype(dtype))
        else:  # indices and flags: zeros are valid for every gather
            host.append(np.zeros(shape, dtype))
    outputs = []
    for path in (reference, candidate):
        args = [tvm.runtime.tensor(a.copy(), dev) for a in host]
        tvm.runtime.load_module(path)["main"](*args)
        outputs.append([a.numpy() for a in args])
    for i, (want, got) in enumerate(zip(*outputs)):
        if want.dtype.kind == "f":
            scale = float(np.nanmax(np.abs(want))) if want.size and np.isfinite(want).any() else 1.0
            if not np.allclose(got, want, rtol=1e-4, atol=1e-5 * max(scale, 1e-30), equal_nan=True):
                err = float(np.nanmax(np.abs(got.astype(np.float64) - want)))
                return f"buffer {i} differs from the untuned output (max abs error {err:.3g})"
        elif not np.array_equal(got, want):
            return f"buffer {i} differs from the untuned output"
    return None


def verify(measurer: Measurer, reference_mod, candidate_mod, timeout: float = 60.0) -> str | None:
    """None when the candidate computes what the untuned module computes, else why not."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.support.popen_pool import PopenPoolExecutor

    built = measurer.build([reference_mod, candidate_mod])
    try:
        if built[0][0] is None or built[1][0] is None:
            return f"build failed: {_first_line(built[1][1] or built[0][1])}"
        info = [(str(a.dtype), [int(d) for d in a.shape])
                for a in ms.arg_info.ArgInfo.from_prim_func(reference_mod["main"])]
        pool = PopenPoolExecutor(max_workers=1, timeout=timeout)
        try:
            return pool.submit(_verify_worker, built[0][0], built[1][0], info).result()
        except Exception as exc:  # noqa: BLE001 - a crash or a timeout in the worker
            return f"the check run failed: {_first_line(str(exc)) or type(exc).__name__}"
        finally:
            pool.shutdown()
    finally:
        measurer.cleanup(built)
