"""The ops of fastllm: validate input, pick a backend per call, run it.

Each op is also a `torch.library` custom op in the `fastllm` namespace
(`torch.ops.fastllm.<name>`) with a fake implementation for torch.compile.
"""

from fastllm.ops.quant import quantize_per_token

__all__ = ["quantize_per_token"]
