"""CUDA int8 matmul launchers (fastllm/native/int8.py, csrc/int8/*).

On the CPU: the pure-Python parts (supports() reasons, split-K choice, workspace
sizing, architecture matching). With a GPU (`gpu` marker): the kernels called directly
at real and odd sizes against references written here, outputs poisoned.
"""

import numpy as np
import pytest
import torch
from conftest import HAS_GPU, poison_empty, rel_err

from fastllm.native import int8 as nint8

# --- CPU: pure-Python parts ----------------------------------------------------------------


@pytest.fixture
def any_device(monkeypatch):
    """Pretend the device is fine so that the other reasons can be checked on CPU tensors."""
    monkeypatch.setattr(nint8, "device_reason", lambda *tensors: None)


def _w8a8_inputs(M=5, N=48, K=64, out=torch.bfloat16, bias=True):
    x = torch.randint(-127, 128, (M, K), dtype=torch.int8)
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    return (x, torch.rand(M) + 0.5, w, torch.rand(N) + 0.5, torch.randn(N) if bias else None, out)


def test_arch_matching():
    assert nint8._arch_ok((9, 0), ["sm_90a"])
    assert nint8._arch_ok((9, 0), ["sm_80"])  # PTX of sm_80 runs on newer GPUs
    assert nint8._arch_ok((8, 6), ["sm_80", "sm_90a"])
    assert not nint8._arch_ok((8, 6), ["sm_90a"])  # "a" builds run only on that exact GPU
    assert not nint8._arch_ok((10, 0), ["sm_90a"])
    assert not nint8._arch_ok((7, 5), ["sm_80"])
    assert not nint8._arch_ok((9, 0), [])


def test_cpu_tensors_are_refused():
    reason = nint8.supports_w8a8(*_w8a8_inputs())
    assert reason is not None and ("CUDA" in reason or "_C" in reason)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    w = torch.randint(-127, 128, (16, 64), dtype=torch.int8)
    assert nint8.supports_w8a16(x, w, torch.rand(16)) is not None


def test_quantize_launcher_refuses_other_devices_with_value_error():
    # the CUDA quantize_per_token launcher (fastllm/native/quant.py) checks with an error
    # naming the argument, not an assert (which python -O would strip)
    from fastllm.native import quant as nquant

    with pytest.raises(ValueError, match=r"x must be a 2-D CUDA tensor, got shape \(3, 8\) on cpu"):
        nquant.quantize_per_token(torch.randn(3, 8))


def test_w8a8_supports_reasons(any_device):
    assert nint8.supports_w8a8(*_w8a8_inputs()) is None
    assert nint8.supports_w8a8(*_w8a8_inputs(bias=False, out=torch.float32)) is None
    x, xs, w, ws, b, out = _w8a8_inputs(K=4100)
    assert "multiple of 16" in nint8.supports_w8a8(x, xs, w, ws, b, out)
    x, xs, w, ws, b, out = _w8a8_inputs()
    assert "out_dtype" in nint8.supports_w8a8(x, xs, w, ws, b, torch.float64)
    assert "int8" in nint8.supports_w8a8(x.float(), xs, w, ws, b, out)
    assert "x_scale" in nint8.supports_w8a8(x, xs.double(), w, ws, b, out)
    assert "w_scale" in nint8.supports_w8a8(x, xs, w, ws[:-1], b, out)
    assert "bias" in nint8.supports_w8a8(x, xs, w, ws, b[:-1], out)
    big = torch.randint(-127, 128, (5, 72), dtype=torch.int8)
    assert "row stride" in nint8.supports_w8a8(big[:, :64], xs, w, ws, b, out)
    assert "unit stride" in nint8.supports_w8a8(x.t().contiguous().t(), xs, w, ws, b, out)
    # a 16-byte misaligned base: view starting 16 + 1 bytes in
    flat = torch.zeros(5 * 64 + 64, dtype=torch.int8)
    assert "aligned" in nint8.supports_w8a8(flat[1 : 1 + 5 * 64].view(5, 64), xs, w, ws, b, out)


