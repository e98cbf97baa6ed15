"""Bad input gets a clear accelkit error, never a crash: wrong feeds (FeedError naming the
input), an out-of-range index (FeedError), damaged artifacts (ArtifactError naming the file),
an op nobody supports (an AccelkitError naming it)."""
from __future__ import annotations

import zipfile

import numpy as np
import pytest

import accelkit
from accelkit.testing import graphs
from accelkit.testing.support import assert_outputs_match

GOOD = np.zeros((8, 32), np.float32)


@pytest.mark.parametrize("feeds, fragment", [
    ({}, "'features'"),
    ({"features": GOOD, "extra_input": GOOD}, "'extra_input'"),
    ({"feature": GOOD}, "'feature'"),
    ({"features": np.zeros((3, 32), np.float32)}, "'features'"),
    ({"features": np.zeros((8, 32, 1), np.float32)}, "'features'"),
    ({"features": np.zeros((8, 32), np.float64)}, "'features'"),
    ({"features": np.zeros((8, 32), np.int64)}, "'features'"),
], ids=["missing", "extra", "misspelt", "wrong_shape", "wrong_rank", "float64", "int64"])
def test_bad_feeds_raise_feed_error(mlp_compiled, mlp_feeds, feeds, fragment):
    with pytest.raises(accelkit.FeedError) as info:
        mlp_compiled.run(feeds)
    assert fragment in str(info.value), str(info.value)
    # and the model still works afterwards
    assert np.isfinite(mlp_compiled.run(mlp_feeds)[0]).all()


def test_feeds_must_be_a_mapping(mlp_compiled):
    with pytest.raises(accelkit.FeedError):
        mlp_compiled.run([GOOD])


@pytest.mark.parametrize("value", [10, -11, 2**40])
def test_out_of_range_index_raises_feed_error(compiled, value):
    model = compiled("int_and_bool")
    feeds = graphs.int_and_bool_feeds()
    feeds["token_ids"][1, 2] = value
    with pytest.raises(accelkit.FeedError, match="'token_ids'"):
        model.run(feeds)


def test_wrong_dtype_of_bool_and_int_inputs(compiled):
    model = compiled("int_and_bool")
    good = graphs.int_and_bool_feeds()
    for name, wrong in (("keep_mask", good["keep_mask"].astype(np.int64)),
                        ("token_ids", good["token_ids"].astype(np.int32))):
        with pytest.raises(accelkit.FeedError, match=f"'{name}'"):
            model.run({**good, name: wrong})


def _damage(src, dst, how):
    data = src.read_bytes()
    if how == "truncated":
        dst.write_bytes(data[: len(data) // 2])
        return
    if how == "empty":
        dst.write_bytes(b"")
        return
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        members = [m for m in zin.infolist() if m.filename != "manifest.json"]
        biggest = max(members, key=lambda m: m.file_size).filename if members else None
        for item in zin.infolist():
            content = zin.read(item.filename)
            if item.filename == "manifest.json" and how == "garbage_manifest":
                content = b"{not json"
            elif item.filename == biggest and how == "bit_flip":
                flipped = bytearray(content)
                flipped[len(flipped) // 2] ^= 0x10
                content = bytes(flipped)
            elif item.filename == biggest and how == "missing_file":
                continue
            zout.writestr(item, content)


@pytest.mark.parametrize("how", ["truncated", "empty", "garbage_manifest", "bit_flip",
                                 "missing_file"])
def test_damaged_artifact_raises_artifact_error(mlp_compiled, tmp_path, how):
    good = mlp_compiled.save(tmp_path / "good.akx")
    bad = tmp_path / f"{how}.akx"
    _damage(tmp_path / "good.akx", bad, how)
    with pytest.raises(accelkit.ArtifactError, match=f"{how}.akx"):
        accelkit.load(bad)
    assert accelkit.load(good).backend == mlp_compiled.backend  # the good one still loads


def test_unsupported_op_is_named(backend_name):
    with pytest.raises(accelkit.AccelkitError) as info:
        accelkit.compile(graphs.unsupported_op_model(), backend=backend_name, cache=False)
    error = info.value
    assert "FooBar" in str(error), \
        f"the error for an unsupported op must name it (FooBar): {type(error).__name__}: {error}"


def test_compiles_after_an_error(backend_name, mlp_compiled, mlp_feeds):
    """A failed compile leaves the backend usable."""
    with pytest.raises(accelkit.AccelkitError):
        accelkit.compile(graphs.unsupported_op_model(), backend=backend_name, cache=False)
    model = accelkit.compile(graphs.mlp(), backend=backend_name, cache=False)
    assert_outputs_match(["probs"], model.run(mlp_feeds), mlp_compiled.run(mlp_feeds),
                         "the MLP compiled after a failed compile")
