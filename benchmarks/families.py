"""Export small random-init models of the common transformer families (2 layers, seq 128; CLIP's
text encoder 77 tokens, the Whisper encoder 3000 frames) with torch + transformers, compile them with accelkit (cpu, fp32,
untuned) and compare with onnxruntime (2 intra-op threads) in the same run: relative L2 error,
what was offloaded to accelkit's kernels, and the latency ratio from alternating blocks.

    python benchmarks/families.py [gpt2 gpt2-where llama qwen2 mistral gemma phi t5 distilbert
                                   clip-text whisper-encoder] [--json r.json]

Each family is exported as transformers 5 writes it (`gpt2-where`: GPT-2 with transformers 4's
eager attention, the causal mask applied by torch.where; Qwen2, Mistral and Gemma with grouped
key/value heads, which torch's TorchScript exporter takes only with eager attention). Needs the
`bench` extra."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

FAMILIES = ("gpt2", "gpt2-where", "llama", "qwen2", "mistral", "gemma", "phi", "t5", "distilbert", "clip-text",
            "whisper-encoder")
SEQ = 128


def _gpt2_where_attention():
    """transformers 4.4x's GPT2Attention._attn: scores / sqrt(d), where(causal, s, finfo.min)."""
    import torch

    causal = torch.tril(torch.ones((1024, 1024), dtype=torch.bool)).view(1, 1, 1024, 1024)

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        w = torch.matmul(query, key.transpose(-1, -2)) / torch.full([], value.size(-1) ** 0.5)
        q_len, k_len = query.size(-2), key.size(-2)
        w = torch.where(causal[:, :, k_len - q_len:k_len, :k_len], w, torch.full([], torch.finfo(w.dtype).min))
        w = torch.nn.functional.softmax(w, dim=-1)
        return torch.matmul(w, value).transpose(1, 2).contiguous(), w

    return attention


def build(name: str, out_dir: str) -> str:
    """Export family `name` to out_dir/family-<name>.onnx unless it exists; returns the path."""
    import torch
    import transformers as tf

    path = os.path.join(out_dir, f"family-{name}.onnx")
    if os.path.exists(path):
        return path
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(0)
    if name in ("gpt2", "gpt2-where"):
        extra = {}
        if name == "gpt2-where":
            tf.AttentionInterface.register("gpt2_where", _gpt2_where_attention())
            extra["attn_implementation"] = "gpt2_where"
        model = tf.GPT2Model(tf.GPT2Config(n_layer=2, **extra))
    elif name == "llama":
        model = tf.LlamaModel(tf.LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=2,
                                             num_attention_heads=12, num_key_value_heads=12, vocab_size=32000))
    elif name in ("qwen2", "mistral", "gemma"):  # 4 key/value heads for 12 query heads
        config = {"qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig, "gemma": tf.GemmaConfig}[name](
            hidden_size=768, intermediate_size=2048, num_hidden_layers=2, num_attention_heads=12,
            num_key_value_heads=4, head_dim=64, vocab_size=32000, attn_implementation="eager")
        model = {"qwen2": tf.Qwen2Model, "mistral": tf.MistralModel, "gemma": tf.GemmaModel}[name](config)
    elif name == "phi":
        model = tf.PhiModel(tf.PhiConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=2,
                                         num_attention_heads=12, vocab_size=32000))
    elif name == "t5":
        model = tf.T5EncoderModel(tf.T5Config(d_model=512, d_ff=2048, num_layers=2, num_heads=8))
    elif name == "distilbert":
        model = tf.DistilBertModel(tf.DistilBertConfig(n_layers=2))
    elif name == "clip-text":
        model = tf.CLIPTextModel(tf.CLIPTextConfig(num_hidden_layers=2))
    elif name == "whisper-encoder":
        model = tf.WhisperModel(tf.WhisperConfig(encoder_layers=2, d_model=384, encoder_attention_heads=6,
                                                 encoder_ffn_dim=1536)).encoder
    else:
        raise ValueError(f"unknown family {name!r}; choose from {', '.join(FAMILIES)}")
    model.eval()

    class LastHidden(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner(x).last_hidden_state

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(1, 80, 3000, generator=g) if name == "whisper-encoder"
         else torch.randint(0, 1000, (1, 77 if name == "clip-text" else SEQ), generator=g))
    tmp = path + ".tmp"
    with torch.no_grad():
        torch.onnx.export(LastHidden(), (x,), tmp, opset_version=17, dynamo=False,
                          input_names=["x"], output_names=["y"])
    os.replace(tmp, path)
    return path


def check(name: str, path: str, blocks: int = 8, per_block: int = 4) -> dict:
    import onnxruntime as ort

    import accelkit
    from accelkit.demo import relative_l2

    model = accelkit.compile(path, cache=False, tune=False)
    spec = model.inputs[0]
    rng = np.random.default_rng(0)
    x = (rng.integers(0, 1000, spec.shape) if spec.dtype.startswith("int") else rng.standard_normal(spec.shape))
    feeds = {spec.name: x.astype(spec.dtype)}
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    error = relative_l2(model.run(feeds)[0], session.run(None, feeds)[0])
    runs = {"accelkit": lambda: model.run(feeds), "onnxruntime": lambda: session.run(None, feeds)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for block in range(blocks):  # alternating blocks, each after a pause (the other's pool spins)
        for system in (list(runs) if block % 2 == 0 else list(reversed(runs))):
            time.sleep(0.3)
            runs[system]()
            start = time.perf_counter()
            for _ in range(per_block):
                runs[system]()
            times[system].append((time.perf_counter() - start) / per_block)
    ms = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    return {"family": name, "rel_l2_vs_onnxruntime": float(error), "accelkit_ms": round(ms["accelkit"], 3),
            "onnxruntime_ms": round(ms["onnxruntime"], 3), "ratio": round(ms["onnxruntime"] / ms["accelkit"], 3),
            "offloaded": model.manifest["offloaded"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("families", nargs="*", default=list(FAMILIES), help=f"subset of {', '.join(FAMILIES)}")
    p.add_argument("--out", default=os.path.join(os.path.expanduser("~"), ".cache", "accelkit", "model_zoo"))
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    results, failed = [], False
    for name in args.families:
        r = check(name, build(name, args.out))
        results.append(r)
        ok = r["rel_l2_vs_onnxruntime"] < 1e-4
        failed |= not ok
        print(f"{name:16s} rel L2 {r['rel_l2_vs_onnxruntime']:.1e} {'ok ' if ok else 'BAD'}  accelkit "
              f"{r['accelkit_ms']:8.2f} ms  onnxruntime {r['onnxruntime_ms']:8.2f} ms  ratio {r['ratio']:.3f}  "
              f"{r['offloaded']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
