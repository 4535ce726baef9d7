"""Robustness of the attention ops on every backend available here: what a server's paths
do to them (index tensors as views, recycled cache blocks, compiled graphs that skip the
value checks) must give the right answer or a defined one, and never touch memory
outside the tensors.

- index tensors at any strides and as int64 (every backend reads them the same way);
- NaN/inf in cache slots past cache_seqlens, and in the values of masked-out keys, never
  reach the output; a NaN query gives NaN on every backend;
- unchecked invalid metadata (validate=False, torch.compile) in a subprocess, so that a
  crash is a failed test; `make asan` runs this module against the C++ kernels built
  with AddressSanitizer;
- paged decode memory follows the lengths in use, not the block table's width.

The sparse, int8 and quantization ops have the same checks in their own test files, and
damaged checkpoints are in test_serialize.py.
"""

import os
import subprocess
import sys

import pytest
import torch
from conftest import DEVICE, HAS_GPU, available_backends, rel_err

import fastllm
from fastllm import reference
from fastllm.reference.attention import gather_cache, weighted_values

A = fastllm.ops.attention
D = fastllm.ops.decode_attention
P = fastllm.ops.kv_cache_append
PREFILL = available_backends("attention")
DECODE = available_backends("decode_attention")
APPEND = available_backends("kv_cache_append")
KERNELS = {"triton", "cuda"}  # fp16/bf16 only


def _dtype(name):
    return torch.float16 if name in KERNELS else torch.float32


def _rand(*shape, dtype):
    return torch.randn(*shape, device=DEVICE).to(dtype)


def _close(out, want, what=""):
    """Finite and equal up to rounding: a backend may take another path (the torch backend
    leaves SDPA for its math path when values are not finite)."""
    assert torch.isfinite(out).all(), what
    tol = 1e-5 if out.dtype == torch.float32 else 1e-2
    assert rel_err(out, want) <= tol, what


def _run(name, fn, *args, **kwargs):
    with fastllm.use_backend(name):
        return fn(*args, **kwargs)


