"""`accelkit demo`: compile the bundled example model (a digits CNN trained with torch and
exported to ONNX), run it, and show latency, accuracy and the match against the reference
backend (and onnxruntime when installed). Exits non-zero when the outputs do not match."""
from __future__ import annotations

import os
import statistics
import tempfile
import time

EXAMPLES = os.path.join(os.path.dirname(__file__), "examples")
MODEL = os.path.join(EXAMPLES, "digits_cnn.onnx")
DATA = os.path.join(EXAMPLES, "digits_test.npz")
TOLERANCE = 1e-4  # relative L2 error allowed against the reference, fp32


def relative_l2(actual, expected) -> float:
    import numpy as np

    expected = np.asarray(expected, dtype=np.float64)
    diff = np.asarray(actual, dtype=np.float64) - expected
    return float(np.linalg.norm(diff) / max(np.linalg.norm(expected), 1e-30))


TIMING_S = 2.0  # of timed running, shared by accelkit and onnxruntime


def _onnxruntime_session():
    """An onnxruntime session on the example with a thread per core, or None without it."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = os.cpu_count() or 1
    return ort.InferenceSession(MODEL, opts, providers=["CPUExecutionProvider"])


def median_latencies(model, session, feeds) -> tuple[float, float | None]:
    """Median ms of accelkit and (with a session) onnxruntime, timed in alternating blocks with
    a pause before each (bench.measure): one short burst each was 0.7-1.8x apart from run to
    run here, as each system's thread pool spun into the other's timings."""
    from accelkit import bench

    systems = [bench.System("accelkit", model.run, 0.0)]
    if session is not None:
        systems.append(bench.System("onnxruntime", lambda f: session.run(None, dict(f)), 0.0))
    bench.measure(systems, feeds, duration_s=TIMING_S)
    medians = [statistics.median(s.times_ms) for s in systems]
    return medians[0], (medians[1] if session is not None else None)


def run_demo(backend: str = "cpu") -> int:
    import numpy as np

    import accelkit

    with np.load(DATA) as data:
        pixels, labels = data["pixels"], data["labels"]
    shapes = {"pixels": list(pixels.shape)}
    print(f"example model: {os.path.relpath(MODEL)} (CNN, {len(labels)} held-out digit images)")

    start = time.perf_counter()
    model = accelkit.compile(MODEL, backend=backend, input_shapes=shapes)
    print(f"compiled for backend '{backend}' in {time.perf_counter() - start:.1f} s: {model}")
    offloaded = model.manifest.get("offloaded")
    if offloaded is not None:
        print(f"  offloaded to accelkit kernels: {offloaded or 'nothing'}")

    logits = model.run({"pixels": pixels})[0]
    session = _onnxruntime_session()
    ms, ort_ms = median_latencies(model, session, {"pixels": pixels})
    accuracy = float((logits.argmax(1) == labels).mean())
    print(f"latency (batch {len(labels)}): {ms:.2f} ms median; accuracy {accuracy:.4f}")

    reference = accelkit.compile(MODEL, backend="reference", input_shapes=shapes)
    expected = reference.run({"pixels": pixels})[0]
    error = relative_l2(logits, expected)
    ok = error < TOLERANCE
    print(f"match vs reference backend: relative L2 {error:.2e} "
          f"({'OK' if ok else 'MISMATCH'}, tolerance {TOLERANCE:g})")

    if session is None:
        print("onnxruntime not installed: skipping the comparison with it")
    else:
        import onnxruntime as ort

        ort_out = session.run(None, {"pixels": pixels})[0]
        print(f"onnxruntime {ort.__version__}: {ort_ms:.2f} ms median; accelkit/onnxruntime speed "
              f"ratio {ort_ms / ms:.2f}x (>1 = accelkit faster); relative L2 vs it "
              f"{relative_l2(logits, ort_out):.2e}")

    with tempfile.TemporaryDirectory() as tmp:
        path = model.save(os.path.join(tmp, "digits.akx"))
        reloaded = accelkit.load(path)
        same = np.array_equal(reloaded.run({"pixels": pixels})[0], logits)
        print(f"saved and reloaded {os.path.basename(path)} ({os.path.getsize(path) // 1024} KiB): "
              f"{'identical outputs' if same else 'OUTPUTS DIFFER'}")
    return 0 if ok and same else 1
