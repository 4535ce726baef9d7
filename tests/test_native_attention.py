"""The CUDA attention launchers (fastllm/native/attention.py, csrc/attention/).

On the CPU: the split-count heuristic, the workspace shapes, the supports() reasons, and
that the head dims the launcher offers are the ones the kernels instantiate. The `gpu`
tests call the launchers directly, at real sizes, against fastllm.reference.attention,
with every torch.empty poisoned (NaN) so that an output element the kernels forget to
write fails the comparison.
"""

import re
from pathlib import Path

import pytest
import torch
from conftest import HAS_GPU, poison_empty, rel_err

from fastllm import reference
from fastllm.native import attention as na

ROOT = Path(__file__).resolve().parents[1]
KERNEL_DTYPES = [torch.float16, torch.bfloat16]
TOL = 1e-2  # bf16/fp16


def _prefill_args(q, k, v, *, causal=False, window=(-1, -1), softcap=0.0, cu=None, lse=False):
    cu_q, cu_k = cu if cu is not None else (None, None)
    if cu is None:
        mq, mk = q.shape[1], k.shape[1]
    else:
        mq = int((cu_q[1:] - cu_q[:-1]).max()) if cu_q.numel() > 1 else 0
        mk = int((cu_k[1:] - cu_k[:-1]).max()) if cu_k.numel() > 1 else 0
    scale = q.shape[-1] ** -0.5
    right = 0 if causal else window[1]
    return (q, k, v, causal, scale, window[0], right, softcap, cu_q, cu_k, mq, mk, lse)


def _decode_args(
    q, kc, vc, seqlens, table=None, *, causal=True, window=(-1, -1), softcap=0.0, ns=0
):
    right = 0 if causal else window[1]
    scale = q.shape[-1] ** -0.5
    return (q, kc, vc, seqlens, table, scale, causal, window[0], right, softcap, ns)


# --- shapes only (CPU) -----------------------------------------------------------------------


def test_head_dims_match_the_kernel_dispatch():
    for name in ("prefill.cu", "decode.cu"):
        src = (ROOT / "csrc" / "attention" / name).read_text()
        switch = src[src.index("dispatch_head_dim") :]
        cases = tuple(int(x) for x in re.findall(r"case (\d+): return launch<T, \1>", switch))
        assert cases == na.HEAD_DIMS, (name, cases)


@pytest.mark.parametrize("sms", [1, 108, 132])
def test_num_splits_fills_the_gpu_when_the_cache_is_long(sms):
    # one sequence, 8 kv heads, a 64k-token cache: splits until ~2 blocks per SM
    s = na.choose_num_splits(1, 32, 8, 1, 65536, sms)
    blocks = 8 * na.decode_row_blocks(1, 32, 8)
    assert blocks * s >= min(2 * sms, 128 * blocks)
    assert s <= na.MAX_SPLITS
    assert 65536 // na.BLOCK_N // s >= na.MIN_TILES_PER_SPLIT


def test_num_splits_stays_one_when_the_batch_fills_the_gpu():
    assert na.choose_num_splits(64, 32, 8, 1, 4096, 132) == 1  # 512 blocks >= 264
    assert na.choose_num_splits(1, 32, 8, 1, 64, 132) == 1  # one tile: nothing to split
    assert na.choose_num_splits(0, 32, 8, 1, 4096, 132) == 1


