"""Sparse linear layers in Triton: y = x Wᵀ + b with W stored compressed.

Formats: fastllm/sparse/format.py. Reference: fastllm/reference/sparse.py.

block_sparse_linear — W in BSR form (crow_indices, col_indices, blocks [nnz, bn, bk]).
    One program per (BLOCK_M rows of x, block-row r of W): it walks only the kept
    tiles crow[r]:crow[r+1] of its block-row, so work and weight traffic scale with
    density; an empty block-row writes just the bias (or zeros).

sparse24_linear — W as 2:4 (values [N, K/2], int16 metadata [N, ceil(K/16)]).
    One program per (BLOCK_M rows of x, BLOCK_N rows of W). Per BLOCK_K step it loads
    the BLOCK_K/2 values and BLOCK_K/16 metadata words of each of its W rows and
    expands them in registers to a dense [BLOCK_N, BLOCK_K] tile for tl.dot: for
    column k, nibble (k % 16) // 4 of word k // 16 gives the kept positions i0 < i1 of
    group k // 4, and W[n, k] = values[n, 2g] if k % 4 == i0, values[n, 2g+1] if
    k % 4 == i1, else 0. Weight bytes read: K/2 values + K/8 metadata bytes per row,
    0.5625 of dense fp16/bf16. Meant for small M (decode), where the dense GEMM is
    memory-bound.

Both accumulate in float32 (int32 for int8 2:4) and add the bias in the epilogue.
fp32 inputs use IEEE fp32 dots (not tf32). Under TRITON_INTERPRET=1, bf16 dot operands
are upcast to fp32 first (UPCAST): the interpreter's bf16 tl.dot is wrong.
"""

import torch
import triton
import triton.language as tl

from fastllm.backend import triton_interpreted


@triton.jit
def _block_sparse_linear_kernel(
    # pointers
    x_ptr, crow_ptr, col_ptr, blocks_ptr, bias_ptr, y_ptr,
    # sizes
    M, N, KB, NNZ,
    # strides
    stride_xm, stride_ym,
    # meta-parameters
    BN: tl.constexpr, BK: tl.constexpr, BLOCK_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    m_mask = offs_m < M
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm

    # unchecked crow values: read only tiles 0 <= i < NNZ (a bad crow gives wrong sums)
    start = tl.maximum(tl.load(crow_ptr + r), 0)
    end = tl.minimum(tl.load(crow_ptr + r + 1), NNZ)
    tile_ptrs = blocks_ptr + start.to(tl.int64) * (BN * BK) + offs_n[:, None] * BK + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BN), dtype=tl.float32)
    for i in range(start, end):
        # a bad column index is read clamped into [0, KB), as clamp_block_indices does
        c = tl.minimum(tl.maximum(tl.load(col_ptr + i), 0), KB - 1)
        k = c.to(tl.int64) * BK + offs_k
        x_mask = m_mask[:, None] & ((k >= 0) & (k < KB * BK))[None, :]
        x = tl.load(x_rows + k[None, :], mask=x_mask, other=0.0)
        tile = tl.load(tile_ptrs)  # [BN, BK]; tile i < NNZ
        tile_ptrs += BN * BK
        if UPCAST:
            x = x.to(tl.float32)
            tile = tile.to(tl.float32)
        acc = tl.dot(x, tl.trans(tile), acc, input_precision=PRECISION)

    offs_y = r * BN + offs_n
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_y).to(tl.float32)[None, :]
    y = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_y[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None])


