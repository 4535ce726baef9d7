"""Launchers of the C++ CPU kernels (backend "cpu"; kernels: csrc/quant/*_cpu.cpp,
csrc/int8/*_cpu.cpp, csrc/attention/*_cpu.cpp).

On the CPU the W8A8 matmul itself is `torch._int_mm` (oneDNN), or for decode steps and
short prompts fastllm's AVX512-VNNI kernel (`int_mm` below: the same int32); what fastllm
adds is the work around it, which in eager PyTorch costs more than the matmul at
transformer sizes: per-token quantization (amax, divide, round, clamp, cast: five
passes over the activations in PyTorch, one read here) and the epilogue (convert,
two scalings, bias, cast: four passes over the output, one here, written over the
accumulator itself for a float32 output). The kernels give the torch backend's
results bit for bit, and split work over PyTorch's threads (`torch.get_num_threads()`).
The attention kernel serves a padded batch of short sequences in one call (see
`prefer_attention` for when it is chosen).

The launchers take tensors the op layer has already validated and made contiguous.
"""

from __future__ import annotations

import torch

from fastllm import native
from fastllm.native.int8 import _ld, bias_args


def available_reason() -> str | None:
    """None when fastllm._C is loaded with its CPU kernels (backend.unavailable_reason asks
    this before any `supports_*` below is called)."""
    err = native.load_error()
    if err is not None:
        return f"fastllm._C is not available ({err})"
    if not hasattr(native.module(), "quantize_per_token_cpu"):
        return "this build of fastllm._C has no CPU kernels (rebuild it)"
    return None


def device_reason(*tensors: torch.Tensor | None) -> str | None:
    """None when these tensors are all in host memory."""
    for t in tensors:
        if t is not None and not t.is_cpu:
            return f"the cpu backend takes CPU tensors, got {t.device}"
    return None


def quantize_per_token(
    x: torch.Tensor, smooth_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K] CPU, float32/float16/bfloat16, any strides -> (int8 [M, K], float32 [M]),
    of x.float() / smooth_scale (float32 [K] contiguous) when that is given. The kernel
    reads rows at x.stride(0) and elements at unit stride: other layouts are copied."""
    if not x.is_cpu or x.dim() != 2:
        raise ValueError(f"x must be a 2-D CPU tensor, got shape {tuple(x.shape)} on {x.device}")
    rows, cols = x.shape
    if cols > 1 and x.stride(1) != 1:  # a dimension of size 1 has no stride to honour
        x = x.contiguous()
    q = torch.empty((rows, cols), dtype=torch.int8)
    scale = torch.empty((rows,), dtype=torch.float32)
    if rows == 0:
        return q, scale
    native.module().quantize_per_token_cpu(
        x.data_ptr(),
        native.dtype_code(x),
        rows,
        cols,
        x.stride(0),
        smooth_scale.data_ptr() if smooth_scale is not None else 0,
        q.data_ptr(),
        scale.data_ptr(),
        torch.get_num_threads(),
    )
    return q, scale


def epilogue(
    acc: torch.Tensor,
    x_scale: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """float(acc) * x_scale[:, None] * w_scale + bias, cast to out_dtype.

    acc: [M, N] int32 contiguous, consumed: a float32 result is written over it.
    x_scale [M], w_scale [N] float32 and bias [N]: contiguous (the op layer made them so)."""
    if acc.dtype != torch.int32 or acc.dim() != 2 or not acc.is_contiguous():
        raise ValueError(
            f"acc must be a contiguous 2-D int32 accumulator, got {acc.dtype} of shape "
            f"{tuple(acc.shape)} and strides {acc.stride()}"
        )
    M, N = acc.shape
    out = (
        acc.view(torch.float32)
        if out_dtype == torch.float32
        else torch.empty((M, N), dtype=out_dtype)
    )
    native.module().int8_epilogue_cpu(
        acc.data_ptr(),
        N,
        x_scale.data_ptr(),
        w_scale.data_ptr(),
        *bias_args(bias),
        out.data_ptr(),
        native.dtype_code(out),
        N,
        M,
        N,
        torch.get_num_threads(),
    )
    return out


# oneDNN's torch._int_mm reorders the whole weight on every call with M > 1, so up to a few
# hundred rows go to fastllm's AVX512-VNNI kernel instead (csrc/int8/int8_mm_cpu.cpp; the
# same int32, bit for bit), which reads each weight byte once per tile of 4 rows. `fastllm
# bench int8` on a 2-core Zen 4 (2 threads, K = N = 4096), _int_mm against it: see README
# ("W8A8 decode batches on the CPU"). oneDNN's blocked kernel catches up sooner on smaller
# weights (K = 384, N = 1536: even at M = 16; K = N = 1024: at M = 128). Rows up to, for
# weights of at least this many elements:
SMALL_M_LIMITS = ((1 << 24, 256), (1 << 20, 64), (0, 16))  # (elements, rows)


def small_m_kernel() -> bool:
    """Whether this build and CPU have fastllm's AVX512-VNNI int8 matmul."""
    global _SMALL_M_KERNEL
    if _SMALL_M_KERNEL is None:
        mod = native.module() if native.load_error() is None else None
        _SMALL_M_KERNEL = bool(
            mod is not None and hasattr(mod, "int8_mm_cpu") and mod.int8_mm_cpu_available()
        )
    return _SMALL_M_KERNEL


