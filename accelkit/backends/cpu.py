"""The `cpu` backend: TVM's llvm target tuned to the host CPU, with fused dense layers offloaded
to accelkit's C kernels (accelkit._kernels)."""
from __future__ import annotations

from accelkit.backends.base import (
    CompileOptions,
    KernelPattern,
    TVMBackend,
    host_target,
    tensor_type,
)


def dense_patterns(prefix: str, kernel_prefix: str) -> list[KernelPattern]:
    """matmul(x, W) + b [-> relu] with 2-D float32 x, constant 2-D W and 1-D b."""
    from tvm.relax.dpl import is_const, is_op, wildcard

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

        return f"{super().fingerprint()};kernels={__version__}"
