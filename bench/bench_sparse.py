"""Sparse linear layers against dense, in the same process.

GPU: block_sparse_linear (64x64 tiles, densities 0.1-0.9, 4096 and 8192 dims, M = 2048)
against dense bf16 F.linear on the same (pruned) weight and PyTorch's BSR matmul;
sparse24_linear (compressed 2:4, M <= 64) against dense bf16 F.linear and PyTorch's
semi-structured sparse F.linear where this PyTorch has it. Reported as TFLOP/s of
the work the layer needs (2·M·N·K·density) and, for 2:4, GB/s of the bytes read
(values + metadata + x) against the measured copy bandwidth.

CPU: the torch backend of both ops against dense F.linear (float32).

Targets (issue, H200): block >= 1.4x dense at density 0.5, >= 3x at 0.2; 2:4 >= 1.4x
dense at M <= 16.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from fastllm import backend
from fastllm.bench.common import Context, measure
from fastllm.sparse import compress_24, prune, to_block_sparse


def _impl(op: str, name: str, device: torch.device):
    if backend.unavailable_reason(name, device) is not None:
        return None
    return backend.implementation(op, name)


def _row(ctx, case, impl, t, flops, base_ms, nbytes=None):
    tflops = flops / (t["ms"] * 1e-3) / 1e12
    row = ctx.add(
        bench="sparse",
        case=case,
        impl=impl,
        ms=t["ms"],
        metric="GB/s" if nbytes else "TFLOP/s",
        value=nbytes / (t["ms"] * 1e-3) / 1e9 if nbytes else tflops,
        of_ceiling=(nbytes / (t["ms"] * 1e-3) / 1e9) / ctx.copy_gbps
        if nbytes and ctx.copy_gbps
        else None,
        speedup=base_ms / t["ms"] if base_ms else 1.0,
        note="baseline: dense F.linear",
    )
    print(f"  {case:<44} {impl:<14} {t['ms']:.4f} ms  x{row['speedup']:.2f}", flush=True)


def _time(ctx: Context, fn, *args) -> dict:
    return measure(lambda: fn(*args), ctx.device, quick=ctx.quick)


def _close(y, ref) -> bool:
    y, ref = y.float(), ref.float()
    return bool(torch.isfinite(y).all()) and (y - ref).norm() <= 2e-2 * ref.norm()


def _torch_bsr(bsw, N, K):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w = torch.sparse_bsr_tensor(bsw.crow_indices, bsw.col_indices, bsw.blocks, (N, K))
    return lambda x: (w @ x.t()).t()


def _semi_structured(w_pruned):
    from torch.sparse import to_sparse_semi_structured

    ws = to_sparse_semi_structured(w_pruned)
    return lambda x: F.linear(x, ws)


def _block(ctx: Context, dtype) -> None:
    if ctx.gpu:
        dims = [4096] if ctx.quick else [4096, 8192]
        densities = [0.2, 0.5] if ctx.quick else [0.1, 0.2, 0.3, 0.5, 0.7, 0.9]
        M, names = 2048, ["triton", "torch"]
    else:
        dims, densities, M, names = [1024], [0.1, 0.5], 16, ["torch"]
    for D in dims:
        w = torch.randn(D, D, device=ctx.device, dtype=dtype)
        x = torch.randn(M, D, device=ctx.device, dtype=dtype)
        for density in densities:
            mask = prune(w, "block", block_size=(64, 64), density=density)
            bsw = to_block_sparse(w, mask, (64, 64))
            dense_w = torch.where(mask, w, torch.zeros((), dtype=dtype, device=ctx.device))
            ref = F.linear(x.float(), dense_w.float())
            case = f"block 64x64 d={density} M={M} {D}x{D} {str(dtype)[6:]}"
            flops = 2 * M * D * D * density
            base = _time(ctx, F.linear, x, dense_w)
            _row(ctx, case, "dense", base, flops, base["ms"])
            impls = {n: _impl("block_sparse_linear", n, ctx.device) for n in names}
            for name, fn in impls.items():
                if fn is None:
                    continue
                args = (x, *bsw[:3], None, D)
                if not _close(fn(*args), ref):
                    print(f"  {case}: {name} differs from dense; not timed")
                    continue
                _row(ctx, case, name, _time(ctx, fn, *args), flops, base["ms"])
            if ctx.gpu:
                try:
                    call = _torch_bsr(bsw, D, D)
                    if _close(call(x), ref):
                        _row(ctx, case, "torch BSR", _time(ctx, call, x), flops, base["ms"])
                except (RuntimeError, NotImplementedError, TypeError) as e:
                    print(f"  {case}: torch BSR matmul unavailable ({str(e)[:80]})")


def _sparse24(ctx: Context, dtype) -> None:
    if ctx.gpu:
        shapes = [(4096, 4096)] if ctx.quick else [(4096, 4096), (14336, 4096), (4096, 14336)]
        Ms = [1, 16] if ctx.quick else [1, 4, 16, 64]
        names = ["cuda", "triton", "torch"]
    else:
        shapes, Ms, names = [(1024, 1024)], [1, 16], ["torch"]
    for N, K in shapes:
        w = torch.randn(N, K, device=ctx.device, dtype=dtype)
        mask = prune(w)
        values, metadata = compress_24(w, mask)
        dense_w = torch.where(mask, w, torch.zeros((), dtype=dtype, device=ctx.device))
        semi = None
        if ctx.gpu:
            try:
                semi = _semi_structured(dense_w)
            except (RuntimeError, NotImplementedError, ImportError, TypeError) as e:
                print(f"  2:4 {N}x{K}: semi-structured sparse unavailable ({str(e)[:80]})")
        for M in Ms:
            x = torch.randn(M, K, device=ctx.device, dtype=dtype)
            ref = F.linear(x.float(), dense_w.float())
            case = f"2:4 M={M} {N}x{K} {str(dtype)[6:]}"
            flops = 2 * M * N * K * 0.5
            esize = dense_w.element_size()
            nbytes = values.numel() * esize + metadata.numel() * 2 + x.numel() * esize
            base = _time(ctx, F.linear, x, dense_w)
            _row(ctx, case, "dense", base, flops, base["ms"], N * K * esize + x.numel() * esize)
            for name in names:
                if backend.why_not("sparse24_linear", name, ctx.device, x, values, metadata, None):
                    continue
                fn = backend.implementation("sparse24_linear", name)
                args = (x, values, metadata, None)
                if not _close(fn(*args), ref):
                    print(f"  {case}: {name} differs from dense; not timed")
                    continue
                _row(ctx, case, name, _time(ctx, fn, *args), flops, base["ms"], nbytes)
            if semi is not None:
                try:
                    if _close(semi(x), ref):
                        t = _time(ctx, semi, x)
                        _row(ctx, case, "torch semi-structured", t, flops, base["ms"])
                except (RuntimeError, NotImplementedError) as e:
                    print(f"  {case}: semi-structured F.linear failed ({str(e)[:80]})")


def run(ctx: Context) -> None:
    dtype = torch.bfloat16 if ctx.gpu else torch.float32
    _sparse24(ctx, dtype)
    _block(ctx, dtype)
