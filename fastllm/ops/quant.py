"""int8 quantization ops."""

from __future__ import annotations

import torch

from fastllm import backend, reference
from fastllm.ops._checks import FLOAT_DTYPES, check_tensor, rows_view

# --- backends ------------------------------------------------------------------------
# Each takes x as [M, K] with a unit stride on K and returns (int8 [M, K], float32 [M]).


@backend.register("quantize_per_token", "reference")
def _quantize_reference(x2):
    return reference.quantize_per_token(x2)


@backend.register("quantize_per_token", "torch")
def _quantize_torch(x2):
    # amax in the input dtype is exact (|x| and max only pick values), so the float32
    # copy is made once, for the division.
    amax = x2.abs().amax(dim=-1).float()
    scale = amax / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(x2.float() / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


@backend.register("quantize_per_token", "triton")
def _quantize_triton(x2):
    from fastllm.triton_kernels.quant import quantize_per_token

    return quantize_per_token(x2)


@backend.register("quantize_per_token", "cuda")
def _quantize_cuda(x2):
    from fastllm.native.quant import quantize_per_token

    return quantize_per_token(x2)


# --- registered op ---------------------------------------------------------------------


@torch.library.custom_op("fastllm::quantize_per_token", mutates_args=())
def _quantize_per_token_op(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    name = backend.select("quantize_per_token", x.device, x)
    return backend.implementation("quantize_per_token", name)(x)


@_quantize_per_token_op.register_fake
def _(x):
    return (
        torch.empty(x.shape, dtype=torch.int8, device=x.device),
        torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device),
    )


# --- public function -------------------------------------------------------------------


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization per row of the last dimension (per token).

    Args:
        x: (..., K) float32, float16 or bfloat16, any device, any strides.

    Returns:
        x_int8: (..., K) int8, ``clamp(round(x / scale), -127, 127)``, rounding half to even.
        scale: (...) float32, ``amax(|x|, dim=-1) / 127``, so that ``x ≈ x_int8 * scale[..., None]``.

    A row whose scale would be 0 (all zeros, or so tiny that amax/127 underflows)
    gets scale 1.0 and quantizes to zeros: no NaN, no division by zero, and it
    dequantizes to exact zeros. Rows holding inf or NaN give unspecified values.
    Empty inputs give empty outputs (scale 1.0 for rows of length 0).

    Raises TypeError for non-tensors and non-float dtypes (float64 included: the
    kernels take the three inference dtypes), ValueError for 0-d tensors.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES, min_dim=1)
    if x.numel() == 0:
        return (
            torch.empty(x.shape, dtype=torch.int8, device=x.device),
            torch.ones(x.shape[:-1], dtype=torch.float32, device=x.device),
        )
    q, scale = _quantize_per_token_op(rows_view(x))
    return q.view(x.shape), scale.view(x.shape[:-1])
