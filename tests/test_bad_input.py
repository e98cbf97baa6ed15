"""Every bad input gets one clear error (what, where, what to do): from the API an AccelkitError
subclass, from the CLI a one-line message, a non-zero exit and no traceback (unless --debug)."""
import os
import subprocess
import sys
import zipfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import accelkit
from conftest import make_model, mlp_model


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "accelkit", *args], capture_output=True,
                          text=True, timeout=timeout)


def assert_clean_failure(done, *fragments):
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines and lines[0].startswith("accelkit ") and "error:" in lines[0], done.stderr
    for fragment in fragments:
        assert fragment in done.stderr, (fragment, done.stderr)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    good = mlp_model()
    onnx.save(good, str(d / "mlp.onnx"))
    raw = good.SerializeToString()
    (d / "truncated.onnx").write_bytes(raw[: len(raw) // 3])
    (d / "notes.onnx").write_text("this is a text file, not a model\n")
    (d / "image.onnx").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    unsupported = make_model(
        [helper.make_node("Relu", ["x"], ["r"], name="ok"),
         helper.make_node("FusedConv", ["r"], ["y"], name="vendor_conv", domain="com.microsoft"),
         helper.make_node("FooBar", ["r"], ["z"], name="mystery", domain="ai.example")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 3])],
        domains=("com.microsoft", "ai.example"))
    onnx.save(unsupported, str(d / "unsupported.onnx"))
    old = make_model([helper.make_node("Relu", ["x"], ["y"])],
                     [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], opset=1)
    onnx.save(old, str(d / "opset1.onnx"))
    np.save(d / "x_wrong_shape.npy", np.zeros((3, 32), "float32"))
    np.save(d / "x_wrong_dtype.npy", np.zeros((8, 32), "float64"))
    np.save(d / "x_good.npy", np.zeros((8, 32), "float32"))
    return d


@pytest.mark.parametrize("name, error, fragment", [
    ("missing.onnx", accelkit.ModelLoadError, "missing.onnx"),
    ("truncated.onnx", accelkit.ModelLoadError, "truncated.onnx"),
    ("notes.onnx", accelkit.ModelLoadError, "notes.onnx"),
    ("image.onnx", accelkit.ModelLoadError, "image.onnx"),
    ("opset1.onnx", accelkit.UnsupportedModelError, "opset"),
])
def test_unreadable_models(files, name, error, fragment):
    with pytest.raises(error, match=fragment):
        accelkit.compile(str(files / name))
    assert_clean_failure(cli("compile", str(files / name), "-o", str(files / "x.akx")), fragment)


def test_unsupported_ops_listed_in_one_error(files):
    with pytest.raises(accelkit.UnsupportedModelError) as info:
        accelkit.compile(str(files / "unsupported.onnx"))
    message = str(info.value)
    for fragment in ("FusedConv", "com.microsoft", "vendor_conv", "FooBar", "ai.example", "mystery"):
        assert fragment in message
    assert {op for _, op, _ in info.value.unsupported} == {"FusedConv", "FooBar"}
    assert_clean_failure(cli("compile", str(files / "unsupported.onnx")), "FusedConv", "FooBar")


def test_unknown_backend_lists_valid_ones(files):
    with pytest.raises(accelkit.BackendError, match="unknown backend 'tpu9'.*cpu.*reference"):
        accelkit.compile(str(files / "mlp.onnx"), backend="tpu9")
    assert_clean_failure(cli("compile", str(files / "mlp.onnx"), "--backend", "tpu9"),
                         "tpu9", "cpu", "reference")


def test_unknown_precision_and_option(files):
    with pytest.raises(accelkit.OptionError, match="unknown precision 'fp8'.*fp32"):
        accelkit.compile(str(files / "mlp.onnx"), precision="fp8")
    with pytest.raises(accelkit.OptionError, match="backend 'reference' does not support precision 'int8' yet; "
                                                   "it supports fp32"):
        accelkit.compile(str(files / "mlp.onnx"), backend="reference", precision="int8")
    with pytest.raises(accelkit.OptionError, match="unknown option.*frobnicate"):
        accelkit.compile(str(files / "mlp.onnx"), frobnicate=True)
    assert_clean_failure(cli("compile", str(files / "mlp.onnx"), "--precision", "fp8"), "fp8")


