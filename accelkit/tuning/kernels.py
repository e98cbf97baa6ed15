"""Kernel-parameter search: for each call site of accelkit's kernels (kernel + shapes +
attributes), measure a small grid of tuning configs (threads, work split, loop order: ak_tuning in
kernels/include/ak_kernels.h) against the untuned heuristics, interleaved, on the target (here or
over RPC). A config is kept only when it beats the untuned call by a margin and computes the same
output."""
from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np

# kernel -> argument count without the optional config (the config goes just before `out`)
KERNELS = {"accelkit.cpu.dense": 10, "accelkit.cpu.bmm": 5, "accelkit.cpu.conv2d": 16,
           "accelkit.cpu.conv2d_nhwc": 16, "accelkit.cpu.layer_norm": 4, "accelkit.cpu.rms_norm": 3,
           "accelkit.cpu.softmax": 1,
           "accelkit.cpu.attention": 5}
GEMM_KERNELS = ("accelkit.cpu.dense", "accelkit.cpu.bmm", "accelkit.cpu.conv2d", "accelkit.cpu.conv2d_nhwc")
MARGIN = 0.03  # a config must be this much faster than untuned to be kept (noise on 2 cores)


def pack_config(threads: int = 0, grain: int = 0, order: int = 0, loop: int = 0, kc: int = 0) -> int:
    """One int64 for ak_tuning (kernels/include/ak_kernels.h); kc: 0 (all of K) or 64..1024."""
    code = 0 if not kc else kc.bit_length() - 6  # 64 -> 1, 128 -> 2, ..., 1024 -> 5
    if kc and (kc != 64 << (code - 1) or not 1 <= code <= 5):
        raise ValueError(f"kc must be 0 or a power of two in 64..1024, got {kc}")
    return threads | grain << 8 | order << 16 | loop << 20 | code << 24


def describe_config(config: int) -> str:
    threads, grain, order, loop = (config & 0xFF, (config >> 8) & 0xFF, (config >> 16) & 0xF,
                                   (config >> 20) & 0xF)
    code = (config >> 24) & 0xF
    if config == 0:
        return "untuned"
    parts = [f"threads={threads or 'all'}"]
    if grain:
        parts.append(f"grain={grain}")
    if order:
        parts.append({1: "stream-B", 2: "B-resident"}[order])
    if loop:
        parts.append("panels-inner")
    if code:
        parts.append(f"kc={64 << (code - 1)}")
    return ",".join(parts)


