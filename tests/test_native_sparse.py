"""CUDA 2:4 sparse launcher (fastllm/native/sparse.py, csrc/sparse/*).

On the CPU: supports() reasons, the split-K choice, the metadata contract the kernel
relies on (checked against a direct encoding), and an emulation of the kernel's
shared-memory layout, ldmatrix addressing and per-thread metadata words fed to the
PTX-defined semantics of mma.sp m16n8k32, compared with a dense product. With a GPU
(`gpu` marker): the kernel called directly at real and odd sizes, outputs poisoned.
"""

import numpy as np
import pytest
import torch
from conftest import HAS_GPU, poison_empty, rel_err

from fastllm.native import int8 as nint8
from fastllm.native import sparse as nsparse
from fastllm.sparse.format import compress_24


def random_24(N, K, dtype, device="cpu", gen=None):
    """A dense (N, K) weight with exactly 2 random nonzeros kept per group of 4, and its mask."""
    order = torch.rand(N, K // 4, 4, generator=gen).argsort(-1)
    mask = torch.zeros(N, K // 4, 4, dtype=torch.bool)
    mask.scatter_(2, order[..., :2], True)
    mask = mask.reshape(N, K)
    w = torch.randn(N, K, generator=gen).to(dtype) * mask
    return w.to(device), mask.to(device)


# --- CPU: pure-Python parts ----------------------------------------------------------------


@pytest.fixture
def any_device(monkeypatch):
    monkeypatch.setattr(nsparse, "device_reason", lambda *tensors: None)


def test_cpu_tensors_are_refused():
    w, mask = random_24(16, 64, torch.float16)
    v, m = compress_24(w, mask)
    reason = nsparse.supports_sparse24(torch.randn(3, 64, dtype=torch.float16), v, m)
    assert reason is not None and ("CUDA" in reason or "_C" in reason)


def test_supports_reasons(any_device):
    w, mask = random_24(24, 128, torch.bfloat16)
    v, m = compress_24(w, mask)
    x = torch.randn(5, 128, dtype=torch.bfloat16)
    assert nsparse.supports_sparse24(x, v, m) is None
    assert nsparse.supports_sparse24(x, v, m, torch.randn(24)) is None
    assert "float16 or bfloat16" in nsparse.supports_sparse24(x.float(), v.float(), m)
    assert "differs" in nsparse.supports_sparse24(x.half(), v, m)
    assert "int16" in nsparse.supports_sparse24(x, v, m.int())
    assert "bias" in nsparse.supports_sparse24(x, v, m, torch.randn(23))
    w2, mask2 = random_24(96, 200, torch.bfloat16)
    v2, m2 = compress_24(w2, mask2)
    assert "multiple of 64" in nsparse.supports_sparse24(
        torch.randn(3, 200, dtype=torch.bfloat16), v2, m2
    )
    assert "values must be" in nsparse.supports_sparse24(x, v[:, :32].contiguous(), m)
    assert "metadata must be" in nsparse.supports_sparse24(x, v, m[:, :4].contiguous())
    xb = torch.randn(5, 132, dtype=torch.bfloat16)[:, :128]  # row stride 132: not a multiple of 8
    assert "row stride" in nsparse.supports_sparse24(xb, v, m)


def test_split_choice():
    sms = 132
    assert nsparse.choose_sparse24_splits(33, 4096, 4096, sms) == 1  # large-M tiles never split
    assert nsparse.choose_sparse24_splits(1, 4096, 4096, sms) > 1  # 64 blocks cannot fill 132 SMs
    for M in (1, 16, 32):
        for N, K in [(4096, 4096), (14336, 4096), (4096, 14336), (1000, 4096), (96, 256)]:
            s = nsparse.choose_sparse24_splits(M, N, K, sms)
            if s > 1:
                per = nint8.cdiv(K // 64, s)
                assert per >= nint8.MIN_CHUNKS_PER_SPLIT and nint8.cdiv(K // 64, per) == s
                assert 4 * s * M * N <= nint8.WORKSPACE_BYTES


def test_metadata_contract():
    """The kernel hands metadata[n, c] to mma.sp unchanged as row n's word for 16-column
    chunk c: group 4c+j in bits 4j..4j+3, first index in the low 2 bits, first < second.
    Checked against a direct encoding of a random mask."""
    N, K = 7, 96
    w, mask = random_24(N, K, torch.float16)
    values, meta = compress_24(w, mask)
    assert meta.dtype == torch.int16 and meta.shape == (N, K // 16)
    for n in range(N):
        for c in range(K // 16):
            word = 0
            for j in range(4):
                kept = [i for i in range(4) if mask[n, 16 * c + 4 * j + i]]
                assert len(kept) == 2
                word |= (kept[0] | kept[1] << 2) << (4 * j)
            assert int(meta[n, c]) & 0xFFFF == word
    # values hold the kept elements in ascending k order
    assert torch.equal(values, w[mask].view(N, K // 2))


# --- CPU emulation of one block of the kernel ----------------------------------------------
#
# The functions below restate the kernel's index formulas (csrc/sparse/sparse24_gemm.cu)
# and the PTX ISA's definitions of ldmatrix and of the sparse mma.m16n8k32 fragments;
# together they must reproduce the dense product exactly (integer-valued inputs).


def _swz64(row, chunk):
    return row * 64 + ((chunk ^ ((row >> 1) & 3)) << 4)


def _swz128(row, chunk):
    return row * 128 + ((chunk ^ (row & 7)) << 4)


def _ldmatrix_x4(smem: np.ndarray, addrs: list[int]) -> np.ndarray:
    """PTX ldmatrix .x4 .b16: lanes 8j..8j+7 give the row addresses of matrix j; lane i
    receives bytes 4*(i%4)..+3 of row i//4 of each matrix j in its register j."""
    regs = np.zeros((32, 4, 4), dtype=np.uint8)
    for j in range(4):
        for i in range(32):
            a = addrs[8 * j + i // 4] + 4 * (i % 4)
            regs[i, j] = smem[a : a + 4]
    return regs


def _halves(reg: np.ndarray) -> np.ndarray:
    return reg.view(np.float16).astype(np.float64)  # (lo, hi)


def _mma_sp_m16n8k32(a, b, e) -> np.ndarray:
    """PTX sparse mma.m16n8k32 f16, selector 0: A (16 x 32, compressed to 16 x 16) from
    a[lane][reg] laid out like a dense m16n8k16 A fragment, metadata words e[lane] of
    threads t = 0, 1 (chunk t: row g in bits 0-15, row g+8 in bits 16-31), B (32 x 8)
    from b[lane][j] = B[k = 8j + 2t, +1][n = g]. Returns D (16 x 8)."""
    A = np.zeros((16, 32))
    for r in range(16):
        for grp in range(8):  # dense columns 4*grp .. 4*grp+3
            lane = (r % 8) * 4 + grp % 4
            lo, hi = _halves(a[lane, (grp // 4) * 2 + r // 8])
            word = int(e[(r % 8) * 4 + grp // 4])
            nib = (word >> (16 * (r // 8) + 4 * (grp % 4))) & 0xF
            i0, i1 = nib & 3, nib >> 2
            assert i0 < i1, "invalid metadata reached the mma"
            A[r, 4 * grp + i0] += lo
            A[r, 4 * grp + i1] += hi
    B = np.zeros((32, 8))
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for j in range(4):
            lo, hi = _halves(b[lane, j])
            B[8 * j + 2 * t, g], B[8 * j + 2 * t + 1, g] = lo, hi
    return A @ B


def _emulate_block(x, values, meta, n0, m0, BW, BT, WW, WT, K):
    """One block of sparse24_kernel (all warps, all K tiles): returns acc[BW, BT]."""
    N, M = values.shape[0], x.shape[0]
    TW, TT = BW // WW, BT // WT
    out = np.zeros((BW, BT))
    v8 = values.contiguous().view(torch.uint8).numpy()  # [N, K] bytes (K/2 halves)
    e8 = meta.contiguous().view(torch.uint8).numpy()  # [N, K/8] bytes
    x8 = x.contiguous().view(torch.uint8).numpy()  # [M, 2K] bytes
    for kt in range(K // 64):
        sv = np.zeros(BW * 64, np.uint8)
        se = np.zeros(BW * 8, np.uint8)
        sx = np.zeros(BT * 128, np.uint8)
        for r in range(BW):  # cp.async stores, as load_tile writes them
            n = min(n0 + r, N - 1)
            for c in range(4):
                src = (kt * 32 + c * 8) * 2
                sv[_swz64(r, c) : _swz64(r, c) + 16] = v8[n, src : src + 16]
            se[r * 8 : r * 8 + 8] = e8[n, kt * 8 : kt * 8 + 8]
        for r in range(BT):
            if m0 + r >= M:  # tokens past M: zero-filled
                continue
            for c in range(8):
                src = (kt * 64 + c * 8) * 2
                sx[_swz128(r, c) : _swz128(r, c) + 16] = x8[m0 + r, src : src + 16]
        se16 = se.view(np.uint16)
        for warp in range(WW * WT):
            ww, wt = warp // WT, warp % WT
            for kk in range(2):
                for mi in range(TW // 16):
                    r = ww * TW + mi * 16
                    addrs = [
                        _swz64(r + (ln & 7) + ((ln >> 3) & 1) * 8, 2 * kk + (ln >> 4))
                        for ln in range(32)
                    ]
                    a = _ldmatrix_x4(sv, addrs)
                    e = np.zeros(32, dtype=np.uint32)
                    for ln in range(32):
                        g, t = ln >> 2, ln & 3
                        c = 2 * kk + (t & 1)
                        e[ln] = int(se16[(r + g) * 4 + c]) | (int(se16[(r + g + 8) * 4 + c]) << 16)
                    for ni in range(TT // 8):
                        rt = wt * TT + ni * 8
                        addrs = [_swz128(rt + (ln & 7), kk * 4 + (ln >> 3)) for ln in range(32)]
                        b = _ldmatrix_x4(sx, addrs)
                        out[r : r + 16, rt : rt + 8] += _mma_sp_m16n8k32(a, b, e)
    return out


@pytest.mark.parametrize("BW,BT,WW,WT", [(64, 32, 4, 1), (128, 128, 2, 4)])
def test_emulated_block_matches_dense(BW, BT, WW, WT):
    N, M, K = BW, BT, 128
    gen = torch.Generator().manual_seed(BW + BT)
    # small integers: every product and sum is exact in float16 inputs / float64 math
    w, mask = random_24(N, K, torch.float16, gen=gen)
    w = (w.float() * 4).round().half() * mask
    x = torch.randint(-3, 4, (M, K), generator=gen).half()
    values, meta = compress_24(w, mask)
    got = _emulate_block(x, values, meta, 0, 0, BW, BT, WW, WT, K)
    ref = (w.double() @ x.double().t()).numpy()
    np.testing.assert_array_equal(got, ref)


def test_emulated_block_edges():
    """A block hanging over N (clamped W rows) and M (zero-filled tokens): its in-range
    part is still exact."""
    N, M, K = 40, 20, 64
    gen = torch.Generator().manual_seed(7)
    w, mask = random_24(N, K, torch.float16, gen=gen)
    w = (w.float() * 4).round().half() * mask
    x = torch.randint(-3, 4, (M, K), generator=gen).half()
    values, meta = compress_24(w, mask)
    got = _emulate_block(x, values, meta, 0, 0, 64, 32, 4, 1, K)
    ref = (w.double() @ x.double().t()).numpy()
    np.testing.assert_array_equal(got[:N, :M], ref)


# --- GPU: the kernel against references written here --------------------------------------

gpu = pytest.mark.gpu
CUDA = torch.device("cuda") if HAS_GPU else None


def _ref(x, w, bias):
    y = x.double() @ w.double().t()
    return y + bias.double() if bias is not None else y


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 3, 16, 17, 32, 33, 257])
@pytest.mark.parametrize("N,K", [(1000, 4096), (96, 256), (4096, 4096), (37, 64)])
def test_matches_reference(dtype, M, N, K, monkeypatch):
    w, mask = random_24(N, K, dtype, CUDA)
    values, meta = compress_24(w, mask)
    x = torch.randn(M, K, device=CUDA).to(dtype)
    bias = torch.randn(N, device=CUDA).to(dtype)
    assert nsparse.supports_sparse24(x, values, meta, bias) is None
    ref = _ref(x, w, bias)
    poison_empty(monkeypatch)
    out = nsparse.sparse24_linear(x, values, meta, bias)
    assert out.dtype == dtype and out.shape == (M, N)
    assert rel_err(out, ref) <= 1e-2


@gpu
@pytest.mark.parametrize("splits", [1, 2, 5, 64])
@pytest.mark.parametrize("M", [1, 7, 32])
def test_forced_splits(splits, M, monkeypatch):
    N, K = 300, 4096
    w, mask = random_24(N, K, torch.bfloat16, CUDA)
    values, meta = compress_24(w, mask)
    x = torch.randn(M, K, device=CUDA, dtype=torch.bfloat16)
    bias = torch.randn(N, device=CUDA)
    ref = _ref(x, w, bias)
    poison_empty(monkeypatch)
    out = nsparse.sparse24_linear(x, values, meta, bias, splits=splits)
    assert rel_err(out, ref) <= 1e-2


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [5, 40])
def test_one_hot_is_exact(dtype, M, monkeypatch):
    """x rows one-hot: out[m, n] = W[n, k_m] exactly, kept or dropped. Checks the
    metadata path (which k each kept value lands on) bit for bit."""
    N, K = 200, 512
    w, mask = random_24(N, K, dtype, CUDA)
    values, meta = compress_24(w, mask)
    cols = torch.randint(0, K, (M,), device=CUDA)
    x = torch.zeros(M, K, device=CUDA, dtype=dtype)
    x[torch.arange(M, device=CUDA), cols] = 1
    poison_empty(monkeypatch)
    out = nsparse.sparse24_linear(x, values, meta, None)
    assert torch.equal(out, w[:, cols].t().contiguous())


@gpu
def test_all_zero_groups():
    """Groups with no nonzeros (stored as indices 0, 1 and zero values) contribute 0."""
    N, K = 64, 256
    w = torch.zeros(N, K, device=CUDA, dtype=torch.float16)
    w[::3, ::8] = 1.5
    values, meta = compress_24(w)
    x = torch.randn(9, K, device=CUDA, dtype=torch.float16)
    out = nsparse.sparse24_linear(x, values, meta, None)
    assert rel_err(out, _ref(x, w, None)) <= 1e-2