def test_w8a16_supports_reasons(any_device):
    x = torch.randn(3, 64, dtype=torch.float16)
    w = torch.randint(-127, 128, (16, 64), dtype=torch.int8)
    s = torch.rand(16)
    assert nint8.supports_w8a16(x, w, s) is None
    assert nint8.supports_w8a16(x.bfloat16(), w, s, torch.randn(16)) is None
    assert "float16 or bfloat16" in nint8.supports_w8a16(x.float(), w, s)
    assert "M=65" in nint8.supports_w8a16(torch.randn(65, 64, dtype=torch.float16), w, s)
    x2 = torch.randn(3, 72, dtype=torch.float16)
    w2 = torch.randint(-127, 128, (16, 72), dtype=torch.int8)
    assert "multiple of 16" in nint8.supports_w8a16(x2, w2, s)
    assert "K=" in nint8.supports_w8a16(x, w[:, :48].contiguous(), s)
    assert "w_scale" in nint8.supports_w8a16(x, w, s.half())


def test_dynamic_supports_reasons(any_device):
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    w = torch.randint(-127, 128, (16, 64), dtype=torch.int8)
    s = torch.rand(16)
    assert nint8.supports_dynamic(x, w, s) is None
    assert nint8.supports_dynamic(x.float(), w, s, torch.randn(16)) is None
    assert "float32, float16 or bfloat16" in nint8.supports_dynamic(x.double(), w, s)
    assert "unit last stride" in nint8.supports_dynamic(x.t().contiguous().t(), w, s)
    x2 = torch.randn(3, 72, dtype=torch.bfloat16)
    w2 = torch.randint(-127, 128, (16, 72), dtype=torch.int8)
    assert "multiple of 16" in nint8.supports_dynamic(x2, w2, s)


def test_w8a16_split_choice():
    sms = 132
    # large N alone fills the GPU: no split
    assert nint8.choose_w8a16_splits(1, 131072, 4096, sms) == 1
    # short K: no split
    assert nint8.choose_w8a16_splits(1, 1024, 256, sms) == 1
    for M in (1, 4, 16, 17, 64):
        for N, K in [(4096, 4096), (1024, 14336), (4096, 14336), (96, 208), (1000, 4096)]:
            s = nint8.choose_w8a16_splits(M, N, K, sms)
            chunks = nint8.cdiv(K, 64)
            assert 1 <= s <= nint8.MAX_SPLITS
            if s > 1:
                per = nint8.cdiv(chunks, s)
                assert per >= nint8.MIN_CHUNKS_PER_SPLIT
                assert nint8.cdiv(chunks, per) == s  # no empty split
                assert 4 * s * M * N <= nint8.WORKSPACE_BYTES
    # decode on a Llama-8B layer is split (128 warps of 32 rows cannot fill 132 SMs)
    assert nint8.choose_w8a16_splits(1, 4096, 4096, sms) > 1


def test_normalize_splits_and_workspace():
    assert nint8.normalize_splits(7, 64) == 7  # 10 chunks per split: 7 runs, none empty
    assert nint8.normalize_splits(6, 64) == 6  # 11 chunks per split: 6 runs (11*5 < 64)
    assert nint8.normalize_splits(5, 8) == 4  # 2 chunks per split: 4 non-empty runs
    assert nint8.normalize_splits(100, 3) == 3
    assert nint8.normalize_splits(3, 0) == 1
    assert nint8.workspace_shape(1, 4, 8) is None
    assert nint8.workspace_shape(3, 4, 8) == (3, 4, 8)


# --- GPU: the kernels against references written here ------------------------------------

gpu = pytest.mark.gpu
CUDA = torch.device("cuda") if HAS_GPU else None


def _ref_w8a8(x, xs, w, ws, bias):
    acc = x.double() @ w.double().t()  # exact: |acc| < 2^53
    y = acc * xs.double()[:, None] * ws.double()[None, :]
    return y + bias.double() if bias is not None else y


