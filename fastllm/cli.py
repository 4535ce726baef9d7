"""The `fastllm` command: `fastllm doctor`, `fastllm bench`."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("doctor", help="versions, GPU, native module, and which backend serves which op")
    bench = sub.add_parser("bench", help="run the microbenchmarks (bench/bench_*.py)")
    from fastllm.bench.runner import add_arguments

    add_arguments(bench)
    args = parser.parse_args(argv)

    if args.command == "doctor":
        from fastllm.doctor import main as doctor

        return doctor()
    from fastllm.bench.runner import run

    return run(args)
