"""CUDA launchers of the int8 matmuls (kernels: csrc/int8/w8a8_gemm.cu, csrc/int8/w8a16_gemv.cu).

The launchers take tensors the op layer has already validated (shapes, dtypes,
devices); `supports_w8a8` / `supports_w8a16` say, as a reason string, when the
kernels cannot take them (alignment, dtype, M range, GPU architecture), so that the
op falls back to another backend for that call. Outputs and the split-K workspace
are allocated here from the shapes alone.
"""

from __future__ import annotations

import functools

import torch

from fastllm import native

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HALF_DTYPES = (torch.float16, torch.bfloat16)
INT32_MAX = 2**31 - 1

# W8A16 kernel shape (csrc/int8/w8a16_gemv.cu): blocks of 4 warps, each warp owning
# 32 rows of w for M <= 16 and 16 rows above; K in chunks of 64 columns.
W8A16_MAX_M = 64
W8A16_WARPS_PER_BLOCK = 4
W8A16_CHUNK = 64
# Split-K targets about this many resident warps per SM (weight loads in flight), keeps
# at least this many chunks per split, and a float32 workspace small enough for L2.
W8A16_WARPS_PER_SM = 16
MIN_CHUNKS_PER_SPLIT = 4
MAX_SPLITS = 32
WORKSPACE_BYTES = 16 * 2**20


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --- capability checks (shared with fastllm/native/sparse.py) ------------------------------


def _arch_ok(capability: tuple[int, int], archs: list[str]) -> bool:
    """Whether code built for `archs` ("sm_80", "sm_90a", ...) runs on `capability`.

    setup.py embeds PTX of the lowest plain arch, so a plain arch runs on any GPU at
    least as new; an arch-specific "a" build runs only on exactly that GPU."""
    for arch in archs:
        num = arch.removeprefix("sm_")
        exact = num.endswith("a")
        num = num.rstrip("a")
        if not num.isdigit() or len(num) < 2:
            continue
        cc = (int(num[:-1]), int(num[-1]))
        if (exact and cc == capability) or (not exact and cc <= capability):
            return True
    return False


@functools.cache
def _device_info(index: int) -> tuple[tuple[int, int], int]:
    props = torch.cuda.get_device_properties(index)
    return (props.major, props.minor), props.multi_processor_count


def sm_count(device: torch.device) -> int:
    return _device_info(torch.device(device).index or 0)[1]


def device_reason(*tensors: torch.Tensor | None) -> str | None:
    """None when the native kernels can run on these tensors' (CUDA, sm_80+) device."""
    if not native.with_cuda():
        err = native.load_error()
        return (
            f"fastllm._C is not available ({err})" if err else "fastllm._C was built without CUDA"
        )
    ts = [t for t in tensors if t is not None]
    for t in ts:
        if not t.is_cuda:
            return f"tensors must be on a CUDA device, got {t.device}"
    cap = _device_info(ts[0].device.index or 0)[0]
    if cap < (8, 0):
        return f"needs compute capability 8.0 or newer (mma.sync int8/f16), got {cap[0]}.{cap[1]}"
    if not _arch_ok(cap, native.cuda_archs()):
        return f"fastllm._C was built for {native.cuda_archs()}, not for compute capability {cap[0]}.{cap[1]}"
    return None


def _ld(t: torch.Tensor) -> int:
    """Row stride of a 2-D tensor as passed to the kernels (any valid value for one row)."""
    return t.stride(0) if t.shape[0] > 1 else t.shape[1]


def rows_reason(name: str, t: torch.Tensor, multiple: int) -> str | None:
    """None when t is 2-D with a unit last stride, its row stride a multiple of
    `multiple` elements, and its address 16-byte aligned."""
    if t.dim() != 2:
        return f"{name} must be 2-D, got shape {tuple(t.shape)}"
    if t.shape[1] > 1 and t.stride(1) != 1:
        return f"{name} needs a unit stride on its last dimension, got strides {t.stride()}"
    if _ld(t) % multiple != 0:
        return (
            f"{name} row stride {_ld(t)} is not a multiple of {multiple} elements (16-byte loads)"
        )
    if t.numel() and t.data_ptr() % 16 != 0:
        return f"{name} is not 16-byte aligned"
    return None


def vector_reason(name: str, t: torch.Tensor | None, n: int, dtypes) -> str | None:
    if t is None:
        return None
    if t.dtype not in dtypes or t.dim() != 1 or t.shape[0] != n:
        return f"{name} must be ({n},) of {dtypes}, got {tuple(t.shape)} {t.dtype}"
    if n > 1 and t.stride(0) != 1:
        return f"{name} must be contiguous, got stride {t.stride(0)}"
    return None


def bias_args(bias: torch.Tensor | None) -> tuple[int, int]:
    return (0, -1) if bias is None else (bias.data_ptr(), native.dtype_code(bias))


