"""Backend registry: built-ins plus third-party backends discovered through the
`accelkit.backends` entry-point group (recorded at first use, each loaded on first lookup)."""
from __future__ import annotations

import inspect
import re
import threading

from accelkit.errors import BackendError

ENTRY_POINT_GROUP = "accelkit.backends"
_BUILTIN = {
    "cpu": "accelkit.backends.cpu:CPUBackend",
    "reference": "accelkit.backends.reference:ReferenceBackend",
}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")

_lock = threading.RLock()
_classes: dict[str, type] = {}  # registered (loaded) backend classes
_lazy: dict[str, object] = {}  # name -> "module:attr" string or an EntryPoint, not loaded yet
_instances: dict[str, object] = {}
_discovered = False


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    from importlib.metadata import entry_points

    for name, target in _BUILTIN.items():
        _lazy.setdefault(name, target)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in _BUILTIN:  # a plugin cannot shadow a built-in
            _lazy.setdefault(ep.name, ep)
    _discovered = True


def _load_lazy(name: str) -> type:
    target = _lazy[name]  # kept until it loads, so a second lookup repeats the real cause
    try:
        if isinstance(target, str):
            import importlib

            module, attr = target.split(":")
            cls = getattr(importlib.import_module(module), attr)
        else:
            cls = target.load()
    except Exception as exc:
        where = target if isinstance(target, str) else f"entry point {target.value!r}"
        raise BackendError(
            f"backend '{name}' could not be loaded from {where}: {type(exc).__name__}: {exc}. "
            f"Reinstall the package that provides it, or uninstall it."
        ) from exc
    if getattr(cls, "name", None) != name:
        raise BackendError(
            f"entry point '{name}' in group '{ENTRY_POINT_GROUP}' loads {cls!r}, whose name is "
            f"{getattr(cls, 'name', None)!r}; the entry point name and Backend.name must match"
        )
    _lazy.pop(name)
    return register_backend(cls)


def register_backend(cls: type, *, override: bool = False) -> type:
    """Register a Backend subclass under `cls.name` (usable as a class decorator)."""
    from accelkit.backends.base import Backend

    if not (inspect.isclass(cls) and issubclass(cls, Backend)):
        raise BackendError(f"register_backend expects a subclass of accelkit.Backend, got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not _NAME.match(name):
        raise BackendError(
            f"backend class {cls.__qualname__} needs a `name` class attribute matching "
            f"[a-z][a-z0-9_]* (got {name!r})"
        )
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(cls.__abstractmethods__))
        raise BackendError(f"backend '{name}' ({cls.__qualname__}) does not implement: {missing}")
    with _lock:
        _discover()
        existing = _classes.get(name)
        pending = _lazy.get(name)  # built-in or installed plugin, not imported yet
        if not override and ((existing is not None and existing is not cls) or pending):
            by = (f"{existing.__module__}.{existing.__qualname__}" if existing is not None
                  else pending if isinstance(pending, str) else f"entry point {pending.value!r}")
            raise BackendError(
                f"backend '{name}' is already registered by {by}; pass override=True to "
                f"replace it"
            )
        _lazy.pop(name, None)
        _classes[name] = cls
        _instances.pop(name, None)
    return cls


def list_backends(available_only: bool = False) -> list[str]:
    """Names of every known backend (built-in, registered, or installed through entry points)."""
    with _lock:
        _discover()
        names = sorted(set(_classes) | set(_lazy))
    if available_only:
        return [n for n in names if get_backend(n).is_available()]
    return names


def get_backend(name: str):
    """The Backend instance registered as `name`; an unknown name lists the valid ones."""
    if not isinstance(name, str):
        raise BackendError(f"backend must be a name (str), got {type(name).__name__}; "
                           f"see accelkit.list_backends()")
    with _lock:
        _discover()
        if name in _instances:
            return _instances[name]
        if name not in _classes:
            if name not in _lazy:
                valid = ", ".join(sorted(set(_classes) | set(_lazy)))
                raise BackendError(
                    f"unknown backend '{name}'; available backends: {valid} "
                    f"(see accelkit.list_backends() or `accelkit backends`)"
                )
            _load_lazy(name)
        instance = _instances[name] = _classes[name]()
        return instance
