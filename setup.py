"""Builds accelkit._kernels: the C kernels in kernels/ plus their TVM-FFI glue, behind a thin
Cython module. Everything else is declared in pyproject.toml."""
from Cython.Build import cythonize
from setuptools import Extension, setup


def _tvm_ffi():
    import os

    import tvm_ffi.libinfo as info

    lib_dir = os.path.dirname(info.find_libtvm_ffi())
    return [info.find_include_path(), info.find_dlpack_include_path()], lib_dir


ffi_includes, ffi_lib_dir = _tvm_ffi()


kernels = Extension(
    "accelkit._kernels",
    sources=["accelkit/_kernels.pyx", "kernels/src/gemm.c", "kernels/src/portable.c",
             "kernels/src/avx2.c", "kernels/src/avx512.c", "kernels/src/int8.c", "kernels/src/w16.c",
             "kernels/src/ffi.c"],
    include_dirs=["kernels/include", *ffi_includes],
    # Linked by soname: at import, `import tvm_ffi` has already loaded libtvm_ffi.so, which the
    # loader reuses; the $ORIGIN rpath finds the installed apache-tvm-ffi otherwise.
    library_dirs=[ffi_lib_dir],
    libraries=["tvm_ffi"],
    runtime_library_dirs=["$ORIGIN/../tvm_ffi/lib", ffi_lib_dir],
    extra_compile_args=["-O3", "-std=gnu11", "-fno-math-errno", "-fopenmp-simd"],
    depends=["kernels/include/ak_kernels.h"],
)

setup(ext_modules=cythonize([kernels], language_level=3))
