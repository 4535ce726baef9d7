"""Pure-PyTorch versions of every fastllm op: the CPU fallback's oracle and the
tests' ground truth. Written for clarity, not speed; usable in float64."""

from fastllm.reference.attention import attention, decode_attention, kv_cache_append
from fastllm.reference.int8 import (
    int8_dynamic_linear,
    int8_linear,
    int8_matmul_int32,
    int8_weight_only_linear,
)
from fastllm.reference.norm import layer_norm, rms_norm
from fastllm.reference.quant import quantize_per_channel, quantize_per_token
from fastllm.reference.rope import rope_kv_append
from fastllm.reference.sparse import block_sparse_linear, sparse24_linear

__all__ = [
    "attention",
    "block_sparse_linear",
    "decode_attention",
    "int8_dynamic_linear",
    "int8_linear",
    "int8_matmul_int32",
    "int8_weight_only_linear",
    "kv_cache_append",
    "layer_norm",
    "quantize_per_channel",
    "quantize_per_token",
    "rms_norm",
    "rope_kv_append",
    "sparse24_linear",
]
