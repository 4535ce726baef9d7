"""Sparse pruned layers: pruning masks (2:4, block; magnitude, Wanda), calibration of
activation norms, and the compressed formats the sparse kernels consume.

    mask = fastllm.sparse.prune(w, "2:4", "wanda", act_norm=norms["layers.0.mlp.up"])
    values, metadata = fastllm.sparse.compress_24(w, mask)
    bsw = fastllm.sparse.to_block_sparse(w, fastllm.sparse.prune(w, "block", density=0.3))

Kernels: fastllm.ops.sparse24_linear, fastllm.ops.block_sparse_linear; modules:
fastllm.nn.Sparse24Linear, fastllm.nn.BlockSparseLinear.
"""

from fastllm.sparse.format import (
    BlockSparseWeight,
    compress_24,
    decompress_24,
    from_block_sparse,
    to_block_sparse,
)
from fastllm.sparse.prune import METHODS, PATTERNS, calibrate, prune

__all__ = [
    "METHODS",
    "PATTERNS",
    "BlockSparseWeight",
    "calibrate",
    "compress_24",
    "decompress_24",
    "from_block_sparse",
    "prune",
    "to_block_sparse",
]