@pytest.mark.parametrize(
    "batch,hq,hkv,q_len,capacity",
    [(1, 32, 8, 1, 1000), (3, 7, 7, 4, 5000), (2, 16, 1, 16, 300), (8, 32, 8, 1, 131072)],
)
def test_num_splits_bounds(batch, hq, hkv, q_len, capacity):
    for sms in (1, 7, 132):
        s = na.choose_num_splits(batch, hq, hkv, q_len, capacity, sms)
        tiles = -(-capacity // na.BLOCK_N)
        assert 1 <= s <= na.MAX_SPLITS
        assert s == 1 or tiles // s >= na.MIN_TILES_PER_SPLIT
        # more SMs never means fewer splits
        assert s <= na.choose_num_splits(batch, hq, hkv, q_len, capacity, sms * 2)


def test_decode_row_blocks():
    assert na.decode_row_blocks(1, 32, 8) == 1  # 4 rows
    assert na.decode_row_blocks(4, 32, 8) == 1  # 16 rows
    assert na.decode_row_blocks(5, 32, 8) == 2  # 20 rows
    assert na.decode_row_blocks(16, 64, 2) == 32  # 512 rows


def test_workspace_shapes():
    assert na.decode_workspace_shapes(3, 4, 32, 128, 1) is None
    o, lse = na.decode_workspace_shapes(3, 4, 32, 128, 5)
    assert o == (5, 3, 4, 32, 128) and lse == (5, 3, 4, 32)


def test_window_folds_causal():
    assert na._window(True, -1, -1) == (-1, 0)
    assert na._window(False, 7, -1) == (7, -1)
    assert na._window(False, 2**40, 3) == (2**30, 3)


def _qkv(shape_q, shape_k, dtype=torch.float16, device="cpu"):
    return (
        torch.randn(shape_q, dtype=dtype, device=device),
        torch.randn(shape_k, dtype=dtype, device=device),
        torch.randn(shape_k, dtype=dtype, device=device),
    )


def test_supports_prefill_reasons():
    q, k, v = _qkv((2, 9, 4, 64), (2, 11, 2, 64))
    assert "CUDA tensors" in na.supports_prefill(*_prefill_args(q, k, v))
    q32, k32, v32 = q.float(), k.float(), v.float()
    assert "dtype" in na.supports_prefill(*_prefill_args(q32, k32, v32))
    assert "one dtype" in na.supports_prefill(*_prefill_args(q, k.bfloat16(), v))
    q80, k80, v80 = _qkv((2, 9, 4, 80), (2, 11, 2, 80))
    assert "head_dim 80" in na.supports_prefill(*_prefill_args(q80, k80, v80))
    # a row stride that is not a multiple of 8 elements (head_dim 64 cut out of 68)
    k_pad = torch.randn(2, 11, 2, 68, dtype=torch.float16)[..., :64]
    assert "multiples of 8" in na.supports_prefill(*_prefill_args(q, k_pad, v))
    # a base that is not 16-byte aligned
    flat = torch.randn(2 * 11 * 2 * 64 + 1, dtype=torch.float16)
    v_off = flat[1:].view(2, 11, 2, 64)
    assert "aligned" in na.supports_prefill(*_prefill_args(q, k, v_off))
    # head_dim not the unit stride
    q_t = torch.randn(2, 9, 64, 4, dtype=torch.float16).transpose(-1, -2)
    assert "stride" in na.supports_prefill(*_prefill_args(q_t, k, v))
    # varlen: cu_seqlens must be int32
    qp, kp, vp = _qkv((9, 4, 64), (11, 2, 64))
    cu = (torch.tensor([0, 4, 9]), torch.tensor([0, 5, 11]))
    assert "int32" in na.supports_prefill(*_prefill_args(qp, kp, vp, cu=cu))
    cu32 = tuple(c.int() for c in cu)
    assert "CUDA tensors" in na.supports_prefill(*_prefill_args(qp, kp, vp, cu=cu32))


def test_supports_decode_reasons():
    q = torch.randn(2, 1, 8, 128, dtype=torch.bfloat16)
    kc = torch.randn(2, 100, 2, 128, dtype=torch.bfloat16)
    vc = torch.randn(2, 100, 2, 128, dtype=torch.bfloat16)
    lens = torch.tensor([5, 100], dtype=torch.int32)
    assert "CUDA tensors" in na.supports_decode(*_decode_args(q, kc, vc, lens))
    assert "int32" in na.supports_decode(*_decode_args(q, kc, vc, lens.long()))
    q17 = torch.randn(2, 17, 8, 128, dtype=torch.bfloat16)
    assert "q_len 17" in na.supports_decode(*_decode_args(q17, kc, vc, lens))
    q96 = torch.randn(2, 1, 8, 96, dtype=torch.bfloat16)
    kc96, vc96 = kc[..., :96].contiguous(), vc[..., :96].contiguous()
    assert "head_dim 96" in na.supports_decode(*_decode_args(q96, kc96, vc96, lens))
    pages = torch.randn(7, 16, 2, 128, dtype=torch.bfloat16)
    table = torch.randint(0, 7, (2, 4))
    assert "block_table" in na.supports_decode(*_decode_args(q, pages, pages, lens, table))
    assert "CUDA tensors" in na.supports_decode(*_decode_args(q, pages, pages, lens, table.int()))
    assert "num_splits" in na.supports_decode(*_decode_args(q, kc, vc, lens, ns=70000))


# --- GPU: the kernels against the reference --------------------------------------------------

gpu = pytest.mark.gpu


def _need_kernels():
    if not HAS_GPU:
        pytest.skip("needs a CUDA GPU")
    q = torch.empty(1, 1, 1, 64, dtype=torch.float16, device="cuda")
    reason = na._device_reason(q)
    if reason is not None:
        pytest.fail(f"the CUDA attention kernels cannot run here: {reason}")


def _check_prefill(args, monkeypatch):
    q, k, v, causal, scale, wl, wr, softcap, cu_q, cu_k, mq, mk, want_lse = args
    assert na.supports_prefill(*args) is None, na.supports_prefill(*args)
    ref_out, ref_lse = reference.attention(
        q,
        k,
        v,
        causal=causal,
        scale=scale,
        window_left=wl,
        window_right=wr,
        softcap=softcap,
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        return_lse=True,
    )
    with monkeypatch.context() as m:
        poison_empty(m)
        out, lse = na.prefill(*args)
        torch.cuda.synchronize()
    assert out.shape == q.shape and out.dtype == q.dtype
    err = rel_err(out, ref_out)
    assert err <= TOL, f"out rel err {err}"
    if want_lse:
        assert lse.shape == ref_lse.shape and lse.dtype == torch.float32
        assert not torch.isnan(lse).any()
        ref_lse = ref_lse.float()
        finite = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse), finite), "rows that see no key must get -inf"
        assert (lse[~finite] == float("-inf")).all()
        assert rel_err(lse[finite], ref_lse[finite]) <= 1e-3
    else:
        assert lse is None


