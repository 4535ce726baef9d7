"""`fastllm bench`: finds bench/bench_*.py, runs each module's `run(ctx)`, writes results."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import time
import traceback
from pathlib import Path

import torch

from fastllm.bench import common


def available() -> list[str]:
    here = Path(__file__).resolve().parent
    return sorted(
        m.name.removeprefix("bench_")
        for m in pkgutil.iter_modules([str(here)])
        if m.name.startswith("bench_")
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "names", nargs="*", help=f"benchmarks to run (default: all of {available()})"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes and few repetitions")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument(
        "--out", default="fastllm-bench-results", help="folder for results.json/.md"
    )
    parser.add_argument(
        "--plot", action="store_true", help="also draw results.png (needs matplotlib)"
    )


def run(args: argparse.Namespace) -> int:
    names = args.names or available()
    unknown = sorted(set(names) - set(available()))
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; expected some of {available()}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ctx = common.Context(device=device, quick=args.quick)
    ctx.copy_gbps = common.copy_bandwidth(device, quick=args.quick)
    print(
        f"device {device}: measured copy bandwidth {ctx.copy_gbps:.1f} GB/s (read + write)",
        flush=True,
    )
    ctx.add(
        bench="copy",
        case=f"{'64 MiB' if args.quick or not ctx.gpu else '1 GiB'} copy_",
        impl="torch",
        metric="GB/s",
        value=ctx.copy_gbps,
        of_ceiling=1.0,
    )
    env = common.environment(device)
    failed = []
    for name in names:
        print(f"-- bench_{name}", flush=True)
        t0 = time.perf_counter()
        try:
            importlib.import_module(f"fastllm.bench.bench_{name}").run(ctx)
        except Exception:  # report and go on: one broken family must not hide the others
            traceback.print_exc()
            failed.append(name)
            ctx.add(bench=name, case="(failed: see the log)", impl="-")
        print(f"   bench_{name}: {time.perf_counter() - t0:.1f} s", flush=True)
        # written after every family, so that a run stopped by a time limit keeps its rows
        common.write_results(ctx.rows, env, args.out)
    paths = common.write_results(ctx.rows, env, args.out, plot=args.plot)
    print()
    print(common.markdown_table(ctx.rows))
    print()
    print("wrote " + ", ".join(str(p) for p in paths))
    if failed:
        print(f"failed: {failed}")
    return 1 if failed else 0
