"""Fixtures of the conformance kit: the backend under test (--accelkit-backend NAME, else
$ACCELKIT_TEST_BACKEND), a private compile cache, and the kit's compiled models."""
from __future__ import annotations

import os

import pytest

from accelkit.testing.plugin import ENV, OPTION

KIT_DIR = os.path.dirname(os.path.abspath(__file__))


def _backend_name(config) -> str | None:
    return config.getoption("accelkit_backend", default=None) or os.environ.get(ENV) or None


def _in_kit(item) -> bool:
    return os.path.abspath(str(item.path)).startswith(KIT_DIR + os.sep)


_CHECKED = pytest.StashKey[str]()  # the backend name, once the kit's tests are collected


def pytest_collection_modifyitems(config, items):
    """One clear usage error, not one error per test, when the backend is missing or unknown."""
    if not any(_in_kit(item) for item in items):
        return
    import accelkit

    name = _backend_name(config)
    if not name:
        hint = "" if hasattr(config.option, "accelkit_backend") else (
            f" ({OPTION} is registered by the plugin accelkit.testing.plugin, which is not "
            f"loaded here: add -p accelkit.testing.plugin, or set ${ENV})")
        raise pytest.UsageError(
            f"accelkit.testing needs the backend to check: pass {OPTION} NAME or set ${ENV}{hint}; "
            f"installed backends: {', '.join(accelkit.list_backends())}")
    try:
        accelkit.get_backend(name)
    except accelkit.AccelkitError as exc:
        raise pytest.UsageError(f"accelkit.testing: {exc}") from None
    config.stash[_CHECKED] = name


def pytest_terminal_summary(terminalreporter, config):
    name = config.stash.get(_CHECKED, None)
    if name is None:
        return
    import accelkit

    be = accelkit.get_backend(name)
    terminalreporter.write_line(
        f"accelkit conformance kit: backend '{name}' ({type(be).__module__}."
        f"{type(be).__qualname__}), accelkit {accelkit.__version__}; tolerances per dtype in "
        f"accelkit.testing.support.TOLERANCES")


@pytest.fixture(scope="session")
def backend_name(request) -> str:
    return _backend_name(request.config)


@pytest.fixture(scope="session")
def backend(backend_name):
    import accelkit

    return accelkit.get_backend(backend_name)


@pytest.fixture(autouse=True)
def _requires_available_backend(backend):
    if not backend.is_available():
        pytest.skip(f"backend '{backend.name}' is not available on this machine "
                    f"(is_available() is False): nothing can be checked")


@pytest.fixture(scope="session", autouse=True)
def private_cache_dir(tmp_path_factory):
    """The kit compiles into a cache of its own, never the user's."""
    path = str(tmp_path_factory.mktemp("accelkit-kit-cache"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACCELKIT_CACHE_DIR", path)
        yield path


@pytest.fixture(scope="session")
def compiled(backend_name):
    """name -> that kit graph compiled by the backend under test (once per session, no cache);
    a graph the backend declares unsupported skips the test."""
    from accelkit.testing import graphs
    from accelkit.testing.support import compile_or_skip

    models = {}

    def get(name: str):
        if name not in models:
            case = graphs.CASES_BY_NAME[name]
            models[name] = compile_or_skip(case.build(), backend_name, cache=False,
                                           input_shapes=case.input_shapes)
        return models[name]

    return get


@pytest.fixture(scope="session")
def mlp_compiled(backend_name):
    """The MLP every backend must compile: without it nothing else can be checked."""
    import accelkit
    from accelkit.testing import graphs

    try:
        return accelkit.compile(graphs.mlp(), backend=backend_name, cache=False)
    except accelkit.AccelkitError as exc:
        pytest.fail(f"backend '{backend_name}' cannot compile the kit's MLP (MatMul, Add, Relu, "
                    f"Softmax), which every backend must: {type(exc).__name__}: {exc}")


@pytest.fixture(scope="session")
def mlp_feeds():
    from accelkit.testing import graphs

    return graphs.CASES_BY_NAME["mlp"].feeds()
