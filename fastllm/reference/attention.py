"""Reference attention: prefill (dense or varlen), decode against a KV cache, and the
cache append. Plain math, one sequence at a time, float32 (float64 for float64 input).

Masking convention (shared by every backend). Query row i of a sequence with
seqlen_q queries and seqlen_k keys sits at key position ``i + seqlen_k - seqlen_q``
(bottom-right alignment); key j is visible when

    causal:        j <= i + seqlen_k - seqlen_q
    window left:   j >= i + seqlen_k - seqlen_q - window_left     (window_left >= 0)
    window right:  j <= i + seqlen_k - seqlen_q + window_right    (window_right >= 0)

A query row that sees no key gets output 0 and log-sum-exp -inf.
"""

from __future__ import annotations

import torch


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def visible(
    seqlen_q: int,
    seqlen_k: int,
    *,
    causal: bool = False,
    window_left: int = -1,
    window_right: int = -1,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Bool (seqlen_q, seqlen_k): True where query i may attend to key j."""
    i = torch.arange(seqlen_q, device=device)[:, None] + (seqlen_k - seqlen_q)
    j = torch.arange(seqlen_k, device=device)[None, :]
    keep = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if causal:
        keep &= j <= i
    if window_left >= 0:
        keep &= j >= i - window_left
    if window_right >= 0:
        keep &= j <= i + window_right
    return keep


def weighted_values(p: torch.Tensor, keep: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """out[b, i, h] = sum over the keys j that row i keeps of p[b, h, i, j] * v[b, j, h].

    p: (B, H, Sq, Sk), zero where masked; keep: bool, broadcastable to p; v: (B, Sk, H, D).
    A key a row does not keep contributes nothing even when its value is inf or NaN (in a
    plain matmul, 0 * inf = NaN would poison the row): non-finite values are left out of
    the matmul and added back, with IEEE rules (p * inf = inf for p > 0, 0 * inf = NaN,
    inf - inf = NaN), for the keys each row keeps."""
    finite = torch.isfinite(v)
    out = torch.einsum("bhqk,bkhd->bqhd", p, torch.where(finite, v, 0.0))
    if bool(finite.all()):
        return out
    kept = keep.expand(p.shape).to(p.dtype)
    positive = kept * (p > 0).to(p.dtype)

    def rows_reaching(w, hit):  # (B, Sq, H, D): whether a kept key with a `hit` value is there
        return torch.einsum("bhqk,bkhd->bqhd", w, hit.to(p.dtype)) > 0

    nan = rows_reaching(kept, torch.isnan(v)) | rows_reaching(kept - positive, torch.isinf(v))
    pos_inf = rows_reaching(positive, v == float("inf"))
    neg_inf = rows_reaching(positive, v == float("-inf"))
    out = torch.where(pos_inf, float("inf"), out)
    out = torch.where(neg_inf, float("-inf"), out)
    return torch.where(nan | (pos_inf & neg_inf), float("nan"), out)


def _one_sequence(q, k, v, keep, scale, softcap):
    """q: [Sq, Hq, D], k/v: [Sk, Hkv, D], keep: [Sq, Sk] -> out [Sq, Hq, D], lse [Hq, Sq]."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale  # [Hq, Sq, Sk]
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # -inf for rows that see nothing
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    out = weighted_values(p[None], keep[None, None], v[None])[0]
    return out, lse


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    return_lse: bool = False,
):
    """softmax(mask(softcap(q kᵀ · scale))) v per head, kv head ``h // (Hq // Hkv)`` for q head h.

    q: (B, Sq, Hq, D), k/v: (B, Sk, Hkv, D); or packed (Tq, Hq, D) / (Tk, Hkv, D) with
    int cu_seqlens_q/k of length B + 1. Returns out like q (q's dtype) and, with
    return_lse, the float32 (float64 for float64 input) log-sum-exp of the scaled,
    capped, masked scores: (B, Hq, Sq), or (Hq, Tq) when packed.
    """
    compute = _compute_dtype(q)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    qc, kc, vc = q.to(compute), k.to(compute), v.to(compute)
    if cu_seqlens_q is None:
        out = qc.new_zeros(q.shape)
        lse = qc.new_full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"))
        seqs = [(b, b, qc[b], kc[b], vc[b]) for b in range(q.shape[0])]
    else:
        # packed rows that belong to no sequence (cu_seqlens not covering q) stay 0, lse -inf
        out = qc.new_zeros(q.shape)
        lse = qc.new_full((q.shape[1], q.shape[0]), float("-inf"))
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        seqs = [
            (
                slice(cq[b], cq[b + 1]),
                (slice(None), slice(cq[b], cq[b + 1])),
                qc[cq[b] : cq[b + 1]],
                kc[ck[b] : ck[b + 1]],
                vc[ck[b] : ck[b + 1]],
            )
            for b in range(len(cq) - 1)
        ]
    for rows, lse_rows, qb, kb, vb in seqs:
        keep = visible(
            qb.shape[0],
            kb.shape[0],
            causal=causal,
            window_left=window_left,
            window_right=window_right,
            device=q.device,
        )
        out[rows], lse[lse_rows] = _one_sequence(qb, kb, vb, keep, scale, softcap)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def gather_cache(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    b: int,
    length: int,
    block_table: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys and values of sequence b's first `length` tokens, (length, Hkv, D) each, and a
    bool (length,) that is False for tokens in a block the table cannot name (an id
    outside [0, num_blocks): such keys are left out, as every backend does)."""
    if block_table is None:
        k, v = k_cache[b, :length], v_cache[b, :length]
        return k, v, torch.ones(k.shape[0], dtype=torch.bool, device=k.device)
    block_size = k_cache.shape[1]
    pos = torch.arange(length, device=k_cache.device)
    blocks = block_table[b].long()[pos // block_size]
    ok = (blocks >= 0) & (blocks < k_cache.shape[0])
    blocks = blocks.clamp(0, k_cache.shape[0] - 1)
    return k_cache[blocks, pos % block_size], v_cache[blocks, pos % block_size], ok


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    block_table: torch.Tensor | None = None,
    scale: float | None = None,
    causal: bool = True,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Attention of q (B, q_len, Hq, D) against the first cache_seqlens[b] cached tokens of
    each sequence b (the q_len new tokens are the last of them). Contiguous cache:
    k/v_cache (B, max_seqlen, Hkv, D); paged: (num_blocks, block_size, Hkv, D) with
    block_table (B, max_blocks). Returns (B, q_len, Hq, D) in q's dtype.

    Lengths are clamped to [0, capacity]; nothing past them is read."""
    compute = _compute_dtype(q)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    capacity = k_cache.shape[1] * (1 if block_table is None else block_table.shape[1])
    out = torch.zeros(q.shape, dtype=compute, device=q.device)
    for b in range(q.shape[0]):
        length = min(max(int(cache_seqlens[b]), 0), capacity)
        kb, vb, ok = gather_cache(k_cache, v_cache, b, length, block_table)
        keep = visible(
            q.shape[1],
            length,
            causal=causal,
            window_left=window_left,
            window_right=window_right,
            device=q.device,
        )
        keep = keep & ok[None, :]
        out[b], _ = _one_sequence(
            q[b].to(compute), kb.to(compute), vb.to(compute), keep, scale, softcap
        )
    return out.to(q.dtype)


def kv_cache_append(
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    positions: torch.Tensor,
    *,
    block_table: torch.Tensor | None = None,
) -> None:
    """Writes k_new/v_new into the caches in place.

    k_new (B, n, Hkv, D) with positions (B,): token t of sequence b goes to position
    positions[b] + t (through block_table when the cache is paged). k_new (T, Hkv, D)
    with a slot mapping (T,): token t goes to flat slot s = slot_mapping[t] of the cache
    viewed as (num_blocks * block_size, Hkv, D); slots < 0 are skipped. So is every
    target outside the cache (a position past the table, a bad block id).
    """
    num_blocks, block_size = k_cache.shape[:2]
    if k_new.dim() == 3:
        for t, s in enumerate(positions.tolist()):
            if 0 <= s < num_blocks * block_size:
                k_cache[s // block_size, s % block_size] = k_new[t]
                v_cache[s // block_size, s % block_size] = v_new[t]
        return
    for b in range(k_new.shape[0]):
        start = int(positions[b])
        for t in range(k_new.shape[1]):
            p = start + t
            if block_table is None:
                blk, row = b, p
                ok = 0 <= p < block_size
            else:
                ok = 0 <= p < block_table.shape[1] * block_size
                blk = int(block_table[b, p // block_size]) if ok else -1
                row = p % block_size
                ok = ok and 0 <= blk < num_blocks
            if ok:
                k_cache[blk, row] = k_new[b, t]
                v_cache[blk, row] = v_new[b, t]
