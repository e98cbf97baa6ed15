"""The `accelkit` command line: compile, run, info, backends, --help."""
import subprocess
import sys

import numpy as np

from conftest import relative_l2


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "accelkit", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_help_does_not_import_tvm():
    code = ("import sys; from accelkit.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "heavy = [m for m in ('tvm', 'tvm_ffi', 'onnx', 'numpy') if m in sys.modules]\n"
            "assert not heavy, heavy")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "compile" in cli("--help").stdout


def test_compile_info_run_roundtrip(mlp_path, mlp_compiled, tmp_path):
    out = tmp_path / "mlp.akx"
    done = cli("compile", mlp_path, "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert "offloaded: cpu.dense_bias x1, cpu.dense_bias_relu x1" in done.stdout

    info = cli("info", str(out))
    assert info.returncode == 0, info.stderr
    for fragment in ("backend:   cpu", "precision: fp32", "x: float32[8, 32]", "y: float32[8, 16]",
                     "tvm 0.27", "model.so (sha256"):
        assert fragment in info.stdout, (fragment, info.stdout)

    x = np.random.default_rng(1).standard_normal((8, 32)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    ran = cli("run", str(out), "--input", f"x={tmp_path / 'x.npy'}", "-o", str(tmp_path / "y.npz"))
    assert ran.returncode == 0, ran.stderr
    with np.load(tmp_path / "y.npz") as y:
        assert relative_l2(y["y"], mlp_compiled.run({"x": x})[0]) < 1e-6

    np.savez(tmp_path / "in.npz", x=x)
    summary = cli("run", str(out), "--inputs", str(tmp_path / "in.npz"))
    assert summary.returncode == 0 and "y: float32[8, 16]" in summary.stdout


def test_run_onnx_directly_with_random_inputs(mlp_path):
    done = cli("run", mlp_path, "--random", "--backend", "reference")
    assert done.returncode == 0, done.stderr
    assert "y: float32[8, 16]" in done.stdout and "ran in" in done.stdout


def test_backends_lists_builtins():
    done = cli("backends")
    assert done.returncode == 0, done.stderr
    names = [line.split()[0] for line in done.stdout.splitlines()]
    assert "cpu" in names and "reference" in names
    assert "available" in done.stdout
