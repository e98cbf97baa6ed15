"""Default CPU schedules for the PrimFuncs TVM generates: parallel outer loops and vectorized inner
loops, so nothing left to TVM runs as a single-threaded scalar loop nest (run after FuseTIR).

Rules, tried in order per PrimFunc (the first that returns a schedule wins; one that raises is
logged at debug level and the next is tried; when none applies the function is left as it was):
  schedule_blocks  injective + reduction blocks (elementwise, broadcast, transpose, take, concat,
                   pad, pooling, softmax/layer-norm pieces, argmax, and un-offloaded matmul/conv):
                   cheap producers inlined, leading spatial loops parallel, the output-contiguous
                   loop vectorized innermost (below the reduction loops for reductions).
  outer_parallel   anything else: the outer loop(s) of every root block parallel.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # heavy imports stay out of `import accelkit`
    import tvm
    from tvm import s_tir, tirx

__all__ = ["ScheduleConfig", "Rule", "DEFAULT_RULES", "default_schedule", "schedule_func",
           "schedule_blocks", "outer_parallel", "schedule_block", "parallelize_outer",
           "is_scheduled", "MIN_PARALLEL_WORK"]

logger = logging.getLogger(__name__)

SCHEDULED_ATTR = "tirx.is_scheduled"  # what TVM 0.27 (dlight, meta-schedule) reads and writes
_SCHEDULED_ATTRS = (SCHEDULED_ATTR, "tir.is_scheduled")  # the second: TVM < 0.26 spelling
# Loop iterations below which a parallel launch costs more than it saves. A TVM thread-pool
# launch costs ~5-8 us on the 2-core dev VM; measured break-even for memory-bound copies
# (take, transpose) was 32K-64K elements.
MIN_PARALLEL_WORK = 65536
PASS_NAME = "AccelkitDefaultSchedule"  # tuned schedules are applied right before this pass
PARALLEL_CHUNKS_PER_CORE = 16  # iterations of the parallel loop per core, for load balance


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """What the rules need to know about the target."""

    num_cores: int = 1
    vector_bits: int = 128
    min_parallel_work: int = MIN_PARALLEL_WORK

    @classmethod
    def from_target(cls, target: tvm.target.Target | None,
                    min_parallel_work: int = MIN_PARALLEL_WORK) -> ScheduleConfig:
        import os

        from tvm.target import Target, codegen

        target = target or Target.current(allow_none=True)
        if target is None:
            return cls(os.cpu_count() or 1, 128, min_parallel_work)
        cores = int(target.attrs.get("num-cores", 0) or 0) or os.cpu_count() or 1
        bits = codegen.llvm_get_vector_width(target) if target.kind.name == "llvm" else -1
        return cls(cores, bits if bits > 0 else 128, min_parallel_work)

    def lanes(self, dtype_bits: int) -> int:
        """Elements of `dtype_bits` per vector register (bool counts as a byte)."""
        return max(1, self.vector_bits // max(8, dtype_bits))


# A rule schedules one PrimFunc: it returns the Schedule, or None when it does not apply.
Rule = Callable[["tirx.PrimFunc", ScheduleConfig], "s_tir.Schedule | None"]


# --------------------------------------------------------------------------- helpers

def _extent(sch: s_tir.Schedule, loop) -> int | None:
    """A loop's static extent, None when symbolic."""
    from tvm import tirx

    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tirx.IntImm) else None


def _work(extents: Sequence[int | None]) -> float:
    """Iterations of a loop nest (symbolic extents count as large)."""
    return math.prod(math.inf if e is None else e for e in extents)


def _pick_lanes(extent: int | None, max_lanes: int, *, whole_short_loop: bool) -> int | None:
    """How many iterations of a loop of `extent` to vectorize: the largest power of two >= 4 that
    divides it (no tail), or all of a loop shorter than a register when `whole_short_loop`.
    None leaves the loop serial: LLVM auto-vectorizes a plain inner loop, tail included, better
    than an explicit 2-, 6- or 14-lane vector under div/mod index arithmetic (measured: a pad
    with 6 lanes ran 4x slower than the unscheduled loop)."""
    if extent is None or extent < 2 or max_lanes < 2:
        return None
    lanes = 1 << (max_lanes.bit_length() - 1)
    while lanes >= 4:
        if extent % lanes == 0:
            return lanes
        lanes //= 2
    if whole_short_loop and extent <= max_lanes:
        return extent
    return None


