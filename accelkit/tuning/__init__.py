"""Auto-tuning: `accelkit.compile(model, tune="10m")`, `accelkit tune model.onnx --budget 10m`.

Two searches share one time budget:
- kernel parameters (accelkit.tuning.kernels): every call site of accelkit's kernels, a small
  grid of thread count / work split / loop order, measured interleaved against the untuned call;
- meta-schedule (accelkit.tuning.tir) for the functions TVM generates, against accelkit's default
  schedule, in separate builder/runner processes (crashes and hangs are dropped).

Everything measured goes to the tuning database beside the cache (accelkit.tuning.database) as
it is measured, so Ctrl-C keeps it and the next run continues instead of starting over. A tuned
variant is used only when it is faster than the untuned one by a margin and computes the same
output, so tuning never makes a function slower. Later compiles for the same target apply the
database automatically (`accelkit info` lists what was applied)."""
from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from collections.abc import Callable
from typing import Any

from accelkit.errors import OptionError

__all__ = ["TuneOptions", "TuneReport", "parse_tune", "tune", "applied_tuning"]

logger = logging.getLogger("accelkit.tune")


@dataclasses.dataclass
class TuneOptions:
    """budget: seconds (or "10m", "90s", "1h"); trials: at most this many meta-schedule trials
    (None: as many as the budget allows); rpc_tracker "HOST:PORT" + rpc_key: measure on the
    machines registered with a TVM RPC tracker; kernels / tir: which searches run;
    trials_per_round: candidates per meta-schedule round; runner: a meta-schedule Runner to use
    instead of the default LocalRunner/RPCRunner (advanced); progress: draw the progress bar
    (default: when stderr is a terminal)."""

    budget: float | str = 600.0
    trials: int | None = None
    rpc_tracker: str | None = None
    rpc_key: str | None = None
    kernels: bool = True
    tir: bool = True
    trials_per_round: int = 16
    runner_timeout: float = 30.0
    runner: Any = None
    progress: bool | None = None

    def __post_init__(self):
        from accelkit.bench import parse_duration

        if isinstance(self.budget, str):
            try:
                self.budget = parse_duration(self.budget)
            except ValueError as exc:
                raise OptionError(f"tune budget {self.budget!r}: {exc}") from None
        if not isinstance(self.budget, (int, float)) or isinstance(self.budget, bool) \
                or not math.isfinite(self.budget) or self.budget <= 0:
            raise OptionError(f"tune budget must be a positive duration such as '10m' or 600 "
                              f"(seconds), got {self.budget!r}")
        self.budget = float(self.budget)
        if self.trials is not None and (not isinstance(self.trials, int) or self.trials < 0):
            raise OptionError(f"tune trials must be a non-negative integer, got {self.trials!r}")
        if (self.rpc_tracker is None) != (self.rpc_key is None):
            raise OptionError("rpc_tracker and rpc_key go together: give both (HOST:PORT and the "
                              "key the servers registered with) or neither")
        if self.rpc_tracker is not None:
            self.tracker_address()
        if not isinstance(self.trials_per_round, int) or self.trials_per_round < 1:
            raise OptionError(f"trials_per_round must be a positive integer, got {self.trials_per_round!r}")

    def tracker_address(self) -> tuple[str, int]:
        host, _, port = str(self.rpc_tracker).rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise OptionError(f"rpc_tracker must be HOST:PORT (e.g. 127.0.0.1:9190), got {self.rpc_tracker!r}")
        return host, int(port)


def parse_tune(tune) -> TuneOptions | None:
    """compile()'s tune= argument: None/False, a duration ("10m", seconds), or TuneOptions."""
    if tune is None or tune is False:
        return None
    if isinstance(tune, TuneOptions):
        return tune
    if isinstance(tune, (str, int, float)) and not isinstance(tune, bool):
        return TuneOptions(budget=tune)
    raise OptionError(f"tune must be a duration such as '10m', a number of seconds, or "
                      f"accelkit.TuneOptions(...), got {tune!r}")


# ---- applying the database at compile time -------------------------------------------------

