"""compile -> run -> save -> load, against the reference backend and onnxruntime."""
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

import accelkit
from conftest import conv_model, mlp_model, random_feeds, relative_l2


def test_cpu_matches_reference_and_offloads_dense(mlp_compiled, mlp_path):
    feeds = random_feeds(mlp_compiled)
    out = mlp_compiled.run(feeds)
    ref = accelkit.compile(mlp_path, backend="reference").run(feeds)
    assert len(out) == 1 and out[0].shape == (8, 16) and out[0].dtype == np.float32
    assert relative_l2(out[0], ref[0]) < 1e-5
    # fc1 (MatMul+Add+Relu), fc2 (bias-first Add) and the softmax all went to the C kernels
    assert mlp_compiled.manifest["offloaded"] == {"cpu.dense_bias_relu": 1, "cpu.dense_bias": 1,
                                                  "cpu.softmax": 1}


def test_cpu_matches_onnxruntime():
    ort = pytest.importorskip("onnxruntime")
    proto = conv_model()
    model = accelkit.compile(proto)
    feeds = random_feeds(model)
    out = model.run(feeds)
    expected = ort.InferenceSession(proto.SerializeToString()).run(None, feeds)
    assert [o.shape for o in out] == [(2, 4), ()]
    for got, want in zip(out, expected):
        assert relative_l2(got, want) < 1e-5


def test_inputs_and_outputs_describe_the_graph(mlp_compiled):
    assert [(s.name, s.shape, s.dtype) for s in mlp_compiled.inputs] == [("x", (8, 32), "float32")]
    assert [(s.name, s.shape, s.dtype) for s in mlp_compiled.outputs] == [("y", (8, 16), "float32")]
    assert mlp_compiled.backend == "cpu" and mlp_compiled.precision == "fp32"


@pytest.mark.parametrize("form", ["bytes", "proto"])
def test_model_given_as_bytes_or_proto(form):
    proto = mlp_model(seed=3)
    model = accelkit.compile(proto.SerializeToString() if form == "bytes" else proto,
                             backend="reference")
    feeds = random_feeds(model)
    w1, b1, w2, b2 = (onnx.numpy_helper.to_array(t) for t in proto.graph.initializer)
    logits = np.maximum(feeds["x"] @ w1 + b1, 0) @ w2 + b2
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    assert relative_l2(model.run(feeds)[0], expected) < 1e-5


def test_save_load_roundtrip_same_outputs(mlp_compiled, mlp_akx):
    feeds = random_feeds(mlp_compiled, seed=5)
    loaded = accelkit.load(mlp_akx)
    assert np.array_equal(loaded.run(feeds)[0], mlp_compiled.run(feeds)[0])
    assert loaded.manifest["files"] == mlp_compiled.manifest["files"]
    assert loaded.inputs == mlp_compiled.inputs


def test_artifact_runs_in_fresh_process(mlp_compiled, mlp_akx, tmp_path):
    feeds = random_feeds(mlp_compiled, seed=7)
    np.save(tmp_path / "x.npy", feeds["x"])
    code = ("import sys, numpy as np, accelkit; m = accelkit.load(sys.argv[1]); "
            "np.save(sys.argv[3], m.run({'x': np.load(sys.argv[2])})[0])")
    subprocess.run([sys.executable, "-c", code, mlp_akx, str(tmp_path / "x.npy"),
                    str(tmp_path / "y.npy")], check=True, timeout=300)
    assert np.array_equal(np.load(tmp_path / "y.npy"), mlp_compiled.run(feeds)[0])


def test_portable_kernels_match(mlp_path, tmp_path):
    """ACCELKIT_PORTABLE_KERNELS=1 forces the non-AVX kernel path; results stay correct."""
    code = ("import sys, numpy as np, onnx, accelkit; from accelkit import kernels; "
            "m = accelkit.compile(sys.argv[1]); assert kernels.load().portable(); "
            "x = np.random.default_rng(0).standard_normal((8, 32)).astype('float32'); "
            "r = accelkit.compile(sys.argv[1], backend='reference').run({'x': x})[0]; "
            "y = m.run({'x': x})[0]; "
            "print(float(np.linalg.norm(y - r) / np.linalg.norm(r)), m.manifest['offloaded'])")
    env = dict(os.environ, ACCELKIT_PORTABLE_KERNELS="1")
    done = subprocess.run([sys.executable, "-c", code, mlp_path], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    error, offloaded = done.stdout.split(" ", 1)
    assert float(error) < 1e-5 and "cpu.dense_bias_relu" in offloaded


def test_symbolic_batch_compiled_for_given_shape(tmp_path):
    proto = mlp_model()
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    proto.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    model = accelkit.compile(proto, input_shapes={"x": [3, 32]})
    assert model.inputs[0].shape == (3, 32) and model.outputs[0].shape == (3, 16)
    feeds = random_feeds(model)
    ref = accelkit.compile(proto, backend="reference", input_shapes={"x": [3, 32]}).run(feeds)
    assert relative_l2(model.run(feeds)[0], ref[0]) < 1e-5


def embedding_model(vocab=100, dim=8):
    from onnx import TensorProto, helper, numpy_helper

    from conftest import make_model

    table = np.random.default_rng(0).standard_normal((vocab, dim)).astype("float32")
    nodes = [helper.make_node("Cast", ["ids"], ["ids64"], to=TensorProto.INT64),
             helper.make_node("Gather", ["table", "ids64"], ["emb"]),
             helper.make_node("ReduceSum", ["emb", "axes"], ["y"], keepdims=0)]
    inits = [numpy_helper.from_array(table, "table"),
             numpy_helper.from_array(np.array([1], "int64"), "axes")]
    return make_model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT32, [2, 5])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, dim])], inits)


