"""fastllm.ops int8 matmuls (int8_linear, int8_dynamic_linear, int8_weight_only_linear)
and quantize_per_channel on every backend against the reference."""

import pytest
import torch
from conftest import DEVICE, HAS_GPU, available_backends, poison_empty, rel_err

import fastllm
import fastllm.ops.int8 as int8_ops
from fastllm import backend, reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
INTERPRETED = backend.triton_interpreted() and not HAS_GPU

# Odd shapes: the full matrix on torch/reference (and on every backend on a GPU); small
# ones for Triton under the interpreter.
FULL_M = [1, 3, 17, 128, 257]
FULL_NK = [(1000, 4100), (40, 72), (33, 100)]
SMALL_M = [1, 3, 17]
SMALL_NK = [(40, 72), (33, 100)]


def _cases(op):
    cases = []
    for name in available_backends(op):
        small = name == "triton" and INTERPRETED
        for M in SMALL_M if small else FULL_M:
            for N, K in SMALL_NK if small else FULL_NK:
                cases.append((name, M, N, K))
    return cases


def _run(op, name, *args, **kwargs):
    with fastllm.use_backend(name):
        out = getattr(fastllm.ops, op)(*args, **kwargs)
    assert fastllm.last_backend(op) == name
    return out


def _activations(M, K, dtype=torch.float32):
    x = torch.randn(M, K, device=DEVICE)
    if M >= 3:
        x[1] *= 50  # a row with large values
        x[2, K // 3] = 300  # a single outlier in a row
    return x.to(dtype)


def _weight(N, K):
    w = torch.randn(N, K, device=DEVICE) * 0.05
    return reference.quantize_per_channel(w)


def test_backends_include_triton_and_torch():
    for op in ("int8_linear", "int8_dynamic_linear", "int8_weight_only_linear"):
        assert {"torch", "reference", "triton"} <= set(available_backends(op))


# --- the int32 accumulator ---------------------------------------------------------------


@pytest.mark.parametrize("name", available_backends("int8_linear"))
@pytest.mark.parametrize("M, N, K", [(1, 40, 72), (17, 33, 100), (3, 24, 1000)])
def test_accumulator_bit_exact(name, M, N, K, monkeypatch):
    # full int8 range, -128 included; |acc| <= K * 128 * 128 < 2**24, so float32 holds it
    # exactly and unit scales make the float32 output the accumulator itself
    x = torch.randint(-128, 128, (M, K), dtype=torch.int8, device=DEVICE)
    w = torch.randint(-128, 128, (N, K), dtype=torch.int8, device=DEVICE)
    x[0, :] = -128
    w[0, :] = -128  # the largest product sum
    ones_m = torch.ones(M, device=DEVICE)
    ones_n = torch.ones(N, device=DEVICE)
    exact = x.cpu().long() @ w.cpu().long().T
    assert exact.abs().max() < 2**24
    poison_empty(monkeypatch)
    out = _run("int8_linear", name, x, ones_m, w, ones_n, out_dtype=torch.float32)
    assert torch.equal(out.cpu().long(), exact)
    assert torch.equal(reference.int8_matmul_int32(x, w).cpu().long(), exact)


def test_torch_backend_uses_int_mm_and_fallback_is_exact(monkeypatch):
    x = torch.randint(-128, 128, (5, 300), dtype=torch.int8)
    w = torch.randint(-128, 128, (7, 300), dtype=torch.int8)
    exact = (x.long() @ w.long().T).int()
    calls = []
    real = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: calls.append(1) or real(a, b))
    assert torch.equal(int8_ops.int8_matmul_int32(x, w), exact)
    assert calls, "the torch backend did not use torch._int_mm on the CPU"
    monkeypatch.setattr(int8_ops, "_CPU_INT_MM", False)
    calls.clear()
    assert torch.equal(int8_ops.int8_matmul_int32(x, w), exact) and not calls


def test_int_mm_constraints():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert int8_ops.int_mm_accepts(1, 7, 5, cpu) == int8_ops._CPU_INT_MM
    assert int8_ops.int_mm_accepts(32, 64, 64, cuda)
    assert not int8_ops.int_mm_accepts(16, 64, 64, cuda)  # CUDA needs M > 16
    assert not int8_ops.int_mm_accepts(32, 60, 64, cuda)  # and K, N multiples of 8
    assert not int8_ops.int_mm_accepts(32, 64, 100, cuda)


# --- end results against the reference ---------------------------------------------------


@pytest.mark.parametrize("name, M, N, K", _cases("int8_linear"))
def test_int8_linear_matches_reference(name, M, N, K, monkeypatch):
    x_int8, x_scale = reference.quantize_per_token(_activations(M, K))
    w_int8, w_scale = _weight(N, K)
    bias = torch.randn(N, device=DEVICE)
    poison_empty(monkeypatch)
    for b in (None, bias):
        ref = reference.int8_linear(x_int8, x_scale, w_int8, w_scale, b, torch.float64)
        for dtype in DTYPES:
            out = _run("int8_linear", name, x_int8, x_scale, w_int8, w_scale, b, out_dtype=dtype)
            assert out.shape == (M, N) and out.dtype == dtype
            assert rel_err(out, ref) <= TOL[dtype], (dtype, b is None)


