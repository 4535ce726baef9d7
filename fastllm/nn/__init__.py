"""Drop-in modules built on the fastllm ops (constructors: from_linear / from_module)."""

from fastllm.nn.attention import FusedMultiheadAttention
from fastllm.nn.fused import (
    FusedDenseAct,
    FusedDenseResidualNorm,
    FusedGatedMLP,
    FusedMLP,
    FusedRMSNorm,
)
from fastllm.nn.int8 import Int8Linear
from fastllm.nn.sparse import BlockSparseLinear, Sparse24Linear

__all__: list[str] = [
    "BlockSparseLinear",
    "FusedDenseAct",
    "FusedDenseResidualNorm",
    "FusedGatedMLP",
    "FusedMLP",
    "FusedMultiheadAttention",
    "FusedRMSNorm",
    "Int8Linear",
    "Sparse24Linear",
]
