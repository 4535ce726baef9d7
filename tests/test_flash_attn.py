"""fastllm.flash_attn (FlashAttention's interface) on every backend against the reference.

The cases follow FlashAttention's own test matrix (tests/test_flash_attn.py in
flash-attention): causal and local windows, MHA/GQA/MQA, seqlen_q above and below
seqlen_k, varlen with empty sequences and padded batches, paged varlen, and the KV cache
with new k/v appended in place, cache_batch_idx, cache_leftpad, a paged block_table and
cache_seqlens as an int or an int32/int64 tensor. The expected cache after an append is
built here, element by element, from FlashAttention's rule: token t of sequence b goes to
position cache_seqlens[b] + t of its cache row (cache_batch_idx[b]) or through its block
table. On the CPU the Triton kernels run under the interpreter at tiny sizes.
"""

import contextlib
import inspect

import pytest
import torch
from conftest import DEVICE, HAS_GPU, available_backends, poison_empty, rel_err

from fastllm import backend, reference
from fastllm.flash_attn import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)
from fastllm.native.attention import HEAD_DIMS, MAX_Q_LEN

BACKENDS = available_backends("attention")
KERNELS = {"triton", "cuda"}  # fp16/bf16, head_dim a multiple of 8 in [16, 256]
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
INTERPRETED = not HAS_GPU


def _tiny(name) -> bool:
    return name in KERNELS and INTERPRETED


def _serves(name, head_dim, decode_rows=0) -> bool:
    """Whether backend `name` takes such calls when forced: the Triton kernels take head_dim
    a multiple of 8, the CUDA ones head_dim 64/128 and up to 16 decode rows."""
    if name == "cuda":
        return head_dim in HEAD_DIMS and decode_rows <= MAX_Q_LEN
    return name != "triton" or head_dim % 8 == 0


def _dtype(name, i):
    dtypes = [torch.float16, torch.bfloat16]
    if name not in KERNELS:
        dtypes = [torch.float32] + dtypes
    return dtypes[i % len(dtypes)]


def _rand(*shape, dtype):
    return torch.randn(*shape, device=DEVICE).to(dtype)


@contextlib.contextmanager
def _forced(name, monkeypatch):
    """Force `name` for every op that has it (the cpu backend has no kv_cache_append: that
    one runs on torch), and check afterwards that it served them."""
    real = backend.select

    def select(op, device, *args, **kwargs):
        with backend.use_backend(name if name in backend.backends_of(op) else "torch"):
            return real(op, device, *args, **kwargs)

    monkeypatch.setattr(backend, "select", select)
    with backend.trace() as calls:
        yield
    monkeypatch.setattr(backend, "select", real)
    assert calls, "no op was called"
    for op, chosen in calls:
        assert chosen == (name if name in backend.backends_of(op) else "torch"), (op, chosen)


def _fa_lse(lse):
    """The reference's lse (-inf for a row that sees no key) the FlashAttention way (+inf)."""
    return lse.masked_fill(torch.isneginf(lse), float("inf"))


def _check(out, ref, dtype, what=""):
    assert out.dtype == dtype, what
    err = rel_err(out, ref)
    assert err <= TOL[dtype], f"{what}: rel err {err:.3g} > {TOL[dtype]}"


def _check_lse(lse, ref_lse, what=""):
    assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape, what
    assert torch.equal(torch.isposinf(lse), torch.isposinf(ref_lse)), what
    fin = torch.isfinite(ref_lse)
    if fin.any():
        diff = (lse[fin].double() - ref_lse[fin]).abs().max().item()
        assert diff <= 1e-3 * max(1.0, ref_lse[fin].abs().max().item()), (
            f"{what}: lse off by {diff}"
        )


def _window_ref(window, causal):
    """FlashAttention's window in the reference's terms: negative is unbounded, causal
    makes the right side 0."""
    left, right = (-1, -1) if window is None else (max(int(w), -1) for w in window)
    return left, (0 if causal else right)


# --- the interface itself -----------------------------------------------------------------------

# flash-attn 2.8.4, flash_attn/flash_attn_interface.py: names, order and defaults
_PREFILL = [("dropout_p", 0.0), ("softmax_scale", None), ("causal", False),
            ("window_size", (-1, -1)), ("softcap", 0.0), ("alibi_slopes", None),
            ("deterministic", False), ("return_attn_probs", False)]  # fmt: skip