@pytest.mark.parametrize("name, M, N, K", _cases("int8_dynamic_linear"))
def test_dynamic_linear_matches_reference(name, M, N, K, monkeypatch):
    w_int8, w_scale = _weight(N, K)
    poison_empty(monkeypatch)
    for dtype in DTYPES:
        x = _activations(M, K, dtype)
        bias = torch.randn(N, device=DEVICE).to(dtype) if dtype != torch.float32 else None
        ref = reference.int8_dynamic_linear(x.float(), w_int8, w_scale, bias)
        out = _run("int8_dynamic_linear", name, x, w_int8, w_scale, bias)
        assert out.shape == (M, N) and out.dtype == dtype
        assert rel_err(out, ref) <= TOL[dtype], dtype


@pytest.mark.parametrize("name, M, N, K", _cases("int8_dynamic_linear"))
def test_dynamic_linear_smooth_scale_matches_reference(name, M, N, K, monkeypatch):
    # SmoothQuant's run-time factor: x.float() / smooth_scale is what gets quantized
    w_int8, w_scale = _weight(N, K)
    smooth = torch.exp(torch.randn(K, device=DEVICE))  # factors between ~0.05 and ~20
    poison_empty(monkeypatch)
    for dtype in DTYPES:
        x = _activations(M, K, dtype)
        bias = torch.randn(N, device=DEVICE) if dtype == torch.float32 else None
        ref = reference.int8_dynamic_linear(x.double(), w_int8, w_scale, bias, smooth.double())
        out = _run("int8_dynamic_linear", name, x, w_int8, w_scale, bias, smooth_scale=smooth)
        assert out.shape == (M, N) and out.dtype == dtype
        assert rel_err(out, ref) <= TOL[dtype], dtype
        # the same as dividing first and quantizing without a factor
        plain = _run("int8_dynamic_linear", name, x.float() / smooth, w_int8, w_scale, bias)
        assert rel_err(out, plain.to(dtype)) <= TOL[dtype], dtype


@pytest.mark.skipif(
    "cpu" not in available_backends("int8_dynamic_linear", torch.device("cpu")),
    reason="fastllm._C (C++ CPU kernels) is not built",
)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("M, N, K", [(1, 7, 5), (37, 300, 129), (300, 129, 1100)])
def test_cpu_backend_bit_identical_to_torch(M, N, K, threads):
    # the C++ quantization and epilogue do the torch backend's float32 operations in
    # the same order: equal bits, on one thread and split over rows
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        w_int8, w_scale = reference.quantize_per_channel(torch.randn(N, K) * 0.05)
        smooth = torch.exp(torch.randn(K))
        for dtype in DTYPES:
            x = (torch.randn(M, K) * 3).to(dtype)
            for bias in (None, torch.randn(N).to(dtype)):
                for s in (None, smooth):
                    outs = [
                        _run("int8_dynamic_linear", n, x, w_int8, w_scale, bias, smooth_scale=s)
                        for n in ("cpu", "torch")
                    ]
                    assert torch.equal(outs[0], outs[1]), (dtype, bias is None, s is None)
            q = [_run("quantize_per_token", n, x) for n in ("cpu", "torch")]
            assert torch.equal(q[0][0], q[1][0]) and torch.equal(q[0][1], q[1][1])
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(
    "cpu" not in available_backends("int8_linear", torch.device("cpu")),
    reason="fastllm._C (C++ CPU kernels) is not built",
)
def test_cpu_epilogue_rounds_like_torch_at_the_edges():
    # float16 overflow to inf, float16/bfloat16 subnormals, exact zeros and ties: the
    # C++ conversions must give PyTorch's bits
    M, N, K = 64, 96, 32
    x_int8 = torch.randint(-127, 128, (M, K), dtype=torch.int8)
    w_int8 = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    x_scale = torch.exp2(torch.empty(M).uniform_(-40, 12))
    w_scale = torch.exp2(torch.empty(N).uniform_(-12, 4))
    x_int8[:, :4] = 0
    for bias in (None, torch.tensor([float("inf"), -float("inf")] + [0.5] * (N - 2))):
        for dtype in DTYPES:
            outs = [
                _run("int8_linear", n, x_int8, x_scale, w_int8, w_scale, bias, out_dtype=dtype)
                for n in ("cpu", "torch")
            ]
            assert torch.equal(outs[0], outs[1]), dtype
            if dtype == torch.float16 and bias is None:
                assert torch.isinf(outs[0]).any()  # the cases are really exercised
                assert ((outs[0] != 0) & (outs[0].abs() < 2**-14)).any()


@pytest.mark.skipif(
    "cpu" not in available_backends("int8_weight_only_linear", torch.device("cpu")),
    reason="fastllm._C (C++ CPU kernels) is not built",
)
def test_cpu_w8a16_kernel_is_chosen_for_small_m():
    from fastllm.native.cpu import W8A16_MAX_M

    w_int8, w_scale = reference.quantize_per_channel(torch.randn(24, 40))
    for M, expected in ((1, "cpu"), (W8A16_MAX_M, "cpu"), (W8A16_MAX_M + 1, "torch")):
        fastllm.ops.int8_weight_only_linear(torch.randn(M, 40), w_int8, w_scale)
        assert fastllm.last_backend("int8_weight_only_linear") == expected, M


