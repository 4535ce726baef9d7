"""int8 linear ops: W8A8 with a fused dequantization epilogue, and W8A16 weight-only.

Backend implementations receive normalized arguments and return a new contiguous
tensor: the registered ops check them as the public functions do (so a direct
torch.ops.fastllm call is checked too) and make every tensor contiguous. All tensors
are on one device; M >= 1, N >= 1, K >= 1 (the public functions answer empty inputs
and K = 0 themselves); K <= 133,144 for the W8A8 ops (the int32 accumulator holds
K * 127**2: larger K is refused with a ValueError before any work).

``int8_linear`` impl(x_int8, x_scale, w_int8, w_scale, bias, out_dtype) -> out
    x_int8    [M, K]   int8, contiguous
    x_scale   [M]      float32, contiguous
    w_int8    [N, K]   int8, contiguous
    w_scale   [N]      float32, contiguous
    bias      [N]      float32/float16/bfloat16, contiguous, or None (added in float32)
    out_dtype          torch.float32, torch.float16 or torch.bfloat16 (a torch.dtype: the
                       custom op's schema has ScalarType; the public function also takes
                       names such as "bf16" and converts them)
    out       [M, N]   out_dtype:  (x_int8 @ w_int8.T) * x_scale[:, None] * w_scale[None, :]
                       + bias, with an exact int32 accumulator and the epilogue in float32

``int8_dynamic_linear`` impl(x, w_int8, w_scale, bias, smooth_scale) -> out
    x         [M, K]   float32/float16/bfloat16, contiguous
    w_int8, w_scale, bias as above
    smooth_scale [K]   float32, contiguous, or None (SmoothQuant's run-time factor)
    out       [M, N]   x's dtype: quantize_per_token(x) -- of x.float() / smooth_scale when
                       given -- then int8_linear

``int8_weight_only_linear`` impl(x, w_int8, w_scale, bias) -> out
    x         [M, K]   float32/float16/bfloat16, contiguous
    w_int8, w_scale, bias as above
    out       [M, N]   x's dtype: (x @ w_int8.T) * w_scale[None, :] + bias, accumulated in
                       float32 (a kernel converts the weights in registers: it reads each
                       weight byte once and never writes a dequantized weight)

Epilogue options (``activation``, ``gated``, ``residual``, ``quantize_output``,
``output_smooth_scale`` of int8_linear, int8_dynamic_linear and int8_dynamic_gated_linear)
go through one more registered op, ``fastllm::int8_fused_linear`` (backend op
"int8_fused_linear": reference, torch, cpu, triton; no cuda kernel, so on a GPU triton
serves it), which returns [y] or [y_int8, y_scale]; a call without options keeps the plain
op above, unchanged. Its impl is described at its backends below.

The ``cuda`` backend is the launchers of fastllm/native/int8.py, registered below with
their ``supports_*`` checks. The ``cpu`` backend (fastllm/native/cpu.py) is
``torch._int_mm`` (or, for up to 16-256 rows on CPUs with AVX512-VNNI, fastllm's own int8
matmul: the same int32) between two C++ kernels of fastllm._C: per-token quantization in
one read of x, and the epilogue in one pass written over the int32 accumulator; it gives
the torch backend's results bit for bit.

``torch`` backend:
    int8_linear: ``torch._int_mm`` where it accepts the shapes (on the CPU any shape with
    PyTorch >= 2.3; on CUDA M > 16 and K, N multiples of 8), else an exact float64
    matmul; then the epilogue in PyTorch. Measured with bench/bench_int8.py on a loaded
    2-core x86 CPU (PyTorch 2.13, N = K = 4096, OMP_NUM_THREADS=1): Int8Linear w8a8
    (quantization + _int_mm + epilogue) 3.7x float32 nn.Linear at M = 64, 4.9x at
    M = 256; _int_mm alone 4.1x and 5.0x. With 2 threads on the same loaded machine the
    small elementwise ops stall on thread barriers and the module falls to 0.7x-1.4x.
    int8_weight_only_linear: F.linear(x, w_int8.to(x.dtype)) * w_scale, exact per
    channel, about 2x faster on the CPU than dequantizing the weight first; on the CPU,
    for M <= 256, the weight is converted 4 MB of rows at a time so the float copy is
    read back from cache (M = 1, 1 thread: 3.0 ms against 8.2 ms for float32
    nn.Linear, and 40-70 ms converting the whole weight first). float16 goes through
    float32 (the unscaled product can pass float16's range, and the CPU float16 matmul
    is slow). torch._weight_int8pack_mm is not used: on this CPU its bfloat16 path
    crashes or returns garbage when K is not a multiple of 32.
    On an oversubscribed CPU (here: 2 threads, load 5) every small parallel op can
    stall on a thread barrier, and both torch paths lose most of their advantage.
"""

import torch
import torch.nn.functional as F

from fastllm import backend, reference
from fastllm.native import cpu as native_cpu
from fastllm.native import int8 as native_int8
from fastllm.ops._checks import (
    FLOAT_DTYPES,
    check_int8_k,
    check_same_device,
    check_tensor,
    contiguous,
    rows_view,
)
from fastllm.ops._eager import direct, shape_checks
from fastllm.ops.quant import _quantize_torch
from fastllm.reference import int8 as reference_int8

