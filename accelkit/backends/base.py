"""The Backend contract a hardware vendor implements, and TVMBackend, the shared ONNX -> Relax ->
partition -> lower -> export pipeline that a TVM-based backend gets by filling in a few methods."""
from __future__ import annotations

import abc
import dataclasses
import functools
import os
import platform
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:  # heavy imports stay out of `import accelkit`
    import numpy as np
    import tvm

    from accelkit.frontend import Graph

__all__ = ["Backend", "TVMBackend", "KernelPattern", "Runner", "CompileOptions", "host_cpu",
           "host_target", "tensor_type"]

_TRIPLES = {"x86_64": "x86_64-linux-gnu", "amd64": "x86_64-linux-gnu",
            "aarch64": "aarch64-linux-gnu", "arm64": "aarch64-linux-gnu"}


@functools.cache
def host_cpu() -> str:
    """LLVM's name for this CPU (e.g. 'znver4'). `mcpu=native` is not used: with the TVM wheel's
    default triple it silently means 'generic' (no AVX-512)."""
    import tvm

    return str(tvm.target.codegen.llvm_get_system_cpu())


def host_target(num_cores: int | None = None):
    """The TVM llvm target for this machine's CPU."""
    import tvm

    config = {"kind": "llvm", "mcpu": host_cpu(), "num-cores": num_cores or os.cpu_count() or 1}
    triple = _TRIPLES.get(platform.machine().lower())
    if triple:
        config["mtriple"] = triple
    return tvm.target.Target(config)


def tensor_type(expr) -> tuple[str | None, tuple[int, ...] | None]:
    """(dtype, static shape or None) of a matched Relax expression, for KernelPattern.check."""
    ty = expr.ty
    shape = getattr(ty, "shape", None)
    try:
        dims = tuple(int(d) for d in shape) if shape is not None else None
    except TypeError:  # symbolic dims
        dims = None
    return getattr(ty, "dtype", None), dims


def constant_bytes(mod) -> int:
    """The bytes of a module's constants (its weights). The runner tells the kernels this size
    (ak_set_model_bytes: a model that stays in the last-level cache gets another dense work
    split), and kernel tuning measures with it and keys by it: one number for both."""
    import numpy as np
    import tvm
    from tvm import relax

    total = [0]

    def visit(expr):
        data = expr.value if isinstance(expr, tvm.ir.expr.Constant) else None
        if isinstance(data, tvm.runtime.Tensor):  # (a scalar constant holds a Python number)
            total[0] += int(np.prod(data.shape, dtype=np.int64)) * np.dtype(str(data.dtype)).itemsize

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return total[0]


@dataclasses.dataclass(frozen=True)
class CompileOptions:
    """What the user asked of one compilation (validated before a backend sees it)."""

    precision: str = "fp32"
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # backend-specific options
    # how TVM's Relax VM runs the model: "compiled" (native code, the fast default) or
    # "bytecode" (interpreted, so `accelkit profile` can time every call; never cached)
    exec_mode: str = "compiled"
    # the tuning records to apply (accelkit.tuning.Applied; the cache key holds its digest)
    tuning: Any = dataclasses.field(default=None, compare=False)
    # dense layers kept in fp32 in a reduced-precision build (accelkit.accuracy.weight_digest of
    # their weights): what compile(accuracy=) chose
    keep_fp32: frozenset = frozenset()
    # int8 layers' calibrated input ranges: ((weight digest, lo, hi), ...), from
    # accelkit.accuracy.activation_ranges; a layer not listed quantizes each row with its own range
    act_ranges: tuple = ()
    # how int8 layers get input ranges ("dynamic", "auto", "minmax", "percentile", "entropy"):
    # compile fills act_ranges from it (the cache key holds it, and the calibration digest)
    calibration_method: str = "dynamic"


