"""quantize_per_token on every backend that can run here, against PyTorch eager
(and torch.compile of the same code on a GPU). Reported in GB/s of the minimum
traffic (x read once, int8 and scales written once) and as a fraction of the
measured copy bandwidth."""

from __future__ import annotations

import torch

from fastllm import backend, reference
from fastllm.bench.common import Context, measure


def _eager(x):
    # what a user writes in plain PyTorch
    scale = x.abs().amax(dim=-1, keepdim=True).float() / 127
    scale = torch.where(scale > 0, scale, 1.0)
    return torch.round(x.float() / scale).clamp(-127, 127).to(torch.int8), scale.squeeze(-1)


def _shapes(ctx: Context):
    if ctx.gpu and not ctx.quick:
        return [(1, 4096), (64, 4096), (4096, 4096), (16384, 8192), (8192, 14336)]
    if ctx.gpu:
        return [(64, 4096), (4096, 4096)]
    return [(256, 4096)] if ctx.quick else [(64, 4096), (1024, 4096)]


def run(ctx: Context) -> None:
    dtype = torch.bfloat16 if ctx.gpu else torch.float32
    impls = {"eager": _eager}
    for name in ("cuda", "triton", "torch"):
        if backend.why_not("quantize_per_token", name, ctx.device, None) is None and (
            ctx.gpu or name == "torch"
        ):
            impls[name] = backend.implementation("quantize_per_token", name)
    if ctx.gpu:
        impls["torch.compile"] = torch.compile(_eager)

    for M, K in _shapes(ctx):
        x = torch.randn(M, K, device=ctx.device, dtype=dtype)
        ref_q, ref_s = reference.quantize_per_token(x)
        nbytes = x.numel() * x.element_size() + x.numel() + 4 * M
        base_ms = None
        for impl, fn in impls.items():
            q, s = fn(x)
            if not (torch.equal(q, ref_q) and torch.equal(s, ref_s)):
                print(f"  {impl} {M}x{K}: output differs from the reference; not timed")
                continue
            t = measure(lambda fn=fn, x=x: fn(x), ctx.device, quick=ctx.quick)
            gbps = nbytes / (t["ms"] * 1e-3) / 1e9
            base_ms = base_ms or t["ms"]
            row = ctx.add(
                bench="quant",
                case=f"quantize_per_token {M}x{K} {str(dtype)[6:]}",
                impl=impl,
                ms=t["ms"],
                metric="GB/s",
                value=gbps,
                of_ceiling=gbps / ctx.copy_gbps if ctx.copy_gbps else None,
                speedup=base_ms / t["ms"],
                note="baseline: eager",
            )
            print(f"  {row['case']:<40} {impl:<14} {t['ms']:.4f} ms  {gbps:8.1f} GB/s", flush=True)
