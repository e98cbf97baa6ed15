"""The `accelkit` command line: compile, run, bench, profile, info, backends, cache, demo.

Imports nothing heavy at module level, so `accelkit --help` answers at once. An AccelkitError
(bad input) prints one line and exits 2; --debug shows the traceback."""
from __future__ import annotations

import argparse
import os
import sys
import time


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="accelkit",
        description="Compile ONNX models through Apache TVM into fast executables for this machine.",
    )
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.add_argument("--threads", type=int, metavar="N",
                   help="threads for running models (default: $ACCELKIT_NUM_THREADS or all cores)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    c = sub.add_parser("compile", help="compile an ONNX model into an .akx artifact")
    c.add_argument("model", help="ONNX model file")
    c.add_argument("-o", "--output", help="artifact path (default: MODEL with .akx)")
    _compile_args(c)

    r = sub.add_parser("run", help="run a model (.akx, or .onnx compiled on the fly) on inputs")
    r.add_argument("model", help=".akx artifact or ONNX model")
    _feed_args(r)
    r.add_argument("--random", action="store_true", help="feed random inputs of the right shape")
    r.add_argument("-o", "--output", metavar="FILE.npz", help="write outputs here (else a summary)")
    _compile_args(r)

    b = sub.add_parser("bench", help="latency statistics, optionally side by side with onnxruntime")
    b.add_argument("model", help="ONNX model (or an .akx artifact, without --vs)")
    how_long = b.add_mutually_exclusive_group()
    how_long.add_argument("--runs", type=int, metavar="N", help="timed runs per system")
    how_long.add_argument("--duration", metavar="TIME", help="timed running per system, e.g. 10s (default)")
    b.add_argument("--warmup", type=int, default=3, metavar="N", help="untimed runs after the first (default 3)")
    b.add_argument("--vs", metavar="SYSTEM",
                   help="also time onnxruntime, reference, or another backend in the same run")
    b.add_argument("--json", metavar="FILE", help="write the full record (every run's time) as JSON")
    b.add_argument("--plot", metavar="FILE.png", help="write a latency plot (needs matplotlib)")
    b.add_argument("--no-cache", action="store_true", help="compile afresh (times a real compile)")
    _feed_args(b)
    _compile_args(b)

    f = sub.add_parser("profile", help="time per kernel / generated function, with a Chrome trace")
    f.add_argument("model", help="ONNX model")
    f.add_argument("--runs", type=int, default=10, metavar="N", help="profiled runs (default 10)")
    f.add_argument("--warmup", type=int, default=3, metavar="N", help="untimed runs first (default 3)")
    f.add_argument("--top", type=int, default=25, metavar="N", help="rows to print (default 25)")
    f.add_argument("--trace", metavar="FILE.json", help="write a Chrome trace of one run")
    f.add_argument("--json", metavar="FILE", help="write the full profile as JSON")
    _feed_args(f)
    _compile_args(f)

    t = sub.add_parser("tune", help="search faster schedules and kernel parameters (resumable)")
    t.add_argument("model", help="ONNX model")
    t.add_argument("--budget", default="10m", metavar="TIME",
                   help="time for the whole run, e.g. 90s, 20m (default 10m)")
    t.add_argument("--trials", type=int, metavar="N", help="at most N meta-schedule trials")
    t.add_argument("--rpc-tracker", metavar="HOST:PORT",
                   help="measure on the machines registered with this TVM RPC tracker")
    t.add_argument("--rpc-key", metavar="KEY", help="the key those machines registered with")
    t.add_argument("--no-kernels", action="store_true", help="skip the kernel-parameter search")
    t.add_argument("--no-tir", action="store_true", help="skip meta-schedule (TVM-generated functions)")
    t.add_argument("--no-compare", action="store_true",
                   help="do not time the tuned model against the untuned one at the end")
    t.add_argument("-o", "--output", metavar="FILE.akx", help="also save the tuned model")
    t.add_argument("-v", "--verbose", action="store_true", help="log every round and dropped candidate")
    _compile_args(t)

    s = sub.add_parser("rpc-server", help="a TVM RPC server with accelkit's kernels, for `tune --rpc-tracker`")
    s.add_argument("--tracker", required=True, metavar="HOST:PORT", help="the RPC tracker to register with")
    s.add_argument("--key", required=True, help="device key to register under (tune --rpc-key)")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: loopback only)")
    s.add_argument("--port", type=int, default=9090, help="first port to try (default 9090)")

    i = sub.add_parser("info", help="show what an .akx artifact holds")
    i.add_argument("artifact")

    sub.add_parser("backends", help="list backends (built-in and installed plugins)")

    k = sub.add_parser("cache", help="inspect or clean the compile cache")
    k.add_argument("action", choices=["ls", "verify", "clear", "prune", "dir"])
    k.add_argument("--max-size", metavar="SIZE", help="prune: keep at most SIZE (e.g. 2G, 500M)")

    d = sub.add_parser("demo", help="compile and run the bundled example model, check it")
    d.add_argument("--backend", default="cpu")
    return p


