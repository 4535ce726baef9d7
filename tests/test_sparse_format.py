"""fastllm.sparse formats: the documented 2:4 layout, exact round trips, BSR, bad input."""

import pytest
import torch

from fastllm.sparse import (
    BlockSparseWeight,
    compress_24,
    decompress_24,
    from_block_sparse,
    prune,
    to_block_sparse,
)
from fastllm.sparse.format import check_block_sparse, decompress_24_unchecked

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int8]


def _random(shape, dtype):
    if dtype == torch.int8:
        return torch.randint(-127, 128, shape, dtype=torch.int8)
    return torch.randn(shape).to(dtype)


def test_layout_by_hand():
    w = torch.tensor(
        [
            [0, 5, 0, 7, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 3, 0, 0, 9, 0],
            [6, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 1, 0, 0, 1, 1, 0, 0],
        ],
        dtype=torch.float32,
    )
    values, metadata = compress_24(w)
    assert values.shape == (2, 10) and metadata.shape == (2, 2)
    assert metadata.dtype == torch.int16
    assert values[0].tolist() == [5, 7, 1, 0, 0, 0, 2, 3, 0, 9]
    # row 0, chunk 0: groups (1,3) (0,1) (0,1) (2,3) -> nibbles 13, 4, 4, 14
    word = 13 | 4 << 4 | 4 << 8 | 14 << 12
    assert metadata[0, 0].item() == word - 65536  # the same 16 bits, read as int16
    # chunk 1 holds only group 4: (0, 2) -> nibble 8; the nibbles past K are 0
    assert metadata[0, 1].item() == 8
    # row 1: (0,2) (0,1) (0,3) (0,1) | (0,1): a lone nonzero at 3 keeps index 0 as zero
    assert metadata[1, 0].item() == 8 | 4 << 4 | 12 << 8 | 4 << 12
    assert metadata[1, 1].item() == 4
    assert values[1].tolist() == [6, 8, 0, 0, 0, 4, 0, 1, 1, 1]
    assert torch.equal(decompress_24(values, metadata), w)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 4), (3, 16), (96, 200), (17, 1028), (64, 4096)])