def _spread(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """t's values in a view with stride 2 along dim (garbage in between)."""
    shape = list(t.shape)
    shape[dim] *= 2
    big = torch.full(shape, -12345, dtype=t.dtype, device=t.device)
    index = [slice(None)] * t.dim()
    index[dim] = slice(0, None, 2)
    view = big[tuple(index)]
    view.copy_(t)
    assert not view.is_contiguous() or t.shape[dim] <= 1
    return view


# --- index tensors as strided views and as int64 -------------------------------------------


@pytest.mark.parametrize("name", PREFILL)
def test_varlen_cu_seqlens_as_views(name):
    dt = _dtype(name)
    lens_q, lens_k = [3, 0, 5, 1], [4, 2, 5, 3]
    cu_q = torch.tensor(
        [0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE
    )
    cu_k = torch.tensor(
        [0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE
    )
    q = _rand(int(cu_q[-1]), 4, 16, dtype=dt)
    k, v = _rand(int(cu_k[-1]), 2, 16, dtype=dt), _rand(int(cu_k[-1]), 2, 16, dtype=dt)
    kw = dict(causal=True, max_seqlen_q=5, max_seqlen_k=5)
    want = _run(name, A, q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **kw)
    for cq, ck in [
        (_spread(cu_q), _spread(cu_k)),
        (cu_q.long(), cu_k.long()),
        (_spread(cu_q.long()), cu_k),
    ]:
        got = _run(name, A, q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, **kw)
        assert torch.equal(got, want), (name, cq.stride(), cq.dtype)
        # validate=False skips the checks that would have read the values on the host
        got = _run(name, A, q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, validate=False, **kw)
        assert torch.equal(got, want), (name, "validate=False")


def _paged_case(dt, batch=2, page=4, lengths=(6, 9), hkv=2, hq=4, d=16):
    """A paged cache with the sequences' blocks in a shuffled order, and its block table."""
    per_seq = -(-max(lengths) // page)
    num_blocks = batch * per_seq + 2
    perm = (
        torch.randperm(num_blocks, device=DEVICE)[: batch * per_seq]
        .view(batch, per_seq)
        .to(torch.int32)
    )
    kc = _rand(num_blocks, page, hkv, d, dtype=dt)
    vc = _rand(num_blocks, page, hkv, d, dtype=dt)
    q = _rand(batch, 1, hq, d, dtype=dt)
    return q, kc, vc, torch.tensor(lengths, dtype=torch.int32, device=DEVICE), perm


@pytest.mark.parametrize("name", DECODE)
def test_decode_index_tensors_as_views(name):
    q, kc, vc, lens, table = _paged_case(_dtype(name))
    want = _run(name, D, q, kc, vc, lens, block_table=table)
    for lv, tv in [
        (_spread(lens), _spread(table, 1)),
        (lens.long(), table.long()),
        (_spread(lens.long()), _spread(table, 0)),
    ]:
        for validate in (None, False):
            got = _run(name, D, q, kc, vc, lv, block_table=tv, validate=validate)
            assert torch.equal(got, want), (name, lv.stride(), tv.stride(), validate)


@pytest.mark.parametrize("name", DECODE)
def test_decode_cache_seqlens_as_int(name):
    dt = _dtype(name)
    q, kc, vc = (
        _rand(3, 1, 4, 16, dtype=dt),
        _rand(3, 9, 2, 16, dtype=dt),
        _rand(3, 9, 2, 16, dtype=dt),
    )
    want = _run(name, D, q, kc, vc, torch.full((3,), 7, dtype=torch.int32, device=DEVICE))
    assert torch.equal(_run(name, D, q, kc, vc, 7), want)
    with pytest.raises(TypeError, match="cache_seqlens must be an int32/int64 tensor"):
        D(q, kc, vc, 7.0)


@pytest.mark.parametrize("name", APPEND)
@pytest.mark.parametrize("form", ["positions", "paged", "slots"])
def test_append_index_tensors_as_views(name, form):
    dt = _dtype(name)
    page, hkv, d = 4, 2, 16
    if form == "slots":
        k_new, v_new = _rand(5, hkv, d, dtype=dt), _rand(5, hkv, d, dtype=dt)
        pos = torch.tensor([3, -1, 9, 17, 0], dtype=torch.int32, device=DEVICE)
        table, cache_shape = None, (5, page, hkv, d)
    else:
        k_new, v_new = _rand(2, 3, hkv, d, dtype=dt), _rand(2, 3, hkv, d, dtype=dt)
        pos = torch.tensor([2, 5], dtype=torch.int32, device=DEVICE)
        if form == "paged":
            table = torch.tensor([[4, 1, 6], [0, 3, 2]], dtype=torch.int32, device=DEVICE)
            cache_shape = (7, page, hkv, d)
        else:
            table, cache_shape = None, (2, 9, hkv, d)
    kc0 = torch.zeros(cache_shape, dtype=dt, device=DEVICE)

    def append(p, t):
        kc, vc = kc0.clone(), kc0.clone()
        _run(name, P, k_new, v_new, kc, vc, p, block_table=t)
        return kc, vc

    want = append(pos, table)
    assert want[0].abs().sum() > 0
    views = [(_spread(pos), None if table is None else _spread(table, 1)), (pos.long(), table)]
    if table is not None:
        views.append((pos, table.long()))
    for p, t in views:
        got = append(p, t)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (name, form)


@pytest.mark.parametrize("name", sorted(set(DECODE) & set(APPEND)))
def test_caches_and_new_tokens_as_views(name):
    # a server's combined cache (num_blocks, 2, block_size, H, D): k and v are views with a
    # doubled block stride; new tokens sliced out of a fused qkv projection
    dt = _dtype(name)
    kv = torch.zeros(6, 2, 4, 2, 16, dtype=dt, device=DEVICE)
    qkv = _rand(2, 3, 8, 16, dtype=dt)  # (B, n, Hq 4 + Hk 2 + Hv 2, D)
    q, k_new, v_new = qkv[:, :, :4], qkv[:, :, 4:6], qkv[:, :, 6:]
    table = torch.tensor([[3, 0], [5, 1]], dtype=torch.int32, device=DEVICE)
    start = torch.tensor([2, 4], dtype=torch.int32, device=DEVICE)
    kc, vc = kv[:, 0], kv[:, 1]
    _run(name, P, k_new, v_new, kc, vc, start, block_table=table)
    out = _run(name, D, q, kc, vc, start + 3, block_table=table)
    kd, vd = kc.contiguous(), vc.contiguous()
    assert kd.abs().sum() > 0 and vd.abs().sum() > 0
    want = reference.decode_attention(q, kd, vd, start + 3, block_table=table)
    kw, vw = torch.zeros_like(kd), torch.zeros_like(vd)
    reference.kv_cache_append(k_new, v_new, kw, vw, start, block_table=table)
    assert torch.equal(kd, kw) and torch.equal(vd, vw), name
    assert rel_err(out, want) <= (1e-5 if dt == torch.float32 else 1e-2), name


# --- rows that belong to no sequence --------------------------------------------------------


@pytest.mark.parametrize("name", PREFILL)
def test_varlen_rows_outside_every_sequence_are_zero(name, monkeypatch):
    from conftest import poison_empty

    poison_empty(monkeypatch)
    dt = _dtype(name)
    q, k, v = _rand(9, 4, 16, dtype=dt), _rand(9, 2, 16, dtype=dt), _rand(9, 2, 16, dtype=dt)
    cu = torch.tensor(
        [0, 3, 6], dtype=torch.int32, device=DEVICE
    )  # rows 6..8 belong to no sequence
    out, lse = _run(
        name, A, q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=3, max_seqlen_k=3,
        validate=False, return_lse=True,
    )  # fmt: skip
    assert torch.equal(out[6:], torch.zeros_like(out[6:])), name
    assert torch.isneginf(lse[:, 6:]).all(), name
    ref = reference.attention(q[:6], k[:6], v[:6], cu_seqlens_q=cu, cu_seqlens_k=cu)
    assert rel_err(out[:6], ref) <= 1e-2


# --- NaN / inf where the lengths and masks say nothing is read -----------------------------


@pytest.mark.parametrize("name", DECODE)
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf")])
def test_decode_ignores_unused_cache_slots(name, paged, poison):
    dt = _dtype(name)
    q, kc, vc, lens, table = _paged_case(dt)
    if not paged:  # the same sequences as a contiguous cache
        rows = [gather_cache(kc, vc, b, 12, table) for b in range(2)]
        kc, vc = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
        table = None
    clean = _run(name, D, q, kc, vc, lens, block_table=table)
    kd, vd = kc.clone(), vc.clone()
    if table is None:
        for b, n in enumerate(lens.tolist()):
            kd[b, n:], vd[b, n:] = poison, poison
    else:
        used = torch.zeros(kd.shape[0] * kd.shape[1], dtype=torch.bool, device=DEVICE)
        for b, n in enumerate(lens.tolist()):
            for p in range(n):
                used[int(table[b, p // kd.shape[1]]) * kd.shape[1] + p % kd.shape[1]] = True
        kd.view(-1, *kd.shape[2:])[~used] = poison
        vd.view(-1, *vd.shape[2:])[~used] = poison
    for causal in (True, False):
        out = _run(name, D, q, kd, vd, lens, block_table=table, causal=causal)
        assert torch.isfinite(out).all(), (name, paged, poison, causal)
        if causal:
            _close(out, clean, (name, paged))


@pytest.mark.parametrize("name", PREFILL)
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_prefill_masked_keys_with_non_finite_values(name, poison):
    # the last key's value is poison: under the causal mask only the last row sees it
    dt = _dtype(name)
    q, k, v = (
        _rand(1, 6, 4, 16, dtype=dt),
        _rand(1, 6, 2, 16, dtype=dt),
        _rand(1, 6, 2, 16, dtype=dt),
    )
    clean = _run(name, A, q, k, v, causal=True)
    vd = v.clone()
    vd[0, -1] = poison
    out = _run(name, A, q, k, vd, causal=True)
    _close(out[0, :-1], clean[0, :-1], name)
    assert not torch.isfinite(out[0, -1]).any(), name  # the row that sees it: inf or NaN
    # a window that leaves the first key out of the later rows
    vd = v.clone()
    vd[0, 0] = poison
    clean = _run(name, A, q, k, v, window=(2, 0))
    out = _run(name, A, q, k, vd, window=(2, 0))
    _close(out[0, 3:], clean[0, 3:], name)
    # varlen: the poison is in another sequence's keys
    cu = torch.tensor([0, 3, 6], dtype=torch.int32, device=DEVICE)
    out = _run(name, A, q[0], k[0], vd[0], cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True)
    clean = _run(name, A, q[0], k[0], v[0], cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True)
    _close(out[3:], clean[3:], name)


@pytest.mark.parametrize("name", DECODE)
@pytest.mark.parametrize("q_len", [1, 3])
def test_decode_window_masked_values_non_finite(name, q_len):
    dt = _dtype(name)
    q = _rand(2, q_len, 4, 16, dtype=dt)
    kc, vc = _rand(2, 12, 2, 16, dtype=dt), _rand(2, 12, 2, 16, dtype=dt)
    lens = torch.tensor([10, 12], dtype=torch.int32, device=DEVICE)
    clean = _run(name, D, q, kc, vc, lens, window=(3, 0))
    vd = vc.clone()
    vd[:, :4] = float("inf")  # out of every row's window (rows see the last 4 + q_len - 1)
    out = _run(name, D, q, kc, vd, lens, window=(3, 0))
    _close(out, clean, name)


@pytest.mark.parametrize("name", PREFILL)
def test_nan_query_gives_nan(name):
    dt = _dtype(name)
    q, k, v = (
        _rand(1, 5, 2, 16, dtype=dt),
        _rand(1, 5, 2, 16, dtype=dt),
        _rand(1, 5, 2, 16, dtype=dt),
    )
    q[0, 2, 0, 3] = float("nan")
    for kw in (dict(), dict(causal=True)):
        out = _run(name, A, q, k, v, **kw)
        assert torch.isnan(out[0, 2, 0]).all(), (name, kw)
        assert torch.isfinite(out[0, :, 1]).all() and torch.isfinite(out[0, :2]).all()
    cu = torch.tensor([0, 5], dtype=torch.int32)
    out = _run(name, A, q[0], k[0], v[0], cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True)
    assert torch.isnan(out[2, 0]).all(), name


def test_reference_weighted_values_ieee_rules():
    # p * inf = inf for a kept key with p > 0; a key not kept adds nothing; inf - inf = NaN
    p = torch.tensor([[[[0.5, 0.5, 0.0]]]], dtype=torch.float64)  # (1, 1, 1, 3)
    v = torch.tensor([1.0, float("inf"), float("nan")], dtype=torch.float64).view(1, 3, 1, 1)
    # v: (B, Sk, H, D)
    keep = torch.tensor([True, True, False])
    out = weighted_values(p, keep, v)
    assert out.item() == float("inf")
    v2 = v.clone()
    v2[0, 0] = float("-inf")
    assert torch.isnan(weighted_values(p, keep, v2)).all()
    assert weighted_values(p, torch.tensor([True, False, False]), v).item() == 0.5


# --- unchecked invalid metadata: a subprocess, so that a crash fails the test ---------------

_UNCHECKED = r"""
import os, sys, torch, fastllm
from fastllm import ops
torch.manual_seed(int(sys.argv[2]))
name, compiled, device = sys.argv[1], sys.argv[3] == "1", sys.argv[4]
torch.set_default_device(device)
dt = torch.float16 if name in ("triton", "cuda") else torch.float32

def call(fn, *args, **kw):
    if compiled:
        return torch.compile(lambda *a: fn(*a, **kw), fullgraph=True, backend="eager")(*args)
    return fn(*args, validate=False, **kw)

def rand_index(n, lo, hi):
    return torch.randint(lo, hi, (n,), dtype=torch.int32)

with fastllm.use_backend(name):
    for trial in range(4):
        if "attention" in ops_wanted:
            t = 9
            q, k, v = (torch.randn(t, 4, 16).to(dt) for _ in range(3))
            k, v = k[:, :2].contiguous(), v[:, :2].contiguous()
            cu_q, cu_k = rand_index(4, -20, 40), rand_index(4, -20, 40)
            out = call(ops.attention, q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                       max_seqlen_q=int(torch.randint(0, 12, ())), max_seqlen_k=7, causal=bool(trial % 2))
            assert torch.isfinite(out).all(), ("attention", cu_q.tolist(), cu_k.tolist())
        if "decode_attention" in ops_wanted:
            q = torch.randn(3, 2, 4, 16).to(dt)
            kc, vc = torch.randn(5, 4, 2, 16).to(dt), torch.randn(5, 4, 2, 16).to(dt)
            lens, table = rand_index(3, -50, 50), rand_index(6, -9, 9).view(3, 2)
            out = call(ops.decode_attention, q, kc, vc, lens, block_table=table)
            assert torch.isfinite(out).all(), ("paged decode", lens.tolist(), table.tolist())
            out = call(ops.decode_attention, q, kc[:3], vc[:3], lens)
            assert torch.isfinite(out).all(), ("decode", lens.tolist())
        if "kv_cache_append" in ops_wanted:
            kc, vc = torch.zeros(5, 4, 2, 16).to(dt), torch.zeros(5, 4, 2, 16).to(dt)
            kn = torch.randn(3, 3, 2, 16).to(dt)
            table = rand_index(6, -9, 9).view(3, 2)
            call(ops.kv_cache_append, kn, kn, kc, vc, rand_index(3, -50, 50), block_table=table)
            call(ops.kv_cache_append, kn[0], kn[0], kc, vc, rand_index(3, -50, 50))
            call(ops.kv_cache_append, kn, kn, kc[:3], vc[:3], rand_index(3, -50, 50))
            assert torch.isfinite(kc).all() and torch.isfinite(vc).all()
print("ok")
"""


@pytest.mark.parametrize("compiled", [False, True], ids=["validate_false", "compiled"])
@pytest.mark.parametrize("name", sorted(set(PREFILL) | set(DECODE) | set(APPEND)), ids=lambda n: n)
def test_unchecked_invalid_metadata_in_subprocess(name, compiled):
    wanted = [op for op, names in (("attention", PREFILL), ("decode_attention", DECODE),
                                   ("kv_cache_append", APPEND)) if name in names]  # fmt: skip
    script = f"ops_wanted = {wanted!r}\n" + _UNCHECKED
    env = dict(os.environ)
    proc = subprocess.run(
        [sys.executable, "-c", script, name, "0", "1" if compiled else "0", str(DEVICE)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    assert proc.stdout.strip().endswith("ok")


# --- several threads ----------------------------------------------------------------------


# the Triton interpreter (no GPU) is not thread-safe; compiled Triton is
@pytest.mark.parametrize("name", [n for n in DECODE if HAS_GPU or n != "triton"])
def test_ops_from_eight_threads(name):
    from concurrent.futures import ThreadPoolExecutor

    q, kc, vc, lens, table = _paged_case(torch.float32)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32, device=DEVICE)
    x = _rand(7, 4, 16, dtype=torch.float32)

    def work(i):
        with fastllm.use_backend(name):
            d = D(q + i, kc, vc, lens, block_table=table)
            a = A(x + i, x[:, :2] + i, x[:, 2:] - i, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True)
        return d, a

    want = [work(i) for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(work, range(16)))
    for (d0, a0), (d1, a1) in zip(want, got):
        assert torch.equal(d0, d1) and torch.equal(a0, a1), name


# --- memory follows the lengths in use --------------------------------------------------------

_MEMORY = r"""
import resource, torch, fastllm
from fastllm import ops
q = torch.randn(1, 1, 2, 64)
kc, vc = torch.randn(8, 16, 2, 64), torch.randn(8, 16, 2, 64)  # a 128 KiB pool
lens = torch.tensor([10], dtype=torch.int32)
table = torch.zeros(1, 1 << 16, dtype=torch.int32)  # 65,536 blocks wide: 1 GiB if gathered
with fastllm.use_backend("torch"):
    ops.decode_attention(q, kc, vc, lens, block_table=table[:, :2])  # warm up
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = ops.decode_attention(q, kc, vc, lens, block_table=table)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) // 1024)
"""


def test_paged_decode_memory_follows_lengths():
    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    grown_mib = int(proc.stdout.strip().splitlines()[-1])
    assert grown_mib < 64, f"peak RSS grew by {grown_mib} MiB for a 10-token sequence"
