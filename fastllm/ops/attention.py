"""Attention ops: prefill `attention`, `decode_attention` against a KV cache, and
`kv_cache_append`.

Three custom ops (``torch.ops.fastllm.attention``, ``.decode_attention``,
``.kv_cache_append``), each choosing its backend per call with `backend.select`.
The public functions below validate and normalize their arguments; every backend
implementation then receives plain values, positionally, in this order:

    attention(q, k, v, causal, scale, window_left, window_right, softcap,
              cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, return_lse)
        q           (B, Sq, Hq, D), or packed (Tq, Hq, D) when cu_seqlens_q is given
        k, v        (B, Sk, Hkv, D), or packed (Tk, Hkv, D); Hq % Hkv == 0
                    q, k, v: one dtype (fp32/fp16/bf16), one device, stride(-1) == 1
        causal      bool; when True, window_right is already 0 (causal == window_right 0)
        scale       float, resolved (default D ** -0.5)
        window_left, window_right   int, -1 = unbounded
        softcap     float, 0.0 = off
        cu_seqlens_q, cu_seqlens_k  contiguous int32 (B + 1,) or None (both or neither)
        max_seqlen_q, max_seqlen_k  int: the longest sequence (varlen), else Sq and Sk
        return_lse  bool
      returns (out, lse or None): out like q (fresh tensor, q's dtype); lse float32
      (B, Hq, Sq), or (Hq, Tq) when packed; -inf for rows that see no key.

    decode_attention(q, k_cache, v_cache, cache_seqlens, block_table, scale, causal,
                     window_left, window_right, softcap, num_splits)
        q           (B, q_len, Hq, D)
        k/v_cache   (B, S_max, Hkv, D), or paged (num_blocks, block_size, Hkv, D)
        cache_seqlens  contiguous int32 (B,); block_table contiguous int32 (B, max_blocks)
                    or None
        num_splits  int, 0 = the implementation chooses (from shapes only)
        (the rest as above; causal already folded into window_right = 0)
      returns out (B, q_len, Hq, D) in q's dtype.

    kv_cache_append(k_new, v_new, k_cache, v_cache, positions, block_table)
        k_new/v_new (B, n, Hkv, D) with positions int (B,), or (T, Hkv, D) with slots int (T,)
      writes the caches in place, returns None; out-of-range targets are skipped.

Index tensors reach the backends as contiguous int32 whatever the caller passed (the ops
call `_index.kernel_index`; see fastllm/ops/_index.py for the rules every op follows).
Varlen rows that no sequence covers come back 0 (lse -inf), slots past cache_seqlens are
never read, and a key a row does not see adds nothing to it, even with an inf/NaN value.

A backend registers ``backend.register(op, name, supports=...)`` where `supports`
takes the same arguments and returns None or the reason it cannot serve the call.
The `cuda` backend is the launchers of fastllm/native/attention.py, registered below;
the `cpu` backend (attention and decode_attention) is the C++ kernels of
csrc/attention/attention_cpu.cpp, launched by fastllm/native/cpu.py.
"""

from __future__ import annotations

from typing import Optional  # noqa: F401 - custom-op schemas read Optional[...] annotations

import torch
import torch.nn.functional as F

from fastllm import backend, reference
from fastllm.native import attention as native_attention
from fastllm.native import cpu as native_cpu
from fastllm.ops import _index
from fastllm.ops._checks import FLOAT_DTYPES, check_same_device, check_tensor, is_finite
from fastllm.ops._eager import direct, shape_checks
from fastllm.reference.attention import visible, weighted_values

KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def _kernel_head_dim_reason(head_dim: int) -> str | None:
    if head_dim % 8 != 0 or not 16 <= head_dim <= 256:
        return f"head_dim {head_dim} is not a multiple of 8 in [16, 256]"
    return None


def _kernel_dtype_reason(t: torch.Tensor) -> str | None:
    if t.dtype not in KERNEL_DTYPES:
        return f"dtype {t.dtype} is served by the torch/reference backends (kernels: fp16, bf16)"
    return None


# --- supports ------------------------------------------------------------------------------


def _attention_triton_supports(q, k, v, *args) -> str | None:
    return _kernel_dtype_reason(q) or _kernel_head_dim_reason(q.shape[-1])


def _decode_triton_supports(q, k_cache, v_cache, *args) -> str | None:
    return _kernel_dtype_reason(q) or _kernel_head_dim_reason(q.shape[-1])


def _append_triton_supports(k_new, v_new, k_cache, *args) -> str | None:
    if k_cache.shape[-1] > 4096:
        return f"head_dim {k_cache.shape[-1]} is above 4096"
    return None


# --- backends: attention -------------------------------------------------------------------


@backend.register("attention", "reference")
def _attention_reference(
    q, k, v, causal, scale, window_left, window_right, softcap, cu_q, cu_k, mq, mk, return_lse
):
    res = reference.attention(
        q,
        k,
        v,
        causal=causal,
        scale=scale,
        window_left=window_left,
        window_right=window_right,
        softcap=softcap,
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        return_lse=True,
    )
    out, lse = res
    return out, (lse.float() if return_lse else None)


_SDPA_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


