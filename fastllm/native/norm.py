"""Launcher of the C++ CPU norm kernel (backend "cpu" of fastllm.ops.rms_norm and
layer_norm; kernel: csrc/norm/norm_cpu.cpp). The op layer has validated the tensors; x
and residual come as [M, K] with a unit stride on K, weight, bias and smooth contiguous."""

from __future__ import annotations

import torch

from fastllm import native


def available_reason() -> str | None:
    """None when fastllm._C is loaded and has the norm kernel (an older build may not)."""
    err = native.load_error()
    if err is not None:
        return f"fastllm._C is not available ({err})"
    if not hasattr(native.module(), "norm_cpu"):
        return "this build of fastllm._C has no norm_cpu kernel (rebuild it)"
    return None


def norm(x, weight, bias, residual, smooth, eps, *, rms, quantize):
    """Returns (y or None, x_int8 or None, scale or None, new residual or None), as
    triton_kernels.norm.norm does."""
    M, K = x.shape
    y = None if quantize else torch.empty((M, K), dtype=x.dtype)
    q = torch.empty((M, K), dtype=torch.int8) if quantize else None
    scale = torch.empty((M,), dtype=torch.float32) if quantize else None
    r_out = None if residual is None else torch.empty((M, K), dtype=x.dtype)
    if M == 0:
        return y, q, scale, r_out

    def ptr(t):
        return 0 if t is None else t.data_ptr()

    native.module().norm_cpu(
        x.data_ptr(),
        native.dtype_code(x),
        M,
        K,
        x.stride(0),
        ptr(residual),
        0 if residual is None else residual.stride(0),
        weight.data_ptr(),
        ptr(bias),
        float(eps),
        int(rms),
        int(quantize),
        ptr(smooth),
        ptr(y),
        ptr(q),
        ptr(scale),
        ptr(r_out),
        torch.get_num_threads(),
    )
    return y, q, scale, r_out
