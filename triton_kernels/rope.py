"""Rotary embedding of q and the new keys, and the KV-cache append, in one kernel
(fastllm.ops.rope_kv_append).

    y[d] = x[d] * cos[d] + r[d] * sin[d]        d < R, r = rotate_half(x[:R]):
                                                r[d] = -x[d + R/2] (d < R/2), x[d - R/2] (d >= R/2)
    y[d] = x[d]                                 R <= d < D (partial rotary: passed through)

ROUND (cos/sin of x's 16-bit dtype T, as transformers computes): each product and the
sum rounded to T, as the unfused PyTorch ops round them; otherwise (float32 cos/sin)
computed in float32 and rounded to T once. No FMA contraction (enable_fp_fusion=False),
so float32 results equal PyTorch's mul-then-add bit for bit.

One program per (token, head) over Hq + Hkv heads: a q head writes its rotated row to
q_out; a kv head writes its rotated key and its value to the cache row the position (or
slot) selects, the rules of _kv_append_kernel (triton_kernels/attention.py): a target
outside the cache or the block table, or a bad block id, is skipped.
Reference: fastllm/reference/rope.py.
"""

import torch
import triton
import triton.language as tl

from fastllm.triton_kernels.attention import _append_target

MAX_HEAD_DIM = 4096


@triton.jit
def _rotate(x_ptr, c, s, offs, d_ok, rot_dim, half, ROUND: tl.constexpr):
    x = tl.load(x_ptr + offs, mask=d_ok, other=0.0)
    in_rot = offs < rot_dim
    first = offs < half
    partner = tl.where(first, offs + half, offs - half)
    p = tl.load(x_ptr + partner, mask=d_ok & in_rot, other=0.0).to(tl.float32)
    p = tl.where(first, -p, p)
    a = x.to(tl.float32) * c
    b = p * s
    if ROUND:
        a = a.to(x.dtype).to(tl.float32)
        b = b.to(x.dtype).to(tl.float32)
    return tl.where(in_rot, (a + b).to(x.dtype), x)


@triton.jit
def _rope_kv_append_kernel(
    # pointers
    q_ptr, kn_ptr, vn_ptr, cos_ptr, sin_ptr, qo_ptr, kc_ptr, vc_ptr, pos_ptr, bt_ptr,
    # sizes
    n_new, n_q_heads, head_dim, rot_dim, capacity, num_blocks, page_size,
    # strides
    stride_qb, stride_qt, stride_qh,
    stride_knb, stride_knt, stride_knh,
    stride_vnb, stride_vnt, stride_vnh,
    stride_cb, stride_ct, stride_sb, stride_st,
    stride_kcb, stride_kcs, stride_kch,
    stride_vcb, stride_vcs, stride_vch,
    stride_btb,
    # meta-parameters
    BLOCK_D: tl.constexpr, ROUND: tl.constexpr, SLOTS: tl.constexpr, PAGED: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    b = token // n_new
    t = token % n_new
    offs = tl.arange(0, BLOCK_D)
    d_ok = offs < head_dim
    half = rot_dim // 2
    c_ok = offs < rot_dim
    c = tl.load(cos_ptr + b * stride_cb + t * stride_ct + offs, mask=c_ok, other=0.0)
    s = tl.load(sin_ptr + b * stride_sb + t * stride_st + offs, mask=c_ok, other=0.0)
    c = c.to(tl.float32)
    s = s.to(tl.float32)
    if h < n_q_heads:
        y = _rotate(q_ptr + b * stride_qb + t * stride_qt + h * stride_qh, c, s, offs, d_ok,
                    rot_dim, half, ROUND)
        tl.store(qo_ptr + (token * n_q_heads + h) * head_dim + offs, y, mask=d_ok)
    else:
        h = h - n_q_heads
        kv_b, kv_s, ok = _append_target(
            pos_ptr, bt_ptr, token, b, t, capacity, num_blocks, page_size, stride_btb, SLOTS, PAGED
        )
        m = d_ok & (tl.zeros((BLOCK_D,), dtype=tl.int32) + ok.to(tl.int32) != 0)
        k = _rotate(kn_ptr + b * stride_knb + t * stride_knt + h * stride_knh, c, s, offs, m,
                    rot_dim, half, ROUND)
        v = tl.load(vn_ptr + b * stride_vnb + t * stride_vnt + h * stride_vnh + offs, mask=m)
        tl.store(kc_ptr + kv_b * stride_kcb + kv_s * stride_kcs + h * stride_kch + offs, k, mask=m)
        tl.store(vc_ptr + kv_b * stride_vcb + kv_s * stride_vcs + h * stride_vch + offs, v, mask=m)


def rope_kv_append(q, k_new, v_new, cos, sin, k_cache, v_cache, positions, block_table):
    """q (B, n, Hq, D) / k_new, v_new (B, n, Hkv, D) with cos/sin (B or 1, n, R) and start
    positions (B,); or q (T, Hq, D), k_new/v_new (T, Hkv, D), cos/sin (T, R), slots (T,).
    Unit stride on the last dim of every tensor. Returns q rotated, contiguous; writes the
    caches in place (see fastllm.ops.rope_kv_append)."""
    slots = k_new.dim() == 3
    paged = block_table is not None
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if slots:  # one sequence of T tokens
        q, k_new, v_new, cos, sin = q[None], k_new[None], v_new[None], cos[None], sin[None]
    batch, n_new, hq, head_dim = q.shape
    hkv = k_new.shape[2]
    if batch * n_new == 0:
        return q_out
    if slots or paged:
        page_size, num_blocks = k_cache.shape[1], k_cache.shape[0]
        capacity = block_table.shape[1] * page_size if paged else num_blocks * page_size
    else:
        page_size, num_blocks, capacity = 1, 1, k_cache.shape[1]
    _rope_kv_append_kernel[(batch * n_new, hq + hkv)](
        q, k_new, v_new, cos, sin, q_out, k_cache, v_cache, positions,
        block_table if paged else positions,
        n_new, hq, head_dim, cos.shape[-1], capacity, num_blocks, page_size,
        q.stride(0), q.stride(1), q.stride(2),
        k_new.stride(0), k_new.stride(1), k_new.stride(2),
        v_new.stride(0), v_new.stride(1), v_new.stride(2),
        cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1),
        sin.stride(0) if sin.shape[0] > 1 else 0, sin.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_table.stride(0) if paged else 0,
        BLOCK_D=triton.next_power_of_2(head_dim), ROUND=cos.dtype != torch.float32,
        SLOTS=slots, PAGED=paged,
        num_warps=1 if head_dim <= 64 else 2, enable_fp_fusion=False,
    )
    return q_out
