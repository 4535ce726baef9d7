"""End to end on a Llama-shaped model (random weights from a config): prefill and decode
tokens/s of each fastllm.optimize configuration against the unmodified model, eager and
compiled.

GPU: a ~1.2B-parameter Llama (Llama-3.2-1B shapes) in bfloat16; CPU: a small one in
float32. Decode is one new token per sequence against a KV cache of `cache` tokens (the
cache is cropped back after every step, so each timed step sees the same length).
Needs transformers; skipped without it.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import warnings

import torch

from fastllm.bench.common import Context, measure

CONFIGS = {
    "unmodified": None,
    "attention": {},
    "w8a8": {"linear": "w8a8"},
    "w8a8 + fuse": {"linear": "w8a8", "fuse": True},
    "w8a16": {"linear": "w8a16"},
    "2:4": {"linear": "2:4"},
    "block 0.5": {"linear": "block", "density": 0.5},
}
# compiling is slow (a minute for a 1B model): only the baseline, on the first size of each
COMPILED = ("unmodified",)


def _shape(ctx: Context) -> tuple[str, dict, dict]:
    if ctx.gpu and not ctx.quick:
        model = dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
        )
        sizes = dict(prefill=[(1, 2048)], decode=[(1, 1024), (32, 1024)])
        return "llama-1.2B", model, sizes
    if ctx.gpu:
        model = dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=4,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=32000,
        )
        return "llama-4-layer", model, dict(prefill=[(1, 1024)], decode=[(1, 1024)])
    model = dict(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
    )
    sizes = dict(prefill=[(1, 128)], decode=[(1, 128)] if ctx.quick else [(1, 128), (8, 128)])
    return "llama-small", model, sizes


def _build(ctx: Context, shape: dict):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    cfg = transformers.LlamaConfig(max_position_embeddings=4096, **shape)
    dtype = torch.bfloat16 if ctx.gpu else torch.float32
    torch.manual_seed(0)
    with torch.device(ctx.device):
        model = transformers.LlamaForCausalLM(cfg)
    return model.to(dtype).eval(), cfg


@torch.no_grad()
def _prefill_fn(model, batch, seq, ctx):
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=ctx.device)
    return lambda: model(ids, use_cache=False, logits_to_keep=1)


@torch.no_grad()
def _decode_fn(model, step_model, batch, cache_len, ctx):
    from transformers import DynamicCache

    ids = torch.randint(0, model.config.vocab_size, (batch, cache_len), device=ctx.device)
    cache = DynamicCache(config=model.config)
    model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    tok = ids[:, -1:]
    pos = torch.full((batch, 1), cache_len, device=ctx.device)

    def step():
        step_model(tok, past_key_values=cache, position_ids=pos, use_cache=True)
        cache.crop(-1)  # drop the token just appended

    return step


def run(ctx: Context) -> None:
    if importlib.util.find_spec("transformers") is None:
        print("  transformers is not installed: bench_models skipped")
        return
    import fastllm

    # newer transformers renamed past_key_values to cache; the old name works in both
    warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
    name, shape, sizes = _shape(ctx)
    base, _ = _build(ctx, shape)
    params = sum(p.numel() for p in base.parameters()) / 1e9
    print(f"  {name}: {params:.2f}B parameters, {next(base.parameters()).dtype}", flush=True)
    baseline: dict[str, float] = {}
    for label, kwargs in CONFIGS.items():
        if kwargs is None:
            model = base
        else:
            model = copy.deepcopy(base)
            try:
                fastllm.optimize(model, **kwargs)
            except ValueError as e:
                print(f"  {label}: skipped ({e})")
                continue
        variants = [("eager", model)]
        if label in COMPILED and not ctx.quick:
            variants.append(("compiled", torch.compile(model, dynamic=False)))
        for mode, m in variants:
            impl = f"{label} ({mode})"
            these = {k: v[:1] for k, v in sizes.items()} if mode == "compiled" else sizes
            for batch, seq in these["prefill"]:
                case = f"{name} prefill {batch}x{seq}"
                _row(ctx, baseline, case, impl, _prefill_fn(m, batch, seq, ctx), batch * seq)
            for batch, cache_len in these["decode"]:
                case = f"{name} decode batch {batch}, cache {cache_len}"
                fn = _decode_fn(model, m, batch, cache_len, ctx)
                _row(ctx, baseline, case, impl, fn, batch)
        if model is not base:
            del model
            if ctx.gpu:
                torch.cuda.empty_cache()


def _row(ctx, baseline, case, impl, fn, tokens) -> None:
    with torch.no_grad():
        t = measure(fn, ctx.device, quick=ctx.quick, flush_l2=False)
    baseline.setdefault(case, t["ms"])  # the first impl of a case: unmodified eager
    rate = tokens / (t["ms"] * 1e-3)
    row = ctx.add(
        bench="models",
        case=case,
        impl=impl,
        ms=t["ms"],
        metric="tokens/s",
        value=rate,
        speedup=baseline[case] / t["ms"],
        note="baseline: unmodified (eager)",
    )
    print(f"  {case:<40} {impl:<24} {row['ms']:9.3f} ms {rate:12.1f} tok/s", flush=True)