def _feed_args(p):
    p.add_argument("-i", "--input", action="append", default=[], metavar="NAME=FILE.npy",
                   help="one input from a .npy file (repeatable)")
    p.add_argument("--inputs", metavar="FILE.npz", help="all inputs from an .npz (keys = names)")


def _compile_args(p):
    p.add_argument("--backend", default="cpu", help="backend name (see `accelkit backends`)")
    p.add_argument("--precision", default="fp32",
                   help="fp32, int8 (dense layers and convolutions in int8), bf16 or fp16 (16-bit weights for the "
                        "few-row, weight-bound dense layers); a reduced precision's accuracy against "
                        "fp32 is measured and printed")
    p.add_argument("--accuracy", type=float, metavar="MIN_COSINE",
                   help="with a reduced precision: keep the layers it hurts most in fp32 until "
                        "every output's cosine to fp32 is at least this (e.g. 0.99)")
    p.add_argument("--sparsity", type=float, metavar="FRACTION",
                   help="prune this fraction of each layer's weights (smallest magnitudes) and report "
                        "the accuracy change; accelkit has no sparse kernel, so the speed is unchanged")
    p.add_argument("--calibration", metavar="DATA.npz|DIR",
                   help="batches to measure a reduced precision's accuracy on (an .npz with the input "
                        "names as keys, or a directory of them); default: random inputs")
    p.add_argument("--calibration-method", choices=["auto", "dynamic", "minmax", "percentile", "entropy"],
                   help="int8 input ranges: dynamic (each row's own, at run time), minmax, percentile or "
                        "entropy (one range per layer from the calibration batches); auto (default): "
                        "percentile for convolutions, dynamic for MatMul/Gemm")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME=D0,D1,...",
                   help="size for an input with symbolic dims, e.g. input_ids=1,128 (repeatable)")
    p.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                   help="a backend option, e.g. layout=nchw for cpu (repeatable; `accelkit backends` "
                        "lists them)")


def _input_shapes(items):
    from accelkit.errors import OptionError

    shapes = {}
    for item in items:
        name, sep, dims = item.rpartition("=")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = [int(d) for d in dims.split(",")]
        except ValueError:
            raise OptionError(f"--input-shape {item!r}: expected NAME=D0,D1,... "
                              f"e.g. input_ids=1,128") from None
    return shapes or None


def _backend_options(items) -> dict[str, str]:
    from accelkit.errors import OptionError

    options = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise OptionError(f"--option {item!r}: expected NAME=VALUE, e.g. layout=nchw")
        options[name] = value
    return options


def _compile(args):
    import accelkit

    return accelkit.compile(args.model, backend=args.backend, precision=args.precision,
                            input_shapes=_input_shapes(args.input_shape),
                            calibration=getattr(args, "calibration", None),
                            calibration_method=getattr(args, "calibration_method", None),
                            accuracy=getattr(args, "accuracy", None), sparsity=getattr(args, "sparsity", None),
                            **_backend_options(args.option))


def _fmt_specs(specs):
    return ", ".join(f"{s.name}: {s.dtype}{list(s.shape)}" for s in specs)


def cmd_compile(args):
    start = time.perf_counter()
    model = _compile(args)
    elapsed = time.perf_counter() - start
    out = args.output or os.path.splitext(args.model)[0] + ".akx"
    model.save(out)
    print(f"compiled {args.model} in {elapsed:.1f} s (cache: {model.cache_status}) -> {out}")
    _print_summary(model.manifest)


