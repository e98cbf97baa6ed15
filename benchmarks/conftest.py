"""pytest-benchmark suites: `pytest benchmarks/ --benchmark-only` (needs the `bench` extra for
the model zoo). Compilation stays outside the timed regions; machine info records accelkit's
view of the machine (CPU, versions) next to pytest-benchmark's own."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


def pytest_benchmark_update_machine_info(config, machine_info):
    import onnxruntime
    import tvm

    import accelkit
    from accelkit.backends import host_cpu

    machine_info["accelkit"] = {"version": accelkit.__version__, "tvm": tvm.__version__,
                                "onnxruntime": onnxruntime.__version__, "llvm_cpu": host_cpu(),
                                "cores": os.cpu_count(), "load_average": os.getloadavg()}


@pytest.fixture(scope="session")
def zoo_dir():
    from model_zoo import DEFAULT_DIR

    return DEFAULT_DIR


@pytest.fixture(scope="session")
def zoo_model(zoo_dir):
    """zoo_model(name) -> path of the exported ONNX model (built once, cached on disk)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from model_zoo import build

    return lambda name: build(name, zoo_dir)