# --- int8_linear backends -------------------------------------------------------------


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


_CPU_INT_MM = hasattr(torch, "_int_mm") and _torch_version() >= (2, 3)


def int_mm_accepts(M: int, K: int, N: int, device: torch.device) -> bool:
    """Whether torch._int_mm takes [M, K] @ [K, N] int8 on `device` in this PyTorch."""
    if device.type == "cpu":
        return _CPU_INT_MM
    if device.type == "cuda":
        return hasattr(torch, "_int_mm") and M > 16 and K % 8 == 0 and N % 8 == 0
    return False


def int8_matmul_int32(x_int8: torch.Tensor, w_int8: torch.Tensor) -> torch.Tensor:
    """x [M, K] int8 @ w [N, K].T as the exact int32 accumulator [M, N]."""
    M, K = x_int8.shape
    N = w_int8.shape[0]
    if int_mm_accepts(M, K, N, x_int8.device):
        return torch._int_mm(x_int8, w_int8.t())
    # float64 holds every sum of K int8 products exactly (|sum| < 2**53)
    return torch.matmul(x_int8.double(), w_int8.double().t()).to(torch.int32)


def _epilogue(acc, x_scale, w_scale, bias, out_dtype):
    out = acc.to(torch.float32)  # the one temporary; the rest in place
    out.mul_(x_scale[:, None]).mul_(w_scale)
    if bias is not None:
        out.add_(bias)
    return out.to(out_dtype)


@backend.register("int8_linear", "reference")
def _int8_linear_reference(x_int8, x_scale, w_int8, w_scale, bias, out_dtype):
    return reference.int8_linear(x_int8, x_scale, w_int8, w_scale, bias, out_dtype)


@backend.register("int8_linear", "torch")
def _int8_linear_torch(x_int8, x_scale, w_int8, w_scale, bias, out_dtype):
    return _epilogue(int8_matmul_int32(x_int8, w_int8), x_scale, w_scale, bias, out_dtype)


@backend.register("int8_linear", "triton")
def _int8_linear_triton(x_int8, x_scale, w_int8, w_scale, bias, out_dtype):
    from fastllm.triton_kernels.int8 import int8_w8a8_linear

    return int8_w8a8_linear(x_int8, x_scale, w_int8, w_scale, bias, out_dtype)


# --- int8_dynamic_linear backends -----------------------------------------------------


def _smoothed_in_two_steps(name, x, w_int8, w_scale, bias, smooth_scale):
    """int8_dynamic_linear of a backend whose kernels do not fuse the smoothing: the
    division in float32, then its own quantize_per_token and int8_linear."""
    quantize = backend.implementation("quantize_per_token", name)
    linear = backend.implementation("int8_linear", name)
    x_int8, x_scale = quantize(x.float() / smooth_scale)
    return linear(x_int8, x_scale, w_int8, w_scale, bias, x.dtype)


@backend.register("int8_dynamic_linear", "reference")
def _dynamic_reference(x, w_int8, w_scale, bias, smooth_scale):
    return reference.int8_dynamic_linear(x, w_int8, w_scale, bias, smooth_scale)


@backend.register("int8_dynamic_linear", "torch")
def _dynamic_torch(x, w_int8, w_scale, bias, smooth_scale):
    x_int8, x_scale = _quantize_torch(x if smooth_scale is None else x.float() / smooth_scale)
    return _int8_linear_torch(x_int8, x_scale, w_int8, w_scale, bias, x.dtype)


@backend.register("int8_dynamic_linear", "triton")
def _dynamic_triton(x, w_int8, w_scale, bias, smooth_scale):
    if smooth_scale is not None:
        return _smoothed_in_two_steps("triton", x, w_int8, w_scale, bias, smooth_scale)
    from fastllm.triton_kernels.int8 import int8_dynamic_linear

    return int8_dynamic_linear(x, w_int8, w_scale, bias)


# --- int8_weight_only_linear backends -------------------------------------------------


@backend.register("int8_weight_only_linear", "reference")
def _weight_only_reference(x, w_int8, w_scale, bias):
    return reference.int8_weight_only_linear(x, w_int8, w_scale, bias)


_CPU_CHUNK_BYTES = 4 << 20  # float copy of one block of weight rows: stays in L2/L3
_CPU_CHUNKED_MAX_M = 256  # above, the matmul outweighs converting the weight at once


