"""FlashAttention's Python interface on fastllm's ops: switching is a change of import.

    # from flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
    from fastllm.flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

The functions take FlashAttention 2's arguments (flash-attn 2.8), in its order, with its
defaults and meanings, and run on fastllm.ops.attention, decode_attention and
kv_cache_append, so every fastllm backend serves them (cuda, triton, cpu, torch,
reference; chosen per call like any op, forced with `fastllm.use_backend`).

Meanings taken from FlashAttention (where fastllm's own ops differ, their docstrings say so):

- causal defaults to False and is aligned to the bottom right (query i of seqlen_q sees key
  j <= i + seqlen_k - seqlen_q); a causal call ignores window_size[1] (it becomes 0).
- window_size = (left, right): key j is visible from query i when
  i + seqlen_k - seqlen_q - left <= j <= i + seqlen_k - seqlen_q + right; a negative side
  is unbounded. softcap <= 0 is off; softmax_scale None is head_dim ** -0.5.
- flash_attn_with_kvcache: cache_seqlens counts the cached tokens *before* k/v are
  appended; the append happens inside (in place, at positions cache_seqlens[b] + t), then
  q attends to cache_seqlens[b] + seqlen_new tokens. cache_seqlens None: the whole cache.
- varlen: cu_seqlens_q[-1] may be smaller than the packed length (a padded batch); rows
  past it belong to no sequence and come back 0 (FlashAttention leaves them unwritten).
- the log-sum-exp of a query row that sees no key is +inf, as FlashAttention returns it
  (fastllm.ops.attention gives -inf).

Wider than FlashAttention: float32 as well as fp16/bf16, any head_dim, any page size,
int64 index tensors, empty batches. Not supported, and refused at the call with
NotImplementedError: dropout (dropout_p > 0), ALiBi (alibi_slopes), rotary embedding
inside the call (rotary_cos/rotary_sin: rotate q and k before), and the backward pass
(inputs that require grad while grad mode is on: call under torch.no_grad() or
torch.inference_mode()). return_attn_probs returns (out, softmax_lse, S_dmask) with
S_dmask an empty tensor, which is what FlashAttention returns without dropout.

Index values (cu_seqlens, cache_seqlens, cache_batch_idx, cache_leftpad, block_table) are
checked when that is free (CPU tensors). On a GPU they are not read on the host, as in
FlashAttention: bad values give wrong rows, never an access outside a tensor.
"""

from __future__ import annotations

import math
import operator

import torch

from fastllm.ops import _index
from fastllm.ops._checks import FLOAT_DTYPES, check_same_device, check_tensor
from fastllm.ops.attention import attention, decode_attention, kv_cache_append

__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
]

_INT32_MAX = 2**31 - 1


# --- FlashAttention's arguments in fastllm's terms ------------------------------------------


def _refuse_unsupported(dropout_p=0.0, alibi_slopes=None, rotary_cos=None, rotary_sin=None):
    if dropout_p != 0:
        raise NotImplementedError(
            f"dropout_p = {dropout_p!r}: fastllm.flash_attn has no dropout (inference only); "
            "expected dropout_p=0.0"
        )
    if alibi_slopes is not None:
        raise NotImplementedError(
            "alibi_slopes: fastllm.flash_attn has no ALiBi bias; expected alibi_slopes=None"
        )
    if rotary_cos is not None or rotary_sin is not None:
        raise NotImplementedError(
            "rotary_cos/rotary_sin: fastllm.flash_attn applies no rotary embedding inside the "
            "call; rotate q and k before it and pass None"
        )


def _refuse_backward(**tensors) -> None:
    if not torch.is_grad_enabled():
        return
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.requires_grad:
            raise NotImplementedError(
                f"{name} requires grad, but fastllm.flash_attn has no backward pass; call it "
                "under torch.no_grad() or torch.inference_mode(), or pass detached tensors"
            )


def _window(window_size, causal: bool) -> tuple[int, int]:
    """FlashAttention's (left, right): a negative side is unbounded; causal makes right 0."""
    try:
        left, right = (operator.index(w) for w in window_size)
    except (TypeError, ValueError):
        raise ValueError(
            f"window_size must be a pair of ints (left, right), -1 for unbounded; "
            f"got {window_size!r}"
        ) from None
    return max(left, -1), 0 if causal else max(right, -1)


def _float(name: str, value) -> float:
    if not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError, RuntimeError):
            pass
    raise TypeError(f"{name} must be a float, got {value!r}")


