"""The `fastllm` command: `fastllm optimize`, `fastllm serve`, `fastllm doctor`, `fastllm bench`."""

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
    serve = sub.add_parser(
        "serve",
        help="transformers' OpenAI-compatible server (transformers serve) on fastllm kernels",
        description="transformers' OpenAI-compatible server (the endpoints and request format "
        "of `transformers serve`), pinned to MODEL_DIR, with fastllm attention and, with "
        "--linear, fastllm linear layers.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    from fastllm.serve import add_arguments as add_serve_arguments

    add_serve_arguments(serve)
    args = parser.parse_args(argv)

    if args.command == "serve":
        from fastllm.optimize_cmd import UsageError
        from fastllm.serve import run as serve_run

        try:
            return serve_run(args)
        except UsageError as e:  # one line, exit status 2, as for optimize
            print(f"{serve.prog}: error: {e}", file=sys.stderr)
            raise

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
