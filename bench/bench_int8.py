"""int8 matmuls against the strongest PyTorch baselines in the same run.

GPU:
  W8A8 (int8_linear with its scale/bias/cast epilogue, bf16 out) on every backend that
  can serve, against bf16 torch.matmul and against torch._int_mm followed by the same
  epilogue in eager PyTorch; M from 1 to 8192 at the (N, K) of Llama-3-8B layers and
  8192^3. Reported in TOPS (2*M*N*K per second) and as a fraction of the dense int8 peak
  where the GPU is known.
  W8A16 (int8_weight_only_linear, bf16) against bf16 F.linear for M <= 64, in TFLOP/s and
  GB/s of the minimum traffic (int8 weight + activations + output once), as a fraction of
  the measured copy bandwidth.
CPU:
  Int8Linear (the whole forward: quantization, int8 matmul, epilogue) in w8a8 on the cpu
  backend (C++ quantization and epilogue around torch._int_mm, or fastllm's AVX512-VNNI
  matmul for a few rows) and on the torch backend (eager PyTorch around _int_mm), and in
  w8a16 at M = 1 on the cpu backend (C++ kernel) and the torch backend, against float32
  nn.Linear, torch._int_mm alone and (M <= 256, where the CPU has it) the VNNI matmul alone.
Fused epilogues (GPU and CPU, per backend): int8_dynamic_linear with the activation
(gelu), the residual add, and the gated MLP half (int8_dynamic_gated_linear, silu) with
and without a quantized output, against the same backend's plain op followed by the
separate PyTorch ops (F.gelu, + residual, F.silu(g) * u, quantize_per_token).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from fastllm import backend, reference
from fastllm.bench.common import Context, measure

LLAMA_NK = [(4096, 4096), (14336, 4096), (4096, 14336)]
# dense (no sparsity) peaks, for of_ceiling
_INT8_PEAK_TOPS = {"H200": 1979.0, "H100": 1979.0, "A100": 624.0}


def _int8_peak(ctx: Context) -> float | None:
    name = torch.cuda.get_device_name(ctx.device)
    return next((v for k, v in _INT8_PEAK_TOPS.items() if k in name), None)


def _gpu_impls(op: str, args) -> dict:
    # the torch backend on a GPU is the _int_mm / F.linear baseline itself: not timed twice
    impls = {}
    for name in ("cuda", "triton"):
        if backend.why_not(op, name, args[0].device, *args) is None:
            impls[name] = backend.implementation(op, name)
    return impls


def _ok(out: torch.Tensor, ref: torch.Tensor, tol: float = 1e-2) -> bool:
    out, ref = out.float(), ref.float()
    if not torch.isfinite(out).all():
        return False
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item() <= tol


def _w8a8_gpu(ctx: Context) -> None:
    if ctx.quick:
        cases = [(64, 4096, 4096), (4096, 4096, 4096)]
    else:
        cases = [(M, N, K) for (N, K) in LLAMA_NK for M in (1, 64, 1024, 4096)]
        cases += [(8192, 8192, 8192)]
    peak = _int8_peak(ctx)
    dev = ctx.device
    for M, N, K in cases:
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        w = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02
        bias = torch.randn(N, device=dev, dtype=torch.bfloat16)
        x_int8, x_scale = reference.quantize_per_token(x)
        w_int8, w_scale = reference.quantize_per_channel(w)
        args = (x_int8, x_scale, w_int8, w_scale, bias, torch.bfloat16)
        ref = reference.int8_linear(x_int8, x_scale, w_int8, w_scale, bias, torch.float32)
        wt = w_int8.t()

        def int_mm_eager(x_int8=x_int8, wt=wt, x_scale=x_scale, w_scale=w_scale, bias=bias):
            acc = torch._int_mm(x_int8, wt)
            return (acc.float() * x_scale[:, None] * w_scale + bias).to(torch.bfloat16)

        impls = {"bf16 matmul": lambda x=x, w=w: torch.matmul(x, w.t())}
        if M > 16 and K % 8 == 0 and N % 8 == 0:
            impls["_int_mm+eager epilogue"] = int_mm_eager
        for name, fn in _gpu_impls("int8_linear", args).items():
            impls[name] = lambda fn=fn, args=args: fn(*args)
        base_ms = None
        for impl, fn in impls.items():
            if impl != "bf16 matmul" and not _ok(fn(), ref):
                print(f"  w8a8 {M}x{N}x{K} {impl}: output differs from the reference; not timed")
                continue
            t = measure(fn, dev, quick=ctx.quick)
            tops = 2 * M * N * K / (t["ms"] * 1e-3) / 1e12
            base_ms = base_ms or t["ms"]
            row = ctx.add(
                bench="int8",
                case=f"w8a8 M={M} N={N} K={K}",
                impl=impl,
                ms=t["ms"],
                metric="TOPS",
                value=tops,
                of_ceiling=tops / peak if peak else None,
                speedup=base_ms / t["ms"],
                note="baseline: bf16 matmul" + (f"; peak {peak:g} int8 TOPS" if peak else ""),
            )
            print(f"  {row['case']:<30} {impl:<24} {t['ms']:.4f} ms {tops:8.1f} TOPS", flush=True)


def _w8a16_gpu(ctx: Context) -> None:
    Ms = (1, 16) if ctx.quick else (1, 16, 64)
    shapes = LLAMA_NK[:1] if ctx.quick else LLAMA_NK
    dev = ctx.device
    for N, K in shapes:
        w = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02
        w_int8, w_scale = reference.quantize_per_channel(w)
        for M in Ms:
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            args = (x, w_int8, w_scale, None)
            ref = reference.int8_weight_only_linear(x.float(), w_int8, w_scale)
            impls = {"bf16 F.linear": lambda x=x, w=w: F.linear(x, w)}
            for name, fn in _gpu_impls("int8_weight_only_linear", args).items():
                impls[name] = lambda fn=fn, args=args: fn(*args)
            base_ms = None
            for impl, fn in impls.items():
                if impl != "bf16 F.linear" and not _ok(fn(), ref):
                    print(f"  w8a16 {M}x{N}x{K} {impl}: output differs; not timed")
                    continue
                t = measure(fn, dev, quick=ctx.quick)
                wbytes = N * K * (2 if impl == "bf16 F.linear" else 1)
                nbytes = wbytes + 2 * M * K + 2 * M * N
                gbps = nbytes / (t["ms"] * 1e-3) / 1e9
                base_ms = base_ms or t["ms"]
                row = ctx.add(
                    bench="int8",
                    case=f"w8a16 M={M} N={N} K={K}",
                    impl=impl,
                    ms=t["ms"],
                    metric="GB/s",
                    value=gbps,
                    of_ceiling=gbps / ctx.copy_gbps if ctx.copy_gbps else None,
                    speedup=base_ms / t["ms"],
                    note=f"baseline: bf16 F.linear; {2 * M * N * K / (t['ms'] * 1e-3) / 1e12:.2f} "
                    "TFLOP/s",
                )
                print(
                    f"  {row['case']:<30} {impl:<24} {t['ms']:.4f} ms {gbps:8.1f} GB/s", flush=True
                )


def _cpu(ctx: Context) -> None:
    from torch import nn

    from fastllm.native import cpu as native_cpu
    from fastllm.nn import Int8Linear

    N = K = 2048 if ctx.quick else 4096
    Ms = (4, 64) if ctx.quick else (1, 2, 4, 8, 16, 32, 64, 256)
    lin = nn.Linear(K, N)
    q8 = Int8Linear.from_linear(lin, mode="w8a8")
    q16 = Int8Linear.from_linear(lin, mode="w8a16")
    wt = q8.weight.t()
    for M in Ms:
        x = torch.randn(M, K)
        x_int8, _ = reference.quantize_per_token(x)
        with torch.no_grad():
            ref = lin(x)

        def forced(module, name, x=x):
            with backend.use_backend(name):
                return module(x)

        impls = {"fp32 nn.Linear": lambda x=x: lin(x)}
        # w8a8 on each CPU backend: the C++ quantization and epilogue, and eager PyTorch
        for name in ("cpu", "torch"):
            if backend.why_not(
                "int8_dynamic_linear", name, x.device, x, q8.weight, q8.weight_scale
            ):
                continue
            impls[f"Int8Linear w8a8 [{name}]"] = functools.partial(forced, q8, name)
        impls["torch._int_mm alone"] = lambda x_int8=x_int8: torch._int_mm(x_int8, wt)
        if native_cpu.small_m_kernel() and M <= 256:  # the few-rows kernel (exact int32)
            small = functools.partial(native_cpu.small_m_matmul, x_int8, q8.weight)
            if torch.equal(small(), torch._int_mm(x_int8, wt)):
                impls["fastllm VNNI matmul alone"] = small
            else:
                print(f"  cpu M={M} fastllm VNNI matmul: differs from torch._int_mm; not timed")
        if M == 1:  # w8a16 is for decode: the C++ kernel and the torch backend
            for name in ("cpu", "torch"):
                if backend.why_not(
                    "int8_weight_only_linear", name, x.device, x, q16.weight, q16.weight_scale
                ):
                    continue
                impls[f"Int8Linear w8a16 [{name}]"] = functools.partial(forced, q16, name)
        base_ms = None
        with torch.no_grad():
            for impl, fn in impls.items():
                if impl.startswith("Int8Linear") and not _ok(fn(), ref, tol=3e-2):
                    print(f"  cpu M={M} {impl}: output differs from nn.Linear; not timed")
                    continue
                t = measure(fn, ctx.device, quick=ctx.quick)
                gops = 2 * M * N * K / (t["ms"] * 1e-3) / 1e9
                base_ms = base_ms or t["ms"]
                served = q8.last_backend if "w8a8" in impl else q16.last_backend
                row = ctx.add(
                    bench="int8",
                    case=f"cpu M={M} N={N} K={K}",
                    impl=impl,
                    ms=t["ms"],
                    metric="GOP/s",
                    value=gops,
                    speedup=base_ms / t["ms"],
                    note="baseline: fp32 nn.Linear"
                    + (f"; backend {served}" if impl.startswith("Int8Linear") else ""),
                )
                print(
                    f"  {row['case']:<30} {impl:<24} {t['ms']:.3f} ms {gops:8.1f} GOP/s "
                    f"{row['speedup']:.2f}x",
                    flush=True,
                )


def _fused_cases(ctx: Context):
    """(label, M, D, I): a Llama MLP's shapes, D = model width, I = intermediate width."""
    if ctx.gpu:
        dims = [(4096, 14336)]
        Ms = (16, 1024) if ctx.quick else (1, 16, 256, 1024, 4096)
    else:
        dims = [(1024, 2816)] if ctx.quick else [(2048, 5632)]
        Ms = (16,) if ctx.quick else (1, 16, 128)
    return [(M, D, I) for D, I in dims for M in Ms]


