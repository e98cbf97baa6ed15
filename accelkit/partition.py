"""Offload: replace every subgraph matching a backend's KernelPattern by a destination-passing
call into the backend's kernel (R.call_dps_packed), leaving the rest to TVM-generated code."""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence


def offload(mod, patterns: Sequence) -> tuple[object, dict[str, int]]:
    """Rewrite `mod`'s Relax functions; returns the new module and matches per pattern name."""
    from tvm import relax
    from tvm.relax.dpl import rewrite_call

    counts: Counter[str] = Counter()
    if not patterns:
        return mod, {}
    for gvar, func in list(mod.functions.items()):
        if not isinstance(func, relax.Function):
            continue
        for pattern in patterns:
            def rewriter(expr, matches, pattern=pattern):
                if pattern.check is not None and not pattern.check(matches):
                    return expr
                if pattern.build is not None:
                    args = pattern.build(matches)
                    if args is None:
                        return expr
                else:
                    args = [matches[a] for a in pattern.args]
                counts[pattern.name] += 1
                return relax.call_dps_packed(pattern.kernel, args, expr.ty)

            func = rewrite_call(pattern.pattern, rewriter, func)
        mod[gvar] = func
    return mod, dict(counts)

