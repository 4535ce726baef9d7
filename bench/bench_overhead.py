"""What a call costs beyond its kernel, and what that does to decoding a small model.

1. Per-op overhead. Each op on the decode path, called through its public function with
   tiny tensors (the kernel's own work is close to nothing), against the implementation
   of the backend that served it, called directly with the arguments the op hands it:
   overhead = call - impl is what the op adds around its backend (argument and value
   checks, the backend choice, the custom-op boundary where it is crossed; the
   launchers' own allocations and pointer passing are in impl). Host time: perf_counter
   around a loop of calls, synchronized once at the end (tiny calls are host-bound on a
   GPU too).
2. Decode tokens/s of a small random Llama, and of a wider one (LLAMAS; built from a
   config, as tests/test_hf.py does): the unmodified model, then fastllm.optimize with
   fastllm attention and
   linear None / w8a8 / w8a16, eager and under torch.compile. One new token per step
   against a cache of CACHE tokens, cropped back after each step so that every timed
   step sees the same length.

The contenders of each part are timed side by side in one process, in alternating
rounds; each number is the median over the rounds. The CPU thread count is in the notes.

    fastllm bench overhead [--quick]
    python bench/bench_overhead.py [--quick] [--ops | --decode [--eager]]

(the second form also runs against another checkout: PYTHONPATH=/path/to/it).
"""

from __future__ import annotations

import copy
import importlib.util
import os
import statistics
import sys
import time
import warnings

import torch

from fastllm.bench.common import Context

