"""CUDA launcher of the 2:4 sparse matmul (kernel: csrc/sparse/sparse24_gemm.cu).

The kernel consumes the compressed format of fastllm/sparse/format.py as it is:
each 16-bit metadata word (one row, one 16-column chunk) is exactly the word that
mma.sp m16n8k32 takes from a thread for that row and chunk, so there is no reorder
step. `supports_sparse24` says, as a reason string, when the kernel cannot take the
inputs (dtype, K % 64, alignment, GPU architecture) so that the op falls back for
that call. The launcher allocates the output and the split-K workspace.
"""

from __future__ import annotations

import torch

from fastllm import native
from fastllm.native.int8 import (
    FLOAT_DTYPES,
    HALF_DTYPES,
    INT32_MAX,
    _ld,
    bias_args,
    cdiv,
    choose_splits,
    device_reason,
    normalize_splits,
    rows_reason,
    sm_count,
    vector_reason,
    workspace_shape,
)

# Kernel shape (csrc/sparse/sparse24_gemm.cu): K in tiles of 64 columns; for M <= 32
# blocks of 64 weight rows x 32 tokens (4 warps) with split-K, else 128 x 128, no split.
K_TILE = 64
SMALL_M = 32
SMALL_BLOCK_ROWS = 64
# blocks of 4 warps wanted per SM for the memory-bound small-M case
SMALL_BLOCKS_PER_SM = 4


def supports_sparse24(x, values, metadata, bias=None) -> str | None:
    """None when `sparse24_linear` can run these inputs, else the reason it cannot.

    Needs: CUDA sm_80+, x [M, K] float16/bfloat16, values [N, K/2] of x's dtype,
    metadata int16 [N, K/16], K % 64 == 0, unit last strides, x/values row strides
    multiples of 8 and metadata's of 4 elements, aligned bases. (int8 2:4 values have
    no CUDA kernel yet.)"""
    reason = device_reason(x, values, metadata, bias)
    if reason:
        return reason
    if x.dtype not in HALF_DTYPES:
        return f"x must be float16 or bfloat16 for the CUDA 2:4 kernel, got {x.dtype}"
    if values.dtype != x.dtype:
        return f"values dtype {values.dtype} differs from x dtype {x.dtype}"
    if metadata.dtype != torch.int16:
        return f"metadata must be int16, got {metadata.dtype}"
    if x.dim() != 2 or values.dim() != 2:
        return f"x and values must be 2-D, got {tuple(x.shape)} and {tuple(values.shape)}"
    (M, K), N = x.shape, values.shape[0]
    if K % K_TILE != 0:
        return f"K={K} is not a multiple of {K_TILE} (the kernel's K tile)"
    reason = rows_reason("x", x, 8) or rows_reason("values", values, 8)
    if reason:
        return reason
    if values.shape != (N, K // 2):
        return f"values must be ({N}, {K // 2}) for K={K}, got {tuple(values.shape)}"
    if metadata.dim() != 2 or metadata.shape != (N, K // 16):
        return f"metadata must be ({N}, {K // 16}) for K={K}, got {tuple(metadata.shape)}"
    if metadata.shape[1] > 1 and metadata.stride(1) != 1:
        return f"metadata needs a unit stride on its last dimension, got {metadata.stride()}"
    if _ld(metadata) % 4 != 0:
        return f"metadata row stride {_ld(metadata)} is not a multiple of 4 (8-byte loads)"
    if metadata.numel() and metadata.data_ptr() % 8 != 0:
        return "metadata is not 8-byte aligned"
    if max(M, N, K) > INT32_MAX or cdiv(M, 128) > 65535:
        return f"sizes {(M, N, K)} exceed the kernel's grid"
    return vector_reason("bias", bias, N, FLOAT_DTYPES)


def choose_sparse24_splits(M: int, N: int, K: int, sms: int) -> int:
    if M > SMALL_M:
        return 1
    return choose_splits(
        M,
        N,
        K,
        sms,
        rows_per_unit=SMALL_BLOCK_ROWS,
        units_per_sm=SMALL_BLOCKS_PER_SM,
        chunk=K_TILE,
    )


def sparse24_linear(x, values, metadata, bias=None, *, splits: int | None = None) -> torch.Tensor:
    """out [M, N] = x @ W.T + bias in x's dtype, W the 2:4 weight given as (values,
    metadata); `splits` overrides the split-K choice (tests; M <= 32 only). Inputs as
    `supports_sparse24` accepts."""
    (M, K), N = x.shape, values.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    if M > SMALL_M:
        splits = 1
    elif splits is None:
        splits = choose_sparse24_splits(M, N, K, sm_count(x.device))
    splits = normalize_splits(splits, K // K_TILE)
    shape = workspace_shape(splits, M, N)
    ws = torch.empty(shape, dtype=torch.float32, device=x.device) if shape else None
    bias_ptr, bias_code = bias_args(bias)
    with torch.cuda.device(x.device):
        native.module().sparse24_gemm(
            x.data_ptr(),
            native.dtype_code(x),
            _ld(x),
            values.data_ptr(),
            _ld(values),
            metadata.data_ptr(),
            _ld(metadata),
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
