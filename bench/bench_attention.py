"""Attention: prefill and KV-cache decode on every backend that can run here, against
SDPA in the same process.

Prefill (GPU): bf16, 16k tokens per call (batch = 16384 / seqlen), 2048 / head_dim heads,
against SDPA with each of its backends forced through torch.nn.attention.sdpa_kernel
(flash, efficient, cuDNN, math; the ones this PyTorch has and that accept the call;
math only up to seq 2k, its S x S scores do not fit beyond). TFLOP/s count
4 * B * H * Sq * Sk * D, halved when causal; `of_ceiling` is the fraction of 989 TFLOP/s,
the H100/H200 SXM dense bf16 peak. Speedup is over SDPA-flash. To fit about 60-90 s
the grid is a subset: head_dim 128 at seq 512, 2k, 8k, 16k and head_dim 64 at 2k and
16k, each causal and not (--quick: head_dim 128 at 512 and 2k).

Decode (GPU): bf16, q_len 1, 32 q heads over 8 kv heads (GQA 4), head_dim 128, every
sequence's cache full, contiguous and paged (block_size 16, shuffled blocks), at
(batch, cache length) = (1, 1k), (1, 64k), (8, 4k), (8, 32k), (64, 2k), (64, 16k)
(--quick: the first two). GB/s of K and V read once; `of_ceiling` is the
fraction of the measured copy bandwidth. The baseline is SDPA on the same keys as a
contiguous (batch, heads, seqlen, head_dim) view with GQA (for paged rows: on the
equivalent contiguous cache, which SDPA needs).

CPU: the torch backend against plain SDPA at small sizes, in float32.

Backends are timed at the implementation level (the normalized arguments of
fastllm/ops/attention.py), without the public function's Python checks. Every
implementation is checked against the reference before it is timed, on a slice of the
problem (the first and last sequence, two q heads) where the whole would not fit in fp32.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from fastllm import backend, reference
from fastllm.bench.common import Context, measure

PEAK_TFLOPS = 989.0  # H100/H200 SXM dense bf16
PEAK_NOTE = "of_ceiling: fraction of 989 TFLOP/s (H100/H200 SXM dense bf16 peak)"
TOKENS = 16384  # prefill tokens per call (batch * seqlen)
HIDDEN = 2048  # prefill heads * head_dim
DECODE_HEADS = (32, 8, 128)  # Hq, Hkv, head_dim


def _rel_err(out, ref) -> float:
    out, ref = out.double(), ref.double()
    if torch.isnan(out).any():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _sdpa_backends() -> dict:
    """name -> context manager forcing that SDPA backend (the ones this PyTorch has)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return {}
    names = {
        "FLASH_ATTENTION": "sdpa-flash",
        "EFFICIENT_ATTENTION": "sdpa-efficient",
        "CUDNN_ATTENTION": "sdpa-cudnn",
        "MATH": "sdpa-math",
    }
    return {
        label: functools.partial(sdpa_kernel, getattr(SDPBackend, attr))
        for attr, label in names.items()
        if hasattr(SDPBackend, attr)
    }


def _kernel_impls(op: str, device: torch.device, *args) -> dict:
    impls = {}
    for name in ("cuda", "triton"):
        if backend.why_not(op, name, device, *args) is None:
            impls[name] = backend.implementation(op, name)
    return impls


def _first(fn, *args):
    return fn(*args)[0]


def _sdpa_forced(force, qt, kt, vt, causal):
    with force():
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).transpose(1, 2)


# --- prefill ---------------------------------------------------------------------------------


def _prefill_cases(ctx: Context):
    if ctx.quick:
        return [(s, 128, c) for s in (512, 2048) for c in (False, True)]
    cases = [(s, 128, c) for s in (512, 2048, 8192, 16384) for c in (False, True)]
    return cases + [(s, 64, c) for s in (2048, 16384) for c in (False, True)]


