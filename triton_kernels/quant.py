"""Symmetric per-row int8 quantization in Triton (fastllm.ops.quantize_per_token).

    scale[r] = max_j |x[r, j]| / 127          (float32; 1.0 where that is 0)
    q[r, j]  = clamp(rint(x[r, j] / scale[r]), -127, 127)

One program per row: a max over the row in BLOCK_K chunks, then a second pass
that quantizes. Divisions are IEEE round-to-nearest (div_rn) so that the result
is bit-identical to the reference and the CUDA kernel.
Reference: fastllm/reference/quant.py.
"""

import torch
import triton
import triton.language as tl

from fastllm.triton_kernels._compat import rint


@triton.jit
def _quantize_per_token_kernel(
    # pointers
    x_ptr, q_ptr, scale_ptr,
    # sizes
    K,
    # strides
    stride_xm, stride_qm,
    # meta-parameters
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm
    offs = tl.arange(0, BLOCK_K)

    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    s = tl.math.div_rn(tl.max(amax, axis=0), 127.0)
    s = tl.where(s > 0.0, s, 1.0)  # all-zero row (or an amax so small the scale underflows)
    tl.store(scale_ptr + row, s)

    for k0 in range(0, K, BLOCK_K):
        mask = k0 + offs < K
        x = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(rint(tl.math.div_rn(x, s)), -127.0), 127.0)
        tl.store(q_row + k0 + offs, q.to(tl.int8), mask=mask)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K] fp32/fp16/bf16 with stride(-1) == 1 -> (int8 [M, K], float32 [M])."""
    M, K = x.shape
    q = torch.empty((M, K), dtype=torch.int8, device=x.device)
    scale = torch.empty((M,), dtype=torch.float32, device=x.device)
    if M == 0:
        return q, scale
    BLOCK_K = min(triton.next_power_of_2(max(K, 16)), 4096)
    num_warps = 4 if BLOCK_K <= 2048 else 8
    _quantize_per_token_kernel[(M,)](
        x, q, scale,
        K,
        x.stride(0), q.stride(0),
        BLOCK_K=BLOCK_K, num_warps=num_warps,
    )
    return q, scale