FA_SIGNATURES = {
    flash_attn_func: [("q",), ("k",), ("v",)] + _PREFILL,
    flash_attn_qkvpacked_func: [("qkv",)] + _PREFILL,
    flash_attn_kvpacked_func: [("q",), ("kv",)] + _PREFILL,
    flash_attn_varlen_func: [("q",), ("k",), ("v",), ("cu_seqlens_q",), ("cu_seqlens_k",),
                             ("max_seqlen_q",), ("max_seqlen_k",)] + _PREFILL
                            + [("block_table", None)],
    flash_attn_varlen_qkvpacked_func: [("qkv",), ("cu_seqlens",), ("max_seqlen",)] + _PREFILL,
    flash_attn_varlen_kvpacked_func: [("q",), ("kv",), ("cu_seqlens_q",), ("cu_seqlens_k",),
                                      ("max_seqlen_q",), ("max_seqlen_k",)] + _PREFILL,
    flash_attn_with_kvcache: [
        ("q",), ("k_cache",), ("v_cache",), ("k", None), ("v", None), ("rotary_cos", None),
        ("rotary_sin", None), ("cache_seqlens", None), ("cache_batch_idx", None),
        ("cache_leftpad", None), ("block_table", None), ("softmax_scale", None),
        ("causal", False), ("window_size", (-1, -1)), ("softcap", 0.0),
        ("rotary_interleaved", True), ("alibi_slopes", None), ("num_splits", 0),
        ("return_softmax_lse", False),
    ],
}  # fmt: skip


@pytest.mark.parametrize("fn", list(FA_SIGNATURES), ids=lambda f: f.__name__)
def test_signature_is_flash_attentions(fn):
    params = list(inspect.signature(fn).parameters.values())
    expected = FA_SIGNATURES[fn]
    assert [p.name for p in params] == [e[0] for e in expected]
    for p, e in zip(params, expected):
        assert p.kind == p.POSITIONAL_OR_KEYWORD, p.name
        assert p.default == (e[1] if len(e) > 1 else p.empty), p.name


# --- flash_attn_func --------------------------------------------------------------------------

# (batch, seqlen_q, seqlen_k, Hq, Hkv, head_dim, causal, window_size, softcap)
FUNC_TINY = [
    (2, 7, 7, 4, 4, 16, False, (-1, -1), 0.0),  # MHA
    (1, 9, 17, 6, 1, 24, True, (-1, -1), 0.0),  # MQA, seqlen_q < seqlen_k: bottom right
    (2, 13, 5, 6, 2, 40, True, (-1, -1), 0.0),  # GQA, seqlen_q > seqlen_k: rows see nothing
    (1, 11, 19, 4, 2, 16, False, (3, 2), 0.0),  # local
    (1, 16, 16, 4, 2, 32, True, (4, 7), 50.0),  # causal local: right ignored; softcap
    (1, 1, 23, 2, 1, 16, True, (-1, -1), 0.0),  # one query
    (2, 9, 12, 4, 2, 16, False, (-1, 0), 0.0),  # right 0 only: causal by window
]
FUNC_FULL = FUNC_TINY + [
    (2, 97, 97, 6, 6, 59, True, (-1, -1), 0.0),  # head_dim 59 (not on the kernels)
    (2, 113, 203, 6, 3, 64, True, (-1, -1), 0.0),
    (1, 200, 128, 9, 3, 80, False, (37, 11), 0.0),
    (2, 128, 128, 8, 1, 128, True, (64, -1), 0.0),
    (1, 257, 257, 4, 2, 256, False, (-1, -1), 50.0),
]  # fmt: skip


@pytest.mark.parametrize("name", BACKENDS)
def test_func_matches_reference(name, monkeypatch):
    poison_empty(monkeypatch)
    cases = FUNC_TINY if _tiny(name) else FUNC_FULL
    for i, (b, sq, sk, hq, hkv, d, causal, window, softcap) in enumerate(cases):
        if not _serves(name, d):
            continue
        dtype = _dtype(name, i)
        q, k, v = _rand(b, sq, hq, d, dtype=dtype), _rand(b, sk, hkv, d, dtype=dtype), None
        v = _rand(b, sk, hkv, d, dtype=dtype)
        with _forced(name, monkeypatch):
            out, lse, s_dmask = flash_attn_func(
                q, k, v, causal=causal, window_size=window, softcap=softcap,
                return_attn_probs=True,
            )  # fmt: skip
            out2 = flash_attn_func(q, k, v, 0.0, None, causal, window, softcap)
        left, right = _window_ref(window, causal)
        ref, ref_lse = reference.attention(
            q.double(), k.double(), v.double(), causal=causal, window_left=left,
            window_right=right, softcap=softcap, return_lse=True,
        )  # fmt: skip
        what = f"{name} case {i} {dtype}"
        assert out.shape == q.shape and s_dmask.numel() == 0
        _check(out, ref, dtype, what)
        _check(out2, ref, dtype, what + " (no lse)")
        _check_lse(lse, _fa_lse(ref_lse), what)


