"""Launcher of the C++ CPU rope_kv_append kernel (backend "cpu" of
fastllm.ops.rope_kv_append; kernel: csrc/rope/rope_cpu.cpp). The op layer has validated
the tensors: a unit stride on the last dim of each, positions contiguous int32/int64,
block_table contiguous int32 or None."""

from __future__ import annotations

import torch

from fastllm import native


def available_reason() -> str | None:
    """None when fastllm._C is loaded and has the rope kernel (an older build may not)."""
    err = native.load_error()
    if err is not None:
        return f"fastllm._C is not available ({err})"
    if not hasattr(native.module(), "rope_kv_append_cpu"):
        return "this build of fastllm._C has no rope_kv_append_cpu kernel (rebuild it)"
    return None


def rope_kv_append(q, k_new, v_new, cos, sin, k_cache, v_cache, positions, block_table):
    """Returns q rotated (contiguous) and writes the caches, as
    triton_kernels.rope.rope_kv_append does."""
    q_out = torch.empty(q.shape, dtype=q.dtype)
    slots = k_new.dim() == 3
    if slots:  # T sequences of one token each
        q, k_new, v_new = q[:, None], k_new[:, None], v_new[:, None]
        cos, sin = cos[:, None], sin[:, None]
    batch, n_new, hq, head_dim = q.shape
    if batch * n_new == 0:
        return q_out
    paged = block_table is not None
    num_blocks, page_size = k_cache.shape[:2]
    if slots or paged:
        capacity = block_table.shape[1] * page_size if paged else num_blocks * page_size
    else:
        capacity = page_size
    ptrs = [t.data_ptr() for t in (q, k_new, v_new, cos, sin, q_out, k_cache, v_cache, positions)]
    ptrs.append(block_table.data_ptr() if paged else 0)
    ints = [native.dtype_code(q), native.dtype_code(cos)]
    ints += [batch, n_new, hq, k_new.shape[2], head_dim, cos.shape[-1]]
    ints += [*q.stride()[:3], *k_new.stride()[:3], *v_new.stride()[:3]]
    ints += [cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1)]
    ints += [sin.stride(0) if sin.shape[0] > 1 else 0, sin.stride(1)]
    ints += [*k_cache.stride()[:3], *v_cache.stride()[:3]]
    ints += [int(positions.dtype == torch.int64), int(slots)]
    ints += [num_blocks, page_size, capacity, block_table.stride(0) if paged else 0]
    native.module().rope_kv_append_cpu(ptrs, ints, torch.get_num_threads())
    return q_out
