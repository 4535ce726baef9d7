"""The CUDA attention launchers (fastllm/native/attention.py, csrc/attention/).

On the CPU: the split-count heuristic, the workspace shapes, the supports() reasons, that
the head dims the launcher offers are the ones the kernels instantiate, and a lane-level
emulation of both kernels' index math (end of the file). The `gpu`
tests call the launchers directly, at real sizes, against fastllm.reference.attention,
with every torch.empty poisoned (NaN) so that an output element the kernels forget to
write fails the comparison.
"""

import re
from pathlib import Path

import numpy as np
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


def test_launchers_take_the_ops_normalized_arguments():
    # fastllm/ops/attention.py passes every backend the same positional arguments
    import inspect

    import fastllm.ops.attention  # noqa: F401 - registers the backends
    from fastllm import backend

    for op, fns in (
        ("attention", (na.prefill, na.supports_prefill)),
        ("decode_attention", (na.decode, na.supports_decode)),
    ):
        want = len(inspect.signature(backend.implementation(op, "reference")).parameters)
        for fn in fns:
            assert len(inspect.signature(fn).parameters) == want, (op, fn.__name__)


def _binding_args(name: str) -> list[str]:
    """The py::arg names of one launcher in csrc/attention/bindings.cpp: those of its
    def_prefill/def_decode template, then the last one named where it is bound."""
    src = (ROOT / "csrc" / "attention" / "bindings.cpp").read_text()
    kind = "prefill" if "prefill" in name else "decode"
    start = src.index(f"void def_{kind}(")
    end = src.index("\n}\n", start)
    last = re.search(rf'def_{kind}\(\s*m,\s*"{name}",\s*"[^"]*",\s*"(\w+)"', src)
    assert last is not None, f"{name} is not bound with def_{kind}"
    return re.findall(r'py::arg\("(\w+)"\)', src[start:end]) + [last.group(1)]


class _Recorder:
    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda **kw: self.calls.append((name, kw))