@pytest.mark.parametrize("name", BACKENDS)
def test_packed_forms(name, monkeypatch):
    dtype = torch.float16
    qkv = _rand(2, 9, 3, 4, 64, dtype=dtype)
    q, k, v = qkv.unbind(2)
    with _forced(name, monkeypatch):
        ref = flash_attn_func(q, k, v, causal=True)
        torch.testing.assert_close(flash_attn_qkvpacked_func(qkv, causal=True), ref)
        torch.testing.assert_close(
            flash_attn_kvpacked_func(q, torch.stack([k, v], 2), causal=True), ref
        )
        cu = torch.tensor([0, 9, 18], dtype=torch.int32, device=DEVICE)
        packed = qkv.flatten(0, 1)
        out = flash_attn_varlen_qkvpacked_func(packed, cu, 9, causal=True)
        torch.testing.assert_close(out, ref.flatten(0, 1))
        out = flash_attn_varlen_kvpacked_func(
            packed[:, 0], packed[:, 1:], cu, cu, 9, 9, causal=True
        )
        torch.testing.assert_close(out, ref.flatten(0, 1))


def test_flash_attention_argument_meanings():
    q, k, v = (torch.randn(2, 6, 4, 16, device=DEVICE) for _ in range(3))
    plain = reference.attention(q, k, v)
    torch.testing.assert_close(flash_attn_func(q, k, v), plain)  # causal defaults to False
    causal = reference.attention(q, k, v, causal=True, window_left=2)
    # causal makes the window's right side 0; any negative side is unbounded; FlashAttention's
    # tests pass window_size as a tensor of two ints
    for window in ((2, 5), (2, -1), (2, 0), torch.tensor([2, 3])):
        torch.testing.assert_close(
            flash_attn_func(q, k, v, causal=True, window_size=window), causal
        )
    torch.testing.assert_close(flash_attn_func(q, k, v, window_size=(-7, -2)), plain)
    torch.testing.assert_close(flash_attn_func(q, k, v, softcap=-3.0), plain)  # <= 0 is off
    scaled = reference.attention(q, k, v, scale=0.1)
    torch.testing.assert_close(flash_attn_func(q, k, v, softmax_scale=0.1), scaled)
    torch.testing.assert_close(flash_attn_func(q, k, v, deterministic=True), plain)


def test_backward_is_refused_at_the_call_not_later():
    q = torch.randn(1, 4, 2, 16, device=DEVICE, requires_grad=True)
    k = torch.randn(1, 4, 2, 16, device=DEVICE)
    with pytest.raises(NotImplementedError, match="q requires grad.*no backward"):
        flash_attn_func(q, k, k)
    with torch.no_grad():
        flash_attn_func(q, k, k)
    with torch.inference_mode():
        flash_attn_func(q, k, k)
    flash_attn_func(q.detach(), k, k)


# --- flash_attn_varlen_func -------------------------------------------------------------------

# (lengths_q, lengths_k, padding rows after the last q / k sequence)
VARLEN_TINY = [
    ([0, 5, 3], [4, 0, 6], 0, 0),  # empty q and empty k sequences
    ([7, 1, 0, 12], [7, 3, 0, 20], 3, 2),  # a padded batch: cu_seqlens[-1] < packed length
    ([1], [1], 0, 0),
    ([4, 9], [9, 4], 2, 0),
]


def _varlen_full():
    lq = torch.randint(0, 40, (13,)).tolist()
    lk = [n + int(torch.randint(0, 30, ())) for n in lq]
    lk[3] = 0
    return VARLEN_TINY + [(lq, lk, 5, 7), ([1, 257, 30], [128, 257, 300], 0, 0)]


