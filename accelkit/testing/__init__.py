"""accelkit's backend conformance kit: the project's backend tests, packaged so that a hardware
vendor runs them against their own backend with one command:

    pytest --pyargs accelkit.testing --accelkit-backend NAME
    python -m accelkit.testing NAME          # the same, where pytest plugins are not autoloaded

It checks, against the `reference` backend (onnx.reference), the outputs on small graphs of every
common op family and on the bundled digits CNN; saved artifacts in a fresh process; the compile
cache; bad feeds, damaged artifacts and unsupported ops; and the Backend contract. What a backend
declares unsupported (UnsupportedModelError, is_available() False) is skipped with its reason.
"""
from accelkit.testing.plugin import ENV, OPTION

__all__ = ["ENV", "OPTION", "main"]


def main(argv: list[str] | None = None) -> int:
    """`python -m accelkit.testing NAME [pytest options]`: run the kit against backend NAME."""
    import sys

    import pytest

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0].startswith("-"):
        print("usage: python -m accelkit.testing BACKEND [pytest options]\n"
              "runs accelkit's backend conformance kit against BACKEND (see `accelkit backends`)",
              file=sys.stderr)
        return 2
    name, rest = args[0], args[1:]
    # -p loads the option's plugin even where pytest's entry-point autoloading is disabled
    return int(pytest.main(["-p", "accelkit.testing.plugin", "--pyargs", "accelkit.testing",
                            OPTION, name, *rest]))
