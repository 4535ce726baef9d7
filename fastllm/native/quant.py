"""CUDA launcher of quantize_per_token (kernel: csrc/quant/quantize_per_token.cu)."""

from __future__ import annotations

import torch

from fastllm import native


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K] CUDA, fp32/fp16/bf16, any strides -> (int8 [M, K], float32 [M]). The kernel
    reads rows at x.stride(0) and elements at unit stride: other layouts are copied."""
    if not x.is_cuda or x.dim() != 2:
        raise ValueError(f"x must be a 2-D CUDA tensor, got shape {tuple(x.shape)} on {x.device}")
    rows, cols = x.shape
    if cols > 1 and x.stride(1) != 1:  # a dimension of size 1 has no stride to honour
        x = x.contiguous()
    q = torch.empty((rows, cols), dtype=torch.int8, device=x.device)
    scale = torch.empty((rows,), dtype=torch.float32, device=x.device)
    if rows == 0 or cols == 0:
        scale.fill_(1.0)
        return q, scale
    with torch.cuda.device(x.device):
        native.module().quantize_per_token(
            x.data_ptr(),
            native.dtype_code(x),
            rows,
            cols,
            x.stride(0),
            q.data_ptr(),
            scale.data_ptr(),
            native.stream_of(x),
        )
    return q, scale