def _cu(lengths, dtype=torch.int32):
    return torch.tensor([0] + lengths, device=DEVICE).cumsum(0).to(dtype)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize(
    "causal, window, hq, hkv",
    [(False, (-1, -1), 4, 4), (True, (-1, -1), 4, 1), (False, (3, 2), 6, 2), (True, (5, -1), 4, 2)],
)
def test_varlen_matches_reference(name, causal, window, hq, hkv, monkeypatch):
    cases = VARLEN_TINY if _tiny(name) else _varlen_full()
    for i, (lq, lk, pad_q, pad_k) in enumerate(cases):
        dtype = _dtype(name, i)
        cu_dtype = torch.int64 if i % 2 else torch.int32
        cu_q, cu_k = _cu(lq, cu_dtype), _cu(lk, cu_dtype)
        q = _rand(sum(lq) + pad_q, hq, 64, dtype=dtype)
        k, v = (
            _rand(sum(lk) + pad_k, hkv, 64, dtype=dtype),
            _rand(sum(lk) + pad_k, hkv, 64, dtype=dtype),
        )
        poison_empty(monkeypatch)
        with _forced(name, monkeypatch):
            out, lse, _ = flash_attn_varlen_func(
                q, k, v, cu_q, cu_k, max(lq), max(lk), causal=causal, window_size=window,
                return_attn_probs=True,
            )  # fmt: skip
        monkeypatch.undo()
        left, right = _window_ref(window, causal)
        nq, nk = sum(lq), sum(lk)
        ref, ref_lse = reference.attention(
            q[:nq].double(), k[:nk].double(), v[:nk].double(), causal=causal, window_left=left,
            window_right=right, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True,
        )  # fmt: skip
        what = f"{name} {lq} {lk} {dtype}"
        assert out.shape == q.shape and lse.shape == (hq, q.shape[0])
        _check(out[:nq], ref, dtype, what)
        _check_lse(lse[:, :nq], _fa_lse(ref_lse), what)
        # rows of a padded batch past cu_seqlens_q[-1] belong to no sequence: 0, lse +inf
        assert (out[nq:] == 0).all() and torch.isposinf(lse[:, nq:]).all(), what