@pytest.mark.parametrize("name, M, N, K", _cases("int8_weight_only_linear"))
def test_weight_only_matches_reference(name, M, N, K, monkeypatch):
    w_int8, w_scale = _weight(N, K)
    bias = torch.randn(N, device=DEVICE)
    poison_empty(monkeypatch)
    for dtype in DTYPES:
        x = _activations(M, K, dtype)
        for b in (None, bias):
            ref = reference.int8_weight_only_linear(x.double(), w_int8, w_scale, b)
            out = _run("int8_weight_only_linear", name, x, w_int8, w_scale, b)
            assert out.shape == (M, N) and out.dtype == dtype
            assert rel_err(out, ref) <= TOL[dtype], (dtype, b is None)


def test_weight_only_float16_large_unscaled_product():
    # x @ w_int8.T passes float16's range although the scaled result does not
    K, N = 512, 16
    x = torch.full((2, K), 8.0, dtype=torch.float16, device=DEVICE)
    w_int8 = torch.full((N, K), 127, dtype=torch.int8, device=DEVICE)
    w_scale = torch.full((N,), 1e-3, device=DEVICE)
    ref = reference.int8_weight_only_linear(x.double(), w_int8, w_scale)
    for name in available_backends("int8_weight_only_linear"):
        out = _run("int8_weight_only_linear", name, x, w_int8, w_scale)
        assert rel_err(out, ref) <= 1e-2, name


@pytest.mark.skipif(
    "triton" not in available_backends("int8_weight_only_linear"), reason="no triton"
)
@pytest.mark.parametrize("split_k", [2, 3, 5])
@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_only_split_k(split_k, dtype, monkeypatch):
    from fastllm.triton_kernels.int8 import int8_w8a16_linear

    M, N, K = 3, 33, 300
    x = _activations(M, K, dtype)
    w_int8, w_scale = _weight(N, K)
    bias = torch.randn(N, device=DEVICE).to(dtype)
    ref = reference.int8_weight_only_linear(x.double(), w_int8, w_scale, bias)
    poison_empty(monkeypatch)
    out = int8_w8a16_linear(x, w_int8, w_scale, bias, split_k=split_k)
    assert rel_err(out, ref) <= TOL[dtype]


