"""int8 quantization ops."""

from __future__ import annotations

import torch

from fastllm import backend, reference
from fastllm.native import cpu as native_cpu
from fastllm.ops._checks import FLOAT_DTYPES, check_tensor, rows_view
from fastllm.ops._eager import direct

# --- backends ------------------------------------------------------------------------
# Each takes x as [M, K] with a unit stride on K (rows_view: any stride when K = 1) and
# returns (int8 [M, K], float32 [M]).


@backend.register("quantize_per_token", "reference")
def _quantize_reference(x2):
    return reference.quantize_per_token(x2)


@backend.register("quantize_per_token", "torch")
def _quantize_torch(x2):
    # One float32 temporary and in-place rounding: on the CPU a fresh large tensor costs
    # page faults, which outweighed the arithmetic. max(-min, max) is amax(|x|) without
    # an |x| copy, exact in any dtype (it picks a value).
    scale = torch.maximum(x2.amax(dim=-1), -x2.amin(dim=-1)).float() / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    y = torch.div(x2.float(), scale[:, None])
    y.round_().clamp_(-127, 127)
    return y.to(torch.int8), scale


@backend.register("quantize_per_token", "triton")
def _quantize_triton(x2):
    from fastllm.triton_kernels.quant import quantize_per_token

    return quantize_per_token(x2)


@backend.register("quantize_per_token", "cpu", supports=lambda x2: native_cpu.device_reason(x2))
def _quantize_cpu(x2):
    return native_cpu.quantize_per_token(x2)


@backend.register("quantize_per_token", "cuda")
def _quantize_cuda(x2):
    from fastllm.native.quant import quantize_per_token

    return quantize_per_token(x2)


def _empty_quantized(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_per_token of an empty x: no values, scale 1.0 for each row (of length 0)."""
    return (
        torch.empty(x.shape, dtype=torch.int8, device=x.device),
        torch.ones(x.shape[:-1], dtype=torch.float32, device=x.device),
    )


# The public functions call the registered ops through torch.ops (the same op as the
# custom_op objects below, without their Python wrapper's cost per call, ~18 us on a CPU),
# or, where `direct` allows it, run the op's body (`_run_*`) themselves.
_OPS = torch.ops.fastllm

# --- registered op ---------------------------------------------------------------------


def _run_quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x2 = rows_view(x)
    name = backend.select("quantize_per_token", x.device, x2)
    q, scale = backend.implementation("quantize_per_token", name)(x2)
    if x.dim() == 2:  # already x's shape (a view costs a microsecond or two)
        return q, scale
    return q.view(x.shape), scale.view(x.shape[:-1])


@torch.library.custom_op("fastllm::quantize_per_token", mutates_args=())
def _quantize_per_token_op(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # checked and laid out as by the public function, for a direct torch.ops.fastllm call
    check_tensor("x", x, dtypes=FLOAT_DTYPES, min_dim=1)
    if x.numel() == 0:
        return _empty_quantized(x)
    return _run_quantize_per_token(x)


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
        return _empty_quantized(x)
    return _run_quantize_per_token(x) if direct(x) else _OPS.quantize_per_token(x)


# --- quantize_per_channel ----------------------------------------------------------------
# Per channel along `dim` is per row of w moved to [C, rest]: each backend reuses its
# quantize_per_token implementation on that view.


def _channel_rows(w: torch.Tensor, dim: int) -> torch.Tensor:
    return w.movedim(dim, 0).reshape(w.shape[dim], -1).contiguous()


def _per_channel_impl(name: str):
    def run(w, dim):
        per_token = backend.implementation("quantize_per_token", name)
        q2, scale = per_token(_channel_rows(w, dim))
        moved = w.movedim(dim, 0).shape
        return q2.view(moved).movedim(0, dim).contiguous(), scale

    return run


for _name in ("reference", "torch", "triton", "cuda"):
    backend.register("quantize_per_channel", _name)(_per_channel_impl(_name))
backend.register(
    "quantize_per_channel", "cpu", supports=lambda w, dim: native_cpu.device_reason(w)
)(_per_channel_impl("cpu"))


def _check_per_channel(w, dim) -> int:
    """w and dim checked -> dim in [0, w.dim())."""
    check_tensor("w", w, dtypes=FLOAT_DTYPES, min_dim=1)
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    if not -w.dim() <= dim < w.dim():
        raise ValueError(
            f"dim {dim} is out of range for w of shape {tuple(w.shape)}; "
            f"expected -{w.dim()} <= dim < {w.dim()}"
        )
    return dim % w.dim()


@torch.library.custom_op("fastllm::quantize_per_channel", mutates_args=())
def _quantize_per_channel_op(w: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    dim = _check_per_channel(w, dim)
    if w.numel() == 0:
        return (
            torch.empty(w.shape, dtype=torch.int8, device=w.device),
            torch.ones((w.shape[dim],), dtype=torch.float32, device=w.device),
        )
    name = backend.select("quantize_per_channel", w.device, w, dim)
    return backend.implementation("quantize_per_channel", name)(w, dim)


@_quantize_per_channel_op.register_fake
def _(w, dim):
    return (
        torch.empty(w.shape, dtype=torch.int8, device=w.device),
        torch.empty((w.shape[dim],), dtype=torch.float32, device=w.device),
    )


def quantize_per_channel(w: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization per channel along `dim` (per output channel of a weight).

    Args:
        w: float32, float16 or bfloat16 tensor with at least 1 dimension, any strides
            (a linear weight [N, K] with dim=0: one scale per output row).
        dim: the channel dimension (negative values count from the end).

    Returns:
        w_int8: w's shape, int8, contiguous, ``clamp(round(w / scale), -127, 127)``
            with scale broadcast along `dim`, rounding half to even.
        scale: (w.shape[dim],) float32, ``amax(|w|)`` over every other dimension ``/ 127``.

    A channel whose scale would be 0 gets scale 1.0 and quantizes to zeros. Empty
    channels (some other dimension of size 0) get scale 1.0.

    Raises TypeError for non-tensors, non-float dtypes and a non-int dim; ValueError for
    0-d tensors and a dim out of range.
    """
    return _OPS.quantize_per_channel(w, _check_per_channel(w, dim))
