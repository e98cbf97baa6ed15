"""Magnitude pruning (`compile(sparsity=0.5)`): per layer, the given fraction of the weights of
every MatMul/Gemm/Conv with a constant weight, smallest |w| first, set to zero before compiling.

accelkit has no sparse kernel: the dense kernels multiply the zeros like any other weight, so
pruning changes accuracy and not speed. compile reports both: the accuracy against the unpruned
model (same precision) and that the speed is unchanged, with no claim of a gain."""
from __future__ import annotations

from typing import Any

from accelkit.errors import OptionError

SPEED_NOTE = ("no sparse kernel: the pruned weights are stored and multiplied as zeros by the same dense "
              "kernels, so the speed is that of the unpruned model")


def check_sparsity(sparsity) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise OptionError(f"sparsity must be the fraction of each layer's weights to zero, a number in [0, 1) "
                          f"such as 0.5; got {sparsity!r}")
    return float(sparsity)


def prune(model, sparsity: float):
    """(pruned onnx.ModelProto, stats): each weight initializer of a MatMul/Gemm/Conv (second
    input, rank >= 2, float) with floor(sparsity * size) of its smallest-magnitude entries zeroed."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from accelkit.frontend import load_model

    proto = onnx.ModelProto()
    proto.CopyFrom(load_model(model))  # a bad file raises ModelLoadError, as compile would
    weights = {node.input[1] for node in proto.graph.node
               if node.op_type in ("MatMul", "Gemm", "Conv") and len(node.input) > 1}
    layers, zeroed, total = [], 0, 0
    for i, init in enumerate(proto.graph.initializer):
        if init.name not in weights:
            continue
        w = numpy_helper.to_array(init)
        if w.ndim < 2 or w.dtype.kind != "f":
            continue
        k = int(sparsity * w.size)
        if k:
            flat = w.reshape(-1).copy()
            flat[np.argpartition(np.abs(flat), k - 1)[:k]] = 0
            proto.graph.initializer[i].CopyFrom(numpy_helper.from_array(flat.reshape(w.shape), init.name))
        layers.append(init.name)
        zeroed += k
        total += w.size
    stats = {"sparsity": sparsity, "layers": len(layers), "weights": total, "zeroed": zeroed,
             "zeroed_fraction": zeroed / total if total else 0.0, "speed": SPEED_NOTE}
    return proto, stats


def report(stats: dict[str, Any], pruned, unpruned, batches) -> dict[str, Any]:
    """The pruning report: the stats and the pruned model's accuracy against the unpruned one."""
    from accelkit import accuracy

    measured = accuracy.measure(pruned, unpruned, batches)
    measured["reference"] = f"the unpruned model ({pruned.precision})"
    return {**stats, "accuracy": measured}