def test_out_of_range_index_input_is_refused_not_read():
    model = accelkit.compile(embedding_model())
    assert model.manifest["index_bounds"] == {"ids": 100}
    ids = np.arange(10, dtype="int32").reshape(2, 5)
    ids[1, 4] = -3  # negative indices count from the end, as in ONNX
    table = onnx.numpy_helper.to_array(embedding_model().graph.initializer[0])
    assert relative_l2(model.run({"ids": ids})[0], table[ids].sum(1)) < 1e-6
    for bad in (100, -101, 2**31 - 1):
        ids[0, 0] = bad
        with pytest.raises(accelkit.FeedError, match=f"input 'ids' holds {bad}.*-100 .. 99"):
            model.run({"ids": ids})


def test_generated_gather_cannot_read_out_of_bounds(tmp_path):
    """Even past run()'s check (runner called directly), the compiled take is clipped: no crash."""
    path = tmp_path / "emb.akx"
    accelkit.compile(embedding_model()).save(str(path))
    code = ("import sys, numpy as np, accelkit; m = accelkit.load(sys.argv[1]); "
            "ids = np.full((2, 5), 10**9, 'int32'); y = m._runner.run([ids])[0]; "
            "print(bool(np.isfinite(y).all()))")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "True"


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_scalar_and_non_contiguous_inputs(backend):
    from onnx import TensorProto, helper

    from conftest import make_model

    proto = make_model([helper.make_node("Mul", ["x", "scale"], ["y"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4]),
                        helper.make_tensor_value_info("scale", TensorProto.FLOAT, [])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])])
    model = accelkit.compile(proto, backend=backend)
    assert model.inputs[1].shape == ()
    x = np.arange(12, dtype="float32").reshape(4, 3).T  # a transposed (non-contiguous) view
    out = model.run({"x": x, "scale": np.array(2.5, "float32")})[0]
    assert np.array_equal(out, x * 2.5)


@pytest.mark.parametrize("shape", [(64, 33), (640, 330)], ids=["numpy-copy", "threaded-copy"])
def test_outputs_are_the_callers_own_across_runs_and_threads(shape):
    """Inputs go through buffers the runner keeps across runs: a returned output must never be
    one of them (an Identity output is the input tensor itself), nor change when the model runs
    again, also when threads share the model. Inputs of 128 KB and more are staged by the kernel
    library's copy over the pool's threads, smaller ones by numpy's."""
    import threading

    from onnx import TensorProto, helper

    from conftest import make_model

    proto = make_model([helper.make_node("Identity", ["x"], ["same"]),
                        helper.make_node("Add", ["x", "x"], ["twice"]),
                        helper.make_node("Cast", ["flag"], ["as_float"], to=TensorProto.FLOAT)],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape)),
                        helper.make_tensor_value_info("flag", TensorProto.BOOL, [5])],
                       [helper.make_tensor_value_info("same", TensorProto.FLOAT, list(shape)),
                        helper.make_tensor_value_info("twice", TensorProto.FLOAT, list(shape)),
                        helper.make_tensor_value_info("as_float", TensorProto.FLOAT, [5])])
    model = accelkit.compile(proto, cache=False)
    assert model._runner._copy is not None  # the cpu backend's kernel library is loaded
    assert model._runner._model_bytes > 0 and model._runner._tell_size is not None
    rng = np.random.default_rng(5)
    a, b = (rng.standard_normal(shape).astype("float32") for _ in range(2))
    flags = np.array([True, False, True, True, False])
    first = model.run({"x": a, "flag": flags})
    second = model.run({"x": b, "flag": ~flags})
    assert np.array_equal(first[0], a) and np.array_equal(first[1], a + a)
    assert np.array_equal(first[2], flags.astype("float32"))
    assert np.array_equal(second[0], b) and np.array_equal(second[2], (~flags).astype("float32"))
    first[0][:] = 0  # the caller's array: writing it changes nothing the model holds
    assert np.array_equal(model.run({"x": a, "flag": flags})[0], a)

    inputs = [rng.standard_normal(shape).astype("float32") for _ in range(4)]
    errors = []

    def worker(x):
        for _ in range(25):
            same, twice, _ = model.run({"x": x, "flag": flags})
            if not (np.array_equal(same, x) and np.array_equal(twice, x + x)):
                errors.append("a thread got another thread's output")
                return

    threads = [threading.Thread(target=worker, args=(x,)) for x in inputs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
