"""Reference for rope_kv_append: rotary position embedding applied to q and the new keys,
and the new keys (rotated) and values written to a KV cache, what every decode step of a
Llama-style model does before attention (fastllm.ops.rope_kv_append).

What it computes, for x = q or k_new (..., H, D), cos and sin (..., R) with R even, R <= D:

    x_rot = x[..., :R] * cos + rotate_half(x[..., :R]) * sin     (cos, sin broadcast over H)
    out   = cat(x_rot.to(x.dtype), x[..., R:])
    rotate_half(y) = cat(-y[..., R/2:], y[..., :R/2])           (the half-split layout)

which is transformers' `apply_rotary_pos_emb` (Llama, Mistral, Qwen, ...; the partial form
of GPT-NeoX and Phi when R < D), in PyTorch's arithmetic: computed in the dtype of
x * cos, so with cos/sin in x's dtype (what LlamaRotaryEmbedding returns) each product and
the sum are rounded to that dtype as the model rounds them; with float32 cos/sin they are
computed in float32 and rounded to x's dtype once. Then kv_cache_append(k_rot, v_new, ...).
"""

from __future__ import annotations

import torch

from fastllm.reference.attention import kv_cache_append


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """transformers' rotate_half: (x1, x2) -> (-x2, x1) over the halves of the last dim."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., H, D) rotated over its first R = cos.shape[-1] dims; cos, sin (..., R)
    broadcast over the heads. Returns a new tensor of x's dtype and shape."""
    R = cos.shape[-1]
    c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)
    xr = x[..., :R]
    rot = (xr * c + rotate_half(xr) * s).to(x.dtype)
    return rot if R == x.shape[-1] else torch.cat((rot, x[..., R:]), dim=-1)


def rope_kv_append(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    positions: torch.Tensor,
    *,
    block_table: torch.Tensor | None = None,
) -> torch.Tensor:
    """Returns q rotated; writes k_new rotated and v_new into the caches in place.

    q (B, n, Hq, D), k_new/v_new (B, n, Hkv, D), cos/sin (B, n, R) or (1, n, R), positions
    (B,) start positions; or the slot form: q (T, Hq, D), k_new/v_new (T, Hkv, D), cos/sin
    (T, R), slot mapping (T,). Cache forms and target rules as reference.kv_cache_append.
    """
    q_rot = apply_rotary(q, cos, sin)
    k_rot = apply_rotary(k_new, cos, sin)
    kv_cache_append(k_rot, v_new, k_cache, v_cache, positions, block_table=block_table)
    return q_rot