def _fused_rows(M, D, I, dev, dtype) -> dict:
    """{case: (unfused, fused)} for one MLP shape."""
    from fastllm import ops

    x = torch.randn(M, D, device=dev, dtype=dtype)
    h = torch.randn(M, D, device=dev, dtype=dtype)
    wgu, sgu = reference.quantize_per_channel(torch.randn(2 * I, D, device=dev) * 0.02)
    wu, su = wgu[:I].contiguous(), sgu[:I].contiguous()
    wd, sd = reference.quantize_per_channel(torch.randn(D, I, device=dev) * 0.02)
    a = torch.randn(M, I, device=dev, dtype=dtype)
    q = ops.quantize_per_token

    def gelu_unfused(x=x):
        return F.gelu(ops.int8_dynamic_linear(x, wu, su))

    def residual_unfused(a=a, h=h):
        return ops.int8_dynamic_linear(a, wd, sd) + h

    def gated_unfused(x=x):
        y = ops.int8_dynamic_linear(x, wgu, sgu)
        return F.silu(y[:, :I]) * y[:, I:]

    rows = {
        f"gelu(x Wu^T) M={M} N={I} K={D}": (
            gelu_unfused,
            lambda x=x: ops.int8_dynamic_linear(x, wu, su, activation="gelu"),
        ),
        f"a Wd^T + h M={M} N={D} K={I}": (
            residual_unfused,
            lambda a=a, h=h: ops.int8_dynamic_linear(a, wd, sd, residual=h),
        ),
        f"silu(x Wg^T)*(x Wu^T) M={M} I={I} K={D}": (
            gated_unfused,
            lambda x=x: ops.int8_dynamic_gated_linear(x, wgu, sgu),
        ),
        f"same, int8 out M={M} I={I} K={D}": (
            lambda: q(gated_unfused()),
            lambda x=x: ops.int8_dynamic_gated_linear(x, wgu, sgu, quantize_output=True),
        ),
    }
    return rows


