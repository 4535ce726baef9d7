"""The `fastllm` command: `fastllm optimize`, `fastllm doctor`, `fastllm bench`."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("doctor", help="versions, GPU, native module, and which backend serves which op")
    bench = sub.add_parser("bench", help="run the microbenchmarks (bench/bench_*.py)")
    from fastllm.bench.runner import add_arguments

    add_arguments(bench)
    opt = sub.add_parser(
        "optimize", help="the float model against each fastllm configuration: speed, accuracy"
    )
    from fastllm.optimize_cmd import add_arguments as add_optimize_arguments

    add_optimize_arguments(opt)
    args = parser.parse_args(argv)

    if args.command == "optimize":
        from fastllm.optimize_cmd import UsageError
        from fastllm.optimize_cmd import run as optimize

        try:
            return optimize(args)
        except UsageError as e:  # one line, exit status 2: as argparse reports its own errors
            print(f"{opt.prog}: error: {e}", file=sys.stderr)
            raise

    if args.command == "doctor":
        from fastllm.doctor import main as doctor

        return doctor()
    from fastllm.bench.runner import run

    return run(args)
