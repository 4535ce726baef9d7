"""Reference for the int8 matmuls.

    int8_linear:             out = (x_int8 @ w_int8.T) * x_scale[:, None] * w_scale[None, :] + bias
    int8_dynamic_linear:     x_int8, x_scale = quantize_per_token(x), then int8_linear
    int8_weight_only_linear: out = (x @ w_int8.T) * w_scale[None, :] + bias

The integer product is computed exactly (a float64 matmul of int8 values is exact while
K * 127 * 127 < 2**53, i.e. for any K that fits in memory), the scaling in float64.
"""

import torch

from fastllm.reference.quant import quantize_per_token


def int8_matmul_int32(x_int8: torch.Tensor, w_int8: torch.Tensor) -> torch.Tensor:
    """The int32 accumulator x_int8 @ w_int8.T of x (..., K) and w (N, K), exactly.
    Raises ValueError where a sum does not fit in int32 (rather than wrapping around)."""
    acc = torch.matmul(x_int8.double(), w_int8.double().T)
    if acc.numel() and not -(2**31) <= acc.min().item() <= acc.max().item() <= 2**31 - 1:
        raise ValueError(
            f"x_int8 @ w_int8.T (K = {x_int8.shape[-1]}) holds sums in "
            f"[{int(acc.min().item())}, {int(acc.max().item())}]; expected them within int32"
        )
    return acc.to(torch.int32)


def int8_linear(
    x_int8: torch.Tensor,
    x_scale: torch.Tensor,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """x_int8 (..., K) int8, x_scale (...) , w_int8 (N, K) int8, w_scale (N,), bias (N,) or
    None -> (..., N) out_dtype. Computed in float64, then cast once."""
    acc = torch.matmul(x_int8.double(), w_int8.double().T)
    out = acc * x_scale.double().unsqueeze(-1) * w_scale.double()
    if bias is not None:
        out = out + bias.double()
    return out.to(out_dtype)


def int8_dynamic_linear(
    x: torch.Tensor,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    smooth_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """x (..., K) float -> (..., N) in x's dtype: per-token quantization of x (of
    x.float() / smooth_scale when given: SmoothQuant's run-time factor), then int8_linear."""
    xs = x
    if smooth_scale is not None:  # in float32 (float64 for float64 x)
        xs = x.to(torch.promote_types(x.dtype, torch.float32)) / smooth_scale
    x_int8, x_scale = quantize_per_token(xs)
    return int8_linear(x_int8, x_scale, w_int8, w_scale, bias, out_dtype=x.dtype)


def int8_weight_only_linear(
    x: torch.Tensor,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x (..., K) float, w_int8 (N, K) int8, w_scale (N,) -> (..., N) in x's dtype.
    Computed in float32 (float64 for float64 x), then cast once."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = torch.matmul(x.to(compute), w_int8.to(compute).T) * w_scale.to(compute)
    if bias is not None:
        out = out + bias.to(compute)
    return out.to(x.dtype)