def _sdpa(q, k, v, *, mask=None, is_causal=False, scale=None):
    """SDPA on (B, S, H, D) tensors; GQA through enable_gqa when this PyTorch has it."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    group = q.shape[2] // k.shape[2]
    kwargs = {}
    if group > 1:
        if _SDPA_HAS_GQA:
            kwargs["enable_gqa"] = True
        else:
            kt, vt = kt.repeat_interleave(group, dim=1), vt.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(
        qt, kt, vt, attn_mask=mask, is_causal=is_causal, scale=scale, **kwargs
    )
    return out.transpose(1, 2)


def _math(q, k, v, keep, scale, softcap):
    """Plain PyTorch in float32: q (B, Sq, Hq, D), keep bool broadcastable to (B, Hq, Sq, Sk).
    Returns out (B, Sq, Hq, D) float32 and lse (B, Hq, Sq)."""
    group = q.shape[2] // k.shape[2]
    qf, kf, vf = q.float(), k.float(), v.float()
    if group > 1:
        kf, vf = kf.repeat_interleave(group, dim=2), vf.repeat_interleave(group, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    if keep is None:
        return torch.einsum("bhqk,bkhd->bqhd", p, vf), lse
    return weighted_values(p, keep, vf), lse


def _dense_torch(q, k, v, causal, scale, window_left, window_right, softcap, return_lse):
    batch, sq, hq, _ = q.shape
    sk = k.shape[1]
    if sk == 0 or sq == 0:
        lse = torch.full((batch, hq, sq), float("-inf"), device=q.device)
        return torch.zeros_like(q), (lse if return_lse else None)
    plain_causal = causal and window_left < 0 and sq == sk
    keep = None
    if not plain_causal and (causal or window_left >= 0 or window_right >= 0):
        keep = visible(
            sq,
            sk,
            causal=causal,
            window_left=window_left,
            window_right=window_right,
            device=q.device,
        )
    masked = plain_causal or keep is not None
    # SDPA multiplies masked-out probabilities (0) by their values: a masked key whose
    # value is inf/NaN would turn visible rows into NaN, so such calls take the math path
    if return_lse or softcap > 0 or (masked and not bool(torch.isfinite(v).all())):
        if plain_causal:
            keep = visible(sq, sk, causal=True, device=q.device)
        out, lse = _math(q, k, v, keep, scale, softcap)
        return out.to(q.dtype), (lse if return_lse else None)
    out = _sdpa(q, k, v, mask=keep, is_causal=plain_causal, scale=scale)
    if keep is not None:
        # rows that see no key: 0, where SDPA gives NaN
        out = out.masked_fill(~keep.any(-1)[None, :, None, None], 0.0)
    return _nan_rows(out, q).contiguous(), None


def _nan_rows(out: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """NaN in the rows of a NaN query, as the other backends give (PyTorch's CPU SDPA
    kernels return 0 there)."""
    return out.masked_fill(torch.isnan(q).any(-1, keepdim=True), float("nan"))


@backend.register("attention", "torch")
def _attention_torch(
    q, k, v, causal, scale, window_left, window_right, softcap, cu_q, cu_k, mq, mk, return_lse
):
    if cu_q is None:
        return _dense_torch(q, k, v, causal, scale, window_left, window_right, softcap, return_lse)
    # varlen: one sequence at a time (the bounds come to the host). One padded SDPA call
    # over all sequences was measured slower on the CPU (MiniLM's padded batches: 96
    # segments of <= 30 tokens, 14.8 ms against 5.6 ms): it pays for the padding and the mask.
    # packed rows that belong to no sequence (cu_seqlens not covering q) stay 0, lse -inf
    out = torch.zeros_like(q)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), device=q.device)
    # cu_seqlens clamped into the packed tensors: unchecked values (validate=False, compile)
    # give wrong rows, never slices past the end
    bq = cu_q.clamp(0, q.shape[0]).tolist()
    bk = cu_k.clamp(0, k.shape[0]).tolist()
    # no lse, softcap or window (causal arrives as window_right == 0)
    plain = (
        not return_lse
        and softcap == 0
        and window_left < 0
        and (window_right < 0 or (causal and window_right == 0))
        # a causal mask must not meet inf/NaN values in SDPA (see _dense_torch)
        and not (causal and not bool(torch.isfinite(v).all()))
    )
    for b in range(len(bq) - 1):
        lq, lk = bq[b + 1] - bq[b], bk[b + 1] - bk[b]
        if lq <= 0:
            continue
        lk = max(lk, 0)
        if plain and lk > 0 and (not causal or lq == lk):
            # the common case (a padded batch's sequences) straight to SDPA: the call
            # overhead per sequence is what this loop costs on the CPU
            qb = q[None, bq[b] : bq[b + 1]]
            o = _sdpa(
                qb,
                k[None, bk[b] : bk[b + 1]],
                v[None, bk[b] : bk[b + 1]],
                is_causal=causal,
                scale=scale,
            )
            out[bq[b] : bq[b + 1]] = _nan_rows(o, qb)[0]
            continue
        o, lse_b = _dense_torch(
            q[None, bq[b] : bq[b + 1]],
            k[None, bk[b] : bk[b + 1]],
            v[None, bk[b] : bk[b + 1]],
            causal,
            scale,
            window_left,
            window_right,
            softcap,
            return_lse,
        )
        out[bq[b] : bq[b + 1]] = o[0]
        if return_lse:
            lse[:, bq[b] : bq[b + 1]] = lse_b[0]
    return out, (lse if return_lse else None)


backend.register(
    "attention",
    "cpu",
    supports=native_cpu.supports_attention,
    prefer=native_cpu.prefer_attention,
)(native_cpu.attention)


@backend.register("attention", "triton", supports=_attention_triton_supports)
def _attention_triton(*args):
    from fastllm.triton_kernels.attention import attention

    return attention(*args)


# --- backends: decode_attention ------------------------------------------------------------


@backend.register("decode_attention", "reference")
def _decode_reference(
    q, k_cache, v_cache, seqlens, block_table, scale, causal, wl, wr, softcap, num_splits
):
    return reference.decode_attention(
        q,
        k_cache,
        v_cache,
        seqlens,
        block_table=block_table,
        scale=scale,
        causal=causal,
        window_left=wl,
        window_right=wr,
        softcap=softcap,
    )


@backend.register("decode_attention", "torch")
def _decode_torch(
    q, k_cache, v_cache, seqlens, block_table, scale, causal, wl, wr, softcap, num_splits
):
    batch, q_len = q.shape[:2]
    page = k_cache.shape[1]
    capacity = page * (1 if block_table is None else block_table.shape[1])
    length = seqlens.long().clamp(0, capacity)  # (B,)
    # Read only the positions in use: memory and work follow the longest sequence, not the
    # cache's capacity or the block table's width (one host sync).
    s_used = int(length.max()) if batch else 0
    j = torch.arange(s_used, device=q.device)
    in_use = j[None, :] < length[:, None]  # (B, S)
    if block_table is None:
        k, v = k_cache[:, :s_used], v_cache[:, :s_used]
    else:
        ids = block_table[:, : -(-s_used // page)].long()
        # bad block ids (possible without the value checks) are left out, like other backends
        in_use &= ((ids >= 0) & (ids < k_cache.shape[0])).repeat_interleave(page, dim=1)[:, :s_used]
        ids = ids.clamp(0, k_cache.shape[0] - 1)
        k = k_cache[ids].flatten(1, 2)[:, :s_used]  # (B, S, Hkv, D)
        v = v_cache[ids].flatten(1, 2)[:, :s_used]
    # Slots past a sequence's end may hold anything (a recycled block, torch.empty): NaN or
    # inf there must not reach the output, and masked scores times values would let it.
    k = torch.where(in_use[:, :, None, None], k, 0)
    v = torch.where(in_use[:, :, None, None], v, 0)
    qpos = length[:, None, None] - q_len + torch.arange(q_len, device=q.device)[None, :, None]
    keep = in_use[:, None, :]  # (B, q_len, S)
    if causal or wr >= 0:
        keep = keep & (j <= qpos + max(wr, 0))
    if wl >= 0:
        keep = keep & (j >= qpos - wl)
    keep = keep[:, None]  # (B, 1, q_len, S)
    windowed = causal or wr >= 0 or wl >= 0
    if softcap > 0 or s_used == 0 or (windowed and not bool(torch.isfinite(v).all())):
        out, _ = _math(q, k, v, keep, scale, softcap)
        return out.to(q.dtype)
    out = _sdpa(q, k, v, mask=keep, scale=scale)
    out = out.masked_fill(~keep.any(-1).transpose(1, 2)[..., None], 0.0)
    return _nan_rows(out, q).contiguous()


backend.register(
    "decode_attention",
    "cpu",
    supports=native_cpu.supports_decode,
    prefer=native_cpu.prefer_decode,
)(native_cpu.decode_attention)


@backend.register("decode_attention", "triton", supports=_decode_triton_supports)
def _decode_triton(*args):
    from fastllm.triton_kernels.attention import decode_attention

    return decode_attention(*args)


# --- backends: cuda (csrc/attention/, launched by fastllm/native/attention.py) ---------------

backend.register("attention", "cuda", supports=native_attention.supports_prefill)(
    native_attention.prefill
)
backend.register("decode_attention", "cuda", supports=native_attention.supports_decode)(
    native_attention.decode
)


# --- backends: kv_cache_append ---------------------------------------------------------------


@backend.register("kv_cache_append", "reference")
def _append_reference(k_new, v_new, k_cache, v_cache, positions, block_table):
    reference.kv_cache_append(k_new, v_new, k_cache, v_cache, positions, block_table=block_table)


@backend.register("kv_cache_append", "torch")
def _append_torch(k_new, v_new, k_cache, v_cache, positions, block_table):
    page = k_cache.shape[1]
    if k_new.dim() == 3:
        slots = positions.long()
        keep = (slots >= 0) & (slots < k_cache.shape[0] * page)
        blk, off, kn, vn = slots // page, slots % page, k_new, v_new
    else:
        batch, n = k_new.shape[:2]
        pos = positions.long()[:, None] + torch.arange(n, device=k_new.device)  # (B, n)
        kn, vn = k_new, v_new
        if block_table is None:
            keep = (pos >= 0) & (pos < page)
            blk = torch.arange(batch, device=k_new.device)[:, None].expand(batch, n)
            off = pos
        else:
            keep = (pos >= 0) & (pos < block_table.shape[1] * page)
            blk = block_table.long().gather(1, (pos // page).clamp(0, block_table.shape[1] - 1))
            keep = keep & (blk >= 0) & (blk < k_cache.shape[0])
            off = pos % page
    k_cache[blk[keep], off[keep]] = kn[keep]
    v_cache[blk[keep], off[keep]] = vn[keep]


@backend.register("kv_cache_append", "triton", supports=_append_triton_supports)
def _append_triton(*args):
    from fastllm.triton_kernels.attention import kv_cache_append

    kv_cache_append(*args)


# The public functions call the registered ops through torch.ops (the same op as the
# custom_op objects below, without their Python wrapper's cost per call, ~18 us on a CPU),
# or, where `direct` allows it, run the op's body (`_run_*`) themselves.
_OPS = torch.ops.fastllm

# --- registered ops ----------------------------------------------------------------------------


def _run_attention(
    q, k, v, causal, scale, window_left, window_right, softcap, cu_q, cu_k, mq, mk, return_lse
):
    cu_q, cu_k = _index.kernel_index(cu_q), _index.kernel_index(cu_k)
    args = (q, k, v, causal, scale, window_left, window_right, softcap)
    args += (cu_q, cu_k, mq, mk, return_lse)
    name = backend.select("attention", q.device, *args)
    out, lse = backend.implementation("attention", name)(*args)
    out = out.contiguous()  # the fake impl promises a contiguous output
    if lse is None:
        lse = torch.empty((0,), dtype=torch.float32, device=q.device)
    return out, lse


@torch.library.custom_op("fastllm::attention", mutates_args=())
def _attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    cu_seqlens_q: Optional[torch.Tensor],  # noqa: UP045
    cu_seqlens_k: Optional[torch.Tensor],  # noqa: UP045
    max_seqlen_q: int,
    max_seqlen_k: int,
    return_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _run_attention(
        q,
        k,
        v,
        causal,
        scale,
        window_left,
        window_right,
        softcap,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        return_lse,
    )


@_attention_op.register_fake
def _(q, k, v, causal, scale, wl, wr, softcap, cu_q, cu_k, mq, mk, return_lse):
    if not return_lse:
        lse_shape = (0,)
    elif cu_q is not None:
        lse_shape = (q.shape[1], q.shape[0])
    else:
        lse_shape = (q.shape[0], q.shape[2], q.shape[1])
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        lse_shape, dtype=torch.float32
    )


def _run_decode_attention(
    q, k_cache, v_cache, cache_seqlens, block_table, scale, causal, wl, wr, softcap, num_splits
):
    cache_seqlens, block_table = (
        _index.kernel_index(cache_seqlens),
        _index.kernel_index(block_table),
    )
    args = (q, k_cache, v_cache, cache_seqlens, block_table, scale, causal)
    args += (wl, wr, softcap, num_splits)
    name = backend.select("decode_attention", q.device, *args)
    return backend.implementation("decode_attention", name)(*args).contiguous()


@torch.library.custom_op("fastllm::decode_attention", mutates_args=())
def _decode_attention_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_table: Optional[torch.Tensor],  # noqa: UP045
    scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    num_splits: int,
) -> torch.Tensor:
    return _run_decode_attention(
        q,
        k_cache,
        v_cache,
        cache_seqlens,
        block_table,
        scale,
        causal,
        window_left,
        window_right,
        softcap,
        num_splits,
    )


@_decode_attention_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, block_table, scale, causal, wl, wr, softcap, ns):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def _run_kv_cache_append(k_new, v_new, k_cache, v_cache, positions, block_table):
    # positions keep int64 (flat slots of a large cache), read contiguous like the rest
    positions, block_table = positions.contiguous(), _index.kernel_index(block_table)
    args = (k_new, v_new, k_cache, v_cache, positions, block_table)
    name = backend.select("kv_cache_append", k_cache.device, *args)
    backend.implementation("kv_cache_append", name)(*args)


@torch.library.custom_op("fastllm::kv_cache_append", mutates_args=("k_cache", "v_cache"))
def _kv_cache_append_op(
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    positions: torch.Tensor,
    block_table: Optional[torch.Tensor],  # noqa: UP045
) -> None:
    _run_kv_cache_append(k_new, v_new, k_cache, v_cache, positions, block_table)


@_kv_cache_append_op.register_fake
def _(k_new, v_new, k_cache, v_cache, positions, block_table):
    return None


def _bump_versions(*tensors: torch.Tensor) -> None:
    """What the dispatcher does for an op that mutates its arguments (a direct call
    skips it): autograd learns that these tensors changed (kernels write through
    pointers, which it cannot see). Inference tensors have no version counter."""
    for t in tensors:
        if not t.is_inference():
            torch.autograd.graph.increment_version(t)


# --- validation helpers ----------------------------------------------------------------------


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _resolve_scale(scale, head_dim: int) -> float:
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not is_finite(scale):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    return float(scale)


def _resolve_window(window, causal: bool) -> tuple[int, int]:
    if window is None:
        left, right = -1, -1
    else:
        if not isinstance(window, (tuple, list)) or len(window) != 2:
            raise ValueError(f"window must be None or a pair (left, right), got {window!r}")
        sides = []
        for side, w in zip(("left", "right"), window):
            w = -1 if w is None else w
            if isinstance(w, bool) or not isinstance(w, int) or w < -1:
                raise ValueError(
                    f"window {side} bound must be an int >= 0, or -1/None for unbounded; "
                    f"got {w!r} in window={window!r}"
                )
            sides.append(w)
        left, right = sides
    if causal:
        if right > 0:
            raise ValueError(
                f"window={window!r} lets queries see {right} keys ahead, but causal=True "
                "sees none; pass window=(left, 0) or causal=False"
            )
        right = 0
    return left, right


def _resolve_softcap(softcap) -> float:
    if softcap is None:
        return 0.0
    if (
        isinstance(softcap, bool)
        or not isinstance(softcap, (int, float))
        or not is_finite(softcap)
        or softcap < 0
    ):
        raise ValueError(f"softcap must be a finite float > 0 (or None/0 for off), got {softcap!r}")
    return float(softcap)


def _check_qkv(q, k, v, *, packed: bool) -> None:
    dims = 3 if packed else 4
    layout = "(total_tokens, heads, head_dim)" if packed else "(batch, seqlen, heads, head_dim)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, dtypes=FLOAT_DTYPES)
        if t.dim() != dims:
            raise ValueError(f"{name} must be {layout}, got shape {tuple(t.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; expected one dtype")
    check_same_device(q=q, k=k, v=v)
    if v.shape != k.shape:
        raise ValueError(f"v has shape {tuple(v.shape)} but k has {tuple(k.shape)}; expected equal")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q has head_dim {q.shape[-1]} but k has {k.shape[-1]}; expected equal")
    if q.shape[-1] == 0:
        raise ValueError("q has head_dim 0; expected at least 1")
    if not packed and k.shape[0] != q.shape[0]:
        raise ValueError(f"k has batch {k.shape[0]} but q has {q.shape[0]}; expected equal")
    hq, hkv = q.shape[-2], k.shape[-2]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"q has {hq} heads and k has {hkv}; expected a number of q heads divisible by "
            "the number of k/v heads (GQA/MQA)"
        )


# --- public functions ----------------------------------------------------------------------------


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    return_lse: bool = False,
    validate: bool | None = None,
):
    """Fused scaled-dot-product attention (prefill): softmax(q kᵀ · scale) v per head.

    Args:
        q: (batch, seqlen_q, Hq, head_dim), fp32, fp16 or bf16. Any strides with a unit
            stride on head_dim (a transposed (batch, heads, seqlen, head_dim) tensor
            works without a copy; other layouts are copied).
        k, v: (batch, seqlen_k, Hkv, head_dim), q's dtype and device; Hq % Hkv == 0 (GQA,
            MQA: q head h reads kv head h // (Hq // Hkv)).
        causal: mask aligned to the bottom right. Query i sees keys j <= i + seqlen_k - seqlen_q,
            the rows of a prefill continuing a cached prefix. seqlen_q = 3, seqlen_k = 5:

                  k0 k1 k2 k3 k4
              q0   x  x  x  .  .
              q1   x  x  x  x  .
              q2   x  x  x  x  x

            With seqlen_q > seqlen_k the first rows see nothing: their output is 0.
        scale: multiplies q kᵀ; default head_dim ** -0.5.
        window: (left, right): query i (at key position p = i + seqlen_k - seqlen_q) sees keys
            p - left <= j <= p + right; -1 or None for an unbounded side. With causal, right
            must be 0 or unbounded.
        softcap: scores become softcap * tanh(scores / softcap) before the softmax (None: off).
        cu_seqlens_q, cu_seqlens_k: int32 or int64 (batch + 1,), any strides: prefix sums of
            the sequence lengths; q/k/v are then packed (total_tokens, heads, head_dim).
            Lengths 0 and 1 are allowed. Packed rows that no sequence covers (possible only
            with unchecked values) come back 0, lse -inf.
        max_seqlen_q, max_seqlen_k: the longest q/k sequence with varlen. When omitted they are
            read from cu_seqlens (a device sync); pass them to avoid it (CUDA graphs, compile).
        return_lse: also return the float32 log-sum-exp of each query row's scaled scores,
            (batch, Hq, seqlen_q), or (Hq, total_q) with varlen; -inf where a row sees no key.
        validate: the checks of cu_seqlens values (start at 0, monotone, end at the packed
            length, within max_seqlen). None: done when they cost no device sync (CPU tensors,
            or max_seqlen read from cu_seqlens anyway); True: always; False: never.

    Returns:
        out like q (contiguous), and lse when return_lse.

    Raises TypeError for wrong types and dtypes, ValueError for mismatched shapes, heads,
    devices, bad windows/softcap/scale and bad cu_seqlens. Backends: triton (fp16/bf16,
    head_dim a multiple of 8 in [16, 256]), torch (SDPA, else plain PyTorch), reference.

    FlashAttention (fastllm.flash_attn.flash_attn_func / flash_attn_varlen_func take its
    arguments and call this op): the same masks, but here causal=True with a window right
    bound > 0 raises (FlashAttention sets it to 0), the lse of a row that sees no key is
    -inf (FlashAttention: +inf), and checked cu_seqlens must end at the packed length
    (FlashAttention lets a padded batch stop short of it).
    """
    packed, scale, left, right, softcap, batch = _check_attention(
        q,
        k,
        v,
        causal,
        scale,
        window,
        softcap,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        return_lse,
    )
    q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
    if packed:
        synced = False
        if max_seqlen_q is None:
            max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max().item()) if batch else 0
            synced = True
        if max_seqlen_k is None:
            max_seqlen_k = int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max().item()) if batch else 0
            synced = True
        if _index.value_checks_wanted(True if synced else validate, cu_seqlens_q, cu_seqlens_k):
            _index.check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q)
            _index.check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k)
    else:
        max_seqlen_q, max_seqlen_k = q.shape[1], k.shape[1]

    args = (q, k, v, causal, scale, left, right, softcap, cu_seqlens_q, cu_seqlens_k)
    args += (max_seqlen_q, max_seqlen_k, return_lse)
    if direct(q, k, v, cu_seqlens_q, cu_seqlens_k):
        out, lse = _run_attention(*args)
    else:
        out, lse = _OPS.attention(*args)
    return (out, lse) if return_lse else out


@shape_checks
def _check_attention(
    q, k, v, causal, scale, window, softcap, cu_seqlens_q, cu_seqlens_k, max_q, max_k, return_lse
) -> tuple[bool, float, int, int, float, int | None]:
    """attention's checks of everything but index values -> (packed, scale, window_left,
    window_right, softcap, batch of a packed call or None)."""
    packed = cu_seqlens_q is not None or cu_seqlens_k is not None
    if packed and (cu_seqlens_q is None or cu_seqlens_k is None):
        raise ValueError(
            "cu_seqlens_q and cu_seqlens_k must be given together (varlen), or neither"
        )
    _check_qkv(q, k, v, packed=packed)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {return_lse!r}")
    scale = _resolve_scale(scale, q.shape[-1])
    left, right = _resolve_window(window, causal)
    softcap = _resolve_softcap(softcap)
    batch = None
    if packed:
        batch = _index.check_cu_seqlens_pair(cu_seqlens_q, cu_seqlens_k)
        check_same_device(q=q, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
        for name, val in (("max_seqlen_q", max_q), ("max_seqlen_k", max_k)):
            if val is not None and (isinstance(val, bool) or not isinstance(val, int) or val < 0):
                raise ValueError(f"{name} must be an int >= 0 or None, got {val!r}")
    return packed, scale, left, right, softcap, batch


def _check_cache(q, k_cache, v_cache, block_table) -> None:
    check_tensor("q", q, dtypes=FLOAT_DTYPES)
    if q.dim() != 4:
        raise ValueError(f"q must be (batch, q_len, Hq, head_dim), got shape {tuple(q.shape)}")
    layout = (
        "(num_blocks, block_size, Hkv, head_dim)"
        if block_table is not None
        else "(batch, max_seqlen, Hkv, head_dim)"
    )
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(name, t, dtypes=FLOAT_DTYPES)
        if t.dim() != 4:
            raise ValueError(f"{name} must be {layout}, got shape {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; expected one dtype")
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} has stride {t.stride()}; expected a unit stride on head_dim")
    if v_cache.shape != k_cache.shape:
        raise ValueError(
            f"v_cache has shape {tuple(v_cache.shape)} but k_cache has {tuple(k_cache.shape)}; "
            "expected equal"
        )
    if q.shape[-1] != k_cache.shape[-1]:
        raise ValueError(
            f"q has head_dim {q.shape[-1]} but k_cache has {k_cache.shape[-1]}; expected equal"
        )
    hq, hkv = q.shape[2], k_cache.shape[2]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"q has {hq} heads and k_cache has {hkv}; expected a number of q heads divisible "
            "by the number of k/v heads (GQA/MQA)"
        )
    batch = q.shape[0]
    if block_table is None:
        if k_cache.shape[0] != batch:
            raise ValueError(
                f"k_cache has batch {k_cache.shape[0]} but q has {batch}; expected equal "
                "(or pass block_table for a paged cache)"
            )
    else:
        _index.check_block_table("block_table", block_table, batch)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    block_table: torch.Tensor | None = None,
    scale: float | None = None,
    causal: bool = True,
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
    num_splits: int | None = None,
    validate: bool | None = None,
) -> torch.Tensor:
    """Attention of a few new query tokens against a KV cache (decoding).

    Args:
        q: (batch, q_len, Hq, head_dim): q_len = 1 for plain decoding, a few for speculative
            decoding; with causal, row t sees the cache up to its own token, position
            cache_seqlens[b] - q_len + t (the new tokens are already in the cache).
        k_cache, v_cache: contiguous (batch, max_seqlen, Hkv, head_dim), or paged
            (num_blocks, block_size, Hkv, head_dim) with block_table; q's dtype, unit stride
            on head_dim.
        cache_seqlens: int32 or int64 (batch,), any strides, or one int for every
            sequence: tokens in each sequence's cache, new ones included. Slots past it are
            never read (they may hold anything, NaN included).
        block_table: int32 or int64 (batch, max_blocks_per_seq), any strides: physical
            block of each sequence's logical block i (tokens i * block_size ...). Entries
            past a sequence's length are never read.
        scale, window, softcap: as in `attention`. causal: default True.
        num_splits: KV splits of the triton kernel (None: chosen from shapes: batch, heads
            and the cache capacity); ignored by the other backends.
        validate: the checks that read cache_seqlens and block_table values (0 <=
            cache_seqlens <= capacity, used block ids in [0, num_blocks)). None: only when
            the tensors are on the CPU (free); True: always (a device sync); False: never.

    Returns (batch, q_len, Hq, head_dim) in q's dtype. A row that sees no key gets 0.

    No host synchronisation and no allocation that depends on values on the triton path,
    so the call can be captured in a CUDA graph: the number of splits and the partial-
    result workspace depend on shapes only. Without the value checks (CUDA tensors and
    validate not True) a cache_seqlens above the capacity is clamped to it and block ids
    out of range are skipped: wrong numbers in those rows, never an out-of-bounds access.

    Not FlashAttention's meaning (fastllm.flash_attn.flash_attn_with_kvcache has that one,
    on this op): cache_seqlens here counts the cached tokens *after* the append, the new
    ones included (FlashAttention: before, and it appends k/v itself); causal defaults to
    True (FlashAttention: False); num_splits None chooses (FlashAttention: 0). For
    FlashAttention's cache_batch_idx, pass block_table=cache_batch_idx[:, None]: a
    contiguous cache is then num rows of one block each.
    """
    scale, left, right, softcap, num_splits, capacity, what = _check_decode(
        q, k_cache, v_cache, cache_seqlens, block_table, scale, causal, window, softcap, num_splits
    )
    if not isinstance(cache_seqlens, torch.Tensor):
        cache_seqlens = _index.seqlens_tensor("cache_seqlens", cache_seqlens, q.shape[0], q.device)
    q = _unit_stride(q)
    if _index.value_checks_wanted(validate, cache_seqlens, block_table):
        _index.check_range("cache_seqlens", cache_seqlens, 0, capacity, f"at most {what}")
        if block_table is not None:
            page = k_cache.shape[1]
            needed = (cache_seqlens.long() + page - 1) // page
            _index.check_block_ids(block_table, torch.zeros_like(needed), needed, k_cache.shape[0])
    args = (q, k_cache, v_cache, cache_seqlens, block_table, scale, causal, left, right)
    args += (softcap, num_splits)
    if direct(q, k_cache, v_cache, cache_seqlens, block_table):
        return _run_decode_attention(*args)
    return _OPS.decode_attention(*args)


@shape_checks
def _check_decode(
    q, k_cache, v_cache, cache_seqlens, block_table, scale, causal, window, softcap, num_splits
) -> tuple[float, int, int, float, int, int, str]:
    """decode_attention's checks of everything but index values -> (scale, window_left,
    window_right, softcap, num_splits, cache capacity, how the capacity is made)."""
    _check_cache(q, k_cache, v_cache, block_table)
    _index.check_seqlens("cache_seqlens", cache_seqlens, q.shape[0])
    if not isinstance(cache_seqlens, torch.Tensor):  # an int: made on q's device
        cache_seqlens = None
    check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens)
    if block_table is not None:
        check_same_device(q=q, block_table=block_table)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    scale = _resolve_scale(scale, q.shape[-1])
    left, right = _resolve_window(window, causal)
    softcap = _resolve_softcap(softcap)
    if num_splits is None:
        num_splits = 0
    elif isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits must be an int >= 1 or None, got {num_splits!r}")
    if block_table is None:
        capacity, what = k_cache.shape[1], f"the cache length {k_cache.shape[1]}"
    else:
        capacity = block_table.shape[1] * k_cache.shape[1]
        what = (
            f"the block table's capacity {block_table.shape[1]} blocks x "
            f"{k_cache.shape[1]} = {capacity}"
        )
    return scale, left, right, softcap, num_splits, capacity, what


def kv_cache_append(
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping_or_positions: torch.Tensor,
    *,
    block_table: torch.Tensor | None = None,
    validate: bool | None = None,
) -> None:
    """Writes new keys and values into a KV cache in place (before decode_attention).

    Two forms:
        positions: k_new, v_new (batch, n_new, Hkv, head_dim) and int (batch,) start positions:
            token t of sequence b goes to position positions[b] + t, i.e. row
            positions[b] + t of a contiguous cache (batch, max_seqlen, Hkv, head_dim), or,
            with block_table, slot (positions[b] + t) % block_size of block
            block_table[b, (positions[b] + t) // block_size] of a paged cache. Usually
            positions = cache_seqlens before the append.
        slot mapping: k_new, v_new (num_tokens, Hkv, head_dim) and int (num_tokens,) flat slots:
            token i goes to slot s = slot_mapping[i] of the cache viewed as
            (num_blocks * block_size, Hkv, head_dim) (block s // block_size, row s % block_size);
            s = -1 skips the token (padding). No block_table in this form.

    Positions/slots are int32 or int64 on the caches' device; the caches must have a unit
    stride on head_dim; k_new/v_new must have the caches' dtype.
    validate: check the target positions, slots and block ids (in range of the cache):
    None: when the index tensors are on the CPU (free); True: always (a device sync);
    False: never. Unchecked targets outside the cache are skipped, never written out of
    bounds.

    FlashAttention appends inside flash_attn_with_kvcache (fastllm.flash_attn does it with
    this op): its cache_seqlens are the positions here (the lengths before the append),
    and its cache_batch_idx is block_table=cache_batch_idx[:, None] on a contiguous cache.
    """
    positions = slot_mapping_or_positions
    slots, capacity, page = _check_append(k_new, v_new, k_cache, v_cache, positions, block_table)
    if _index.value_checks_wanted(validate, positions, block_table):
        _check_append_targets(k_new, k_cache, positions, block_table, slots, capacity, page)
    if k_new.numel() == 0:
        return
    args = (_unit_stride(k_new), _unit_stride(v_new), k_cache, v_cache, positions, block_table)
    if direct(*args):
        _run_kv_cache_append(*args)
        _bump_versions(k_cache, v_cache)
    else:
        _OPS.kv_cache_append(*args)


def _check_append_targets(k_new, k_cache, positions, block_table, slots, capacity, page) -> None:
    """kv_cache_append's value checks (rope_kv_append's too): targets inside the cache,
    block ids in range."""
    n = 1 if slots else k_new.shape[1]
    low = -1 if slots else 0
    # positions + n > capacity as positions > capacity - n: no int32 wrap-around
    i = _index.first_outside(positions, low, capacity - n) if k_new.shape[0] else None
    if i is not None:
        what = "slot" if slots else f"start position (+ {n} new tokens)"
        raise ValueError(
            f"slot_mapping_or_positions[{i}] = {int(positions[i])}: {what} outside the cache "
            f"of {capacity} slots; expected {low} <= value"
            + ("" if slots else f" and value + {n} <= {capacity}")
        )
    if block_table is not None and n:
        first = positions.long() // page
        last = (positions.long() + n - 1) // page + 1
        _index.check_block_ids(block_table, first, last, k_cache.shape[0])


@shape_checks
def _check_append(k_new, v_new, k_cache, v_cache, positions, block_table) -> tuple[bool, int, int]:
    """kv_cache_append's checks of everything but index values -> (slot mapping form,
    capacity in slots, block size)."""
    slots = isinstance(k_new, torch.Tensor) and k_new.dim() == 3
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(name, t, dtypes=FLOAT_DTYPES, dim=4)
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} has stride {t.stride()}; expected a unit stride on head_dim")
    if v_cache.shape != k_cache.shape:
        raise ValueError(
            f"v_cache has shape {tuple(v_cache.shape)} but k_cache has {tuple(k_cache.shape)}; "
            "expected equal"
        )
    if v_cache.dtype != k_cache.dtype:
        raise TypeError(f"v_cache has dtype {v_cache.dtype} but k_cache has {k_cache.dtype}")
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        check_tensor(name, t, dtypes=FLOAT_DTYPES)
        if t.dim() not in (3, 4):
            raise ValueError(
                f"{name} must be (batch, n_new, Hkv, head_dim) or (num_tokens, Hkv, head_dim), "
                f"got shape {tuple(t.shape)}"
            )
        if t.dtype != k_cache.dtype:
            raise TypeError(
                f"{name} has dtype {t.dtype} but the cache has {k_cache.dtype}; expected equal"
            )
        if t.shape[-2:] != k_cache.shape[-2:]:
            raise ValueError(
                f"{name} has (heads, head_dim) {tuple(t.shape[-2:])} but the cache has "
                f"{tuple(k_cache.shape[-2:])}; expected equal"
            )
    if v_new.shape != k_new.shape:
        raise ValueError(
            f"v_new has shape {tuple(v_new.shape)} but k_new has {tuple(k_new.shape)}; expected equal"
        )
    _index.check_index("slot_mapping_or_positions", positions, dim=1)
    check_same_device(
        k_cache=k_cache,
        v_cache=v_cache,
        k_new=k_new,
        v_new=v_new,
        slot_mapping_or_positions=positions,
    )
    page = k_cache.shape[1]
    if slots:
        if block_table is not None:
            raise ValueError(
                "block_table must be None with a slot mapping (3-d k_new): slots are physical "
                "already; pass 4-d k_new with start positions to go through a block table"
            )
        if positions.shape[0] != k_new.shape[0]:
            raise ValueError(
                f"slot_mapping has shape {tuple(positions.shape)}; expected ({k_new.shape[0]},), "
                "one slot per token of k_new"
            )
        capacity = k_cache.shape[0] * page
    else:
        batch = k_new.shape[0]
        if positions.shape[0] != batch:
            raise ValueError(
                f"positions has shape {tuple(positions.shape)}; expected (batch={batch},)"
            )
        if block_table is None:
            if k_cache.shape[0] != batch:
                raise ValueError(
                    f"k_cache has batch {k_cache.shape[0]} but k_new has {batch}; expected equal "
                    "(or pass block_table for a paged cache)"
                )
            capacity = page
        else:
            _index.check_block_table("block_table", block_table, batch)
            check_same_device(k_cache=k_cache, block_table=block_table)
            capacity = block_table.shape[1] * page
    return slots, capacity, page