def _first_line(exc: BaseException) -> str:
    """A schedule error's first line and its 'Error message:' line (TVM prints the whole IR)."""
    text = str(exc).strip()
    lines = text.splitlines() or [""]
    detail = next((ln for ln in lines if ln.startswith("Error message:")), "")
    return f"{lines[0]} {detail}".strip()


def _vars_of(expr) -> set:
    from tvm.tirx.analysis import undefined_vars

    return set(undefined_vars(expr))


def _is_pure_copy(sch: s_tir.Schedule, block) -> bool:
    """Whether the block only moves data (reshape, identity pad): no arithmetic, no condition."""
    from tvm import ir, tirx

    body = sch.get(block).body  # TVM 0.27: a load is an ir.TensorLoad (tirx.BufferLoad builds one)
    return isinstance(body, tirx.BufferStore) and isinstance(body.value, ir.TensorLoad)


def _inline_producers(sch: s_tir.Schedule, blocks) -> None:
    """Inline injective blocks into their consumers when that cannot multiply the work:
    any injective block into injective consumers, pure copies into any consumer."""
    for info in blocks:
        if not info.is_injective():
            continue
        try:
            consumers = sch.get_consumers(info.block_rv)
        except Exception:  # noqa: BLE001 - the block may be gone already
            continue
        if not consumers:
            continue
        if not _is_pure_copy(sch, info.block_rv):
            from tvm.s_tir.dlight.analysis import get_sblock_info

            if not all(get_sblock_info(sch, c).is_injective() for c in consumers):
                continue
        try:
            sch.compute_inline(info.block_rv)
        except Exception as exc:  # noqa: BLE001 - an output block, or several writes
            logger.debug("keeping block %s: %s", info.name, exc)


def _vector_axis(sch: s_tir.Schedule, block, kinds: str) -> int | None:
    """Index of the spatial iter that is the innermost index of every buffer the block writes
    (so a vector of it is contiguous in the output)."""
    stmt = sch.get(block)
    iter_vars = [iv.var for iv in stmt.iter_vars]
    axis = None
    for region in stmt.writes:
        if not region.region:
            return None
        last = region.region[-1]
        if int(getattr(last.extent, "value", 0)) != 1:
            return None
        try:
            index = next(i for i, v in enumerate(iter_vars) if last.min.same_as(v))
        except StopIteration:
            return None
        if axis is not None and axis != index:
            return None
        axis = index
    if axis is None or kinds[axis] != "S":
        return None
    return axis


def _reads_unit_stride(sch: s_tir.Schedule, block, axis: int) -> bool:
    """Whether every read is contiguous (or constant) along iter `axis`: it appears only in the
    last index, with coefficient 0 or 1. Strided reads (pooling with stride 2, a reduction over
    the innermost axis read across rows) would become gathers."""
    from tvm import tirx
    from tvm.sym.pattern import detect_linear_equation

    stmt = sch.get(block)
    var = stmt.iter_vars[axis].var
    for region in stmt.reads:
        indices = [r.min for r in region.region]
        if any(any(v.same_as(var) for v in _vars_of(i)) for i in indices[:-1]):
            return False
        if indices and any(v.same_as(var) for v in _vars_of(indices[-1])):
            linear = detect_linear_equation(indices[-1], [var])
            if len(linear) != 2 or not isinstance(linear[0], tirx.IntImm) or int(linear[0]) != 1:
                return False
    return True


def _unit_terms(expr) -> list:
    """The iter vars that an index expression adds with coefficient 1 (`d` in `h * 32 + d`)."""
    from tvm import tirx

    if isinstance(expr, tirx.Var):
        return [expr]
    if isinstance(expr, tirx.Add):
        return _unit_terms(expr.a) + _unit_terms(expr.b)
    return []


def _transpose_source(sch: s_tir.Schedule, block, axis: int, kinds: str,
                      extents: Sequence[int | None], lanes: int) -> int | None:
    """For a transpose-like block (a read whose innermost index steps with another spatial iter,
    as in NHWC -> NCHW, or attention's [s, h * 32 + d] -> [h, d, s] with the reshape fused in):
    that iter, when `lanes` divides its extent. Tiling it with the vector axis keeps the lanes'
    source lines in L1 (a strided vector read per output vector otherwise walks a new line per
    lane: 2 GB/s for a 3 MB NHWC -> NCHW copy)."""
    stmt = sch.get(block)
    iter_vars = [iv.var for iv in stmt.iter_vars]
    for region in stmt.reads:
        if not region.region:
            continue
        terms = _unit_terms(region.region[-1].min)
        for i, var in enumerate(iter_vars):
            if (i != axis and kinds[i] == "S" and any(t.same_as(var) for t in terms) and extents[i]
                    and extents[i] > lanes and extents[i] % lanes == 0):
                return i
    return None