@gpu
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("head_dim", na.HEAD_DIMS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "batch,sq,sk,hq,hkv",
    [(1, 1, 1, 4, 4), (2, 17, 17, 8, 2), (2, 257, 257, 8, 1), (3, 128, 300, 16, 2),
     (2, 300, 128, 4, 4), (1, 1029, 1029, 32, 4)],
)  # fmt: skip
def test_prefill_matches_reference(dtype, head_dim, causal, batch, sq, sk, hq, hkv, monkeypatch):
    _need_kernels()
    q, k, v = _qkv((batch, sq, hq, head_dim), (batch, sk, hkv, head_dim), dtype, "cuda")
    _check_prefill(_prefill_args(q, k, v, causal=causal, lse=True), monkeypatch)


@gpu
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("head_dim", na.HEAD_DIMS)
@pytest.mark.parametrize(
    "causal,window,softcap",
    [(True, (100, -1), 0.0), (False, (64, 32), 0.0), (False, (0, 0), 0.0),
     (False, (-1, -1), 30.0), (True, (200, -1), 5.0), (False, (-1, 3), 0.0)],
)  # fmt: skip
def test_prefill_window_and_softcap(dtype, head_dim, causal, window, softcap, monkeypatch):
    _need_kernels()
    q, k, v = _qkv((2, 333, 8, head_dim), (2, 517, 2, head_dim), dtype, "cuda")
    q = q * 3  # large scores, so that the softcap matters
    args = _prefill_args(q, k, v, causal=causal, window=window, softcap=softcap, lse=True)
    _check_prefill(args, monkeypatch)