def _fused(ctx: Context) -> None:
    dev = ctx.device
    dtype = torch.bfloat16 if ctx.gpu else torch.float32
    names = ("triton", "torch") if ctx.gpu else ("cpu", "torch")
    for M, D, I in _fused_cases(ctx):
        rows = _fused_rows(M, D, I, dev, dtype)
        for case, (unfused, fused) in rows.items():
            for name in names:
                with backend.use_backend(name):
                    try:
                        ref = unfused()
                    except backend.BackendError as e:
                        print(f"  fused {case} [{name}]: {e}")
                        continue
                    base = None
                    for impl, fn in (("unfused", unfused), ("fused epilogue", fused)):
                        out = fn()
                        if isinstance(out, tuple):  # compare the dequantized rows
                            out = out[0].float() * out[1][:, None]
                            ref_f = ref[0].float() * ref[1][:, None]
                        else:
                            ref_f = ref
                        if not _ok(out, ref_f, tol=3e-2):
                            print(f"  fused {case} [{name}] {impl}: differs; not timed")
                            continue
                        t = measure(fn, dev, quick=ctx.quick)
                        base = base or t["ms"]
                        row = ctx.add(
                            bench="int8",
                            case=f"fused {case}",
                            impl=f"{impl} [{name}]",
                            ms=t["ms"],
                            metric="ms",
                            value=t["ms"],
                            speedup=base / t["ms"],
                            note=f"baseline: the {name} backend's plain op, then PyTorch ops",
                        )
                        print(
                            f"  {row['case']:<52} {row['impl']:<26} {t['ms']:.3f} ms "
                            f"{row['speedup']:.2f}x",
                            flush=True,
                        )


def run(ctx: Context) -> None:
    torch.manual_seed(0)
    if ctx.gpu:
        _w8a8_gpu(ctx)
        _w8a16_gpu(ctx)
    else:
        _cpu(ctx)
    _fused(ctx)