@backend.register("int8_weight_only_linear", "torch")
def _weight_only_torch(x, w_int8, w_scale, bias):
    if x.dtype == torch.float16 and x.is_cuda:
        # the unscaled product x @ w_int8.T can pass float16's range: dequantize first
        w = (w_int8.to(torch.float32) * w_scale[:, None]).to(torch.float16)
        return F.linear(x, w, bias.to(torch.float16) if bias is not None else None)
    compute = torch.float32 if x.dtype == torch.float16 else x.dtype
    M, K = x.shape
    N = w_int8.shape[0]
    xc = x.to(compute)
    if x.device.type == "cpu" and M <= _CPU_CHUNKED_MAX_M:
        # convert the weight a block of rows at a time, so the float copy is read back
        # from cache, not memory: the conversion costs one read of the int8 weight
        out = torch.empty((M, N), dtype=torch.float32, device=x.device)
        rows = max(16, _CPU_CHUNK_BYTES // (K * xc.element_size()) // 16 * 16)
        for n0 in range(0, N, rows):
            out[:, n0 : n0 + rows] = F.linear(xc, w_int8[n0 : n0 + rows].to(compute))
    else:
        out = F.linear(xc, w_int8.to(compute)).to(torch.float32)
    out.mul_(w_scale)
    if bias is not None:
        out.add_(bias)
    return out.to(x.dtype)


@backend.register("int8_weight_only_linear", "triton")
def _weight_only_triton(x, w_int8, w_scale, bias):
    from fastllm.triton_kernels.int8 import int8_w8a16_linear

    return int8_w8a16_linear(x, w_int8, w_scale, bias)


# --- cuda backends (csrc/int8/, launched by fastllm/native/int8.py) --------------------

backend.register("int8_linear", "cuda", supports=native_int8.supports_w8a8)(native_int8.w8a8_linear)


@backend.register("int8_dynamic_linear", "cuda", supports=native_int8.supports_dynamic)
def _dynamic_cuda(x, w_int8, w_scale, bias, smooth_scale):
    if smooth_scale is not None:
        return _smoothed_in_two_steps("cuda", x, w_int8, w_scale, bias, smooth_scale)
    return native_int8.dynamic_linear(x, w_int8, w_scale, bias)


backend.register("int8_weight_only_linear", "cuda", supports=native_int8.supports_w8a16)(
    native_int8.w8a16_linear
)


# --- cpu backends (C++ quantization and epilogue around the int8 matmul; fastllm/native/cpu.py)

backend.register("int8_linear", "cpu", supports=native_cpu.supports_w8a8)(native_cpu.w8a8_linear)
backend.register("int8_dynamic_linear", "cpu", supports=native_cpu.supports_dynamic)(
    native_cpu.dynamic_linear
)
backend.register(
    "int8_weight_only_linear",
    "cpu",
    supports=native_cpu.supports_w8a16,
    prefer=native_cpu.prefer_w8a16,
)(native_cpu.w8a16_linear)


# --- int8_fused_linear backends: the W8A8 ops with epilogue options --------------------
# impl(x, x_scale, w_int8, w_scale, bias, smooth, out_dtype, act, gated, residual, quantize,
#      out_smooth) -> (y, None, None), or (None, y_int8, y_scale) when quantize
#   x [M, K] int8 with x_scale [M] float32 (int8_linear), or float x with x_scale None
#     (int8_dynamic_linear: quantized per token, of x.float() / smooth when smooth is given)
#   w_int8 [N, K] ([2N, K] when gated: gate rows, then up rows), w_scale, bias accordingly
#   act None/"gelu"/"gelu_tanh"/"silu"; residual [M, N] out_dtype or None; out_smooth [N]
#     float32 or None (only with quantize)
#   y [M, N] out_dtype = cast(act(acc * x_scale * w_scale + bias) [* up] [+ residual]), in
#   float32; y_int8 [M, N], y_scale [M] = quantize_per_token(y.float() / out_smooth)
# Every tensor contiguous, M, N, K >= 1.

ACTIVATIONS = (None, "gelu", "gelu_tanh", "silu")


def _activation_torch(y: torch.Tensor, act: str | None) -> torch.Tensor:
    if act == "gelu":
        return F.gelu(y)
    if act == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    if act == "silu":
        return F.silu(y, inplace=True)
    return y


def _finish_torch(y, out_dtype, act, gated, residual, quantize, out_smooth):
    """The epilogue after scaling and bias, y float32 [M, N or 2N] (consumed)."""
    if gated:
        gate, up = y.chunk(2, dim=1)
        y = _activation_torch(gate.contiguous(), act).mul_(up)
    else:
        y = _activation_torch(y, act)
    if residual is not None:
        y.add_(residual)  # in float32: the residual is converted exactly
    out = y.to(out_dtype)
    if not quantize:
        return out, None, None
    q, scale = _quantize_torch(out if out_smooth is None else out.float() / out_smooth)
    return None, q, scale


@backend.register("int8_fused_linear", "reference")
def _fused_reference(
    x, x_scale, w, w_scale, bias, smooth, out_dtype, act, gated, residual, quantize, out_smooth
):
    kw = dict(
        activation=act,
        gated=gated,
        residual=residual,
        quantize_output=quantize,
        output_smooth_scale=out_smooth,
    )
    if x.dtype == torch.int8:
        out = reference_int8.int8_linear(x, x_scale, w, w_scale, bias, out_dtype, **kw)
    else:
        out = reference_int8.int8_dynamic_linear(x, w, w_scale, bias, smooth, **kw)
    return (None, *out) if quantize else (out, None, None)


@backend.register("int8_fused_linear", "torch")
def _fused_torch(
    x, x_scale, w, w_scale, bias, smooth, out_dtype, act, gated, residual, quantize, out_smooth
):
    if x.dtype != torch.int8:
        x, x_scale = _quantize_torch(x if smooth is None else x.float() / smooth)
    y = int8_matmul_int32(x, w).to(torch.float32)
    y.mul_(x_scale[:, None]).mul_(w_scale)  # the order of _epilogue: bit for bit
    if bias is not None:
        y.add_(bias)
    return _finish_torch(y, out_dtype, act, gated, residual, quantize, out_smooth)


@backend.register("int8_fused_linear", "triton")
def _fused_triton(
    x, x_scale, w, w_scale, bias, smooth, out_dtype, act, gated, residual, quantize, out_smooth
):
    from fastllm.triton_kernels.int8 import int8_dynamic_linear, int8_w8a8_linear

    quantize_rows = backend.implementation("quantize_per_token", "triton")
    if x.dtype == torch.int8:
        y = int8_w8a8_linear(x, x_scale, w, w_scale, bias, out_dtype, act, gated, residual)
    elif smooth is not None:  # as _smoothed_in_two_steps: the division first
        x_int8, x_scale = quantize_rows(x.float() / smooth)
        y = int8_w8a8_linear(x_int8, x_scale, w, w_scale, bias, x.dtype, act, gated, residual)
    else:
        y = int8_dynamic_linear(x, w, w_scale, bias, None, act, gated, residual)
    if not quantize:
        return y, None, None
    # a program holds BLOCK_N columns, not the row's amax: quantized by a second kernel
    q, scale = quantize_rows(y if out_smooth is None else y.float() / out_smooth)
    return None, q, scale


backend.register("int8_fused_linear", "cpu", supports=native_cpu.supports_fused)(
    native_cpu.fused_linear
)


# --- checks shared by the public functions and the registered ops -------------------------

_DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def _out_dtype(out_dtype) -> torch.dtype:
    dtype = out_dtype
    if isinstance(out_dtype, str):
        dtype = _DTYPE_NAMES.get(out_dtype.removeprefix("torch."))
    if dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"out_dtype is {out_dtype!r}; expected torch.bfloat16, torch.float16 or "
            "torch.float32 (or one of the names " + ", ".join(map(repr, _DTYPE_NAMES)) + ")"
        )
    return dtype


