"""accelkit-acme: the example third-party backend, and the template for a vendor's own.

It takes one subgraph, MatMul + Add + Relu, into its own kernel (`acme.dense_bias_relu`) and
leaves everything else to TVM-generated code for the host CPU: partition and fall back.
"""
from __future__ import annotations

import accelkit

__version__ = "0.1.0"

KERNEL = "acme.dense_bias_relu"


class AcmeBackend(accelkit.TVMBackend):
    name = "acme"  # must equal the entry-point name in pyproject.toml
    description = "example plugin: MatMul+Add+Relu in an acme kernel, the rest TVM host code"

    def target(self, options):
        # acme's "device" is the host, so the code TVM generates for the rest is host code.
        # (TVMBackend refuses to load an artifact built for another target, e.g. another CPU.)
        return accelkit.host_target()

    def fingerprint(self):
        # Part of the cache key (TVMBackend's already holds TVM versions and the target):
        # bump __version__ when the kernel's behaviour changes.
        return f"{super().fingerprint()};acme={__version__}"

    def patterns(self):
        from tvm.relax.dpl import is_const, is_op, wildcard

        # relu(matmul(x, W) + b): ONNX initializers arrive as Relax constants, so W and b are
        # is_const(); anything else (e.g. a weight fed as an input) stays with TVM.
        x, w, b = wildcard(), is_const(), is_const()
        root = is_op("relax.nn.relu")(is_op("relax.add")(is_op("relax.matmul")(x, w), b))

        def check(matches):
            # Refuse what the kernel cannot do; a refused match is compiled by TVM instead.
            (xd, xs), (wd, ws), (bd, bs) = (accelkit.tensor_type(matches[p]) for p in (x, w, b))
            return (xd == wd == bd == "float32" and xs is not None and ws is not None
                    and len(xs) == len(ws) == 2 and xs[1] == ws[0] and bs == (ws[1],))

        # args: the matched nodes passed, in this order, to the kernel (then the output).
        return [accelkit.KernelPattern(KERNEL, root, (x, w, b), KERNEL, check)]

    def load_kernels(self):
        # accelkit calls this whenever it loads a model: the compiled library looks the kernel up
        # by name at run time, so every process that runs the model must register it.
        import tvm_ffi

        tvm_ffi.register_global_func(KERNEL, dense_bias_relu, override=True)


def dense_bias_relu(x, w, b, out):
    """out = relu(x @ w + b). Destination-passing: TVM allocates `out`, the kernel fills it.

    A real vendor kernel would be C/C++ or a driver call registered the same way; numpy keeps
    the example short. DLPack gives zero-copy numpy views of TVM's tensors.
    """
    import numpy as np

    xs, ws, bs, outs = (tuple(t.shape) for t in (x, w, b, out))
    if not (len(xs) == len(ws) == 2 and xs[1] == ws[0] and bs == (ws[1],)
            and outs == (xs[0], ws[1])):
        raise ValueError(f"{KERNEL}: expected x[M,K], w[K,N], b[N], out[M,N]; got x{list(xs)}, "
                         f"w{list(ws)}, b{list(bs)}, out{list(outs)}")
    dtypes = {str(t.dtype) for t in (x, w, b, out)}
    if dtypes != {"float32"}:
        raise TypeError(f"{KERNEL}: supports float32 only, got dtypes {sorted(dtypes)}")
    xa, wa, ba = (np.from_dlpack(t) for t in (x, w, b))
    out.copyfrom(np.maximum(xa @ wa + ba, np.float32(0)))