def _print_summary(m):
    print(f"  backend:   {m['backend']}  precision: {m['precision']}")
    print(f"  target:    {m.get('target')}")
    print(f"  inputs:    {', '.join(_spec_str(s) for s in m['inputs'])}")
    print(f"  outputs:   {', '.join(_spec_str(s) for s in m['outputs'])}")
    if m.get("offloaded") is not None:
        kernels = ", ".join(f"{k} x{v}" for k, v in sorted(m["offloaded"].items())) or "none"
        print(f"  offloaded: {kernels}")
    _print_pruning(m)
    c = m.get("calibration")
    if c:
        qdq = sum(layer.get("source") == "qdq" for layer in c["layers"])
        parts = ([f"{qdq} from the model's QDQ pairs"] if qdq else []) + (
            [f"{len(c['layers']) - qdq} calibrated on {c['batches']} {c['inputs']} batches"]
            if len(c["layers"]) > qdq else [])
        print(f"  int8 input ranges: {c['method']}; "
              + (f"{', '.join(parts)}; the other int8 layers per row at run time" if parts
                 else "every int8 layer per row at run time"))
    if m.get("int8_u8_edges"):
        print(f"  u8 edges:  {m['int8_u8_edges']} int8 layer(s) write u8 for the next one (no fp32 in between)")
    if m.get("accuracy"):
        a = m["accuracy"]
        print(f"  accuracy vs {a['reference']} ({a['batches']} {a['inputs']} batches): "
              + ", ".join(f"{name} cosine {v['cosine']:.5f} rel. error {v['rel_l2']:.2e}"
                          for name, v in a["outputs"].items()))
        if "budget" in a:
            print(f"  accuracy budget: min cosine {a['budget']} {'met' if a['met'] else 'NOT met'}; "
                  f"kept in fp32: " + (", ".join(f"{k['node']} ({k['op']}, own error {k['layer_error']:.2e})"
                                                 for k in a["kept_fp32"]) or "none"))


def _print_pruning(m):
    p = m.get("pruning")
    if p:
        a = p["accuracy"]
        print(f"  pruning:   {p['zeroed_fraction']:.1%} of the weights of {p['layers']} layers zeroed; vs "
              f"{a['reference']}: min cosine {a['min_cosine']:.5f}, max rel. error {a['max_rel_l2']:.2e}; "
              f"speed: {p['speed']}")


def _spec_str(s):
    return f"{s['name']}: {s['dtype']}{s['shape']}"


def _load_or_compile(args):
    import accelkit

    if args.model.endswith(".akx"):
        return accelkit.load(args.model)
    return _compile(args)


def _read_feeds(args, model=None):
    """Feeds from --inputs and --input; with --random (and the model), the rest are random."""
    import numpy as np

    from accelkit.errors import FeedError

    feeds = {}
    if args.inputs:
        try:
            with np.load(args.inputs) as data:
                feeds.update({k: data[k] for k in data.files})
        except (OSError, ValueError) as exc:
            raise FeedError(f"cannot read --inputs {args.inputs!r}: {exc}") from exc
    for item in args.input:
        name, sep, path = item.partition("=")
        if not sep:
            raise FeedError(f"--input {item!r}: expected NAME=FILE.npy")
        try:
            feeds[name] = np.load(path)
        except (OSError, ValueError) as exc:
            raise FeedError(f"cannot read input '{name}' from {path!r}: {exc}") from exc
    if model is not None and getattr(args, "random", False):
        from accelkit.bench import random_feeds

        missing = [spec for spec in model.inputs if spec.name not in feeds]
        feeds.update(random_feeds(missing, model.manifest.get("index_bounds")))
    return feeds


def cmd_run(args):
    import numpy as np

    model = _load_or_compile(args)
    feeds = _read_feeds(args, model)
    start = time.perf_counter()
    outputs = model.run(feeds)
    elapsed = time.perf_counter() - start
    if args.output:
        np.savez(args.output, **{s.name: o for s, o in zip(model.outputs, outputs)})
        print(f"wrote {len(outputs)} output(s) to {args.output} ({elapsed * 1e3:.2f} ms)")
        return
    print(f"ran in {elapsed * 1e3:.2f} ms")
    for spec, out in zip(model.outputs, outputs):
        flat = out.reshape(-1)
        head = np.array2string(flat[:6], precision=4, separator=", ")
        stats = (f" min {flat.min():.4g} max {flat.max():.4g} mean {flat.mean():.4g}"
                 if flat.size and out.dtype.kind in "fiu" else "")
        print(f"  {spec.name}: {out.dtype}{list(out.shape)}{stats} first {head}")


def cmd_bench(args):
    import json

    from accelkit import bench
    from accelkit.errors import OptionError

    duration = bench.parse_duration(args.duration) if args.duration else None
    if args.runs is not None and args.runs < 1:
        raise OptionError(f"--runs must be at least 1, got {args.runs}")
    feeds = _given_feeds(args)
    record = bench.bench(args.model, backend=args.backend, precision=args.precision,
                         input_shapes=_input_shapes(args.input_shape), feeds=feeds, runs=args.runs,
                         duration_s=duration, warmup=args.warmup, vs=args.vs, cache=not args.no_cache)
    print(bench.format_record(record))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        bench.plot(record, args.plot)
        print(f"wrote {args.plot}")


