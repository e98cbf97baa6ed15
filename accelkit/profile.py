"""`accelkit profile`: where a model's time goes, per kernel and per TVM-generated function.

TVM 0.26 removed the Relax VM's profiler, so accelkit instruments the VM itself: the model is
compiled in the VM's bytecode mode (the default "compiled" mode is native code with nothing to
hook), and `VirtualMachine.set_instrument` times every call the VM makes. Each call is one of:
- **kernel**: one of the backend's own kernels (`accelkit.cpu.conv2d`, ...), keyed by the
  shapes of its tensor arguments, because one kernel serves many layers;
- **generated**: a function TVM generated (and scheduled) for the rest of the graph;
- **runtime**: the VM's builtins (memory allocation, shape checks, tuple handling).
What no call accounts for is **overhead**: the VM's dispatch, accelkit's feed checks and the
copies of inputs and outputs, and the instrumentation itself. The four shares sum to 100% of
the instrumented run's wall time; the uninstrumented latency is reported beside it.
"""
from __future__ import annotations

import collections
import datetime
import json
import os
import statistics
import time
from collections.abc import Mapping
from typing import Any

from accelkit.errors import OptionError

CATEGORIES = ("kernel", "generated", "runtime", "overhead")
_RUNTIME_PREFIXES = ("vm.builtin.", "vm.", "runtime.", "relax.", "ffi.", "tvm.")


def category(symbol: str, kernels: frozenset[str]) -> str:
    if symbol in kernels or symbol.startswith("accelkit."):
        return "kernel"
    if symbol.startswith(_RUNTIME_PREFIXES):
        return "runtime"
    return "generated"


def _shape_key(args) -> str:
    import tvm

    shapes = [list(a.shape) for a in args if isinstance(a, tvm.runtime.Tensor)]
    return " ".join(f"{s}".replace(" ", "") for s in shapes[:3])