_SMALL_M_KERNEL: bool | None = None


def uses_small_m_kernel(M: int, K: int, N: int) -> bool:
    """Whether `int_mm` takes fastllm's kernel for these sizes (else torch._int_mm)."""
    if M < 1 or not small_m_kernel():
        return False
    return M <= next(rows for elements, rows in SMALL_M_LIMITS if K * N >= elements)


def int_mm(x_int8: torch.Tensor, w_int8: torch.Tensor) -> torch.Tensor:
    """The exact int32 x_int8 [M, K] @ w_int8 [N, K].T, as torch._int_mm(x_int8, w_int8.t())."""
    M, K = x_int8.shape
    N = w_int8.shape[0]
    if not uses_small_m_kernel(M, K, N) or x_int8.stride(1) != 1 or w_int8.stride(1) != 1:
        return torch._int_mm(x_int8, w_int8.t())
    return small_m_matmul(x_int8, w_int8)


def small_m_matmul(x_int8: torch.Tensor, w_int8: torch.Tensor) -> torch.Tensor:
    """fastllm's AVX512-VNNI int8 matmul (any M; `small_m_kernel()` must be true): x_int8
    [M, K] and w_int8 [N, K] CPU int8 with unit-stride rows -> int32 [M, N]."""
    if x_int8.stride(-1) != 1 or w_int8.stride(-1) != 1:
        raise ValueError("small_m_matmul takes rows of unit stride")
    M, K = x_int8.shape
    N = w_int8.shape[0]
    acc = torch.empty((M, N), dtype=torch.int32)
    native.module().int8_mm_cpu(
        x_int8.data_ptr(),
        x_int8.stride(0),
        w_int8.data_ptr(),
        w_int8.stride(0),
        acc.data_ptr(),
        N,
        M,
        N,
        K,
        torch.get_num_threads(),
    )
    return acc


def _int_mm_reason(M: int, K: int, N: int) -> str | None:
    from fastllm.ops.int8 import int_mm_accepts

    if not int_mm_accepts(M, K, N, torch.device("cpu")):
        return f"torch._int_mm does not take [{M}, {K}] @ [{K}, {N}] on the CPU in this PyTorch"
    return None


def supports_w8a8(x_int8, x_scale, w_int8, w_scale, bias=None, out_dtype=None) -> str | None:
    reason = device_reason(x_int8, x_scale, w_int8, w_scale, bias)
    return reason or _int_mm_reason(x_int8.shape[0], x_int8.shape[1], w_int8.shape[0])


def w8a8_linear(x_int8, x_scale, w_int8, w_scale, bias, out_dtype) -> torch.Tensor:
    return epilogue(int_mm(x_int8, w_int8), x_scale, w_scale, bias, out_dtype)


def supports_dynamic(x, w_int8, w_scale, bias=None, smooth_scale=None) -> str | None:
    reason = device_reason(x, w_int8, w_scale, bias, smooth_scale)
    return reason or _int_mm_reason(x.shape[0], x.shape[1], w_int8.shape[0])


def dynamic_linear(x, w_int8, w_scale, bias=None, smooth_scale=None) -> torch.Tensor:
    x_int8, x_scale = quantize_per_token(x, smooth_scale)
    return w8a8_linear(x_int8, x_scale, w_int8, w_scale, bias, x.dtype)


# --- W8A8 with activation / gate / residual / quantized output (int8_fused_linear) ------

ACTIVATION_CODES = {
    None: 0,
    "gelu": 1,
    "gelu_tanh": 2,
    "silu": 3,
}  # csrc/int8/int8_epilogue_cpu.cpp


def supports_fused(
    x, x_scale, w_int8, w_scale, bias, smooth, out_dtype, act, gated, residual, quantize, out_smooth
) -> str | None:
    reason = device_reason(x, x_scale, w_int8, w_scale, bias, smooth, residual, out_smooth)
    if reason is None and not hasattr(native.module(), "int8_fused_epilogue_cpu"):
        reason = "this build of fastllm._C has no int8_fused_epilogue_cpu (rebuild it)"
    return reason or _int_mm_reason(x.shape[0], x.shape[1], w_int8.shape[0])


_ATEN_GELU = {"gelu": "none", "gelu_tanh": "tanh"}