# --------------------------------------------------------------------------- per-block schedules

def schedule_block(sch: s_tir.Schedule, info, config: ScheduleConfig) -> None:
    """Schedule one normalized block in place. Loop order: spatial loops (leading ones fused and
    parallel when the nest has enough work), reduction loops, then the output-contiguous spatial
    loop: split and vectorized when a clean vector width divides it (for reductions only when
    every read is unit-stride along it), else left serial for LLVM's own vectorizer."""
    block = info.block_rv
    kinds = info.dom_kind()
    loops = sch.get_loops(block)
    if len(loops) != len(kinds) or not set(kinds) <= {"S", "R"}:
        raise ValueError(f"block {info.name}: loops do not map one-to-one to S/R iters ({kinds})")
    extents = [_extent(sch, lp) for lp in loops]
    work = _work(extents)
    is_reduction = "R" in kinds
    spatial = [i for i, k in enumerate(kinds) if k == "S"]
    reduce_loops = [loops[i] for i, k in enumerate(kinds) if k == "R"]

    stmt = sch.get(block)
    bits = max(region.source.dtype.bits for region in stmt.writes) if stmt.writes else 32
    axis = _vector_axis(sch, block, kinds)
    if axis is not None and is_reduction and not _reads_unit_stride(sch, block, axis):
        axis = None
    if any(str(region.source.dtype) == "bfloat16" for region in list(stmt.reads) + list(stmt.writes)):
        axis = None  # TVM's bf16 legalization (uint16 storage) rejects vector stores of bf16
    # a reduction's inner body runs once per reduction step: any vector width pays there
    lanes = (_pick_lanes(extents[axis], config.lanes(bits), whole_short_loop=is_reduction)
             if axis is not None else None)

    source = (_transpose_source(sch, block, axis, kinds, extents, lanes)
              if lanes is not None and not is_reduction and not _reads_unit_stride(sch, block, axis)
              else None)
    source_inner = None
    if source is not None:  # tiles of lanes x lanes: source_outer in place, source_inner innermost
        source_outer, source_inner = sch.split(loops[source], factors=[None, lanes])
        loops = [source_outer if i == source else lp for i, lp in enumerate(loops)]
    outer = [loops[i] for i in spatial if i != axis]
    vector = inner = None  # inner: the output-contiguous loop, left serial for LLVM to vectorize
    if lanes is not None:
        if lanes < extents[axis]:
            vector_outer, vector = sch.split(loops[axis], factors=[None, lanes])
            outer.append(vector_outer)
        else:
            vector = loops[axis]
    elif axis is not None:
        inner = loops[axis]
    order = outer + reduce_loops + [lp for lp in (source_inner, vector, inner) if lp is not None]
    if len(order) > 1:
        sch.reorder(*order)
    if outer and config.num_cores > 1 and work >= config.min_parallel_work:
        # Fuse only as many leading loops as load balance needs: the rest stay plain nested
        # loops, whose indices LLVM strength-reduces (a fully fused loop pays a div/mod per
        # index per iteration: max_pool2d ran 4x slower than unscheduled that way).
        outer_extents = [_extent(sch, lp) for lp in outer]
        count = 1
        while (count < len(outer)
               and _work(outer_extents[:count]) < PARALLEL_CHUNKS_PER_CORE * config.num_cores):
            count += 1
        fused = sch.fuse(*outer[:count]) if count > 1 else outer[0]
        if (_extent(sch, fused) or 2) >= 2:
            sch.parallel(fused)
    if vector is not None:
        sch.vectorize(vector)
        if is_reduction:
            # Hoist the init out of the reduction loops (its copy of the vector loop stays
            # vectorized). Only after vectorize: an update block without init is neither
            # "complete" nor "reduction", and vectorize refuses a loop over it.
            sch.decompose_reduction(block, reduce_loops[0])


