"""The comparison plot of a model benchmark run: accelkit vs onnxruntime per model, from the
JSON that pytest-benchmark writes.

    pytest benchmarks/test_models_bench.py --benchmark-only --benchmark-json=bench.json
    python benchmarks/plot.py bench.json -o benchmarks/results/DATE.png

Left: the same-run ratio per model (onnxruntime ms / accelkit ms, > 1: accelkit faster) and
their geometric mean. Right: both systems' median latencies (log scale)."""
from __future__ import annotations

import argparse
import json
import math


def ratios(bench_json: dict) -> dict[str, dict[str, float]]:
    """model -> {accelkit_ms, onnxruntime_ms, ratio} from test_same_run_ratio entries."""
    out = {}
    for b in bench_json["benchmarks"]:
        info = b.get("extra_info", {})
        if b.get("group") == "same-run ratio" and "ratio" in info:
            out[info["model"]] = {k: info[k] for k in ("accelkit_ms", "onnxruntime_ms", "ratio")}
    if not out:
        raise SystemExit("no same-run ratios in this JSON: run benchmarks/test_models_bench.py "
                         "with --benchmark-json")
    return out


def plot(bench_json: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = ratios(bench_json)
    names = list(data)
    r = [data[n]["ratio"] for n in names]
    geomean = math.exp(sum(math.log(v) for v in r) / len(r))
    machine = bench_json.get("machine_info", {})
    cpu = machine.get("cpu", {}).get("brand_raw") or machine.get("processor", "")
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    colors = ["#2ca02c" if v >= 1 else "#d62728" for v in r]
    bars = left.bar(names + ["geomean"], r + [geomean], color=colors + ["#555555"])
    for bar, v in zip(bars, r + [geomean]):
        left.text(bar.get_x() + bar.get_width() / 2, v + 0.02, f"{v:.2f}", ha="center", fontsize=9)
    left.axhline(1.0, color="black", lw=1)
    left.set_ylabel("onnxruntime ms / accelkit ms  (> 1: accelkit faster)")
    left.set_title("same-run ratio, alternating blocks")
    left.set_ylim(0, max(r + [geomean, 1.0]) * 1.2)
    x = range(len(names))
    width = 0.38
    right.bar([i - width / 2 for i in x], [data[n]["accelkit_ms"] for n in names], width, label="accelkit (cpu, fp32, untuned)")
    right.bar([i + width / 2 for i in x], [data[n]["onnxruntime_ms"] for n in names], width, label="onnxruntime (2 threads)")
    right.set_xticks(list(x), names)
    right.set_yscale("log")
    right.set_ylabel("median latency (ms, log scale)")
    right.set_title("median latency per model")
    right.legend(fontsize=8)
    right.grid(alpha=0.3, axis="y")
    date = bench_json.get("datetime", "")[:10]
    fig.suptitle(f"accelkit vs onnxruntime, {date}, {cpu}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", help="pytest-benchmark JSON (--benchmark-json)")
    p.add_argument("-o", "--output", required=True, help="PNG to write")
    args = p.parse_args(argv)
    with open(args.json, encoding="utf-8") as f:
        print(plot(json.load(f), args.output))


if __name__ == "__main__":
    main()
