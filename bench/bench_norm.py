"""The fused norms (residual add + norm + per-token int8 quantization in one kernel)
against the unfused sequence a model runs (add, norm, quantize_per_token: three ops, each
on the same backend), per backend that can run here. Medians in ms, the thread count in
the results' environment (`threads`); `speedup` is unfused / fused."""

from __future__ import annotations

import torch

from fastllm import backend, ops, reference
from fastllm.bench.common import Context, measure


def _backends(ctx: Context) -> list[str]:
    names = ("triton", "torch") if ctx.gpu else ("cpu", "torch")
    return [n for n in names if backend.unavailable_reason(n, ctx.device) is None]


def _shapes(ctx: Context):
    if ctx.gpu:
        return (
            [(64, 4096), (4096, 4096)]
            if ctx.quick
            else [(1, 4096), (64, 4096), (4096, 4096), (8192, 8192)]
        )
    return [(64, 4096)] if ctx.quick else [(1, 4096), (64, 4096), (1024, 4096)]


def _pair(fn, args, r, s):
    """(fused, unfused) calls of the norm `fn` on args (x, weight[, bias])."""

    def fused():
        return fn(*args, residual=r, quantize=True, smooth_scale=s)

    def unfused():  # what a model runs without the fusion
        h = args[0] + r
        y = fn(h, *args[1:])
        return ops.quantize_per_token(y.float() / s), h

    return fused, unfused


def run(ctx: Context) -> None:
    dtype = torch.bfloat16 if ctx.gpu else torch.float32
    dev = ctx.device
    for norm in ("rms_norm", "layer_norm"):
        fn = getattr(ops, norm)
        for M, K in _shapes(ctx):
            x = torch.randn(M, K, device=dev, dtype=dtype)
            r = torch.randn(M, K, device=dev, dtype=dtype)
            w = torch.rand(K, device=dev, dtype=dtype) + 0.5
            args = (x, w) if norm == "rms_norm" else (x, w, torch.randn(K, device=dev, dtype=dtype))
            s = torch.rand(K, device=dev) + 0.5

            fused, unfused = _pair(fn, args, r, s)

            want = getattr(reference, norm)(*args, residual=r, quantize=True, smooth_scale=s)
            for name in _backends(ctx):
                with backend.use_backend(name):
                    (q, _), _ = fused()
                    if (q.int() - want[0][0].int()).abs().max().item() > 1:
                        print(f"  {norm} {name} {M}x{K}: differs from the reference; not timed")
                        continue
                    t_un = measure(unfused, dev, quick=ctx.quick)
                    t_fu = measure(fused, dev, quick=ctx.quick)
                case = f"add+{norm}+quant {M}x{K} {str(dtype)[6:]}"
                for impl, t in ((f"{name} unfused", t_un), (f"{name} fused", t_fu)):
                    ctx.add(
                        bench="norm",
                        case=case,
                        impl=impl,
                        ms=t["ms"],
                        speedup=t_un["ms"] / t["ms"],
                        note=f"threads {torch.get_num_threads()}; baseline: {name} unfused",
                    )
                print(
                    f"  {case:<42} {name:<7} unfused {t_un['ms']:.4f} ms  fused {t_fu['ms']:.4f} ms"
                    f"  x{t_un['ms'] / t_fu['ms']:.2f}  ({torch.get_num_threads()} threads)",
                    flush=True,
                )