class Applied:
    """The tuning decisions of one target database, as compile applies them."""

    def __init__(self, db, kernels_digest: str):
        decisions = db.decisions()
        self.db = db
        self.digest = db.digest()
        self.tir = {k: v for k, v in decisions["tir"].items() if v.get("use") == "tuned"}
        # entries are per task and kernel library + instruction set ("kernels"): only this one's
        self.kernels = {v.get("task", k): v for k, v in decisions["kernels"].items()
                        if v.get("use") == "tuned" and v.get("kernels") == kernels_digest}

    def apply_kernels(self, mod, applied: dict[str, Any]):
        from tvm import relax

        from accelkit.tuning import kernels as ktune

        if not self.kernels:
            return mod
        table = self.kernels
        sites: dict[str, int] = {}  # tuned task -> call sites configured
        cached = ktune.weights_cached(mod)

        @relax.expr_functor.mutator
        class _Configure(relax.PyExprMutator):
            def visit_call_(self, call):
                call = super().visit_call_(call)
                if getattr(call.op, "name", "") != "relax.call_dps_packed":
                    return call
                kernel = str(call.args[0].global_symbol)
                if kernel not in ktune.KERNELS or len(call.args[1].fields) != ktune.KERNELS[kernel]:
                    return call
                try:
                    key = ktune.task_key(call, cached)
                except (TypeError, AttributeError):
                    return call
                entry = table.get(key)
                if entry is None:
                    return call
                sites[key] = sites.get(key, 0) + 1
                return ktune.with_config(call, entry["config"])

        out = mod.clone()
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function):
                out[gvar] = _Configure().visit_expr(func)
        # one line per tuned task (as the decisions count them), with its call sites
        applied.setdefault("kernels", []).extend(
            f"{table[key]['name']}: {ktune.describe_config(table[key]['config'])} "
            f"({table[key]['default_s'] / table[key]['tuned_s']:.2f}x)" + (f" x{n} calls" if n > 1 else "")
            for key, n in sites.items())
        return out

    def apply_schedules(self, applied: dict[str, Any]):
        import tvm
        from tvm import tirx

        from accelkit.schedules import is_scheduled
        from accelkit.tuning import tir as ttune

        table = self.tir
        db = self.db
        done = applied.setdefault("tir", [])

        @tvm.transform.module_pass(opt_level=0, name="AccelkitApplyTuning")
        def _pass(mod, _ctx):
            if not table:
                return mod
            updates = {}
            ms_db = None
            found: dict[str, Any] = {}  # workload -> its tuned PrimFunc (None: trace not found)
            for gvar, func in mod.functions_items():
                if not isinstance(func, tirx.PrimFunc) or is_scheduled(func):
                    continue
                key = ttune.workload_key(func)
                entry = table.get(key)
                if entry is None:
                    continue
                if key not in found:  # the search once per workload, however many copies
                    ms_db = ms_db or db.ms_database()
                    found[key] = _tuned_func(ms_db, gvar.name_hint, func, entry["candidate"])
                    if found[key] is not None:
                        done.append(f"{gvar.name_hint}: {entry['default_s'] / entry['tuned_s']:.2f}x")
                if found[key] is not None:
                    new = found[key]
                    if func.attrs is not None and "global_symbol" not in func.attrs:
                        new = new.without_attr("global_symbol")
                    updates[gvar] = new
            if updates:
                mod = mod.clone()
                for gvar, func in updates.items():
                    mod[gvar] = func
            return mod

        return _pass


def _tuned_func(ms_db, name: str, func, candidate: str):
    """`func` scheduled by the stored trace whose result is `candidate` (None if none is)."""
    import tvm

    from accelkit.schedules import SCHEDULED_ATTR
    from accelkit.tuning import tir as ttune

    task_mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    for record in ttune.best_records(ms_db, ttune.TirTask(name, "", task_mod), k=16):
        scheduled = ttune.apply_record(task_mod, record)
        if scheduled is not None and ttune.candidate_key(scheduled) == candidate:
            return scheduled["main"].with_attr(SCHEDULED_ATTR, True)
    return None


def applied_tuning(be, target) -> Applied | None:
    """What compile applies for this backend and target (None: nothing tuned)."""
    from accelkit.tuning.database import TuningDB

    if not getattr(be, "tunable", False):
        return None
    db = TuningDB(target)
    if not db.exists() or db.digest() is None:
        return None
    return Applied(db, be.kernels_digest())


# ---- the tuning run ---------------------------------------------------------------------------

