"""Reference for the norms, with the residual add before them and the per-token int8
quantization after them fused in (fastllm.ops.rms_norm, fastllm.ops.layer_norm).

What each computes, for x (..., K) of dtype T and a weight (and bias) of dtype T:

    h = x + residual                  in T (rounded to T), the new residual; or h = x
    rms_norm:   y = weight * T(h32 * rsqrt(mean(h32**2) + eps))        (LlamaRMSNorm)
    layer_norm: y = T((h32 - mean) * rsqrt(var + eps) * weight + bias) (F.layer_norm)
    quantize:   quantize_per_token(float32(y) / smooth_scale)          (y in T first)

with h32 = float32(h) (float64 for float64 input). The quantized variant quantizes y as
the unfused model has it, rounded to T, then divided by SmoothQuant's factor in float32:
exactly what int8_dynamic_linear(y, ..., smooth_scale) quantizes.
"""

from __future__ import annotations

import torch

from fastllm.reference.quant import quantize_per_token


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _finish(y, h, residual, quantize, smooth_scale):
    if quantize:
        z = y.to(_compute_dtype(y))
        if smooth_scale is not None:
            z = z / smooth_scale.to(z.dtype)
        y = quantize_per_token(z)
    return y if residual is None else (y, h)


def rms_norm(x, weight, eps=1e-6, *, residual=None, quantize=False, smooth_scale=None):
    """LlamaRMSNorm of x (+ residual): see the module docstring. Returns y, (y, new_residual),
    (y_int8, scale) or ((y_int8, scale), new_residual)."""
    h = x if residual is None else x + residual
    hf = h.to(_compute_dtype(x))
    variance = hf.pow(2).mean(-1, keepdim=True)
    y = weight * (hf * torch.rsqrt(variance + eps)).to(x.dtype)
    return _finish(y, h, residual, quantize, smooth_scale)


def layer_norm(x, weight, bias=None, eps=1e-5, *, residual=None, quantize=False, smooth_scale=None):
    """F.layer_norm of x (+ residual) over the last dimension, computed in float32 (float64
    for float64 input) and rounded once: see the module docstring. Returns as rms_norm."""
    h = x if residual is None else x + residual
    c = _compute_dtype(x)
    hf = h.to(c)
    mean = hf.mean(-1, keepdim=True)
    var = (hf - mean).pow(2).mean(-1, keepdim=True)
    y = (hf - mean) * torch.rsqrt(var + eps) * weight.to(c)
    if bias is not None:
        y = y + bias.to(c)
    return _finish(y.to(x.dtype), h, residual, quantize, smooth_scale)
