"""Outputs of the backend under test against the `reference` backend (onnx.reference) on every
kit graph: one per op family, an MLP, a small CNN and the bundled digits CNN on real images."""
from __future__ import annotations

import numpy as np
import pytest

import accelkit
from accelkit.testing.graphs import CASES
from accelkit.testing.support import assert_outputs_match


def reference_outputs(case, feeds):
    oracle = accelkit.compile(case.build(), backend="reference", cache=False,
                              input_shapes=case.input_shapes)
    return oracle.run(feeds)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_matches_the_reference(case, compiled):
    model = compiled(case.name)
    feeds = case.feeds()
    originals = {name: value.copy() for name, value in feeds.items()}
    expected = reference_outputs(case, feeds)
    actual = model.run(feeds)
    assert_outputs_match([s.name for s in model.outputs], actual, expected,
                         f"'{case.name}' ({case.covers})")
    for name, value in feeds.items():
        assert np.array_equal(value, originals[name]), f"run() modified its input '{name}'"


def test_outputs_survive_the_next_run(mlp_compiled, mlp_feeds):
    """run() returns arrays the caller owns: a later run must not overwrite them."""
    first = mlp_compiled.run(mlp_feeds)
    kept = [out.copy() for out in first]
    other = {name: np.flip(value, axis=0).copy() for name, value in mlp_feeds.items()}
    second = mlp_compiled.run(other)
    overwritten = [s.name for s, out, copy in zip(mlp_compiled.outputs, first, kept)
                   if not np.array_equal(out, copy)]
    assert not overwritten, f"a second run() changed the first run's output(s) {overwritten}"
    assert not all(np.array_equal(a, b) for a, b in zip(kept, second)), \
        "different inputs gave the same outputs"
