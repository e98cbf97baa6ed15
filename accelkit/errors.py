"""The errors accelkit raises: each names the thing, what was expected, and what to do."""
from __future__ import annotations

__all__ = [
    "AccelkitError",
    "ModelLoadError",
    "UnsupportedModelError",
    "InputShapeError",
    "FeedError",
    "BackendError",
    "OptionError",
    "CompileError",
    "ArtifactError",
]


class AccelkitError(Exception):
    """Base class of every error accelkit raises on purpose (the CLI prints these without a traceback)."""


class ModelLoadError(AccelkitError, ValueError):
    """The model could not be read: missing file, not ONNX, truncated, or fails onnx.checker."""


class UnsupportedModelError(AccelkitError, ValueError):
    """The model uses ops (or an opset) accelkit cannot compile; `unsupported` lists every one."""

    def __init__(self, message: str, unsupported: list[tuple[str, str, str]] | None = None):
        super().__init__(message)
        # (domain, op_type, node_name) for every offending node
        self.unsupported = list(unsupported or [])


class InputShapeError(AccelkitError, ValueError):
    """An input has a dimension whose size is unknown and was not given through input_shapes=."""


class FeedError(AccelkitError, ValueError):
    """run() was given a missing/extra input, or one with the wrong shape or dtype."""


class BackendError(AccelkitError, ValueError):
    """Unknown, unavailable or invalid backend."""


class OptionError(AccelkitError, ValueError):
    """Unknown or invalid compile option (precision, tune, ...)."""


class CompileError(AccelkitError, RuntimeError):
    """Compilation failed inside the compiler stack (TVM); the message keeps its reason."""


class ArtifactError(AccelkitError, ValueError):
    """A compiled artifact (.akx) is missing, corrupted, or built for another target/version."""
