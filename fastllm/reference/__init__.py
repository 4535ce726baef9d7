"""Pure-PyTorch versions of every fastllm op: the CPU fallback's oracle and the
tests' ground truth. Written for clarity, not speed; usable in float64."""

from fastllm.reference.quant import quantize_per_token

__all__ = ["quantize_per_token"]
