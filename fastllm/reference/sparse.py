"""Reference for the sparse linear ops: y = x Wᵀ + b with W given compressed.

Formats: fastllm/sparse/format.py. Float inputs compute in float32 (float64 for
float64) and return x's dtype; int8 x with int8 2:4 values returns the exact int32
accumulator (the int8 layers scale it themselves).
"""

from __future__ import annotations

import torch

from fastllm.sparse.format import BlockSparseWeight, decompress_24


def _linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if x.dtype == torch.int8:
        # float64 holds every int8 x int8 sum exactly (|sum| < 2**53), on any device
        y = x.to(torch.float64) @ w.to(torch.float64).t()
        if bias is not None:
            raise ValueError("bias is not supported with int8 inputs (add it after scaling)")
        return y.to(torch.int32)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(compute) @ w.to(compute).t()
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(x.dtype)


def sparse24_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    metadata: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x (..., K) times the 2:4 weight (values (N, K/2), metadata (N, ceil(K/16)))ᵀ -> (..., N)."""
    w = decompress_24(values, metadata)  # (N, K)
    return _linear(x, w, bias)


def block_sparse_linear(
    x: torch.Tensor, weight_bsr: BlockSparseWeight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x (..., K) times the block-sparse weight (N, K)ᵀ -> (..., N), summing kept tiles
    one by one: y[:, rows of block-row r] = Σ_i x[:, cols of tile i] · blocks[i]ᵀ."""
    (N, K), (bn, bk) = weight_bsr.shape, weight_bsr.block_size
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    x2 = x.reshape(-1, K).to(compute)
    y = torch.zeros(x2.shape[0], N, dtype=compute, device=x.device)
    crow = weight_bsr.crow_indices.tolist()
    cols = weight_bsr.col_indices.tolist()
    for r in range(N // bn):
        for i in range(crow[r], crow[r + 1]):
            c = cols[i]
            tile = weight_bsr.blocks[i].to(compute)  # (bn, bk)
            y[:, r * bn : (r + 1) * bn] += x2[:, c * bk : (c + 1) * bk] @ tile.t()
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(x.dtype).reshape(*x.shape[:-1], N)