@gpu
@pytest.mark.parametrize("M", [1, 3, 17, 32, 33, 128, 257])
@pytest.mark.parametrize("N,K", [(1000, 4096), (96, 208), (4096, 4096), (37, 16)])
def test_w8a8_accumulator_bit_exact(M, N, K, monkeypatch):
    x = torch.randint(-127, 128, (M, K), dtype=torch.int8, device=CUDA)
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=CUDA)
    ones_m = torch.ones(M, device=CUDA)
    ones_n = torch.ones(N, device=CUDA)
    assert nint8.supports_w8a8(x, ones_m, w, ones_n, None, torch.float32) is None
    ref = x.double() @ w.double().t()
    assert ref.abs().max().item() < 2**24  # float32 holds every accumulator exactly
    poison_empty(monkeypatch)
    out = nint8.w8a8_linear(x, ones_m, w, ones_n, None, torch.float32)
    torch.cuda.synchronize()
    assert torch.equal(out.double(), ref), (out.double() - ref).abs().max()


@gpu
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "M,N,K", [(1, 1000, 4112), (17, 4096, 4096), (257, 1000, 4096), (300, 333, 208)]
)
def test_w8a8_epilogue(M, N, K, out_dtype, bias_dtype, monkeypatch):
    x = torch.randint(-127, 128, (M, K), dtype=torch.int8, device=CUDA)
    x[M // 2, 3] = 127  # an outlier row keeps its own scale
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=CUDA)
    xs = torch.rand(M, device=CUDA) * 0.02 + 1e-3
    xs[M // 2] = 0.5
    ws = torch.rand(N, device=CUDA) * 0.01 + 1e-4
    bias = torch.randn(N, device=CUDA).to(bias_dtype) if bias_dtype else None
    assert nint8.supports_w8a8(x, xs, w, ws, bias, out_dtype) is None
    ref = _ref_w8a8(x, xs, w, ws, bias)
    poison_empty(monkeypatch)
    out = nint8.w8a8_linear(x, xs, w, ws, bias, out_dtype)
    assert out.dtype == out_dtype and out.shape == (M, N)
    tol = 1e-5 if out_dtype == torch.float32 else 1e-2
    assert rel_err(out, ref) <= tol


@gpu
def test_w8a8_strided_rows_and_empty():
    base = torch.randint(-127, 128, (40, 96), dtype=torch.int8, device=CUDA)
    x = base[:, :64]  # row stride 96 (a multiple of 16), not contiguous
    w = torch.randint(-127, 128, (24, 64), dtype=torch.int8, device=CUDA)
    xs, ws = torch.rand(40, device=CUDA), torch.rand(24, device=CUDA)
    assert nint8.supports_w8a8(x, xs, w, ws, None, torch.float32) is None
    out = nint8.w8a8_linear(x, xs, w, ws, None, torch.float32)
    assert rel_err(out, _ref_w8a8(x, xs, w, ws, None)) <= 1e-5
    empty = nint8.w8a8_linear(x[:0], xs[:0], w, ws, None, torch.bfloat16)
    assert empty.shape == (0, 24)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,N,K", [(1, 1000, 4096), (77, 333, 208), (300, 4096, 4096)])
def test_dynamic_is_quantize_then_w8a8(dtype, M, N, K, monkeypatch):
    from fastllm.reference import quantize_per_token

    x = (torch.randn(M, K, device=CUDA) * 3).to(dtype)
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=CUDA)
    ws = torch.rand(N, device=CUDA) * 0.01
    bias = torch.randn(N, device=CUDA).to(dtype)
    assert nint8.supports_dynamic(x, w, ws, bias) is None
    x_int8, x_scale = quantize_per_token(x)
    ref = _ref_w8a8(x_int8, x_scale, w, ws, bias)
    poison_empty(monkeypatch)
    out = nint8.dynamic_linear(x, w, ws, bias)
    assert out.dtype == dtype and out.shape == (M, N)
    assert rel_err(out, ref) <= (1e-5 if dtype == torch.float32 else 1e-2)
    assert torch.equal(out, nint8.w8a8_linear(x_int8, x_scale, w, ws, bias, dtype))


