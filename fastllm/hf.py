"""Hugging Face transformers integration: fastllm attention through transformers' own
registries, with no patching of `modeling_*` modules or library globals.

    fastllm.hf.register()                       # once: AttentionInterface + AttentionMaskInterface
    model.set_attn_implementation("fastllm")    # per model (fastllm.optimize does both)

transformers asks the attention implementation's *mask interface* to build the mask
that every attention layer of a forward pass receives. An implementation registered
without one gets no mask at all, and a padded batch then gives silently wrong results.
fastllm registers both, under the name "fastllm":

- the mask function turns the 2-D padding mask (batch, kv_len) into segment lengths:
  per sequence b, its keys split into [pad before | valid | pad after] and its queries
  likewise, as int32 prefix sums of length 3·batch + 1 over the flattened padded batch.
  The padded batch is then one varlen call of `fastllm.ops.attention` (cu_seqlens_q/k),
  with no gather and no shape that depends on the data, so it compiles and captures.
  No padding gives no mask (plain batched call).
- the attention function calls `fastllm.ops.attention` for prefill and
  `fastllm.ops.decode_attention` for the one-token steps of `generate()` (up to
  DECODE_MAX_Q new tokens against a longer cache), padded batches included.

How a padded batch decodes: transformers' cache holds every sequence at the same
positions, pads included (left padding puts them before the tokens, right-padded
`generate()` leaves a hole between the prompt and the new tokens, a static cache has
empty slots after them), while decode_attention reads the first cache_seqlens[b] tokens
of sequence b. So the cache goes to decode_attention as a *paged* cache of one-token
blocks: a view of the same memory (`_token_pages`, no copy) in which block b·f + s is
token s of sequence b, and a block table per sequence (B, kv_len) that lists its valid
tokens first, in order. cache_seqlens counts them (up to the last query for causal
layers). The mask function builds the table once per forward pass; each layer only adds
its batch offsets. The compacted positions give the same causal mask when the new tokens
are each sequence's last valid tokens (always true for one new token; checked for more,
eagerly, and not used for more under torch.compile), and the same sliding window only
when the valid tokens are one run (left padding, a static cache), not with a hole.

Why segments are exact: a padding mask whose valid tokens form one run per sequence
(left or right padding, what tokenizers produce) keeps query i of a causal layer on
keys [start, i]; in the valid segment both sit at the same offset from `start`, so the
bottom-right aligned causal mask of the varlen call is the same mask. Bidirectional
layers put every query in the valid segment (all queries see the valid keys).
Outputs at padded query positions are unspecified (finite); models ignore them.

What is not served by fastllm and falls back to transformers' SDPA path, per call,
recorded in `module.fastllm_backend`: a 4-D mask given by the user, mask functions
other than causal / bidirectional / causal sliding-window (packed sequences, custom
overlays), padding masks with holes (checked in eager mode; under torch.compile the
mask is assumed to be one run per sequence) except in decode steps without a sliding
window, dropout > 0, position biases.

transformers is imported only when these functions are called: `import fastllm`
does not import it.
"""

from __future__ import annotations

import sys

import torch

NAME = "fastllm"
DECODE_MAX_Q = 16  # up to this many new tokens against a cache go to decode_attention

_registered = False


def transformers_loaded() -> bool:
    return "transformers" in sys.modules