def _scale(softmax_scale) -> float | None:
    if softmax_scale is None:
        return None
    value = _float("softmax_scale", softmax_scale)
    if not math.isfinite(value):
        raise ValueError(f"softmax_scale must be finite, got {softmax_scale!r}")
    return value


def _softcap(softcap) -> float | None:
    """softcap > 0 caps the scores; 0 or less is off (FlashAttention's rule)."""
    if softcap is None:
        return None
    value = _float("softcap", softcap)
    if math.isnan(value) or value == math.inf:
        raise ValueError(f"softcap must be finite (> 0 on, <= 0 off), got {softcap!r}")
    return value if value > 0 else None


def _max_seqlen(name: str, value) -> int:
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r}") from None
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _fa_lse(lse: torch.Tensor) -> torch.Tensor:
    """FlashAttention's log-sum-exp: +inf (fastllm: -inf) for a row that sees no key."""
    return lse.masked_fill(torch.isneginf(lse), math.inf)


def _outputs(res, q: torch.Tensor, return_attn_probs: bool):
    if not return_attn_probs:
        return res
    out, lse = res
    # S_dmask: FlashAttention 2 fills it only with dropout, and returns it empty otherwise
    return out, _fa_lse(lse), q.new_empty((0,))


# --- keys gathered from a cache ---------------------------------------------------------------


