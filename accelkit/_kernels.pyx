# cython: language_level=3
"""accelkit's C kernels, registered into TVM-FFI's global function table at import.

The hot path (Relax VM -> TVM-FFI safe_call -> C kernel) never touches Python; this module
only registers. Import `tvm_ffi` first: it loads libtvm_ffi.so globally, which resolves the
TVM-FFI symbols the kernels' glue uses.
"""
import tvm_ffi  # noqa: F401  (import accelkit._kernels through accelkit.kernels.load())

cdef extern from "ak_kernels.h":
    pass
cdef extern int ak_register_all() nogil
cdef extern int ak_force_portable

KERNELS = ("accelkit.cpu.dense_bias", "accelkit.cpu.dense_bias_relu")


def register():
    """Register (again) every kernel; reads ACCELKIT_PORTABLE_KERNELS. Returns the names."""
    if ak_register_all() < 0:
        raise RuntimeError("accelkit: registering the C kernels into TVM-FFI failed")
    return KERNELS


def portable():
    """True when the portable (non-AVX) kernel paths are forced."""
    return bool(ak_force_portable)


register()