def _check_weight(x_name: str, x: torch.Tensor, w_int8, w_scale, bias) -> tuple[int, int]:
    check_tensor("w_int8", w_int8, dtypes=(torch.int8,), dim=2)
    N, K = w_int8.shape
    if x.shape[-1] != K:
        raise ValueError(
            f"{x_name} has K = {x.shape[-1]} (shape {tuple(x.shape)}) but w_int8 has "
            f"K = {K} (shape {tuple(w_int8.shape)}); expected x's last dimension to equal "
            "w_int8.shape[1]"
        )
    check_tensor("w_scale", w_scale, dtypes=(torch.float32,))
    if tuple(w_scale.shape) != (N,):
        raise ValueError(
            f"w_scale has shape {tuple(w_scale.shape)}; expected ({N},), one scale per "
            "row of w_int8"
        )
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES)
        if tuple(bias.shape) != (N,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}; expected ({N},) or None")
    check_same_device(**{x_name: x, "w_int8": w_int8, "w_scale": w_scale, "bias": bias})
    return N, K


def _check_float_x(x: torch.Tensor, op: str) -> None:
    if isinstance(x, torch.Tensor) and x.dtype == torch.int8:
        raise TypeError(
            f"x has dtype torch.int8; {op} takes float activations (float32, float16, "
            "bfloat16) -- for int8 activations use fastllm.ops.int8_linear"
        )
    check_tensor("x", x, dtypes=FLOAT_DTYPES, min_dim=1)


@shape_checks
def _check_int8_linear(x_int8, x_scale, w_int8, w_scale, bias) -> tuple[int, int]:
    check_tensor("x_int8", x_int8, dtypes=(torch.int8,), min_dim=1)
    check_tensor("x_scale", x_scale, dtypes=(torch.float32,))
    if x_scale.shape != x_int8.shape[:-1]:
        raise ValueError(
            f"x_scale has shape {tuple(x_scale.shape)}; expected {tuple(x_int8.shape[:-1])}, "
            "one scale per row of x_int8 (x_int8.shape[:-1])"
        )
    N, K = _check_weight("x_int8", x_int8, w_int8, w_scale, bias)
    check_same_device(x_int8=x_int8, x_scale=x_scale)
    check_int8_k(K)
    return N, K


@shape_checks
def _check_dynamic(x, w_int8, w_scale, bias, smooth_scale) -> tuple[int, int]:
    _check_float_x(x, "int8_dynamic_linear")
    N, K = _check_weight("x", x, w_int8, w_scale, bias)
    if smooth_scale is not None:
        check_tensor("smooth_scale", smooth_scale, dtypes=(torch.float32,))
        if tuple(smooth_scale.shape) != (K,):
            raise ValueError(
                f"smooth_scale has shape {tuple(smooth_scale.shape)}; expected ({K},), one "
                "factor per input channel (x.shape[-1])"
            )
        check_same_device(x=x, smooth_scale=smooth_scale)
    check_int8_k(K)
    return N, K