@dataclasses.dataclass
class TuneReport:
    budget_s: float
    elapsed_s: float = 0.0
    interrupted: bool = False
    kernel_tasks: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    tir_tasks: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    trials: int = 0          # measured in this run (kernel configs + meta-schedule candidates)
    skipped: int = 0         # candidates measured by an earlier run (not measured again)
    dropped: list[str] = dataclasses.field(default_factory=list)
    database: str = ""

    def format(self) -> str:
        lines = [f"tuned for {self.elapsed_s:.0f} s of a {self.budget_s:.0f} s budget"
                 f"{' (interrupted)' if self.interrupted else ''}: {self.trials} trials measured, "
                 f"{self.skipped} already in the database"]
        for title, rows in (("kernels", self.kernel_tasks), ("TVM-generated functions", self.tir_tasks)):
            if not rows:
                continue
            lines.append(f"  {title}:")
            for r in rows:
                if r.get("default_s") is None:
                    lines.append(f"    {r['name'][:48]:48s} not measured ({r.get('reason', 'no time left')})")
                    continue
                tuned = r.get("tuned_s")
                what = (f"{r['default_s'] * 1e3:8.3f} ms -> {tuned * 1e3:8.3f} ms  "
                        f"{r['default_s'] / tuned:5.2f}x" if r.get("use") == "tuned" and tuned
                        else f"{r['default_s'] * 1e3:8.3f} ms    untuned kept ({r.get('reason', '')})")
                lines.append(f"    {r['name'][:48]:48s} x{r['count']:<3d} {what}")
        if self.dropped:
            lines.append(f"  dropped candidates: {len(self.dropped)} (crashed, hung, failed to build or "
                         f"computed a different output; details with --verbose)")
        lines.append(f"  database: {self.database}")
        return "\n".join(lines)


class _Progress:
    """tasks, trials, elapsed / budget (ETA), and the best estimate so far, on one line."""

    def __init__(self, budget: float, enabled: bool | None):
        self.budget = budget
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def update(self, phase: str, task: str, done: int, total: int, trials: int, saved_ms: float):
        if not self.enabled:
            return
        el = self.elapsed()
        width = 20
        frac = min(el / self.budget, 1.0)
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        sys.stderr.write(f"\r  tune [{bar}] {_mmss(el)}/{_mmss(self.budget)} (ETA {_mmss(max(self.budget - el, 0))})"
                         f"  {phase} {done}/{total} {task[:28]:28s} trials {trials:4d}"
                         f"  saved {saved_ms:7.3f} ms/run   ")
        sys.stderr.flush()

    def close(self):
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _mmss(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60:02d}:{seconds % 60:02d}"


def tune(model, *, backend: str = "cpu", input_shapes=None, options: TuneOptions,
         on_progress: Callable[[str], None] | None = None) -> TuneReport:
    """Search within options.budget; every measurement is stored as it is made. Returns what was
    measured and decided (compile applies the database afterwards)."""
    from accelkit import frontend, threads
    from accelkit.backends import CompileOptions, get_backend
    from accelkit.tuning.database import TuningDB

    progress = _Progress(options.budget, options.progress)
    deadline = progress.start + options.budget
    be = get_backend(backend)
    if not getattr(be, "tunable", False):
        raise OptionError(f"backend '{be.name}' does not support tuning; backends that do: cpu")
    graph = frontend.prepare(model, input_shapes)
    prepared = be.tuning_module(graph, CompileOptions())
    if prepared is None:
        raise OptionError(f"backend '{be.name}' has no default-schedule step to tune")
    target, mod = prepared
    db = TuningDB(target)
    report = TuneReport(budget_s=options.budget, database=db.path)
    from accelkit.tuning import kernels as ktune
    from accelkit.tuning import tir as ttune

    ktasks = ktune.extract(mod, ktune.weights_cached(mod)) if options.kernels else []
    ttasks = ttune.extract(mod) if options.tir else []
    # time kept back for what follows the search (the caller's compile of the tuned model)
    reserve = min(0.1 * options.budget, 30.0)
    with db.lock():
        decisions = db.decisions()
        saved = [0.0]
        try:
            _tune_kernels(be, target, db, ktasks, decisions, options, report, progress,
                          deadline - reserve, saved, threads.pool_size(), ktune.model_bytes(mod))
            _tune_tir(target, db, ttasks, decisions, options, report, progress, deadline - reserve, saved)
        except KeyboardInterrupt:
            report.interrupted = True
        finally:
            progress.close()
            db.save_decisions(decisions)
            report.elapsed_s = progress.elapsed()
    if report.interrupted:
        raise TuneInterrupted(report)
    return report


class TuneInterrupted(KeyboardInterrupt):
    """Ctrl-C during tuning: everything measured so far is in the database (report)."""

    def __init__(self, report: TuneReport):
        super().__init__("tuning interrupted; what was measured is kept in the database")
        self.report = report