@pytest.mark.parametrize("feeds, fragment", [
    ({}, "missing input(s) 'x'"),
    ({"x": np.zeros((8, 32), "float32"), "y": np.zeros(1)}, "unknown input(s) 'y'"),
    ({"x": np.zeros((3, 32), "float32")}, "input 'x' has shape (3, 32), expected (8, 32)"),
    ({"x": np.zeros((8, 32), "float64")}, "input 'x' has dtype float64, expected float32"),
    ({"x": [[1.0] * 32] * 8}, "dtype float64, expected float32"),
])
def test_bad_feeds(mlp_compiled, feeds, fragment):
    with pytest.raises(accelkit.FeedError) as info:
        mlp_compiled.run(feeds)
    assert fragment in str(info.value)
    assert "x: float32[8, 32]" in str(info.value) or "expected" in str(info.value)


def test_feeds_must_be_a_dict(mlp_compiled):
    with pytest.raises(accelkit.FeedError, match="dict of input name"):
        mlp_compiled.run([np.zeros((8, 32), "float32")])


@pytest.mark.parametrize("arg, fragment", [
    ("x=x_wrong_shape.npy", "shape (3, 32), expected (8, 32)"),
    ("x=x_wrong_dtype.npy", "dtype float64, expected float32"),
    ("z=x_good.npy", "unknown input(s) 'z'"),
    ("x=nothere.npy", "nothere.npy"),
])
def test_cli_run_bad_feeds(files, mlp_akx, arg, fragment):
    name, _, path = arg.partition("=")
    assert_clean_failure(cli("run", mlp_akx, "--input", f"{name}={files / path}"), fragment)


def test_cli_missing_feed(mlp_akx):
    assert_clean_failure(cli("run", mlp_akx), "missing input(s) 'x'")


def test_symbolic_dim_without_size(files):
    proto = mlp_model()
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    path = files / "symbolic.onnx"
    onnx.save(proto, str(path))
    with pytest.raises(accelkit.InputShapeError, match="'x'.*batch"):
        accelkit.compile(str(path))
    assert_clean_failure(cli("compile", str(path)), "batch", "input")
    # and the CLI flag fixes it
    done = cli("compile", str(path), "--input-shape", "x=2,32", "-o", str(files / "sym.akx"))
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("damage", ["truncated", "not_zip", "no_manifest", "garbage_manifest",
                                    "bit_flip", "raw_bit_flip", "wrong_tvm", "other_cpu"])
def test_damaged_artifacts_refused(mlp_akx, tmp_path, damage):
    path = tmp_path / f"{damage}.akx"
    data = open(mlp_akx, "rb").read()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "not_zip":
        path.write_text("hello")
    elif damage == "raw_bit_flip":  # damage the compressed bytes themselves (zip CRC / zlib)
        raw = bytearray(data)
        raw[len(raw) // 2] ^= 0xFF
        path.write_bytes(bytes(raw))
    else:
        with zipfile.ZipFile(mlp_akx) as src, zipfile.ZipFile(path, "w") as dst:
            for item in src.infolist():
                content = src.read(item.filename)
                if item.filename == "manifest.json":
                    if damage == "no_manifest":
                        continue
                    if damage == "garbage_manifest":
                        content = b"{not json"
                    if damage == "wrong_tvm":
                        content = content.replace(b'"tvm": "', b'"tvm": "0.1-')
                    if damage == "other_cpu":  # built on a machine with another CPU model
                        content = content.replace(b'"mcpu": "', b'"mcpu": "other-')
                elif damage == "bit_flip":
                    content = bytearray(content)
                    content[len(content) // 2] ^= 0x10
                    content = bytes(content)
                dst.writestr(item, content)
    with pytest.raises(accelkit.ArtifactError, match=f"{damage}.akx"):
        accelkit.load(str(path))
    # `info` reads only the manifest (it shows what an artifact was built with); `run` loads it
    command = "run" if damage in ("bit_flip", "raw_bit_flip", "wrong_tvm", "other_cpu") else "info"
    assert_clean_failure(cli(command, str(path)), f"{damage}.akx")


def test_debug_flag_shows_traceback(files):
    done = cli("--debug", "compile", str(files / "notes.onnx"))
    assert done.returncode != 0 and "Traceback" in done.stderr


def test_cli_bad_input_shape_flag(files):
    assert_clean_failure(cli("compile", str(files / "mlp.onnx"), "--input-shape", "x=a,b"),
                         "--input-shape")