def _ref_w8a16(x, w, ws, bias):
    y = (x.double() @ w.double().t()) * ws.double()[None, :]
    return y + bias.double() if bias is not None else y


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 3, 8, 9, 16, 17, 33, 64])
@pytest.mark.parametrize(
    "N,K", [(4096, 4096), (1000, 4096), (96, 208), (14336, 4096), (4096, 14336), (40, 16)]
)
def test_w8a16_matches_reference(dtype, M, N, K, monkeypatch):
    x = torch.randn(M, K, device=CUDA).to(dtype)
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=CUDA)
    ws = torch.rand(N, device=CUDA) * 0.01 + 1e-4
    bias = torch.randn(N, device=CUDA).to(dtype)
    assert nint8.supports_w8a16(x, w, ws, bias) is None
    ref = _ref_w8a16(x, w, ws, bias)
    poison_empty(monkeypatch)
    out = nint8.w8a16_linear(x, w, ws, bias)
    assert out.dtype == dtype and out.shape == (M, N)
    assert rel_err(out, ref) <= 1e-2


@gpu
@pytest.mark.parametrize("splits", [1, 2, 3, 7, 64])
@pytest.mark.parametrize("M", [1, 5, 40])
def test_w8a16_forced_splits(splits, M, monkeypatch):
    N, K = 520, 4096 + 48  # a partial last chunk of K
    x = torch.randn(M, K, device=CUDA, dtype=torch.bfloat16)
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=CUDA)
    ws = torch.rand(N, device=CUDA) * 0.01
    bias = torch.randn(N, device=CUDA)
    ref = _ref_w8a16(x, w, ws, bias)
    poison_empty(monkeypatch)
    out = nint8.w8a16_linear(x, w, ws, bias, splits=splits)
    assert rel_err(out, ref) <= 1e-2


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 16, 64])
def test_w8a16_one_hot_is_exact(dtype, M, monkeypatch):
    """x rows are one-hot: out[m, n] = w[n, k_m] exactly. Checks the in-register
    dequantization of every int8 value (-128 included) and the k permutation."""
    N, K = 256, 1024
    w = torch.arange(N * K, device=CUDA).remainder(256).sub(128).to(torch.int8).view(N, K)
    w = w[torch.randperm(N, device=CUDA)][:, torch.randperm(K, device=CUDA)].contiguous()
    cols = torch.randint(0, K, (M,), device=CUDA)
    x = torch.zeros(M, K, device=CUDA, dtype=dtype)
    x[torch.arange(M, device=CUDA), cols] = 1
    poison_empty(monkeypatch)
    out = nint8.w8a16_linear(x, w, torch.ones(N, device=CUDA), None, splits=1)
    assert torch.equal(out.float(), w[:, cols].t().float())
    out = nint8.w8a16_linear(x, w, torch.ones(N, device=CUDA), None, splits=4)
    assert torch.equal(out.float(), w[:, cols].t().float())


# --- CPU emulation of the kernels' index math and bit tricks ------------------------------
#
# The helpers restate the kernels' formulas (csrc/int8/*.cu) and the PTX ISA's
# definitions of ldmatrix and of the mma fragments; together they must reproduce the
# exact integer products.


def _byte_perm(x: int, y: int, s: int) -> int:
    """CUDA __byte_perm: result byte i is byte (s >> 4i) & 7 of the 8 bytes {x, y}."""
    b = [(x >> (8 * i)) & 0xFF for i in range(4)] + [(y >> (8 * i)) & 0xFF for i in range(4)]
    return sum(b[(s >> (4 * i)) & 7] << (8 * i) for i in range(4))


def _f32(bits: int) -> float:
    return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])


def _f16x2(bits: int) -> tuple[float, float]:
    h = np.array([bits], dtype=np.uint32).view(np.float16).astype(np.float64)
    return float(h[0]), float(h[1])


def _dequant4(word: int, bf16: bool) -> list[float]:
    """dequant4 of w8a16_gemv.cu: 4 int8 in a word -> their values (lo pair, hi pair)."""
    u = word ^ 0x80808080
    if bf16:
        vals = [
            np.float32(_f32(_byte_perm(u, 0x4B000000, 0x7540 | i))) - np.float32(8388736.0)
            for i in range(4)
        ]
        return [float(v) for v in vals]
    lo = _f16x2(_byte_perm(u, 0x64646464, 0x4140))
    hi = _f16x2(_byte_perm(u, 0x64646464, 0x4342))
    return [v - 1152.0 for v in (*lo, *hi)]  # __hsub2 of exact halves: exact


