"""`accelkit bench`: latency statistics of a compiled model, alone or side by side with another
system (onnxruntime, the reference backend, another accelkit backend) in the same run.

Timing rules, learned on 2 shared cores:
- compile (or session creation), the first run and the warm-up stay outside the statistics;
- with a second system, the two are timed in alternating blocks with a pause before each block,
  so that slow drifts of the machine (steal time, clocks) hit both alike and neither system's
  idle thread pool (TVM's and onnxruntime's spin for a while) steals the other's cores;
- the ratio is of medians: other p50 / accelkit p50 (> 1: accelkit is faster).
"""
from __future__ import annotations

import dataclasses
import datetime
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from accelkit.errors import OptionError

SETTLE_S = 0.3  # pause before a timed block when another system's thread pool may be spinning
BLOCK_S = 0.5  # aim for timed blocks of about this long when alternating systems
MIN_RUNS = 3  # a duration-bounded measurement still times at least this many runs


@dataclasses.dataclass
class System:
    """One thing being timed: `run(feeds)` returns the outputs as a list of numpy arrays."""

    name: str
    run: Callable[[Mapping[str, Any]], list]
    setup_s: float  # compile (accelkit) or session creation (onnxruntime), seconds
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    first_run_ms: float | None = None
    times_ms: list[float] = dataclasses.field(default_factory=list)
    outputs: list | None = None
    blocks: list[int] = dataclasses.field(default_factory=list)  # where each timed block starts in times_ms

    def block_medians(self) -> list[float]:
        """The median of each timed block (alternating systems: block i of one ran beside
        block i of the other, under the same disturbance)."""
        import statistics as st

        edges = [*self.blocks, len(self.times_ms)]
        return [st.median(self.times_ms[i:j]) for i, j in zip(edges, edges[1:]) if j > i]


