"""fastllm.ops.attention / decode_attention / kv_cache_append on every backend against the
reference (itself checked against float64 math).

On the CPU the Triton kernels run under the interpreter at tiny sizes; the torch and
reference backends run the issue's whole matrix (head dims to 256, seqlen 257, GQA 8,
paged blocks 16/32). The `gpu` tests run the matrix on every backend at real sizes.
"""

import math

import pytest
import torch
from conftest import DEVICE, HAS_GPU, available_backends, poison_empty, rel_err

import fastllm
from fastllm import backend, reference
from fastllm.backend import BackendError

BACKENDS = available_backends("attention")
DECODE_BACKENDS = available_backends("decode_attention")
APPEND_BACKENDS = available_backends("kv_cache_append")
KERNELS = {"triton", "cuda"}  # fp16/bf16 only; fp32 goes to torch/reference
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
# Interpreted Triton is slow: its cases are tiny. Compiled kernels (GPU) get the full list.
INTERPRETED = not HAS_GPU


def _dtypes(name):
    if name in KERNELS:
        return [torch.float16, torch.bfloat16]
    return [torch.float32, torch.float16, torch.bfloat16]


def _tiny(name) -> bool:
    return name in KERNELS and INTERPRETED


def _rand(*shape, dtype):
    return torch.randn(*shape, device=DEVICE).to(dtype)


def _ref(q, k, v, **kw):
    """The reference in float64 on the same (rounded) inputs."""
    return reference.attention(q.double(), k.double(), v.double(), return_lse=True, **kw)


def _check(out, ref, dtype, what=""):
    assert out.dtype == dtype, what
    err = rel_err(out, ref)
    assert err <= TOL[dtype], f"{what}: rel err {err:.3g} > {TOL[dtype]}"


def _check_lse(lse, ref_lse, what=""):
    assert lse.dtype == torch.float32
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), what
    fin = torch.isfinite(ref_lse)
    if fin.any():
        diff = (lse[fin].double() - ref_lse[fin]).abs().max().item()
        assert diff <= 1e-3 * max(1.0, ref_lse[fin].abs().max().item()), (
            f"{what}: lse off by {diff}"
        )


def _run(name, fn, *args, op="attention", **kwargs):
    with fastllm.use_backend(name):
        out = fn(*args, **kwargs)
    assert fastllm.last_backend(op) == name
    return out


def test_backends_include_triton_and_torch():
    # the Triton kernels must run in the CPU test suite too (under the interpreter)
    for op in ("attention", "decode_attention", "kv_cache_append"):
        assert {"torch", "reference", "triton"} <= set(available_backends(op))


# --- the reference against float64 math ---------------------------------------------------


def _naive(q, k, v, causal, scale, wl, wr, softcap):
    """Element by element in Python floats: q (Sq, Hq, D), k/v (Sk, Hkv, D)."""
    sq, hq, d = q.shape
    sk, hkv, _ = k.shape
    out = torch.zeros(sq, hq, d, dtype=torch.float64)
    for h in range(hq):
        kh = h // (hq // hkv)
        for i in range(sq):
            p = i + sk - sq
            scores = {}
            for j in range(sk):
                if (causal and j > p) or (wl >= 0 and j < p - wl) or (wr >= 0 and j > p + wr):
                    continue
                s = sum(float(q[i, h, x]) * float(k[j, kh, x]) for x in range(d)) * scale
                if softcap:
                    s = softcap * math.tanh(s / softcap)
                scores[j] = s
            if not scores:
                continue
            m = max(scores.values())
            z = sum(math.exp(s - m) for s in scores.values())
            for j, s in scores.items():
                out[i, h] += math.exp(s - m) / z * v[j, kh].double()
    return out


@pytest.mark.parametrize(
    "sq, sk, causal, wl, wr, softcap",
    [(5, 5, False, -1, -1, 0.0), (3, 7, True, -1, -1, 0.0), (6, 4, True, -1, -1, 0.0),
     (7, 7, False, 2, 1, 3.0), (4, 6, True, 1, -1, 0.0)],
)  # fmt: skip
def test_reference_against_float64_math(sq, sk, causal, wl, wr, softcap):
    q = torch.randn(sq, 4, 8, dtype=torch.float64)
    k = torch.randn(sk, 2, 8, dtype=torch.float64)
    v = torch.randn(sk, 2, 8, dtype=torch.float64)
    expect = _naive(q, k, v, causal, 0.3, wl, wr, softcap)
    kw = dict(causal=causal, scale=0.3, window_left=wl, window_right=wr, softcap=softcap)
    got = reference.attention(q[None], k[None], v[None], **kw)[0]
    assert (got - expect).abs().max().item() < 1e-12
    # in float32 the reference stays within float32 rounding of the float64 result
    got32 = reference.attention(q[None].float(), k[None].float(), v[None].float(), **kw)[0]
    assert rel_err(got32, expect) < 1e-6


def test_reference_matches_sdpa_float64():
    q, k, v = (torch.randn(2, 3, 33, 16, dtype=torch.float64) for _ in range(3))
    expect = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    got = reference.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
    assert (got.transpose(1, 2) - expect).abs().max().item() < 1e-12


# --- prefill --------------------------------------------------------------------------------

# (batch, seqlen_q, seqlen_k, Hq, Hkv, head_dim, causal, window, softcap)
TINY_CASES = [
    (1, 1, 1, 1, 1, 16, False, None, None),
    (2, 17, 17, 4, 1, 16, True, None, None),  # MQA
    (1, 19, 33, 4, 4, 40, True, None, None),  # seqlen_q < seqlen_k: bottom-right causal
    (3, 9, 5, 2, 1, 64, True, None, None),  # seqlen_q > seqlen_k: first rows see nothing
    (2, 23, 23, 8, 2, 40, False, None, None),  # GQA 4
    (1, 33, 33, 8, 1, 16, False, (5, 3), None),  # GQA 8, window
    (1, 21, 29, 2, 2, 64, True, (6, None), 7.0),  # causal sliding window + softcap
    (1, 40, 40, 2, 1, 24, False, None, 2.0),
    (1, 40, 3, 2, 1, 16, True, None, None),  # whole row blocks see no key
    (2, 40, 40, 2, 2, 16, False, (20, 20), None),  # unmasked tiles between two window edges
]
FULL_CASES = TINY_CASES + [
    (1, 128, 128, 4, 4, h, c, None, None) for h in (80, 96, 128, 256) for c in (False, True)
] + [
    (2, 257, 257, 8, 1, 64, True, None, None),
    (3, 17, 257, 8, 2, 128, True, None, None),
    (1, 257, 257, 4, 4, 256, False, (64, 64), 30.0),
    (2, 128, 128, 32, 4, 128, False, None, None),
]  # fmt: skip


