"""Helpers of the conformance kit: per-dtype tolerances and the output comparison, compiling with
a skip for what a backend declares unsupported, and running code in a fresh Python process."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Sequence

import numpy as np
import pytest

import accelkit

# Per output dtype, every element must satisfy |actual - expected| <= RTOL*|expected| + ATOL*scale,
# with scale = max(1, max|expected|) (so the bound follows the output's magnitude). Integer and
# bool outputs must be equal. fp32 is what compile(precision="fp32") promises: accelkit's own cpu
# backend stays below 1e-6 relative on every kit graph.
TOLERANCES: dict[str, tuple[float, float]] = {  # dtype: (rtol, atol)
    "float64": (1e-9, 1e-11),
    "float32": (1e-4, 1e-5),
    "float16": (1e-2, 1e-3),
    "bfloat16": (2e-2, 1e-2),
}


def tolerance(dtype) -> tuple[float, float] | None:
    """(rtol, atol) for a float dtype; None means the values must be equal."""
    name = str(dtype)
    if name in TOLERANCES:
        return TOLERANCES[name]
    if np.dtype(dtype).kind == "f":
        raise KeyError(f"the kit has no tolerance for dtype {name}; add one to TOLERANCES")
    return None


def mismatch(name: str, actual, expected) -> str | None:
    """Why `actual` does not match `expected` for output `name` (None when it does)."""
    if not isinstance(actual, np.ndarray):
        return f"output '{name}' is a {type(actual).__name__}, expected a numpy.ndarray"
    expected = np.asarray(expected)
    if actual.dtype != expected.dtype:
        return f"output '{name}' has dtype {actual.dtype}, the reference gives {expected.dtype}"
    if actual.shape != expected.shape:
        return f"output '{name}' has shape {actual.shape}, the reference gives {expected.shape}"
    if actual.size == 0:
        return None
    tol = tolerance(actual.dtype)
    if tol is None:
        bad = actual != expected
        if not bad.any():
            return None
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        return (f"output '{name}' ({actual.dtype}, must be exact): {int(bad.sum())} of "
                f"{actual.size} elements differ; first at {first}: got {actual[first]}, "
                f"expected {expected[first]}")
    rtol, atol = tol
    a, e = actual.astype(np.float64), expected.astype(np.float64)
    both_nan = np.isnan(a) & np.isnan(e)
    finite = np.isfinite(e)
    scale = max(1.0, float(np.abs(e[finite]).max())) if finite.any() else 1.0
    diff = np.abs(a - e)
    within = (diff <= rtol * np.abs(e) + atol * scale) | both_nan | ((a == e) & ~finite)
    if within.all():
        return None
    worst = np.where(within, -1.0, np.nan_to_num(diff, nan=np.inf))
    at = np.unravel_index(int(np.argmax(worst)), worst.shape)
    ok = finite & np.isfinite(a)
    rel_l2 = (float(np.linalg.norm((a - e)[ok]) / max(np.linalg.norm(e[ok]), 1e-30))
              if ok.any() else float("nan"))
    return (f"output '{name}' ({actual.dtype}[{', '.join(map(str, actual.shape))}]): "
            f"{int((~within).sum())} of {actual.size} elements outside the {actual.dtype} "
            f"tolerance (rtol {rtol:g}, atol {atol:g} x {scale:.3g}); worst at "
            f"{tuple(int(i) for i in at)}: got {a[at]:.8g}, expected {e[at]:.8g} "
            f"(abs error {diff[at]:.3g}); relative L2 error {rel_l2:.3g}")


def assert_outputs_match(names: Sequence[str], actual, expected, what: str) -> None:
    """Every output of `actual` matches the reference outputs `expected` (in graph order)."""
    if not isinstance(actual, list):
        raise AssertionError(f"{what}: run() returned a {type(actual).__name__}, expected a "
                             f"list of arrays in graph output order")
    if len(actual) != len(expected):
        raise AssertionError(f"{what}: run() returned {len(actual)} outputs, the graph has "
                             f"{len(expected)} ({', '.join(names)})")
    problems = [p for n, a, e in zip(names, actual, expected) if (p := mismatch(n, a, e))]
    if problems:
        raise AssertionError(f"{what} does not match the reference backend:\n  "
                             + "\n  ".join(problems))


def compile_or_skip(model, backend: str, **kwargs):
    """accelkit.compile; a model the backend declares unsupported (UnsupportedModelError) skips
    the test with the backend's reason instead of failing it."""
    try:
        return accelkit.compile(model, backend=backend, **kwargs)
    except accelkit.UnsupportedModelError as exc:
        reason = str(exc).strip().splitlines()[0]
        pytest.skip(f"backend '{backend}' declares this model unsupported: {reason}")


def run_python(code: str, *args, cwd: str | os.PathLike, timeout: float = 300) -> str:
    """Run `code` in a fresh interpreter (this one's executable and environment); its stdout.
    A non-zero exit, or a crash (signal), fails the test with the process's output."""
    command = [sys.executable, "-c", textwrap.dedent(code), *map(str, args)]
    proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        how = (f"crashed with signal {-proc.returncode}" if proc.returncode < 0
               else f"exited with code {proc.returncode}")
        raise AssertionError(f"a fresh python process {how}:\n--- stdout\n{proc.stdout[-3000:]}"
                             f"\n--- stderr\n{proc.stderr[-3000:]}")
    return proc.stdout
