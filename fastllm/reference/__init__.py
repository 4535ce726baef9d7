"""Pure-PyTorch versions of every fastllm op: the CPU fallback's oracle and the
tests' ground truth. Written for clarity, not speed; usable in float64."""

from fastllm.reference.attention import attention, decode_attention, kv_cache_append
from fastllm.reference.quant import quantize_per_token
from fastllm.reference.sparse import block_sparse_linear, sparse24_linear

__all__ = [
    "attention",
    "block_sparse_linear",
    "decode_attention",
    "kv_cache_append",
    "quantize_per_token",
    "sparse24_linear",
]