@triton.jit
def _expand24_join(v_rows, meta_rows, k0, K, n_mask, BLOCK_K: tl.constexpr):
    """Dense [BLOCK_N, BLOCK_K] tile of W at columns k0.. from contiguous loads of its
    BLOCK_K/2 values and BLOCK_K/16 metadata words per row."""
    offs_v = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    v = tl.load(v_rows + offs_v[None, :], mask=n_mask[:, None] & (offs_v < K // 2)[None, :], other=0)
    v0, v1 = tl.split(tl.reshape(v, (v.shape[0], BLOCK_K // 4, 2)))  # [BLOCK_N, BLOCK_K/4] each
    offs_c = k0 // 16 + tl.arange(0, BLOCK_K // 16)
    word = tl.load(
        meta_rows + offs_c[None, :], mask=n_mask[:, None] & (offs_c * 16 < K)[None, :], other=0
    ).to(tl.int32)
    nib = (word[:, :, None] >> (4 * tl.arange(0, 4))[None, None, :]) & 15
    nib = tl.reshape(nib, (v.shape[0], BLOCK_K // 4))  # word c holds groups 4c..4c+3
    i0 = nib & 3
    i1 = nib >> 2
    zero = tl.zeros_like(v0)
    d0 = tl.where(i0 == 0, v0, zero)  # position 0 can only be the first kept element
    d1 = tl.where(i0 == 1, v0, tl.where(i1 == 1, v1, zero))
    d2 = tl.where(i0 == 2, v0, tl.where(i1 == 2, v1, zero))
    d3 = tl.where(i1 == 3, v1, zero)  # position 3 can only be the second
    # [BLOCK_N, BLOCK_K/4, 2 (b), 2 (a)] holds position 2b + a: row-major order is k order
    w = tl.join(tl.join(d0, d2), tl.join(d1, d3))
    return tl.reshape(w, (v.shape[0], BLOCK_K))


@triton.jit
def _expand24_gather(v_rows, meta_rows, k0, K, n_mask, BLOCK_K: tl.constexpr):
    """The same tile, each column gathering its group's values and word (simpler, more
    load instructions; kept as a fallback if join/reshape ever misbehave)."""
    offs_k = tl.arange(0, BLOCK_K)
    k = k0 + offs_k
    w_mask = n_mask[:, None] & (k < K)[None, :]
    word = tl.load(meta_rows + (k // 16)[None, :], mask=w_mask, other=0).to(tl.int32)
    nib = (word >> (4 * ((offs_k // 4) % 4))[None, :]) & 15
    v0 = tl.load(v_rows + (2 * (k // 4))[None, :], mask=w_mask, other=0)
    v1 = tl.load(v_rows + (2 * (k // 4) + 1)[None, :], mask=w_mask, other=0)
    pos = (offs_k % 4)[None, :]
    return tl.where(pos == (nib & 3), v0, tl.where(pos == (nib >> 2), v1, tl.zeros_like(v0)))


@triton.jit
def _sparse24_linear_kernel(
    # pointers
    x_ptr, values_ptr, meta_ptr, bias_ptr, y_ptr,
    # sizes
    M, N, K,
    # strides
    stride_xm, stride_vn, stride_metan, stride_ym,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    INT8: tl.constexpr, JOIN: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    v_rows = values_ptr + offs_n.to(tl.int64)[:, None] * stride_vn
    meta_rows = meta_ptr + offs_n.to(tl.int64)[:, None] * stride_metan

    if INT8:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        x = tl.load(x_rows + k[None, :], mask=m_mask[:, None] & (k < K)[None, :], other=0)
        if JOIN:
            w = _expand24_join(v_rows, meta_rows, k0, K, n_mask, BLOCK_K)
        else:
            w = _expand24_gather(v_rows, meta_rows, k0, K, n_mask, BLOCK_K)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _precision(dtype: torch.dtype, upcast: bool):
    # fp32 operands (given, or upcast under the interpreter): full fp32, not tf32
    return "ieee" if dtype == torch.float32 or upcast else None


def _block_m(M: int) -> int:
    return 16 if M <= 16 else 32 if M <= 32 else 64 if M <= 64 else 128


def block_sparse_linear(x, crow, col, blocks, bias, N: int) -> torch.Tensor:
    """x [M, K] (unit stride on K), crow int32 [N/bn+1], col int32 [nnz], blocks
    [nnz, bn, bk] contiguous with bn, bk powers of 2 >= 16, bias [N] or None -> y [M, N].
    The index values may be anything: the kernel reads within bounds whatever they hold."""
    M, K = x.shape
    nnz, bn, bk = blocks.shape
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    upcast = triton_interpreted() and x.dtype == torch.bfloat16
    BLOCK_M = _block_m(M)
    grid = (triton.cdiv(M, BLOCK_M), N // bn)
    _block_sparse_linear_kernel[grid](
        x, crow, col, blocks, bias if bias is not None else y, y,
        M, N, K // bk, nnz,
        x.stride(0), y.stride(0),
        BN=bn, BK=bk, BLOCK_M=BLOCK_M,
        HAS_BIAS=bias is not None, UPCAST=upcast, PRECISION=_precision(x.dtype, upcast),
        num_warps=8 if BLOCK_M * bn >= 128 * 64 or bn * bk > 64 * 64 else 4,
    )
    return y


def sparse24_linear(x, values, metadata, bias, join: bool = True) -> torch.Tensor:
    """x [M, K] (unit stride on K), values [N, K/2] and int16 metadata [N, ceil(K/16)]
    (unit stride on the last dim), bias [N] or None -> y [M, N] (int32 for int8 x)."""
    M, K = x.shape
    N = values.shape[0]
    int8 = x.dtype == torch.int8
    y = torch.empty((M, N), dtype=torch.int32 if int8 else x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    upcast = triton_interpreted() and x.dtype == torch.bfloat16
    BLOCK_M = _block_m(M)
    BLOCK_K = 128 if K >= 128 else 64
    # small M is memory-bound: narrow W tiles so that enough programs stream the weight
    m_tiles = triton.cdiv(M, BLOCK_M)
    BLOCK_N = 64 if M > 64 else 32
    if m_tiles * triton.cdiv(N, BLOCK_N) < 256:
        BLOCK_N = 16
    grid = (m_tiles, triton.cdiv(N, BLOCK_N))
    _sparse24_linear_kernel[grid](
        x, values, metadata, bias if bias is not None else y, y,
        M, N, K,
        x.stride(0), values.stride(0), metadata.stride(0), y.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        HAS_BIAS=bias is not None, UPCAST=upcast, PRECISION=_precision(x.dtype, upcast),
        INT8=int8, JOIN=join, num_warps=8 if BLOCK_M * BLOCK_N >= 128 * 64 else 4,
    )
    return y
