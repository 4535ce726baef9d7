"""Fused attention in Triton: prefill (FlashAttention-style), decode against a KV cache
(split-KV, contiguous or paged), and the KV-cache append (fastllm.ops.attention,
fastllm.ops.decode_attention, fastllm.ops.kv_cache_append).

    s[i, j] = softcap(q[i] · k[j] * scale)        softcap(x) = c * tanh(x / c), or x when c = 0
    out[i]  = sum_j softmax_j(mask(s))[i, j] v[j] lse[i] = log sum_j exp(mask(s)[i, j])

Masks follow fastllm/reference/attention.py: query i sits at key position
i + seqlen_k - seqlen_q (bottom-right alignment); window_left/right bound the keys it
sees on either side (-1 = unbounded; causal is window_right = 0). Rows that see no key
get out = 0 and lse = -inf.

Prefill: one program per (BLOCK_M queries, batch, q head). Keys stream through in
BLOCK_N tiles with an online softmax in base 2 (running max m, running sum l, rescaled
accumulator): the S x S score matrix never leaves registers. Only the key tiles that
the causal/window mask can reach are visited, and those wholly inside it for every
row of the block are processed without building a mask. Row blocks are launched
last-first, so the longest ones under a causal mask start first. With varlen the grid
covers max_seqlen_q rows per sequence.

Decode: one program per (KV split, batch, kv head x row block). The rows of a program
are the q_len x (Hq / Hkv) query rows that share one kv head, so each key and value is
read from memory once per split. Each split writes its normalized partial output and
its lse; a second kernel merges the splits with weights exp(lse_s - max lse). With
one split the first kernel writes the output directly.

Head dims: any multiple of 8 from 16 to 256, the head-dim tile padded to a power of
two with masked loads. Dtypes fp16/bf16 (fp32 accumulation). Under the interpreter the
dot operands are upcast to fp32 (UPCAST), as its bf16 dot is wrong.

Memory safety without host synchronisation: sequence lengths read from device memory
(cu_seqlens, cache_seqlens) are clamped to the sizes of the tensors, and block ids
outside [0, num_blocks) are masked out (those keys are skipped), so bad values give
wrong numbers in their rows, never an out-of-bounds access. Varlen rows that no sequence
covers are left as the launcher allocated them: 0, lse -inf. Index tensors arrive
contiguous int32 (fastllm.ops makes them so).

Non-finite values: tiles that carry a mask multiply the values by p = 0 for the keys a
row does not see, and 0 * inf = NaN; `_masked_pv` keeps such keys out of every row that
does not see them (the extra work runs only for a tile holding an inf/NaN value).
"""

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _softcap(s, softcap):
    # tanh from exp (libdevice.tanh is not available in the interpreter); exact limits ±1
    # for large |s|: exp overflows to inf and 2 / inf = 0
    return softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))