def _prefill_cases(name):
    return TINY_CASES if _tiny(name) else FULL_CASES


@pytest.mark.parametrize("name", BACKENDS)
def test_prefill_matches_reference(name, monkeypatch):
    poison_empty(monkeypatch)
    for i, (b, sq, sk, hq, hkv, d, causal, window, softcap) in enumerate(_prefill_cases(name)):
        dtypes = _dtypes(name)
        dtype = dtypes[i % len(dtypes)]  # every dtype, over the cases
        q, k, v = _rand(b, sq, hq, d, dtype=dtype), _rand(b, sk, hkv, d, dtype=dtype), None
        v = _rand(b, sk, hkv, d, dtype=dtype)
        kw = dict(causal=causal, window=window, softcap=softcap)
        out, lse = _run(name, fastllm.ops.attention, q, k, v, return_lse=True, **kw)
        wl, wr = window or (-1, -1)
        ref, ref_lse = _ref(
            q, k, v, causal=causal, window_left=-1 if wl is None else wl,
            window_right=-1 if wr is None else wr, softcap=softcap or 0.0,
        )  # fmt: skip
        what = f"{name} case {i} {dtype}"
        assert out.shape == q.shape and lse.shape == (b, hq, sq)
        _check(out, ref, dtype, what)
        _check_lse(lse, ref_lse, what)
        out2 = _run(name, fastllm.ops.attention, q, k, v, **kw)  # without lse: same output
        _check(out2, ref, dtype, what + " (no lse)")


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_prefill_every_dtype(name, dtype, monkeypatch):
    q, k, v = _rand(2, 13, 4, 32, dtype=dtype), _rand(2, 13, 2, 32, dtype=dtype), None
    v = _rand(2, 13, 2, 32, dtype=dtype)
    poison_empty(monkeypatch)
    if name in KERNELS and dtype == torch.float32:
        with pytest.raises(BackendError, match="float32"):
            _run(name, fastllm.ops.attention, q, k, v, causal=True)
        return
    out = _run(name, fastllm.ops.attention, q, k, v, causal=True)
    _check(out, _ref(q, k, v, causal=True)[0], dtype)


@pytest.mark.parametrize("name", BACKENDS)
def test_prefill_non_contiguous(name, monkeypatch):
    dtype = torch.float16
    base = _rand(2, 6, 21, 40, dtype=dtype)  # (batch, heads, seqlen, head_dim)
    q = base[:, :4].transpose(1, 2)  # (2, 21, 4, 40): strided, unit stride on head_dim
    kv = _rand(2, 21, 6, 40, dtype=dtype)
    k, v = kv[:, :, :2], kv[:, :, 4:]  # head slices
    poison_empty(monkeypatch)
    out = _run(name, fastllm.ops.attention, q, k, v, causal=True)
    _check(out, _ref(q, k, v, causal=True)[0], dtype)
    assert out.is_contiguous()
    q2 = _rand(2, 9, 4, 80, dtype=dtype)[..., ::2]  # head_dim not unit-stride: copied
    k2, v2 = _rand(2, 9, 4, 40, dtype=dtype), _rand(2, 9, 4, 40, dtype=dtype)
    _check(_run(name, fastllm.ops.attention, q2, k2, v2), _ref(q2, k2, v2)[0], dtype)


