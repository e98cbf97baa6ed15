"""Expand ONNX LSTM / GRU / RNN nodes into primitive ops (MatMul, Add, Slice, Sigmoid, Tanh, Mul,
Concat, ...) unrolled over the static sequence length: TVM's Relax ONNX frontend has no RNN ops.

A node we cannot expand faithfully is left in place and tagged in its doc_string with the reason;
`check_supported` then reports it as unsupported with that reason."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .fold import NameSupply, all_names, default_opset, static_shape, tensor_types

UNSUPPORTED_TAG = "accelkit-unsupported: "

_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
_DEFAULT_ACTIVATIONS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}
# Activations that take no alpha/beta: the same ONNX op computes them exactly.
_ACTIVATION_OPS = {"sigmoid": "Sigmoid", "tanh": "Tanh", "relu": "Relu"}


class _Unsupported(Exception):
    pass


class _Builder:
    """Appends nodes/initializers with fresh names."""

    def __init__(self, prefix: str, fresh: NameSupply, opset: int, dtype: np.dtype):
        self.prefix, self.fresh, self.opset, self.dtype = prefix, fresh, opset, dtype
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, value, hint: str = "c", dtype=None) -> str:
        name = self.fresh(f"{self.prefix}_{hint}")
        arr = np.asarray(value, dtype=dtype if dtype is not None else self.dtype)
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def ints(self, values, hint: str = "i") -> str:
        return self.const(np.asarray(values, dtype=np.int64), hint, np.int64)

    def op(self, op_type: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        name = out or self.fresh(f"{self.prefix}_{op_type.lower()}")
        self.nodes.append(helper.make_node(op_type, inputs, [name], name=self.fresh(f"{self.prefix}/{op_type}"), **attrs))
        return name

    def slice(self, x: str, start: int, end: int, axis: int) -> str:
        return self.op("Slice", [x, self.ints([start]), self.ints([end]), self.ints([axis])])

    def take(self, x: str, index: int, axis: int = 0) -> str:
        # Slice + Squeeze rather than Gather: TVM imports a Gather index as a negative-index
        # check (shape_of/less/where) that FoldConstant then compiles op by op (slow).
        part = self.slice(x, index, index + 1, axis)
        if self.opset >= 13:
            return self.op("Squeeze", [part, self.ints([axis])])
        return self.op("Squeeze", [part], axes=[axis])

    def reshape(self, x: str, shape: list[int], out: str | None = None) -> str:
        return self.op("Reshape", [x, self.ints(shape)], out=out)

    def clip(self, x: str, threshold: float | None) -> str:
        if threshold is None:
            return x
        if self.opset >= 11:
            return self.op("Clip", [x, self.const(-threshold), self.const(threshold)])
        return self.op("Clip", [x], min=-threshold, max=threshold)


def _attrs(node: onnx.NodeProto) -> dict:
    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else [x.decode() if isinstance(x, bytes) else x for x in v] if isinstance(v, list) else v
    return out


def _expand(node: onnx.NodeProto, types: dict, consts: dict, fresh: NameSupply, opset: int) -> _Builder:
    kind = node.op_type
    G = _GATES[kind]
    a = _attrs(node)
    inputs = list(node.input) + [""] * (8 - len(node.input))
    X, W, R, B = inputs[:4]
    seq_lens = inputs[4]
    init_h = inputs[5]
    init_c = inputs[6] if kind == "LSTM" else ""
    P = inputs[7] if kind == "LSTM" else ""

    if opset < 10:
        raise _Unsupported(f"expansion needs opset >= 10 (model has {opset})")
    direction = a.get("direction", "forward")
    if direction not in ("forward", "reverse", "bidirectional"):
        raise _Unsupported(f"direction={direction!r}")
    D = 2 if direction == "bidirectional" else 1
    layout = int(a.get("layout", 0))
    if "activation_alpha" in a or "activation_beta" in a:
        raise _Unsupported("activation_alpha/activation_beta are not supported")
    acts = a.get("activations", _DEFAULT_ACTIVATIONS[kind] * D)
    if len(acts) != len(_DEFAULT_ACTIVATIONS[kind]) * D:
        raise _Unsupported(f"activations={acts} (expected {len(_DEFAULT_ACTIVATIONS[kind]) * D} names)")
    bad = [x for x in acts if x.lower() not in _ACTIVATION_OPS]
    if bad:
        raise _Unsupported(f"activations {bad} (supported: Sigmoid, Tanh, Relu)")
    if int(a.get("input_forget", 0)):
        raise _Unsupported("input_forget=1")
    clip = a.get("clip")
    lbr = int(a.get("linear_before_reset", 0))

    x_type = types.get(X)
    x_shape = static_shape(x_type) if x_type is not None else None
    if x_shape is not None and len(x_shape) != 3:
        raise _Unsupported(f"input X {X!r} is {len(x_shape)}-D {list(x_shape)} where {kind} needs 3-D "
                           "(this node cannot run with these input shapes)")
    if x_shape is None:
        raise _Unsupported(f"input X {X!r} has no static 3-D shape")
    S, N, I = (x_shape[1], x_shape[0], x_shape[2]) if layout else x_shape
    w_shape = static_shape(types[W]) if W in types else None
    r_shape = static_shape(types[R]) if R in types else None
    if r_shape is None or w_shape is None:
        raise _Unsupported("W/R have no static shape")
    H = int(a.get("hidden_size", r_shape[-1]))
    if r_shape != (D, G * H, H) or w_shape != (D, G * H, I):
        raise _Unsupported(f"W {w_shape} / R {r_shape} do not match direction/hidden_size")
    lens = None  # sequence_lens known only at run time (or shorter than S): steps are masked
    if seq_lens and not (seq_lens in consts and np.all(consts[seq_lens] == S)):
        lens_type = types.get(seq_lens)
        if lens_type is None or static_shape(lens_type) != (N,) \
                or lens_type.tensor_type.elem_type != onnx.TensorProto.INT32:
            raise _Unsupported(f"sequence_lens {seq_lens!r} is not an int32 tensor of shape [{N}]")
        lens = seq_lens
    if S == 0:
        raise _Unsupported("empty sequence")

    dtype = helper.tensor_dtype_to_np_dtype(x_type.tensor_type.elem_type)
    b = _Builder(node.name or kind, fresh, opset, dtype)
    act = [_ACTIVATION_OPS[x.lower()] for x in acts]
    n_act = len(_DEFAULT_ACTIVATIONS[kind])

    xs = b.op("Transpose", [X], perm=[1, 0, 2]) if layout else X  # [S, N, I]

    def state(name: str, d: int) -> str:
        if not name:
            return b.const(np.zeros((N, H)), "zeros")
        return b.take(name, d, axis=1 if layout else 0)  # [N, H]

    ys, hs, cs = [], [], []
    for d in range(D):
        f, g, h_act = (act[d * n_act:(d + 1) * n_act] + [None, None])[:3]
        reverse = direction == "reverse" or d == 1
        wT = b.op("Transpose", [b.take(W, d)], perm=[1, 0])  # [I, G*H]
        rT = b.op("Transpose", [b.take(R, d)], perm=[1, 0])  # [H, G*H]
        xw = b.op("MatMul", [xs, wT])  # [S, N, G*H]
        rbh = None
        if B:
            bd = b.take(B, d)  # [2*G*H]
            wb, rb = b.slice(bd, 0, G * H, 0), b.slice(bd, G * H, 2 * G * H, 0)
            if kind == "GRU" and lbr:
                mask = np.concatenate([np.ones(2 * H), np.zeros(H)])
                rbh = b.slice(rb, 2 * H, 3 * H, 0)
                rb = b.op("Mul", [rb, b.const(mask, "mask")])
            xw = b.op("Add", [xw, b.op("Add", [wb, rb])])
        h = state(init_h, d)
        c = state(init_c, d) if kind == "LSTM" else None
        if P:
            pd = b.take(P, d)
            p_i, p_o, p_f = (b.slice(pd, k * H, (k + 1) * H, 0) for k in range(3))
        if kind == "GRU":
            r_zrT, r_hT = b.slice(rT, 0, 2 * H, 1), b.slice(rT, 2 * H, 3 * H, 1)
        steps: dict[int, str] = {}
        for t in (range(S - 1, -1, -1) if reverse else range(S)):
            h_prev, c_prev = h, c
            xt = b.take(xw, t)  # [N, G*H]
            if kind == "LSTM":
                gates = b.op("Add", [xt, b.op("MatMul", [h, rT])])
                gi, go, gf, gc = (b.slice(gates, k * H, (k + 1) * H, 1) for k in range(4))
                if P:
                    gi = b.op("Add", [gi, b.op("Mul", [p_i, c])])
                    gf = b.op("Add", [gf, b.op("Mul", [p_f, c])])
                i_t = b.op(f, [b.clip(gi, clip)])
                f_t = b.op(f, [b.clip(gf, clip)])
                c_t = b.op(g, [b.clip(gc, clip)])
                c = b.op("Add", [b.op("Mul", [f_t, c]), b.op("Mul", [i_t, c_t])])
                if P:
                    go = b.op("Add", [go, b.op("Mul", [p_o, c])])
                o_t = b.op(f, [b.clip(go, clip)])
                h = b.op("Mul", [o_t, b.op(h_act, [c])])
            elif kind == "GRU":
                xz, xr, xh = (b.slice(xt, k * H, (k + 1) * H, 1) for k in range(3))
                hzr = b.op("MatMul", [h, r_zrT])
                z = b.op(f, [b.clip(b.op("Add", [xz, b.slice(hzr, 0, H, 1)]), clip)])
                r = b.op(f, [b.clip(b.op("Add", [xr, b.slice(hzr, H, 2 * H, 1)]), clip)])
                if lbr:
                    hh = b.op("MatMul", [h, r_hT])
                    if rbh is not None:
                        hh = b.op("Add", [hh, rbh])
                    hh = b.op("Mul", [r, hh])
                else:
                    hh = b.op("MatMul", [b.op("Mul", [r, h]), r_hT])
                h_tilde = b.op(g, [b.clip(b.op("Add", [xh, hh]), clip)])
                # (1 - z) * h~ + z * h
                h = b.op("Add", [h_tilde, b.op("Mul", [z, b.op("Sub", [h, h_tilde])])])
            else:
                h = b.op(f, [b.clip(b.op("Add", [xt, b.op("MatMul", [h, rT])]), clip)])
            if lens is None:
                steps[t] = h
                continue
            # past a sequence's end its state stays and its outputs are zeros (as in onnxruntime);
            # in reverse, a sequence's steps thus start at its own last element
            valid = b.reshape(b.op("Less", [b.const(t, "t", np.int32), lens]), [N, 1])
            steps[t] = b.op("Where", [valid, h, b.const(np.zeros((N, H)), "zeros")])
            h = b.op("Where", [valid, h, h_prev])
            if c is not None:
                c = b.op("Where", [valid, c, c_prev])
        ys.append(b.op("Concat", [b.reshape(steps[t], [1, 1, N, H]) for t in range(S)], axis=0))  # [S,1,N,H]
        hs.append(b.reshape(h, [1, N, H]))
        if c is not None:
            cs.append(b.reshape(c, [1, N, H]))

    outs = list(node.output) + [""] * 3
    y_name, yh_name, yc_name = outs[0], outs[1], outs[2] if kind == "LSTM" else ""
    if y_name:
        y = b.op("Concat", ys, axis=1) if D > 1 else ys[0]  # [S, D, N, H]
        if layout:
            b.op("Transpose", [y], out=y_name, perm=[2, 0, 1, 3])
        else:
            b.op("Identity", [y], out=y_name)
    for name, parts in ((yh_name, hs), (yc_name, cs)):
        if name:
            v = b.op("Concat", parts, axis=0) if D > 1 else parts[0]  # [D, N, H]
            if layout:
                b.op("Transpose", [v], out=name, perm=[1, 0, 2])
            else:
                b.op("Identity", [v], out=name)
    return b


def expand_recurrent(model: onnx.ModelProto) -> bool:
    """Replace every expandable LSTM/GRU/RNN node of the main graph, in place. Needs value_info
    from shape inference. Nodes that cannot be expanded are tagged (see UNSUPPORTED_TAG)."""
    g = model.graph
    if not any(n.op_type in _GATES and n.domain in ("", "ai.onnx") for n in g.node):
        return False
    opset = default_opset(model)
    types = tensor_types(model)
    consts = {init.name: numpy_helper.to_array(init) for init in g.initializer if init.data_type == onnx.TensorProto.INT32}
    fresh = NameSupply(all_names(g))
    new_nodes, changed = [], False
    for node in g.node:
        if node.op_type not in _GATES or node.domain not in ("", "ai.onnx"):
            new_nodes.append(node)
            continue
        try:
            b = _expand(node, types, consts, fresh, opset)
        except _Unsupported as err:
            node.doc_string = f"{UNSUPPORTED_TAG}{node.op_type} {err}"
            new_nodes.append(node)
            continue
        new_nodes.extend(b.nodes)
        g.initializer.extend(b.inits)
        changed = True
    if changed:
        del g.node[:]
        g.node.extend(new_nodes)
    return changed