def _prefill_ref_check(out, q, k, v, causal) -> float:
    """Error of out against the reference on the first and last sequence, two heads."""
    errs = []
    for b in sorted({0, q.shape[0] - 1}):
        sl = (slice(b, b + 1), slice(None), slice(0, 2))
        ref = reference.attention(q[sl], k[sl], v[sl], causal=causal)
        errs.append(_rel_err(out[sl], ref))
    return max(errs)


def _prefill_gpu(ctx: Context) -> None:
    dtype, dev = torch.bfloat16, ctx.device
    sdpa = _sdpa_backends()
    for seqlen, d, causal in _prefill_cases(ctx):
        heads, batch = HIDDEN // d, max(1, TOKENS // seqlen)
        q, k, v = (torch.randn(batch, seqlen, heads, d, device=dev, dtype=dtype) for _ in range(3))
        args = (q, k, v, causal, d**-0.5, -1, 0 if causal else -1, 0.0, None, None)
        args += (seqlen, seqlen, False)
        flops = 4 * batch * heads * seqlen * seqlen * d * (0.5 if causal else 1.0)
        impls = {
            n: functools.partial(_first, f, *args)
            for n, f in _kernel_impls("attention", dev, *args).items()
        }
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        for label, force in sdpa.items():
            if label == "sdpa-math" and seqlen > 2048:
                continue

            impls[label] = functools.partial(_sdpa_forced, force, qt, kt, vt, causal)
        case = f"prefill B{batch} S{seqlen} H{heads} D{d} {'causal' if causal else 'full'} bf16"
        rows = {}
        for impl, fn in impls.items():
            try:
                out = fn()
            except RuntimeError as e:  # an SDPA backend that does not take this call
                print(f"  {case:<44} {impl:<15} not available: {str(e).splitlines()[0][:80]}")
                continue
            err = _prefill_ref_check(out, q, k, v, causal)
            del out
            if not err <= 1e-2:
                print(f"  {case}: {impl} differs from the reference (rel err {err:.3g}); not timed")
                continue
            t = measure(fn, dev, quick=ctx.quick)
            rows[impl] = t["ms"]
            tflops = flops / (t["ms"] * 1e-3) / 1e12
            print(f"  {case:<44} {impl:<15} {t['ms']:.4f} ms  {tflops:7.1f} TFLOP/s", flush=True)
            ctx.add(
                bench="attention",
                case=case,
                impl=impl,
                ms=t["ms"],
                metric="TFLOP/s",
                value=tflops,
                of_ceiling=tflops / PEAK_TFLOPS,
                note=PEAK_NOTE + "; speedup over sdpa-flash",
            )
        base = rows.get("sdpa-flash")
        for row in ctx.rows:
            if row.get("case") == case and base:
                row["speedup"] = base / row["ms"]
        del q, k, v, qt, kt, vt
        torch.cuda.empty_cache()


# --- decode ------------------------------------------------------------------------------------


def _decode_cases(ctx: Context):
    cases = [(1, 1024), (1, 65536), (8, 4096), (8, 32768), (64, 2048), (64, 16384)]
    return cases[:2] if ctx.quick else cases


def _paged_copy(k, v, block_size):
    """The contiguous caches scattered into shuffled blocks; returns caches and block table."""
    batch, s, h, d = k.shape
    per_seq = s // block_size
    perm = torch.randperm(batch * per_seq, device=k.device)
    kp = torch.empty(batch * per_seq, block_size, h, d, device=k.device, dtype=k.dtype)
    vp = torch.empty_like(kp)
    kp[perm] = k.reshape(batch * per_seq, block_size, h, d)
    vp[perm] = v.reshape(batch * per_seq, block_size, h, d)
    return kp, vp, perm.view(batch, per_seq).int()