@gpu
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("head_dim", na.HEAD_DIMS)
@pytest.mark.parametrize("causal", [False, True])
def test_prefill_varlen(dtype, head_dim, causal, monkeypatch):
    _need_kernels()
    lens_q = [0, 1, 17, 300, 65, 1029, 5]
    lens_k = [3, 1, 17, 500, 0, 1029, 64]
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = _qkv((sum(lens_q), 8, head_dim), (sum(lens_k), 4, head_dim), dtype, "cuda")
    cu = (cu_q.cuda(), cu_k.cuda())
    _check_prefill(_prefill_args(q, k, v, causal=causal, cu=cu, lse=True), monkeypatch)
    _check_prefill(_prefill_args(q, k, v, causal=causal, cu=cu, lse=False), monkeypatch)


@gpu
@pytest.mark.parametrize("head_dim", na.HEAD_DIMS)
def test_prefill_strided_views(head_dim, monkeypatch):
    # (B, H, S, D) tensors seen as (B, S, H, D): no copy, strides passed through
    _need_kernels()
    qh = torch.randn(2, 8, 191, head_dim, dtype=torch.bfloat16, device="cuda")
    kh = torch.randn(2, 2, 203, head_dim, dtype=torch.bfloat16, device="cuda")
    vh = torch.randn(2, 2, 203, head_dim, dtype=torch.bfloat16, device="cuda")
    q, k, v = qh.transpose(1, 2), kh.transpose(1, 2), vh.transpose(1, 2)
    _check_prefill(_prefill_args(q, k, v, causal=True, lse=True), monkeypatch)