def _given_feeds(args):
    """Feeds from --input/--inputs, or None (the command makes random ones of the right shape)."""
    if not args.input and not args.inputs:
        return None
    return _read_feeds(args)


def cmd_profile(args):
    import json

    from accelkit import profile

    record = profile.profile(args.model, backend=args.backend, precision=args.precision,
                             input_shapes=_input_shapes(args.input_shape),
                             feeds=_given_feeds(args), runs=args.runs, warmup=args.warmup,
                             options=_backend_options(args.option))
    print(profile.format_record(record, top=args.top))
    if args.trace:
        profile.write_trace(record, args.trace)
        print(f"wrote {args.trace} (open in https://ui.perfetto.dev or chrome://tracing)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({k: v for k, v in record.items() if k != "trace_events"}, f, indent=1)
        print(f"wrote {args.json}")


def cmd_tune(args):
    import logging

    import accelkit
    from accelkit import tuning
    from accelkit.errors import OptionError

    if args.precision != "fp32":
        raise OptionError("tune: only --precision fp32 can be tuned in this accelkit version")
    if args.verbose:
        logging.basicConfig(format="%(message)s")
        logging.getLogger("accelkit.tune").setLevel(logging.INFO)
    options = tuning.TuneOptions(budget=args.budget, trials=args.trials, rpc_tracker=args.rpc_tracker,
                                 rpc_key=args.rpc_key, kernels=not args.no_kernels, tir=not args.no_tir)
    shapes = _input_shapes(args.input_shape)
    try:
        report = tuning.tune(args.model, backend=args.backend, input_shapes=shapes, options=options)
    except tuning.TuneInterrupted as stop:
        print(stop.report.format())
        print("interrupted: everything measured so far is in the database; run the same command "
              "again to continue", file=sys.stderr)
        return 130
    print(report.format())
    model = accelkit.compile(args.model, backend=args.backend, input_shapes=shapes)
    applied = model.manifest.get("tuning", {}).get("applied", {})
    count = sum(len(v) for v in applied.values())
    print(f"compiled with {count} tuned function(s) applied ({model.cache_status})")
    if not args.no_compare:
        _compare_untuned(args, model, shapes)
    if args.output:
        print(f"saved {model.save(args.output)}")


def _compare_untuned(args, tuned, shapes):
    """Time the untuned and the tuned model, alternating in one process (bench.measure)."""
    import accelkit
    from accelkit import bench

    untuned = accelkit.compile(args.model, backend=args.backend, input_shapes=shapes, tune=False)
    feeds = bench.random_feeds(tuned.inputs, tuned.manifest.get("index_bounds"))
    systems = [bench.System("untuned", untuned.run, 0.0), bench.System("tuned", tuned.run, 0.0)]
    bench.measure(systems, feeds, duration_s=6.0)
    a, b = (bench.statistics(s.times_ms)["p50_ms"] for s in systems)
    lo, hi = bench.ratio_interval(systems[0].block_medians()[1:], systems[1].block_medians()[1:])  # 1st: 1 run
    verdict = "no measurable difference" if lo <= 1.0 <= hi else "tuned faster" if lo > 1.0 else "tuned slower"
    same = bench.compare_outputs(tuned.run(feeds), untuned.run(feeds), [o.name for o in tuned.outputs])
    print(f"untuned {a:.3f} ms, tuned {b:.3f} ms (p50, alternating runs): {a / b:.3f}x "
          f"(90% interval {lo:.3f}-{hi:.3f}: {verdict}); "
          f"outputs: min cosine {same['min_cosine']:.7f}, max abs error {same['max_abs_err']:.2g}")


def cmd_rpc_server(args):
    import signal
    import time

    from tvm import rpc

    from accelkit import kernels
    from accelkit.errors import OptionError
    from accelkit.tuning import TuneOptions

    host, port = TuneOptions(rpc_tracker=args.tracker, rpc_key=args.key).tracker_address()
    try:
        server = rpc.Server(args.host, port=args.port, port_end=args.port + 100, tracker_addr=(host, port),
                            key=args.key, server_init_callback=kernels.load)
    except OSError as exc:
        raise OptionError(f"rpc-server: cannot listen on {args.host}:{args.port}: {exc}") from exc
    print(f"accelkit rpc-server: listening on {args.host}:{server.port}, registered with tracker "
          f"{host}:{port} as '{args.key}' (Ctrl-C stops it)", flush=True)

    def stop(signum, frame):
        raise KeyboardInterrupt  # SIGTERM too: never leave the server process behind

    signal.signal(signal.SIGTERM, stop)
    try:
        while server.proc is not None and server.proc.is_alive():
            time.sleep(0.5)
    finally:
        server.terminate()
    return 1


def cmd_info(args):
    from accelkit.artifact import read_manifest

    m = read_manifest(args.artifact)
    print(f"{args.artifact}: model '{m.get('model_name')}', created {m.get('created')}")
    _print_summary(m)
    tuned = m.get("tuning")
    if tuned:
        applied = tuned.get("applied", {})
        rows = [f"kernel {r}" for r in applied.get("kernels", [])] + [f"generated {r}" for r in applied.get("tir", [])]
        print(f"  tuned:     {len(rows)} function(s), database {tuned.get('database')}")
        for row in rows:
            print(f"             {row}")
    else:
        print("  tuned:     no (untuned defaults)")
    print("  versions:  " + ", ".join(f"{k} {v}" for k, v in sorted(m["versions"].items())))
    print("  files:     " + ", ".join(f"{n} (sha256 {h[:12]})" for n, h in m["files"].items()))


def cmd_backends(args):
    from accelkit.backends import get_backend, list_backends
    from accelkit.errors import AccelkitError

    for name in list_backends():
        try:
            be = get_backend(name)
            state = "available" if be.is_available() else "unavailable"
            desc = be.description
            where = type(be).__module__
        except AccelkitError as exc:
            state, desc, where = "broken", str(exc), ""
        print(f"{name:12s} {state:12s} {desc}" + (f"  [{where}]" if where else ""))
        if state != "broken":
            for option, help_text in sorted(be.options.items()):
                print(f"{'':12s} --option {option}=...: {help_text}")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def cmd_cache(args):
    from accelkit.cache import Cache, parse_size
    from accelkit.errors import OptionError

    store = Cache()
    if args.action == "dir":
        print(store.root)
    elif args.action == "ls":
        entries = store.list()
        print(f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'} in {store.root}, "
              f"{_size(sum(e.size for e in entries))}")
        for e in sorted(entries, key=lambda e: -e.last_used):
            used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
            print(f"  {e.key[:12]}  {e.info.get('backend', '?'):10s} {e.info.get('precision', '?'):5s} "
                  f"{_size(e.size):>10s}  last used {used}  {e.info.get('model', '?')}")
    elif args.action == "verify":
        report = store.verify()
        bad = [(e, p) for e, p in report if p]
        for e, problem in bad:
            print(f"  BAD {e.key[:12]}: {problem}")
        print(f"{len(report) - len(bad)} of {len(report)} entries OK"
              + (" (run `accelkit cache clear`, or compile again: bad entries are rebuilt)"
                 if bad else ""))
        return 1 if bad else 0
    elif args.action == "clear":
        print(f"removed {store.clear()} entries from {store.root}")
    elif args.action == "prune":
        if not args.max_size:
            raise OptionError("cache prune needs --max-size, e.g. --max-size 2G")
        removed = store.prune(parse_size(args.max_size))
        left = store.list()
        print(f"removed {len(removed)} least recently used entries ({_size(sum(e.size for e in removed))}); "
              f"{len(left)} left, {_size(sum(e.size for e in left))}")


def cmd_demo(args):
    from accelkit.demo import run_demo

    return run_demo(backend=args.backend)


COMMANDS = {"compile": cmd_compile, "run": cmd_run, "bench": cmd_bench, "profile": cmd_profile, "info": cmd_info, "backends": cmd_backends,
            "cache": cmd_cache, "demo": cmd_demo, "tune": cmd_tune, "rpc-server": cmd_rpc_server}


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    from accelkit.errors import AccelkitError

    try:
        if args.threads is not None:
            from accelkit.threads import set_num_threads

            set_num_threads(args.threads)
        return COMMANDS[args.command](args) or 0
    except AccelkitError as exc:
        if args.debug:
            raise
        print(f"accelkit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: say so, keep the trace for --debug
        if args.debug:
            raise
        print(f"accelkit {args.command}: internal error: {type(exc).__name__}: {exc}\n"
              f"(this is a bug in accelkit; rerun with --debug for the traceback and report it)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
