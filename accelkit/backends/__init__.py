"""Backends: the contract (base), the registry, and the built-in `cpu` and `reference`."""
from accelkit.backends.base import (
    Backend,
    CompileOptions,
    KernelPattern,
    TVMBackend,
    host_cpu,
    host_target,
    tensor_type,
)
from accelkit.backends.registry import get_backend, list_backends, register_backend

__all__ = ["Backend", "TVMBackend", "KernelPattern", "CompileOptions",
           "get_backend", "list_backends", "register_backend", "host_cpu", "host_target",
           "tensor_type"]