def _paged(kc, vc, block_size):
    """The contiguous caches (B, S, Hkv, D) scattered into shuffled pages."""
    batch, s_max = kc.shape[:2]
    per_seq = -(-s_max // block_size)
    num_blocks = batch * per_seq + 3
    perm = torch.randperm(num_blocks, device=kc.device)[: batch * per_seq]
    table = perm.view(batch, per_seq).int()
    pages_k = torch.randn(num_blocks, block_size, *kc.shape[2:], dtype=kc.dtype, device=kc.device)
    pages_v = torch.randn_like(pages_k)
    pad = per_seq * block_size - s_max
    kp = torch.nn.functional.pad(kc, (0, 0, 0, 0, 0, pad)).view(
        batch, per_seq, block_size, *kc.shape[2:]
    )
    vp = torch.nn.functional.pad(vc, (0, 0, 0, 0, 0, pad)).view(
        batch, per_seq, block_size, *kc.shape[2:]
    )
    pages_k[table.long()] = kp
    pages_v[table.long()] = vp
    return pages_k, pages_v, table


def _check_decode(args, monkeypatch):
    q, kc, vc, lens, table, scale, causal, wl, wr, softcap, ns = args
    assert na.supports_decode(*args) is None, na.supports_decode(*args)
    ref = reference.decode_attention(
        q,
        kc,
        vc,
        lens,
        block_table=table,
        scale=scale,
        causal=causal,
        window_left=wl,
        window_right=wr,
        softcap=softcap,
    )
    with monkeypatch.context() as m:
        poison_empty(m)
        out = na.decode(*args)
        torch.cuda.synchronize()
    assert out.shape == q.shape and out.dtype == q.dtype
    err = rel_err(out, ref)
    assert err <= TOL, f"rel err {err}"


@gpu
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("head_dim", na.HEAD_DIMS)
@pytest.mark.parametrize("q_len", [1, 4])
@pytest.mark.parametrize("hq,hkv", [(32, 8), (16, 1), (6, 6)])
@pytest.mark.parametrize("num_splits", [0, 1, 7])
@pytest.mark.parametrize("block_size", [None, 16, 32])
def test_decode_matches_reference(
    dtype, head_dim, q_len, hq, hkv, num_splits, block_size, monkeypatch
):
    _need_kernels()
    batch, s_max = 3, 2000
    q = torch.randn(batch, q_len, hq, head_dim, dtype=dtype, device="cuda")
    kc = torch.randn(batch, s_max, hkv, head_dim, dtype=dtype, device="cuda")
    vc = torch.randn(batch, s_max, hkv, head_dim, dtype=dtype, device="cuda")
    lens = torch.tensor([1, 777, s_max], dtype=torch.int32, device="cuda")
    table = None
    if block_size is not None:
        kc, vc, table = _paged(kc, vc, block_size)
    _check_decode(_decode_args(q, kc, vc, lens, table, ns=num_splits), monkeypatch)


@gpu
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("head_dim", na.HEAD_DIMS)
@pytest.mark.parametrize(
    "causal,window,softcap",
    [(False, (-1, -1), 0.0), (True, (300, -1), 0.0), (True, (-1, -1), 20.0), (True, (0, -1), 0.0)],
)
@pytest.mark.parametrize("block_size", [None, 16])
def test_decode_window_softcap(dtype, head_dim, causal, window, softcap, block_size, monkeypatch):
    _need_kernels()
    batch, s_max, q_len = 2, 4099, 4
    q = 3 * torch.randn(batch, q_len, 8, head_dim, dtype=dtype, device="cuda")
    kc = torch.randn(batch, s_max, 2, head_dim, dtype=dtype, device="cuda")
    vc = torch.randn(batch, s_max, 2, head_dim, dtype=dtype, device="cuda")
    lens = torch.tensor([2, 4001], dtype=torch.int32, device="cuda")
    table = None
    if block_size is not None:
        kc, vc, table = _paged(kc, vc, block_size)
    for ns in (0, 5):
        args = _decode_args(
            q, kc, vc, lens, table, causal=causal, window=window, softcap=softcap, ns=ns
        )
        _check_decode(args, monkeypatch)


@gpu
def test_decode_long_cache_splits_and_every_length(monkeypatch):
    # one sequence at 64k fills the GPU through splits; lengths 1..max across the batch
    _need_kernels()
    q = torch.randn(1, 1, 32, 128, dtype=torch.bfloat16, device="cuda")
    kc = torch.randn(1, 65536, 8, 128, dtype=torch.bfloat16, device="cuda")
    vc = torch.randn_like(kc)
    lens = torch.tensor([65536], dtype=torch.int32, device="cuda")
    assert na.choose_num_splits(1, 32, 8, 1, 65536, na.sm_count(torch.cuda.current_device())) > 1
    _check_decode(_decode_args(q, kc, vc, lens), monkeypatch)
    batch = 9
    q = torch.randn(batch, 1, 8, 64, dtype=torch.float16, device="cuda")
    kc = torch.randn(batch, 1000, 8, 64, dtype=torch.float16, device="cuda")
    vc = torch.randn_like(kc)
    lens = torch.tensor([1, 2, 63, 64, 65, 255, 256, 999, 1000], dtype=torch.int32, device="cuda")
    for ns in (0, 1, 3, 16):
        _check_decode(_decode_args(q, kc, vc, lens, ns=ns), monkeypatch)


@gpu
def test_decode_in_a_cuda_graph():
    _need_kernels()
    batch, s_max = 4, 3000
    q = torch.randn(batch, 1, 16, 128, dtype=torch.bfloat16, device="cuda")
    kc = torch.randn(batch, s_max, 4, 128, dtype=torch.bfloat16, device="cuda")
    vc = torch.randn_like(kc)
    lens = torch.tensor([10, 20, 30, 40], dtype=torch.int32, device="cuda")
    args = _decode_args(q, kc, vc, lens, ns=6)
    na.decode(*args)  # warm-up outside the capture (smem attribute, allocator)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = na.decode(*args)
    for new_lens in ([2999, 1, 1500, 64], [3000, 3000, 7, 128]):
        lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        q.copy_(torch.randn_like(q))
        graph.replay()
        torch.cuda.synchronize()
        ref = reference.decode_attention(q, kc, vc, lens, scale=128**-0.5, causal=True)
        assert rel_err(out, ref) <= TOL