@pytest.fixture
def recorded(monkeypatch):
    """The launchers run on CPU tensors against a module that records its calls."""
    import contextlib

    from fastllm import native

    rec = _Recorder()
    monkeypatch.setattr(native, "module", lambda: rec)
    monkeypatch.setattr(native, "stream_of", lambda t: 7)
    monkeypatch.setattr(na, "sm_count", lambda index: 132)
    monkeypatch.setattr(na, "_index", lambda device: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    return rec


def test_prefill_launcher_passes_what_the_binding_takes(recorded):
    q = torch.randn(2, 8, 5, 64, dtype=torch.bfloat16).transpose(1, 2)  # (B, S, H, D) view
    k, v = _qkv((2, 9, 1, 64), (2, 9, 1, 64), torch.bfloat16)[1:]
    out, lse = na.prefill(*_prefill_args(q, k, v, causal=True, window=(3, -1), lse=True))
    ((name, kw),) = recorded.calls
    assert name == "attention_prefill" and sorted(kw) == sorted(_binding_args(name))
    assert kw["q_strides"] == q.stride()[:3] and kw["k_strides"] == k.stride()[:3]
    assert kw["o_strides"] == out.stride()[:3] and out.is_contiguous() and out.shape == q.shape
    assert lse.shape == (2, 8, 5) and kw["lse_strides"] == lse.stride()
    assert (kw["window_left"], kw["window_right"]) == (3, 0)
    assert (kw["batch"], kw["heads_q"], kw["heads_kv"], kw["seqlen_q"], kw["seqlen_k"]) == (
        2,
        8,
        1,
        5,
        9,
    )
    assert kw["dtype"] == 2 and kw["stream"] == 7 and kw["out"] == out.data_ptr()
    # varlen: batch strides 0, lse (Hq, Tq), no lse pointer when not asked
    qp, kp, vp = _qkv((9, 4, 128), (11, 2, 128))
    cu = (torch.tensor([0, 4, 9], dtype=torch.int32), torch.tensor([0, 5, 11], dtype=torch.int32))
    recorded.calls.clear()
    out, lse = na.prefill(*_prefill_args(qp, kp, vp, cu=cu, lse=True))
    ((_, kw),) = recorded.calls
    assert kw["q_strides"] == (0, 4 * 128, 128) and kw["k_strides"] == (0, 2 * 128, 128)
    assert lse.shape == (4, 9) and kw["lse_strides"] == (0, 9, 1)
    assert (kw["batch"], kw["seqlen_q"], kw["seqlen_k"]) == (2, 5, 6)
    assert kw["cu_seqlens_q"] == cu[0].data_ptr() and kw["cu_seqlens_k"] == cu[1].data_ptr()
    recorded.calls.clear()
    out, lse = na.prefill(*_prefill_args(qp, kp, vp, cu=cu, lse=False))
    assert lse is None and recorded.calls[0][1]["lse"] == 0


def test_decode_launcher_passes_what_the_binding_takes(recorded):
    q = torch.randn(3, 2, 8, 128, dtype=torch.float16)
    kc = torch.randn(3, 4096, 2, 128, dtype=torch.float16)
    lens = torch.tensor([1, 2, 3], dtype=torch.int32)
    out = na.decode(*_decode_args(q, kc, kc, lens))
    ((name, kw),) = recorded.calls
    assert name == "attention_decode" and sorted(kw) == sorted(_binding_args(name))
    splits = na.choose_num_splits(3, 8, 2, 2, 4096, 132)
    assert splits > 1 and kw["num_splits"] == splits
    assert kw["o_partial"] != 0 and kw["lse_partial"] != 0
    assert (kw["capacity"], kw["block_size"], kw["num_blocks"], kw["block_table"]) == (
        4096,
        0,
        0,
        0,
    )
    assert kw["k_strides"] == kc.stride()[:3] and kw["o_strides"] == out.stride()[:3]
    assert (kw["window_left"], kw["window_right"]) == (-1, 0)
    # paged, one split forced: no workspace
    pages = torch.randn(50, 16, 2, 128, dtype=torch.float16)
    table = torch.randint(0, 50, (3, 7), dtype=torch.int32)
    recorded.calls.clear()
    na.decode(*_decode_args(q, pages, pages, lens, table, causal=False, ns=1))
    ((_, kw),) = recorded.calls
    assert (kw["capacity"], kw["block_size"], kw["num_blocks"]) == (7 * 16, 16, 50)
    assert kw["block_table"] == table.data_ptr() and kw["block_table_stride"] == 7
    assert kw["num_splits"] == 1 and kw["o_partial"] == 0 and kw["lse_partial"] == 0
    assert (kw["window_left"], kw["window_right"]) == (-1, -1)


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


def _cuda_caches(batch, s_max, hkv, head_dim, dtype, block_size):
    """Random K and V caches (batch, s_max, hkv, head_dim) on the GPU, contiguous (block_size
    None, table None) or scattered into shuffled pages of block_size tokens."""
    kc = torch.randn(batch, s_max, hkv, head_dim, dtype=dtype, device="cuda")
    vc = torch.randn(batch, s_max, hkv, head_dim, dtype=dtype, device="cuda")
    if block_size is None:
        return kc, vc, None
    return _paged(kc, vc, block_size)


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
    kc, vc, table = _cuda_caches(batch, s_max, hkv, head_dim, dtype, block_size)
    lens = torch.tensor([1, 777, s_max], dtype=torch.int32, device="cuda")
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
    kc, vc, table = _cuda_caches(batch, s_max, 2, head_dim, dtype, block_size)
    lens = torch.tensor([2, 4001], dtype=torch.int32, device="cuda")
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


def _poisoned(v, keys, values):
    out = v.clone()
    for key, value in zip(keys, values):
        out[:, key] = value
    return out


@gpu
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("head_dim", na.HEAD_DIMS)
def test_prefill_values_of_masked_keys_stay_out(dtype, head_dim):
    # causal: key j is seen by rows >= j only, inside a masked (diagonal) tile; an inf or NaN
    # value must reach exactly those rows (p = 0 times inf is NaN in a plain P V product)
    _need_kernels()
    q, k, v = _qkv((2, 150, 4, head_dim), (2, 150, 2, head_dim), dtype, "cuda")
    clean, _ = na.prefill(*_prefill_args(q, k, v, causal=True))
    for keys, values in (([100], [float("nan")]), ([100], [float("inf")]),
                         ([100, 101], [float("inf"), float("-inf")])):  # fmt: skip
        out, _ = na.prefill(*_prefill_args(q, k, _poisoned(v, keys, values), causal=True))
        first = keys[0]
        assert rel_err(out[:, :first], clean[:, :first]) <= TOL, (keys, values)
        assert not torch.isfinite(out[:, first:]).any(), (keys, values)
        if values == [float("inf"), float("-inf")]:
            assert torch.isposinf(out[:, first]).all()  # p > 0 times +inf
            assert torch.isnan(out[:, first + 1 :]).all()  # inf - inf
    # a window that leaves key 3 out of rows >= 6, and varlen: poison in another sequence
    vd = _poisoned(v, [3], [float("inf")])
    clean, _ = na.prefill(*_prefill_args(q, k, v, window=(2, 0)))
    out, _ = na.prefill(*_prefill_args(q, k, vd, window=(2, 0)))
    assert rel_err(out[:, 6:], clean[:, 6:]) <= TOL
    cu = torch.tensor([0, 3, 150], dtype=torch.int32, device="cuda")
    flat = (q[0], k[0], vd[0])
    out, _ = na.prefill(*_prefill_args(*flat, causal=True, cu=(cu, cu)))
    clean, _ = na.prefill(*_prefill_args(q[0], k[0], v[0], causal=True, cu=(cu, cu)))
    assert rel_err(out[:3], clean[:3]) <= TOL and not torch.isfinite(out[3:]).any()


@gpu
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("head_dim", na.HEAD_DIMS)
@pytest.mark.parametrize("block_size", [None, 16])
def test_decode_values_of_masked_keys_stay_out(dtype, head_dim, block_size):
    # q_len 4, causal: the last key of each sequence is seen by its last query alone; a
    # window of 100 also keeps key 10 out of every row
    _need_kernels()
    batch, s_max = 2, 300
    q = torch.randn(batch, 4, 8, head_dim, dtype=dtype, device="cuda")
    kc, vc, table = _cuda_caches(batch, s_max, 2, head_dim, dtype, block_size)
    lens = torch.tensor([200, 300], dtype=torch.int32, device="cuda")

    def poisoned(positions):  # (sequence, position, value)
        out = vc.clone()
        for b, pos, value in positions:
            if table is None:
                out[b, pos] = value
            else:
                out[int(table[b, pos // block_size]), pos % block_size] = value
        return out

    last = [(0, 199, float("nan")), (1, 299, float("inf"))]
    for window, positions in (((-1, -1), last), ((100, -1), [*last, (0, 10, float("inf")),
                                                               (1, 10, float("nan"))])):  # fmt: skip
        vd = poisoned(positions)
        for ns in (0, 1, 3):
            clean = na.decode(*_decode_args(q, kc, vc, lens, table, window=window, ns=ns))
            out = na.decode(*_decode_args(q, kc, vd, lens, table, window=window, ns=ns))
            assert rel_err(out[:, :3], clean[:, :3]) <= TOL, (window, ns)
            assert not torch.isfinite(out[:, 3]).any(), (window, ns)


# --- CPU emulation of the kernels' index math ----------------------------------------------
#
# The functions below restate csrc/attention/prefill.cu and decode.cu lane by lane (the
# shared-memory addresses each lane hands to ldmatrix, the thread -> chunk maps of the tile
# loads, the masks, the online softmax, the inf/NaN path of masked tiles, the warp merge and
# the split merge) on top of the PTX ISA's definitions of ldmatrix.x4 (.trans) and of the
# mma.m16n8k16 fragments. P and the output are rounded to fp16 where the kernels round them.
# If a lane offset, a fragment register or a mask bound is wrong, the result misses the
# reference.

_L = np.arange(32)
_G, _C = _L // 4, _L % 4
_R4, _H2 = np.arange(4)[None, :, None], np.arange(2)[None, None, :]
# A (16x16): register r, half h of lane l holds A[g + 8 (r % 2)][2c + h + 8 (r // 2)]
_A_ROW = np.broadcast_to(_G[:, None, None] + 8 * (_R4 % 2), (32, 4, 2))
_A_COL = np.broadcast_to(2 * _C[:, None, None] + _H2 + 8 * (_R4 // 2), (32, 4, 2))
# B (16x8): register r, half h holds B[2c + h + 8 r][g]
_B_ROW = np.broadcast_to(2 * _C[:, None, None] + _H2 + 8 * np.arange(2)[None, :, None], (32, 2, 2))
_B_COL = np.broadcast_to(_G[:, None, None], (32, 2, 2))
# C (16x8): element e holds C[g + 8 (e // 2)][2c + e % 2]
_C_ROW = _G[:, None] + 8 * (np.arange(4)[None, :] // 2)
_C_COL = 2 * _C[:, None] + np.arange(4)[None, :] % 2
_LOG2E, _LN2 = 1.4426950408889634, 0.6931471805599453
_UNWRITTEN = -1.25e300  # shared memory nothing wrote (no fp16 value is this)


def _ldmatrix_x4(smem, addr, trans=False):
    """addr [32] element offsets (lanes 8i..8i+7: rows of matrix i) -> regs [32, 4, 2]."""
    m = smem[addr.reshape(4, 8)[:, :, None] + np.arange(8)]  # [matrix, row, col]
    i, h = np.arange(4)[None, :, None], _H2
    r, c = (_L // 4)[:, None, None], 2 * (_L % 4)[:, None, None] + h
    out = m[i, c, r] if trans else m[i, r, c]
    assert not (out == _UNWRITTEN).any(), "ldmatrix read shared memory nothing wrote"
    return out


def _mma(d, a, b):
    """d [32, 4] += A B with a [32, 4, 2] and b [32, 2, 2] fragments."""
    A, B = np.empty((16, 16)), np.empty((16, 8))
    A[_A_ROW, _A_COL] = a
    B[_B_ROW, _B_COL] = b
    return d + (A @ B)[_C_ROW, _C_COL]


def _f16(x):
    return np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float64)


def _quad(v, op):
    for off in (1, 2):
        v = op(v, v[_L ^ off])
    return v


def _key_range(pos, n, wl, wr):
    pos = np.asarray(pos)
    lo = np.zeros_like(pos) if wl < 0 else np.clip(pos - wl, 0, n)
    hi = np.full_like(pos, n) if wr < 0 else np.clip(pos + wr + 1, 0, n)
    return lo, hi


def _tile_chunks(rows, d, threads=128):
    """(row, col) of every 16-byte chunk, in the kernels' thread -> chunk order; each once."""
    cpr = d // 8
    rpp = threads // cpr
    tid = np.arange(threads)[:, None]
    r = tid // cpr + np.arange(rows // rpp)[None, :] * rpp
    col = np.broadcast_to((tid % cpr) * 8, r.shape)
    assert len({(a, b) for a, b in zip(r.ravel(), col.ravel())}) == rows * cpr
    return r.ravel(), col.ravel()


def _store_tile(smem, base, stride, rows, d, tile):
    """cp.async tile load of tile [rows, d] (zero rows where the kernel zero-fills)."""
    for r, col in zip(*_tile_chunks(rows, d)):
        smem[base + r * stride + col : base + r * stride + col + 8] = tile[r, col : col + 8]


def _rows(src, start, valid, rows):
    """src[start + r] for r < valid, zeros after: what a zero-filling tile load reads."""
    tile = np.zeros((rows, src.shape[-1]))
    n = max(0, min(valid, rows))
    tile[:n] = src[start : start + n]
    return tile


def _cache_rows(cache, table, b, hk, kb, n_keys):
    """64 cache rows from key kb: zeros past n_keys and for block ids out of range."""
    tile = np.zeros((64, cache.shape[-1]))
    for r in range(64):
        key = kb + r
        if key >= n_keys:
            continue
        if table is None:
            tile[r] = cache[b, key, hk]
        else:
            blk = int(table[b, key // cache.shape[1]])
            if 0 <= blk < cache.shape[0]:
                tile[r] = cache[blk, key % cache.shape[1], hk]
    return tile


def _warp_scores(smem, w, s_base, key_tiles, d, stride, lo, hi, key0, mask, p):
    """One warp's S = Q K^T over key_tiles n-tiles, logits, online softmax (the accumulator
    rescaled); returns P."""
    nt = key_tiles
    s = np.zeros((nt, 32, 4))
    base = s_base + ((_L & 7) + (_L >> 4) * 8) * stride + ((_L >> 3) & 1) * 8
    for kk in range(d // 16):
        for np_ in range(nt // 2):
            bf = _ldmatrix_x4(smem, base + np_ * 16 * stride + kk * 16)
            s[2 * np_] = _mma(s[2 * np_], w["qf"][kk], bf[:, 0:2])
            s[2 * np_ + 1] = _mma(s[2 * np_ + 1], w["qf"][kk], bf[:, 2:4])
    key = key0 + 8 * np.arange(nt)[:, None, None] + 2 * _C[None, :, None] + np.arange(4) % 2
    if p["softcap"] > 0:
        s = np.tanh(s * p["scale"] / p["softcap"]) * p["softcap"] * _LOG2E
    else:
        s = s * p["scale"] * _LOG2E
    if mask:
        lo_e = np.stack([lo[0], lo[0], lo[1], lo[1]], -1)[None]
        hi_e = np.stack([hi[0], hi[0], hi[1], hi[1]], -1)[None]
        s = np.where((key < lo_e) | (key >= hi_e), -np.inf, s)
    alpha = np.zeros((32, 2))
    for i in range(2):
        mx = _quad(
            np.maximum(w["m"][:, i], s[:, :, 2 * i : 2 * i + 2].max(axis=(0, 2))), np.maximum
        )
        ref = np.where(mx == -np.inf, 0.0, mx)
        alpha[:, i] = np.exp2(w["m"][:, i] - ref)
        w["m"][:, i] = mx
        s[:, :, 2 * i : 2 * i + 2] = np.exp2(s[:, :, 2 * i : 2 * i + 2] - ref[None, :, None])
        w["l"][:, i] = w["l"][:, i] * alpha[:, i] + s[:, :, 2 * i : 2 * i + 2].sum(axis=(0, 2))
    w["acc"] *= alpha[None, :, [0, 0, 1, 1]]
    return s


def _tile_values(smem, base, stride, rows, d):
    """Addresses of the rows x d values of a tile (not its padding columns)."""
    return base + np.arange(rows)[:, None] * stride + np.arange(d)[None, :]


def _add_nonfinite(smem, w, v_base, stride, d, key0, n_keys, lo, hi):
    """mma.cuh add_nonfinite for one warp: the inf/NaN values of the keys each row sees,
    added to the accumulator elements (row g + 8 i, column 8 t + 2 c + e) a lane holds."""
    cols = 8 * np.arange(d // 8)[:, None] + np.arange(2)[None, :]  # [t, e]
    for lane in range(32):
        for i in range(2):
            for key in range(max(lo[i][lane], key0), min(hi[i][lane], key0 + n_keys)):
                x = smem[v_base + (key - key0) * stride + 2 * _C[lane] + cols]
                w["acc"][:, lane, 2 * i : 2 * i + 2] += np.where(np.isfinite(x), 0.0, x)


def _nonfinite_path(smem, warps, v_base, stride, d, parts):
    """The kernels' slow path for a masked tile whose V holds an inf/NaN: every warp adds
    the values its rows see (parts: per warp (offset of its first key's row, key0, n_keys,
    lo, hi)), then the values are zeroed in shared memory."""
    at = _tile_values(smem, v_base, stride, 64, d)
    if np.isfinite(smem[at]).all():
        return
    for w, (row, key0, n_keys, lo, hi) in zip(warps, parts):
        _add_nonfinite(smem, w, v_base + row * stride, stride, d, key0, n_keys, lo, hi)
    smem[at] = np.where(np.isfinite(smem[at]), smem[at], 0.0)


def _warp_pv(smem, w, s, v_base, key_tiles, d, stride):
    """O += P V for one warp."""
    nt = key_tiles
    base = v_base + ((_L & 7) + ((_L >> 3) & 1) * 8) * stride + (_L >> 4) * 8
    for j in range(nt // 2):
        pf = _f16(
            np.stack(
                [s[2 * j][:, 0:2], s[2 * j][:, 2:4], s[2 * j + 1][:, 0:2], s[2 * j + 1][:, 2:4]], 1
            )
        )
        for dp in range(d // 16):
            bf = _ldmatrix_x4(smem, base + j * 16 * stride + dp * 16, trans=True)
            w["acc"][2 * dp] = _mma(w["acc"][2 * dp], pf, bf[:, 0:2])
            w["acc"][2 * dp + 1] = _mma(w["acc"][2 * dp + 1], pf, bf[:, 2:4])


def _new_warp(d):
    return {
        "acc": np.zeros((d // 8, 32, 4)),
        "m": np.full((32, 2), -np.inf),
        "l": np.zeros((32, 2)),
    }


def _emulate_prefill(q, k, v, cu_q, cu_k, max_q, p):
    """q [Tq, Hq, D], k/v [Tk, Hkv, D] packed (float64 numpy) -> out, lse [Hq, Tq]."""
    d, hq, hkv = q.shape[-1], q.shape[1], k.shape[1]
    stride = d + 8
    out, lse = np.full(q.shape, np.nan), np.full((hq, q.shape[0]), np.nan)
    for b in range(len(cu_q) - 1):
        for h in range(hq):
            for m_block in range(-(-max_q // 64)):
                q_start, sq = cu_q[b], cu_q[b + 1] - cu_q[b]
                k_start, sk = cu_k[b], cu_k[b + 1] - cu_k[b]
                q0 = m_block * 64
                if q0 >= sq:
                    continue
                q_last, hk, shift = min(q0 + 64, sq) - 1, h // (hq // hkv), sk - sq
                lo_first, hi_first = _key_range(q0 + shift, sk, p["wl"], p["wr"])
                lo_last, hi_last = _key_range(q_last + shift, sk, p["wl"], p["wr"])
                n_min = lo_first // 64
                n_max = -(-hi_last // 64) if hi_last > lo_first else n_min
                smem = np.full(64 * stride + 4 * 64 * stride, _UNWRITTEN)
                s_q, s_k, s_v = 0, 64 * stride, 64 * stride + 2 * 64 * stride
                warps = [_new_warp(d) for _ in range(4)]
                ranges = [
                    [
                        _key_range(q0 + w * 16 + _G + 8 * i + shift, sk, p["wl"], p["wr"])
                        for i in range(2)
                    ]
                    for w in range(4)
                ]
                if n_max > n_min:
                    _store_tile(
                        smem,
                        s_q,
                        stride,
                        64,
                        d,
                        _rows(q[:, h], q_start + q0, sq - q0, 64),
                    )
                for n in range(n_min, n_max):
                    stage, kb = (n - n_min) & 1, n * 64
                    sk_b, sv_b = s_k + stage * 64 * stride, s_v + stage * 64 * stride
                    _store_tile(
                        smem,
                        sk_b,
                        stride,
                        64,
                        d,
                        _rows(k[:, hk], k_start + kb, sk - kb, 64),
                    )
                    _store_tile(
                        smem,
                        sv_b,
                        stride,
                        64,
                        d,
                        _rows(v[:, hk], k_start + kb, sk - kb, 64),
                    )
                    mask = kb < lo_last or kb + 64 > hi_first
                    probs = []
                    for w in range(4):
                        if n == n_min:
                            base = (
                                s_q
                                + (w * 16 + (_L & 7) + ((_L >> 3) & 1) * 8) * stride
                                + (_L >> 4) * 8
                            )
                            warps[w]["qf"] = [
                                _ldmatrix_x4(smem, base + kk * 16) for kk in range(d // 16)
                            ]
                        lo = [ranges[w][i][0] for i in range(2)]
                        hi = [ranges[w][i][1] for i in range(2)]
                        probs.append(
                            _warp_scores(smem, warps[w], sk_b, 8, d, stride, lo, hi, kb, mask, p)
                        )
                    if mask:
                        parts = [(0, kb, 64, *zip(*ranges[w])) for w in range(4)]
                        _nonfinite_path(smem, warps, sv_b, stride, d, parts)
                    for w in range(4):
                        _warp_pv(smem, warps[w], probs[w], sv_b, 8, d, stride)
                for w, st in enumerate(warps):
                    l_sum = _quad(st["l"], np.add)
                    inv = np.where(l_sum > 0, 1 / np.where(l_sum > 0, l_sum, 1), 0.0)
                    o = _f16(st["acc"] * inv[None, :, [0, 0, 1, 1]])  # [D/8, 32, 4]
                    for e in range(4):
                        rows = q0 + w * 16 + _G + 8 * (e // 2)
                        cols = 8 * np.arange(d // 8)[:, None] + 2 * _C[None] + e % 2
                        ok = np.broadcast_to(rows < sq, cols.shape)
                        rr = np.broadcast_to(q_start + rows, cols.shape)
                        out[rr[ok], h, cols[ok]] = o[:, :, e][ok]
                    for i in range(2):
                        rows = q0 + w * 16 + _G + 8 * i
                        ok = (rows < sq) & (_C == 0)
                        val = np.where(
                            l_sum[:, i] > 0,
                            (st["m"][:, i] + np.log2(np.where(l_sum[:, i] > 0, l_sum[:, i], 1)))
                            * _LN2,
                            -np.inf,
                        )
                        lse[h, q_start + rows[ok]] = val[ok]
    return out, lse


def _emulate_decode(q, kc, vc, lens, table, splits, p):
    """q [B, q_len, Hq, D], caches (numpy float64) -> out [B, q_len, Hq, D]."""
    batch, q_len, hq, d = q.shape
    hkv = kc.shape[2]
    group, stride = hq // hkv, d + 8
    rows_total = q_len * group
    m_blocks = -(-rows_total // 16)
    capacity = kc.shape[1] if table is None else table.shape[1] * kc.shape[1]
    part_o = np.full((splits, batch, q_len, hq, d), np.nan)
    part_l = np.full((splits, batch, q_len, hq), np.nan)
    for bx in range(batch * hkv * m_blocks):
        mb, hk, b = bx % m_blocks, (bx // m_blocks) % hkv, bx // m_blocks // hkv
        for split in range(splits):
            row0 = mb * 16
            row_last = min(row0 + 16, rows_total) - 1
            n_keys = max(0, min(int(lens[b]), capacity))
            pos0 = n_keys - q_len
            lo_first, hi_first = _key_range(pos0 + row0 // group, n_keys, p["wl"], p["wr"])
            lo_last, hi_last = _key_range(pos0 + row_last // group, n_keys, p["wl"], p["wr"])
            n_min = lo_first // 64
            n_max = -(-hi_last // 64) if hi_last > lo_first else n_min
            per = (n_max - n_min + splits - 1) // splits
            t_begin = min(n_min + split * per, n_max)
            t_end = min(t_begin + per, n_max)
            r_pad = [np.minimum(row0 + _G + 8 * i, rows_total - 1) for i in range(2)]
            ranges = [_key_range(pos0 + r // group, n_keys, p["wl"], p["wr"]) for r in r_pad]
            lo, hi = [ranges[0][0], ranges[1][0]], [ranges[0][1], ranges[1][1]]
            smem = np.full(16 * stride + 4 * 64 * stride, _UNWRITTEN)
            s_q, s_k, s_v = 0, 16 * stride, 16 * stride + 2 * 64 * stride
            warps = [_new_warp(d) for _ in range(4)]

            if t_end > t_begin:
                for chunk in range(16 * (d // 8)):
                    r, col = chunk // (d // 8), (chunk % (d // 8)) * 8
                    row = row0 + r
                    val = (
                        q[b, row // group, hk * group + row % group, col : col + 8]
                        if row < rows_total
                        else 0.0
                    )
                    smem[s_q + r * stride + col : s_q + r * stride + col + 8] = val
            for n in range(t_begin, t_end):
                stage, kb = (n - t_begin) & 1, n * 64
                sk_b, sv_b = s_k + stage * 64 * stride, s_v + stage * 64 * stride
                _store_tile(smem, sk_b, stride, 64, d, _cache_rows(kc, table, b, hk, kb, n_keys))
                _store_tile(smem, sv_b, stride, 64, d, _cache_rows(vc, table, b, hk, kb, n_keys))
                mask = kb < lo_last or kb + 64 > hi_first
                probs = []
                for w in range(4):
                    if n == t_begin:
                        base = s_q + ((_L & 7) + ((_L >> 3) & 1) * 8) * stride + (_L >> 4) * 8
                        warps[w]["qf"] = [
                            _ldmatrix_x4(smem, base + kk * 16) for kk in range(d // 16)
                        ]
                    probs.append(
                        _warp_scores(smem, warps[w], sk_b + w * 16 * stride, 2, d, stride, lo, hi,
                                     kb + w * 16, mask, p)
                    )  # fmt: skip
                if mask:
                    parts = [(w * 16, kb + w * 16, 16, lo, hi) for w in range(4)]
                    _nonfinite_path(smem, warps, sv_b, stride, d, parts)
                for w in range(4):
                    _warp_pv(smem, warps[w], probs[w], sv_b + w * 16 * stride, 2, d, stride)
            # the warp merge through shared memory: red[w][row][col], red_m/red_l[w][row]
            red = np.full((4, 16, d), np.nan)
            red_m, red_l = np.full((4, 16), np.nan), np.full((4, 16), np.nan)
            for w, st in enumerate(warps):
                l_sum = _quad(st["l"], np.add)
                for i in range(2):
                    red_m[w, (_G + 8 * i)[_C == 0]] = st["m"][_C == 0, i]
                    red_l[w, (_G + 8 * i)[_C == 0]] = l_sum[_C == 0, i]
                for e in range(4):
                    cols = 8 * np.arange(d // 8)[:, None] + 2 * _C[None] + e % 2
                    red[w, np.broadcast_to(_G + 8 * (e // 2), cols.shape), cols] = st["acc"][
                        :, :, e
                    ]
            for r in range(16):
                row = row0 + r
                if row >= rows_total:
                    continue
                mx = red_m[:, r].max()
                o, tot = np.zeros(d), 0.0
                if mx != -np.inf:
                    f = np.exp2(red_m[:, r] - mx)
                    tot = (red_l[:, r] * f).sum()
                    o = (f[:, None] * red[:, r]).sum(0) / tot
                t, h = row // group, hk * group + row % group
                part_o[split, b, t, h] = o
                part_l[split, b, t, h] = -np.inf if mx == -np.inf else (mx + np.log2(tot)) * _LN2
    if splits == 1:
        return _f16(part_o[0])
    mx = part_l.max(0)
    w = np.where(mx == -np.inf, 0.0, np.exp(part_l - np.where(mx == -np.inf, 0.0, mx)))
    tot = w.sum(0)
    return _f16(
        np.where(
            tot[..., None] > 0,
            (w[..., None] * part_o).sum(0) / np.where(tot > 0, tot, 1)[..., None],
            0.0,
        )
    )


def _h(*shape):
    return torch.randn(shape).half()


@pytest.mark.parametrize("head_dim", na.HEAD_DIMS)
@pytest.mark.parametrize(
    "lens_q,lens_k,hq,hkv,causal,window,softcap",
    [([70], [93], 2, 1, False, (-1, -1), 0.0), ([130, 3], [40, 0], 1, 1, True, (-1, -1), 0.0),
     ([0, 1, 66, 3], [5, 0, 70, 1], 2, 1, True, (30, -1), 0.0), ([70], [150], 1, 1, False, (20, 5), 4.0)],
)  # fmt: skip
def test_emulated_prefill_matches_reference(
    lens_q, lens_k, hq, hkv, causal, window, softcap, head_dim
):
    cu_q = [0, *np.cumsum(lens_q).tolist()]
    cu_k = [0, *np.cumsum(lens_k).tolist()]
    q, k, v = _h(cu_q[-1], hq, head_dim), _h(cu_k[-1], hkv, head_dim), _h(cu_k[-1], hkv, head_dim)
    q = q * 3 if softcap else q
    wl, wr = na._window(causal, *window)
    p = {"scale": head_dim**-0.5, "softcap": softcap, "wl": wl, "wr": wr}
    out, lse = _emulate_prefill(
        q.double().numpy(), k.double().numpy(), v.double().numpy(), cu_q, cu_k, max(lens_q), p
    )
    ref, ref_lse = reference.attention(
        q.float(), k.float(), v.float(), causal=causal, window_left=window[0], window_right=window[1],
        softcap=softcap, cu_seqlens_q=torch.tensor(cu_q), cu_seqlens_k=torch.tensor(cu_k), return_lse=True,
    )  # fmt: skip
    out, lse = torch.from_numpy(out), torch.from_numpy(lse)
    assert rel_err(out, ref) < 2e-3
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert rel_err(lse[finite], ref_lse[finite]) < 1e-5


@pytest.mark.parametrize("head_dim", na.HEAD_DIMS)
@pytest.mark.parametrize(
    "q_len,hq,hkv,block_size,splits,causal,window,softcap",
    [(1, 8, 2, None, 1, True, (-1, -1), 0.0), (4, 8, 2, 16, 3, True, (50, -1), 0.0),
     (5, 8, 2, 32, 2, False, (-1, -1), 3.0), (3, 16, 1, None, 2, True, (-1, -1), 0.0)],
)  # fmt: skip
def test_emulated_decode_matches_reference(
    q_len, hq, hkv, block_size, splits, causal, window, softcap, head_dim
):
    lens = torch.tensor([1, 77, 200], dtype=torch.int32)
    q = _h(3, q_len, hq, head_dim) * (3 if softcap else 1)
    kc, vc = _h(3, 200, hkv, head_dim), _h(3, 200, hkv, head_dim)
    table = None
    if block_size is not None:
        kc, vc, table = _paged(kc, vc, block_size)
        table[0, 5] = -1  # past sequence 0's end: never read
    wl, wr = na._window(causal, *window)
    p = {"scale": head_dim**-0.5, "softcap": softcap, "wl": wl, "wr": wr}
    t_np = None if table is None else table.numpy()
    out = _emulate_decode(
        q.double().numpy(), kc.double().numpy(), vc.double().numpy(), lens.numpy(), t_np, splits, p
    )
    ref = reference.decode_attention(
        q.float(), kc.float(), vc.float(), lens, block_table=table, causal=causal,
        window_left=window[0], window_right=window[1], softcap=softcap,
    )  # fmt: skip
    assert rel_err(torch.from_numpy(out), ref) < 2e-3


def _same_non_finite(out, ref):
    """The same inf/NaN pattern (NaN, +inf, -inf element by element), finite elements close."""
    for kind in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(kind(out), kind(ref)), kind.__name__
    finite = torch.isfinite(ref)
    assert rel_err(out[finite], ref[finite]) < 2e-3


@pytest.mark.parametrize("head_dim", na.HEAD_DIMS)
@pytest.mark.parametrize("window", [(-1, -1), (20, -1)])
def test_emulated_prefill_keeps_non_finite_values_of_masked_keys_out(head_dim, window):
    # causal: keys 30, 31, 50 sit in the masked diagonal tile of rows 0-63 and in a tile rows
    # 64-69 see whole; the rows that see them get inf (+inf alone) or NaN, the others nothing
    lens = [70, 5]
    cu = [0, 70, 75]
    q, k, v = _h(75, 2, head_dim), _h(75, 1, head_dim), _h(75, 1, head_dim)
    v[30], v[31], v[50] = float("inf"), float("-inf"), float("nan")
    v[72] = float("nan")  # the other sequence's key 2: its rows 2-4 only
    wl, wr = na._window(True, *window)
    p = {"scale": head_dim**-0.5, "softcap": 0.0, "wl": wl, "wr": wr}
    out, _ = _emulate_prefill(q.double().numpy(), k.double().numpy(), v.double().numpy(), cu, cu,
                              max(lens), p)  # fmt: skip
    ref = reference.attention(
        q.float(), k.float(), v.float(), causal=True, window_left=window[0],
        window_right=window[1], cu_seqlens_q=torch.tensor(cu), cu_seqlens_k=torch.tensor(cu),
    )  # fmt: skip
    assert torch.isposinf(ref[30]).all() and torch.isfinite(ref[:30]).all()
    _same_non_finite(torch.from_numpy(out), ref)


@pytest.mark.parametrize("head_dim", na.HEAD_DIMS)
@pytest.mark.parametrize("block_size,splits,window", [(None, 1, (-1, -1)), (16, 3, (50, -1))])
def test_emulated_decode_keeps_non_finite_values_of_masked_keys_out(
    head_dim, block_size, splits, window
):
    # q_len 4: the last key of each sequence is seen by its last query alone; the window
    # keeps key 100 of sequence 2 out of every row
    lens = torch.tensor([1, 77, 200], dtype=torch.int32)
    q = _h(3, 4, 8, head_dim)
    kc, vc = _h(3, 200, 2, head_dim), _h(3, 200, 2, head_dim)
    vc[1, 76], vc[2, 199], vc[2, 198] = float("nan"), float("inf"), float("-inf")
    if window[0] >= 0:
        vc[2, 100] = float("inf")
    table = None
    if block_size is not None:
        kc, vc, table = _paged(kc, vc, block_size)
    wl, wr = na._window(True, *window)
    p = {"scale": head_dim**-0.5, "softcap": 0.0, "wl": wl, "wr": wr}
    t_np = None if table is None else table.numpy()
    out = _emulate_decode(
        q.double().numpy(), kc.double().numpy(), vc.double().numpy(), lens.numpy(), t_np, splits, p
    )
    ref = reference.decode_attention(
        q.float(), kc.float(), vc.float(), lens, block_table=table, causal=True,
        window_left=window[0], window_right=window[1],
    )  # fmt: skip
    assert torch.isfinite(ref[:, :2]).all() and torch.isnan(ref[2, 3]).all()
    _same_non_finite(torch.from_numpy(out), ref)