def fused_linear(
    x, x_scale, w_int8, w_scale, bias, smooth, out_dtype, act, gated, residual, quantize, out_smooth
):
    """int8_fused_linear: x [M, K] int8 with x_scale [M], or float x quantized here (of
    x.float() / smooth); `int_mm`; then one C++ pass: scale, bias, activation, gate,
    residual, cast (over the accumulator for a float32, non-gated output). With quantize,
    the output is quantized per token by the C++ kernel (of y.float() / out_smooth).
    Returns (y, None, None) or (None, y_int8, y_scale)."""
    if x.dtype != torch.int8:
        x, x_scale = quantize_per_token(x, smooth)
    acc = int_mm(x, w_int8)
    M, cols = acc.shape
    N = cols // 2 if gated else cols
    if out_dtype == torch.float32 and not gated:
        out = acc.view(torch.float32)
    else:
        out = torch.empty((M, N), dtype=out_dtype)
    # GELU alone on a float32 output: ATen's vectorized GELU in place after the C++ pass.
    # Measured (MiniLM's intermediate, M = 960, N = 1536, K = 384, 2 threads): 2.51 ms
    # against 2.79 ms with the C++ GELU in the pass (its erfc and exp cost more than a
    # second pass over a block still in cache); with a residual, a gate or another dtype
    # the C++ pass does it all (the activation must come before them, in float32).
    alone = residual is None and out_dtype == torch.float32 and not gated
    aten_act = _ATEN_GELU.get(act) if alone else None
    native.module().int8_fused_epilogue_cpu(
        acc.data_ptr(),
        cols,
        x_scale.data_ptr(),
        w_scale.data_ptr(),
        *bias_args(bias),
        ACTIVATION_CODES[None if aten_act else act],
        int(gated),
        residual.data_ptr() if residual is not None else 0,
        native.dtype_code(residual) if residual is not None else -1,
        N,
        out.data_ptr(),
        native.dtype_code(out),
        N,
        M,
        N,
        torch.get_num_threads(),
    )
    if aten_act:
        torch.ops.aten.gelu_(out, approximate=aten_act)
    if not quantize:
        return out, None, None
    q, scale = quantize_per_token(out, out_smooth)
    return None, q, scale


def supports_w8a16(x, w_int8, w_scale, bias=None) -> str | None:
    return device_reason(x, w_int8, w_scale, bias)


# The kernel reads each int8 weight byte once and converts it to float32, for up to 4
# rows of x (or, for one row, 4 weight rows) at a time; the torch backend converts the
# weight to float (a block of rows at a time) and calls F.linear, whose blocked matmul wins
# once M is large enough to reuse each weight many times. Measured on a 2-core x86 CPU
# (N = K = 4096, fp32, 2 threads): M = 4: 4.4 ms here, 7.9 ms torch backend, 10.7 ms fp32
# F.linear; M = 16: 13.8, 11.0, 14.8 ms; M = 1 (the module, `fastllm bench int8`): 0.85,
# 2.79, 3.75 ms. So the automatic choice takes it up to this M.
W8A16_MAX_M = 8


def prefer_w8a16(x, w_int8, w_scale, bias=None) -> str | None:
    if x.shape[0] > W8A16_MAX_M:
        return f"M = {x.shape[0]} > {W8A16_MAX_M}: the torch backend's matmul is faster"
    return None


def w8a16_linear(x, w_int8, w_scale, bias=None) -> torch.Tensor:
    """out [M, N] in x's dtype = (x @ w_int8.T) * w_scale + bias, float32 accumulation."""
    M, K = x.shape
    N = w_int8.shape[0]
    out = torch.empty((M, N), dtype=x.dtype)
    native.module().int8_w8a16_cpu(
        x.data_ptr(),
        native.dtype_code(x),
        _ld(x),
        w_int8.data_ptr(),
        _ld(w_int8),
        w_scale.data_ptr(),
        *bias_args(bias),
        out.data_ptr(),
        N,
        M,
        N,
        K,
        torch.get_num_threads(),
    )
    return out


# --- attention (csrc/attention/attention_cpu.cpp) --------------------------------------------


def supports_attention(
    q, k, v, causal, scale, window_left, window_right, softcap, cu_q, cu_k, mq, mk, return_lse
) -> str | None:
    reason = device_reason(q, k, v, cu_q, cu_k)
    if reason is not None:
        return reason
    if cu_q is not None and (cu_q.dtype != torch.int32 or cu_k.dtype != torch.int32):
        return f"cu_seqlens must be int32, got {cu_q.dtype} and {cu_k.dtype}"
    return None