@pytest.mark.skipif("triton" not in available_backends("int8_dynamic_linear"), reason="no triton")
@pytest.mark.parametrize("M, N, K", [(1, 40, 72), (3, 33, 100), (17, 24, 300)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dynamic_fused_kernel_bit_identical_to_two_kernels(M, N, K, dtype, monkeypatch):
    from fastllm.triton_kernels.int8 import int8_dynamic_linear

    x = _activations(M, K, dtype)
    x[0] = 0  # an all-zero row: scale 1
    w_int8, w_scale = _weight(N, K)
    bias = torch.randn(N, device=DEVICE).to(dtype)
    poison_empty(monkeypatch)
    fused = int8_dynamic_linear(x, w_int8, w_scale, bias, fused=True)
    split = int8_dynamic_linear(x, w_int8, w_scale, bias, fused=False)
    assert torch.equal(fused, split)
    ref = reference.int8_dynamic_linear(x, w_int8, w_scale, bias)
    assert rel_err(fused, ref) <= TOL[dtype]


@pytest.mark.parametrize("op", ["int8_dynamic_linear", "int8_weight_only_linear"])
def test_leading_dims_and_strides(op):
    N, K = 24, 40
    w_int8, w_scale = _weight(N, K)
    base = torch.randn(3, 5, 2 * K, device=DEVICE)
    for x in (base[..., :K], base[..., ::2], base.transpose(0, 1)[..., :K], base[0, 0, :K]):
        ref = getattr(reference, op)(x.contiguous(), w_int8, w_scale)
        for name in available_backends(op):
            out = _run(op, name, x, w_int8, w_scale)
            assert out.shape == (*x.shape[:-1], N)
            assert rel_err(out, ref) <= 1e-5, (name, x.shape, x.stride())


def test_non_contiguous_weight_and_scales():
    N, K = 24, 40
    w_int8, w_scale = _weight(N, K)
    w_t = w_int8.t().contiguous().t()  # same values, column-major
    ws_strided = torch.stack([w_scale, w_scale], 1)[:, 0]
    bias = torch.randn(2 * N, device=DEVICE)[::2]
    x = torch.randn(5, K, device=DEVICE)
    for op in ("int8_dynamic_linear", "int8_weight_only_linear"):
        ref = getattr(reference, op)(x, w_int8, w_scale, bias.contiguous())
        for name in available_backends(op):
            out = _run(op, name, x, w_t, ws_strided, bias)
            assert rel_err(out, ref) <= 1e-5, (op, name)


def test_int8_linear_leading_dims_and_strides():
    N, K = 24, 40
    w_int8, w_scale = _weight(N, K)
    x_int8, x_scale = reference.quantize_per_token(torch.randn(3, 5, 2 * K, device=DEVICE))
    x_int8 = x_int8[..., ::2]
    ref = reference.int8_linear(x_int8, x_scale, w_int8, w_scale, None, torch.float32)
    for name in available_backends("int8_linear"):
        out = _run("int8_linear", name, x_int8, x_scale, w_int8, w_scale, out_dtype="fp32")
        assert out.shape == (3, 5, N)
        assert rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("name", ["bfloat16", "bf16", "torch.float16", "half", "float32"])
def test_out_dtype_names(name):
    x_int8, x_scale = reference.quantize_per_token(torch.randn(2, 8, device=DEVICE))
    w_int8, w_scale = _weight(4, 8)
    out = fastllm.ops.int8_linear(x_int8, x_scale, w_int8, w_scale, out_dtype=name)
    assert out.dtype == int8_ops._DTYPE_NAMES[name.removeprefix("torch.")]


@pytest.mark.parametrize("shape, N", [((0, 8), 4), ((2, 0, 8), 4), ((3, 0), 4), ((3, 8), 0)])
def test_empty_and_k0(shape, N):
    K = shape[-1]
    w_int8, w_scale = _weight(N, K)
    bias = torch.randn(N, device=DEVICE)
    x = torch.randn(shape, device=DEVICE)
    x_int8, x_scale = reference.quantize_per_token(x)
    for out in (
        fastllm.ops.int8_linear(x_int8, x_scale, w_int8, w_scale, bias, torch.float32),
        fastllm.ops.int8_dynamic_linear(x, w_int8, w_scale, bias),
        fastllm.ops.int8_weight_only_linear(x, w_int8, w_scale, bias),
    ):
        assert out.shape == (*shape[:-1], N)
        if K == 0 and out.numel():
            assert torch.equal(out, bias.expand_as(out))  # an empty sum is 0, plus bias


# --- quantize_per_channel -----------------------------------------------------------------


@pytest.mark.parametrize("name", available_backends("quantize_per_channel"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, dim", [((33, 100), 0), ((40, 72), 1), ((5, 7, 9), -1)])
def test_quantize_per_channel_matches_reference(name, dtype, shape, dim, monkeypatch):
    w = (torch.randn(shape, device=DEVICE) * 0.1).to(dtype)
    w.select(dim, 1).zero_()  # an all-zero channel
    ref_q, ref_s = reference.quantize_per_channel(w, dim)
    poison_empty(monkeypatch)
    q, s = _run("quantize_per_channel", name, w, dim)
    assert q.shape == w.shape and s.shape == (w.shape[dim],) and s.dtype == torch.float32
    assert torch.equal(q, ref_q) and torch.equal(s, ref_s)
    assert s[1].item() == 1.0 and (q.select(dim, 1) == 0).all()


def test_quantize_per_channel_is_per_token_of_rows():
    w = torch.randn(17, 64, device=DEVICE)
    q, s = fastllm.ops.quantize_per_channel(w)
    q2, s2 = fastllm.ops.quantize_per_token(w)
    assert torch.equal(q, q2) and torch.equal(s, s2)
    q, s = fastllm.ops.quantize_per_channel(torch.randn(0, 5, device=DEVICE))
    assert q.shape == (0, 5) and s.shape == (0,)


# --- the reference itself ----------------------------------------------------------------


def test_reference_against_float64():
    M, N, K = 9, 31, 257
    x = torch.randn(M, K, dtype=torch.float64)
    w = torch.randn(N, K, dtype=torch.float64) * 0.05
    bias = torch.randn(N, dtype=torch.float64)
    w_int8, w_scale = reference.quantize_per_channel(w)
    scale64 = w.abs().amax(1) / 127
    assert torch.allclose(w_scale, scale64, rtol=1e-15, atol=0)
    # dequantization error is at most half a step per element
    assert ((w_int8.double() * scale64[:, None] - w).abs() <= scale64[:, None] * 0.5 + 1e-12).all()
    x_int8, x_scale = reference.quantize_per_token(x)
    manual = torch.zeros(M, N, dtype=torch.float64)
    for k in range(K):  # an independent formula: a sum of rank-1 products
        manual += x_int8[:, k, None].double() * w_int8[None, :, k].double()
    out = reference.int8_linear(x_int8, x_scale, w_int8, w_scale, bias, torch.float64)
    expect = manual * x_scale[:, None] * w_scale[None, :] + bias
    assert torch.allclose(out, expect, rtol=1e-12, atol=1e-12)
    # W8A8 and W8A16 approximate the float64 linear
    exact = x @ w.T + bias
    assert rel_err(out, exact) < 2e-2
    out16 = reference.int8_weight_only_linear(x, w_int8, w_scale, bias)
    assert out16.dtype == torch.float64 and rel_err(out16, exact) < 1e-2


# --- every tensor argument as a strided view, on every backend -----------------------------


def _strided(t: torch.Tensor, garbage) -> torch.Tensor:
    """t's values as a view that is not contiguous: the even rows of a tensor twice as long
    whose odd rows hold `garbage`, so that reading the view as contiguous gives wrong values."""
    big = torch.empty((2 * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
    big[0::2], big[1::2] = t, garbage
    return big[0::2]


def _op_args(op):
    """Contiguous arguments of torch.ops.fastllm.<op>, by name, and views of each tensor
    (x also transposed: column-major)."""
    M, N, K = 5, 24, 40
    x = _activations(M, K)
    w_int8, w_scale = _weight(N, K)
    bias = torch.randn(N, device=DEVICE)
    if op == "int8_linear":
        x_int8, x_scale = reference.quantize_per_token(x)
        args = dict(x_int8=x_int8, x_scale=x_scale, w_int8=w_int8, w_scale=w_scale)
        args.update(bias=bias, out_dtype=torch.float32)
    elif op == "int8_dynamic_linear":
        smooth = torch.rand(K, device=DEVICE) + 0.5
        args = dict(x=x, w_int8=w_int8, w_scale=w_scale, bias=bias, smooth_scale=smooth)
    elif op == "int8_weight_only_linear":
        args = dict(x=x, w_int8=w_int8, w_scale=w_scale, bias=bias)
    elif op == "quantize_per_token":
        args = dict(x=x)
    else:  # quantize_per_channel
        args = dict(w=torch.randn(N, K, device=DEVICE), dim=0)
    views = {}
    for name, t in args.items():
        if isinstance(t, torch.Tensor):
            garbage = 99 if t.dtype == torch.int8 else float("nan")
            views[name] = _strided(t, garbage)
            if t.dim() == 2:
                views[name + "_t"] = t.t().contiguous().t()
    return args, views


_STRIDED_OPS = (
    "int8_linear",
    "int8_dynamic_linear",
    "int8_weight_only_linear",
    "quantize_per_token",
    "quantize_per_channel",
)
_STRIDED_CASES = [
    (op, name, arg)
    for op in _STRIDED_OPS
    for name in available_backends(op)
    for arg in _op_args(op)[1]
]


@pytest.mark.parametrize("op, name, arg", _STRIDED_CASES)
def test_strided_arguments(op, name, arg):
    args, views = _op_args(op)
    call = getattr(torch.ops.fastllm, op)
    strided = {**args, arg.removesuffix("_t"): views[arg]}
    assert not strided[arg.removesuffix("_t")].is_contiguous()
    *positional, last = strided.values()
    with fastllm.use_backend(name):
        expect = call(*args.values())
        got = [
            call(*strided.values()),  # the registered op, past the public function
            getattr(fastllm.ops, op)(*positional, **{list(strided)[-1]: last}),
        ]
    for out in got:
        if op.startswith("quantize"):
            assert torch.equal(out[0], expect[0]) and torch.equal(out[1], expect[1])
        else:
            assert rel_err(out, expect) <= 1e-6


# --- K large enough to overflow the int32 accumulator ----------------------------------------


def _int8_calls(K):
    """int8_linear and int8_dynamic_linear (public and registered) of M = N = 1, all 127s."""
    x = torch.ones(1, K, device=DEVICE)
    xq = torch.full((1, K), 127, dtype=torch.int8, device=DEVICE)
    wq = torch.full((1, K), 127, dtype=torch.int8, device=DEVICE)
    one = torch.ones(1, device=DEVICE)
    ops = torch.ops.fastllm
    return {
        "int8_linear": lambda: fastllm.ops.int8_linear(xq, one, wq, one, out_dtype="fp32"),
        "op.int8_linear": lambda: ops.int8_linear(xq, one, wq, one, None, torch.float32),
        "int8_dynamic_linear": lambda: fastllm.ops.int8_dynamic_linear(x, wq, one),
        "op.int8_dynamic_linear": lambda: ops.int8_dynamic_linear(x, wq, one, None, None),
    }


def test_int8_k_over_accumulator_limit_refused(monkeypatch):
    from fastllm.ops._checks import INT8_MAX_K

    assert INT8_MAX_K == 133_144 and INT8_MAX_K * 127**2 <= 2**31 - 1 < (INT8_MAX_K + 1) * 127**2

    def no_dispatch(*args, **kwargs):
        raise AssertionError("an int8 kernel was chosen for a K that overflows int32")

    monkeypatch.setattr(backend, "select", no_dispatch)  # refused before any backend runs
    for what, call in _int8_calls(INT8_MAX_K + 1).items():
        with pytest.raises(ValueError, match=r"K = 133145 .*expected K <= 133144") as info:
            call()
        assert "int32 accumulator" in str(info.value), what


@pytest.mark.parametrize("name", available_backends("int8_linear"))
def test_int8_k_at_accumulator_limit_is_exact(name):
    # K = 133,144 products of 127 * 127 sum to 2,147,479,576 <= 2**31 - 1: no overflow
    K = 133_144 if name != "cuda" else 133_136  # the CUDA kernel takes K % 16 == 0 only
    calls = _int8_calls(K)
    with fastllm.use_backend(name):
        out = calls["int8_linear"]()
        op_out = calls["op.int8_linear"]()
    expect = torch.tensor([[K * 127 * 127]], dtype=torch.float32, device=DEVICE)
    assert torch.equal(out, expect) and torch.equal(op_out, expect)
    if name in available_backends("int8_dynamic_linear"):
        with fastllm.use_backend(name):
            dyn = calls["int8_dynamic_linear"]()  # x = 1 quantizes to 127 with scale 1/127
        assert rel_err(dyn, torch.tensor([[K * 127.0]], device=DEVICE)) <= 1e-6


def test_reference_accumulator_refuses_to_wrap():
    # the reference's exact int32 accumulator says so where a sum leaves int32
    x = torch.full((1, 133_145), 127, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"K = 133145\) holds sums in \[2147495705, 2147495705\]"):
        reference.int8_matmul_int32(x, x)
    assert reference.int8_matmul_int32(x[:, 1:], x[:, 1:]).item() == 2_147_479_576


# --- the cpu backend's launchers (fastllm/native/cpu.py) -------------------------------------


@pytest.mark.skipif(
    "cpu" not in available_backends("quantize_per_token", torch.device("cpu")),
    reason="fastllm._C (C++ CPU kernels) is not built",
)
def test_cpu_launchers_take_any_layout():
    from fastllm.native import cpu as native_cpu

    # a column of one element (K = 1) has any stride: (K, 1) from a transposed (1, K)
    x = torch.randn(1, 40).t()
    for q, ref in zip(native_cpu.quantize_per_token(x), reference.quantize_per_token(x)):
        assert torch.equal(q, ref)
    x = torch.randn(7, 40).t()  # (40, 7), last dimension not unit-stride: copied
    for q, ref in zip(native_cpu.quantize_per_token(x), reference.quantize_per_token(x)):
        assert torch.equal(q, ref)
    with pytest.raises(ValueError, match=r"x must be a 2-D CPU tensor, got shape \(2, 3, 4\)"):
        native_cpu.quantize_per_token(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="acc must be a contiguous 2-D int32"):
        native_cpu.epilogue(torch.zeros(4, 4).t(), torch.ones(4), torch.ones(4), None, x.dtype)
    # one row whose row stride is 0 (as_strided, contiguous in PyTorch's sense): the
    # W8A16 kernel takes any row stride for one row
    w_int8, w_scale = _weight(8, 40)
    row = torch.randn(40)
    x = row.as_strided((1, 40), (0, 1))
    assert x.is_contiguous()
    expect = reference.int8_weight_only_linear(row[None], w_int8, w_scale)
    assert rel_err(native_cpu.w8a16_linear(x, w_int8, w_scale), expect) <= 1e-6


def _small_m_kernel():
    if "cpu" not in available_backends("int8_linear", torch.device("cpu")):
        return False
    from fastllm.native import cpu as native_cpu

    return native_cpu.small_m_kernel()


needs_small_m_kernel = pytest.mark.skipif(
    not _small_m_kernel(), reason="fastllm._C is not built, or this CPU has no AVX512-VNNI"
)


@needs_small_m_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "M, N, K",
    [(1, 1, 1), (2, 3, 5), (3, 5, 63), (4, 4, 64), (5, 7, 65), (7, 9, 129), (9, 17, 1000),
     (16, 33, 384), (33, 6, 4097)],
)  # fmt: skip
def test_cpu_small_m_matmul_is_exact(M, N, K, threads):
    # the AVX512-VNNI int8 matmul: every M, N, K tail, the full int8 range, rows at strides
    # wider than K, and both thread counts give the exact int32 sums
    from fastllm import native

    x = torch.randint(-128, 128, (M, K + 3), dtype=torch.int8)[:, :K]
    w = torch.randint(-128, 128, (N, K + 5), dtype=torch.int8)[:, :K]
    x[0], w[0] = -128, -128
    acc = torch.full((M, N + 2), 7, dtype=torch.int32)
    native.module().int8_mm_cpu(
        x.data_ptr(), x.stride(0), w.data_ptr(), w.stride(0), acc.data_ptr(), N + 2, M, N, K,
        threads,
    )  # fmt: skip
    assert torch.equal(acc[:, :N].long(), x.long() @ w.long().T)
    assert (acc[:, N:] == 7).all()  # nothing written past N


@needs_small_m_kernel
def test_cpu_small_m_matmul_at_the_accumulator_limit():
    # K = 133,144 with |x| = |w| = 127: sums up to 2^31 - 4,071; the unsigned-times-signed
    # products and their correction wrap modulo 2^32 on the way and must come back exact
    from fastllm.native import cpu as native_cpu

    K = 133_144
    x = torch.full((3, K), 127, dtype=torch.int8)
    x[1] = -127
    w = torch.full((5, K), 127, dtype=torch.int8)
    w[2] = -127
    assert native_cpu.uses_small_m_kernel(3, K, 5)
    exact = x.long() @ w.long().T
    assert exact.abs().max() == 127 * 127 * K
    assert torch.equal(native_cpu.int_mm(x, w).long(), exact)


@needs_small_m_kernel
def test_cpu_small_m_rows_choose_the_kernel_and_match_int_mm(monkeypatch):
    # which rows counts go to fastllm's kernel, and the W8A8 ops through either matmul give
    # the same bits
    from fastllm import native
    from fastllm.native import cpu as native_cpu

    uses = native_cpu.uses_small_m_kernel
    assert uses(1, 64, 64) and uses(16, 64, 64) and not uses(17, 64, 64)
    assert uses(64, 1024, 1024) and not uses(65, 1024, 1024)
    assert uses(256, 4096, 4096) and not uses(257, 4096, 4096)
    calls = []
    real = native.module()

    class Spy:  # the module's attributes, with int8_mm_cpu counted
        def __getattr__(self, name):
            return getattr(real, name)

        def int8_mm_cpu(self, *args):
            calls.append(args[6])  # M
            return real.int8_mm_cpu(*args)

    w_int8, w_scale = reference.quantize_per_channel(torch.randn(96, 200) * 0.05)
    bias = torch.randn(96)
    for M in (1, 2, 5, 16):
        x = torch.randn(M, 200)
        with monkeypatch.context() as m:
            m.setattr(native, "module", lambda: Spy())
            fast = [_run("int8_dynamic_linear", "cpu", x, w_int8, w_scale, bias)]
            fast.append(
                _run("int8_dynamic_linear", "cpu", x, w_int8, w_scale, bias, activation="gelu")
            )
        assert calls[-2:] == [M, M]
        with monkeypatch.context() as m:
            m.setattr(native_cpu, "_SMALL_M_KERNEL", False)  # torch._int_mm instead
            slow = [_run("int8_dynamic_linear", "cpu", x, w_int8, w_scale, bias)]
            slow.append(
                _run("int8_dynamic_linear", "cpu", x, w_int8, w_scale, bias, activation="gelu")
            )
        for a, b in zip(fast, slow):
            assert torch.equal(a, b), M


def test_small_m_matmul_refuses_bad_sizes():
    # (no "cpu" in the name: `make asan` runs the cpu tests with an AddressSanitizer that
    # cannot intercept C++ exceptions, and this error leaves the kernel as one)
    if "cpu" not in available_backends("int8_linear", torch.device("cpu")):
        pytest.skip("fastllm._C (C++ CPU kernels) is not built")
    from fastllm import native

    mod = native.module()
    with pytest.raises(Exception, match="int8_mm_cpu: negative size"):
        mod.int8_mm_cpu(0, 1, 0, 1, 0, 1, -1, 1, 1, 1)
    if not mod.int8_mm_cpu_available():
        with pytest.raises(Exception, match="no AVX512-VNNI"):
            mod.int8_mm_cpu(0, 1, 0, 1, 0, 1, 1, 1, 1, 1)


# --- bad input ---------------------------------------------------------------------------


def _good():
    x = torch.randn(4, 16)
    x_int8, x_scale = reference.quantize_per_token(x)
    w_int8, w_scale = reference.quantize_per_channel(torch.randn(8, 16))
    return x, x_int8, x_scale, w_int8, w_scale


def _bad_cases():
    x, xq, xs, wq, ws = _good()
    L, D = fastllm.ops.int8_linear, fastllm.ops.int8_dynamic_linear
    W = fastllm.ops.int8_weight_only_linear
    return [
        (lambda: L(x, xs, wq, ws), TypeError, ["x_int8", "torch.float32", "int8"]),
        (lambda: L(xq, xs, wq.float(), ws), TypeError, ["w_int8", "torch.float32", "int8"]),
        (lambda: L(xq, xs.half(), wq, ws), TypeError, ["x_scale", "torch.float16", "float32"]),
        (lambda: L(xq, xs[:3], wq, ws), ValueError, ["x_scale", "(3,)", "(4,)"]),
        (lambda: L(xq, xs, wq, ws[:7]), ValueError, ["w_scale", "(7,)", "(8,)"]),
        (lambda: L(xq, xs, wq, ws.double()), TypeError, ["w_scale", "torch.float64"]),
        (lambda: L(xq[:, :15], xs, wq, ws), ValueError, ["K = 15", "K = 16", "w_int8"]),
        (lambda: L(xq, xs, wq, ws, torch.randn(9)), ValueError, ["bias", "(9,)", "(8,)"]),
        (lambda: L(xq, xs, wq, ws, torch.ones(8).long()), TypeError, ["bias", "int64"]),
        (lambda: L(xq, xs, wq, ws, out_dtype=torch.int8), ValueError, ["out_dtype", "int8"]),
        (lambda: L(xq, xs, wq, ws, out_dtype="fp8"), ValueError, ["out_dtype", "'fp8'"]),
        (lambda: L(xq, xs, wq[None], ws), ValueError, ["w_int8", "2 dimensions", "(1, 8, 16)"]),
        (lambda: L(xq, xs, wq, "s"), TypeError, ["w_scale", "str"]),
        (lambda: D(xq, wq, ws), TypeError, ["x", "torch.int8", "int8_linear"]),
        (lambda: D(x.double(), wq, ws), TypeError, ["x", "torch.float64"]),
        (lambda: D(x, wq.float(), ws), TypeError, ["w_int8", "torch.float32"]),
        (lambda: D(x[:, :10], wq, ws), ValueError, ["K = 10", "K = 16"]),
        (lambda: D(x, wq, ws, smooth_scale=torch.ones(15)), ValueError, ["smooth_scale", "(16,)"]),
        (lambda: D(x, wq, ws, smooth_scale=torch.ones(16).half()), TypeError, ["smooth_scale"]),
        (lambda: W(xq, wq, ws), TypeError, ["x", "torch.int8", "float"]),
        (lambda: W(x, wq.to(torch.uint8), ws), TypeError, ["w_int8", "torch.uint8"]),
        (lambda: W(x, wq, ws, torch.randn(8, 1)), ValueError, ["bias", "(8, 1)"]),
        (lambda: W(torch.tensor(1.0), wq, ws), ValueError, ["x", "at least 1"]),
        (lambda: fastllm.ops.quantize_per_channel(wq), TypeError, ["w", "torch.int8"]),
        (lambda: fastllm.ops.quantize_per_channel(x, dim=2), ValueError, ["dim 2", "(4, 16)"]),
        (lambda: fastllm.ops.quantize_per_channel(x, dim=0.5), TypeError, ["dim", "float"]),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input(case):
    fn, err, words = _bad_cases()[case]
    with pytest.raises(err) as info:
        fn()
    for w in words:
        assert w in str(info.value), (w, str(info.value))


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
def test_devices_differ():
    x, xq, xs, wq, ws = _good()
    with pytest.raises(ValueError, match="w_scale is on cuda"):
        fastllm.ops.int8_linear(xq, xs, wq, ws.cuda())
    with pytest.raises(ValueError, match="w_int8 is on cuda"):
        fastllm.ops.int8_weight_only_linear(x, wq.cuda(), ws)


def test_devices_differ_meta():
    # the same check without a GPU: a meta tensor is another device
    x, xq, xs, wq, ws = _good()
    with pytest.raises(ValueError, match="w_scale is on meta but x_int8 is on cpu"):
        fastllm.ops.int8_linear(xq, xs, wq, ws.to("meta"))
    with pytest.raises(ValueError, match="bias is on meta but x is on cpu"):
        fastllm.ops.int8_dynamic_linear(x, wq, ws, torch.ones(8, device="meta"))


# --- torch.library -----------------------------------------------------------------------


@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck(with_bias):
    x, xq, xs, wq, ws = (t.to(DEVICE) for t in _good())
    b = torch.randn(8, device=DEVICE) if with_bias else None
    ops = torch.ops.fastllm
    torch.library.opcheck(ops.int8_linear.default, (xq, xs, wq, ws, b, torch.bfloat16))
    torch.library.opcheck(ops.int8_linear.default, (xq, xs, wq, ws, b, torch.float32))
    torch.library.opcheck(ops.int8_dynamic_linear.default, (x, wq, ws, b, None))
    smooth = torch.rand(x.shape[-1], device=DEVICE) + 0.5
    torch.library.opcheck(ops.int8_dynamic_linear.default, (x, wq, ws, b, smooth))
    torch.library.opcheck(ops.int8_weight_only_linear.default, (x.bfloat16(), wq, ws, b))
    torch.library.opcheck(ops.quantize_per_channel.default, (x, 1))


def test_compile_fullgraph():
    w_int8, w_scale = _weight(24, 40)

    def f(x):
        h = fastllm.ops.int8_dynamic_linear(x, w_int8, w_scale)
        xq, xs = fastllm.ops.quantize_per_token(h)
        return fastllm.ops.int8_linear(xq, xs, w_int8[:, :24], w_scale, out_dtype=torch.float32)

    x = torch.randn(2, 5, 40, device=DEVICE)
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), f(x))


# --- real sizes on a GPU -------------------------------------------------------------------


def _serves(op, name, *args):
    """Whether backend `name` exists for `op` and accepts these normalized arguments."""
    if name not in backend.backends_of(op):
        return False
    return backend.why_not(op, name, args[0].device, *args) is None


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("M", [1, 3, 17, 257, 1024])
@pytest.mark.parametrize("N, K", [(4096, 4096), (14336, 4096), (1000, 4100)])
def test_gpu_real_sizes(name, M, N, K, monkeypatch):
    dev = torch.device("cuda")
    x = torch.randn(M, K, device=dev)
    x[0, 7] = 200.0
    w_int8, w_scale = reference.quantize_per_channel(torch.randn(N, K, device=dev) * 0.02)
    bias = torch.randn(N, device=dev, dtype=torch.bfloat16)
    x_int8, x_scale = reference.quantize_per_token(x)
    poison_empty(monkeypatch)
    served = 0
    if _serves("int8_linear", name, x_int8, x_scale, w_int8, w_scale, bias, torch.bfloat16):
        served += 1
        ref = reference.int8_linear(x_int8, x_scale, w_int8, w_scale, bias, torch.float64)
        for dtype in DTYPES:
            out = _run("int8_linear", name, x_int8, x_scale, w_int8, w_scale, bias, dtype)
            assert rel_err(out, ref) <= TOL[dtype], dtype
        ones_m, ones_n = torch.ones(M, device=dev), torch.ones(N, device=dev)
        acc = _run("int8_linear", name, x_int8, ones_m, w_int8, ones_n, None, torch.float32)
        exact = reference.int8_matmul_int32(x_int8, w_int8)
        # float32 holds the accumulator exactly below 2**24
        small = exact.abs() < 2**24
        assert torch.equal(acc[small].long(), exact[small].long())
    for dtype in (torch.bfloat16, torch.float16):
        xd = x.to(dtype)
        if _serves("int8_dynamic_linear", name, xd, w_int8, w_scale, bias):
            served += 1
            ref = reference.int8_dynamic_linear(xd, w_int8, w_scale, bias)
            out = _run("int8_dynamic_linear", name, xd, w_int8, w_scale, bias)
            assert rel_err(out, ref) <= TOL[dtype], dtype
        if M <= 257 and _serves("int8_weight_only_linear", name, xd, w_int8, w_scale, bias):
            served += 1
            ref = reference.int8_weight_only_linear(xd.float(), w_int8, w_scale, bias)
            out = _run("int8_weight_only_linear", name, xd, w_int8, w_scale, bias)
            assert rel_err(out, ref) <= TOL[dtype], dtype
    # triton and torch serve every shape (all 3 or 5 calls); only cuda may decline some
    if name != "cuda":
        assert served == (3 if M > 257 else 5), served
    elif not served:
        pytest.skip("the cuda backend serves none of these calls")


@pytest.mark.gpu
@pytest.mark.parametrize("M, N, K", [(64, 128, 2048), (257, 1000, 1000)])
def test_gpu_accumulator_bit_exact(M, N, K):
    # |acc| <= K * 128 * 128 < 2**24: the float32 output with unit scales is the accumulator
    x = torch.randint(-128, 128, (M, K), dtype=torch.int8, device="cuda")
    w = torch.randint(-128, 128, (N, K), dtype=torch.int8, device="cuda")
    exact = x.cpu().long() @ w.cpu().long().T
    ones_m, ones_n = torch.ones(M, device="cuda"), torch.ones(N, device="cuda")
    args = (x, ones_m, w, ones_n, None, torch.float32)
    names = [n for n in ("cuda", "triton", "torch") if _serves("int8_linear", n, *args)]
    assert {"triton", "torch"} <= set(names)
    for name in names:
        out = _run("int8_linear", name, *args)
        assert torch.equal(out.cpu().long(), exact), name