def _decode_run(ctx: Context, batch, s, hq, hkv, d, dtype, with_kernels=True) -> None:
    dev = ctx.device
    k = torch.randn(batch, s, hkv, d, device=dev, dtype=dtype)
    v = torch.randn(batch, s, hkv, d, device=dev, dtype=dtype)
    q = torch.randn(batch, 1, hq, d, device=dev, dtype=dtype)
    lens = torch.full((batch,), s, dtype=torch.int32, device=dev)
    nbytes = 2 * k.numel() * k.element_size()
    check = sorted({0, batch - 1})
    ref = {
        b: reference.attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], causal=True) for b in check
    }
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = {"enable_gqa": True} if hq != hkv else {}

    def sdpa():
        return F.scaled_dot_product_attention(qt, kt, vt, **gqa).transpose(1, 2)

    layouts = [("contiguous", k, v, None)]
    if ctx.gpu:
        layouts.append(("paged16", *_paged_copy(k, v, 16)))
    for layout, kc, vc, bt in layouts:
        args = (q, kc, vc, lens, bt, d**-0.5, True, -1, 0, 0.0, 0)
        impls = {}
        if with_kernels:
            impls.update(
                {
                    n: functools.partial(f, *args)
                    for n, f in _kernel_impls("decode_attention", dev, *args).items()
                }
            )
        torch_impl = backend.implementation("decode_attention", "torch")
        impls["torch"] = functools.partial(torch_impl, *args)
        impls["sdpa"] = sdpa
        case = f"decode B{batch} cache{s} H{hq}/{hkv} D{d} {layout} {str(dtype)[6:]}"
        times = {}
        for impl, fn in impls.items():
            try:
                out = fn()
            except (RuntimeError, TypeError) as e:
                print(f"  {case:<52} {impl:<8} not available: {str(e).splitlines()[0][:80]}")
                continue
            err = max(_rel_err(out[b : b + 1], ref[b]) for b in check)
            if not err <= (1e-2 if dtype != torch.float32 else 1e-5):
                print(f"  {case}: {impl} differs from the reference (rel err {err:.3g}); not timed")
                continue
            t = measure(fn, dev, quick=ctx.quick)
            times[impl] = t["ms"]
            gbps = nbytes / (t["ms"] * 1e-3) / 1e9
            print(f"  {case:<52} {impl:<8} {t['ms']:.4f} ms  {gbps:8.1f} GB/s", flush=True)
            ctx.add(
                bench="attention",
                case=case,
                impl=impl,
                ms=t["ms"],
                metric="GB/s",
                value=gbps,
                of_ceiling=gbps / ctx.copy_gbps if ctx.copy_gbps else None,
                note="GB/s of K+V read; speedup over sdpa on a contiguous cache",
            )
        for row in ctx.rows:
            if row.get("case") == case and "sdpa" in times:
                row["speedup"] = times["sdpa"] / row["ms"]


def _decode_gpu(ctx: Context) -> None:
    for batch, s in _decode_cases(ctx):
        _decode_run(ctx, batch, s, *DECODE_HEADS, torch.bfloat16)
        torch.cuda.empty_cache()


# --- CPU ------------------------------------------------------------------------------------------