@shape_checks
def _check_weight_only(x, w_int8, w_scale, bias) -> tuple[int, int]:
    _check_float_x(x, "int8_weight_only_linear")
    return _check_weight("x", x, w_int8, w_scale, bias)


@shape_checks
def _check_fused(
    x,
    x_scale,
    w_int8,
    w_scale,
    bias,
    smooth_scale,
    out_dtype,
    activation,
    gated,
    residual,
    quantize_output,
    output_smooth_scale,
) -> tuple[int, int]:
    """-> (N, K) of the output: N is half of w_int8's rows when gated."""
    if x_scale is not None:
        N, K = _check_int8_linear(x, x_scale, w_int8, w_scale, bias)
    else:
        N, K = _check_dynamic(x, w_int8, w_scale, bias, smooth_scale)
    if not isinstance(activation, (str, type(None))) or activation not in ACTIVATIONS:
        raise ValueError(
            f"activation is {activation!r}; expected None, 'gelu', 'gelu_tanh' or 'silu'"
        )
    for name, flag in (("gated", gated), ("quantize_output", quantize_output)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if gated:
        if N % 2:
            raise ValueError(
                f"w_gate_up_int8 has {N} rows; expected an even number: the gate rows, then "
                "the up rows (torch.cat([w_gate, w_up]))"
            )
        N //= 2
    out_shape = (*x.shape[:-1], N)
    if residual is not None:
        check_tensor("residual", residual)
        if residual.dtype != out_dtype:
            raise TypeError(
                f"residual has dtype {residual.dtype}; expected the output's dtype {out_dtype}"
            )
        if tuple(residual.shape) != out_shape:
            raise ValueError(
                f"residual has shape {tuple(residual.shape)}; expected the output's shape "
                f"{out_shape}"
            )
        check_same_device(x=x, residual=residual)
    if output_smooth_scale is not None:
        if not quantize_output:
            raise ValueError(
                "output_smooth_scale is given but quantize_output is False; expected "
                "quantize_output=True (the factor divides the output before its quantization)"
            )
        check_tensor("output_smooth_scale", output_smooth_scale, dtypes=(torch.float32,))
        if tuple(output_smooth_scale.shape) != (N,):
            raise ValueError(
                f"output_smooth_scale has shape {tuple(output_smooth_scale.shape)}; expected "
                f"({N},), one factor per output channel"
            )
        check_same_device(x=x, output_smooth_scale=output_smooth_scale)
    return N, K


def _empty_or_k0(x, N, bias, out_dtype):
    """The answer when M = 0, N = 0 or K = 0 (no kernel runs): an empty tensor, or bias."""
    out = torch.zeros((*x.shape[:-1], N), dtype=torch.float32, device=x.device)
    if bias is not None and out.numel():
        out += bias.float()
    return out.to(out_dtype)


# The public functions call the registered ops through torch.ops (the same op as the
# custom_op objects below, without their Python wrapper's cost per call, ~18 us on a CPU),
# or, where `direct` allows it, run the op's body (`_run_*`) themselves.
_OPS = torch.ops.fastllm

# --- registered ops ---------------------------------------------------------------------
# Each checks its arguments as the public function does (a direct torch.ops.fastllm call
# included), then runs its body: contiguous tensors to the chosen backend.


def _run_int8_linear(x_int8, x_scale, w_int8, w_scale, bias, out_dtype):
    args = (*contiguous(x_int8, x_scale, w_int8, w_scale, bias), out_dtype)
    name = backend.select("int8_linear", x_int8.device, *args)
    return backend.implementation("int8_linear", name)(*args)


@torch.library.custom_op("fastllm::int8_linear", mutates_args=())
def _int8_linear_op(
    x_int8: torch.Tensor,
    x_scale: torch.Tensor,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    check_tensor("x_int8", x_int8, dim=2)
    _check_int8_linear(x_int8, x_scale, w_int8, w_scale, bias)
    return _run_int8_linear(x_int8, x_scale, w_int8, w_scale, bias, _out_dtype(out_dtype))


@_int8_linear_op.register_fake
def _(x_int8, x_scale, w_int8, w_scale, bias, out_dtype):
    return x_int8.new_empty((x_int8.shape[0], w_int8.shape[0]), dtype=out_dtype)


def _run_int8_dynamic_linear(x, w_int8, w_scale, bias, smooth_scale):
    args = contiguous(x, w_int8, w_scale, bias, smooth_scale)
    name = backend.select("int8_dynamic_linear", x.device, *args)
    return backend.implementation("int8_dynamic_linear", name)(*args)


@torch.library.custom_op("fastllm::int8_dynamic_linear", mutates_args=())
def _int8_dynamic_linear_op(
    x: torch.Tensor,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    smooth_scale: torch.Tensor | None,
) -> torch.Tensor:
    check_tensor("x", x, dim=2)
    _check_dynamic(x, w_int8, w_scale, bias, smooth_scale)
    return _run_int8_dynamic_linear(x, w_int8, w_scale, bias, smooth_scale)


@_int8_dynamic_linear_op.register_fake
def _(x, w_int8, w_scale, bias, smooth_scale):
    return x.new_empty((x.shape[0], w_int8.shape[0]))


def _run_int8_weight_only_linear(x, w_int8, w_scale, bias):
    args = contiguous(x, w_int8, w_scale, bias)
    name = backend.select("int8_weight_only_linear", x.device, *args)
    return backend.implementation("int8_weight_only_linear", name)(*args)


@torch.library.custom_op("fastllm::int8_weight_only_linear", mutates_args=())
def _int8_weight_only_linear_op(
    x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    check_tensor("x", x, dim=2)
    _check_weight_only(x, w_int8, w_scale, bias)
    return _run_int8_weight_only_linear(x, w_int8, w_scale, bias)


@_int8_weight_only_linear_op.register_fake
def _(x, w_int8, w_scale, bias):
    return x.new_empty((x.shape[0], w_int8.shape[0]))


def _run_int8_fused_linear(
    x, x_scale, w, w_scale, bias, smooth, out_dtype, act, gated, residual, quantize, out_smooth
) -> list[torch.Tensor]:
    tensors = contiguous(x, x_scale, w, w_scale, bias, smooth, residual, out_smooth)
    x, x_scale, w, w_scale, bias, smooth, residual, out_smooth = tensors
    args = (
        x,
        x_scale,
        w,
        w_scale,
        bias,
        smooth,
        out_dtype,
        act,
        gated,
        residual,
        quantize,
        out_smooth,
    )
    name = backend.select("int8_fused_linear", x.device, *args)
    y, q, scale = backend.implementation("int8_fused_linear", name)(*args)
    return [q, scale] if quantize else [y]


@torch.library.custom_op("fastllm::int8_fused_linear", mutates_args=())
def _int8_fused_linear_op(
    x: torch.Tensor,
    x_scale: torch.Tensor | None,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    smooth_scale: torch.Tensor | None,
    out_dtype: torch.dtype,
    activation: str | None,
    gated: bool,
    residual: torch.Tensor | None,
    quantize_output: bool,
    output_smooth_scale: torch.Tensor | None,
) -> list[torch.Tensor]:
    """int8_linear (x int8 with x_scale) or int8_dynamic_linear (float x, x_scale None)
    with the epilogue options; [y] or [y_int8, y_scale]. M, N, K >= 1, x 2-D."""
    check_tensor("x", x, dim=2)
    args = (
        x,
        x_scale,
        w_int8,
        w_scale,
        bias,
        smooth_scale,
        _out_dtype(out_dtype),
        activation,
        gated,
        residual,
        quantize_output,
        output_smooth_scale,
    )
    N, K = _check_fused(*args)
    if x.shape[0] == 0 or N == 0 or K == 0:
        raise ValueError(
            f"fastllm::int8_fused_linear takes M, N, K >= 1, got M = {x.shape[0]}, N = {N}, "
            f"K = {K} (the public functions answer empty inputs)"
        )
    return _run_int8_fused_linear(*args)


@_int8_fused_linear_op.register_fake
def _(
    x,
    x_scale,
    w_int8,
    w_scale,
    bias,
    smooth_scale,
    out_dtype,
    activation,
    gated,
    residual,
    quantize_output,
    output_smooth_scale,
):
    M = x.shape[0]
    N = w_int8.shape[0] // 2 if gated else w_int8.shape[0]
    if quantize_output:
        return [x.new_empty((M, N), dtype=torch.int8), x.new_empty((M,), dtype=torch.float32)]
    return [x.new_empty((M, N), dtype=out_dtype)]


def _fused(
    x, x_scale, w, w_scale, bias, smooth, out_dtype, act, gated, residual, quantize, out_smooth
):
    """The public functions' path when an epilogue option is given: check, answer empty
    inputs, run the op on 2-D rows, shape the result back."""
    N, K = _check_fused(
        x, x_scale, w, w_scale, bias, smooth, out_dtype, act, gated, residual, quantize, out_smooth
    )
    lead = x.shape[:-1]
    if x.numel() == 0 or N == 0:
        # no GEMM runs: the epilogue of a zero accumulator (K = 0) or nothing (M = 0, N = 0)
        M = lead.numel()
        y = torch.zeros((M, w.shape[0]), dtype=torch.float32, device=x.device)
        if bias is not None and y.numel():
            y += bias.float()
        r = None if residual is None else residual.reshape(M, N)
        if quantize and (M == 0 or N == 0):
            outs = [
                torch.zeros((M, N), dtype=torch.int8, device=x.device),
                torch.ones((M,), dtype=torch.float32, device=x.device),
            ]
        else:
            yo, q, scale = _finish_torch(y, out_dtype, act, gated, r, quantize, out_smooth)
            outs = [q, scale] if quantize else [yo]
    else:
        x2 = rows_view(x)
        xs = None if x_scale is None else x_scale.reshape(-1)
        r = None if residual is None else rows_view(residual)
        args = (x2, xs, w, w_scale, bias, smooth, out_dtype, act, gated, r, quantize, out_smooth)
        if direct(x2, xs, w, w_scale, bias, smooth, r, out_smooth):
            outs = _run_int8_fused_linear(*args)
        else:
            outs = _OPS.int8_fused_linear(*args)
    if quantize:
        return outs[0].view(*lead, N), outs[1].view(lead)
    return outs[0].view(*lead, N)


def _plain(activation, gated, residual, quantize_output, output_smooth_scale) -> bool:
    """Whether no epilogue option is given (the ops' plain path, unchanged)."""
    return (
        activation is None
        and gated is False
        and residual is None
        and quantize_output is False
        and output_smooth_scale is None
    )


# --- public functions -------------------------------------------------------------------


def int8_linear(
    x_int8: torch.Tensor,
    x_scale: torch.Tensor,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | str = torch.bfloat16,
    *,
    activation: str | None = None,
    gated: bool = False,
    residual: torch.Tensor | None = None,
    quantize_output: bool = False,
    output_smooth_scale: torch.Tensor | None = None,
):
    """W8A8 linear: int8 activations and weights, int32 accumulation, fused epilogue.

        y = act((x_int8 @ w_int8.T) * x_scale[..., None] * w_scale + bias)   (float32)
        y = act(gate) * up                       when gated (w_int8 = [w_gate; w_up])
        y = y + residual                         when given (in float32)
        out = y.to(out_dtype)                    or, with quantize_output,
        out = quantize_per_token(y.to(out_dtype).float() / output_smooth_scale)

    Args:
        x_int8: (..., K) int8, any strides (per-token quantized activations).
        x_scale: (...) float32, one scale per row of x_int8.
        w_int8: (N, K) int8 weight (per output channel quantized, e.g. quantize_per_channel).
        w_scale: (N,) float32.
        bias: (N,) float32/float16/bfloat16, or None; added in float32.
        out_dtype: torch.bfloat16 (default), torch.float16 or torch.float32, or its name.
        activation: None, "gelu" (exact, erf), "gelu_tanh" or "silu", as
            torch.nn.functional.gelu / gelu(approximate="tanh") / silu compute them.
        gated: w_int8 (2N, K) holds the gate rows then the up rows (w_scale, bias (2N,)
            likewise); the output (..., N) is act(gate) * up (Llama's MLP with "silu").
        residual: (..., N) of out_dtype, or None: added after the activation, in float32
            (the residual add of the GEMM that ends a block).
        quantize_output: return the per-token int8 quantization of the output, for the
            next W8A8 GEMM: bit for bit quantize_per_token(out.float() / output_smooth_scale)
            of the float output this call would return.
        output_smooth_scale: (N,) float32, SmoothQuant's factor of the next layer; only
            with quantize_output.
        Every tensor may be a strided view. K <= 133,144: K * 127**2 must fit the int32
        accumulator (int8 values in [-127, 127], as the quantize_* ops give).

    Returns:
        (..., N) out_dtype, or with quantize_output (y_int8 (..., N) int8, y_scale (...)
        float32). The accumulator is exact int32; the epilogue is float32.

    Raises TypeError for wrong dtypes (float weights, float activations, a residual not of
    out_dtype), non-tensors and non-bool flags; ValueError for mismatched K, scales, bias
    or residual of the wrong shape, a bad out_dtype or activation, an odd row count when
    gated, output_smooth_scale without quantize_output, tensors on different devices and
    K > 133,144 (checked before any work).
    """
    dtype = _out_dtype(out_dtype)
    if not _plain(activation, gated, residual, quantize_output, output_smooth_scale):
        return _fused(
            x_int8,
            x_scale,
            w_int8,
            w_scale,
            bias,
            None,
            dtype,
            activation,
            gated,
            residual,
            quantize_output,
            output_smooth_scale,
        )
    N, K = _check_int8_linear(x_int8, x_scale, w_int8, w_scale, bias)
    if x_int8.numel() == 0 or N == 0:
        return _empty_or_k0(x_int8, N, bias, dtype)
    args = (rows_view(x_int8), x_scale.reshape(-1), w_int8, w_scale, bias)
    if direct(*args):
        out = _run_int8_linear(*args, dtype)
    else:
        out = _OPS.int8_linear(*args, dtype)
    return out if x_int8.dim() == 2 else out.view(*x_int8.shape[:-1], N)


def int8_dynamic_linear(
    x: torch.Tensor,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    smooth_scale: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
    quantize_output: bool = False,
    output_smooth_scale: torch.Tensor | None = None,
):
    """W8A8 linear with dynamic per-token activation quantization.

        x_int8, x_scale = quantize_per_token(x)      # of x.float() / smooth_scale if given
        out = int8_linear(x_int8, x_scale, w_int8, w_scale, bias, out_dtype=x.dtype,
                          activation=..., residual=..., quantize_output=..., ...)

    Args:
        x: (..., K) float32, float16 or bfloat16, any strides.
        w_int8: (N, K) int8; w_scale: (N,) float32; bias: (N,) float or None.
        smooth_scale: (K,) float32 or None: SmoothQuant's per-input-channel factor s
            for a layer whose 1/s could not be folded into the layer before (the weight
            was quantized as W * s). The division happens in float32 inside the
            quantization (the cpu backend fuses it; the others divide first). Its values
            are not checked here (that would cost a device sync): they must be finite
            and > 0, as fastllm.nn.Int8Linear checks once.
        activation, residual (of x's dtype), quantize_output, output_smooth_scale: the
            epilogue options of int8_linear.
        Every tensor may be a strided view. K <= 133,144, as for int8_linear.

    Returns:
        (..., N) in x's dtype, or (y_int8, y_scale) with quantize_output.

    Raises TypeError/ValueError as int8_linear does (int8 x is a TypeError; K > 133,144
    a ValueError), and for a smooth_scale that is not float32 of shape (K,) on x's device.
    """
    if not _plain(activation, False, residual, quantize_output, output_smooth_scale):
        return _fused(
            x,
            None,
            w_int8,
            w_scale,
            bias,
            smooth_scale,
            x.dtype,
            activation,
            False,
            residual,
            quantize_output,
            output_smooth_scale,
        )
    N, K = _check_dynamic(x, w_int8, w_scale, bias, smooth_scale)
    if x.numel() == 0 or N == 0:
        return _empty_or_k0(x, N, bias, x.dtype)
    args = (rows_view(x), w_int8, w_scale, bias, smooth_scale)
    out = _run_int8_dynamic_linear(*args) if direct(*args) else _OPS.int8_dynamic_linear(*args)
    return out if x.dim() == 2 else out.view(*x.shape[:-1], N)


def int8_dynamic_gated_linear(
    x: torch.Tensor,
    w_gate_up_int8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    smooth_scale: torch.Tensor | None = None,
    *,
    activation: str | None = "silu",
    residual: torch.Tensor | None = None,
    quantize_output: bool = False,
    output_smooth_scale: torch.Tensor | None = None,
):
    """The gated half of a Llama-type MLP in one W8A8 GEMM over the concatenated weight:

        x_int8, x_scale = quantize_per_token(x)      # of x.float() / smooth_scale if given
        gate = x_int8 @ w_gate.T * x_scale * w_scale[:I] + bias[:I]          (float32)
        up   = x_int8 @ w_up.T   * x_scale * w_scale[I:] + bias[I:]
        out  = (act(gate) * up [+ residual]).to(x.dtype)    or its quantize_per_token

    One GEMM with N = 2I, not two: x is quantized and read once, the cpu backend makes one
    torch._int_mm call (a wider N keeps its threads busy), and a Triton program loads the
    gate and up tiles of the same I columns into two accumulators, so act(gate) * up is
    formed in registers and only the (M, I) result is written.

    Args:
        x: (..., K) float32, float16 or bfloat16, any strides.
        w_gate_up_int8: (2I, K) int8 = torch.cat([w_gate, w_up]) quantized per row;
            w_scale (2I,) float32; bias (2I,) or None.
        smooth_scale: (K,) float32 or None, as for int8_dynamic_linear.
        activation: "silu" (default: SwiGLU), "gelu" or "gelu_tanh" (GeGLU), or None.
        residual, quantize_output, output_smooth_scale ((I,)): as for int8_linear.

    Returns:
        (..., I) in x's dtype, or (y_int8, y_scale) with quantize_output.

    Raises as int8_dynamic_linear, and ValueError for an odd number of weight rows.
    """
    return _fused(
        x,
        None,
        w_gate_up_int8,
        w_scale,
        bias,
        smooth_scale,
        x.dtype,
        activation,
        True,
        residual,
        quantize_output,
        output_smooth_scale,
    )


def int8_weight_only_linear(
    x: torch.Tensor,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """W8A16 linear: float activations, int8 weights converted on the fly.

        out = (x @ w_int8.T) * w_scale + bias        (float32 accumulation)

    Built for small M (decode), where reading the weight is the cost: each weight byte
    is read once, and K is split across programs when M is small and N*K large.

    Args:
        x: (..., K) float32, float16 or bfloat16, any strides.
        w_int8: (N, K) int8; w_scale: (N,) float32; bias: (N,) float or None. Any strides.

    Returns:
        (..., N) in x's dtype.

    Raises TypeError for int8 or non-float x and non-int8 weights, ValueError for
    mismatched K, scales or bias of the wrong shape and tensors on different devices.
    """
    N, K = _check_weight_only(x, w_int8, w_scale, bias)
    if x.numel() == 0 or N == 0:
        return _empty_or_k0(x, N, bias, x.dtype)
    args = (rows_view(x), w_int8, w_scale, bias)
    if direct(*args):
        out = _run_int8_weight_only_linear(*args)
    else:
        out = _OPS.int8_weight_only_linear(*args)
    return out if x.dim() == 2 else out.view(*x.shape[:-1], N)
