"""Offload: replace every subgraph matching a backend's KernelPattern by a destination-passing
call into the backend's kernel (R.call_dps_packed), leaving the rest to TVM-generated code."""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence


def _op_names(func) -> set[str]:
    from tvm import relax

    names: set[str] = set()

    def visit(expr):
        if isinstance(expr, relax.Call) and hasattr(expr.op, "name"):
            names.add(expr.op.name)

    relax.analysis.post_order_visit(func, visit)
    return names


def _kernel_calls(func, kernel: str) -> int:
    """How many R.call_dps_packed(kernel, ...) calls a function makes."""
    from tvm import relax

    calls = [0]

    def visit(expr):
        if (isinstance(expr, relax.Call) and getattr(expr.op, "name", "") == "relax.call_dps_packed"
                and getattr(expr.args[0], "global_symbol", None) == kernel):
            calls[0] += 1

    relax.analysis.post_order_visit(func, visit)
    return calls[0]


def _bound_uses(func) -> tuple[dict, dict]:
    """(bound value -> its var, var -> number of bindings/outputs using it) of a function."""
    from tvm import relax

    value_var = {value: var for var, value in relax.analysis.get_var2val(func).items()}
    uses: Counter = Counter()

    def count(expr):
        seen: set = set()

        def visit(node):
            if isinstance(node, relax.Var) and node not in seen:
                seen.add(node)
                uses[node] += 1

        relax.analysis.post_order_visit(expr, visit)

    for block in func.body.blocks:
        for binding in block.bindings:
            count(binding.value)
    count(func.body.body)
    return value_var, uses


def offload(mod, patterns: Sequence) -> tuple[object, dict[str, int]]:
    """Rewrite `mod`'s Relax functions; returns the new module and matches per pattern name."""
    from tvm import relax
    from tvm.relax.dpl import WildcardPattern, rewrite_call

    if not patterns:
        return mod, {}
    counts: Counter[str] = Counter()
    for gvar, func in list(mod.functions.items()):
        if not isinstance(func, relax.Function):
            continue
        present = _op_names(func)  # rewrites only remove ops, so this stays a superset
        for pattern in patterns:
            if not pattern.requires <= present:
                continue
            value_var, uses = _bound_uses(func)

            def rewriter(expr, matches, pattern=pattern, value_var=value_var, uses=uses):
                # a step inside the match that something outside it also reads would have to
                # be computed twice (fused here, and again for that reader): leave it to TVM
                steps = {value: value_var.get(value) for node, value in matches.items()
                         if not isinstance(node, WildcardPattern) and isinstance(value, relax.Call)}
                inside: Counter = Counter(arg for value in steps for arg in
                                          {a for a in value.args if isinstance(a, relax.Var)})
                if any(var is not None and not value.same_as(expr) and uses[var] > inside[var]
                       for value, var in steps.items()):
                    return expr
                if pattern.check is not None and not pattern.check(matches):
                    return expr
                if pattern.build is not None:
                    args = pattern.build(matches)
                    if args is None:
                        return expr
                else:
                    args = [matches[a] for a in pattern.args]
                return relax.call_dps_packed(pattern.kernel, args, expr.ty)

            # counted in the result: rewrite_call may try a match in two ways (commutative
            # operands) and keep one, so calls to the rewriter overcount
            before = _kernel_calls(func, pattern.kernel)
            func = rewrite_call(pattern.pattern, rewriter, func)
            counts[pattern.name] += _kernel_calls(func, pattern.kernel) - before
        mod[gvar] = func
    return mod, {name: n for name, n in counts.items() if n}
