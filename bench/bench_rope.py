"""The fused decode-step prologue (rotary embedding of q and k + KV-cache append in one
kernel, fastllm.ops.rope_kv_append) against the unfused sequence a transformers model runs
(apply_rotary_pos_emb on q and k, then fastllm.ops.kv_cache_append), per backend that can
run here, on a paged cache. Medians in ms, the thread count in each row's note; `speedup`
is unfused / fused."""

from __future__ import annotations

import torch

from fastllm import backend, ops, reference
from fastllm.bench.common import Context, measure
from fastllm.reference.rope import rotate_half


def _backends(ctx: Context) -> list[str]:
    names = ("triton", "torch") if ctx.gpu else ("cpu", "torch")
    return [n for n in names if backend.unavailable_reason(n, ctx.device) is None]


def _shapes(ctx: Context):
    """(batch, n_new, Hq, Hkv, head_dim): Llama-3-8B heads, decode and a short chunk."""
    if ctx.quick:
        return [(8, 1, 32, 8, 128)]
    if ctx.gpu:
        return [(1, 1, 32, 8, 128), (64, 1, 32, 8, 128), (256, 1, 32, 8, 128), (8, 16, 32, 8, 128)]
    return [(1, 1, 32, 8, 128), (16, 1, 32, 8, 128), (4, 16, 32, 8, 128)]


def _apply_rotary_pos_emb(q, k, cos, sin):
    # transformers' Llama apply_rotary_pos_emb, on (B, H, n, D) with unsqueeze_dim=1
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def _pair(q, k, v, cos, sin, kc, vc, pos, table):
    """(fused, unfused) calls of one decode step's rotary embedding and cache append."""

    def fused():
        return ops.rope_kv_append(q, k, v, cos, sin, kc, vc, pos, block_table=table)

    def unfused():  # what a transformers decode step runs
        q_t, k_t = _apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        ops.kv_cache_append(k_t.transpose(1, 2), v, kc, vc, pos, block_table=table)
        return q_t

    return fused, unfused


def run(ctx: Context) -> None:
    dtype = torch.bfloat16 if ctx.gpu else torch.float32
    dev = ctx.device
    page = 16
    for B, n, Hq, Hkv, D in _shapes(ctx):
        q = torch.randn(B, n, Hq, D, device=dev, dtype=dtype)
        k = torch.randn(B, n, Hkv, D, device=dev, dtype=dtype)
        v = torch.randn(B, n, Hkv, D, device=dev, dtype=dtype)
        ang = torch.rand(B, n, D // 2, device=dev) * 1000
        emb = torch.cat((ang, ang), -1)
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        max_len = 1024
        blocks = max_len // page
        table = torch.randperm(B * blocks, device=dev, dtype=torch.int32).view(B, blocks)
        kc = torch.zeros(B * blocks, page, Hkv, D, device=dev, dtype=dtype)
        vc = torch.zeros_like(kc)
        pos = torch.randint(0, max_len - n, (B,), device=dev, dtype=torch.int32)

        fused, unfused = _pair(q, k, v, cos, sin, kc, vc, pos, table)
        want = reference.rope.apply_rotary(q, cos, sin)
        case = f"rope+append B{B} n{n} {Hq}/{Hkv}x{D} {str(dtype)[6:]}"
        for name in _backends(ctx):
            with backend.use_backend(name):
                if not torch.equal(fused(), want):
                    print(f"  {case} {name}: differs from the reference; not timed")
                    continue
                t_fu = measure(fused, dev, quick=ctx.quick)
            # the unfused baseline is PyTorch's elementwise ops plus kv_cache_append on
            # the same backend where it has one (its cpu backend is torch)
            with backend.use_backend(name if name != "cpu" else "torch"):
                t_un = measure(unfused, dev, quick=ctx.quick)
            threads = torch.get_num_threads()
            for impl, t in ((f"{name} unfused", t_un), (f"{name} fused", t_fu)):
                ctx.add(
                    bench="rope",
                    case=case,
                    impl=impl,
                    ms=t["ms"],
                    speedup=t_un["ms"] / t["ms"],
                    note=f"threads {threads}; baseline: apply_rotary_pos_emb + kv_cache_append",
                )
            print(
                f"  {case:<40} {name:<7} unfused {t_un['ms']:.4f} ms  fused {t_fu['ms']:.4f} ms"
                f"  x{t_un['ms'] / t_fu['ms']:.2f}  ({threads} threads)",
                flush=True,
            )