@pytest.mark.parametrize("bf16", [False, True])
def test_dequant_bit_tricks_all_int8_values(bf16):
    vals = np.arange(-128, 128, dtype=np.int8)
    for shift in range(4):  # every value in every byte position
        words = np.zeros((256, 4), dtype=np.int8)
        words[:, shift] = vals
        words[:, (shift + 1) % 4] = vals[::-1]
        for row in words:
            word = int(row.view(np.uint32)[0])
            assert _dequant4(word, bf16) == [float(v) for v in row]


def _mma_m16n8k16(a, b) -> np.ndarray:
    """PTX mma.m16n8k16 f16/bf16 fragments: a[lane] 4 regs x 2 values, b[lane] 2 regs x
    2 values. A[g + 8*(r%2)][2t + 8*(r//2) + i] = a[lane][r][i]; B[2t + 8*r + i][g] = b[lane][r][i]."""
    A, B = np.zeros((16, 16)), np.zeros((16, 8))
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for r in range(4):
            for i in range(2):
                A[g + 8 * (r % 2), 2 * t + 8 * (r // 2) + i] = a[lane][r][i]
        for r in range(2):
            for i in range(2):
                B[2 * t + 8 * r + i, g] = b[lane][r][i]
    return A @ B


@pytest.mark.parametrize("bf16", [False, True])
def test_w8a16_warp_emulation(bf16):
    """One warp, one 64-column chunk: the 16-byte loads, the shared k permutation and
    the fragment assembly of w8a16_kernel give W x^T exactly."""
    gen = torch.Generator().manual_seed(3)
    W = torch.randint(-128, 128, (16, 64), generator=gen, dtype=torch.int8).numpy()
    X = torch.randint(-4, 5, (8, 64), generator=gen).numpy().astype(np.float64)
    acc = np.zeros((16, 8))
    for s in range(4):
        a, b = [], []
        for lane in range(32):
            g, t = lane // 4, lane % 4
            w_lo = W[g, t * 16 : t * 16 + 16].view(np.uint32)  # 16-byte load, row g
            w_hi = W[g + 8, t * 16 : t * 16 + 16].view(np.uint32)  # row g + 8
            d0, d1 = _dequant4(int(w_lo[s]), bf16), _dequant4(int(w_hi[s]), bf16)
            a.append([d0[0:2], d1[0:2], d0[2:4], d1[2:4]])  # a[0], a[1], a[2], a[3]
            xv = X[g, t * 16 : t * 16 + 16]  # the thread's 16 x values (two 16-byte loads)
            b.append([xv[4 * s : 4 * s + 2], xv[4 * s + 2 : 4 * s + 4]])  # words 2s, 2s+1
        acc += _mma_m16n8k16(a, b)
    np.testing.assert_array_equal(acc, W.astype(np.float64) @ X.T)


def _swz64(row, chunk):
    return row * 64 + ((chunk ^ ((row >> 1) & 3)) << 4)


def _ldmatrix_x4(smem: np.ndarray, addrs) -> np.ndarray:
    """PTX ldmatrix .x4: lane i gets bytes 4*(i%4).. of row i//4 of matrix j (rows given by
    lanes 8j..8j+7) in register j."""
    regs = np.zeros((32, 4, 4), dtype=np.uint8)
    for j in range(4):
        for i in range(32):
            a = addrs[8 * j + i // 4] + 4 * (i % 4)
            regs[i, j] = smem[a : a + 4]
    return regs


def _mma_m16n8k32_s8(a, b) -> np.ndarray:
    """PTX mma.m16n8k32 s8: A[g + 8*(r%2)][4t + 16*(r//2) + i] = byte i of a[lane][r];
    B[4t + 16*r + i][g] = byte i of b[lane][r]."""
    A, B = np.zeros((16, 32), np.int64), np.zeros((32, 8), np.int64)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for r in range(4):
            A[g + 8 * (r % 2), 4 * t + 16 * (r // 2) : 4 * t + 16 * (r // 2) + 4] = a[lane][r].view(
                np.int8
            )
        for r in range(2):
            B[4 * t + 16 * r : 4 * t + 16 * r + 4, g] = b[lane][r].view(np.int8)
    return A @ B


@pytest.mark.parametrize("BM,BN,WM,WN", [(32, 64, 2, 2), (128, 128, 2, 4)])
def test_w8a8_block_emulation(BM, BN, WM, WN):
    """One block of w8a8_gemm_kernel with partial tiles in M, N and K (rows past M, N
    and the K tail zero-filled): the swizzled cp.async stores, the ldmatrix addresses and the mma
    fragments give the exact int32 accumulators, and the epilogue indexing puts them
    where they belong."""
    gen = torch.Generator().manual_seed(BM)
    M, N, K = BM - 3, BN - 5, 64 + 48
    X = torch.randint(-128, 128, (M, K), generator=gen, dtype=torch.int8).numpy()
    W = torch.randint(-128, 128, (N, K), generator=gen, dtype=torch.int8).numpy()
    TM, TN = BM // WM, BN // WN
    acc = np.zeros((BM, BN), np.int64)
    for kt in range((K + 63) // 64):
        sa, sb = np.zeros(BM * 64, np.uint8), np.zeros(BN * 64, np.uint8)
        for smem, src, rows, n_rows in ((sa, X, BM, M), (sb, W, BN, N)):
            for r in range(rows):
                for c in range(4):
                    k = kt * 64 + c * 16
                    if k < K and r < n_rows:  # else: src-size 0, zero fill
                        smem[_swz64(r, c) : _swz64(r, c) + 16] = src[r, k : k + 16].view(np.uint8)
        for warp in range(WM * WN):
            wm, wn = warp // WN, warp % WN
            for kk in range(2):
                a = [
                    _ldmatrix_x4(
                        sa,
                        [
                            _swz64(
                                wm * TM + i * 16 + (ln & 7) + ((ln >> 3) & 1) * 8,
                                2 * kk + (ln >> 4),
                            )
                            for ln in range(32)
                        ],
                    )
                    for i in range(TM // 16)
                ]
                b = []
                for j in range(0, TN // 8, 2):
                    q = _ldmatrix_x4(
                        sb,
                        [
                            _swz64(
                                wn * TN + j * 8 + (ln & 7) + ((ln >> 4) << 3),
                                2 * kk + ((ln >> 3) & 1),
                            )
                            for ln in range(32)
                        ],
                    )
                    b.append(q[:, 0:2])
                    b.append(q[:, 2:4])
                for i in range(TM // 16):
                    for j in range(TN // 8):
                        r0, c0 = wm * TM + i * 16, wn * TN + j * 8
                        acc[r0 : r0 + 16, c0 : c0 + 8] += _mma_m16n8k32_s8(a[i], b[j])
    ref = X.astype(np.int64) @ W.astype(np.int64).T
    np.testing.assert_array_equal(acc[:M, :N], ref)
    # epilogue: element e of tile (i, j) of lane (g, t) goes to row g + 8 * (e // 2), col 2t + e % 2
    for warp in range(WM * WN):
        wm, wn = warp // WN, warp % WN
        for lane in range(32):
            g, t = lane // 4, lane % 4
            for i in range(TM // 16):
                for h in range(2):
                    m = wm * TM + i * 16 + g + 8 * h
                    for j in range(TN // 8):
                        n = wn * TN + j * 8 + 2 * t
                        # D fragment of the PTX ISA: c[2h + e] is row g + 8h, column 2t + e
                        assert (m % 16, n % 8) == (g + 8 * h, 2 * t)


@pytest.mark.parametrize("tiles_m,tiles_n", [(1, 1), (3, 5), (8, 2), (17, 9), (40, 1), (1, 33)])
def test_w8a8_rasterization_is_a_bijection(tiles_m, tiles_n):
    """The grouped block order of w8a8_gemm_kernel visits every output tile once."""
    group = 8
    seen = set()
    for pid in range(tiles_m * tiles_n):
        width = group * tiles_n
        first_m = (pid // width) * group
        gsize = min(tiles_m - first_m, group)
        tm, tn = first_m + (pid % width) % gsize, (pid % width) // gsize
        assert 0 <= tm < tiles_m and 0 <= tn < tiles_n
        seen.add((tm, tn))
    assert len(seen) == tiles_m * tiles_n