# --- W8A8 ----------------------------------------------------------------------------------


def supports_w8a8(
    x_int8, x_scale, w_int8, w_scale, bias=None, out_dtype=torch.bfloat16
) -> str | None:
    """None when `w8a8_linear` can run these inputs, else the reason it cannot.

    Needs: CUDA sm_80+, int8 x [M, K] and w [N, K] with unit last strides, K and both row
    strides multiples of 16 and 16-byte aligned bases (16-byte cp.async loads), float32
    scales, a float bias, out_dtype float32/float16/bfloat16, sizes under 2^31."""
    reason = device_reason(x_int8, x_scale, w_int8, w_scale, bias)
    if reason:
        return reason
    if x_int8.dtype != torch.int8 or w_int8.dtype != torch.int8:
        return f"x_int8 and w_int8 must be int8, got {x_int8.dtype} and {w_int8.dtype}"
    if out_dtype not in FLOAT_DTYPES:
        return f"out_dtype must be float32, float16 or bfloat16, got {out_dtype}"
    for name, t in (("x_int8", x_int8), ("w_int8", w_int8)):
        reason = rows_reason(name, t, 16)
        if reason:
            return reason
    (M, K), N = x_int8.shape, w_int8.shape[0]
    if w_int8.shape[1] != K:
        return f"w_int8 has K={w_int8.shape[1]} but x_int8 has K={K}"
    if K % 16 != 0:
        return f"K={K} is not a multiple of 16 (the kernel loads 16 int8 at a time)"
    if max(M, N, K) > INT32_MAX:
        return f"sizes {(M, N, K)} exceed 2^31 - 1"
    return (
        vector_reason("x_scale", x_scale, M, (torch.float32,))
        or vector_reason("w_scale", w_scale, N, (torch.float32,))
        or vector_reason("bias", bias, N, FLOAT_DTYPES)
    )


def w8a8_linear(
    x_int8, x_scale, w_int8, w_scale, bias=None, out_dtype=torch.bfloat16
) -> torch.Tensor:
    """out [M, N] = (x_int8 @ w_int8.T) * x_scale[:, None] * w_scale[None, :] + bias,
    int32 accumulation, epilogue in registers. Inputs as `supports_w8a8` accepts."""
    (M, K), N = x_int8.shape, w_int8.shape[0]
    out = torch.empty((M, N), dtype=out_dtype, device=x_int8.device)
    if M == 0 or N == 0:
        return out
    bias_ptr, bias_code = bias_args(bias)
    with torch.cuda.device(x_int8.device):
        native.module().int8_w8a8_gemm(
            x_int8.data_ptr(),
            _ld(x_int8),
            x_scale.data_ptr(),
            w_int8.data_ptr(),
            _ld(w_int8),
            w_scale.data_ptr(),
            bias_ptr,
            bias_code,
            out.data_ptr(),
            native.DTYPE_CODES[out_dtype],
            N,
            M,
            N,
            K,
            native.stream_of(x_int8),
        )
    return out


# --- W8A16 ---------------------------------------------------------------------------------


def supports_w8a16(x, w_int8, w_scale, bias=None) -> str | None:
    """None when `w8a16_linear` can run these inputs, else the reason it cannot.

    Needs: CUDA sm_80+, x [M, K] float16/bfloat16 with M <= 64 (the decode kernel;
    larger M goes to a GEMM backend), row stride a multiple of 8; int8 w [N, K] with
    row stride a multiple of 16; K % 16 == 0; 16-byte aligned bases."""
    reason = device_reason(x, w_int8, w_scale, bias)
    if reason:
        return reason
    if x.dtype not in HALF_DTYPES:
        return f"x must be float16 or bfloat16 for the CUDA W8A16 kernel, got {x.dtype}"
    if w_int8.dtype != torch.int8:
        return f"w_int8 must be int8, got {w_int8.dtype}"
    reason = rows_reason("x", x, 8) or rows_reason("w_int8", w_int8, 16)
    if reason:
        return reason
    (M, K), N = x.shape, w_int8.shape[0]
    if M > W8A16_MAX_M:
        return f"M={M} > {W8A16_MAX_M}: the W8A16 kernel is for decode-sized batches"
    if w_int8.shape[1] != K:
        return f"w_int8 has K={w_int8.shape[1]} but x has K={K}"
    if K % 16 != 0:
        return f"K={K} is not a multiple of 16 (the kernel loads 16 int8 at a time)"
    if max(N, K) > INT32_MAX:
        return f"sizes {(M, N, K)} exceed 2^31 - 1"
    return vector_reason("w_scale", w_scale, N, (torch.float32,)) or vector_reason(
        "bias", bias, N, FLOAT_DTYPES
    )


def w8a16_rows_per_warp(M: int) -> int:
    return 32 if M <= 16 else 16