def _paged(k_full, v_full, block_size, extra_blocks=3):
    """k_full, v_full (B, S, H, D) scattered into shuffled blocks (NaN elsewhere): the
    paged caches and their block table."""
    batch, s, h, d = k_full.shape
    per_seq = -(-s // block_size)
    num_blocks = batch * per_seq + extra_blocks
    table = torch.randperm(num_blocks, device=DEVICE)[: batch * per_seq].view(batch, per_seq)
    kc = torch.full((num_blocks, block_size, h, d), float("nan"), device=DEVICE).to(k_full.dtype)
    vc = kc.clone()
    for b in range(batch):
        for i in range(per_seq):
            rows = slice(i * block_size, min((i + 1) * block_size, s))
            n = rows.stop - rows.start
            kc[table[b, i], :n], vc[table[b, i], :n] = k_full[b, rows], v_full[b, rows]
    return kc, vc, table.int()


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("block_size", [8, 16])
def test_varlen_paged_kv(name, block_size, monkeypatch):
    # FlashAttention's test_flash_attn_varlen_causal with paged_kv_block_size (it needs
    # multiples of 256; any size here)
    for i, (lq, lk) in enumerate([([3, 0, 5], [9, 4, 0]), ([1, 6], [21, 6])]):
        dtype = _dtype(name, i)
        s = max(lk) + 3
        k_full, v_full = (
            _rand(len(lk), s, 2, 64, dtype=dtype),
            _rand(len(lk), s, 2, 64, dtype=dtype),
        )
        for b, n in enumerate(lk):  # past each sequence's length: NaN, never read
            k_full[b, n:], v_full[b, n:] = float("nan"), float("nan")
        kc, vc, bt = _paged(k_full, v_full, block_size)
        q = _rand(sum(lq) + 2, 4, 64, dtype=dtype)
        cu_q, cu_k = _cu(lq), _cu(lk)
        with _forced(name, monkeypatch):
            out, lse, _ = flash_attn_varlen_func(
                q, kc, vc, cu_q, cu_k, max(lq), max(lk), causal=True, block_table=bt,
                return_attn_probs=True,
            )  # fmt: skip
            out2 = flash_attn_varlen_func(q, kc, vc, cu_q, cu_k, max(lq), max(lk), causal=True,
                                          block_table=bt)  # fmt: skip
        k = torch.cat([k_full[b, :n] for b, n in enumerate(lk)])
        v = torch.cat([v_full[b, :n] for b, n in enumerate(lk)])
        nq = sum(lq)
        ref, ref_lse = reference.attention(
            q[:nq].double(), k.double(), v.double(), causal=True, cu_seqlens_q=cu_q,
            cu_seqlens_k=cu_k, return_lse=True,
        )  # fmt: skip
        _check(out[:nq], ref, dtype, f"{lq} {lk}")
        _check(out2[:nq], ref, dtype, f"{lq} {lk} (no lse)")
        _check_lse(lse[:, :nq], _fa_lse(ref_lse), f"{lq} {lk}")
        assert (out[nq:] == 0).all()


# --- flash_attn_with_kvcache -------------------------------------------------------------------

# (batch, seqlen_q, seqlen_new (None: no k/v), Hq, Hkv, head_dim, seqlen_cache,
#  block_size (None: contiguous), rows ("same", "extra": more cache rows than batch,
#  "idx": cache_batch_idx), leftpad, causal, window_size, softcap, cache_seqlens as
#  ("int32", "int64", "int", "none"), return_softmax_lse)
KV_TINY = [
    (2, 1, 1, 4, 4, 16, 24, None, "same", False, False, (-1, -1), 0.0, "int32", False),
    (3, 4, 4, 4, 1, 16, 30, None, "idx", False, True, (-1, -1), 0.0, "int64", True),
    (2, 3, 2, 6, 2, 32, 40, 16, "same", False, True, (5, 3), 30.0, "int32", False),
    (2, 4, None, 4, 2, 16, 33, 8, "same", False, True, (-1, -1), 0.0, "int", True),
    (3, 2, 2, 4, 2, 16, 25, None, "extra", True, True, (4, -1), 0.0, "int32", False),
    (2, 3, 3, 4, 2, 16, 20, None, "idx", True, False, (-1, -1), 0.0, "int64", True),
    (2, 2, None, 2, 2, 16, 17, None, "same", False, True, (-1, -1), 0.0, "none", False),
    (2, 5, None, 4, 2, 16, 24, 8, "same", False, False, (2, 2), 0.0, "none", True),
    (2, 4, 1, 4, 2, 16, 20, 16, "same", False, True, (-1, -1), 0.0, "int64", True),
    (2, 2, None, 4, 1, 16, 19, None, "idx", True, True, (3, -1), 0.0, "none", False),
]  # fmt: skip
KV_FULL = KV_TINY + [
    (2, 1, 1, 32, 8, 128, 300, None, "idx", False, True, (-1, -1), 0.0, "int32", False),
    (2, 16, 16, 8, 2, 64, 257, 16, "same", False, True, (-1, -1), 0.0, "int64", True),
    (1, 64, None, 6, 3, 80, 200, 32, "same", False, True, (50, 0), 0.0, "int32", False),
    (3, 3, 2, 6, 6, 96, 128, None, "extra", True, False, (40, 40), 0.0, "int64", True),
    (3, 2, 2, 8, 2, 64, 100, None, "idx", True, True, (20, -1), 0.0, "int64", False),
    (2, 4, 4, 8, 8, 128, 96, 16, "same", False, False, (-1, -1), 0.0, "int", True),
    (2, 5, None, 4, 1, 64, 64, 16, "same", False, True, (7, -1), 10.0, "none", False),
    (2, 3, 3, 6, 3, 64, 1024, 256, "same", False, True, (-1, -1), 0.0, "int32", False),
]  # fmt: skip


def _kv_case(case, dtype):
    """Inputs of one case and the expected cache after the call, built element by element."""
    batch, sq, s_new, hq, hkv, d, s, bs, rows, leftpad, causal, window, softcap, kind, lse = case
    n_new = s_new or 0
    lengths = torch.randint(0, s - n_new + 1, (batch,))
    lengths[0], lengths[-1] = 0 if n_new else 1, s - n_new  # the extremes
    if kind == "none":  # the whole cache: a paged one fills its last block
        assert bs is None or s % bs == 0
        lengths[:] = s
    elif kind == "int":
        lengths[:] = int(lengths[-1])
    pad = torch.zeros(batch, dtype=torch.long)
    if leftpad:
        pad = (torch.rand(batch) * (lengths + 1)).long().clamp(max=lengths)
    cache_rows = {"same": batch, "extra": batch + 2, "idx": 2 * batch}[rows]
    idx = torch.randperm(cache_rows)[:batch] if rows == "idx" else torch.arange(batch)
    # each sequence's logical cache: keys before leftpad and from its length on are NaN
    # (never read); the new tokens then overwrite positions lengths[b] ...
    k_log = _rand(batch, s, hkv, d, dtype=dtype)
    v_log = _rand(batch, s, hkv, d, dtype=dtype)
    pos = torch.arange(s)
    outside = (pos[None] < pad[:, None]) | (pos[None] >= lengths[:, None])
    k_log[outside.to(DEVICE)], v_log[outside.to(DEVICE)] = float("nan"), float("nan")
    if bs is None:
        kc = torch.full((cache_rows, s, hkv, d), float("nan"), device=DEVICE).to(dtype)
        vc = kc.clone()
        kc[idx.to(DEVICE)], vc[idx.to(DEVICE)] = k_log, v_log
        table = None
    else:
        kc, vc, table = _paged(k_log, v_log, bs)
    q = _rand(batch, sq, hq, d, dtype=dtype)
    k = _rand(batch, n_new, hkv, d, dtype=dtype) if s_new else None
    v = _rand(batch, n_new, hkv, d, dtype=dtype) if s_new else None
    # FlashAttention's rule for the append, written out
    k_exp, v_exp = kc.clone(), vc.clone()
    for b in range(batch):
        for t in range(n_new):
            p = int(lengths[b]) + t
            if table is None:
                blk, slot = int(idx[b]), p
            else:
                blk, slot = int(table[b, p // bs]), p % bs
            k_exp[blk, slot], v_exp[blk, slot] = k[b, t], v[b, t]
    if kind in ("int32", "int64"):
        seqlens = lengths.to(getattr(torch, kind)).to(DEVICE)
    else:
        seqlens = int(lengths[0]) if kind == "int" else None
    kwargs = dict(
        k=k, v=v, cache_seqlens=seqlens, causal=causal, window_size=window, softcap=softcap,
        cache_batch_idx=idx.int().to(DEVICE) if rows == "idx" else None,
        cache_leftpad=pad.int().to(DEVICE) if leftpad else None, block_table=table,
        return_softmax_lse=lse,
    )  # fmt: skip
    return q, kc, vc, kwargs, (k_exp, v_exp, idx, lengths + n_new, pad)


def _kv_reference(q, expected, table, block_size, kwargs):
    """Per sequence: the reference over keys leftpad[b] .. lengths[b] of the expected cache."""
    k_exp, v_exp, idx, total, pad = expected
    causal = kwargs["causal"]
    left, right = _window_ref(kwargs["window_size"], causal)
    outs, lses = [], []
    for b in range(q.shape[0]):
        p = torch.arange(int(pad[b]), int(total[b]))
        if table is None:
            kb, vb = k_exp[int(idx[b]), p], v_exp[int(idx[b]), p]
        else:
            blk = table[b].long().cpu()[p // block_size]
            kb, vb = k_exp[blk, p % block_size], v_exp[blk, p % block_size]
        o, lse = reference.attention(
            q[b : b + 1].double(), kb[None].double(), vb[None].double(), causal=causal,
            window_left=left, window_right=right, softcap=kwargs["softcap"], return_lse=True,
        )  # fmt: skip
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), _fa_lse(torch.cat(lses))


@pytest.mark.parametrize("name", available_backends("decode_attention"))
def test_kvcache_matches_reference(name, monkeypatch):
    cases = KV_TINY if _tiny(name) else KV_FULL
    for i, case in enumerate(cases):
        lse = case[-1]
        if not _serves(name, case[5], decode_rows=0 if lse else case[1]):
            continue
        dtype = _dtype(name, i)
        q, kc, vc, kwargs, expected = _kv_case(case, dtype)
        poison_empty(monkeypatch)
        with _forced(name, monkeypatch):
            res = flash_attn_with_kvcache(q, kc, vc, num_splits=i % 3, **kwargs)
        monkeypatch.undo()
        what = f"{name} kvcache case {i} {dtype}"
        # the cache: the new tokens where FlashAttention puts them, nothing else changed
        torch.testing.assert_close(kc, expected[0], rtol=0, atol=0, equal_nan=True, msg=what)
        torch.testing.assert_close(vc, expected[1], rtol=0, atol=0, equal_nan=True, msg=what)
        ref, ref_lse = _kv_reference(q, expected, kwargs["block_table"], kc.shape[1], kwargs)
        out = res[0] if kwargs["return_softmax_lse"] else res
        assert out.shape == q.shape, what
        _check(out, ref, dtype, what)
        if kwargs["return_softmax_lse"]:
            _check_lse(res[1], ref_lse, what)


@pytest.mark.parametrize("name", available_backends("decode_attention"))
def test_kvcache_decode_loop(name, monkeypatch):
    # a server's loop: prefill into the cache, then one token at a time; each step's output
    # equals the causal prefill over all tokens so far (fastllm's attention, reference)
    dtype = torch.float16
    batch, steps, s = 2, 3, 16
    kc = torch.zeros(batch + 1, s, 2, 64, dtype=dtype, device=DEVICE)
    vc = torch.zeros_like(kc)
    idx = torch.tensor([2, 0], dtype=torch.int32, device=DEVICE)
    q_all, k_all, v_all = (_rand(batch, 5 + steps, h, 64, dtype=dtype) for h in (4, 2, 2))
    with _forced(name, monkeypatch):
        flash_attn_with_kvcache(q_all[:, :5], kc, vc, k_all[:, :5], v_all[:, :5],
                                cache_seqlens=0, cache_batch_idx=idx, causal=True)  # fmt: skip
        for t in range(5, 5 + steps):
            out = flash_attn_with_kvcache(
                q_all[:, t : t + 1], kc, vc, k_all[:, t : t + 1], v_all[:, t : t + 1],
                cache_seqlens=torch.full((batch,), t, dtype=torch.int64, device=DEVICE),
                cache_batch_idx=idx, causal=True,
            )  # fmt: skip
            ref = reference.attention(
                q_all[:, : t + 1].double(), k_all[:, : t + 1].double(),
                v_all[:, : t + 1].double(), causal=True,
            )[:, t : t + 1]  # fmt: skip
            _check(out, ref, dtype, f"step {t}")
    assert torch.equal(kc[2, :8], k_all[0]) and torch.equal(vc[0, :8], v_all[1])
    assert (kc[1] == 0).all()  # the row no sequence uses


def test_kvcache_compiles_without_graph_breaks():
    # the decode path reads no index value on the host: torch.compile(fullgraph=True)
    def step(q, kc, vc, k, v, lens):
        return flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, causal=True)

    q, k = torch.randn(2, 1, 4, 16, device=DEVICE), torch.randn(2, 1, 2, 16, device=DEVICE)
    lens = torch.tensor([3, 7], dtype=torch.int32, device=DEVICE)
    kc = torch.randn(2, 12, 2, 16, device=DEVICE)
    caches = [(kc.clone(), kc.clone()), (kc.clone(), kc.clone())]
    eager = step(q, *caches[0], k, k, lens)
    compiled = torch.compile(step, fullgraph=True, backend="eager")(q, *caches[1], k, k, lens)
    torch.testing.assert_close(eager, compiled)
    torch.testing.assert_close(caches[0][0], caches[1][0])


# --- bad input ----------------------------------------------------------------------------------


def _t(*shape, dtype=torch.float16):
    return torch.zeros(*shape, dtype=dtype, device=DEVICE)


def _i(*vals):
    return torch.tensor(vals, dtype=torch.int32, device=DEVICE)


F, VL, KV = flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
Q, KC, NEW = _t(2, 1, 4, 16), _t(4, 8, 2, 16), _t(2, 1, 2, 16)
BAD = [
    (lambda: F(Q, NEW, NEW, dropout_p=0.1), NotImplementedError, ["dropout_p = 0.1"]),
    (lambda: F(Q, NEW, NEW, alibi_slopes=torch.zeros(4)), NotImplementedError, ["alibi_slopes"]),
    (lambda: VL(Q[:, 0], NEW[:, 0], NEW[:, 0], _i(0, 1, 2), _i(0, 1, 2), 1, 1, 0.5), NotImplementedError, ["dropout_p"]),
    (lambda: KV(Q, KC, KC, NEW, NEW, rotary_cos=_t(8, 8), rotary_sin=_t(8, 8), cache_seqlens=1), NotImplementedError, ["rotary"]),
    (lambda: KV(Q, KC, KC, alibi_slopes=torch.zeros(4)), NotImplementedError, ["alibi_slopes"]),
    (lambda: KV(Q, KC, KC, NEW, None, cache_seqlens=1), ValueError, ["k and v", "v=None"]),
    (lambda: KV(Q, KC, KC, None, NEW, cache_seqlens=1), ValueError, ["k and v", "k=None"]),
    (lambda: KV(Q, KC, KC, NEW, NEW), ValueError, ["cache_seqlens is required"]),
    (lambda: KV(Q, KC, KC, NEW, NEW, cache_seqlens=_i(2, 8)), ValueError, ["cache_seqlens[1] = 8", "1 new tokens"]),
    (lambda: KV(Q, KC, KC, cache_seqlens=_i(2, -1)), ValueError, ["cache_seqlens[1] = -1"]),
    (lambda: KV(Q, KC, KC, cache_seqlens=1, cache_batch_idx=_i(0, 4)), ValueError, ["cache_batch_idx[1] = 4", "4 rows"]),
    (lambda: KV(Q, KC, KC, cache_seqlens=1, cache_batch_idx=_i(0)), ValueError, ["cache_batch_idx", "batch=2"]),
    (lambda: KV(Q, KC, KC, cache_seqlens=_i(2, 3), cache_leftpad=_i(0, 4)), ValueError, ["cache_leftpad[1] = 4"]),
    (lambda: KV(Q, KC, KC, cache_seqlens=1, block_table=_i(0, 1).view(2, 1), cache_batch_idx=_i(0, 1)), ValueError, ["cache_batch_idx", "paged"]),
    (lambda: KV(Q, KC, KC, cache_seqlens=1, block_table=_i(0, 1).view(2, 1), cache_leftpad=_i(0, 0)), ValueError, ["cache_leftpad", "paged"]),
    (lambda: KV(Q, KC, KC, cache_seqlens=_i(1, 9), block_table=_i(0, 1).view(2, 1)), ValueError, ["cache_seqlens[1] = 9", "8 slots"]),
    (lambda: KV(Q, KC, KC, cache_seqlens=_i(1, 3), block_table=_i(0, 4).view(2, 1)), ValueError, ["block_table[1, 0] = 4"]),
    (lambda: KV(Q, _t(1, 8, 2, 16), _t(1, 8, 2, 16), cache_seqlens=1), ValueError, ["1 rows", "batch 2"]),
    (lambda: KV(_t(2, 1, 3, 16), KC, KC, cache_seqlens=1), ValueError, ["3 heads", "2"]),
    (lambda: KV(Q, KC, KC, _t(2, 1, 2, 8), _t(2, 1, 2, 8), cache_seqlens=1), ValueError, ["k has shape (2, 1, 2, 8)"]),
    (lambda: KV(Q, KC, KC.float(), cache_seqlens=1), TypeError, ["v_cache", "float32"]),
    (lambda: KV(Q, KC, KC, cache_seqlens=1, num_splits=-1), ValueError, ["num_splits", "-1"]),
    (lambda: KV(Q, KC, KC, cache_seqlens=1, window_size=(3,)), ValueError, ["window_size", "(3,)"]),
    (lambda: KV(Q, KC, KC, cache_seqlens=1, softmax_scale=float("inf")), ValueError, ["softmax_scale", "inf"]),
    (lambda: F(Q, NEW, NEW, window_size=(1.5, 2)), ValueError, ["window_size"]),
    (lambda: VL(_t(5, 2, 16), _t(5, 2, 16), _t(5, 2, 16), _i(0, 2, 6), _i(0, 2, 5), 4, 3), ValueError, ["cu_seqlens_q ends at 6", "5 tokens"]),
    (lambda: VL(_t(5, 2, 16), _t(5, 2, 16), _t(5, 2, 16), _i(0, 3, 2), _i(0, 2, 5), 4, 3), ValueError, ["cu_seqlens_q", "never decrease"]),
    (lambda: VL(_t(5, 2, 16), _t(5, 2, 16), _t(5, 2, 16), _i(0, 2, 5), _i(0, 2, 5), 2, 3), ValueError, ["3 tokens", "max_seqlen 2"]),
    (lambda: VL(_t(5, 2, 16), _t(5, 2, 16), _t(5, 2, 16), _i(0, 2, 5), _i(0, 5), 3, 3), ValueError, ["cu_seqlens_k", "(3,)"]),
    (lambda: VL(_t(5, 2, 16), _t(5, 2, 16), _t(5, 2, 16), _i(0, 2, 5), _i(0, 2, 5), 3, -1), ValueError, ["max_seqlen_k", "-1"]),
    (lambda: VL(_t(5, 2, 16), KC, KC, _i(0, 2, 5), _i(0, 2, 11), 3, 9, block_table=_i(0, 1).view(2, 1)), ValueError, ["cu_seqlens_k lengths[1] = 9", "8 slots"]),
]  # fmt: skip


@pytest.mark.parametrize("i", range(len(BAD)))
def test_bad_input(i):
    fn, err, words = BAD[i]
    before = KC.clone()
    KC.fill_(1.0)
    with pytest.raises(err) as info:
        fn()
    for w in words:
        assert w in str(info.value), (w, str(info.value))
    assert (KC == 1.0).all(), "the cache was written before the error"
    KC.copy_(before)


def test_kvcache_backward_refused():
    q = torch.randn(2, 1, 4, 16, device=DEVICE, requires_grad=True)
    kc = torch.zeros(2, 8, 2, 16, device=DEVICE)
    k = torch.ones(2, 1, 2, 16, device=DEVICE)
    with pytest.raises(NotImplementedError, match="q requires grad"):
        flash_attn_with_kvcache(q, kc, kc.clone(), k, k, cache_seqlens=3)
    assert (kc == 0).all()  # refused before the append
