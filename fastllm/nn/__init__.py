"""Drop-in modules built on the fastllm ops (constructors: from_linear / from_module)."""

from fastllm.nn.attention import FusedMultiheadAttention
from fastllm.nn.int8 import Int8Linear
from fastllm.nn.sparse import BlockSparseLinear, Sparse24Linear

__all__: list[str] = [
    "BlockSparseLinear",
    "FusedMultiheadAttention",
    "Int8Linear",
    "Sparse24Linear",
]