def _remote_session(options: TuneOptions, timeout: float):
    from tvm import rpc

    host, port = options.tracker_address()

    def connect():
        return rpc.connect_tracker(host, port).request(options.rpc_key, priority=1, session_timeout=timeout)

    return connect


def _tune_kernels(be, target, db, tasks, decisions, options, report, progress, deadline, saved, pool,
                  model_bytes):
    from accelkit.tuning import kernels as ktune

    if not tasks:
        return
    digest = be.kernels_digest()
    measured = db.kernel_trials(digest)
    # the kernels measure with the model's size, so that they split their work as in the model
    if options.rpc_tracker:
        connect = _remote_session(options, 120)

        def measure(library, inputs, count, **how):
            return ktune.measure_rpc(connect, library, inputs, count, model_bytes=model_bytes, **how)
    else:
        def measure(library, inputs, count, **how):
            return ktune.measure_local(library, inputs, count, model_bytes=model_bytes, **how)
    for n, task in enumerate(tasks):
        progress.update("kernels", task.name, n, len(tasks), report.trials, saved[0] * 1e3)
        done = measured.get(task.key, {})
        row = {"name": task.name, "count": task.count, "kind": "kernel"}
        space = task.configs(pool)
        configs = [c for c in space if c not in done]
        report.skipped += len(space) - len(configs)
        if configs and time.monotonic() < deadline:
            new, wrong = ktune.tune_task(task, target, pool, measure, done)
            for config in wrong:
                report.dropped.append(f"{task.name} config {ktune.describe_config(config)}: different output")
            db.add_kernel_trials([{"task": task.key, "kernels": digest, "config": c, "secs": s}
                                  for c, s in new.items()])
            report.trials += len(new) - (1 if 0 in new and 0 in done else 0)
            done = {**done, **new}
            measured[task.key] = done
        if done.get(0) is None:
            row["reason"] = "no time left" if not done else "untuned call failed"
            report.kernel_tasks.append(row)
            continue
        default = done[0]
        best_config, best = min(((c, s) for c, s in done.items() if s is not None), key=lambda cs: cs[1])
        entry = {"name": task.name, "kernels": digest, "default_s": default, "tuned_s": best,
                 "config": best_config}
        if best_config != 0 and best < default * (1 - ktune.MARGIN):
            entry["use"] = "tuned"
            saved[0] += (default - best) * task.count
        else:
            entry["use"] = "untuned"
            entry["reason"] = "nothing faster by 3%"
        entry["task"] = task.key
        # keyed by library + instruction set too: tuning the AVX2 kernels keeps AVX-512's decisions
        decisions["kernels"][f"{task.key} @{digest}"] = entry
        row.update(entry)
        row["config"] = ktune.describe_config(best_config)
        report.kernel_tasks.append(row)


def _make_runner(options: TuneOptions):
    from tvm.s_tir import meta_schedule as ms

    if options.runner is not None:
        return options.runner
    config = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=40, enable_cpu_cache_flush=False)
    if options.rpc_tracker:
        host, port = options.tracker_address()
        return ms.runner.RPCRunner(
            rpc_config=ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=options.rpc_key,
                                           session_priority=1, session_timeout_sec=int(options.runner_timeout) + 30),
            evaluator_config=config, max_workers=1)
    return ms.runner.LocalRunner(timeout_sec=options.runner_timeout, evaluator_config=config)