def parse_duration(text: str) -> float:
    """'10s', '500ms', '2m', '1.5' (seconds) -> seconds."""
    value = str(text).strip().lower()
    for suffix, scale in (("ms", 1e-3), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if value.endswith(suffix):
            value, factor = value[: -len(suffix)], scale
            break
    else:
        factor = 1.0
    try:
        seconds = float(value) * factor
    except ValueError:
        seconds = -1.0
    if not math.isfinite(seconds) or seconds <= 0:
        raise OptionError(f"duration {text!r}: expected a positive time such as 10s, 500ms or 2m")
    return seconds


def statistics(times_ms: Sequence[float], batch: int = 1) -> dict[str, float]:
    """p50/p90/p99/mean/min/max/std of per-run latencies (ms), and the throughput they imply."""
    import numpy as np

    t = np.asarray(times_ms, dtype=np.float64)
    if t.size == 0:
        raise ValueError("no timed runs")
    mean = float(t.mean())
    return {
        "runs": int(t.size),
        "p50_ms": float(np.percentile(t, 50)),
        "p90_ms": float(np.percentile(t, 90)),
        "p99_ms": float(np.percentile(t, 99)),
        "mean_ms": mean,
        "min_ms": float(t.min()),
        "max_ms": float(t.max()),
        "std_ms": float(t.std()),
        "inferences_per_s": 1e3 / mean,
        "samples_per_s": 1e3 * batch / mean,
    }


def ratio_interval(a_blocks: Sequence[float], b_blocks: Sequence[float], *, level: float = 0.9,
                   resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """A bootstrap interval (`level`, e.g. 90%) for the median of a_i / b_i over paired blocks
    (System.block_medians of two systems timed alternately). Pairing blocks keeps a disturbance
    that hits both in one stretch out of the ratio; the spread between blocks, not between runs,
    is what a shared machine varies by. An interval that contains 1 says the difference is not
    measurable."""
    import numpy as np

    n = min(len(a_blocks), len(b_blocks))
    if n == 0:
        raise ValueError("no timed blocks")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be between 0 and 1, got {level}")
    ratios = np.asarray(a_blocks[:n], dtype=np.float64) / np.asarray(b_blocks[:n], dtype=np.float64)
    rng = np.random.default_rng(seed)
    medians = np.median(rng.choice(ratios, (resamples, n)), axis=1)
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(medians, [tail, 100 - tail])
    return float(lo), float(hi)


def compare_outputs(actual: Sequence[Any], expected: Sequence[Any], names: Sequence[str]) -> dict[str, Any]:
    """Per output: cosine similarity, max abs error and relative L2 error of `actual` against
    `expected`, plus the worst of each over all outputs."""
    import numpy as np

    per_output = {}
    for name, a, e in zip(names, actual, expected):
        a64 = np.asarray(a, dtype=np.float64).reshape(-1)
        e64 = np.asarray(e, dtype=np.float64).reshape(-1)
        if a64.shape != e64.shape:
            per_output[name] = {"error": f"shape {np.shape(a)} vs {np.shape(e)}"}
            continue
        finite = np.isfinite(a64) & np.isfinite(e64)
        same_nonfinite = bool(np.array_equal(a64[~finite], e64[~finite], equal_nan=True))
        a64, e64 = a64[finite], e64[finite]
        norms = float(np.linalg.norm(a64) * np.linalg.norm(e64))
        if norms > 0:
            cosine = float(np.dot(a64, e64) / norms)
        else:  # both all-zero is a perfect match; one all-zero is not
            cosine = 1.0 if not a64.any() and not e64.any() else 0.0
        diff = a64 - e64
        per_output[name] = {
            "cosine": cosine,
            "max_abs_err": float(np.abs(diff).max()) if diff.size else 0.0,
            "rel_l2": float(np.linalg.norm(diff) / max(float(np.linalg.norm(e64)), 1e-30)),
            "nonfinite_match": same_nonfinite,
        }
    ok = [v for v in per_output.values() if "error" not in v]
    return {
        "outputs": per_output,
        "min_cosine": min((v["cosine"] for v in ok), default=float("nan")),
        "max_abs_err": max((v["max_abs_err"] for v in ok), default=float("nan")),
        "max_rel_l2": max((v["rel_l2"] for v in ok), default=float("nan")),
        "all_compared": len(ok) == len(per_output) and all(v["nonfinite_match"] for v in ok),
    }


def random_feeds(inputs, index_bounds: Mapping[str, int] | None = None, seed: int = 0) -> dict[str, Any]:
    """Inputs of the right shapes and dtypes: standard normal floats; integers that index a table
    (token ids) uniform over its valid range; other integers (masks) ones; bools True."""
    import numpy as np

    rng = np.random.default_rng(seed)
    bounds = index_bounds or {}
    feeds = {}
    for spec in inputs:
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(spec.shape).astype(dtype)
        elif dtype.kind in "iu" and spec.name in bounds:
            feeds[spec.name] = rng.integers(0, bounds[spec.name], spec.shape).astype(dtype)
        else:
            feeds[spec.name] = np.ones(spec.shape, dtype)
    return feeds


class Progress:
    """A one-line progress bar on stderr (only when stderr is a terminal, unless forced)."""

    def __init__(self, total_s: float | None, total_runs: int | None, enabled: bool | None = None):
        self.total_s, self.total_runs = total_s, total_runs
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.start = time.perf_counter()
        self._last = 0.0

    def update(self, runs: int, label: str, median_ms: Callable[[], float] | None = None,
               force: bool = False):
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        elapsed = now - self.start
        if self.total_runs:
            frac = min(runs / self.total_runs, 1.0)
            tail = f"{runs}/{self.total_runs} runs"
        else:
            frac = min(elapsed / self.total_s, 1.0) if self.total_s else 0.0
            tail = f"{runs} runs"
        width = 28
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        med = f"  p50 {median_ms():.2f} ms" if median_ms is not None else ""
        sys.stderr.write(f"\r  {label[:24]:24s} [{bar}] {frac * 100:3.0f}%  {tail}  {elapsed:5.1f} s{med}   ")
        sys.stderr.flush()

    def close(self):
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _first_and_warmup(system: System, feeds, warmup: int) -> None:
    start = time.perf_counter()
    system.outputs = system.run(feeds)
    system.first_run_ms = (time.perf_counter() - start) * 1e3
    for _ in range(warmup):
        system.run(feeds)


def measure(systems: Sequence[System], feeds, *, runs: int | None = None, duration_s: float | None = None,
            warmup: int = 3, progress: Progress | None = None, settle_s: float = SETTLE_S) -> None:
    """Time each system's `run(feeds)` into `system.times_ms`: `runs` timed runs each, or until
    `duration_s` of timed running has passed (at least MIN_RUNS each). Several systems are timed
    in alternating blocks, each block after a pause, in A B B A order; their first run and
    warm-up come first."""
    import statistics as st

    if (runs is None) == (duration_s is None):
        raise OptionError("give either runs or a duration, not both")
    if runs is not None and runs < 1:
        raise OptionError(f"runs must be at least 1, got {runs}")
    if warmup < 0:
        raise OptionError(f"warmup must be 0 or more, got {warmup}")
    for system in systems:
        if len(systems) > 1:
            time.sleep(settle_s)
        _first_and_warmup(system, feeds, warmup)
    alone = len(systems) == 1
    # alternating: blocks of about BLOCK_S, sized from the median so far (the first block is
    # one run); alone: one block
    per_block = {id(s): 1 for s in systems}
    timed_s = {id(s): 0.0 for s in systems}
    share = (duration_s / len(systems)) if duration_s is not None else None

    def done(system: System) -> bool:
        n = len(system.times_ms)
        if runs is not None:
            return n >= runs
        return n >= MIN_RUNS and timed_s[id(system)] >= share

    rounds = 0
    while not all(done(s) for s in systems):
        # A B, then B A: whichever runs second in a round is not always the same system
        order = systems if rounds % 2 == 0 else list(reversed(systems))
        rounds += 1
        for system in order:
            if done(system):
                continue
            if not alone:
                time.sleep(settle_s)
                system.run(feeds)  # wake its thread pool back up after the pause
            count = per_block[id(system)] if not alone else (runs or 1 << 62)
            system.blocks.append(len(system.times_ms))
            for _ in range(count):
                start = time.perf_counter()
                system.run(feeds)
                elapsed = time.perf_counter() - start
                system.times_ms.append(elapsed * 1e3)
                timed_s[id(system)] += elapsed
                if progress is not None:
                    progress.update(sum(len(s.times_ms) for s in systems), system.name,
                                    lambda s=system: st.median(s.times_ms))
                if done(system):
                    break
            if not alone:
                median_s = st.median(system.times_ms) / 1e3
                per_block[id(system)] = max(1, min(200, int(BLOCK_S / max(median_s, 1e-6))))
    if progress is not None:
        progress.update(sum(len(s.times_ms) for s in systems), "done", force=True)
        progress.close()


def _batch(inputs) -> int:
    for spec in inputs:
        if len(spec.shape) >= 1 and spec.shape[0] > 0:
            return int(spec.shape[0])
    return 1


def machine_info() -> dict[str, Any]:
    import numpy as np

    from accelkit import __version__, threads

    info: dict[str, Any] = {
        "platform": platform.platform(), "python": platform.python_version(),
        "cpu": _cpu_name(), "cores": os.cpu_count(), "threads": threads.pool_size(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "accelkit": __version__, "numpy": np.__version__,
    }
    try:
        import tvm

        from accelkit.backends import host_cpu

        info["tvm"] = tvm.__version__
        info["llvm_cpu"] = host_cpu()
    except Exception:  # noqa: BLE001 - informational only
        pass
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _onnxruntime_system(model_path: str) -> System:
    try:
        import onnxruntime as ort
    except ImportError:
        raise OptionError("--vs onnxruntime needs onnxruntime: pip install onnxruntime "
                          "(or pip install 'accelkit[test]')") from None
    from accelkit import threads

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads.pool_size()
    start = time.perf_counter()
    try:
        session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
        raise OptionError(f"onnxruntime cannot load {model_path!r} to compare with: {exc}") from exc
    setup_s = time.perf_counter() - start
    names = [o.name for o in session.get_outputs()]
    return System("onnxruntime", lambda feeds: session.run(names, dict(feeds)), setup_s,
                  {"version": ort.__version__, "intra_op_threads": options.intra_op_num_threads,
                   "providers": session.get_providers()})


def _accelkit_system(model, *, backend: str, precision: str, input_shapes, cache: bool) -> tuple[System, Any]:
    import accelkit

    start = time.perf_counter()
    if isinstance(model, str) and model.endswith(".akx"):
        compiled = accelkit.load(model)
        status = "loaded artifact"
    else:
        compiled = accelkit.compile(model, backend=backend, precision=precision,
                                    input_shapes=input_shapes, cache=cache)
        status = compiled.cache_status
    setup_s = time.perf_counter() - start
    info = {"backend": compiled.backend, "precision": compiled.precision, "cache": status,
            "target": compiled.manifest.get("target"), "offloaded": compiled.manifest.get("offloaded")}
    return System(f"accelkit[{compiled.backend}]", compiled.run, setup_s, info), compiled


def bench(model: str, *, backend: str = "cpu", precision: str = "fp32", input_shapes=None,
          feeds: Mapping[str, Any] | None = None, runs: int | None = None, duration_s: float | None = None,
          warmup: int = 3, vs: str | None = None, cache: bool = True, progress: bool | None = None) -> dict[str, Any]:
    """Benchmark `model` (an .onnx path, or an .akx artifact when vs is None) and return the
    result record (what `accelkit bench --json` writes). See the module docstring."""
    if runs is None and duration_s is None:
        duration_s = 10.0
    is_artifact = isinstance(model, str) and model.endswith(".akx")
    if vs is not None and is_artifact:
        raise OptionError(f"--vs {vs} needs the ONNX model to build the other system from; "
                          f"pass the .onnx file instead of the artifact {model!r}")
    if isinstance(model, str) and not os.path.exists(model):
        raise OptionError(f"model file {model!r} does not exist")
    if vs is not None and vs != "onnxruntime":
        from accelkit.backends import get_backend

        get_backend(vs)  # an unknown name fails now, not after compiling the model
    main, compiled = _accelkit_system(model, backend=backend, precision=precision,
                                      input_shapes=input_shapes, cache=cache)
    systems = [main]
    if vs is not None:
        if vs == "onnxruntime":
            systems.append(_onnxruntime_system(model))
        else:
            other, _ = _accelkit_system(model, backend=vs, precision="fp32", input_shapes=input_shapes,
                                        cache=cache)
            if other.name == main.name:
                other.name += " (2)"
            systems.append(other)
    if feeds is None:
        feeds = random_feeds(compiled.inputs, compiled.manifest.get("index_bounds"))
    else:
        compiled._check_feeds(feeds)  # a wrong feed fails here, with accelkit's message
    bar = Progress(duration_s, runs * len(systems) if runs else None, progress)
    measure(systems, feeds, runs=runs, duration_s=duration_s, warmup=warmup, progress=bar)

    batch = _batch(compiled.inputs)
    record: dict[str, Any] = {
        "model": os.path.basename(model) if isinstance(model, str) else "model",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "settings": {"backend": backend, "precision": precision, "runs": runs, "duration_s": duration_s,
                     "warmup": warmup, "vs": vs, "batch": batch,
                     "inputs": {s.name: f"{s.dtype}{list(s.shape)}" for s in compiled.inputs}},
        "systems": [],
    }
    for system in systems:
        record["systems"].append({
            "name": system.name, "setup_s": system.setup_s, "first_run_ms": system.first_run_ms,
            **system.info, "stats": statistics(system.times_ms, batch), "times_ms": system.times_ms,
        })
    if len(systems) == 2:
        ours, theirs = record["systems"]
        names = [s.name for s in compiled.outputs]
        record["comparison"] = {
            "baseline": systems[1].name,
            # > 1: accelkit is faster than the other system
            "ratio_p50": theirs["stats"]["p50_ms"] / ours["stats"]["p50_ms"],
            "ratio_mean": theirs["stats"]["mean_ms"] / ours["stats"]["mean_ms"],
            "accuracy": compare_outputs(systems[0].outputs, systems[1].outputs, names),
        }
    return record


def format_record(record: dict[str, Any]) -> str:
    """The table `accelkit bench` prints."""
    lines = []
    s = record["settings"]
    m = record["machine"]
    lines.append(f"{record['model']}  inputs {', '.join(f'{k}: {v}' for k, v in s['inputs'].items())}")
    lines.append(f"machine: {m['cpu']}, {m['threads']} thread(s), load {m['load_average'][0]:.2f}")
    head = f"{'':22s} {'p50':>9s} {'p90':>9s} {'p99':>9s} {'mean':>9s} {'min':>9s} {'runs':>6s} {'inf/s':>9s}   {'setup':>8s} {'1st run':>9s}"
    lines.append(head)
    for sys_ in record["systems"]:
        st = sys_["stats"]
        lines.append(f"{sys_['name'][:22]:22s} {st['p50_ms']:7.3f}ms {st['p90_ms']:7.3f}ms {st['p99_ms']:7.3f}ms "
                     f"{st['mean_ms']:7.3f}ms {st['min_ms']:7.3f}ms {st['runs']:6d} {st['inferences_per_s']:9.1f}   "
                     f"{sys_['setup_s']:7.2f}s {sys_['first_run_ms']:7.2f}ms")
    ours = record["systems"][0]
    if "cache" in ours:
        lines.append(f"setup = compile ({ours['cache']}) or session creation; batch {s['batch']}: "
                     f"{ours['stats']['samples_per_s']:.1f} samples/s")
    comp = record.get("comparison")
    if comp:
        acc = comp["accuracy"]
        faster = "faster" if comp["ratio_p50"] >= 1 else "slower"
        factor = comp["ratio_p50"] if comp["ratio_p50"] >= 1 else 1 / comp["ratio_p50"]
        lines.append(f"ratio (p50 {comp['baseline']} / p50 accelkit): {comp['ratio_p50']:.3f}  "
                     f"-> accelkit is {factor:.2f}x {faster}")
        lines.append(f"accuracy vs {comp['baseline']}: min cosine {acc['min_cosine']:.7f}, "
                     f"max abs err {acc['max_abs_err']:.3g}, max rel L2 {acc['max_rel_l2']:.3g}")
        for name, o in acc["outputs"].items():
            if "error" in o:
                lines.append(f"  {name}: not compared ({o['error']})")
            elif len(acc["outputs"]) > 1:
                lines.append(f"  {name}: cosine {o['cosine']:.7f}, max abs err {o['max_abs_err']:.3g}, "
                             f"rel L2 {o['rel_l2']:.3g}")
    return "\n".join(lines)


def plot(record: dict[str, Any], path: str) -> str:
    """A PNG: per-run latency of each system over the run (left) and their distributions (right),
    titled with the ratio and the accuracy."""
    try:
        import matplotlib
    except ImportError:
        raise OptionError("--plot needs matplotlib: pip install matplotlib "
                          "(or pip install 'accelkit[plot]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = record["systems"]
    colors = ["#1f77b4", "#d62728", "#2ca02c"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    for i, sys_ in enumerate(systems):
        left.plot(range(1, len(sys_["times_ms"]) + 1), sys_["times_ms"], ".", ms=3,
                  color=colors[i % 3], label=f"{sys_['name']} (p50 {sys_['stats']['p50_ms']:.2f} ms)")
        left.axhline(sys_["stats"]["p50_ms"], color=colors[i % 3], lw=1, ls="--")
    # scale to the bulk of the runs: one descheduled run must not flatten the picture
    top = 1.3 * max(s["stats"]["p99_ms"] for s in systems)
    clipped = sum(t > top for s in systems for t in s["times_ms"])
    left.set_xlabel("timed run" + (f"  ({clipped} run(s) above {top:.3g} ms not shown)" if clipped else ""))
    left.set_ylabel("latency (ms)")
    left.set_ylim(0, top)
    left.legend(loc="upper right", fontsize=8)
    left.grid(alpha=0.3)
    right.boxplot([s["times_ms"] for s in systems], showfliers=False, whis=(1, 99))
    right.set_xticks(range(1, len(systems) + 1),
                     [f"{s['name']}\n{s['stats']['runs']} runs" for s in systems], fontsize=8)
    right.set_ylabel("latency (ms): box p25-p75, whiskers p1-p99")
    right.set_ylim(0, top)
    right.grid(alpha=0.3, axis="y")
    title = f"{record['model']} — {record['machine']['threads']} thread(s), {record['date'][:10]}"
    comp = record.get("comparison")
    if comp:
        title += (f"\nratio {comp['baseline']}/accelkit (p50) = {comp['ratio_p50']:.2f};  "
                  f"min cosine {comp['accuracy']['min_cosine']:.6f}, "
                  f"max abs err {comp['accuracy']['max_abs_err']:.2g}")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