def profile(model, *, backend: str = "cpu", precision: str = "fp32", input_shapes=None, feeds: Mapping[str, Any] | None = None,
            runs: int = 10, warmup: int = 3, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Compile `model` (an ONNX path, bytes or ModelProto) for profiling and time every VM call
    over `runs` runs. Returns the record `accelkit profile --json` writes: per-function rows
    (sorted, slowest first), the share of each category, and one run's trace events."""
    from accelkit.backends import CompileOptions, TVMBackend, get_backend
    from accelkit.bench import random_feeds
    from accelkit.compiler import _build

    if isinstance(model, str) and model.endswith(".akx"):
        raise OptionError(f"{model!r} is an artifact: its code is compiled natively and cannot be "
                          f"instrumented; profile the ONNX model it was built from")
    if runs < 1 or warmup < 0:
        raise OptionError(f"profile needs runs >= 1 and warmup >= 0 (got runs={runs}, warmup={warmup})")
    be = get_backend(backend)
    if not isinstance(be, TVMBackend):
        raise OptionError(f"backend '{backend}' does not run through TVM's VM, so it cannot be profiled; "
                          f"profile a TVM backend such as 'cpu'")
    if precision not in be.precisions:
        raise OptionError(f"backend '{backend}' does not support precision {precision!r}; "
                          f"it supports {', '.join(be.precisions)}")
    start = time.perf_counter()
    unknown = sorted(set(options or {}) - set(be.options))
    if unknown:
        raise OptionError(f"unknown option(s) {', '.join(unknown)} for backend '{backend}'; its options "
                          f"are: {', '.join(sorted(be.options)) or 'none'}")
    compile_options = CompileOptions(precision=precision, exec_mode="bytecode", extra=dict(options or {}))
    compiled = _build(model, input_shapes, be, compile_options, status="off")
    compile_s = time.perf_counter() - start
    vm = getattr(compiled._runner, "vm", None)
    if vm is None:
        raise OptionError(f"backend '{backend}' does not expose its VM to instrument")
    kernels = frozenset(compiled.manifest.get("kernels", []))
    if feeds is None:
        feeds = random_feeds(compiled.inputs, compiled.manifest.get("index_bounds"))

    for _ in range(max(warmup, 1)):
        compiled.run(feeds)
    plain = []
    for _ in range(runs):
        t0 = time.perf_counter()
        compiled.run(feeds)
        plain.append(time.perf_counter() - t0)

    per_call: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    stack: list[tuple[str, float, str]] = []
    trace: list[tuple[str, str, float, float]] = []
    state = {"record": False}

    def instrument(func, symbol, before, ret, *args):
        now = time.perf_counter()
        if before:
            key = _shape_key(args) if symbol in kernels or symbol.startswith("accelkit.") else ""
            stack.append((symbol, now, key))
        else:
            symbol, began, key = stack.pop()
            per_call[(symbol, key)].append(now - began)
            if state["record"]:
                trace.append((symbol, key, began, now))
        return 0

    walls = []
    vm.set_instrument(instrument)
    try:
        for i in range(runs):
            state["record"] = i == runs - 1
            t0 = time.perf_counter()
            compiled.run(feeds)
            t1 = time.perf_counter()
            walls.append(t1 - t0)
            if state["record"]:
                trace_wall = (t0, t1)
    finally:
        vm.set_instrument(None)

    wall = sum(walls) / runs
    rows = []
    for (symbol, key), times in per_call.items():
        rows.append({"name": symbol, "shapes": key, "category": category(symbol, kernels),
                     "calls_per_run": len(times) / runs, "ms_per_run": sum(times) / runs * 1e3,
                     "share": sum(times) / runs / wall})
    rows.sort(key=lambda r: -r["ms_per_run"])
    shares = {c: 0.0 for c in CATEGORIES}
    for row in rows:
        shares[row["category"]] += row["share"]
    shares["overhead"] = max(0.0, 1.0 - sum(shares.values()))
    events = [{"name": "model.run", "cat": "run", "ph": "X", "pid": 1, "tid": 1,
               "ts": 0.0, "dur": (trace_wall[1] - trace_wall[0]) * 1e6}]
    for symbol, key, began, ended in trace:
        events.append({"name": symbol, "cat": category(symbol, kernels), "ph": "X", "pid": 1, "tid": 1,
                       "ts": (began - trace_wall[0]) * 1e6, "dur": (ended - began) * 1e6,
                       "args": {"shapes": key} if key else {}})
    return {
        "model": os.path.basename(model) if isinstance(model, str) else "model",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backend": compiled.backend, "target": compiled.manifest.get("target"),
        "target_short": " ".join(f"{k}={v}" if k != "kind" else str(v) for k, v in
                                 compiled.manifest.get("target_config", {}).items()
                                 if k in ("kind", "mcpu", "num-cores")),
        "compile_s": compile_s, "runs": runs,
        "latency_ms": statistics.median(plain) * 1e3,
        "instrumented_ms": wall * 1e3,
        "calls_per_run": sum(len(v) for v in per_call.values()) / runs,
        "shares": shares,
        "rows": rows,
        "trace_events": events,
    }


def write_trace(record: dict[str, Any], path: str) -> str:
    """Chrome trace JSON (chrome://tracing, https://ui.perfetto.dev) of the last profiled run."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"traceEvents": record["trace_events"], "displayTimeUnit": "ms",
                   "otherData": {"model": record["model"], "backend": record["backend"],
                                 "target": record["target"]}}, f)
    return path


def format_record(record: dict[str, Any], top: int = 25) -> str:
    s = record["shares"]
    lines = [
        f"{record['model']} on {record['backend']} ({record['target_short']}): {record['latency_ms']:.3f} ms per run "
        f"(median of {record['runs']}); instrumented {record['instrumented_ms']:.3f} ms, "
        f"{record['calls_per_run']:.0f} calls per run",
        "share of the instrumented run: " + ", ".join(
            f"{name} {s[key] * 100:.1f}%" for key, name in
            (("kernel", "accelkit kernels"), ("generated", "TVM-generated"), ("runtime", "VM builtins"),
             ("overhead", "overhead (VM dispatch, feeds and copies, instrumentation)"))),
        f"{'ms/run':>9s} {'share':>6s} {'calls':>5s}  {'category':9s} function",
    ]
    for row in record["rows"][:top]:
        shapes = f"  {row['shapes']}" if row["shapes"] else ""
        lines.append(f"{row['ms_per_run']:9.3f} {row['share'] * 100:5.1f}% {row['calls_per_run']:5.0f}  "
                     f"{row['category']:9s} {row['name']}{shapes}")
    rest = record["rows"][top:]
    if rest:
        lines.append(f"{sum(r['ms_per_run'] for r in rest):9.3f} {sum(r['share'] for r in rest) * 100:5.1f}% "
                     f"{sum(r['calls_per_run'] for r in rest):5.0f}  ({len(rest)} more functions)")
    return "\n".join(lines)