@dataclasses.dataclass
class KernelTask:
    key: str           # kernel + shapes + attributes: shared by every identical call site
    kernel: str
    call: Any          # one relax call_dps_packed (the template the benchmark module rebuilds)
    count: int = 1     # call sites in the model
    name: str = ""

    def configs(self, pool: int) -> list[int]:
        """The search space: untuned first."""
        thread_options = sorted({1, pool} | ({pool // 2} if pool >= 4 else set()))
        out = [0]
        if self.kernel in GEMM_KERNELS:
            dense = self.kernel == "accelkit.cpu.dense"
            conv = self.kernel == "accelkit.cpu.conv2d"
            nhwc = self.kernel == "accelkit.cpu.conv2d_nhwc"
            w_rank = len(self.call.args[1].fields[1].ty.shape)
            depthwise = (conv and _is_depthwise(self.call)) or (nhwc and w_rank == 3)
            if depthwise:
                return out + [pack_config(threads=t) for t in thread_options]
            if nhwc and w_rank == 4:  # Winograd: no K block
                return list(dict.fromkeys(out + [pack_config(threads, grain) for threads in thread_options
                                                 for grain in ((1,) if threads == 1 else (1, 2, 4, 8, 16))]))
            if nhwc:  # the NHWC driver's knobs: threads, work items per thread, K block
                blocks = (0, 256, 512, 1024) if _reduction_length(self) >= 1024 else (0,)
                return list(dict.fromkeys(out + [pack_config(threads, grain, kc=kc) for threads in thread_options
                                                 for grain in ((1,) if threads == 1 else (1, 2, 4, 8, 16))
                                                 for kc in (blocks if grain in (1, 4) else (0,))]))
            k = _reduction_length(self)
            blocks = (0, 256, 512) if k >= 1024 else (0,)  # K blocks only pay for a long K
            for threads in thread_options:
                for grain in (1, 2, 4, 8, 16):
                    if threads == 1 and grain != 1:
                        continue  # one thread: the split only adds overhead
                    orders = (0,) if dense else (1, 2)
                    loops = (0, 1) if dense else (0,)
                    for order in orders:
                        for loop in loops:
                            for kc in blocks if grain in (1, 4) else (0,):
                                out.append(pack_config(threads, grain, order, loop, kc))
        else:  # layer norm / softmax / attention: serial or parallel
            out += [pack_config(threads=t) for t in thread_options]
        return list(dict.fromkeys(out))


def _reduction_length(task: "KernelTask") -> int:
    """K of a GEMM kernel call (dense: x's last dim; bmm: a's; conv: C/groups * KH * KW)."""
    fields = task.call.args[1].fields
    first = [int(d) for d in fields[0].ty.shape]
    if task.kernel == "accelkit.cpu.conv2d":
        w = [int(d) for d in fields[1].ty.shape]
        return w[2] * w[3] * w[4] if len(w) == 6 else w[1] * w[2] * w[3]
    if task.kernel == "accelkit.cpu.conv2d_nhwc":
        w = [int(d) for d in fields[1].ty.shape]
        return w[2] * w[3] * w[4] if len(w) == 6 else (w[2] if len(w) == 4 else w[0] * w[1])
    return first[-1]


def _is_depthwise(call) -> bool:
    x, w = call.args[1].fields[0], call.args[1].fields[1]
    groups = int(call.args[1].fields[4].value)
    xs = [int(d) for d in x.ty.shape]
    ws = [int(d) for d in w.ty.shape]
    return len(ws) == 4 and groups > 1 and groups == xs[1] and ws[1] == 1


def _arg_key(arg) -> str:
    from tvm import tirx

    if isinstance(arg, (tirx.IntImm, tirx.FloatImm)):
        return repr(float(arg.value)) if isinstance(arg, tirx.FloatImm) else str(int(arg.value))
    ty = arg.ty
    return f"{ty.dtype}{[int(d) for d in ty.shape]}"


def kernel_calls(mod) -> list[tuple[Any, Any]]:
    """(binding var, call) of every accelkit kernel call in the module's Relax functions."""
    from tvm import relax

    found = []
    for _, func in mod.functions_items():
        if not isinstance(func, relax.Function):
            continue
        for block in func.body.blocks:
            for binding in block.bindings:
                value = binding.value
                if (isinstance(value, relax.Call) and getattr(value.op, "name", "") == "relax.call_dps_packed"
                        and value.args[0].global_symbol in KERNELS):
                    found.append((binding.var, value))
    return found


def model_bytes(mod) -> int:
    """The model's size as the runner tells it to the kernels: its constants' bytes (the
    manifest's weights_bytes, computed from the same module)."""
    from accelkit.backends.base import constant_bytes

    return constant_bytes(mod)


def weights_cached(mod) -> bool:
    """Whether the dense kernels will run this module's weights as cached (rows split between the
    threads, not weight panels): a dense call's speed, and so its best config, depends on it."""
    from accelkit import kernels as loaded

    return loaded.load().weights_cached(model_bytes(mod))


def task_key(call, cached: bool = False) -> str:
    """Kernel, argument types and attributes, and for a dense call in a model whose weights stay
    cached (`cached`), that: it runs another work split there."""
    kernel = str(call.args[0].global_symbol)
    args = list(call.args[1].fields)[:KERNELS[kernel]]
    out = call.ty
    key = f"{kernel}({', '.join(_arg_key(a) for a in args)}) -> {out.dtype}{[int(d) for d in out.shape]}"
    return key + " weights-cached" if cached and kernel == "accelkit.cpu.dense" else key


def extract(mod, cached: bool = False) -> list[KernelTask]:
    tasks: dict[str, KernelTask] = {}
    for _, call in kernel_calls(mod):
        kernel = str(call.args[0].global_symbol)
        if len(call.args[1].fields) != KERNELS[kernel]:
            continue  # already carries a config
        try:
            key = task_key(call, cached)
        except (TypeError, AttributeError):  # symbolic shapes: nothing to measure ahead of time
            continue
        if key in tasks:
            tasks[key].count += 1
        else:
            name = f"{kernel.rsplit('.', 1)[-1]} {_shape_label(call)}"
            same = sum(t.name.split(" #")[0] == name for t in tasks.values())
            tasks[key] = KernelTask(key, kernel, call, name=f"{name} #{same + 1}" if same else name)
    return list(tasks.values())


def _shape_label(call) -> str:
    first = call.args[1].fields[0].ty
    out = call.ty
    return "x".join(str(int(d)) for d in first.shape) + "->" + "x".join(str(int(d)) for d in out.shape)


def with_config(call, config: int, args=None):
    """The same kernel call (or one with other `args`) with a tuning config argument."""
    import tvm
    from tvm import relax

    args = list(args if args is not None else call.args[1].fields)[:KERNELS[str(call.args[0].global_symbol)]]
    if config:
        args.append(relax.prim_value(tvm.tirx.IntImm("int64", int(config))))
    return relax.call_dps_packed(call.args[0], args, call.ty)


def bench_module(task: KernelTask, configs: list[int]):
    """A Relax module with one function per config, c<i>(activations...) = the kernel call with
    config i; weights and attributes are the model's own constants. Returns (module, input types)."""
    from tvm import relax

    call = task.call
    template = list(call.args[1].fields)[:KERNELS[task.kernel]]
    inputs = [a for a in template if isinstance(a, relax.Var)]
    bb = relax.BlockBuilder()
    for i, config in enumerate(configs):
        params = [relax.Var(f"a{j}", a.ty) for j, a in enumerate(inputs)]
        swap = {a: p for a, p in zip(inputs, params)}
        with bb.function(f"c{i}", params):
            out = bb.emit(with_config(call, config, [swap.get(a, a) for a in template]))
            bb.emit_func_output(out)
    return bb.get(), [(tuple(int(d) for d in a.ty.shape), str(a.ty.dtype)) for a in inputs]


def build(task: KernelTask, configs: list[int], target, directory: str) -> tuple[str, list]:
    from tvm import relax

    mod, inputs = bench_module(task, configs)
    executable = relax.build(mod, target)
    path = os.path.join(directory, "kernel_bench.so")
    executable.export_library(path)
    return path, inputs


def measure_local(library: str, inputs: list, count: int, *, rounds: int = 5, target_ms: float = 40.0,
                  only: list[int] | None = None, model_bytes: int = 0) -> tuple[list[float | None], list[bool]]:
    """Median seconds per config (interleaved rounds, each config timed in every round), and
    whether each config's output equals the untuned one (config 0 = function c0); `only`: time
    just these functions (the others get None). `model_bytes`: the tuned model's size, told to
    the kernels as the runner does, so that they split their work as they will in the model."""
    import tvm
    import tvm_ffi
    from tvm import relax

    from accelkit import kernels as loaded

    loaded.load()
    dev = tvm.cpu(0)
    vm = relax.VirtualMachine(tvm.runtime.load_module(library), dev)
    tvm_ffi.get_global_func("accelkit.cpu.set_model_bytes")(model_bytes)
    return _measure(vm, dev, inputs, count, rounds, target_ms, lambda a: tvm.runtime.tensor(a, dev), only)


def _measure(vm, dev, inputs, count, rounds, target_ms, to_device: Callable, only=None):
    rng = np.random.default_rng(0)
    args = [to_device(rng.standard_normal(shape).astype(dtype)) for shape, dtype in inputs]
    reference = None
    same = []
    for i in range(count):
        out = vm[f"c{i}"](*args).numpy()
        if reference is None:
            reference = out
        same.append(bool(np.allclose(out, reference, rtol=1e-5, atol=1e-5 * (float(np.abs(reference).max()) + 1e-30))))
    once = vm.time_evaluator("c0", dev, number=3, repeat=1)(*args).mean
    number = max(1, int(target_ms / 1000 / max(once, 1e-7)))
    times: list[list[float]] = [[] for _ in range(count)]
    chosen = list(range(count)) if only is None else list(only)
    for r in range(rounds):
        for i in chosen if r % 2 == 0 else reversed(chosen):
            times[i].append(vm.time_evaluator(f"c{i}", dev, number=number, repeat=1)(*args).mean)
    return [float(np.median(t)) if t else None for t in times], same


def measure_rpc(session_factory, library: str, inputs: list, count: int, *, rounds: int = 5,
                target_ms: float = 40.0, only: list[int] | None = None, model_bytes: int = 0):
    """The same on a machine of the RPC tracker (its server must have accelkit's kernels, i.e.
    run `accelkit rpc-server`)."""
    import tvm
    from tvm import relax

    from accelkit.errors import BackendError

    session = session_factory()
    try:
        for kernel in KERNELS:
            session.get_function(kernel)
    except Exception as exc:  # noqa: BLE001 - TVM raises several kinds for a missing function
        raise BackendError("the RPC server does not have accelkit's kernels: start it with "
                           "`accelkit rpc-server`, not tvm.exec.rpc_server") from exc
    session.get_function("accelkit.cpu.set_model_bytes")(model_bytes)
    session.upload(library)
    rlib = session.load_module(os.path.basename(library))
    dev = session.cpu(0)
    vm = relax.VirtualMachine(rlib, dev)
    return _measure(vm, dev, inputs, count, rounds, target_ms, lambda a: tvm.runtime.tensor(a, dev), only)


def tune_task(task: KernelTask, target, pool: int, measure, done: dict[int, float | None]):
    """Measure the configs of `task` not measured before (`done`) with `measure` (measure_local
    or measure_rpc, the model's size bound); returns (new rows {config: secs | None}, configs
    refused for a different output)."""
    configs = [c for c in task.configs(pool) if c not in done]
    if not configs:
        return {}, []
    if 0 not in configs:
        configs = [0] + configs  # the untuned call is the baseline of every interleaved round
    with tempfile.TemporaryDirectory(prefix="accelkit-ktune-") as tmp:
        library, inputs = build(task, configs, target, tmp)
        secs, same = measure(library, inputs, len(configs))
        ok = [i for i, s in enumerate(secs) if s is not None and same[i]]
        best = min(ok, key=lambda i: secs[i]) if ok else 0
        if best != 0 and secs[0] is not None and secs[best] < secs[0] * (1 - MARGIN):
            # a winner out of many noisy timings: time it against untuned again, head to head
            again, _ = measure(library, inputs, len(configs), rounds=9, only=[0, best])
            secs[0], secs[best] = again[0], again[best]
    rows = {}
    wrong = []
    for config, s, ok in zip(configs, secs, same):
        rows[config] = s if ok else None
        if not ok:
            wrong.append(config)
    return rows, wrong