def _cache_slots(k_cache, block_table, rows, starts, lengths, width: int):
    """Where key j < width of each sequence b lies in k_cache viewed as
    (num_blocks * block_size, Hkv, D): int64 (B, width) slots, and a bool (B, width) that is
    True for the sequence's keys (j < lengths[b], in the cache). Contiguous cache
    (block_table None): key j of sequence b is row rows[b], position starts[b] + j. Paged:
    slot j % block_size of block block_table[b, j // block_size]. Slots not kept are 0."""
    num, page = k_cache.shape[:2]
    j = torch.arange(width, device=k_cache.device)
    keep = j < lengths[:, None]
    if block_table is None:
        pos = starts[:, None] + j
        keep &= (pos >= 0) & (pos < page) & (rows[:, None] >= 0) & (rows[:, None] < num)
        slot = rows[:, None] * page + pos
    else:
        cols = block_table.shape[1]
        keep &= j < cols * page
        col = (j // page).clamp(0, max(cols - 1, 0)).expand(lengths.shape[0], -1)
        blk = block_table.long().gather(1, col) if cols else torch.zeros_like(col)
        keep &= (blk >= 0) & (blk < num)
        slot = blk * page + j % page
    return torch.where(keep, slot, 0), keep


def _gathered_attention(q, cu_seqlens_q, max_seqlen_q, k_cache, v_cache, slots, keep, **kw):
    """fastllm.ops.attention (varlen) of packed q against keys gathered from a cache.

    The keys of sequence b are copied to rows b * width ... of a padded packed tensor. A
    varlen batch has no gaps between sequences, so the padding after each one becomes a
    sequence of its own with no queries: 2B sequences, every bound computed on the device
    (no host sync)."""
    batch, width = slots.shape
    hkv, d = k_cache.shape[2:]
    kf, vf = k_cache.flatten(0, 1), v_cache.flatten(0, 1)  # a view where the strides allow
    kept = keep.flatten()[:, None, None]
    if kf.shape[0]:
        k = torch.where(kept, kf[slots.flatten()], 0)  # (B * width, Hkv, D)
        v = torch.where(kept, vf[slots.flatten()], 0)
    else:
        k = v = k_cache.new_zeros((batch * width, hkv, d))
    lengths = keep.sum(1)
    starts = torch.arange(batch, device=k.device) * width
    cu_k = torch.stack([starts, starts + lengths], 1).flatten()
    cu_k = torch.cat([cu_k, cu_k.new_full((1,), batch * width)])
    cu_q = cu_seqlens_q.long()
    cu_q = torch.cat([torch.stack([cu_q[:-1], cu_q[1:]], 1).flatten(), cu_q[-1:]])
    return attention(
        q,
        k,
        v,
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        max_seqlen_q=max_seqlen_q,
        max_seqlen_k=width,
        validate=False,
        **kw,
    )


# --- prefill ----------------------------------------------------------------------------------


def flash_attn_func(
    q,
    k,
    v,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """FlashAttention's flash_attn_func: softmax(q kᵀ · softmax_scale) v per head.

    Args:
        q: (batch, seqlen_q, nheads, headdim), fp16, bf16 or fp32.
        k, v: (batch, seqlen_k, nheads_k, headdim), q's dtype; nheads % nheads_k == 0
            (MQA/GQA: q heads 0 .. g-1 read kv head 0, with g = nheads // nheads_k).
        dropout_p: must be 0.0 (no dropout).
        softmax_scale: multiplies q kᵀ; default headdim ** -0.5.
        causal: bottom-right aligned. seqlen_q = 2, seqlen_k = 5 (1 = keep):

                1 1 1 1 0
                1 1 1 1 1

            and seqlen_q = 5, seqlen_k = 2: rows 0-2 see nothing (output 0):

                0 0 / 0 0 / 0 0 / 1 0 / 1 1

        window_size: (left, right); query i sees keys
            [i + seqlen_k - seqlen_q - left, i + seqlen_k - seqlen_q + right]; -1 unbounded.
        softcap: > 0 caps the scores at softcap * tanh(s / softcap); <= 0 is off.
        alibi_slopes: must be None. deterministic: accepted; the forward pass is.
        return_attn_probs: also return softmax_lse, float32 (batch, nheads, seqlen_q) (+inf
            for a row that sees no key), and S_dmask, an empty tensor (as FlashAttention
            without dropout).

    Returns out (batch, seqlen_q, nheads, headdim) in q's dtype, or
    (out, softmax_lse, S_dmask) with return_attn_probs.
    """
    _refuse_unsupported(dropout_p, alibi_slopes)
    _refuse_backward(q=q, k=k, v=v)
    causal = bool(causal)
    res = attention(
        q,
        k,
        v,
        causal=causal,
        scale=_scale(softmax_scale),
        window=_window(window_size, causal),
        softcap=_softcap(softcap),
        return_lse=bool(return_attn_probs),
    )
    return _outputs(res, q, return_attn_probs)


def flash_attn_qkvpacked_func(
    qkv,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """flash_attn_func with qkv (batch, seqlen, 3, nheads, headdim)."""
    check_tensor("qkv", qkv, dim=5)
    q, k, v = qkv.unbind(2)
    return flash_attn_func(
        q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
        deterministic, return_attn_probs,
    )  # fmt: skip


def flash_attn_kvpacked_func(
    q,
    kv,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """flash_attn_func with kv (batch, seqlen_k, 2, nheads_k, headdim)."""
    check_tensor("kv", kv, dim=5)
    k, v = kv.unbind(2)
    return flash_attn_func(
        q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
        deterministic, return_attn_probs,
    )  # fmt: skip


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
):
    """FlashAttention's flash_attn_varlen_func: sequences of different lengths, packed.

    Args:
        q: (total_q, nheads, headdim); sequence b is rows cu_seqlens_q[b] .. cu_seqlens_q[b+1].
        k, v: (total_k, nheads_k, headdim), rows cu_seqlens_k[b] .. cu_seqlens_k[b+1]; or,
            with block_table, a paged cache (num_blocks, block_size, nheads_k, headdim)
            (any block_size) whose sequence b holds cu_seqlens_k[b+1] - cu_seqlens_k[b] keys.
        cu_seqlens_q, cu_seqlens_k: int32 or int64 (batch + 1,): prefix sums of the lengths,
            from 0. Lengths 0 are allowed. cu_seqlens_q[-1] may be below total_q (a padded
            batch): the rows past it come back 0 (softmax_lse +inf).
        max_seqlen_q, max_seqlen_k: ints, at least the longest sequence.
        block_table: int32/int64 (batch, max_blocks_per_seq): block of each sequence's
            logical block i (keys i * block_size ...). The keys in use are gathered into a
            padded copy (batch x max_seqlen_k tokens) for fastllm.ops.attention.
        The rest: as in flash_attn_func; masks are aligned per sequence.

    Returns out (total_q, nheads, headdim), or (out, softmax_lse (nheads, total_q) float32,
    S_dmask empty) with return_attn_probs.
    """
    _refuse_unsupported(dropout_p, alibi_slopes)
    _refuse_backward(q=q, k=k, v=v)
    check_tensor("q", q, dtypes=FLOAT_DTYPES, dim=3)
    batch = _index.check_cu_seqlens_pair(cu_seqlens_q, cu_seqlens_k)
    max_seqlen_q = _max_seqlen("max_seqlen_q", max_seqlen_q)
    max_seqlen_k = _max_seqlen("max_seqlen_k", max_seqlen_k)
    causal = bool(causal)
    kw = dict(
        causal=causal,
        scale=_scale(softmax_scale),
        window=_window(window_size, causal),
        softcap=_softcap(softcap),
        return_lse=bool(return_attn_probs),
    )
    if block_table is not None:
        for name, t in (("k", k), ("v", v)):
            check_tensor(name, t, dtypes=FLOAT_DTYPES, dim=4)
        if v.shape != k.shape:
            raise ValueError(
                f"v has shape {tuple(v.shape)} but k has {tuple(k.shape)}; expected equal"
            )
        _index.check_block_table("block_table", block_table, batch)
    if _index.value_checks_wanted(None, cu_seqlens_q, cu_seqlens_k, block_table):
        _index.check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, padded=True)
        total_k = k.shape[0] if block_table is None else None
        _index.check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, total_k, max_seqlen_k, padded=True)
        if block_table is not None:
            page = k.shape[1]
            lengths = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long()
            capacity = block_table.shape[1] * page
            _index.check_range(
                "cu_seqlens_k lengths",
                lengths,
                0,
                capacity,
                f"at most the block table's {capacity} slots",
            )
            _index.check_block_ids(
                block_table, torch.zeros_like(lengths), -(-lengths // page), k.shape[0]
            )
    if block_table is None:
        res = attention(
            q,
            k,
            v,
            cu_seqlens_q=cu_seqlens_q,
            cu_seqlens_k=cu_seqlens_k,
            max_seqlen_q=max_seqlen_q,
            max_seqlen_k=max_seqlen_k,
            validate=False,  # checked above, the FlashAttention way (cu_seqlens may stop short)
            **kw,
        )
    else:
        lengths = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long().clamp(0, max_seqlen_k)
        slots, keep = _cache_slots(k, block_table, None, None, lengths, max_seqlen_k)
        res = _gathered_attention(q, cu_seqlens_q, max_seqlen_q, k, v, slots, keep, **kw)
    return _outputs(res, q, return_attn_probs)


def flash_attn_varlen_qkvpacked_func(
    qkv,
    cu_seqlens,
    max_seqlen,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """flash_attn_varlen_func with qkv (total, 3, nheads, headdim) and one cu_seqlens."""
    check_tensor("qkv", qkv, dim=4)
    q, k, v = qkv.unbind(1)
    return flash_attn_varlen_func(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale,
        causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs,
    )  # fmt: skip


def flash_attn_varlen_kvpacked_func(
    q,
    kv,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """flash_attn_varlen_func with kv (total_k, 2, nheads_k, headdim)."""
    check_tensor("kv", kv, dim=4)
    k, v = kv.unbind(1)
    return flash_attn_varlen_func(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
        softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
        return_attn_probs,
    )  # fmt: skip


# --- decode against a KV cache ----------------------------------------------------------------


def _check_kvcache(q, k_cache, v_cache, k, v, block_table) -> None:
    """Shapes and dtypes, before anything is written to the cache."""
    check_tensor("q", q, dtypes=FLOAT_DTYPES, dim=4)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(name, t, dtypes=FLOAT_DTYPES, dim=4)
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; expected one dtype")
    if v_cache.shape != k_cache.shape:
        raise ValueError(
            f"v_cache has shape {tuple(v_cache.shape)} but k_cache has {tuple(k_cache.shape)}; "
            "expected equal"
        )
    hkv, d = k_cache.shape[2:]
    if q.shape[-1] != d:
        raise ValueError(f"q has headdim {q.shape[-1]} but k_cache has {d}; expected equal")
    if hkv == 0 or q.shape[2] % hkv:
        raise ValueError(
            f"q has {q.shape[2]} heads and k_cache has {hkv}; expected a multiple (MQA/GQA)"
        )
    if (k is None) != (v is None):
        raise ValueError(
            "k and v are the new keys and values to append: pass both or neither, got "
            f"k={'None' if k is None else 'a tensor'} and v={'None' if v is None else 'a tensor'}"
        )
    if k is not None:
        for name, t in (("k", k), ("v", v)):
            check_tensor(name, t, dtypes=FLOAT_DTYPES, dim=4)
            if t.dtype != q.dtype:
                raise TypeError(
                    f"{name} has dtype {t.dtype} but q has {q.dtype}; expected one dtype"
                )
            if t.shape[0] != q.shape[0] or t.shape[2:] != k_cache.shape[2:]:
                raise ValueError(
                    f"{name} has shape {tuple(t.shape)}; expected (batch={q.shape[0]}, "
                    f"seqlen_new, nheads_k={hkv}, headdim={d})"
                )
        if v.shape != k.shape:
            raise ValueError(
                f"v has shape {tuple(v.shape)} but k has {tuple(k.shape)}; expected equal"
            )
    if block_table is not None:
        _index.check_block_table("block_table", block_table, q.shape[0])


def flash_attn_with_kvcache(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    rotary_cos=None,
    rotary_sin=None,
    cache_seqlens=None,
    cache_batch_idx=None,
    cache_leftpad=None,
    block_table=None,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    rotary_interleaved=True,
    alibi_slopes=None,
    num_splits=0,
    return_softmax_lse=False,
):
    """FlashAttention's flash_attn_with_kvcache: append k/v to the cache in place (if given),
    then attend q to each sequence's cached tokens.

    Args:
        q: (batch, seqlen_q, nheads, headdim).
        k_cache, v_cache: (batch_cache, seqlen_cache, nheads_k, headdim), or paged
            (num_blocks, block_size, nheads_k, headdim) with block_table (any block_size);
            q's dtype, unit stride on headdim.
        k, v: new keys and values (batch, seqlen_new, nheads_k, headdim), or None: written
            in place at positions cache_seqlens[b] .. cache_seqlens[b] + seqlen_new - 1 of
            sequence b's cache (through cache_batch_idx or block_table).
        rotary_cos, rotary_sin: must be None (no rotary embedding inside the call).
        cache_seqlens: int, or int32/int64 (batch,): tokens in each cache *before* the
            append. q then attends to cache_seqlens[b] + seqlen_new tokens. None (only
            without k/v): the whole cache, seqlen_cache or max_blocks_per_seq * block_size.
        cache_batch_idx: int32/int64 (batch,): cache row of each sequence (contiguous cache
            only); None: row b. Duplicate rows with k/v: which write wins is unspecified.
        cache_leftpad: int32/int64 (batch,): sequence b's cache starts at this position
            (contiguous cache only); positions and masks count from there.
        block_table: int32/int64 (batch, max_blocks_per_seq): physical block of each
            sequence's logical block i (tokens i * block_size ...).
        softmax_scale, causal, window_size, softcap: as in flash_attn_func, the queries being
            the last seqlen_q of cache_seqlens + seqlen_new tokens (bottom-right alignment).
        alibi_slopes: must be None. rotary_interleaved: ignored (no rotary).
        num_splits: 0 chooses from shapes; n > 0: n KV splits on the triton backend.
        return_softmax_lse: also return softmax_lse (batch, nheads, seqlen_q), float32, +inf
            for a row that sees no key. The cache's tokens are then gathered into a padded
            copy (batch x capacity tokens) for fastllm.ops.attention, which gives the lse;
            without it fastllm.ops.decode_attention reads the cache where it is. Neither
            path reads index values on the host (CUDA graphs, torch.compile).

    Returns out (batch, seqlen_q, nheads, headdim), or (out, softmax_lse).

    Raises before anything is written: ValueError/TypeError for bad shapes, dtypes and
    index values (values are read only when free: CPU tensors), NotImplementedError for
    rotary, ALiBi and inputs that require grad.
    """
    _refuse_unsupported(alibi_slopes=alibi_slopes, rotary_cos=rotary_cos, rotary_sin=rotary_sin)
    _refuse_backward(q=q, k=k, v=v, k_cache=k_cache, v_cache=v_cache)
    _check_kvcache(q, k_cache, v_cache, k, v, block_table)
    causal = bool(causal)
    kw = dict(
        causal=causal,
        scale=_scale(softmax_scale),
        window=_window(window_size, causal),
        softcap=_softcap(softcap),
    )
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(
            f"num_splits must be an int >= 0 (0: chosen from shapes), got {num_splits!r}"
        )
    batch = q.shape[0]
    num, page = k_cache.shape[:2]
    seqlen_new = 0 if k is None else k.shape[1]
    if block_table is not None:
        for name, t in (("cache_batch_idx", cache_batch_idx), ("cache_leftpad", cache_leftpad)):
            if t is not None:
                raise ValueError(
                    f"{name} works with a contiguous cache only (as in FlashAttention); with "
                    "a paged cache (block_table) the table names each sequence's blocks"
                )
        capacity = block_table.shape[1] * page
    else:
        capacity = page
        if cache_batch_idx is not None:
            _index.check_index(
                "cache_batch_idx", cache_batch_idx, dim=1, length=batch, what=f"(batch={batch},)"
            )
        elif num < batch:
            raise ValueError(
                f"k_cache has {num} rows but q has batch {batch}; expected at least {batch} "
                "rows, or cache_batch_idx"
            )
    if cache_seqlens is None:
        if k is not None:
            raise ValueError("cache_seqlens is required with k and v: it says where to append them")
        lengths = torch.full((batch,), capacity, dtype=torch.int64, device=q.device)
    else:
        cache_seqlens = _index.seqlens_tensor("cache_seqlens", cache_seqlens, batch, q.device)
        lengths = cache_seqlens.long() + seqlen_new  # tokens attended to, new ones included
    if cache_leftpad is not None:
        _index.check_index(
            "cache_leftpad", cache_leftpad, dim=1, length=batch, what=f"(batch={batch},)"
        )
    check_same_device(
        q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v, cache_seqlens=cache_seqlens,
        cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad, block_table=block_table,
    )  # fmt: skip

    if _index.value_checks_wanted(None, cache_seqlens, cache_batch_idx, cache_leftpad, block_table):
        if cache_seqlens is not None:
            _index.check_range(
                "cache_seqlens", cache_seqlens, 0, capacity - seqlen_new,
                f"cache_seqlens + {seqlen_new} new tokens (k) within the cache's {capacity} slots",
            )  # fmt: skip
        if cache_batch_idx is not None:
            _index.check_range(
                "cache_batch_idx", cache_batch_idx, 0, num - 1, f"a row of k_cache ({num} rows)"
            )
        if cache_leftpad is not None:
            start = cache_leftpad.long() - (0 if cache_seqlens is None else cache_seqlens.long())
            bad = (cache_leftpad < 0) | (start > (capacity if cache_seqlens is None else 0))
            if bad.any().item():
                i = int(bad.nonzero()[0, 0])
                raise ValueError(
                    f"cache_leftpad[{i}] = {int(cache_leftpad[i])}; expected 0 <= cache_leftpad "
                    "<= cache_seqlens (the cache starts before its end)"
                )
        if block_table is not None:
            needed = -(-lengths // page)
            _index.check_block_ids(block_table, torch.zeros_like(needed), needed, num)

    # the cache as a paged one, so that one call form serves every layout: a contiguous
    # cache is num blocks of seqlen_cache tokens, cache_batch_idx a one-column block table
    table, kc, vc = block_table, k_cache, v_cache
    if block_table is None:
        if cache_batch_idx is not None:
            table = cache_batch_idx[:, None]
        else:
            kc, vc = k_cache[:batch], v_cache[:batch]
    if k is not None:
        kv_cache_append(k, v, kc, vc, cache_seqlens, block_table=table)

    starts = torch.zeros_like(lengths) if cache_leftpad is None else cache_leftpad.long()
    # decode_attention gives no lse, and reads int32 block ids: a left-padded cache of more
    # than 2^31 tokens cannot be named one token per block (below)
    if return_softmax_lse or (cache_leftpad is not None and num * page > _INT32_MAX):
        rows = None
        if block_table is None:
            rows = (
                torch.arange(batch, device=q.device)
                if cache_batch_idx is None
                else cache_batch_idx.long()
            )
        slots, keep = _cache_slots(k_cache, block_table, rows, starts, lengths - starts, capacity)
        sq, hq = q.shape[1:3]
        cu_q = torch.arange(batch + 1, device=q.device) * sq
        out, lse = _gathered_attention(
            q.reshape(batch * sq, hq, q.shape[3]), cu_q, sq, k_cache, v_cache, slots, keep,
            return_lse=True, **kw,
        )  # fmt: skip
        out = out.view(q.shape)
        if not return_softmax_lse:
            return out
        return out, _fa_lse(lse.view(hq, batch, sq).transpose(0, 1).contiguous())
    splits = num_splits or None
    if cache_leftpad is None:
        return decode_attention(q, kc, vc, lengths, block_table=table, num_splits=splits, **kw)
    # left padding: the cache viewed as blocks of one token, and a table naming each
    # sequence's tokens from its start (a copy only where the cache's strides forbid a view)
    rows = (
        torch.arange(batch, device=q.device) if cache_batch_idx is None else cache_batch_idx.long()
    )
    slots, _ = _cache_slots(k_cache, None, rows, starts, lengths - starts, capacity)
    kf, vf = k_cache.flatten(0, 1)[:, None], v_cache.flatten(0, 1)[:, None]
    return decode_attention(
        q, kf, vf, (lengths - starts).clamp(0, capacity), block_table=slots, num_splits=splits, **kw
    )