def test_round_trip_exact(dtype, shape):
    w = _random(shape, dtype)
    mask = prune(w.float())
    values, metadata = compress_24(w, mask)
    assert values.dtype == dtype and values.shape == (shape[0], shape[1] // 2)
    assert metadata.shape == (shape[0], -(-shape[1] // 16))
    expect = torch.where(mask, w, torch.zeros((), dtype=dtype))
    assert torch.equal(decompress_24(values, metadata), expect)
    assert torch.equal(decompress_24(values, metadata, shape[1]), expect)
    assert torch.equal(decompress_24_unchecked(values, metadata), expect)
    # compressing the pruned weight again (no mask) gives the same bytes
    v2, m2 = compress_24(expect, mask)
    assert torch.equal(v2, values) and torch.equal(m2, metadata)


def test_compress_without_mask_keeps_nonzeros_and_handles_sparse_groups():
    w = torch.zeros(3, 8)
    w[0, 3] = 1.0  # one nonzero at the last position: indices (0, 3)
    w[1, 1], w[1, 2] = 2.0, -3.0
    values, metadata = compress_24(w)
    idx = [(metadata[r, 0].item() & 0xF) for r in range(3)]
    assert idx == [0 | 3 << 2, 1 | 2 << 2, 0 | 1 << 2]
    assert torch.equal(decompress_24(values, metadata), w)


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_round_trip(density, dtype):
    w = torch.randn(96, 160).to(dtype)
    mask = prune(w.float(), "block", block_size=(16, 32), density=density)
    for m in (mask, mask[::16, ::32]):  # per element or per tile
        bsw = to_block_sparse(w, m, (16, 32))
        assert isinstance(bsw, BlockSparseWeight)
        assert bsw.shape == (96, 160) and bsw.block_size == (16, 32)
        assert bsw.crow_indices.dtype == torch.int32 and bsw.col_indices.dtype == torch.int32
        assert bsw.blocks.shape == (bsw.col_indices.numel(), 16, 32) and bsw.blocks.dtype == dtype
        assert bsw.density == int(mask[::16, ::32].sum()) / 30
        dense = torch.where(mask, w, torch.zeros((), dtype=dtype))
        assert torch.equal(from_block_sparse(bsw), dense)
        assert torch.equal(bsw.to_dense(), dense)
        assert check_block_sparse(bsw) == (96, 160)


def test_block_layout_by_hand_with_empty_row():
    w = torch.arange(6 * 8, dtype=torch.float32).view(6, 8)
    tiles = torch.tensor([[False, True, True, False], [False] * 4, [True, False, False, True]])
    bsw = to_block_sparse(w, tiles, (2, 2))
    assert bsw.crow_indices.tolist() == [0, 2, 2, 4]
    assert bsw.col_indices.tolist() == [1, 2, 0, 3]
    assert torch.equal(bsw.blocks[0], w[0:2, 2:4]) and torch.equal(bsw.blocks[3], w[4:6, 6:8])
    assert (from_block_sparse(bsw)[2:4] == 0).all()


def test_nothing_kept():
    bsw = to_block_sparse(torch.randn(4, 4), torch.zeros(2, 2, dtype=torch.bool), (2, 2))
    assert bsw.blocks.shape == (0, 2, 2) and bsw.crow_indices.tolist() == [0, 0, 0]
    assert (from_block_sparse(bsw) == 0).all()


# --- bad input --------------------------------------------------------------------------


def test_bad_24_input():
    with pytest.raises(ValueError, match="K = 6 .*multiple of 4"):
        compress_24(torch.randn(2, 6))
    with pytest.raises(ValueError, match="more than 2 nonzeros"):
        compress_24(torch.randn(2, 8))
    with pytest.raises(ValueError, match="mask keeps more than 2"):
        compress_24(torch.randn(2, 8), torch.ones(2, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask has shape \(2, 4\) but w has \(2, 8\)"):
        compress_24(torch.randn(2, 8), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        compress_24(torch.randn(2, 8), torch.ones(2, 8))
    values, metadata = compress_24(torch.zeros(4, 40))
    with pytest.raises(
        ValueError, match=r"metadata has shape \(4, 2\).*needs metadata of shape \(4, 3\)"
    ):
        decompress_24(values, metadata[:, :2])
    with pytest.raises(ValueError, match=r"metadata has shape \(3, 3\)"):
        decompress_24(values, metadata[:3])
    with pytest.raises(TypeError, match="metadata has dtype torch.int32"):
        decompress_24(values, metadata.int())
    with pytest.raises(ValueError, match=r"values has shape \(4, 20\); for K = 48"):
        decompress_24(values, metadata, 48)
    with pytest.raises(ValueError, match="K = 38"):
        decompress_24(values[:, :19], metadata)
    bad = metadata.clone()
    bad[0, 0] = 0  # (0, 0): not two distinct ascending indices
    with pytest.raises(ValueError, match="ascending"):
        decompress_24(values, bad)


def test_bad_block_input():
    w = torch.randn(32, 48)
    with pytest.raises(ValueError, match=r"\(32, 48\) is not divisible by block_size \(32, 32\)"):
        to_block_sparse(w, torch.ones(32, 48, dtype=torch.bool), (32, 32))
    with pytest.raises(ValueError, match="not constant on each"):
        to_block_sparse(w, torch.eye(32, 48, dtype=torch.bool), (16, 16))
    with pytest.raises(ValueError, match=r"mask has shape \(3, 3\)"):
        to_block_sparse(w, torch.ones(3, 3, dtype=torch.bool), (16, 16))
    bsw = to_block_sparse(w, torch.ones(2, 3, dtype=torch.bool), (16, 16))
    with pytest.raises(ValueError, match=r"col_indices must lie in \[0, 3\)"):
        check_block_sparse(bsw._replace(col_indices=bsw.col_indices + 1))
    with pytest.raises(ValueError, match="crow_indices must rise from 0 to nnz = 6"):
        check_block_sparse(bsw._replace(crow_indices=torch.tensor([0, 4, 5], dtype=torch.int32)))
    with pytest.raises(ValueError, match="ascend within each block-row"):
        check_block_sparse(bsw._replace(col_indices=bsw.col_indices.flip(0)))
    with pytest.raises(ValueError, match=r"blocks has shape \(6, 16, 8\)"):
        check_block_sparse(bsw._replace(blocks=bsw.blocks[..., :8]))
    with pytest.raises(TypeError, match="col_indices must be a 1-D int32"):
        check_block_sparse(bsw._replace(col_indices=bsw.col_indices.long()))