@triton.jit
def _scores(q, k, scale, qk_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """q k^T in log2 units: scaled (and softcapped) scores times log2(e)."""
    s = tl.dot(q, k)
    if HAS_SOFTCAP:
        return _softcap(s * scale, softcap) * 1.4426950408889634
    return s * qk_scale


@triton.jit
def _keep(k_ok, kpos, qpos, window_left, window_right):
    """Whether key kpos exists and lies in query qpos's window (attention.h's rule)."""
    return (
        k_ok[None, :]
        & ((window_right < 0) | (kpos[None, :] <= qpos[:, None] + window_right))
        & ((window_left < 0) | (kpos[None, :] >= qpos[:, None] - window_left))
    )


@triton.jit
def _masked_pv(p, v, keep):
    """p @ v over the keys each row keeps, for a tile with a mask. In a plain dot a masked
    key (p = 0) whose value is inf or NaN gives 0 * inf = NaN and poisons the row; here
    non-finite values are left out of the dot and, only for the keys a row keeps, added
    back by IEEE rules (p * inf = inf for p > 0, 0 * inf = NaN, inf - inf = NaN). The extra
    dots run only for a tile that holds a non-finite value."""
    finite = (v == v) & (tl.abs(v) < float("inf"))
    pv = tl.dot(p.to(v.dtype), tl.where(finite, v, 0.0))
    if tl.sum(tl.sum((~finite).to(tl.int32), 1), 0) > 0:
        kept = keep.to(v.dtype)
        positive = (keep & (p > 0)).to(v.dtype)
        nan = tl.dot(kept, (v != v).to(v.dtype))
        nan += tl.dot(kept - positive, (tl.abs(v) == float("inf")).to(v.dtype))
        pv = tl.where(nan > 0, float("nan"), pv)
        pv = tl.where(tl.dot(positive, (v == float("inf")).to(v.dtype)) > 0, pv + float("inf"), pv)
        pv = tl.where(tl.dot(positive, (v == float("-inf")).to(v.dtype)) > 0, pv - float("inf"), pv)
    return pv


@triton.jit
def _attn_tiles(
    acc, l_i, m_i, q, k_base, v_base, qpos, start, end,
    sk, stride_ks, stride_vs, head_dim, scale, softcap, window_left, window_right,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, EVEN_D: tl.constexpr,
):
    """Online softmax over the key tiles [start, end) (start a multiple of BLOCK_N).
    MASKED=False: every key of every tile is visible to every row (no mask built)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    qk_scale = scale * 1.4426950408889634
    for start_n in range(start, end, BLOCK_N):
        kpos = start_n + offs_n
        # masks only where needed: a mask along head_dim would stop vectorized loads
        k_ptrs = k_base + kpos[None, :] * stride_ks + offs_d[:, None]
        v_ptrs = v_base + kpos[:, None] * stride_vs + offs_d[None, :]
        k_ok = kpos < sk
        if MASKED:
            if EVEN_D:
                k = tl.load(k_ptrs, mask=k_ok[None, :], other=0.0)
                v = tl.load(v_ptrs, mask=k_ok[:, None], other=0.0)
            else:
                k = tl.load(k_ptrs, mask=k_ok[None, :] & d_ok[:, None], other=0.0)
                v = tl.load(v_ptrs, mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        else:
            if EVEN_D:
                k = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
            else:
                k = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
                v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = _scores(q, k, scale, qk_scale, softcap, HAS_SOFTCAP)
        if MASKED:
            keep = _keep(k_ok, kpos, qpos, window_left, window_right)
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            acc = acc * alpha[:, None] + _masked_pv(p, v, keep)
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, cu_q_ptr, cu_k_ptr,
    # sizes
    seqlen_q, seqlen_k, total_q, total_k, head_dim, group,
    # parameters
    scale, softcap, window_left, window_right,
    # strides
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    VARLEN: tl.constexpr, HAS_SOFTCAP: tl.constexpr, RETURN_LSE: tl.constexpr,
    UPCAST: tl.constexpr, EVEN_D: tl.constexpr,
):
    # the last row blocks (the longest under a causal mask) start first
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2).to(tl.int64)
    kvh = h // group

    if VARLEN:
        # clamp so that a bad cu_seqlens cannot move a pointer outside the tensors
        q_start = tl.minimum(tl.maximum(tl.load(cu_q_ptr + b).to(tl.int64), 0), total_q)
        q_end = tl.minimum(tl.maximum(tl.load(cu_q_ptr + b + 1).to(tl.int64), q_start), total_q)
        k_start = tl.minimum(tl.maximum(tl.load(cu_k_ptr + b).to(tl.int64), 0), total_k)
        k_end = tl.minimum(tl.maximum(tl.load(cu_k_ptr + b + 1).to(tl.int64), k_start), total_k)
        sq = q_end - q_start
        sk = k_end - k_start
    else:
        q_start = b * 0
        k_start = b * 0
        sq = seqlen_q + b * 0  # int64 like the varlen branch
        sk = seqlen_k + b * 0

    m_start = pid_m * BLOCK_M
    if m_start >= sq:
        return

    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    row_ok = offs_m < sq
    if EVEN_D:  # no mask along head_dim: vectorized loads and stores
        qo_mask = row_ok[:, None]
    else:
        qo_mask = row_ok[:, None] & d_ok[None, :]

    q_base = q_ptr + b * stride_qb + q_start * stride_qs + h * stride_qh
    k_base = k_ptr + b * stride_kb + k_start * stride_ks + kvh * stride_kh
    v_base = v_ptr + b * stride_vb + k_start * stride_vs + kvh * stride_vh
    q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], mask=qo_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    # key range this row block can see
    diag = sk - sq  # key position of query row 0
    lo = b * 0
    hi = sk
    if window_right >= 0:
        hi = tl.minimum(hi, m_start + BLOCK_M - 1 + diag + window_right + 1)
    if window_left >= 0:
        lo = tl.maximum(lo, m_start + diag - window_left)
        lo = (lo // BLOCK_N) * BLOCK_N
    hi = tl.maximum(hi, lo)  # from here every bound is >= 0: `//` truncates toward zero
    qpos = offs_m + diag  # [BLOCK_M]

    # key tiles every row of the block sees whole need no mask: [mid_lo, mid_hi)
    full_hi = sk
    if window_right >= 0:
        full_hi = tl.minimum(full_hi, m_start + diag + window_right + 1)
    mid_lo = lo
    if window_left >= 0:
        mid_lo = tl.maximum(lo, tl.cdiv(m_start + BLOCK_M - 1 + diag - window_left, BLOCK_N) * BLOCK_N)
    mid_lo = tl.minimum(mid_lo, hi)  # a multiple of BLOCK_N, or hi
    mid_hi = tl.maximum(mid_lo, (tl.maximum(full_hi, 0) // BLOCK_N) * BLOCK_N)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    acc, l_i, m_i = _attn_tiles(
        acc, l_i, m_i, q, k_base, v_base, qpos, lo, mid_lo,
        sk, stride_ks, stride_vs, head_dim, scale, softcap, window_left, window_right,
        BLOCK_N, BLOCK_D, True, HAS_SOFTCAP, UPCAST, EVEN_D,
    )
    acc, l_i, m_i = _attn_tiles(
        acc, l_i, m_i, q, k_base, v_base, qpos, mid_lo, mid_hi,
        sk, stride_ks, stride_vs, head_dim, scale, softcap, window_left, window_right,
        BLOCK_N, BLOCK_D, False, HAS_SOFTCAP, UPCAST, EVEN_D,
    )
    acc, l_i, m_i = _attn_tiles(
        acc, l_i, m_i, q, k_base, v_base, qpos, mid_hi, hi,
        sk, stride_ks, stride_vs, head_dim, scale, softcap, window_left, window_right,
        BLOCK_N, BLOCK_D, True, HAS_SOFTCAP, UPCAST, EVEN_D,
    )

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_base = o_ptr + b * stride_ob + q_start * stride_os + h * stride_oh
    tl.store(
        o_base + offs_m[:, None] * stride_os + offs_d[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=qo_mask,
    )
    if RETURN_LSE:
        lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
        tl.store(lse_ptr + b * stride_lb + h * stride_lh + q_start + offs_m, lse, mask=row_ok)


def _prefill_blocks(head_dim: int, interpreted: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a head dim."""
    if interpreted:
        return 16, 16, 4, 1
    if head_dim <= 64:
        return 128, 64, 4, 3
    if head_dim <= 128:
        return 128, 64, 8, 3
    return 64, 32, 8, 2  # head_dim 256: a 64 x 256 fp32 accumulator over 8 warps


def attention(
    q, k, v, causal, scale, window_left, window_right, softcap,
    cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, return_lse,
    *, block_m=None, block_n=None,
):
    """q: (B, Sq, Hq, D) / k, v: (B, Sk, Hkv, D), or packed (T, H, D) with int32
    cu_seqlens; fp16/bf16, unit stride on D. Returns (out like q, float32 lse or None):
    lse (B, Hq, Sq), or (Hq, Tq) packed. Arguments normalized by fastllm.ops.attention
    (causal already folded into window_right = 0)."""
    from fastllm.backend import triton_interpreted

    varlen = cu_seqlens_q is not None
    head_dim = q.shape[-1]
    hq, hkv = q.shape[-2], k.shape[-2]
    if varlen:
        # packed rows that no sequence covers (cu_seqlens left unchecked) come back 0, -inf
        out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        batch = cu_seqlens_q.shape[0] - 1
        seqlen_q, seqlen_k = max_seqlen_q, max_seqlen_k
        lse = torch.full((hq, q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
        q4, k4, v4, o4 = q[None], k[None], v[None], out[None]
        stride_lb, stride_lh = 0, lse.stride(0)
    else:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        batch, seqlen_q, seqlen_k = q.shape[0], q.shape[1], k.shape[1]
        lse = torch.empty((batch, hq, seqlen_q), dtype=torch.float32, device=q.device)
        q4, k4, v4, o4 = q, k, v, out
        stride_lb, stride_lh = lse.stride(0), lse.stride(1)
    if causal:
        window_right = 0 if window_right < 0 else min(window_right, 0)
    if batch == 0 or seqlen_q == 0 or q.numel() == 0:
        if return_lse:
            lse.fill_(float("-inf"))
        return out, (lse if return_lse else None)
    interpreted = triton_interpreted()
    bm, bn, num_warps, num_stages = _prefill_blocks(head_dim, interpreted)
    bm, bn = block_m or bm, block_n or bn
    sb = (lambda t: 0) if varlen else (lambda t: t.stride(0))
    block_d = max(16, triton.next_power_of_2(head_dim))
    grid = (triton.cdiv(seqlen_q, bm), batch, hq)
    _attn_fwd_kernel[grid](
        q4, k4, v4, o4, lse,
        cu_seqlens_q if varlen else q, cu_seqlens_k if varlen else q,
        seqlen_q, seqlen_k, q.shape[0], k.shape[0], head_dim, hq // hkv,
        float(scale), float(softcap), int(window_left), int(window_right),
        sb(q4), q4.stride(1), q4.stride(2),
        sb(k4), k4.stride(1), k4.stride(2),
        sb(v4), v4.stride(1), v4.stride(2),
        sb(o4), o4.stride(1), o4.stride(2),
        stride_lb, stride_lh,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d,
        VARLEN=varlen, HAS_SOFTCAP=softcap > 0, RETURN_LSE=return_lse,
        UPCAST=interpreted, EVEN_D=head_dim == block_d,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out, (lse if return_lse else None)


# --- decode ------------------------------------------------------------------------------


@triton.jit
def _decode_split_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, seqlens_ptr, bt_ptr, o_ptr, lse_ptr,
    # sizes
    q_len, group, head_dim, capacity, num_blocks, page_size, split_size, row_blocks,
    # parameters
    scale, softcap, window_left, window_right,
    # strides
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_btb,
    stride_os, stride_ob, stride_ot, stride_oh,
    stride_ls, stride_lb, stride_lt,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGED: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
    STORE_LSE: tl.constexpr, EVEN_D: tl.constexpr,
):
    split = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    kvh = (tl.program_id(2) // row_blocks).to(tl.int64)
    row_block = tl.program_id(2) % row_blocks

    seqlen = tl.load(seqlens_ptr + b).to(tl.int64)
    seqlen = tl.minimum(tl.maximum(seqlen, 0), capacity)  # never read past the cache

    # rows: query token t of this sequence, q head kvh * group + g
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len * group
    t = rows // group
    hq = kvh * group + rows % group
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim

    if EVEN_D:  # no mask along head_dim: vectorized loads and stores
        qo_mask = row_ok[:, None]
    else:
        qo_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(
        q_ptr + b * stride_qb + t[:, None] * stride_qs + hq[:, None] * stride_qh + offs_d[None, :],
        mask=qo_mask,
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    qpos = seqlen - q_len + t  # key position of each row's own token

    lo = split.to(tl.int64) * split_size
    hi = tl.minimum(lo + split_size, seqlen)
    if window_left >= 0:
        lo = tl.maximum(lo, seqlen - q_len - window_left)
        lo = tl.maximum((lo // BLOCK_N) * BLOCK_N, split * split_size)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    qk_scale = scale * 1.4426950408889634

    for start_n in range(lo, hi, BLOCK_N):
        kpos = start_n + offs_n
        k_ok = kpos < hi
        if PAGED:
            blk = tl.load(bt_ptr + b * stride_btb + kpos // page_size, mask=k_ok, other=0).to(tl.int64)
            k_ok = k_ok & (blk >= 0) & (blk < num_blocks)
            kv_b = blk
            kv_s = kpos % page_size
        else:
            kv_b = b
            kv_s = kpos
        k_rows = kv_b * stride_kb + kv_s * stride_ks  # [BLOCK_N]
        v_rows = kv_b * stride_vb + kv_s * stride_vs
        k_ptrs = k_ptr + kvh * stride_kh + k_rows[None, :] + offs_d[:, None]
        v_ptrs = v_ptr + kvh * stride_vh + v_rows[:, None] + offs_d[None, :]
        if EVEN_D:
            k = tl.load(k_ptrs, mask=k_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=k_ok[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs, mask=k_ok[None, :] & d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = _scores(q, k, scale, qk_scale, softcap, HAS_SOFTCAP)
        keep = _keep(k_ok, kpos, qpos, window_left, window_right)
        s = tl.where(keep, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _masked_pv(p, v, keep)
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(
        o_ptr + split * stride_os + b * stride_ob + t[:, None] * stride_ot
        + hq[:, None] * stride_oh + offs_d[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=qo_mask,
    )
    if STORE_LSE:
        lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
        tl.store(lse_ptr + split * stride_ls + b * stride_lb + t * stride_lt + hq, lse, mask=row_ok)


@triton.jit
def _decode_merge_kernel(
    # pointers
    part_ptr, lse_ptr, o_ptr,
    # sizes
    num_splits, head_dim,
    # strides
    stride_ps, stride_pb, stride_pt, stride_ph,
    stride_ls, stride_lb, stride_lt,
    stride_ob, stride_ot, stride_oh,
    # meta-parameters
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_splits
    lse = tl.load(
        lse_ptr + offs_s * stride_ls + b * stride_lb + t * stride_lt + h, mask=s_ok,
        other=float("-inf"),
    )
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # no split saw a key: all weights 0
    w = tl.exp(lse - m)
    denom = tl.sum(w, 0)
    part = tl.load(
        part_ptr + offs_s[:, None] * stride_ps + b * stride_pb + t * stride_pt + h * stride_ph
        + offs_d[None, :],
        mask=s_ok[:, None] & (offs_d[None, :] < head_dim),
        other=0.0,
    )
    out = tl.sum(part * w[:, None], 0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(
        o_ptr + b * stride_ob + t * stride_ot + h * stride_oh + offs_d,
        out.to(o_ptr.dtype.element_ty),
        mask=offs_d < head_dim,
    )


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: few splits


def decode_num_splits(batch: int, hkv_programs: int, max_len: int, block_n: int, num_sms: int) -> int:
    """Number of KV splits from shapes only: enough programs for about two waves over the
    SMs, each split at least 256 keys (and a whole number of BLOCK_N tiles), at most 64."""
    programs = max(batch * hkv_programs, 1)
    if max_len <= 0:
        return 1
    by_length = triton.cdiv(max_len, max(256, block_n))
    wanted = triton.cdiv(2 * num_sms, programs)
    return max(1, min(by_length, wanted, 64))


def decode_attention(
    q, k_cache, v_cache, cache_seqlens, block_table, scale, causal, window_left,
    window_right, softcap, num_splits=0, *, block_n=None,
):
    """q: (B, q_len, Hq, D); contiguous k/v_cache (B, S, Hkv, D) or paged
    (num_blocks, block_size, Hkv, D) with int32 block_table (B, max_blocks); int32
    cache_seqlens (B,). fp16/bf16, unit stride on D. num_splits 0: chosen from shapes.
    Returns (B, q_len, Hq, D). No host synchronisation; every allocation sized by shapes."""
    from fastllm.backend import triton_interpreted

    batch, q_len, hq, head_dim = q.shape
    hkv = k_cache.shape[2]
    group = hq // hkv
    paged = block_table is not None
    if paged:
        page_size = k_cache.shape[1]
        capacity = block_table.shape[1] * page_size
        num_blocks = k_cache.shape[0]
    else:
        page_size, capacity, num_blocks = 1, k_cache.shape[1], 1
    if causal:
        window_right = 0 if window_right < 0 else min(window_right, 0)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    interpreted = triton_interpreted()
    rows = q_len * group
    block_m = max(16, min(triton.next_power_of_2(rows), 64))
    row_blocks = triton.cdiv(rows, block_m)
    block_d = max(16, triton.next_power_of_2(head_dim))
    if block_n is None:
        block_n = 16 if interpreted else (64 if head_dim <= 128 else 32)
    if num_splits <= 0:
        num_splits = decode_num_splits(batch, hkv * row_blocks, capacity, block_n, _num_sms(q.device))
    split_size = triton.cdiv(triton.cdiv(max(capacity, 1), num_splits), block_n) * block_n
    num_splits = max(1, triton.cdiv(capacity, split_size))
    if num_splits == 1:
        part, lse = out[None], cache_seqlens  # lse unused (STORE_LSE=False)
        stride_l = (0, 0, 0)
    else:
        # partial outputs in float32; allocated from shapes only
        part = torch.empty((num_splits, batch, q_len, hq, head_dim), dtype=torch.float32, device=q.device)
        lse = torch.empty((num_splits, batch, q_len, hq), dtype=torch.float32, device=q.device)
        stride_l = lse.stride()[:3]
    num_warps = 4 if block_m * block_d <= 64 * 128 else 8
    _decode_split_kernel[(num_splits, batch, hkv * row_blocks)](
        q, k_cache, v_cache, cache_seqlens, block_table if paged else cache_seqlens, part, lse,
        q_len, group, head_dim, capacity, num_blocks, page_size, split_size, row_blocks,
        float(scale), float(softcap), int(window_left), int(window_right),
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_table.stride(0) if paged else 0,
        part.stride(0), part.stride(1), part.stride(2), part.stride(3),
        *stride_l,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        PAGED=paged, HAS_SOFTCAP=softcap > 0, UPCAST=interpreted, STORE_LSE=num_splits > 1,
        EVEN_D=head_dim == block_d,
        num_warps=num_warps, num_stages=1 if interpreted else 3,
    )
    if num_splits > 1:
        _decode_merge_kernel[(q_len, batch, hq)](
            part, lse, out,
            num_splits, head_dim,
            part.stride(0), part.stride(1), part.stride(2), part.stride(3),
            lse.stride(0), lse.stride(1), lse.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            BLOCK_S=max(2, triton.next_power_of_2(num_splits)), BLOCK_D=block_d,
            num_warps=4,
        )
    return out


# --- cache append ------------------------------------------------------------------------


@triton.jit
def _append_target(
    pos_ptr, bt_ptr, token, b, t, capacity, num_blocks, page_size, stride_btb,
    SLOTS: tl.constexpr, PAGED: tl.constexpr,
):
    """Where new token t of sequence b (flat index `token`) goes: (block, row, ok). ok is
    False for a target outside the cache (a slot < 0, a position past the table, a bad
    block id): that token is skipped (kv_cache_append and rope_kv_append)."""
    if SLOTS:
        slot = tl.load(pos_ptr + token).to(tl.int64)
        ok = (slot >= 0) & (slot < num_blocks * page_size)
        kv_b = slot // page_size
        kv_s = slot % page_size
    else:
        pos = tl.load(pos_ptr + b).to(tl.int64) + t
        ok = (pos >= 0) & (pos < capacity)
        if PAGED:
            blk = tl.load(bt_ptr + b * stride_btb + pos // page_size, mask=ok, other=-1).to(tl.int64)
            ok = ok & (blk >= 0) & (blk < num_blocks)
            kv_b = blk
            kv_s = pos % page_size
        else:
            kv_b = b
            kv_s = pos
    return kv_b, kv_s, ok


@triton.jit
def _kv_append_kernel(
    # pointers
    kn_ptr, vn_ptr, kc_ptr, vc_ptr, pos_ptr, bt_ptr,
    # sizes
    n_new, head_dim, capacity, num_blocks, page_size,
    # strides
    stride_knb, stride_knt, stride_knh,
    stride_vnb, stride_vnt, stride_vnh,
    stride_kcb, stride_kcs, stride_kch,
    stride_vcb, stride_vcs, stride_vch,
    stride_btb,
    # meta-parameters
    BLOCK_D: tl.constexpr, SLOTS: tl.constexpr, PAGED: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    b = token // n_new
    t = token % n_new
    kv_b, kv_s, ok = _append_target(
        pos_ptr, bt_ptr, token, b, t, capacity, num_blocks, page_size, stride_btb, SLOTS, PAGED
    )
    m = d_ok & (tl.zeros((BLOCK_D,), dtype=tl.int32) + ok.to(tl.int32) != 0)
    kn = tl.load(kn_ptr + b * stride_knb + t * stride_knt + h * stride_knh + offs_d, mask=m)
    vn = tl.load(vn_ptr + b * stride_vnb + t * stride_vnt + h * stride_vnh + offs_d, mask=m)
    tl.store(kc_ptr + kv_b * stride_kcb + kv_s * stride_kcs + h * stride_kch + offs_d, kn, mask=m)
    tl.store(vc_ptr + kv_b * stride_vcb + kv_s * stride_vcs + h * stride_vch + offs_d, vn, mask=m)


def kv_cache_append(k_new, v_new, k_cache, v_cache, positions, block_table):
    """Writes k_new/v_new into k_cache/v_cache in place (see fastllm.ops.kv_cache_append).
    k_new (B, n, Hkv, D) with start positions (B,), or (T, Hkv, D) with flat slots (T,).
    Positions, slots and block ids out of range are skipped (no write)."""
    slots = k_new.dim() == 3
    paged = block_table is not None
    if slots:
        kn, vn = k_new[None], v_new[None]
    else:
        kn, vn = k_new, v_new
    batch, n_new, hkv, head_dim = kn.shape
    if batch * n_new == 0 or hkv == 0 or head_dim == 0:
        return
    if slots or paged:
        page_size, num_blocks = k_cache.shape[1], k_cache.shape[0]
        capacity = block_table.shape[1] * page_size if paged else num_blocks * page_size
    else:
        page_size, num_blocks, capacity = 1, 1, k_cache.shape[1]
    _kv_append_kernel[(batch * n_new, hkv)](
        kn, vn, k_cache, v_cache, positions, block_table if paged else positions,
        n_new, head_dim, capacity, num_blocks, page_size,
        kn.stride(0), kn.stride(1), kn.stride(2),
        vn.stride(0), vn.stride(1), vn.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_table.stride(0) if paged else 0,
        BLOCK_D=triton.next_power_of_2(head_dim), SLOTS=slots, PAGED=paged,
        num_warps=1 if head_dim <= 64 else 2,
    )