def parallelize_outer(sch: s_tir.Schedule, block, config: ScheduleConfig) -> s_tir.Schedule:
    """The simplest schedule: the outermost loop(s) of `block` parallel, leading loops fused while
    they have too few iterations for the cores. Works on a copy: returns the scheduled copy, or
    `sch` untouched when no outer loop can be parallel (or the nest is too small to gain)."""
    loops = sch.get_loops(block)
    if not loops or config.num_cores < 2:
        return sch
    extents = [_extent(sch, lp) for lp in loops]
    if _work(extents) < config.min_parallel_work:
        return sch
    count = 1
    while (count < len(loops)
           and _work(extents[:count]) < PARALLEL_CHUNKS_PER_CORE * config.num_cores):
        count += 1
    for n in range(count, 0, -1):  # fewer fused loops when a deeper one is not spatial
        trial = sch.copy()
        try:
            trial_loops = trial.get_loops(block)
            trial.parallel(trial.fuse(*trial_loops[:n]) if n > 1 else trial_loops[0])
            return trial
        except Exception as exc:  # noqa: BLE001 - a reduction loop, an imperfect nest, ...
            logger.debug("parallel over %d outer loop(s) refused: %s", n, _first_line(exc))
    return sch


# --------------------------------------------------------------------------- rules

def schedule_blocks(func: tirx.PrimFunc, config: ScheduleConfig) -> s_tir.Schedule | None:
    """Rule 1 (injective and reduction blocks): inline cheap producers, then schedule every
    block with `schedule_block`; a block that refuses falls back to `parallelize_outer`."""
    from tvm import s_tir
    from tvm.s_tir.dlight.analysis import normalize_prim_func

    sch = s_tir.Schedule(func)
    blocks = normalize_prim_func(sch)
    if blocks is None:
        return None
    _inline_producers(sch, blocks)
    blocks = normalize_prim_func(sch)
    if blocks is None:
        return None
    changed = False
    for info in blocks:
        trial = sch.copy()
        try:
            schedule_block(trial, info, config)
            sch, changed = trial, True
            continue
        except Exception as exc:  # noqa: BLE001 - any schedule error: try the simpler schedule
            logger.debug("block %s: full schedule failed (%s); parallel outer loop only",
                         info.name, _first_line(exc))
        new = parallelize_outer(sch, info.block_rv, config)
        sch, changed = new, changed or new is not sch
    return sch if changed else None


def outer_parallel(func: tirx.PrimFunc, config: ScheduleConfig) -> s_tir.Schedule | None:
    """Rule 2 (anything else): every block under the root gets its outer loop(s) parallel."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    root = sch.get_sblock("root")
    changed = False
    for block in sch.get_child_blocks(root):
        new = parallelize_outer(sch, block, config)
        changed = changed or new is not sch
        sch = new
    return sch if changed else None


DEFAULT_RULES: tuple[Rule, ...] = (schedule_blocks, outer_parallel)


def schedule_func(func: tirx.PrimFunc, config: ScheduleConfig,
                  rules: Sequence[Rule] = DEFAULT_RULES) -> tirx.PrimFunc | None:
    """The first rule's schedule of `func` (marked scheduled), None when every rule refused."""
    for rule in rules:
        try:
            sch = rule(func, config)
        except Exception as exc:  # noqa: BLE001 - never fail the compile: try a simpler rule
            logger.debug("schedule rule %s failed: %s: %s", getattr(rule, "__name__", rule),
                         type(exc).__name__, _first_line(exc))
            continue
        if sch is not None:
            return sch.mod["main"].with_attr(SCHEDULED_ATTR, True)
    return None


def is_scheduled(func) -> bool:
    """Whether a PrimFunc carries the scheduled mark (then no rule touches it)."""
    attrs = func.attrs
    return attrs is not None and any(bool(attrs.get(a, False)) for a in _SCHEDULED_ATTRS)


def default_schedule(target: tvm.target.Target | None = None, *,
                     rules: Sequence[Rule] = DEFAULT_RULES,
                     min_parallel_work: int = MIN_PARALLEL_WORK) -> tvm.transform.Pass:
    """A module pass scheduling every PrimFunc not yet scheduled (attr `tirx.is_scheduled`):
    run it right after FuseTIR. `target` (llvm, with num-cores) defaults to the current one."""
    import tvm
    from tvm import tirx

    @tvm.transform.module_pass(opt_level=0, name=PASS_NAME)
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        config = ScheduleConfig.from_target(target, min_parallel_work)
        updates = {}
        for gvar, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or is_scheduled(func):
                continue
            scheduled = schedule_func(func, config, rules)
            if scheduled is None:
                logger.debug("%s left unscheduled: no rule applied", gvar.name_hint)
            else:
                updates[gvar] = scheduled
        if updates:
            mod = mod.clone()  # `mod[gvar] = ...` would otherwise change the caller's module too
            for gvar, func in updates.items():
                mod[gvar] = func
        return mod

    return _pass