def is_hf_model(model: torch.nn.Module) -> bool:
    """A transformers PreTrainedModel (checked without importing transformers)."""
    if not transformers_loaded():
        return False
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def register() -> None:
    """Registers "fastllm" in transformers' AttentionInterface and AttentionMaskInterface."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, attention_mask)
    _registered = True


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """None if fastllm attention can be switched on for this transformers model, else why not."""
    try:
        import fastllm.ops as ops
    except ImportError as e:  # pragma: no cover - fastllm.ops always imports
        return f"fastllm.ops is not importable ({e})"
    if not hasattr(ops, "attention") or not hasattr(ops, "decode_attention"):
        return "fastllm.ops.attention is not available in this build yet"
    if not type(model)._can_set_attn_implementation():
        return (
            f"{type(model).__name__} does not dispatch attention through transformers' "
            "AttentionInterface"
        )
    return None


def enable(model: torch.nn.Module) -> str:
    """Switches a transformers model to fastllm attention; returns the previous implementation."""
    register()
    previous = model.config._attn_implementation
    if previous != NAME:
        model.set_attn_implementation(NAME)
        if model.config._attn_implementation != NAME:
            raise ValueError(
                f"{type(model).__name__} refused attn_implementation={NAME!r} "
                f"(it kept {model.config._attn_implementation!r})"
            )
    return previous


def enabled(model: torch.nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == NAME


# --- the mask interface -------------------------------------------------------------------


class SegmentMask:
    """What fastllm's mask function hands to every attention layer of one forward pass.

    cu_seqlens_q / cu_seqlens_k: int32 (3·batch + 1,), prefix sums of the segment lengths
    [pad before, valid, pad after] of each sequence, over the flattened padded batch
    (batch·q_len queries, batch·kv_len keys); None when the padding has holes (segments
    cannot express it). `causal` comes from the mask function, `window_left` (or -1) from
    a causal sliding window. max_seqlen: the longest segment, for a packed batch
    (fastllm.unpad); None: q_len and kv_len.

    For a decode step (`decode_layout`): cache_seqlens int32 (batch,), the keys each
    sequence's queries see, and key_order int64 (batch, kv_len), the positions of each
    sequence's valid keys first, in order; both None when the step is not served by
    decode_attention. holes: the padding has a hole inside a sequence (eager mode only).
    `dense()` builds the boolean 4-D mask of transformers' SDPA path, for the calls that
    fall back to it (dropout, a position bias, holes in a layer that cannot decode).
    """

    # generate() with a compileable (static) cache builds each step's mask before the
    # forward pass and hands it to the model as its attention_mask; transformers reads its
    # ndim (2 would be a padding mask to convert) and passes it on to the mask function,
    # which returns it as it is (`attention_mask` below)
    ndim = 4

    def __init__(
        self,
        cu_seqlens_q,
        cu_seqlens_k,
        q_len,
        kv_len,
        causal,
        window_left,
        cache_seqlens=None,
        key_order=None,
        holes=False,
        dense=None,
        max_seqlen=None,
    ):
        self.cu_seqlens_q = cu_seqlens_q
        self.cu_seqlens_k = cu_seqlens_k
        self.q_len = q_len
        self.kv_len = kv_len
        self.causal = causal
        self.window_left = window_left
        self.cache_seqlens = cache_seqlens
        self.key_order = key_order
        self.holes = holes
        self.dense = dense
        self.max_seqlen = max_seqlen

    def __repr__(self) -> str:
        segments = None if self.cu_seqlens_q is None else self.cu_seqlens_q.numel() - 1
        return (
            f"SegmentMask(q_len={self.q_len}, kv_len={self.kv_len}, causal={self.causal}, "
            f"window_left={self.window_left}, segments={segments}, "
            f"decode={self.cache_seqlens is not None}, holes={self.holes})"
        )


def _mask_kind(mask_function, local_size, use_vmap) -> tuple[bool, int] | None:
    """(causal, window_left) for the mask functions fastllm serves, else None."""
    from transformers import masking_utils as mu

    if use_vmap:  # transformers sets it for custom or/and overlays
        return None
    if mask_function is mu.causal_mask_function:
        return True, -1
    if mask_function is mu.bidirectional_mask_function:
        return False, -1
    if local_size is not None and getattr(mask_function, "__closure__", None):
        # sliding_window_causal_mask_function(w) = and_masks(sliding_window_overlay(w), causal)
        cells = [c.cell_contents for c in mask_function.__closure__]
        parts = next((c for c in cells if isinstance(c, tuple)), ())
        names = sorted(getattr(p, "__qualname__", "") for p in parts)
        if names == ["causal_mask_function", "sliding_window_overlay.<locals>.inner_mask"]:
            return True, int(local_size) - 1
    return None


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def segment_lengths(padding: torch.Tensor, q_len: int, q_start, causal: bool):
    """Per sequence [before, valid, after] lengths of queries and keys, int64 (batch, 3).

    padding: bool (batch, kv_len), True for tokens to attend to. q_start: position of
    query 0 among the keys (kv_len - q_len without a static cache)."""
    kv_len = padding.shape[1]
    pos = torch.arange(kv_len, device=padding.device)
    any_valid = padding.any(dim=1)
    start = torch.where(padding, pos, kv_len).amin(dim=1)
    end = torch.where(padding, pos + 1, 0).amax(dim=1)
    start = torch.where(any_valid, start, 0)
    end = torch.where(any_valid, end, 0)
    k_lens = torch.stack([start, end - start, kv_len - end], dim=1)
    if causal:
        before = (start - q_start).clamp(0, q_len)
        valid = (end - q_start).clamp(0, q_len) - before
        q_lens = torch.stack([before, valid, q_len - before - valid], dim=1)
    else:
        zeros = torch.zeros_like(start)
        q_lens = torch.stack([zeros, torch.full_like(start, q_len), zeros], dim=1)
    return q_lens, k_lens, start, end


def decode_layout(
    padding: torch.Tensor, q_len: int, q_start, causal: bool, window_left: int, holes: bool
):
    """(cache_seqlens int32 (batch,), key_order int64 (batch, kv_len)) when this call is a
    decode step that decode_attention serves exactly with each sequence's valid keys moved
    to the front, else (None, None).

    padding: bool (batch, kv_len), True for tokens to attend to; q_start: position of
    query 0 among the keys. A causal query t sees the valid keys before position
    q_start + t + 1; decode_attention puts it at cache_seqlens - q_len + t among the
    compacted keys, the same keys when the valid queries are the last valid keys (one
    query: always; a query that is a pad has an unspecified output). A sliding window
    counts positions, which compacting keeps only for one run of valid keys."""
    batch, kv_len = padding.shape
    if q_len > DECODE_MAX_Q or kv_len <= q_len:
        return None, None
    if window_left >= 0 and (holes or not causal):
        return None, None
    pos = torch.arange(kv_len, device=padding.device)
    seen = padding
    if causal:
        seen = padding & (pos < q_start + q_len)
        if q_len > 1:
            if _compiling():  # the check reads the mask
                return None, None
            qpos = (q_start + torch.arange(q_len, device=padding.device)).clamp(0, kv_len - 1)
            q_valid = padding.gather(1, qpos.expand(batch, q_len)).to(torch.int8)
            # valid queries after a pad query would sit one place too early
            if bool((q_valid[:, 1:] < q_valid[:, :-1]).any()):
                return None, None
    # valid keys first, in position order, then the others (never read): a permutation
    n_valid = padding.sum(dim=1, keepdim=True)
    before = padding.cumsum(dim=1)
    dest = torch.where(padding, before - 1, n_valid + pos - before)
    key_order = torch.empty_like(dest).scatter_(1, dest, pos.expand(batch, kv_len))
    return seen.sum(dim=1, dtype=torch.int32), key_order


def _cu(lengths: torch.Tensor) -> torch.Tensor:
    flat = lengths.reshape(-1).cumsum(0)
    return torch.nn.functional.pad(flat, (1, 0)).to(torch.int32)


def attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    use_vmap: bool = False,
    device=None,
    **kwargs,
):
    """transformers' mask interface for "fastllm": None, a SegmentMask, or (for patterns
    fastllm does not serve) the boolean 4-D mask SDPA takes."""
    from transformers import masking_utils as mu

    if mask_function is None:
        mask_function = mu.causal_mask_function

    def sdpa_mask():  # what transformers' SDPA path would get: served there, per call
        return mu.sdpa_mask(
            batch_size=batch_size,
            q_length=q_length,
            kv_length=kv_length,
            q_offset=q_offset,
            kv_offset=kv_offset,
            mask_function=mask_function,
            attention_mask=attention_mask,
            local_size=local_size,
            allow_is_causal_skip=False,
            use_vmap=use_vmap,
            device=device,
        )

    kind = _mask_kind(mask_function, local_size, use_vmap)
    if isinstance(attention_mask, SegmentMask):  # prepared for this step (see ndim)
        got = (attention_mask.q_len, attention_mask.kv_len)
        got_kind = (attention_mask.causal, attention_mask.window_left)
        if got != (q_length, kv_length) or got_kind != kind:
            raise ValueError(
                f"attention_mask is a prepared {attention_mask!r}, but this layer asks for "
                f"q_len={q_length}, kv_len={kv_length} and (causal, window_left)={kind}; "
                "expected the mask prepared for this forward pass and this kind of layer"
            )
        return attention_mask
    if kind is None:
        return sdpa_mask()
    causal, window_left = kind
    q_start = q_offset - kv_offset
    if attention_mask is None:
        if not isinstance(q_start, torch.Tensor) and q_start + q_length >= kv_length:
            return None  # every key is a token: the plain batched call
        # a static cache (its q_offset is a tensor): the slots after the queries are empty
        where = device if device is not None else getattr(q_start, "device", None)
        pos = torch.arange(kv_length, device=where)
        padding = (pos < q_start + q_length).expand(batch_size, kv_length)
    else:
        padding = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset)
        padding = padding[:, kv_offset : kv_offset + kv_length].to(torch.bool)
    if not _compiling() and bool(padding.all()):
        return None  # one host sync per forward pass, as transformers' own SDPA mask does
    q_lens, k_lens, start, end = segment_lengths(padding, q_length, q_start, causal)
    # holes inside a sequence (right-padded generate(): prompt, pads, new tokens)
    holes = not _compiling() and not bool((padding.sum(dim=1) == end - start).all())
    seqlens, order = decode_layout(padding, q_length, q_start, causal, window_left, holes)
    if holes:
        if seqlens is None:  # segments cannot express it, and neither can decode
            return sdpa_mask()
        return SegmentMask(
            None, None, q_length, kv_length, causal, window_left, seqlens, order, True, sdpa_mask
        )
    return SegmentMask(
        _cu(q_lens), _cu(k_lens), q_length, kv_length, causal, window_left, seqlens, order,
        dense=sdpa_mask,
    )  # fmt: skip


# --- the attention function ---------------------------------------------------------------


def _record(module, name: str) -> None:
    if not _compiling():
        module.fastllm_backend = name


def _fallback(module, query, key, value, mask, dropout, scaling, why, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    _record(module, f"sdpa (fallback: {why})")
    return sdpa_attention_forward(
        module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs
    )


_INT32_MAX = 2**31 - 1


def _token_pages(k: torch.Tensor, v: torch.Tensor):
    """k, v (B, S, Hkv, D) as a paged cache of one-token blocks, without a copy:
    (k_pages, v_pages (num_blocks, 1, Hkv, D), f) where block b·f + s is token s of
    sequence b. The pages are a view of the same memory at k's strides (f = batch stride /
    token stride); blocks of different heads overlap in memory, which readers do not
    mind, and the view reaches no element outside k's own. None when the strides do not
    allow it (a batch stride that is not a multiple of the token stride, k and v laid out
    differently, block ids past int32)."""
    B, S, H, D = k.shape
    sb, ss, sh, sd = k.stride()
    if v.shape != k.shape or v.stride() != k.stride() or ss <= 0 or sb % ss != 0:
        return None
    f = sb // ss if B > 1 else S
    num_blocks = (B - 1) * f + S
    if num_blocks > _INT32_MAX:
        return None
    size, stride = (num_blocks, 1, H, D), (ss, ss, sh, sd)
    return k.as_strided(size, stride), v.as_strided(size, stride), f


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
):
    """transformers' attention interface for "fastllm".

    query: (B, Hq, Sq, D), key/value: (B, Hkv, Sk, D) (views of the projections or the
    cache). Returns ((B, Sq, Hq, D), None): fastllm computes no attention weights.
    """
    from fastllm import backend, ops

    if dropout > 0.0 or kwargs.get("position_bias") is not None:
        why = f"dropout {dropout}" if dropout > 0.0 else "position bias"
        if isinstance(attention_mask, SegmentMask):
            attention_mask = attention_mask.dense()
        return _fallback(
            module, query, key, value, attention_mask, dropout, scaling, why,
            is_causal=is_causal, **kwargs,
        )  # fmt: skip
    if isinstance(attention_mask, torch.Tensor):
        return _fallback(
            module, query, key, value, attention_mask, dropout, scaling,
            "explicit mask tensor", is_causal=is_causal, softcap=softcap, **kwargs,
        )  # fmt: skip

    B, Hq, Sq, D = query.shape
    Sk = key.shape[2]
    # [B, H, S, D] -> [B, S, H, D] views: fastllm takes any strides with unit stride on D
    q = query.transpose(1, 2)
    k = key.transpose(1, 2)
    v = value.transpose(1, 2)
    window_left = -1 if sliding_window is None else int(sliding_window) - 1
    cap = softcap if softcap else None

    if attention_mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        window = None if window_left < 0 else (window_left, 0 if causal else window_left)
        if Sq <= DECODE_MAX_Q and Sk > Sq:
            # one-token (or few-token) steps against the cache; every sequence uses all Sk keys
            seqlens = torch.full((B,), Sk, dtype=torch.int32, device=query.device)
            out = ops.decode_attention(
                q, k, v, seqlens, scale=scaling, causal=causal, window=window, softcap=cap
            )
            op = "decode_attention"
        else:
            out = ops.attention(q, k, v, causal=causal, scale=scaling, window=window, softcap=cap)
            op = "attention"
        if not _compiling():
            _record(module, f"{op}:{backend.last_backend(op)}")
        return out, None

    m: SegmentMask = attention_mask
    if m.q_len != Sq or m.kv_len != Sk:
        raise ValueError(
            f"fastllm attention mask was built for q_len {m.q_len}, kv_len {m.kv_len} but the "
            f"layer got query length {Sq} and key length {Sk}"
        )
    if m.window_left >= 0:
        window_left = m.window_left
    window = None if window_left < 0 else (window_left, 0 if m.causal else window_left)
    # a decode step: the cache as one-token pages, each sequence's valid tokens first
    pages = None
    if m.cache_seqlens is not None and (window_left < 0 or (m.causal and not m.holes)):
        pages = _token_pages(k, v)
    if pages is not None:
        k_pages, v_pages, f = pages
        table = m.key_order + torch.arange(B, device=q.device)[:, None] * f
        out = ops.decode_attention(
            q,
            k_pages,
            v_pages,
            m.cache_seqlens,
            block_table=table.to(torch.int32),
            scale=scaling,
            causal=m.causal,
            window=window,
            softcap=cap,
            validate=False,  # seqlens and block ids built in range above
        )
        if not _compiling():
            _record(module, f"decode_attention:{backend.last_backend('decode_attention')}")
        return out, None
    if m.cu_seqlens_q is None:  # holes, and this layer cannot take the decode path
        return _fallback(
            module, query, key, value, m.dense(), dropout, scaling,
            "padding with holes", is_causal=is_causal, softcap=softcap, **kwargs,
        )  # fmt: skip
    Hk = k.shape[2]
    out = ops.attention(
        q.reshape(B * Sq, Hq, D),
        k.reshape(B * Sk, Hk, D),
        v.reshape(B * Sk, Hk, v.shape[-1]),
        causal=m.causal,
        scale=scaling,
        window=window,
        softcap=cap,
        cu_seqlens_q=m.cu_seqlens_q,
        cu_seqlens_k=m.cu_seqlens_k,
        max_seqlen_q=m.max_seqlen or Sq,
        max_seqlen_k=m.max_seqlen or Sk,
    )
    if not _compiling():
        _record(module, f"attention:{backend.last_backend('attention')}")
    return out.view(B, Sq, Hq, value.shape[-1]), None


def attention_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of the attention layers that recorded a fastllm call."""
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "fastllm_backend")]


# FastllmConfig (transformers quantization config), built on first use: see fastllm.hf_quantizer
from fastllm.hf_quantizer import __getattr__  # noqa: E402, F401