@dataclasses.dataclass(frozen=True)
class KernelPattern:
    """A subgraph a backend takes into one of its own kernels.

    `pattern` is a tvm.relax.dpl pattern; `args` are nodes of it whose matched expressions are
    passed, in order, to `kernel`: a TVM-FFI global function in destination-passing style,
    called as kernel(*args, out). `check(matches)` may refuse a match (unsupported dtype or
    shape), which then stays with TVM-generated code. Instead of `args`, `build(matches)` may
    return the whole argument list (Relax expressions: matched ones, new constants such as
    packed weights, `relax.prim_value` attributes), or None to refuse the match. `requires`
    (optional) names Relax ops every match contains; a function without one of them is not
    searched for this pattern (each search walks the whole function).
    """

    name: str
    pattern: Any
    args: Sequence[Any]
    kernel: str
    check: Callable[[dict], bool] | None = None
    build: Callable[[dict], list | None] | None = None
    requires: frozenset[str] = frozenset()  # op names any match contains: skipped when absent


class Runner(Protocol):
    """A loaded executable: numpy inputs in graph input order -> outputs in graph output order."""

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]: ...


class Backend(abc.ABC):
    """One backend = one class. `compile` writes the executable's files into a directory and
    returns manifest entries; `load` turns such a directory back into a Runner. Both sides of
    save/load go through these two methods, so a saved artifact runs exactly what compile built."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    precisions: ClassVar[tuple[str, ...]] = ("fp32",)
    options: ClassVar[dict[str, str]] = {}  # backend-specific compile options: name -> help

    def is_available(self) -> bool:
        """Whether the device/driver this backend needs is present."""
        return True

    def fingerprint(self) -> str:
        """Versions of everything that changes the generated code (part of the cache key)."""
        return self.name

    @abc.abstractmethod
    def compile(self, graph: Graph, options: CompileOptions, out_dir: str) -> dict[str, Any]:
        """Build `graph` into files under `out_dir`; return manifest entries (JSON-able)."""

    @abc.abstractmethod
    def load(self, directory: str, manifest: dict[str, Any]) -> Runner:
        """Load what `compile` wrote into `directory` (files already verified)."""

    def check_artifact(self, manifest: dict[str, Any]) -> str | None:
        """Why an artifact built by this backend cannot run here (None when it can)."""
        return None


class TVMBackend(Backend):
    """A backend that compiles through TVM Relax: patterns go to the backend's kernels, the rest
    is lowered by TVM for `target()`. A vendor overrides target/patterns/load_kernels (and
    passes, for its own schedules)."""

    library_name: ClassVar[str] = "model.so"
    tunable: ClassVar[bool] = True  # `accelkit tune` searches its generated code (and kernels)

    @abc.abstractmethod
    def target(self, options: CompileOptions) -> tvm.target.Target:
        """The TVM target code is generated for."""

    def device(self) -> tvm.runtime.Device:
        import tvm

        return tvm.cpu(0)

    def patterns(self) -> list[KernelPattern]:
        """Subgraphs this backend runs in its own kernels (tried in order)."""
        return []

    def patterns_for(self, options: CompileOptions) -> list[KernelPattern]:
        """The patterns of one compile; a backend whose options change them overrides this."""
        return self.patterns()

    def prepare(self, mod: tvm.IRModule, options: CompileOptions) -> tvm.IRModule:
        """Graph rewrites before the patterns are matched (e.g. a layout change); none here."""
        return mod

    def after_offload(self, mod: tvm.IRModule, options: CompileOptions) -> tuple[tvm.IRModule, dict[str, Any]]:
        """Rewrites of the module with its kernel calls in place (e.g. calls that pass each
        other a narrower type) -> (module, manifest entries that describe them); none here."""
        return mod, {}

    def load_kernels(self) -> None:
        """Register this backend's kernels (TVM-FFI global functions) in the current process."""

    def kernels_digest(self) -> str:
        """Identity of the kernel library (kernel tuning records are only reused with it)."""
        return ""

    def passes(self, target: tvm.target.Target) -> list[tvm.transform.Pass]:
        """Relax passes lowering what the patterns left to TVM-generated code: TVM's CPU pipeline
        plus accelkit's default schedules (parallel + vectorised loops) after fusion."""
        from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

        from accelkit.schedules import default_schedule

        return (
            cpu_generic.library_dispatch_passes(target)
            + cpu_generic.legalize_passes(target)
            + [default_schedule(target)]
            + cpu_generic.dataflow_lower_passes(target)
            + cpu_generic.finalize_passes(target)
        )

    def fingerprint(self) -> str:
        import tvm
        import tvm_ffi

        target = self.target(CompileOptions())
        return f"{self.name};tvm={tvm.__version__};tvm_ffi={tvm_ffi.__version__};target={target}"

    def check_artifact(self, manifest: dict[str, Any]) -> str | None:
        # generated code is specialised to the target (CPU model, ISA): only run it on that target
        here = _target_config(self.target(CompileOptions()))
        built = manifest.get("target_config", {})
        for key in ("kind", "mtriple", "mcpu", "mattr"):
            if built.get(key) != here.get(key):
                return (f"it was compiled for target {key}={built.get(key)!r} but this machine "
                        f"needs {key}={here.get(key)!r} (its code may not run here)")
        return None

    def _offloaded(self, graph: Graph, options: CompileOptions):
        """(target, Relax module with the patterns' subgraphs in kernel calls, offload counts,
        after_offload's manifest entries)."""
        from accelkit import frontend
        from accelkit.guards import clip_take_indices
        from accelkit.partition import offload

        target = self.target(options)
        mod = self.prepare(clip_take_indices(frontend.to_relax(graph)), options)
        mod, offloaded = offload(mod, self.patterns_for(options))
        mod, extra = self.after_offload(mod, options)
        return target, mod, offloaded, extra

    def tuning_module(self, graph: Graph, options: CompileOptions):
        """(target, module) at the point tuning works on: kernel calls in place and every
        TVM-generated PrimFunc lowered but not yet scheduled (the passes before the default
        schedule); None when this backend's passes have no default-schedule step."""
        import tvm

        target, mod, _, _ = self._offloaded(graph, options)
        passes = self.passes(target)
        at = _schedule_index(passes)
        if at is None:
            return None
        with target:
            return target, tvm.transform.Sequential(passes[:at])(mod)

    def compile(self, graph: Graph, options: CompileOptions, out_dir: str) -> dict[str, Any]:
        import tvm
        from tvm import relax

        from accelkit.errors import CompileError

        target, mod, offloaded, extra = self._offloaded(graph, options)
        weights = constant_bytes(mod)
        passes = self.passes(target)
        applied: dict[str, Any] = {}
        if options.tuning is not None:
            mod = options.tuning.apply_kernels(mod, applied)
            at = _schedule_index(passes)
            if at is not None:  # tuned schedules first; the default schedule skips those
                passes = passes[:at] + [options.tuning.apply_schedules(applied)] + passes[at:]
        try:
            with target:
                mod = tvm.transform.Sequential(passes)(mod)
            executable = relax.build(mod, target, relax_pipeline=None, exec_mode=options.exec_mode)
            executable.export_library(os.path.join(out_dir, self.library_name))
        except Exception as exc:  # TVM raises many types; keep its reason
            raise CompileError(
                f"backend '{self.name}' failed to compile the model for {target}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        kernels = sorted({p.kernel for p in self.patterns_for(options) if p.name in offloaded})
        entries = {"target": str(target), "target_config": _target_config(target),
                   "offloaded": offloaded, "kernels": kernels, "library": self.library_name,
                   "weights_bytes": weights, **extra}
        if options.tuning is not None:
            entries["tuning"] = {"database": options.tuning.digest, "applied": applied}
        return entries

    def _check_kernels(self, manifest: dict[str, Any]) -> None:
        """Every kernel the executable calls must be registered here: a missing one would only
        fail in the middle of a run ("Cannot find function ...")."""
        import tvm_ffi

        from accelkit.errors import ArtifactError

        missing = [k for k in manifest.get("kernels", []) if tvm_ffi.get_global_func(k, allow_missing=True) is None]
        if missing:
            raise ArtifactError(
                f"the compiled model calls kernel(s) {', '.join(missing)}, which backend '{self.name}' "
                f"of this accelkit does not provide (it was built by another accelkit version): "
                f"compile the model again")

    def load(self, directory: str, manifest: dict[str, Any]) -> Runner:
        import tvm
        from tvm import relax

        from accelkit import threads

        threads.configure()  # size TVM's pool (all cores) before its first parallel loop
        self.load_kernels()
        self._check_kernels(manifest)
        path = os.path.join(directory, manifest["library"])
        lib = tvm.runtime.load_module(path)
        # the weights' size tells the kernels whether they stay cached (an artifact from before
        # the manifest had it: the library's size, which holds them)
        size = manifest.get("weights_bytes")
        return _VMRunner(relax.VirtualMachine(lib, self.device()), self.device(),
                         model_bytes=size if isinstance(size, int) and size > 0 else os.path.getsize(path))


def _schedule_index(passes) -> int | None:
    """Position of accelkit's default-schedule pass in a pass list (tuned schedules go there)."""
    from accelkit.schedules import PASS_NAME

    for i, p in enumerate(passes):
        if p.info.name == PASS_NAME:
            return i
    return None


def _target_config(target) -> dict[str, Any]:
    """The target as plain JSON (kind + attributes)."""
    config = {"kind": target.kind.name}
    for key, value in target.attrs.items():
        config[str(key)] = value if isinstance(value, int | float | str) else str(value)
    return config


# inputs this large are staged by the kernel library's copy on every pool thread: a copy from L3
# or memory runs at about 12 GB/s a core here (MobileNetV2's 0.6 MB image: 27 -> 13 us hot,
# 48 -> 32 us between runs); below it, numpy's copy is cheaper than the call
_THREADED_COPY_BYTES = 128 * 1024


def _copy_out(tensor):
    """A VM output as the caller's own numpy array (a DLPack view copied: cheaper than .numpy()
    by 5-20 us per output)."""
    import numpy as np

    try:
        return np.from_dlpack(tensor).copy()
    except (TypeError, ValueError, RuntimeError, BufferError):  # a dtype numpy cannot view
        return tensor.numpy()


class _VMRunner:
    def __init__(self, vm, device, model_bytes: int = 0):
        import threading

        self.vm = vm  # `accelkit profile` instruments it
        self._main = vm["main"]
        self._device = device
        self._lock = threading.Lock()  # a Relax VM is not safe for concurrent calls
        self._ran = False
        self._staged: dict[int, tuple] = {}  # input index -> (TVM tensor, numpy view of it)
        import tvm_ffi

        # the kernel library's threaded copy, when it is loaded (the cpu backend's)
        self._copy = tvm_ffi.get_global_func("accelkit.cpu.copy", allow_missing=True)
        self._from_dlpack = tvm_ffi.from_dlpack
        # the model's size, told to the kernels on the calling thread before each run: dense
        # layers split their rows, not their weights, when the model stays in the last-level cache
        self._model_bytes = int(model_bytes)
        self._tell_size = (tvm_ffi.get_global_func("accelkit.cpu.set_model_bytes", allow_missing=True)
                           if self._model_bytes > 0 else None)

    def _stage(self, i: int, x):
        """Input i in a TVM tensor kept across runs (allocated once, filled by a copy):
        a new tensor per run plus its copy cost about 20 us and the output's .numpy() another
        7-25 us, 5-10% of a 0.8 ms MLP run. Called under the lock: the buffer is the VM's
        argument until the call returns."""
        import numpy as np
        import tvm

        staged = self._staged.get(i)
        if staged is None or staged[1].shape != x.shape or staged[1].dtype != x.dtype:
            tensor = tvm.runtime.empty(x.shape, str(x.dtype), self._device)
            try:
                view = np.from_dlpack(tensor)
            except (TypeError, ValueError, RuntimeError, BufferError):  # a dtype numpy cannot view
                return tvm.runtime.tensor(x, self._device)
            staged = self._staged[i] = (tensor, view)
        if self._copy is not None and x.nbytes >= _THREADED_COPY_BYTES:
            try:
                self._copy(self._from_dlpack(x), staged[0])
                return staged[0]
            except (TypeError, ValueError, RuntimeError, BufferError):  # a dtype DLPack lacks
                pass
        np.copyto(staged[1], x)
        return staged[0]

    def run(self, inputs):
        import tvm

        from accelkit import threads

        def call():  # staging uses the pool too (a large input's copy)
            args = [self._stage(i, x) for i, x in enumerate(inputs)]
            if self._tell_size is not None:
                self._tell_size(self._model_bytes)
            return self._main(*args)

        with self._lock:
            if self._ran:  # the pool's workers exist (and are pinned) after the first run
                result = threads.run_on_caller_cpus(call)
            else:
                result = call()
                self._ran = True
            outputs = [result] if isinstance(result, tvm.runtime.Tensor) else list(result)
            # copies, under the lock: an output may be a staged input (an Identity output), which
            # the next run overwrites, or a constant of the model
            return [_copy_out(r) for r in outputs]
