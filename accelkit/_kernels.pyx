# cython: language_level=3
"""accelkit's C kernels, registered into TVM-FFI's global function table at import.

The hot path (Relax VM -> TVM-FFI safe_call -> C kernel) never touches Python; this module
only registers the kernels and wires their parallel loops to the process's one thread pool.
Import `tvm_ffi` first: it loads libtvm_ffi.so globally, which resolves the TVM-FFI symbols the
kernels' glue uses. Use accelkit.kernels.load(), not this module directly.
"""
from libc.stdint cimport uintptr_t

import tvm_ffi  # noqa: F401

cdef extern from "ak_kernels.h":
    ctypedef int (*ak_parallel_launch_fn)(void* f, void* cdata, int num_task)
    void ak_set_parallel_launch(ak_parallel_launch_fn fn, int num_threads)
    int ak_num_threads()
    int ak_isa()
    int ak_force_portable
    const char* ak_int8_path()
    const char* ak_w16_path()
    int ak_weights_cached(long long bytes)

cdef extern int ak_register_all() nogil

KERNELS = ("accelkit.cpu.dense", "accelkit.cpu.dense_i8", "accelkit.cpu.dense_w16", "accelkit.cpu.bmm", "accelkit.cpu.conv2d",
           "accelkit.cpu.conv2d_nhwc", "accelkit.cpu.conv2d_nhwc_i8", "accelkit.cpu.layer_norm",
           "accelkit.cpu.rms_norm", "accelkit.cpu.softmax")


def register():
    """Register (again) every kernel; reads ACCELKIT_PORTABLE_KERNELS and ACCELKIT_KERNEL_ISA.
    Returns the names."""
    if ak_register_all() < 0:
        raise RuntimeError("accelkit: registering the C kernels into TVM-FFI failed")
    return KERNELS


def set_parallel_launch(uintptr_t address, int threads):
    """Run the kernels' parallel loops through the pool whose launch function
    (TVMBackendParallelLaunch's signature) is at `address`, with `threads` tasks; 0 = serial."""
    ak_set_parallel_launch(<ak_parallel_launch_fn>address, threads)


def num_threads():
    """Tasks the kernels split their work into."""
    return ak_num_threads()


from accelkit.kernels import ISAS  # ak_isa()'s codes, in order


def isa():
    """The instruction set the kernels run: 'avx512', 'avx2' (with FMA) or 'portable'."""
    return ISAS[ak_isa()]


def int8_path():
    """The int8 kernels' path: 'vnni' (AVX512-VNNI dot products) or 'portable' (plain C)."""
    return ak_int8_path().decode()


def w16_path():
    """The 16-bit-weight (bf16/fp16) dense kernel's path: 'avx512' or 'portable'."""
    return ak_w16_path().decode()


def weights_cached(long long nbytes):
    """Whether the dense kernels treat a model of `nbytes` as staying in the last-level cache
    (its rows, not its weight panels, are split between the threads: ak_set_model_bytes)."""
    return bool(ak_weights_cached(nbytes))


def portable():
    """True when the portable (non-AVX) kernel paths are forced."""
    return bool(ak_force_portable)


register()
