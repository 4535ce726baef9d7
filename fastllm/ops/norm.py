"""The norms: rms_norm and layer_norm, each optionally adding a residual first and
optionally emitting the per-token int8 quantization of its output (for the next W8A8
GEMM) instead of a float tensor. Formulas: fastllm/reference/norm.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastllm import backend, reference
from fastllm.native import cpu as native_cpu
from fastllm.native import norm as native_norm
from fastllm.ops._checks import (
    FLOAT_DTYPES,
    check_same_device,
    check_tensor,
    is_finite,
    rows_view,
)
from fastllm.ops._eager import direct, shape_checks

# --- backends ------------------------------------------------------------------------
# ``rms_norm`` and ``layer_norm`` impl(x2, weight, bias, residual2, smooth, eps, quantize)
#     x2, residual2  [M, K] x's dtype, unit stride on K (residual2 may be None)
#     weight, bias   [K] x's dtype, contiguous (bias None for rms_norm, or None)
#     smooth         [K] float32 contiguous, or None; only with quantize
# -> (y [M, K] or None, x_int8 [M, K] or None, scale [M] or None, new residual [M, K] or None),
#    y when not quantize, (x_int8, scale) when quantize, the new residual when residual2 is given.


def _reference_impl(rms):
    def run(x2, weight, bias, r2, smooth, eps, quantize):
        kw = dict(residual=r2, quantize=quantize, smooth_scale=smooth)
        if rms:
            out = reference.rms_norm(x2, weight, eps, **kw)
        else:
            out = reference.layer_norm(x2, weight, bias, eps, **kw)
        y, r = out if r2 is not None else (out, None)
        if quantize:
            return None, y[0], y[1], r
        return y, None, None, r

    return run


def _torch_impl(rms):
    def run(x2, weight, bias, r2, smooth, eps, quantize):
        h = x2 if r2 is None else x2 + r2
        if rms:  # LlamaRMSNorm
            hf = h.float()
            variance = hf.pow(2).mean(-1, keepdim=True)
            y = weight * (hf * torch.rsqrt(variance + eps)).to(h.dtype)
        else:
            y = F.layer_norm(h, (h.shape[-1],), weight, bias, eps)
        if not quantize:
            return y, None, None, (None if r2 is None else h)
        z = y if smooth is None else y.float() / smooth
        q, scale = backend.implementation("quantize_per_token", "torch")(z)
        return None, q, scale, (None if r2 is None else h)

    return run


def _triton_impl(rms):
    def run(x2, weight, bias, r2, smooth, eps, quantize):
        from fastllm.triton_kernels.norm import norm

        return norm(x2, weight, bias, r2, smooth, eps, rms=rms, quantize=quantize)

    return run


def _triton_supports(x2, *args):
    from fastllm.triton_kernels.norm import MAX_K

    if x2.shape[-1] > MAX_K:
        return f"the triton norm kernel holds a row in registers: K = {x2.shape[-1]} > {MAX_K}"
    return None


def _cpu_impl(rms):
    def run(x2, weight, bias, r2, smooth, eps, quantize):
        return native_norm.norm(x2, weight, bias, r2, smooth, eps, rms=rms, quantize=quantize)

    return run


def _cpu_supports(x2, weight, bias, r2, smooth, *args):
    return native_cpu.device_reason(x2, weight, bias, r2, smooth) or native_norm.available_reason()


for _op, _rms in (("rms_norm", True), ("layer_norm", False)):
    backend.register(_op, "reference")(_reference_impl(_rms))
    backend.register(_op, "torch")(_torch_impl(_rms))
    backend.register(_op, "triton", supports=_triton_supports)(_triton_impl(_rms))
    backend.register(_op, "cpu", supports=_cpu_supports)(_cpu_impl(_rms))


# --- checks ----------------------------------------------------------------------------


@shape_checks
def _check(x, weight, bias, residual, smooth_scale, eps, quantize) -> None:
    check_tensor("x", x, dtypes=FLOAT_DTYPES, min_dim=1)
    K = x.shape[-1]
    if K == 0:
        raise ValueError(f"x has shape {tuple(x.shape)}; expected a last dimension of at least 1")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        check_tensor(name, t)
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}; expected the same")
        if tuple(t.shape) != (K,):
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected ({K},) for x's last dim")
    if residual is not None:
        check_tensor("residual", residual)
        if residual.dtype != x.dtype:
            raise TypeError(
                f"residual has dtype {residual.dtype} but x has {x.dtype}; expected the same"
            )
        if residual.shape != x.shape:
            raise ValueError(
                f"residual has shape {tuple(residual.shape)}; expected x's shape {tuple(x.shape)}"
            )
    if not isinstance(quantize, bool):
        raise TypeError(f"quantize must be a bool, got {type(quantize).__name__}")
    if smooth_scale is not None:
        if not quantize:
            raise ValueError("smooth_scale is given but quantize is False; expected quantize=True")
        check_tensor("smooth_scale", smooth_scale, dtypes=(torch.float32,))
        if tuple(smooth_scale.shape) != (K,):
            raise ValueError(
                f"smooth_scale has shape {tuple(smooth_scale.shape)}; expected ({K},), one "
                "factor per input channel"
            )
    if (
        isinstance(eps, bool)
        or not isinstance(eps, (int, float))
        or not (is_finite(eps) and eps >= 0)
    ):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    check_same_device(x=x, weight=weight, bias=bias, residual=residual, smooth_scale=smooth_scale)


# --- registered ops --------------------------------------------------------------------


def _run(op, x, weight, bias, residual, smooth_scale, eps, quantize) -> list[torch.Tensor]:
    """The op's body: lay the inputs out, pick a backend, run it, shape the outputs as a
    list: [y] or [x_int8, scale], then the new residual if a residual was given."""
    x2 = rows_view(x)
    r2 = None if residual is None else rows_view(residual)
    w = weight.contiguous()
    b = None if bias is None else bias.contiguous()
    s = None if smooth_scale is None else smooth_scale.contiguous()
    if x2.shape[0] == 0:
        y, q, scale, r = _empty(x2, residual is not None, quantize)
    else:
        name = backend.select(op, x.device, x2, w, b, r2, s, float(eps), quantize)
        y, q, scale, r = backend.implementation(op, name)(x2, w, b, r2, s, float(eps), quantize)
    outs = [q.view(x.shape), scale.view(x.shape[:-1])] if quantize else [y.view(x.shape)]
    if residual is not None:
        outs.append(r.view(x.shape))
    return outs


def _empty(x2, has_residual, quantize):
    M, K = x2.shape
    dev = x2.device
    return (
        None if quantize else torch.empty((M, K), dtype=x2.dtype, device=dev),
        torch.empty((M, K), dtype=torch.int8, device=dev) if quantize else None,
        torch.empty((M,), dtype=torch.float32, device=dev) if quantize else None,
        torch.empty((M, K), dtype=x2.dtype, device=dev) if has_residual else None,
    )


def _fake(x, residual, quantize):
    if quantize:
        outs = [
            torch.empty(x.shape, dtype=torch.int8, device=x.device),
            torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device),
        ]
    else:
        outs = [torch.empty(x.shape, dtype=x.dtype, device=x.device)]
    if residual is not None:
        outs.append(torch.empty(x.shape, dtype=x.dtype, device=x.device))
    return outs


@torch.library.custom_op("fastllm::rms_norm", mutates_args=())
def _rms_norm_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    residual: torch.Tensor | None,
    smooth_scale: torch.Tensor | None,
    eps: float,
    quantize: bool,
) -> list[torch.Tensor]:
    _check(x, weight, None, residual, smooth_scale, eps, quantize)
    return _run("rms_norm", x, weight, None, residual, smooth_scale, eps, quantize)


@_rms_norm_op.register_fake
def _(x, weight, residual, smooth_scale, eps, quantize):
    return _fake(x, residual, quantize)


@torch.library.custom_op("fastllm::layer_norm", mutates_args=())
def _layer_norm_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    smooth_scale: torch.Tensor | None,
    eps: float,
    quantize: bool,
) -> list[torch.Tensor]:
    _check(x, weight, bias, residual, smooth_scale, eps, quantize)
    return _run("layer_norm", x, weight, bias, residual, smooth_scale, eps, quantize)


@_layer_norm_op.register_fake
def _(x, weight, bias, residual, smooth_scale, eps, quantize):
    return _fake(x, residual, quantize)


_OPS = torch.ops.fastllm


def _pack(outs, residual, quantize):
    y = (outs[0], outs[1]) if quantize else outs[0]
    return y if residual is None else (y, outs[-1])


# --- public functions ------------------------------------------------------------------


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    *,
    residual: torch.Tensor | None = None,
    quantize: bool = False,
    smooth_scale: torch.Tensor | None = None,
):
    """RMSNorm over the last dimension, as transformers' LlamaRMSNorm computes it:
    ``weight * (h32 * rsqrt(mean(h32**2, -1) + eps)).to(x.dtype)`` with ``h32 = h.float()``,
    where ``h = x + residual`` (added in x's dtype) or ``h = x``.

    Args:
        x: (..., K) float32, float16 or bfloat16, any strides (copied unless the last
            stride is 1), K >= 1.
        weight: (K,) of x's dtype.
        eps: added to the mean square, a finite number >= 0.
        residual: (..., K) like x, or None. When given, ``h = x + residual`` is normalized
            and also returned, as the new residual (a new tensor; residual is not written).
        quantize: return the per-token int8 quantization of the output instead of it:
            ``quantize_per_token(y.float() / smooth_scale)``, bit for bit what
            ``int8_dynamic_linear(y, ..., smooth_scale=smooth_scale)`` quantizes.
        smooth_scale: (K,) float32, SmoothQuant's per-channel factor; only with quantize.

    Returns:
        ``y`` (..., K) x's dtype; or ``(y, new_residual)``; or, with quantize,
        ``(y_int8, scale)`` ((..., K) int8, (...) float32) or ``((y_int8, scale), new_residual)``.

    Raises TypeError for non-tensors and wrong dtypes (weight, residual not of x's dtype;
    smooth_scale not float32), ValueError for wrong shapes, devices, eps, K = 0, or a
    smooth_scale without quantize.
    """
    _check(x, weight, None, residual, smooth_scale, eps, quantize)
    if direct(x, weight, residual, smooth_scale):
        outs = _run("rms_norm", x, weight, None, residual, smooth_scale, eps, quantize)
    else:
        outs = _OPS.rms_norm(x, weight, residual, smooth_scale, float(eps), quantize)
    return _pack(outs, residual, quantize)


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    residual: torch.Tensor | None = None,
    quantize: bool = False,
    smooth_scale: torch.Tensor | None = None,
):
    """LayerNorm over the last dimension, as ``torch.nn.functional.layer_norm(h, (K,),
    weight, bias, eps)`` computes it (in float32, rounded to x's dtype once), where
    ``h = x + residual`` (added in x's dtype) or ``h = x``.

    Args and returns as `rms_norm`, plus bias: (K,) of x's dtype, or None.
    """
    _check(x, weight, bias, residual, smooth_scale, eps, quantize)
    if direct(x, weight, bias, residual, smooth_scale):
        outs = _run("layer_norm", x, weight, bias, residual, smooth_scale, eps, quantize)
    else:
        outs = _OPS.layer_norm(x, weight, bias, residual, smooth_scale, float(eps), quantize)
    return _pack(outs, residual, quantize)
