"""The ops of fastllm: validate input, pick a backend per call, run it.

Each op is also a `torch.library` custom op in the `fastllm` namespace
(`torch.ops.fastllm.<name>`) with a fake implementation for torch.compile.
"""

from fastllm.ops.attention import attention, decode_attention, kv_cache_append
from fastllm.ops.int8 import (
    int8_dynamic_gated_linear,
    int8_dynamic_linear,
    int8_linear,
    int8_weight_only_linear,
)
from fastllm.ops.norm import layer_norm, rms_norm
from fastllm.ops.quant import quantize_per_channel, quantize_per_token
from fastllm.ops.rope import rope_kv_append
from fastllm.ops.sparse import block_sparse_linear, sparse24_linear

__all__ = [
    "attention",
    "block_sparse_linear",
    "decode_attention",
    "int8_dynamic_gated_linear",
    "int8_dynamic_linear",
    "int8_linear",
    "int8_weight_only_linear",
    "kv_cache_append",
    "layer_norm",
    "quantize_per_channel",
    "quantize_per_token",
    "rms_norm",
    "rope_kv_append",
    "sparse24_linear",
]
