"""accelkit: compile ONNX models through Apache TVM into fast executables for the hardware you have.

    model = accelkit.compile("resnet50.onnx")          # backend="cpu", precision="fp32"
    outputs = model.run({"input": x})                  # list of numpy arrays
    model.save("resnet50.akx"); model = accelkit.load("resnet50.akx")

Heavy dependencies (tvm, onnx) load on first use, so `import accelkit` is fast.
"""
from accelkit.backends.base import (
    Backend,
    CompileOptions,
    KernelPattern,
    TVMBackend,
    host_target,
    tensor_type,
)
from accelkit.backends.registry import get_backend, list_backends, register_backend
from accelkit.errors import (
    AccelkitError,
    ArtifactError,
    BackendError,
    CompileError,
    FeedError,
    InputShapeError,
    ModelLoadError,
    OptionError,
    UnsupportedModelError,
)

__version__ = "0.1.0"

__all__ = [
    "compile", "load", "CompiledModel", "list_backends", "get_backend", "register_backend",
    "Backend", "TVMBackend", "KernelPattern", "CompileOptions", "host_target", "tensor_type",
    "AccelkitError", "ArtifactError", "BackendError", "CompileError", "FeedError",
    "InputShapeError", "ModelLoadError", "OptionError", "UnsupportedModelError", "__version__",
    "set_num_threads", "TuneOptions",
]


def set_num_threads(n: int) -> int:
    """Threads for running models (default: $ACCELKIT_NUM_THREADS, else all cores). Call it
    before the first model runs to size the process's one thread pool; later calls can only
    change how many of the pool's threads accelkit's kernels use. Returns the count in effect."""
    from accelkit.threads import set_num_threads as _set

    return _set(n)


def compile(model, *, backend="cpu", precision="fp32", input_shapes=None, cache=True,  # noqa: A001
            tune=None, calibration=None, accuracy=None, sparsity=None, **options):
    """Compile an ONNX model (path, bytes or onnx.ModelProto) into a CompiledModel.

    backend: a name from list_backends(); precision: "fp32"; "int8" (dense layers with int8
    weights and activations); "bf16" or "fp16" (16-bit weights for the dense layers of at most
    8 rows, which are bound by reading their weights; the others stay fp32). A reduced
    precision's accuracy against fp32 is measured and kept in model.manifest["accuracy"], on the
    `calibration` batches if given, else random inputs; accuracy=0.99 keeps the dense layers
    quantization hurts most in fp32 until every output's cosine to fp32 is at least 0.99;
    sparsity=0.5 prunes half of each layer's weights (smallest magnitudes) and reports the
    accuracy change (no sparse kernel: the speed is unchanged);
    input_shapes: sizes for symbolic input dims, e.g. {"input_ids": [1, 128]};
    tune: search for faster schedules and kernel parameters first, within a budget ("10m",
    seconds, or accelkit.TuneOptions); the results are kept and later compiles reuse them.
    options: backend-specific compile options (see `accelkit backends`).
    """
    from accelkit.compiler import compile_model

    return compile_model(model, backend=backend, precision=precision, input_shapes=input_shapes,
                         cache=cache, tune=tune, calibration=calibration, accuracy=accuracy,
                         sparsity=sparsity, **options)


def load(path):
    """Load a .akx artifact written by CompiledModel.save (verified before any code loads)."""
    from accelkit.artifact import load as _load

    return _load(path)


def __getattr__(name):
    if name == "CompiledModel":
        from accelkit.model import CompiledModel

        return CompiledModel
    if name == "TuneOptions":
        from accelkit.tuning import TuneOptions

        return TuneOptions
    raise AttributeError(f"module 'accelkit' has no attribute {name!r}")