def _tune_tir(target, db, tasks, decisions, options, report, progress, deadline, saved):
    from accelkit.tuning import tir as ttune

    if not tasks or time.monotonic() >= deadline:
        for t in tasks:
            report.tir_tasks.append({"name": t.name, "count": t.count, "kind": "tir", "reason": "no time left"})
        return
    logger.info("tune: kernels done at %.1f s", progress.elapsed())
    measurer = ttune.Measurer(target, _make_runner(options))
    ms_db = db.ms_database()
    measured = db.trials()
    # baselines: the default schedule of every task, through the same runner (stored too, so a
    # resumed run does not measure them again)
    todo = [t for t in tasks if decisions["tir"].get(t.workload, {}).get("default_s") is None]
    if todo:
        progress.update("baseline", "", 0, len(tasks), report.trials, saved[0] * 1e3)
        from tvm.s_tir import meta_schedule as ms

        mods = [ttune.default_scheduled(t, target) for t in todo]
        built = measurer.build(mods)
        try:
            timed = measurer.run(built, [ms.arg_info.ArgInfo.from_prim_func(t.mod["main"]) for t in todo])
        finally:
            measurer.cleanup(built)
        for t, (secs, error) in zip(todo, timed):
            decisions["tir"].setdefault(t.workload, {}).update(
                {"name": t.name, "default_s": secs, "use": "untuned"}
                | ({"reason": f"untuned run failed: {error}"} if error else {}))
    for t in tasks:
        t.default_s = decisions["tir"][t.workload].get("default_s")
        good = [r["secs"] for r in measured.get(t.workload, {}).values() if r["secs"] is not None]
        t.best_s = min(good) if good else None
    live = sorted((t for t in tasks if t.default_s is not None), key=lambda t: -t.default_s * t.count)
    total = sum(t.default_s * t.count for t in live) or 1.0
    # tasks under 1% of the generated code's time are not worth a search
    live = [t for t in live if t.default_s * t.count >= 0.01 * total] or live[:1]
    cost = ttune.cost_model()
    per_trial = 2.0  # seconds, refined as rounds complete
    idle_sweeps = 0  # sweeps in which every candidate proposed had been measured before
    while live and time.monotonic() < deadline and idle_sweeps < 3:
        if options.trials is not None and report.trials >= options.trials:
            break
        progressed = False
        for n, task in enumerate(list(live)):
            left = deadline - time.monotonic()
            if left <= per_trial or (options.trials is not None and report.trials >= options.trials):
                break
            size = max(1, min(options.trials_per_round, int(left / per_trial)))
            if options.trials is not None:
                size = max(1, min(size, options.trials - report.trials))
            progress.update("functions", task.name, n, len(live), report.trials, saved[0] * 1e3)
            if task.ctx is None:
                task.ctx = ttune.new_context(task, target, ms_db, cost, trials_per_round=size)
            start = time.monotonic()
            rows, skipped = ttune.search_round(task, measurer, ms_db, measured, cost, target)
            logger.info("tune: %s: round of %d (%d new) in %.1f s", task.name, size, len(rows),
                        time.monotonic() - start)
            db.add_trials(rows)
            report.trials += len(rows)
            report.skipped += skipped
            report.dropped += [f"{task.name} candidate {r['candidate'][:8]}: {r['error']}" for r in rows if r["error"]]
            if rows:
                per_trial = 0.7 * per_trial + 0.3 * (time.monotonic() - start) / len(rows)
                progressed = True
            if task.finished:
                live.remove(task)
        idle_sweeps = 0 if progressed else idle_sweeps + 1
    # decide per task: the fastest verified candidate, if it beats the default by the margin
    logger.info("tune: search ended at %.1f s", progress.elapsed())
    for t in tasks:
        entry = decisions["tir"].get(t.workload)
        row = {"name": t.name, "count": t.count, "kind": "tir"}
        if entry is None or entry.get("default_s") is None:
            row["reason"] = (entry or {}).get("reason", "not measured")
            report.tir_tasks.append(row)
            continue
        _decide(t, entry, measurer, ms_db, target, report)
        if entry.get("use") == "tuned":
            saved[0] += (entry["default_s"] - entry["tuned_s"]) * t.count
        row.update(entry)
        report.tir_tasks.append(row)


def _decide(task, entry, measurer, ms_db, target, report):
    from accelkit.tuning import tir as ttune

    if entry.get("use") == "tuned" and entry.get("verified_best") == task.best_s:
        return  # decided by an earlier run, nothing faster found since
    entry["use"], entry["reason"] = "untuned", "no candidate faster by 3%"
    reference = None
    for record in ttune.best_records(ms_db, task, k=4):
        secs = float(record.run_secs[0])
        if secs >= entry["default_s"] * (1 - ttune.MARGIN):
            break
        candidate = ttune.apply_record(task.mod, record)
        if candidate is None:
            continue
        if reference is None:
            reference = ttune.default_scheduled(task, target)
        problem = ttune.verify(measurer, reference, candidate)
        if problem is not None:
            report.dropped.append(f"{task.name} candidate {ttune.candidate_key(candidate)[:8]}: {problem}")
            logger.info("tune: %s: dropped a candidate: %s", task.name, problem)
            continue
        entry.update({"use": "tuned", "tuned_s": secs, "candidate": ttune.candidate_key(candidate),
                      "verified_best": task.best_s})
        entry.pop("reason", None)
        return
