"""Tensor parallelism on the CPU: each fastllm.optimize configuration of a Llama-shaped
model (random weights from a config) in one process (TP=1) against the same model
sharded over two gloo processes by transformers' tp_plan (TP=2, fastllm.distributed).

Per configuration and TP size: the latency of one forward (prefill of a batch, and one
decode step against a KV cache), its speedup over TP=1 of the same configuration, and
the share of the TP=2 forward spent in collectives (the top-level c10d / functional
collective calls of the main thread in one profiled forward, waiting for the other rank
included: a profiled run, so an estimate).

The ranks run a fixed number of forwards (every forward has collectives, so the ranks
must agree on how many); TP=1 runs on rank 0 while rank 1 waits. Each process gets an
equal share of the cores (TP=1: the share of one rank), so the comparison is per core
count, not per machine. Needs transformers; skipped without it.

    python -m bench.bench_tp            # or: fastllm bench tp [--quick]
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import socket
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from fastllm.bench.common import Context

CONFIGS = {
    "unmodified": None,
    "attention": {},
    "w8a16": {"linear": "w8a16"},
    "w8a8": {"linear": "w8a8"},
    "2:4": {"linear": "2:4"},
    "block 0.5": {"linear": "block", "density": 0.5, "block_size": (32, 32)},
}
_COLLECTIVES = ("c10d::", "_c10d_functional::", "gloo:", "nccl:")


def _shape(quick: bool) -> tuple[str, dict, dict]:
    if quick:
        model = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=1024)  # fmt: skip
        return "llama-256x2", model, {"prefill": (2, 32), "decode": (2, 32), "reps": 5}
    model = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=4, vocab_size=2048)  # fmt: skip
    return "llama-512x4", model, {"prefill": (4, 64), "decode": (4, 64), "reps": 20}


def _build(shape: dict):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(max_position_embeddings=1024, **shape)
    return transformers.LlamaForCausalLM(cfg).eval()


def _inputs(model, sizes: dict):
    gen = torch.Generator().manual_seed(0)
    b, s = sizes["prefill"]
    prefill = torch.randint(0, model.config.vocab_size, (b, s), generator=gen)
    b, s = sizes["decode"]
    context = torch.randint(0, model.config.vocab_size, (b, s), generator=gen)
    return prefill, context


@torch.no_grad()
def _fns(model, prefill, context):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    model(context, past_key_values=cache, use_cache=True, logits_to_keep=1)
    tok = context[:, -1:]
    pos = torch.full((context.shape[0], 1), context.shape[1])

    def step():
        model(tok, past_key_values=cache, position_ids=pos, use_cache=True)
        cache.crop(-1)  # each timed step sees the same cache length

    return {"prefill": lambda: model(prefill, use_cache=False, logits_to_keep=1), "decode": step}


@torch.no_grad()
def _time(fn, reps: int) -> float:
    """Median ms of `reps` runs after two warm-ups; the same count on every rank."""
    fn()
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@torch.no_grad()
def _collective_share(fn) -> float:
    """Fraction of one profiled call of fn spent in collectives (main thread, top-level
    collective events only)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fn()
        wall = (time.perf_counter() - t0) * 1e6
    events = [e for e in prof.events() if e.name.startswith(_COLLECTIVES)]
    main = min((e.thread for e in prof.events()), default=0)

    def top(e):
        p = e.cpu_parent
        while p is not None:
            if p.name.startswith(_COLLECTIVES):
                return False
            p = p.cpu_parent
        return True

    spent = sum(e.cpu_time_total for e in events if e.thread == main and top(e))
    return min(spent / wall, 1.0) if wall > 0 else 0.0


def _worker(rank: int, world: int, port: int, quick: bool, out: str, threads: int) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), HF_HUB_OFFLINE="1")  # fmt: skip
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    import transformers

    import fastllm
    from fastllm import distributed

    transformers.utils.logging.set_verbosity_error()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    rows = []
    try:
        name, shape, sizes = _shape(quick)
        base = _build(shape)
        prefill, context = _inputs(base, sizes)
        calib = [prefill]
        for label, kwargs in CONFIGS.items():
            if rank == 0:  # TP=1: one process, while the other rank waits
                one = _build(shape)
                if kwargs is not None:
                    fastllm.optimize(one, calibration=calib, **kwargs)
                for case, fn in _fns(one, prefill, context).items():
                    rows.append({"config": label, "tp": 1, "case": case,
                                 "ms": _time(fn, sizes["reps"])})  # fmt: skip
                del one
            dist.barrier()
            tp = distributed.parallelize(_build(shape))  # the model's own tp_plan
            if kwargs is not None:
                fastllm.optimize(tp, calibration=calib, **kwargs)
            for case, fn in _fns(tp, prefill, context).items():
                ms = _time(fn, sizes["reps"])
                share = _collective_share(fn)
                rows.append({"config": label, "tp": world, "case": case, "ms": ms,
                             "collectives": share})  # fmt: skip
            del tp
        if rank == 0:
            Path(out).write_text(json.dumps({"model": name, "sizes": sizes, "rows": rows}))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure_tp(quick: bool, world: int = 2) -> dict:
    """Runs the workers; {"model", "sizes", "rows"} from rank 0."""
    import torch.multiprocessing as mp

    threads = max(1, (os.cpu_count() or 1) // world)
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "tp.json")
        mp.start_processes(_worker, args=(world, _free_port(), quick, out, threads),
                           nprocs=world, join=True, start_method="spawn")  # fmt: skip
        result = json.loads(Path(out).read_text())
    result["threads"] = threads
    return result


def run(ctx: Context) -> None:
    if importlib.util.find_spec("transformers") is None:
        print("  transformers is not installed: bench_tp skipped")
        return
    if not torch.distributed.is_available():
        print("  torch.distributed is not available: bench_tp skipped")
        return
    result = measure_tp(ctx.quick)
    sizes, threads = result["sizes"], result["threads"]
    one = {(r["config"], r["case"]): r["ms"] for r in result["rows"] if r["tp"] == 1}
    for r in result["rows"]:
        b, s = sizes[r["case"]]
        case = (f"{result['model']} prefill {b}x{s}" if r["case"] == "prefill"
                else f"{result['model']} decode batch {b}, cache {s}")  # fmt: skip
        note = f"cpu, gloo, {threads} threads per process"
        if "collectives" in r:
            note += f"; {100 * r['collectives']:.0f}% of the forward in collectives"
        ctx.add(
            bench="tp",
            case=case,
            impl=f"{r['config']} TP={r['tp']}",
            ms=r["ms"],
            metric="ms per forward",
            value=r["ms"],
            speedup=one[(r["config"], r["case"])] / r["ms"],
            note=note + "; speedup: over TP=1 of the same configuration",
        )


if __name__ == "__main__":
    import sys

    from fastllm.bench.common import markdown_table

    c = Context(device=torch.device("cpu"), quick="--quick" in sys.argv)
    run(c)
    print(markdown_table(c.rows))
