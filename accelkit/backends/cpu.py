"""The `cpu` backend: TVM's llvm target tuned to the host CPU, with fused dense layers offloaded
to accelkit's C kernels (accelkit._kernels)."""
from __future__ import annotations

import functools
import os
import platform

from accelkit.backends.base import CompileOptions, KernelPattern, TVMBackend

_TRIPLES = {"x86_64": "x86_64-linux-gnu", "amd64": "x86_64-linux-gnu",
            "aarch64": "aarch64-linux-gnu", "arm64": "aarch64-linux-gnu"}


@functools.cache
def host_cpu() -> str:
    """LLVM's name for this CPU (e.g. 'znver4'). `mcpu=native` is not used: with the wheel's
    default triple it silently means 'generic' (no AVX-512)."""
    import tvm

    return str(tvm.target.codegen.llvm_get_system_cpu())


def host_target(num_cores: int | None = None):
    import tvm

    machine = platform.machine().lower()
    triple = _TRIPLES.get(machine)
    config = {"kind": "llvm", "mcpu": host_cpu(), "num-cores": num_cores or os.cpu_count() or 1}
    if triple:
        config["mtriple"] = triple
    return tvm.target.Target(config)


def dense_patterns(prefix: str, kernel_prefix: str) -> list[KernelPattern]:
    """matmul(x, W) + b [-> relu] with 2-D float32 x, constant 2-D W and 1-D b."""
    from tvm.relax.dpl import is_const, is_op, wildcard

    from accelkit.partition import tensor_type

    def check(x, w, b):
        def ok(matches):
            (xd, xs), (wd, ws), (bd, bs) = (tensor_type(matches[p]) for p in (x, w, b))
            return (xd == wd == bd == "float32" and xs is not None and len(xs) == 2
                    and ws is not None and len(ws) == 2 and bs == (ws[1],) and xs[1] == ws[0])
        return ok

    result = []
    for act in ("relu", None):
        x, w, b = wildcard(), is_const(), is_const()
        matmul = is_op("relax.matmul")(x, w)
        root = is_op("relax.add")(matmul, b) | is_op("relax.add")(b, matmul)
        suffix = "dense_bias"
        if act:
            root = is_op(f"relax.nn.{act}")(root)
            suffix += f"_{act}"
        result.append(KernelPattern(f"{prefix}.{suffix}", root, (x, w, b),
                                    f"{kernel_prefix}.{suffix}", check(x, w, b)))
    return result


class CPUBackend(TVMBackend):
    name = "cpu"
    description = "host CPU: TVM llvm codegen + accelkit fused C kernels"

    def target(self, options: CompileOptions):
        return host_target()

    def patterns(self):
        return dense_patterns("cpu", "accelkit.cpu")

    def load_kernels(self):
        from accelkit import kernels

        kernels.load()

    def fingerprint(self) -> str:
        from accelkit import __version__

        return f"{super().fingerprint()};kernels={__version__};cpu={host_cpu()}"

    def check_artifact(self, manifest):
        built_for = manifest.get("target_config", {}).get("mcpu")
        if built_for and built_for != host_cpu():
            return (f"it was compiled for CPU '{built_for}' but this machine's CPU is "
                    f"'{host_cpu()}' (its code may use instructions this CPU lacks)")
        return None