def normalize_splits(splits: int, chunks: int) -> int:
    """The number of non-empty splits when `chunks` are cut into `splits` equal runs."""
    if chunks <= 0:
        return 1
    splits = max(1, min(splits, chunks))
    return cdiv(chunks, cdiv(chunks, splits))


def choose_splits(
    M: int, N: int, K: int, sms: int, *, rows_per_unit: int, units_per_sm: int, chunk: int
) -> int:
    """Split-K factor for a memory-bound small-M kernel whose parallel units (warps or
    blocks) each own `rows_per_unit` rows of the weight: enough units to keep
    `units_per_sm` per SM busy, at least MIN_CHUNKS_PER_SPLIT chunks of K per split, at
    most MAX_SPLITS, and a float32 workspace [splits, M, N] of at most WORKSPACE_BYTES."""
    chunks = cdiv(K, chunk)
    units = cdiv(N, rows_per_unit)
    target = units_per_sm * sms
    if M == 0 or N == 0 or units >= target or chunks < 2 * MIN_CHUNKS_PER_SPLIT:
        return 1
    splits = cdiv(target, units)
    splits = min(splits, chunks // MIN_CHUNKS_PER_SPLIT, MAX_SPLITS)
    splits = min(splits, WORKSPACE_BYTES // (4 * M * N))
    return normalize_splits(splits, chunks) if splits > 1 else 1


def choose_w8a16_splits(M: int, N: int, K: int, sms: int) -> int:
    return choose_splits(
        M,
        N,
        K,
        sms,
        rows_per_unit=w8a16_rows_per_warp(M),
        units_per_sm=W8A16_WARPS_PER_SM,
        chunk=W8A16_CHUNK,
    )


def workspace_shape(splits: int, M: int, N: int) -> tuple[int, int, int] | None:
    """float32 partial sums of a split-K launch; None when there is no split."""
    return (splits, M, N) if splits > 1 else None


def w8a16_linear(x, w_int8, w_scale, bias=None, *, splits: int | None = None) -> torch.Tensor:
    """out [M, N] = (x @ w_int8.T) * w_scale + bias in x's dtype, M <= 64; `splits`
    overrides the split-K choice (tests). Inputs as `supports_w8a16` accepts."""
    (M, K), N = x.shape, w_int8.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    if splits is None:
        splits = choose_w8a16_splits(M, N, K, sm_count(x.device))
    splits = normalize_splits(splits, cdiv(K, W8A16_CHUNK))
    shape = workspace_shape(splits, M, N)
    ws = torch.empty(shape, dtype=torch.float32, device=x.device) if shape else None
    bias_ptr, bias_code = bias_args(bias)
    with torch.cuda.device(x.device):
        native.module().int8_w8a16_gemm(
            x.data_ptr(),
            native.dtype_code(x),
            _ld(x),
            w_int8.data_ptr(),
            _ld(w_int8),
            w_scale.data_ptr(),
            bias_ptr,
            bias_code,
            out.data_ptr(),
            N,
            M,
            N,
            K,
            splits,
            ws.data_ptr() if ws is not None else 0,
            native.stream_of(x),
        )
    return out


# --- dynamic W8A8: per-token quantization, then the W8A8 GEMM ------------------------------


def supports_dynamic(x, w_int8, w_scale, bias=None, smooth_scale=None) -> str | None:
    """None when `dynamic_linear` can run these inputs: x [M, K] float32/float16/bfloat16
    with a unit last stride, and the weight as `supports_w8a8` accepts it."""
    reason = device_reason(x, w_int8, w_scale, bias)
    if reason:
        return reason
    if x.dtype not in FLOAT_DTYPES:
        return f"x must be float32, float16 or bfloat16, got {x.dtype}"
    if x.dim() != 2 or (x.shape[1] > 1 and x.stride(1) != 1):
        return f"x must be 2-D with a unit last stride, got shape {tuple(x.shape)} strides {x.stride()}"
    M, K = x.shape
    # the quantized activations are a new contiguous [M, K] tensor: check the weight side
    probe_x = torch.empty((0, K), dtype=torch.int8, device=x.device)
    probe_s = torch.empty((0,), dtype=torch.float32, device=x.device)
    return supports_w8a8(probe_x, probe_s, w_int8, w_scale, bias, x.dtype)


def dynamic_linear(x, w_int8, w_scale, bias=None) -> torch.Tensor:
    """out [M, N] in x's dtype = W8A8 of (quantize_per_token(x), w_int8): the CUDA
    quantization kernel then the GEMM (two launches; the int8 activations are 1 byte
    per element, a quarter of the float32 or half of the 16-bit input's traffic)."""
    from fastllm.native.quant import quantize_per_token

    x_int8, x_scale = quantize_per_token(x)
    return w8a8_linear(x_int8, x_scale, w_int8, w_scale, bias, x.dtype)