BATCH, CACHE = 1, 64
# Llama shapes (random weights): the small one, where per-call cost is most of a step,
# and a wider one (not with --quick), where reading the weights starts to count
LLAMAS = {
    "llama 2 layers 256x512": dict(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
    ),
    "llama 2 layers 1024x2816": dict(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=1024,
    ),
}
CONFIGS = {  # label -> fastllm.optimize keyword arguments (None: the unmodified model)
    "unmodified": None,
    "float": {"linear": None},
    "w8a8": {"linear": "w8a8"},
    "w8a16": {"linear": "w8a16"},
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternate(fns: dict, device: torch.device, *, rounds: int, calls: int) -> dict[str, float]:
    """Median seconds per call of each fn: `rounds` rounds, each timing `calls` calls of
    every fn in turn (so that a change of machine load hits every contender alike)."""
    for fn in fns.values():  # warm-up (first-call work, compilation)
        for _ in range(3):
            fn()
    _sync(device)
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            _sync(device)
            times[name].append((time.perf_counter() - t0) / calls)
    return {name: statistics.median(t) for name, t in times.items()}


# --- 1. per-op overhead ------------------------------------------------------------------------


def _op_calls(device: torch.device):
    """op -> (public call, op arguments as the backends receive them)."""
    from fastllm import ops

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    K = N = 64
    x = torch.randn(1, K, device=device, dtype=dtype)
    w, ws = ops.quantize_per_channel(torch.randn(N, K, device=device))
    B, S, Hq, Hkv, D = 1, CACHE, 4, 2, 64
    q = torch.randn(B, 1, Hq, D, device=device, dtype=dtype)
    kc = torch.randn(B, S, Hkv, D, device=device, dtype=dtype)
    vc = torch.randn(B, S, Hkv, D, device=device, dtype=dtype)
    kn = torch.randn(B, 1, Hkv, D, device=device, dtype=dtype)
    lens = torch.full((B,), S, dtype=torch.int32, device=device)
    pos = torch.full((B,), S - 1, dtype=torch.int32, device=device)
    return {
        "quantize_per_token": (lambda: ops.quantize_per_token(x), (x,)),
        "int8_dynamic_linear": (
            lambda: ops.int8_dynamic_linear(x, w, ws),
            (x, w, ws, None, None),
        ),
        "int8_weight_only_linear": (
            lambda: ops.int8_weight_only_linear(x, w, ws),
            (x, w, ws, None),
        ),
        "decode_attention": (
            lambda: ops.decode_attention(q, kc, vc, lens),
            (q, kc, vc, lens, None, D**-0.5, True, -1, 0, 0.0, 0),
        ),
        "kv_cache_append": (
            lambda: ops.kv_cache_append(kn, kn, kc, vc, pos),
            (kn, kn, kc, vc, pos, None),
        ),
    }


def op_overhead(ctx: Context) -> None:
    from fastllm import backend

    threads = torch.get_num_threads()
    fns, served = {}, {}
    for op, (call, args) in _op_calls(ctx.device).items():
        call()
        name = backend.last_backend(op)
        impl = backend.implementation(op, name)
        served[op] = name
        fns[(op, "call")] = call
        fns[(op, "impl")] = lambda impl=impl, args=args: impl(*args)
    rounds, calls = (5, 100) if ctx.quick else (15, 300)
    t = alternate(fns, ctx.device, rounds=rounds, calls=calls)
    print(f"  per-op overhead, {threads} thread(s), {ctx.device}:")
    for op, name in served.items():
        call_us, impl_us = t[(op, "call")] * 1e6, t[(op, "impl")] * 1e6
        ctx.add(
            bench="overhead",
            case=f"{op} (tiny)",
            impl=f"public call ({name})",
            ms=call_us / 1e3,
            metric="us overhead",
            value=call_us - impl_us,
            note=f"impl alone {impl_us:.1f} us; {threads} thread(s)",
        )
        print(
            f"  {op:<26} {name:<10} call {call_us:8.1f} us   impl {impl_us:8.1f} us"
            f"   overhead {call_us - impl_us:8.1f} us",
            flush=True,
        )


# --- 2. decode tokens/s of a small Llama --------------------------------------------------------


def _build(device: torch.device, shape: dict):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    cfg = transformers.LlamaConfig(max_position_embeddings=1024, **shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return model.to(dtype).eval()


def _decode_step(model, step_model, device: torch.device):
    from transformers import DynamicCache

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (BATCH, CACHE), generator=gen).to(device)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    tok = ids[:, -1:]
    pos = torch.full((BATCH, 1), CACHE, device=device)

    @torch.no_grad()
    def step():
        step_model(tok, past_key_values=cache, position_ids=pos, use_cache=True)
        cache.crop(-1)  # drop the token just appended

    return step


def decode_rate(ctx: Context, *, compiled: bool = True) -> None:
    if importlib.util.find_spec("transformers") is None:
        print("  transformers is not installed: decode tokens/s skipped")
        return
    warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
    for name, shape in list(LLAMAS.items())[: 1 if ctx.quick else None]:
        _decode_rate(ctx, f"{name}, decode batch {BATCH}, cache {CACHE}", shape, compiled)


def _decode_rate(ctx: Context, case: str, shape: dict, compiled: bool) -> None:
    import fastllm

    base = _build(ctx.device, shape)
    fns = {}
    for label, kwargs in CONFIGS.items():
        model = base if kwargs is None else fastllm.optimize(copy.deepcopy(base), **kwargs)
        fns[(label, "eager")] = _decode_step(model, model, ctx.device)
        if compiled:
            step_model = torch.compile(model, dynamic=False)
            fns[(label, "compiled")] = _decode_step(model, step_model, ctx.device)
    rounds, calls = (3, 10) if ctx.quick else (9, 30)
    t = alternate(fns, ctx.device, rounds=rounds, calls=calls)
    threads = torch.get_num_threads()
    print(f"  {case}, {threads} thread(s), {ctx.device}:")
    for (label, mode), sec in t.items():
        base_sec = t[("unmodified", mode)]
        ctx.add(
            bench="overhead",
            case=case,
            impl=f"{label} ({mode})",
            ms=sec * 1e3,
            metric="tokens/s",
            value=BATCH / sec,
            speedup=base_sec / sec,
            note=f"baseline: unmodified ({mode}); {threads} thread(s)",
        )
        print(
            f"  {label:<12} {mode:<9} {sec * 1e3:8.3f} ms/step {BATCH / sec:9.1f} tokens/s"
            f"  x{base_sec / sec:.2f} of unmodified",
            flush=True,
        )


def run(ctx: Context) -> None:
    op_overhead(ctx)
    decode_rate(ctx, compiled=not ctx.quick or ctx.gpu)


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ctx = Context(device=device, quick=quick)
    if "--ops" in sys.argv:
        op_overhead(ctx)
    elif "--decode" in sys.argv:
        decode_rate(ctx, compiled="--eager" not in sys.argv)
    else:
        run(ctx)