VARLEN_CASES = [  # (lengths_q, lengths_k)
    ([0, 1, 5], [3, 1, 5]),
    ([7, 0, 1, 12], [7, 0, 4, 20]),
    ([1], [1]),
]


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_varlen(name, causal, monkeypatch):
    cases = VARLEN_CASES if _tiny(name) else VARLEN_CASES + [([1, 257, 30], [128, 257, 300])]
    for lq, lk in cases:
        dtype = torch.bfloat16
        cu_q = torch.tensor([0] + lq, device=DEVICE).cumsum(0).int()
        cu_k = torch.tensor([0] + lk, device=DEVICE).cumsum(0).int()
        q = _rand(sum(lq), 4, 40, dtype=dtype)
        k, v = _rand(sum(lk), 2, 40, dtype=dtype), _rand(sum(lk), 2, 40, dtype=dtype)
        poison_empty(monkeypatch)
        out, lse = _run(
            name, fastllm.ops.attention, q, k, v, causal=causal, cu_seqlens_q=cu_q,
            cu_seqlens_k=cu_k, max_seqlen_q=max(lq), max_seqlen_k=max(lk), return_lse=True,
        )  # fmt: skip
        monkeypatch.undo()
        ref, ref_lse = _ref(q, k, v, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
        assert out.shape == q.shape and lse.shape == (4, sum(lq))
        _check(out, ref, dtype, f"{lq} {lk}")
        _check_lse(lse, ref_lse, f"{lq} {lk}")
        # each sequence alone, as a batch of one, gives the same rows
        b = max(range(len(lq)), key=lambda i: lq[i])
        qs, ks = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        alone = _run(
            name, fastllm.ops.attention, q[None, qs], k[None, ks], v[None, ks], causal=causal
        )
        torch.testing.assert_close(alone[0], out[qs], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("causal, window", [(False, None), (True, None), (False, (3, 2))])
def test_varlen_without_lse(name, causal, window, monkeypatch):
    # varlen without return_lse: the call a padded Hugging Face batch makes
    lq_many = torch.randint(0, 10, (17,)).tolist()
    lk_many = [n + int(torch.randint(0, 5, ())) for n in lq_many]
    for lq, lk in VARLEN_CASES + [([2, 0, 9], [2, 4, 11]), (lq_many, lk_many)]:
        dtype = torch.float16
        cu_q = torch.tensor([0] + lq, device=DEVICE).cumsum(0).int()
        cu_k = torch.tensor([0] + lk, device=DEVICE).cumsum(0).int()
        q = _rand(sum(lq), 4, 16, dtype=dtype)
        k, v = _rand(sum(lk), 2, 16, dtype=dtype), _rand(sum(lk), 2, 16, dtype=dtype)
        kwargs = dict(causal=causal, window=window, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
        poison_empty(monkeypatch)
        out = _run(
            name, fastllm.ops.attention, q, k, v, max_seqlen_q=max(lq), max_seqlen_k=max(lk),
            **kwargs,
        )  # fmt: skip
        monkeypatch.undo()
        left, right = window or (-1, -1)
        ref = _ref(
            q, k, v, causal=causal, window_left=left, window_right=right, cu_seqlens_q=cu_q,
            cu_seqlens_k=cu_k,
        )[0]  # fmt: skip
        _check(out, ref, dtype, f"{lq} {lk}")


@pytest.mark.parametrize("name", BACKENDS)
def test_empty(name):
    dtype = torch.float16
    q = _rand(0, 5, 2, 16, dtype=dtype)
    out, lse = _run(name, fastllm.ops.attention, q, q, q, return_lse=True)
    assert out.shape == q.shape and lse.shape == (0, 2, 5)
    q, k = _rand(2, 0, 2, 16, dtype=dtype), _rand(2, 3, 2, 16, dtype=dtype)
    out = _run(name, fastllm.ops.attention, q, k, k)
    assert out.shape == q.shape
    q, k = _rand(1, 3, 2, 16, dtype=dtype), _rand(1, 0, 2, 16, dtype=dtype)
    out, lse = _run(name, fastllm.ops.attention, q, k, k, return_lse=True)
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_default_backend_and_fallback():
    q = torch.randn(1, 4, 2, 20)  # fp32, head_dim 20: no GPU kernel takes it
    fastllm.ops.attention(q, q, q)
    assert fastllm.last_backend("attention") == "torch"  # a dense batch: SDPA in one call
    if "triton" in BACKENDS:
        with pytest.raises(BackendError, match="head_dim 20"):
            _run("triton", fastllm.ops.attention, q.half(), q.half(), q.half())
        assert (
            backend.why_not("attention", "triton", DEVICE, q.half(), q.half(), q.half()) is not None
        )


@pytest.mark.skipif("cpu" not in BACKENDS, reason="fastllm._C (C++ CPU kernels) is not built")
def test_cpu_kernel_is_chosen_for_short_varlen_sequences():
    # a padded batch of short sequences: the C++ kernel (one call for the batch); long
    # sequences and dense batches: PyTorch's SDPA, unless the kernel is forced
    def varlen(length, heads=12, head_dim=32):
        cu = torch.tensor([0, length, 2 * length], dtype=torch.int32)
        x = torch.randn(2 * length, heads, head_dim)
        kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=length, max_seqlen_k=length)
        return x, kw

    x, kw = varlen(30)
    fastllm.ops.attention(x, x, x, **kw)
    assert fastllm.last_backend("attention") == "cpu"
    x, kw = varlen(192, heads=4, head_dim=64)
    fastllm.ops.attention(x, x, x, **kw)
    assert fastllm.last_backend("attention") == "cpu"
    x, kw = varlen(193)
    fastllm.ops.attention(x, x, x, **kw)
    assert fastllm.last_backend("attention") == "torch"
    _run("cpu", fastllm.ops.attention, x, x, x, **kw)  # forced, the kernel serves it
    _run("cpu", fastllm.ops.attention, x[None], x[None], x[None])


@pytest.mark.skipif("cpu" not in BACKENDS, reason="fastllm._C (C++ CPU kernels) is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_kernel_many_short_sequences(dtype, threads):
    # a batch of many short sequences, the kernel's case: with query blocks enough for
    # every thread, one task takes all the heads of its block; each sequence's rows are
    # those it gets alone (one task per head), bit for bit, and the reference's
    torch.manual_seed(3)
    lengths = torch.randint(0, 24, (21,)).tolist()
    cu = torch.tensor([0] + lengths).cumsum(0).int()
    q = _rand(sum(lengths), 6, 40, dtype=dtype)
    k, v = _rand(sum(lengths), 3, 40, dtype=dtype), _rand(sum(lengths), 3, 40, dtype=dtype)
    kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(lengths),
              max_seqlen_k=max(lengths), return_lse=True)  # fmt: skip
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for causal, window in ((False, None), (True, None), (False, (4, 1))):
            out, lse = _run("cpu", fastllm.ops.attention, q, k, v, causal=causal,
                            window=window, **kw)  # fmt: skip
            left, right = window or (-1, -1)
            ref, ref_lse = _ref(q, k, v, causal=causal, window_left=left, window_right=right,
                                cu_seqlens_q=cu, cu_seqlens_k=cu)  # fmt: skip
            _check(out, ref, dtype, f"causal {causal} window {window}")
            _check_lse(lse, ref_lse)
            for b in (0, lengths.index(max(lengths))):
                rows = slice(int(cu[b]), int(cu[b + 1]))
                alone, alone_lse = _run("cpu", fastllm.ops.attention, q[None, rows],
                                        k[None, rows], v[None, rows], causal=causal,
                                        window=window, return_lse=True)  # fmt: skip
                assert torch.equal(alone[0], out[rows])
                assert torch.equal(alone_lse[0], lse[:, rows])
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="fastllm._C (C++ CPU kernels) is not built")
def test_cpu_kernel_clamps_unvalidated_cu_seqlens():
    # validate=False (or torch.compile) skips the cu_seqlens checks: bad values may give
    # wrong rows but the kernel stays inside the packed tensors
    # a sequence's rows are [cu[b], cu[b+1]) clamped to the 7 packed rows: each bad list
    # gives the result of the valid one it clamps to
    q = torch.randn(7, 2, 16)
    for bad, clamped in (([0, 5, 900], [0, 5, 7]), ([-4, 2, 7], [0, 2, 7])):
        kw = dict(max_seqlen_q=7, max_seqlen_k=7)
        cu = torch.tensor(bad, dtype=torch.int32)
        out = _run("cpu", fastllm.ops.attention, q, q, q, cu_seqlens_q=cu, cu_seqlens_k=cu,
                   validate=False, **kw)  # fmt: skip
        cu = torch.tensor(clamped, dtype=torch.int32)
        ref = _run("cpu", fastllm.ops.attention, q, q, q, cu_seqlens_q=cu, cu_seqlens_k=cu, **kw)
        assert torch.equal(out, ref), bad
    # a decreasing end: sequence 1 is empty (its rows are left as they are), sequence 0
    # ends at the packed length
    cu = torch.tensor([0, 9, 3], dtype=torch.int32)
    out = _run("cpu", fastllm.ops.attention, q, q, q, cu_seqlens_q=cu, cu_seqlens_k=cu,
               max_seqlen_q=7, max_seqlen_k=7, validate=False)  # fmt: skip
    one = _run("cpu", fastllm.ops.attention, q[None], q[None], q[None])
    assert torch.equal(out, one[0])


@pytest.mark.skipif("cpu" not in BACKENDS, reason="fastllm._C (C++ CPU kernels) is not built")
def test_cpu_kernel_fills_rows_outside_every_sequence():
    # the cpu launcher allocates out and lse without filling them: the kernel writes 0 and
    # -inf to packed rows that no sequence covers (unvalidated cu_seqlens), whatever the
    # memory held before (freed NaN blocks of the same size are likely to be reused)
    q = torch.randn(9, 2, 16)
    for cu, rows in (([2, 5], [0, 1, 5, 6, 7, 8]), ([0, 3, 3, 6], [6, 7, 8])):
        for _ in range(3):
            torch.full((9, 2, 16), float("nan"))  # freed at once
        cu = torch.tensor(cu, dtype=torch.int32)
        out, lse = _run("cpu", fastllm.ops.attention, q, q, q, cu_seqlens_q=cu,
                        cu_seqlens_k=cu, max_seqlen_q=9, max_seqlen_k=9, validate=False,
                        return_lse=True)  # fmt: skip
        outside = torch.zeros(9, dtype=torch.bool)
        outside[rows] = True
        assert torch.equal(out[outside], torch.zeros_like(out[outside]))
        assert (lse[:, outside] == float("-inf")).all()
        assert torch.isfinite(out[~outside]).all() and torch.isfinite(lse[:, ~outside]).all()


@pytest.mark.skipif(
    "cpu" not in DECODE_BACKENDS, reason="fastllm._C (C++ CPU kernels) is not built"
)
def test_cpu_decode_kernel_is_chosen_for_small_caches():
    from fastllm.native.cpu import DECODE_MAX_WORK

    q = torch.randn(1, 1, 4, 64)
    small = torch.randn(1, 128, 2, 64)
    lens = torch.tensor([100], dtype=torch.int32)
    fastllm.ops.decode_attention(q, small, small, lens)
    assert fastllm.last_backend("decode_attention") == "cpu"
    big = torch.randn(1, DECODE_MAX_WORK // (2 * 64) + 1, 2, 64)
    fastllm.ops.decode_attention(q, big, big, lens)
    assert fastllm.last_backend("decode_attention") == "torch"
    out = _run("cpu", fastllm.ops.decode_attention, q, big, big, lens, op="decode_attention")
    ref = _decode_ref(q, big, big, lens, None, None)
    _check(out, ref, torch.float32, "forced on a large cache")


# --- decode -------------------------------------------------------------------------------


def _paged(k_full, v_full, block_size, lengths, extra_blocks=3):
    """Scatter contiguous caches (B, S, H, D) into a shuffled paged cache + block table."""
    batch, s_max, h, d = k_full.shape
    per_seq = -(-s_max // block_size)
    num_blocks = batch * per_seq + extra_blocks
    perm = torch.randperm(num_blocks, device=DEVICE)[: batch * per_seq].view(batch, per_seq)
    kc = _rand(num_blocks, block_size, h, d, dtype=k_full.dtype)  # garbage elsewhere
    vc = _rand(num_blocks, block_size, h, d, dtype=k_full.dtype)
    for b in range(batch):
        for i in range(per_seq):
            rows = slice(i * block_size, min((i + 1) * block_size, s_max))
            n = rows.stop - rows.start
            kc[perm[b, i], :n] = k_full[b, rows]
            vc[perm[b, i], :n] = v_full[b, rows]
    bt = perm.int()
    # entries past each sequence's last used block: anything (-1 here) must not be read
    for b in range(batch):
        used = -(-int(lengths[b]) // block_size)
        bt[b, used:] = -1
    return kc, vc, bt


# (batch, q_len, Hq, Hkv, head_dim, max_seqlen, block_size or None, num_splits, window, softcap)
DECODE_TINY = [
    (3, 1, 4, 1, 16, 40, None, None, None, None),
    (2, 4, 4, 2, 40, 37, None, 3, None, None),  # split-KV, 3 splits
    (3, 1, 8, 2, 64, 48, 16, 2, None, None),  # paged, split-KV
    (2, 4, 2, 2, 16, 64, 32, None, None, 5.0),  # paged 32, speculative rows
    (2, 2, 4, 1, 40, 33, 16, 4, (7, 0), None),  # window, 4 splits
]
DECODE_FULL = DECODE_TINY + [
    (2, 1, 32, 8, 128, 1000, None, None, None, None),
    (3, 4, 32, 4, 128, 600, 16, None, None, None),
    (1, 1, 8, 1, 256, 257, 32, None, None, None),
    (2, 4, 16, 16, 80, 300, 16, 5, None, None),
    (2, 1, 8, 8, 96, 300, None, 7, (100, None), 20.0),
]  # fmt: skip


def _decode_case(case, dtype):
    batch, q_len, hq, hkv, d, s_max, bs, splits, window, softcap = case
    lengths = torch.randint(q_len, s_max + 1, (batch,), device=DEVICE)
    lengths[0] = s_max  # the maximum
    if batch > 2:
        lengths[-1] = 1 if q_len == 1 else q_len  # the minimum
    k_full, v_full = (
        _rand(batch, s_max, hkv, d, dtype=dtype),
        _rand(batch, s_max, hkv, d, dtype=dtype),
    )
    q = _rand(batch, q_len, hq, d, dtype=dtype)
    if bs is None:
        kc, vc, bt = k_full, v_full, None
    else:
        kc, vc, bt = _paged(k_full, v_full, bs, lengths)
    kw = dict(block_table=bt, num_splits=splits, window=window, softcap=softcap)
    return q, k_full, v_full, kc, vc, lengths.int(), kw


def _decode_ref(q, k_full, v_full, lengths, window, softcap):
    wl, wr = window or (-1, -1)
    return reference.decode_attention(
        q.double(), k_full.double(), v_full.double(), lengths, window_left=wl,
        window_right=-1 if wr is None else wr, softcap=softcap or 0.0,
    )  # fmt: skip


@pytest.mark.parametrize("name", DECODE_BACKENDS)
def test_decode_matches_reference(name, monkeypatch):
    cases = DECODE_TINY if _tiny(name) else DECODE_FULL
    for i, case in enumerate(cases):
        dtypes = _dtypes(name)
        dtype = dtypes[i % len(dtypes)]
        q, k_full, v_full, kc, vc, lengths, kw = _decode_case(case, dtype)
        poison_empty(monkeypatch)
        out = _run(
            name, fastllm.ops.decode_attention, q, kc, vc, lengths, op="decode_attention", **kw
        )
        monkeypatch.undo()
        ref = _decode_ref(q, k_full, v_full, lengths, kw["window"], kw["softcap"])
        assert out.shape == q.shape
        _check(out, ref, dtype, f"{name} decode case {i} {dtype}")


@pytest.mark.parametrize("name", DECODE_BACKENDS)
def test_decode_every_length(name):
    # cache_seqlens from 1 to the maximum, contiguous and paged, split-KV engaged
    dtype = torch.float16
    s_max, bs = 35 if _tiny(name) else 97, 16
    batch = s_max
    lengths = torch.arange(1, s_max + 1, device=DEVICE).int()
    if _tiny(name):
        lengths, batch = lengths[torch.tensor([0, 1, 15, 16, 17, 31, 34])], 7
    k_full, v_full = (
        _rand(batch, s_max, 1, 16, dtype=dtype),
        _rand(batch, s_max, 1, 16, dtype=dtype),
    )
    q = _rand(batch, 1, 2, 16, dtype=dtype)
    ref = _decode_ref(q, k_full, v_full, lengths, None, None)
    out = _run(name, fastllm.ops.decode_attention, q, k_full, v_full, lengths, num_splits=3,
               op="decode_attention")  # fmt: skip
    _check(out, ref, dtype, "contiguous")
    kc, vc, bt = _paged(k_full, v_full, bs, lengths)
    out = _run(name, fastllm.ops.decode_attention, q, kc, vc, lengths, block_table=bt,
               num_splits=2, op="decode_attention")  # fmt: skip
    _check(out, ref, dtype, "paged")


@pytest.mark.parametrize("name", DECODE_BACKENDS)
def test_decode_equals_prefill_rows(name):
    # decode of q_len rows == the last q_len rows of a causal prefill over the same keys
    dtype = torch.bfloat16
    k, v = _rand(1, 29, 2, 40, dtype=dtype), _rand(1, 29, 2, 40, dtype=dtype)
    q = _rand(1, 4, 4, 40, dtype=dtype)
    lengths = torch.tensor([29], dtype=torch.int32, device=DEVICE)
    dec = _run(name, fastllm.ops.decode_attention, q, k, v, lengths, op="decode_attention")
    pre = _run(name, fastllm.ops.attention, q, k, v, causal=True) if name in BACKENDS else None
    if pre is not None:
        torch.testing.assert_close(dec, pre, rtol=2e-2, atol=2e-2)
    _check(dec, _ref(q, k, v, causal=True)[0], dtype)


def test_decode_num_splits_from_shapes_only():
    from fastllm.triton_kernels.attention import decode_num_splits

    # one sequence, 64k cache, 8 kv heads on 132 SMs: split enough to fill the GPU
    assert decode_num_splits(1, 8, 65536, 64, 132) >= 16
    # a big batch already fills it
    assert decode_num_splits(64, 8, 65536, 64, 132) == 1
    # never more splits than 256-key chunks
    assert decode_num_splits(1, 1, 300, 64, 132) == 2


# --- kv_cache_append ------------------------------------------------------------------------


@pytest.mark.parametrize("name", APPEND_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_append_round_trip(name, dtype):
    batch, hkv, d, s_max = 3, 2, 40, 40
    # contiguous: positions
    kc = torch.zeros(batch, s_max, hkv, d, dtype=dtype, device=DEVICE)
    vc = torch.zeros_like(kc)
    k_new, v_new = _rand(batch, 5, hkv, d, dtype=dtype), _rand(batch, 5, hkv, d, dtype=dtype)
    pos = torch.tensor([0, 17, 35], dtype=torch.int32, device=DEVICE)
    _run(name, fastllm.ops.kv_cache_append, k_new, v_new, kc, vc, pos, op="kv_cache_append")
    for b in range(batch):
        p = int(pos[b])
        assert torch.equal(kc[b, p : p + 5], k_new[b]) and torch.equal(vc[b, p : p + 5], v_new[b])
    assert int((kc != 0).any(-1).any(-1).sum()) == batch * 5  # nothing else written

    # paged: positions through a block table, crossing block boundaries
    kp = torch.zeros(10, 16, hkv, d, dtype=dtype, device=DEVICE)
    vp = torch.zeros_like(kp)
    bt = torch.tensor([[3, 7, -1], [0, 9, 2], [5, 1, 4]], dtype=torch.int32, device=DEVICE)
    pos = torch.tensor([12, 30, 0], dtype=torch.int32, device=DEVICE)
    _run(name, fastllm.ops.kv_cache_append, k_new, v_new, kp, vp, pos, block_table=bt,
         op="kv_cache_append")  # fmt: skip
    kr, vr = torch.zeros_like(kp), torch.zeros_like(vp)
    reference.kv_cache_append(k_new, v_new, kr, vr, pos, block_table=bt)
    assert torch.equal(kp, kr) and torch.equal(vp, vr)
    assert torch.equal(kp[7, 0], k_new[0, 4]) and torch.equal(vp[2, 2], v_new[1, 4])

    # slot mapping, -1 skipped
    kp.zero_()
    vp.zero_()
    k3, v3 = _rand(4, hkv, d, dtype=dtype), _rand(4, hkv, d, dtype=dtype)
    slots = torch.tensor([5, -1, 159, 16], dtype=torch.int64, device=DEVICE)
    _run(name, fastllm.ops.kv_cache_append, k3, v3, kp, vp, slots, op="kv_cache_append")
    assert torch.equal(kp[0, 5], k3[0]) and torch.equal(kp[9, 15], k3[2])
    assert torch.equal(vp[1, 0], v3[3])
    assert int((kp != 0).any(-1).any(-1).sum()) == 3


@pytest.mark.parametrize("name", APPEND_BACKENDS)
def test_append_then_decode(name):
    # a server step: append the new tokens to a paged cache, then decode against it
    dtype = torch.float16
    if name in KERNELS:
        backends = (name, name)
    else:
        backends = (name, "torch")
    k_old, v_old = _rand(2, 30, 2, 16, dtype=dtype), _rand(2, 30, 2, 16, dtype=dtype)
    lengths = torch.tensor([11, 30], dtype=torch.int32, device=DEVICE)
    kc, vc, bt = _paged(k_old, v_old, 16, torch.full((2,), 32))
    bt = bt.clone()
    k_new, v_new = _rand(2, 2, 2, 16, dtype=dtype), _rand(2, 2, 2, 16, dtype=dtype)
    q = _rand(2, 2, 4, 16, dtype=dtype)
    _run(backends[0], fastllm.ops.kv_cache_append, k_new, v_new, kc, vc, lengths,
         block_table=bt, op="kv_cache_append")  # fmt: skip
    new_len = lengths + 2
    out = _run(backends[1], fastllm.ops.decode_attention, q, kc, vc, new_len, block_table=bt,
               op="decode_attention")  # fmt: skip
    for b in range(2):
        n = int(lengths[b])
        k = torch.cat([k_old[b, :n], k_new[b]])[None]
        v = torch.cat([v_old[b, :n], v_new[b]])[None]
        _check(out[b : b + 1], _ref(q[b : b + 1], k, v, causal=True)[0], dtype, f"seq {b}")


# --- bad input --------------------------------------------------------------------------------


def _t(*shape, dtype=torch.float16):
    return torch.zeros(*shape, dtype=dtype, device=DEVICE)


def _i(*vals):
    return torch.tensor(vals, dtype=torch.int32, device=DEVICE)


A = fastllm.ops.attention
D = fastllm.ops.decode_attention
P = fastllm.ops.kv_cache_append
BAD = [
    (lambda: A(_t(1, 4, 2, 16), _t(2, 4, 2, 16), _t(2, 4, 2, 16)), ValueError, ["batch 2", "q has 1"]),
    (lambda: A(_t(1, 4, 2, 16), _t(1, 4, 2, 8), _t(1, 4, 2, 8)), ValueError, ["q has head_dim 16", "k has 8"]),
    (lambda: A(_t(1, 4, 2, 16), _t(1, 4, 2, 16, dtype=torch.bfloat16), _t(1, 4, 2, 16)), TypeError, ["k", "bfloat16", "float16"]),
    (lambda: A(_t(1, 4, 6, 16), _t(1, 4, 4, 16), _t(1, 4, 4, 16)), ValueError, ["6 heads", "4"]),
    (lambda: A(_t(1, 4, 2, 16), _t(1, 4, 2, 16), _t(1, 5, 2, 16)), ValueError, ["v", "(1, 5, 2, 16)"]),
    (lambda: A(_t(4, 2, 16), _t(4, 2, 16), _t(4, 2, 16)), ValueError, ["q", "(batch, seqlen, heads, head_dim)"]),
    (lambda: A(_t(1, 4, 2, 16, dtype=torch.float64), _t(1, 4, 2, 16), _t(1, 4, 2, 16)), TypeError, ["q", "float64"]),
    (lambda: A(_t(1, 4, 2, 16), _t(1, 4, 2, 16), _t(1, 4, 2, 16), window=(3,)), ValueError, ["window", "(3,)"]),
    (lambda: A(_t(1, 4, 2, 16), _t(1, 4, 2, 16), _t(1, 4, 2, 16), window=(-2, 0)), ValueError, ["window left", "-2"]),
    (lambda: A(_t(1, 4, 2, 16), _t(1, 4, 2, 16), _t(1, 4, 2, 16), causal=True, window=(2, 3)), ValueError, ["causal", "(2, 3)"]),
    (lambda: A(_t(1, 4, 2, 16), _t(1, 4, 2, 16), _t(1, 4, 2, 16), softcap=-1.0), ValueError, ["softcap", "-1.0"]),
    (lambda: A(_t(1, 4, 2, 16), _t(1, 4, 2, 16), _t(1, 4, 2, 16), scale=float("nan")), ValueError, ["scale", "nan"]),
    (lambda: A(_t(5, 2, 16), _t(5, 2, 16), _t(5, 2, 16), cu_seqlens_q=_i(0, 5)), ValueError, ["together"]),
    (lambda: A(_t(5, 2, 16), _t(5, 2, 16), _t(5, 2, 16), cu_seqlens_q=_i(0, 3, 2, 5), cu_seqlens_k=_i(0, 2, 3, 5)), ValueError, ["cu_seqlens_q", "[0, 3, 2, 5]", "never decrease"]),
    (lambda: A(_t(5, 2, 16), _t(5, 2, 16), _t(5, 2, 16), cu_seqlens_q=_i(0, 2, 4), cu_seqlens_k=_i(0, 2, 5)), ValueError, ["cu_seqlens_q", "ends at 4", "5 tokens"]),
    (lambda: A(_t(5, 2, 16), _t(5, 2, 16), _t(5, 2, 16), cu_seqlens_q=_i(0, 2, 5), cu_seqlens_k=_i(0, 2, 5), max_seqlen_q=2, max_seqlen_k=3), ValueError, ["cu_seqlens_q", "3 tokens", "max_seqlen 2"]),
    (lambda: A(_t(5, 2, 16), _t(5, 2, 16), _t(5, 2, 16), cu_seqlens_q=_i(0, 5), cu_seqlens_k=_i(0, 2, 5)), ValueError, ["cu_seqlens_k", "(3,)", "(2,)"]),
    (lambda: D(_t(2, 1, 4, 16), _t(2, 8, 2, 16), _t(2, 8, 2, 16), _i(3, 9)), ValueError, ["cache_seqlens[1] = 9", "8"]),
    (lambda: D(_t(2, 1, 4, 16), _t(2, 8, 2, 16), _t(2, 8, 2, 16), _i(3, -1)), ValueError, ["cache_seqlens[1] = -1"]),
    (lambda: D(_t(2, 1, 4, 16), _t(4, 8, 2, 16), _t(4, 8, 2, 16), _i(3, 17), block_table=_i(0, 1, 2, 3).view(2, 2)), ValueError, ["cache_seqlens[1] = 17", "2 blocks x 8 = 16"]),
    (lambda: D(_t(2, 1, 4, 16), _t(4, 8, 2, 16), _t(4, 8, 2, 16), _i(3, 9), block_table=_i(0, 1, 2, 4).view(2, 2)), ValueError, ["block_table[1, 1] = 4", "num_blocks = 4"]),
    (lambda: D(_t(2, 1, 4, 16), _t(4, 8, 2, 16), _t(4, 8, 2, 16), _i(3, 9), block_table=_i(0, 1, 2)), ValueError, ["block_table", "(3,)"]),
    (lambda: D(_t(2, 1, 4, 16), _t(3, 8, 2, 16), _t(3, 8, 2, 16), _i(3, 8)), ValueError, ["k_cache has batch 3"]),
    (lambda: D(_t(2, 1, 3, 16), _t(2, 8, 2, 16), _t(2, 8, 2, 16), _i(3, 8)), ValueError, ["3 heads", "2"]),
    (lambda: D(_t(2, 1, 4, 16), _t(2, 8, 2, 16), _t(2, 8, 2, 16), _i(3, 8), num_splits=0), ValueError, ["num_splits", "0"]),
    (lambda: P(_t(2, 3, 2, 16), _t(2, 3, 2, 16), _t(2, 8, 2, 16), _t(2, 8, 2, 16), _i(0, 6)), ValueError, ["positions", "6", "+ 3", "8"]),
    (lambda: P(_t(2, 3, 2, 16), _t(2, 3, 2, 16), _t(2, 8, 2, 16), _t(2, 8, 2, 16), _i(0)), ValueError, ["positions", "(1,)", "batch=2"]),
    (lambda: P(_t(3, 2, 16), _t(3, 2, 16), _t(2, 8, 2, 16), _t(2, 8, 2, 16), _i(0, 16, 3)), ValueError, ["slot", "16", "16 slots"]),
    (lambda: P(_t(2, 3, 2, 16), _t(2, 3, 2, 16), _t(4, 4, 2, 16), _t(4, 4, 2, 16), _i(0, 2), block_table=_i(0, 1, 2, 7).view(2, 2)), ValueError, ["block_table[1, 1] = 7"]),
    (lambda: P(_t(2, 3, 2, 16, dtype=torch.float32), _t(2, 3, 2, 16), _t(2, 8, 2, 16), _t(2, 8, 2, 16), _i(0, 1)), TypeError, ["k_new", "float32", "float16"]),
    (lambda: P(_t(2, 3, 2, 16), _t(2, 3, 2, 16), _t(2, 8, 2, 32)[..., ::2], _t(2, 8, 2, 16), _i(0, 1)), ValueError, ["k_cache", "unit stride"]),
]  # fmt: skip


@pytest.mark.parametrize("i", range(len(BAD)))
def test_bad_input(i):
    fn, err, words = BAD[i]
    with pytest.raises(err) as info:
        fn()
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_unchecked_values_never_read_out_of_bounds():
    # validate=False (what a CUDA server gets by default): bad values are clamped or skipped
    names = [n for n in DECODE_BACKENDS if n != "reference"]
    q, kc = _t(2, 1, 4, 16) + 1, _rand(4, 8, 2, 16, dtype=torch.float16)
    for name in names:
        out = _run(name, D, q, kc, kc, _i(3, 99), block_table=_i(0, 1, 2, 77).view(2, 2),
                   validate=False, op="decode_attention")  # fmt: skip
        assert torch.isfinite(out).all()
        if name not in APPEND_BACKENDS:
            continue
        kp = torch.zeros_like(kc)
        _run(name, P, _t(2, 3, 2, 16) + 1, _t(2, 3, 2, 16) + 1, kp, kp.clone(), _i(14, 0),
             block_table=_i(0, 1, 2, 77).view(2, 2), validate=False, op="kv_cache_append")  # fmt: skip
        assert (
            int((kp != 0).any(-1).any(-1).sum()) == 2 + 3
        )  # (0,14),(1,7) and (2,0..2); 16.. skipped


# --- torch.library and torch.compile ------------------------------------------------------------


def test_opcheck():
    q, k = torch.randn(2, 5, 4, 16, device=DEVICE), torch.randn(2, 7, 2, 16, device=DEVICE)
    args = (q, k, k.clone(), True, 0.25, -1, 0, 0.0, None, None, 5, 7, True)
    torch.library.opcheck(torch.ops.fastllm.attention.default, args)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32, device=DEVICE)
    qv = torch.randn(5, 4, 16, device=DEVICE)
    args = (qv, qv[:, :2].clone(), qv[:, :2].clone(), False, 0.25, -1, -1, 5.0, cu, cu, 3, 3, False)
    torch.library.opcheck(torch.ops.fastllm.attention.default, args)
    kc = torch.randn(4, 8, 2, 16, device=DEVICE)
    bt, lens = _i(0, 1, 3, 2).view(2, 2), _i(5, 16)
    args = (q[:, :2], kc, kc.clone(), lens, bt, 0.25, True, -1, 0, 0.0, 0)
    torch.library.opcheck(torch.ops.fastllm.decode_attention.default, args)
    args = (torch.randn(2, 3, 2, 16, device=DEVICE), torch.randn(2, 3, 2, 16, device=DEVICE),
            kc.clone(), kc.clone(), _i(1, 4), bt)  # fmt: skip
    torch.library.opcheck(torch.ops.fastllm.kv_cache_append.default, args)


class _Block(torch.nn.Module):
    """One pre-norm attention block with a KV cache, calling the fastllm ops."""

    def __init__(self, dim=64, heads=4, kv_heads=2):
        super().__init__()
        self.h, self.hkv, self.d = heads, kv_heads, dim // heads
        self.norm = torch.nn.LayerNorm(dim)
        self.qkv = torch.nn.Linear(dim, (heads + 2 * kv_heads) * self.d)
        self.out = torch.nn.Linear(dim, dim)

    def _qkv(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(self.norm(x)).split(
            [self.h * self.d, self.hkv * self.d, self.hkv * self.d], -1
        )
        return (
            q.view(b, s, self.h, self.d),
            k.view(b, s, self.hkv, self.d),
            v.view(b, s, self.hkv, self.d),
        )

    def prefill(self, x, k_cache, v_cache):
        q, k, v = self._qkv(x)
        zeros = torch.zeros(x.shape[0], dtype=torch.int32, device=x.device)
        fastllm.ops.kv_cache_append(k, v, k_cache, v_cache, zeros)
        return x + self.out(fastllm.ops.attention(q, k, v, causal=True).flatten(2))

    def decode(self, x, k_cache, v_cache, seqlens):
        q, k, v = self._qkv(x)
        fastllm.ops.kv_cache_append(k, v, k_cache, v_cache, seqlens)
        o = fastllm.ops.decode_attention(q, k_cache, v_cache, seqlens + x.shape[1], validate=False)
        return x + self.out(o.flatten(2))


def test_compile_fullgraph():
    block = _Block().to(DEVICE)
    x, step = torch.randn(2, 9, 64, device=DEVICE), torch.randn(2, 1, 64, device=DEVICE)

    def run(prefill, decode):
        kc = torch.zeros(2, 16, 2, 16, device=DEVICE)
        vc = torch.zeros_like(kc)
        y = prefill(x, kc, vc)
        z = decode(step, kc, vc, torch.full((2,), 9, dtype=torch.int32, device=DEVICE))
        return y, z, kc

    with torch.no_grad():
        eager = run(block.prefill, block.decode)
        compiled = run(
            torch.compile(block.prefill, fullgraph=True, backend="eager"),
            torch.compile(block.decode, fullgraph=True, backend="eager"),
        )
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)
    assert (eager[2][:, 9] != 0).any()  # the decode step's key was appended


# --- GPU, real sizes ------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_prefill_real_sizes(name, dtype, monkeypatch):
    if name not in BACKENDS:
        pytest.skip(f"{name}: {backend.unavailable_reason(name, DEVICE)}")
    cases = [
        (2, 1024, 1024, 16, 16, 128, True, None, None),
        (1, 2000, 3000, 32, 8, 128, True, None, None),
        (4, 257, 257, 8, 1, 64, False, None, None),
        (1, 4096, 4096, 8, 8, 64, True, (512, 0), None),
        (2, 513, 513, 8, 2, 256, True, None, 30.0),
    ] + [(1, 300, 300, 4, 4, d, True, None, None) for d in range(16, 257, 8)]
    for b, sq, sk, hq, hkv, d, causal, window, softcap in cases:
        q, k, v = _rand(b, sq, hq, d, dtype=dtype), _rand(b, sk, hkv, d, dtype=dtype), None
        v = _rand(b, sk, hkv, d, dtype=dtype)
        poison_empty(monkeypatch)
        out, lse = _run(
            name, A, q, k, v, causal=causal, window=window, softcap=softcap, return_lse=True
        )
        monkeypatch.undo()
        wl, wr = window or (-1, -1)
        ref, ref_lse = reference.attention(
            q.float(), k.float(), v.float(), causal=causal, window_left=wl, window_right=wr,
            softcap=softcap or 0.0, return_lse=True,
        )  # fmt: skip
        _check(out, ref, dtype, f"{name} {b, sq, sk, hq, hkv, d}")
        _check_lse(lse, ref_lse.double(), f"{name} {b, sq, sk, hq, hkv, d}")


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_decode_real_sizes(name, dtype, monkeypatch):
    if name not in DECODE_BACKENDS:
        pytest.skip(f"{name}: {backend.unavailable_reason(name, DEVICE)}")
    cases = [
        (1, 1, 32, 8, 128, 65536, None, None, None, None),  # one long sequence: split-KV
        (8, 1, 32, 8, 128, 8192, 16, None, None, None),
        (64, 1, 32, 8, 128, 2048, 32, None, None, None),
        (4, 4, 32, 4, 128, 4000, 16, None, None, None),
        (2, 16, 16, 2, 64, 3000, None, None, (256, None), 50.0),
        (3, 1, 8, 1, 256, 1000, 32, None, None, None),
    ]
    for case in cases:
        q, k_full, v_full, kc, vc, lengths, kw = _decode_case(case, dtype)
        poison_empty(monkeypatch)
        out = _run(name, D, q, kc, vc, lengths, op="decode_attention", **kw)
        monkeypatch.undo()
        ref = torch.cat([
            reference.attention(
                q[b : b + 1].float(), k_full[b : b + 1, : int(lengths[b])].float(),
                v_full[b : b + 1, : int(lengths[b])].float(), causal=True,
                window_left=(kw["window"] or (-1, -1))[0], softcap=kw["softcap"] or 0.0,
            ) for b in range(q.shape[0])
        ])  # fmt: skip
        _check(out, ref, dtype, f"{name} {case}")


@pytest.mark.gpu
def test_gpu_decode_cuda_graph():
    # no host sync and shape-only allocations: the call can be captured and replayed
    dtype = torch.bfloat16
    for name in [n for n in ("cuda", "triton") if n in DECODE_BACKENDS]:
        kc, vc = _rand(64, 32, 8, 128, dtype=dtype), _rand(64, 32, 8, 128, dtype=dtype)
        bt = torch.randperm(64, device=DEVICE)[:60].view(2, 30).int()
        q = _rand(2, 1, 32, 128, dtype=dtype)
        lens = torch.tensor([100, 900], dtype=torch.int32, device=DEVICE)
        with fastllm.use_backend(name):
            D(q, kc, vc, lens, block_table=bt)  # warm-up (compilation)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = D(q, kc, vc, lens, block_table=bt)
        for new in ([100, 900], [7, 960], [1, 1]):
            lens.copy_(torch.tensor(new))
            graph.replay()
            torch.cuda.synchronize()
            ref = reference.decode_attention(
                q.float(), kc.float(), vc.float(), lens, block_table=bt
            )
            _check(out, ref, dtype, f"{name} graph replay {new}")


# --- the kernels compile for a GPU, even here -------------------------------------------------


_AOT_SCRIPT = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastllm.triton_kernels import attention as ta

def build(fn, types, constexprs, num_warps):
    sig = {n: ("constexpr" if n in constexprs else types.get(n, "i32")) for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    opts = {"num_warps": num_warps, "num_stages": 3}
    assert triton.compile(src, target=GPUTarget("cuda", 90, 64), options=opts).asm["ptx"]

t16 = "*bf16"
bm, bn, warps, _ = ta._prefill_blocks(128, False)
build(ta._attn_fwd_kernel,
      dict(q_ptr=t16, k_ptr=t16, v_ptr=t16, o_ptr=t16, lse_ptr="*fp32", cu_q_ptr="*i32",
           cu_k_ptr="*i32", scale="fp32", softcap="fp32"),
      dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=128, VARLEN=True, HAS_SOFTCAP=True,
           RETURN_LSE=True, UPCAST=False, EVEN_D=True, group=1), warps)
build(ta._decode_split_kernel,
      dict(q_ptr=t16, k_ptr=t16, v_ptr=t16, seqlens_ptr="*i32", bt_ptr="*i32",
           o_ptr="*fp32", lse_ptr="*fp32", scale="fp32", softcap="fp32"),
      dict(BLOCK_M=16, BLOCK_N=64, BLOCK_D=128, PAGED=True, HAS_SOFTCAP=False,
           UPCAST=False, STORE_LSE=True, EVEN_D=False, q_len=1), 4)
build(ta._decode_merge_kernel, dict(part_ptr="*fp32", lse_ptr="*fp32", o_ptr=t16),
      dict(BLOCK_S=16, BLOCK_D=128), 4)
build(ta._kv_append_kernel,
      dict(kn_ptr=t16, vn_ptr=t16, kc_ptr=t16, vc_ptr=t16, pos_ptr="*i32", bt_ptr="*i32"),
      dict(BLOCK_D=128, SLOTS=False, PAGED=True), 2)
print("compiled")
"""


@pytest.mark.skipif(HAS_GPU, reason="on a GPU the other tests compile and run the kernels")
def test_kernels_compile_for_sm90():
    # Triton's own compiler, for sm_90, without a GPU: catches what the interpreter lets
    # through (types or shapes that change across branches, layouts). Out of process, as
    # the interpreter is on in this one.
    import os
    import subprocess
    import sys

    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        pytest.skip(f"this Triton has no ahead-of-time compiler API: {e}")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run(
        [sys.executable, "-c", _AOT_SCRIPT],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-3000:]
