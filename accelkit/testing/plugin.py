"""pytest plugin of the conformance kit: the `--accelkit-backend NAME` option. pytest loads it
through accelkit's `pytest11` entry point (or `-p accelkit.testing.plugin`), before it parses the
command line, so `pytest --pyargs accelkit.testing --accelkit-backend NAME` works from any folder.
Nothing heavy is imported here: the plugin is loaded into every pytest run of the environment."""
from __future__ import annotations

OPTION = "--accelkit-backend"
ENV = "ACCELKIT_TEST_BACKEND"


def pytest_addoption(parser):
    group = parser.getgroup("accelkit", "accelkit backend conformance kit (accelkit.testing)")
    group.addoption(OPTION, dest="accelkit_backend", metavar="NAME", default=None,
                    help=f"the backend accelkit.testing checks (default: ${ENV}); run the kit "
                         f"with: pytest --pyargs accelkit.testing {OPTION} NAME")


def pytest_report_header(config):
    name = config.getoption("accelkit_backend")
    return [f"accelkit conformance kit: backend '{name}'"] if name else []
