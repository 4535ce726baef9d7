"""RMSNorm and LayerNorm in Triton, with the residual add before and the per-token int8
quantization after fused in (fastllm.ops.rms_norm, fastllm.ops.layer_norm).

    h = x + r                                   (rounded to x's dtype T; stored as new residual)
    rms:   y = T(w * T(h * rsqrt(mean(h*h) + eps)))          (LlamaRMSNorm)
    layer: y = T((h - mean) * rsqrt(var + eps) * w + b)      (F.layer_norm)
    quantized: z = float(y) / smooth;  scale = amax|z| / 127 (1.0 where 0);
               q = clamp(rint(z / scale), -127, 127)

One program per row, the whole row in registers (BLOCK_K = next power of two >= K).
Divisions are IEEE (div_rn), so the quantization equals quantize_per_token's kernel
bit for bit on the same y. Reference: fastllm/reference/norm.py.
"""

import torch
import triton
import triton.language as tl

from fastllm.triton_kernels._compat import rint

MAX_K = 32768  # one row in registers


@triton.jit
def _norm_kernel(
    # pointers
    x_ptr, r_ptr, w_ptr, b_ptr, smooth_ptr, y_ptr, q_ptr, scale_ptr, r_out_ptr,
    # sizes
    K, eps,
    # strides
    stride_xm, stride_rm, stride_ym, stride_rom,
    # meta-parameters
    IS_RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    QUANTIZE: tl.constexpr, HAS_SMOOTH: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    mask = offs < K
    x = tl.load(x_ptr + row * stride_xm + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_rm + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(r_out_ptr + row * stride_rom + offs, x, mask=mask)
    h = x.to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)

    if IS_RMS:
        var = tl.sum(h * h, axis=0) / K
        rstd = 1.0 / tl.sqrt_rn(var + eps)
        n = (h * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
        y = w * n
    else:
        mean = tl.sum(h, axis=0) / K
        d = tl.where(mask, h - mean, 0.0)
        var = tl.sum(d * d, axis=0) / K
        rstd = 1.0 / tl.sqrt_rn(var + eps)
        y = d * rstd * w
        if HAS_BIAS:
            y = y + tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = y.to(x_ptr.dtype.element_ty)

    if QUANTIZE:
        z = y.to(tl.float32)
        if HAS_SMOOTH:
            sm = tl.load(smooth_ptr + offs, mask=mask, other=1.0)
            z = tl.math.div_rn(z, sm)
        z = tl.where(mask, z, 0.0)
        s = tl.math.div_rn(tl.max(tl.abs(z), axis=0), 127.0)
        s = tl.where(s > 0.0, s, 1.0)
        tl.store(scale_ptr + row, s)
        q = tl.minimum(tl.maximum(rint(tl.math.div_rn(z, s)), -127.0), 127.0)
        tl.store(q_ptr + row * stride_ym + offs, q.to(tl.int8), mask=mask)
    else:
        tl.store(y_ptr + row * stride_ym + offs, y, mask=mask)


def norm(x, weight, bias, residual, smooth, eps, *, rms, quantize):
    """x, residual: [M, K] fp32/fp16/bf16 with unit last stride; weight, bias: [K] of x's
    dtype; smooth: float32 [K] or None. Returns (y [M, K] x.dtype or None, q int8 [M, K]
    or None, scale float32 [M] or None, new residual [M, K] or None), outputs contiguous."""
    M, K = x.shape
    dev = x.device
    y = None if quantize else torch.empty((M, K), dtype=x.dtype, device=dev)
    q = torch.empty((M, K), dtype=torch.int8, device=dev) if quantize else None
    scale = torch.empty((M,), dtype=torch.float32, device=dev) if quantize else None
    r_out = None if residual is None else torch.empty((M, K), dtype=x.dtype, device=dev)
    if M == 0:
        return y, q, scale, r_out
    out = q if quantize else y
    BLOCK_K = triton.next_power_of_2(max(K, 16))
    num_warps = 4 if BLOCK_K <= 2048 else (8 if BLOCK_K <= 8192 else 16)
    _norm_kernel[(M,)](
        x, residual if residual is not None else x, weight,
        bias if bias is not None else weight, smooth if smooth is not None else weight,
        out, q if quantize else out, scale if quantize else out,
        r_out if r_out is not None else out,
        K, float(eps),
        x.stride(0), residual.stride(0) if residual is not None else 0,
        out.stride(0), r_out.stride(0) if r_out is not None else 0,
        IS_RMS=rms, HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None,
        QUANTIZE=quantize, HAS_SMOOTH=smooth is not None, BLOCK_K=BLOCK_K,
        num_warps=num_warps,
    )
    return y, q, scale, r_out