def _cpu_padded_batch(ctx: Context) -> None:
    """A padded batch of short sentences as transformers hands it to fastllm (varlen
    segments: each sequence's queries against its valid keys), on the cpu and torch
    backends, against one SDPA call on the padded batch with a key-padding mask."""
    dev = ctx.device
    B, S, H, D = (8, 30, 12, 32) if ctx.quick else (32, 30, 12, 32)
    lens = torch.randint(S // 4, S + 1, (B,), generator=torch.Generator().manual_seed(0))
    lens[0] = S
    zeros = torch.zeros(B, dtype=torch.long)
    q_lens = torch.stack([zeros, torch.full((B,), S), zeros], 1).reshape(-1)
    k_lens = torch.stack([zeros, lens, S - lens], 1).reshape(-1)
    cu_q = F.pad(q_lens.cumsum(0), (1, 0)).to(torch.int32)
    cu_k = F.pad(k_lens.cumsum(0), (1, 0)).to(torch.int32)
    q, k, v = (torch.randn(B * S, H, D, device=dev) for _ in range(3))
    args = (q, k, v, False, D**-0.5, -1, -1, 0.0, cu_q, cu_k, S, S, False)
    keep = torch.arange(S)[None, :] < lens[:, None]
    qt, kt, vt = (t.view(B, S, H, D).transpose(1, 2) for t in (q, k, v))
    impls = {
        name: (lambda name=name: backend.implementation("attention", name)(*args)[0])
        for name in ("cpu", "torch")
        if backend.why_not("attention", name, dev, *args) is None
    }
    impls["sdpa padded"] = lambda: (
        F.scaled_dot_product_attention(qt, kt, vt, attn_mask=keep[:, None, None, :])
        .transpose(1, 2)
        .reshape(B * S, H, D)
    )
    ref = reference.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    case = f"padded batch B{B} S{S} H{H} D{D} fp32"
    valid = keep.reshape(-1)  # rows of padding positions are unspecified
    times = {}
    for impl, fn in impls.items():
        err = _rel_err(fn()[valid], ref[valid])
        if not err <= 1e-5:
            print(f"  {case}: {impl} differs from the reference (rel err {err:.3g}); not timed")
            continue
        t = measure(fn, dev, quick=ctx.quick)
        times[impl] = t["ms"]
        print(f"  {case:<40} {impl:<12} {t['ms']:.4f} ms", flush=True)
        ctx.add(
            bench="attention",
            case=case,
            impl=impl,
            ms=t["ms"],
            speedup=times.get("sdpa padded", t["ms"]) / t["ms"],
            note="CPU; speedup over one SDPA call on the padded batch (timed last: 1.0 here)",
        )
    for row in ctx.rows:
        if row.get("case") == case and "sdpa padded" in times:
            row["speedup"] = times["sdpa padded"] / row["ms"]


def _cpu(ctx: Context) -> None:
    _cpu_padded_batch(ctx)
    dev, dtype = ctx.device, torch.float32
    torch_impl = backend.implementation("attention", "torch")
    seqs = [256] if ctx.quick else [256, 1024]
    for s in seqs:
        for causal in (False, True):
            q, k, v = (torch.randn(1, s, 8, 64, device=dev, dtype=dtype) for _ in range(3))
            args = (q, k, v, causal, 0.125, -1, 0 if causal else -1, 0.0, None, None, s, s, False)
            qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            impls = {
                "torch": lambda args=args: torch_impl(*args)[0],
                "sdpa": lambda qt=qt, kt=kt, vt=vt, c=causal: F.scaled_dot_product_attention(
                    qt, kt, vt, is_causal=c
                ).transpose(1, 2),
            }
            if backend.why_not("attention", "cpu", dev, *args) is None:
                cpu_impl = backend.implementation("attention", "cpu")
                impls["cpu"] = lambda args=args, f=cpu_impl: f(*args)[0]
            ref = reference.attention(q, k, v, causal=causal)
            case = f"prefill B1 S{s} H8 D64 {'causal' if causal else 'full'} fp32"
            times = {}
            for impl, fn in impls.items():
                err = _rel_err(fn(), ref)
                if not err <= 1e-5:
                    print(
                        f"  {case}: {impl} differs from the reference (rel err {err:.3g}); not timed"
                    )
                    continue
                t = measure(fn, dev, quick=ctx.quick)
                times[impl] = t["ms"]
                flops = 4 * s * s * 8 * 64 * (0.5 if causal else 1.0)
                gf = flops / (t["ms"] * 1e-3) / 1e9
                print(f"  {case:<40} {impl:<8} {t['ms']:.4f} ms  {gf:8.1f} GFLOP/s", flush=True)
                ctx.add(
                    bench="attention",
                    case=case,
                    impl=impl,
                    ms=t["ms"],
                    metric="GFLOP/s",
                    value=gf,
                    speedup=times.get("torch", t["ms"]) / t["ms"],
                    note="CPU; speedup over the torch backend",
                )
    _decode_run(ctx, 4, 1024 if ctx.quick else 2048, 32, 8, 128, dtype, with_kernels=False)


def run(ctx: Context) -> None:
    if ctx.gpu:
        _prefill_gpu(ctx)
        _decode_gpu(ctx)
    else:
        _cpu(ctx)
