"""CUDA int8 matmul launchers (fastllm/native/int8.py, csrc/int8/*).

On the CPU: the pure-Python parts (supports() reasons, split-K choice, workspace
sizing, architecture matching). With a GPU (`gpu` marker): the kernels called directly
at real and odd sizes against references written here, outputs poisoned.
"""

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


def _ref_w8a16(x, w, ws, bias):
    y = (x.double() @ w.double().t()) * ws.double()[None, :]
    return y + bias.double() if bias is not None else y


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 3, 8, 9, 16, 17, 33, 64])
@pytest.mark.parametrize(
    "N,K", [(4096, 4096), (1000, 4096), (96, 208), (14336, 4096), (4096, 14336)]
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
