"""Reference for the int8 matmuls.

    int8_linear:             out = (x_int8 @ w_int8.T) * x_scale[:, None] * w_scale[None, :] + bias
    int8_dynamic_linear:     x_int8, x_scale = quantize_per_token(x), then int8_linear
    int8_weight_only_linear: out = (x @ w_int8.T) * w_scale[None, :] + bias

The integer product is computed exactly (a float64 matmul of int8 values is exact while
K * 127 * 127 < 2**53, i.e. for any K that fits in memory), the scaling in float64.

The W8A8 ops take epilogue options, applied in this order before the one cast:

    y = act(acc * x_scale * w_scale + bias)                 act: None, gelu, gelu_tanh, silu
    y = act(gate) * up                                      gated: w = [w_gate; w_up]
    y = y + residual
    out = y.to(out_dtype), or quantize_per_token(out.float() / output_smooth_scale)
"""

import torch
import torch.nn.functional as F

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


def activation(y: torch.Tensor, name: str | None) -> torch.Tensor:
    """gelu: y * 0.5 * (1 + erf(y / sqrt 2)); gelu_tanh: gelu(approximate="tanh");
    silu: y * sigmoid(y); None: y."""
    if name is None:
        return y
    if name == "gelu":
        return F.gelu(y)
    if name == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    if name == "silu":
        return F.silu(y)
    raise ValueError(f"activation is {name!r}; expected None, 'gelu', 'gelu_tanh' or 'silu'")


def _finish(y, out_dtype, act, gated, residual, quantize_output, output_smooth_scale):
    """The epilogue after scaling and bias (module docstring), y in float64."""
    if gated:
        gate, up = y.chunk(2, dim=-1)
        y = activation(gate, act) * up
    else:
        y = activation(y, act)
    if residual is not None:
        y = y + residual.double()
    out = y.to(out_dtype)
    if not quantize_output:
        return out
    z = out.float() if output_smooth_scale is None else out.float() / output_smooth_scale
    return quantize_per_token(z)


def int8_linear(
    x_int8: torch.Tensor,
    x_scale: torch.Tensor,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    *,
    activation: str | None = None,
    gated: bool = False,
    residual: torch.Tensor | None = None,
    quantize_output: bool = False,
    output_smooth_scale: torch.Tensor | None = None,
):
    """x_int8 (..., K) int8, x_scale (...) , w_int8 (N, K) int8, w_scale (N,), bias (N,) or
    None -> (..., N) out_dtype (N / 2 when gated), or (int8, scale) with quantize_output.
    Computed in float64, then cast once."""
    acc = torch.matmul(x_int8.double(), w_int8.double().T)
    out = acc * x_scale.double().unsqueeze(-1) * w_scale.double()
    if bias is not None:
        out = out + bias.double()
    return _finish(
        out, out_dtype, activation, gated, residual, quantize_output, output_smooth_scale
    )


def int8_dynamic_linear(
    x: torch.Tensor,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    smooth_scale: torch.Tensor | None = None,
    **epilogue,
):
    """x (..., K) float -> (..., N) in x's dtype: per-token quantization of x (of
    x.float() / smooth_scale when given: SmoothQuant's run-time factor), then int8_linear
    (with int8_linear's epilogue options)."""
    xs = x
    if smooth_scale is not None:  # in float32 (float64 for float64 x)
        xs = x.to(torch.promote_types(x.dtype, torch.float32)) / smooth_scale
    x_int8, x_scale = quantize_per_token(xs)
    return int8_linear(x_int8, x_scale, w_int8, w_scale, bias, out_dtype=x.dtype, **epilogue)


def int8_dynamic_gated_linear(
    x: torch.Tensor,
    w_gate_up_int8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    smooth_scale: torch.Tensor | None = None,
    *,
    activation: str = "silu",
    residual: torch.Tensor | None = None,
    quantize_output: bool = False,
    output_smooth_scale: torch.Tensor | None = None,
):
    """Llama's MLP up half: act(x @ w_gate.T) * (x @ w_up.T), w_gate_up_int8 = [w_gate; w_up]
    (2I, K) -> (..., I) in x's dtype, or (int8, scale) with quantize_output."""
    return int8_dynamic_linear(
        x,
        w_gate_up_int8,
        w_scale,
        bias,
        smooth_scale,
        activation=activation,
        gated=True,
        residual=residual,
        quantize_output=quantize_output,
        output_smooth_scale=output_smooth_scale,
    )


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
