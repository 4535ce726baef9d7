"""Compressed formats of sparse weights: 2:4 (values + metadata) and block-sparse (BSR).

2:4 semi-structured
===================

W is (N, K) = (out_features, in_features), K a multiple of 4 (else ValueError).
Its groups are 4 consecutive elements along K: group g of row n is W[n, 4g:4g+4].
Each group keeps 2 elements:

``values``: (N, K/2), the dtype of W (float32, float16, bfloat16; int8 for the int8
    layers). values[n, 2g] and values[n, 2g+1] are the two kept elements of group g,
    in ascending k order.

``metadata``: int16, (N, ceil(K/16)). Each group of 4 contributes a 4-bit nibble:
    bits 0-1 = index (0-3) of the first kept element, bits 2-3 = index of the
    second, first < second. The 16-column chunk c of row n (columns 16c..16c+15,
    groups 4c..4c+3) is metadata[n, c]; group 4c+j sits in bits 4j..4j+3::

        metadata[n, c] = nib(4c) | nib(4c+1) << 4 | nib(4c+2) << 8 | nib(4c+3) << 12
        nib(g)         = i0 | i1 << 2        (W[n, 4g+i0] -> values[n, 2g], W[n, 4g+i1] -> values[n, 2g+1])

    The int16 holds the 16 bits as they are (a chunk whose last nibble is >= 8 reads
    as a negative int16). Nibbles of groups past K in the last chunk are 0. A group
    with fewer than 2 nonzeros still stores 2 distinct indices, its kept zeros stored
    as value 0: the nonzero (or masked-in) positions first, then the lowest free
    positions, so an all-zero group stores indices (0, 1).

This is the row-major nibble order in which ``mma.sp`` (m16n8k16, f16/bf16, with W as
the sparse A operand computing yᵀ = W xᵀ) takes the metadata of one row's 16-wide
k-chunk: one 16-bit word per row and chunk, group j of the chunk in bits 4j..4j+3.
A CUDA kernel rearranges these words per thread in registers (which thread of the
quad holds which rows' words is the kernel's business, not the format's).

Block-sparse (BSR)
==================

``BlockSparseWeight(crow_indices, col_indices, blocks, shape, block_size)``: W (N, K)
cut into (bn, bk) tiles; tile (r, c) covers W[r*bn:(r+1)*bn, c*bk:(c+1)*bk].

    crow_indices  int32 [N/bn + 1]       block-row r keeps the tiles crow[r]:crow[r+1]
    col_indices   int32 [nnz_blocks]     their block-column indices, ascending per row
    blocks        [nnz_blocks, bn, bk]   their dense tiles, the dtype of W
    shape         (N, K)
    block_size    (bn, bk)

N must be a multiple of bn and K a multiple of bk: other sizes are rejected with a
ValueError (no padding), so the format never holds elements outside W. Pick a block
size that divides the layer: (64, 64) divides 4096 x 11008, for example.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# --- 2:4 -------------------------------------------------------------------------------


def _check_k(name: str, K: int) -> None:
    if K % 4 != 0:
        raise ValueError(
            f"{name} has K = {K} columns (in_features); 2:4 sparsity needs K a multiple of 4"
        )


def _kept_indices(keep: torch.Tensor) -> torch.Tensor:
    """keep: bool (N, G, 4) with at most 2 True per group -> int64 (N, G, 2), ascending.

    The True positions first, then the lowest free positions."""
    pos = torch.arange(4, device=keep.device)
    # True positions score 8..11, free ones 0..3; lower positions score higher among equals
    score = keep.to(torch.int64) * 8 + (3 - pos)
    idx = score.topk(2, dim=-1).indices
    return idx.sort(dim=-1).values


def compress_24(
    w: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """W (N, K) -> (values (N, K/2), metadata int16 (N, ceil(K/16))), layout above.

    With ``mask`` (bool (N, K), at most 2 True per group of 4), the masked-in elements
    are kept and the others dropped. Without it, W must already be 2:4 sparse (at most
    2 nonzeros per group), and its nonzeros are kept.

    Raises TypeError for a non-tensor or non-bool mask, ValueError for W not 2-D, K not
    a multiple of 4, a mask of another shape, or a group with more than 2 elements to keep.
    """
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D (out_features, in_features), got shape {tuple(w.shape)}")
    N, K = w.shape
    _check_k("w", K)
    if mask is None:
        keep = w != 0
        what = "w has a group of 4 with more than 2 nonzeros; prune it first or pass a mask"
    else:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise TypeError(f"mask must be a bool tensor, got {got}")
        if mask.shape != w.shape:
            raise ValueError(f"mask has shape {tuple(mask.shape)} but w has {tuple(w.shape)}")
        keep = mask.to(w.device)
        what = "mask keeps more than 2 elements of a group of 4"
    G = K // 4
    keep = keep.reshape(N, G, 4)
    if (keep.sum(-1) > 2).any():
        raise ValueError(what)
    idx = _kept_indices(keep)  # (N, G, 2)
    wg = w.reshape(N, G, 4)
    values = torch.where(keep, wg, torch.zeros((), dtype=w.dtype, device=w.device))
    values = values.gather(2, idx).reshape(N, K // 2).contiguous()
    metadata = _pack_nibbles(idx[..., 0] | (idx[..., 1] << 2), K)
    return values, metadata


def _pack_nibbles(nib: torch.Tensor, K: int) -> torch.Tensor:
    """nib: int64 (N, K/4) in 0..15 -> int16 (N, ceil(K/16)), group 4c+j in bits 4j.."""
    N, G = nib.shape
    C = -(-K // 16)
    padded = torch.zeros(N, 4 * C, dtype=torch.int64, device=nib.device)
    padded[:, :G] = nib
    shifts = torch.tensor([0, 4, 8, 12], device=nib.device)
    words = (padded.view(N, C, 4) << shifts).sum(-1)  # 0..65535
    words = torch.where(words >= 32768, words - 65536, words)  # the same 16 bits as int16
    return words.to(torch.int16)


def _unpack_indices(metadata: torch.Tensor, K: int) -> torch.Tensor:
    """int16 (N, ceil(K/16)) -> int64 (N, K/4, 2), the kept positions of each group."""
    N, C = metadata.shape
    words = metadata.to(torch.int64) & 0xFFFF
    shifts = torch.tensor([0, 4, 8, 12], device=metadata.device)
    nib = ((words[:, :, None] >> shifts) & 0xF).reshape(N, 4 * C)[:, : K // 4]
    return torch.stack([nib & 3, (nib >> 2) & 3], dim=-1)


def check_24(values, metadata, K: int | None = None) -> int:
    """Validates a (values, metadata) pair's types and shapes; returns K."""
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
    if not isinstance(metadata, torch.Tensor):
        raise TypeError(f"metadata must be a torch.Tensor, got {type(metadata).__name__}")
    if metadata.dtype != torch.int16:
        raise TypeError(f"metadata has dtype {metadata.dtype}; expected torch.int16")
    if values.dim() != 2:
        raise ValueError(f"values must be 2-D (N, K/2), got shape {tuple(values.shape)}")
    N, half = values.shape
    if K is None:
        K = 2 * half
    elif 2 * half != K:
        raise ValueError(
            f"values has shape {tuple(values.shape)}; for K = {K} expected (N, {K // 2})"
        )
    _check_k("values", K)
    expect = (N, -(-K // 16))
    if tuple(metadata.shape) != expect:
        raise ValueError(
            f"metadata has shape {tuple(metadata.shape)} but values {tuple(values.shape)} "
            f"(K = {K}) needs metadata of shape {expect}"
        )
    if metadata.device != values.device:
        raise ValueError(f"metadata is on {metadata.device} but values is on {values.device}")
    return K


def decompress_24(
    values: torch.Tensor, metadata: torch.Tensor, K: int | None = None
) -> torch.Tensor:
    """(values (N, K/2), metadata int16 (N, ceil(K/16))) -> dense W (N, K); K defaults to
    2 * values.shape[1]. Exactly inverts compress_24.

    Raises ValueError when the shapes do not match each other (or K), or when a
    nibble does not hold two ascending indices."""
    K = check_24(values, metadata, K)
    idx = _unpack_indices(metadata, K)
    if (idx[..., 0] >= idx[..., 1]).any():
        raise ValueError("metadata holds a group whose two indices are not ascending (i0 < i1)")
    return _scatter_24(values, idx, K)


def _scatter_24(values: torch.Tensor, idx: torch.Tensor, K: int) -> torch.Tensor:
    N = values.shape[0]
    dense = torch.zeros(N, K // 4, 4, dtype=values.dtype, device=values.device)
    dense.scatter_(2, idx, values.reshape(N, K // 4, 2))
    return dense.view(N, K)


_LUT: dict[torch.device, torch.Tensor] = {}


def _chunk_columns(device: torch.device) -> torch.Tensor:
    """int64 (65536, 8): for each 16-bit metadata word, the columns (0..15) within its
    chunk of the chunk's 8 values, in values order."""
    lut = _LUT.get(device)
    if lut is None:
        words = torch.arange(65536, dtype=torch.int64)
        nib = (words[:, None] >> torch.tensor([0, 4, 8, 12])) & 0xF  # (65536, 4)
        base = torch.tensor([0, 4, 8, 12])
        lut = torch.stack([base + (nib & 3), base + (nib >> 2)], dim=-1).reshape(65536, 8)
        lut = _LUT.setdefault(device, lut.to(device))
    return lut


def decompress_24_unchecked(values: torch.Tensor, metadata: torch.Tensor) -> torch.Tensor:
    """decompress_24 without validation, for the ops (their callers validated). One
    table lookup per 16-column chunk and one scatter: the torch backend's hot path."""
    N, C = metadata.shape
    K = 2 * values.shape[1]
    words = (metadata.to(torch.int64) & 0xFFFF).view(-1)
    cols = _chunk_columns(metadata.device).index_select(0, words).view(N, C, 8)
    dense = torch.zeros(N, C, 16, dtype=values.dtype, device=values.device)
    if K != 16 * C:  # the last chunk holds fewer than 8 values
        vals = torch.zeros(N, C * 8, dtype=values.dtype, device=values.device)
        vals[:, : K // 2] = values
    else:
        vals = values
    dense.scatter_(2, cols, vals.reshape(N, C, 8))
    return dense.view(N, 16 * C)[:, :K]


# --- block-sparse ----------------------------------------------------------------------


class BlockSparseWeight(NamedTuple):
    """W (N, K) in BSR form; see the module docstring."""

    crow_indices: torch.Tensor  # int32 [N/bn + 1]
    col_indices: torch.Tensor  # int32 [nnz_blocks]
    blocks: torch.Tensor  # [nnz_blocks, bn, bk]
    shape: tuple[int, int]  # (N, K)
    block_size: tuple[int, int]  # (bn, bk)

    @property
    def density(self) -> float:
        """Fraction of tiles kept."""
        (N, K), (bn, bk) = self.shape, self.block_size
        total = (N // bn) * (K // bk)
        return self.col_indices.numel() / total if total else 1.0

    def to_dense(self) -> torch.Tensor:
        return from_block_sparse(self)


def check_block_size(shape: tuple[int, int], block_size) -> tuple[int, int]:
    if (
        not isinstance(block_size, tuple | list)
        or len(block_size) != 2
        or not all(isinstance(b, int) and b > 0 for b in block_size)
    ):
        raise ValueError(f"block_size must be two positive ints (bn, bk), got {block_size!r}")
    bn, bk = block_size
    N, K = shape
    if N % bn or K % bk:
        raise ValueError(
            f"weight of shape ({N}, {K}) is not divisible by block_size ({bn}, {bk}); "
            "block sparsity needs out_features % bn == 0 and in_features % bk == 0 "
            "(no padding): pick a block size that divides both"
        )
    return bn, bk


def block_mask(mask: torch.Tensor, block_size) -> torch.Tensor:
    """Element mask (N, K), constant on each tile -> tile mask (N/bn, K/bk)."""
    bn, bk = check_block_size(tuple(mask.shape), block_size)
    N, K = mask.shape
    tiles = mask.reshape(N // bn, bn, K // bk, bk)
    any_, all_ = tiles.any(dim=(1, 3)), tiles.all(dim=(1, 3))
    if not torch.equal(any_, all_):
        raise ValueError(
            f"mask is not constant on each ({bn}, {bk}) tile; expected a block mask "
            "(as fastllm.sparse.prune(..., pattern='block') returns)"
        )
    return any_


def to_block_sparse(w: torch.Tensor, mask: torch.Tensor, block_size=(64, 64)) -> BlockSparseWeight:
    """Dense W (N, K) and a mask -> BlockSparseWeight holding the kept tiles of W.

    ``mask`` is bool, either per element (N, K) and constant on each tile, or per tile
    (N/bn, K/bk). Raises ValueError for sizes not divisible by ``block_size``."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D (out_features, in_features), got shape {tuple(w.shape)}")
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"mask must be a bool tensor, got {got}")
    N, K = w.shape
    bn, bk = check_block_size((N, K), tuple(block_size))
    if tuple(mask.shape) == (N, K):
        tiles = block_mask(mask, (bn, bk))
    elif tuple(mask.shape) == (N // bn, K // bk):
        tiles = mask
    else:
        raise ValueError(
            f"mask has shape {tuple(mask.shape)}; expected ({N}, {K}) per element "
            f"or ({N // bn}, {K // bk}) per ({bn}, {bk}) tile"
        )
    tiles = tiles.to(w.device)
    counts = tiles.sum(dim=1)
    crow = torch.zeros(N // bn + 1, dtype=torch.int32, device=w.device)
    crow[1:] = counts.cumsum(0)
    rows, cols = tiles.nonzero(as_tuple=True)  # row-major: ascending columns per row
    w4 = w.reshape(N // bn, bn, K // bk, bk).permute(0, 2, 1, 3)
    blocks = w4[rows, cols].contiguous()
    return BlockSparseWeight(crow, cols.to(torch.int32), blocks, (N, K), (bn, bk))


def from_block_sparse(bsw: BlockSparseWeight) -> torch.Tensor:
    """BlockSparseWeight -> dense W (N, K), zeros outside the kept tiles."""
    N, K = bsw.shape
    return block_sparse_to_dense(bsw.crow_indices, bsw.col_indices, bsw.blocks, N, K)


def clamp_block_indices(
    crow: torch.Tensor, col: torch.Tensor, nnz: int, kb: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """crow_indices and col_indices as the block-sparse paths read them, whatever they hold:
    crow clamped to [0, nnz], from 0 to nnz and never decreasing (a running max), col
    clamped to [0, kb). Valid indices come back unchanged; invalid ones (left unchecked
    under torch.compile or on a GPU) give wrong numbers, never a read outside the tiles
    or the weight. Tensor ops only: no device sync."""
    crow = crow.clamp(0, nnz)
    crow[0], crow[-1] = 0, nnz
    return crow.cummax(0).values, col.clamp(0, max(kb - 1, 0))


def block_sparse_to_dense(crow, col, blocks, N: int, K: int) -> torch.Tensor:
    """Dense W (N, K) from BSR tensors; indices read through clamp_block_indices."""
    nnz, bn, bk = blocks.shape
    crow, col = clamp_block_indices(crow, col, nnz, K // bk)
    counts = (crow[1:] - crow[:-1]).to(torch.int64)
    rows = torch.repeat_interleave(torch.arange(N // bn, device=blocks.device), counts)
    dense = torch.zeros(N // bn, K // bk, bn, bk, dtype=blocks.dtype, device=blocks.device)
    dense[rows, col.to(torch.int64)] = blocks
    return dense.permute(0, 2, 1, 3).reshape(N, K)


def check_block_sparse(bsw: BlockSparseWeight, *, contents: bool = True) -> tuple[int, int]:
    """Validates a BlockSparseWeight's types and shapes (and, with ``contents``, its
    indices: crow from 0 to nnz, never decreasing; columns in range, ascending per
    block-row). Returns (N, K). Checking contents reads the indices (a GPU sync)."""
    crow, col, blocks, shape, block_size = bsw
    for name, t in (("crow_indices", crow), ("col_indices", col)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != 1:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"weight_bsr.{name} must be a 1-D int32 tensor, got {got}")
    if not isinstance(blocks, torch.Tensor) or blocks.dim() != 3:
        got = tuple(blocks.shape) if isinstance(blocks, torch.Tensor) else type(blocks).__name__
        raise ValueError(f"weight_bsr.blocks must be 3-D (nnz, bn, bk), got {got}")
    if (
        not isinstance(shape, tuple | list)
        or len(shape) != 2
        or not all(isinstance(s, int) and s >= 0 for s in shape)
    ):
        raise ValueError(f"weight_bsr.shape must be (N, K), got {shape!r}")
    N, K = shape
    bn, bk = check_block_size(
        (N, K), tuple(block_size) if isinstance(block_size, list) else block_size
    )
    nnz = col.shape[0]
    if tuple(blocks.shape) != (nnz, bn, bk):
        raise ValueError(
            f"weight_bsr.blocks has shape {tuple(blocks.shape)}; with {nnz} col_indices and "
            f"block_size ({bn}, {bk}) expected ({nnz}, {bn}, {bk})"
        )
    if crow.shape[0] != N // bn + 1:
        raise ValueError(
            f"weight_bsr.crow_indices has {crow.shape[0]} entries; N = {N} with bn = {bn} "
            f"needs N/bn + 1 = {N // bn + 1}"
        )
    if not (crow.device == col.device == blocks.device):
        raise ValueError("weight_bsr's tensors are on different devices")
    if contents:
        check_block_indices(bsw)
    return N, K


def check_block_indices(bsw: BlockSparseWeight) -> None:
    """The index values of a BlockSparseWeight whose shapes check_block_sparse accepted:
    crow from 0 to nnz, never decreasing; columns in range, ascending per block-row.
    Reads the indices (a device sync on a GPU)."""
    crow, col = bsw.crow_indices, bsw.col_indices
    (N, K), (bn, bk) = bsw.shape, bsw.block_size
    nnz = col.shape[0]
    steps = crow[1:] - crow[:-1]
    if crow[0].item() != 0 or crow[-1].item() != nnz or bool((steps < 0).any()):
        raise ValueError(
            f"weight_bsr.crow_indices must rise from 0 to nnz = {nnz} without decreasing"
        )
    if nnz and (col.min().item() < 0 or col.max().item() >= K // bk):
        raise ValueError(
            f"weight_bsr.col_indices must lie in [0, {K // bk}) (K / bk), "
            f"got values in [{col.min().item()}, {col.max().item()}]"
        )
    rows = torch.repeat_interleave(torch.arange(N // bn, device=col.device), steps.to(torch.int64))
    same_row = rows[1:] == rows[:-1]
    if bool((same_row & (col[1:] <= col[:-1])).any()):
        raise ValueError("weight_bsr.col_indices must ascend within each block-row")