# The kernel's gain is one call for a batch of sequences, where the torch backend calls
# SDPA once per sequence (~0.1 ms of overhead each on the CPU); PyTorch's blocked SDPA
# runs more FLOP/s on long sequences. Measured on a 2-core x86 CPU (2 threads, fp32,
# varlen batches with lengths from L/2 to L, against the torch backend): at L = 128
# 1.7-2.0x faster (B = 4 and 16, 12 heads of 64; 16 heads of 64), at L = 160-192
# 1.1-1.7x (B = 1, 2, 8; heads x head_dim from 12 x 32 to 32 x 128), at L = 256 0.96-1.34x,
# at L = 512 0.63-0.96x; the crossover goes with the length, not with heads x head_dim.
# So the automatic choice takes the kernel for varlen calls whose longest query and key
# sequences stay within this length; forced, it serves any call.
ATTENTION_MAX_SEQLEN = 192


def prefer_attention(
    q, k, v, causal, scale, window_left, window_right, softcap, cu_q, cu_k, mq, mk, return_lse
) -> str | None:
    if cu_q is None:
        return "slower than SDPA on a dense batch (PyTorch takes it in one call)"
    if max(int(mq), int(mk)) > ATTENTION_MAX_SEQLEN:
        return (
            f"sequences of up to {int(mq)} queries x {int(mk)} keys (> {ATTENTION_MAX_SEQLEN}): "
            "SDPA per sequence is faster"
        )
    return None


def attention(
    q, k, v, causal, scale, window_left, window_right, softcap, cu_q, cu_k, mq, mk, return_lse
):
    """fastllm.ops.attention on the C++ CPU kernel (arguments as for the CUDA one)."""
    from fastllm.native.attention import prefill_arguments

    if cu_q is not None:
        cu_q, cu_k = cu_q.contiguous(), cu_k.contiguous()
    args = (q, k, v, causal, scale, window_left, window_right, softcap, cu_q, cu_k, mq, mk)
    # the kernel writes 0 and -inf to packed rows outside every sequence itself
    out, lse, kwargs = prefill_arguments(*args, return_lse, kernel_fills_gaps=True)
    if q.numel() == 0:
        return out, lse
    native.module().attention_prefill_cpu(**kwargs, threads=torch.get_num_threads())
    return out, lse


def supports_decode(
    q, k_cache, v_cache, cache_seqlens, block_table, scale, causal, wl, wr, softcap, num_splits
) -> str | None:
    reason = device_reason(q, k_cache, v_cache, cache_seqlens, block_table)
    if reason is not None:
        return reason
    if (
        cache_seqlens.dtype != torch.int32
        or block_table is not None
        and block_table.dtype != torch.int32
    ):
        return "cache_seqlens and block_table must be int32"
    return None


# Decode is a few query rows against a cache: the kernel's gain is the call (the torch
# backend builds a mask and calls SDPA: ~0.1 ms more per call), its cost the cache copied
# to float32 row buffers and, without GQA, tiles of 16 query columns mostly empty.
# Measured on a 2-core x86 CPU, fp32, one new token: batch 1, cache 128, 4/2 heads of 64:
# 3.4x the torch backend; batch 1, cache 1024, 32/8 heads of 128: 0.88x; batch 8, cache
# 512, 12/12 heads of 64: 0.63x. So the automatic choice takes it for small caches
# (batch x capacity x kv heads x head_dim up to this many elements); forced, for any.
DECODE_MAX_WORK = 1 << 19


def prefer_decode(
    q, k_cache, v_cache, cache_seqlens, block_table, scale, causal, wl, wr, softcap, num_splits
) -> str | None:
    capacity = k_cache.shape[1] * (block_table.shape[1] if block_table is not None else 1)
    work = q.shape[0] * capacity * k_cache.shape[2] * q.shape[-1]
    if work > DECODE_MAX_WORK:
        return (
            f"a cache of {q.shape[0]} x {capacity} positions x {k_cache.shape[2]} kv heads of "
            f"{q.shape[-1]} ({work} > {DECODE_MAX_WORK}): the torch backend is faster"
        )
    return None


def decode_attention(
    q, k_cache, v_cache, cache_seqlens, block_table, scale, causal, wl, wr, softcap, num_splits
):
    """fastllm.ops.decode_attention on the C++ CPU kernel (one split: num_splits is ignored,
    the work is split by sequence and kv head)."""
    from fastllm.native.attention import decode_arguments

    cache_seqlens = cache_seqlens.contiguous()
    if block_table is not None and block_table.shape[1] > 1 and block_table.stride(1) != 1:
        block_table = block_table.contiguous()
    out, kwargs = decode_arguments(
        q, k_cache, v_cache, cache_seqlens, block_table, scale, causal, wl, wr, softcap
    )
    if out.numel() == 0:
        return out
    native.module().attention_decode_cpu(
        **kwargs, o_partial=0, lse_partial=0, num_splits=1, threads=torch.get_num_threads()
    )
    return out
