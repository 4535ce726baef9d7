"""The W8A8 ops' epilogue options (fastllm/ops/int8.py: activation, gated, residual,
quantize_output) on every backend against the reference, the quantized output against
the unfused sequence, bad arguments, opcheck and torch.compile."""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, HAS_GPU, available_backends, rel_err

import fastllm
import fastllm.ops.int8 as int8_ops
from fastllm import backend, reference
from fastllm.ops import int8_dynamic_gated_linear, int8_dynamic_linear, int8_linear
from fastllm.reference import int8 as ref_int8

OP = "int8_fused_linear"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
INTERPRETED = backend.triton_interpreted() and not HAS_GPU
ACTS = [None, "gelu", "gelu_tanh", "silu"]
BACKENDS = [b for b in available_backends(OP) if b != "reference"]
# odd shapes; M = 3 and 70 take the Triton fused-quantization kernel and the two-kernel path
SHAPES = [(1, 40, 72), (3, 33, 100), (70, 24, 36)]


def _x(M, K, dtype):
    x = torch.randn(M, K, device=DEVICE)
    if M >= 3:
        x[1] *= 30
    return x.to(dtype)


def _w(N, K):
    return reference.quantize_per_channel(torch.randn(N, K, device=DEVICE) * 0.1)


def _forced(name, fn, *args, **kwargs):
    with fastllm.use_backend(name):
        out = fn(*args, **kwargs)
    assert fastllm.last_backend(OP) == name
    return out


def _check(out, ref, dtype):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert rel_err(out, ref) <= TOL[dtype], (rel_err(out, ref), dtype)


# --- each option x backend x dtype x shape against the reference --------------------------


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("M, N, K", SHAPES)
def test_dynamic_epilogue_matches_reference(name, dtype, act, with_residual, M, N, K):
    x = _x(M, K, dtype)
    w, ws = _w(N, K)
    bias = torch.randn(N, device=DEVICE, dtype=dtype)
    res = torch.randn(M, N, device=DEVICE, dtype=dtype) * 4 if with_residual else None
    if act is None and res is None:
        res = torch.zeros(M, N, device=DEVICE, dtype=dtype)  # an option, to take the fused op
    out = _forced(name, int8_dynamic_linear, x, w, ws, bias, activation=act, residual=res)
    ref = ref_int8.int8_dynamic_linear(x, w, ws, bias, activation=act, residual=res)
    _check(out, ref, dtype)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS[1:])
@pytest.mark.parametrize("M, N, K", SHAPES)
def test_static_epilogue_matches_reference(name, out_dtype, act, M, N, K):
    x_int8, x_scale = reference.quantize_per_token(_x(M, K, torch.float32))
    w, ws = _w(N, K)
    res = torch.randn(M, N, device=DEVICE).to(out_dtype)
    out = _forced(
        name, int8_linear, x_int8, x_scale, w, ws, None, out_dtype, activation=act, residual=res
    )
    ref = ref_int8.int8_linear(
        x_int8, x_scale, w, ws, None, out_dtype, activation=act, residual=res
    )
    _check(out, ref, out_dtype)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("M, I, K", [(1, 20, 72), (3, 33, 100), (70, 12, 36)])
def test_gated_matches_reference(name, dtype, act, with_bias, M, I, K):
    x = _x(M, K, dtype)
    w_gate_up, ws = _w(2 * I, K)
    bias = torch.randn(2 * I, device=DEVICE, dtype=dtype) if with_bias else None
    out = _forced(name, int8_dynamic_gated_linear, x, w_gate_up, ws, bias, activation=act)
    ref = ref_int8.int8_dynamic_gated_linear(x, w_gate_up, ws, bias, activation=act)
    _check(out, ref, dtype)
    # the same as the two halves computed apart and combined in float64
    g = ref_int8.int8_dynamic_linear(
        x.double(), w_gate_up[:I], ws[:I], None if bias is None else bias[:I]
    )
    u = ref_int8.int8_dynamic_linear(
        x.double(), w_gate_up[I:], ws[I:], None if bias is None else bias[I:]
    )
    act_fn = F.silu if act == "silu" else (lambda t: F.gelu(t, approximate="tanh"))
    _check(out, (act_fn(g) * u).to(dtype), dtype)


def test_reference_epilogue_against_formulas():
    y = torch.linspace(-8, 8, 1001, dtype=torch.float64)
    torch.testing.assert_close(
        ref_int8.activation(y, "gelu"), y * 0.5 * (1 + torch.erf(y / 2**0.5)), rtol=0, atol=1e-15
    )
    t = torch.tanh((2 / torch.pi) ** 0.5 * (y + 0.044715 * y**3))
    torch.testing.assert_close(ref_int8.activation(y, "gelu_tanh"), 0.5 * y * (1 + t))
    torch.testing.assert_close(ref_int8.activation(y, "silu"), y / (1 + torch.exp(-y)))


# --- quantized output: bit for bit the unfused sequence -------------------------------------


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("M, N, K", [(3, 40, 72), (70, 24, 36)])
def test_quantized_output_bit_identical_to_unfused(name, dtype, smooth, gated, M, N, K):
    x = _x(M, K, dtype)
    w, ws = _w(2 * N if gated else N, K)
    res = torch.randn(M, N, device=DEVICE, dtype=dtype)
    s = torch.rand(N, device=DEVICE) + 0.5 if smooth else None
    fn = int8_dynamic_gated_linear if gated else int8_dynamic_linear
    kw = {} if gated else {"activation": "gelu"}
    y = _forced(name, fn, x, w, ws, None, residual=res, **kw)
    q, scale = _forced(
        name, fn, x, w, ws, None, residual=res, quantize_output=True, output_smooth_scale=s, **kw
    )
    q_ref, scale_ref = fastllm.ops.quantize_per_token(y if s is None else y.float() / s)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref)
    # and close to the reference's: y's rounding to x's dtype (truncation under the Triton
    # interpreter) may move a code by one, on top of the quantization's own error
    rq, rs = ref_int8.int8_dynamic_linear(
        x,
        w,
        ws,
        None,
        activation=kw.get("activation", "silu"),
        gated=gated,
        residual=res,
        quantize_output=True,
        output_smooth_scale=s,
    )
    assert rel_err(q.float() * scale[:, None], rq.float() * rs[:, None]) <= 2e-2


def test_quantized_output_feeds_the_next_gemm():
    """rms_norm -> gated (quantized) -> down with residual: the Llama MLP on int8 ops."""
    M, D, I = 5, 64, 48
    h = torch.randn(M, D, device=DEVICE)
    wgu, sgu = _w(2 * I, D)
    wd, sd = _w(D, I)
    q, s = fastllm.ops.rms_norm(h, torch.ones(D, device=DEVICE), quantize=True)
    a8, a_s = int8_linear(
        q, s, wgu, sgu, None, torch.float32, gated=True, activation="silu", quantize_output=True
    )
    out = int8_linear(a8, a_s, wd, sd, None, torch.float32, residual=h)
    ref = ref_int8.int8_linear(
        *ref_int8.int8_linear(
            q, s, wgu, sgu, None, torch.float32, activation="silu", gated=True, quantize_output=True
        ),
        wd,
        sd,
        None,
        torch.float32,
        residual=h,
    )
    assert rel_err(out, ref) <= 1e-5


# --- cpu backend: float epilogue bit-identical to torch where it has no activation ----------


@pytest.mark.skipif("cpu" not in available_backends(OP, torch.device("cpu")), reason="no _C")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
def test_cpu_matches_torch(dtype, act):
    M, N, K = 37, 300, 129
    x = torch.randn(M, K).to(dtype)
    w, ws = reference.quantize_per_channel(torch.randn(N, K))
    bias = torch.randn(N).to(dtype)
    res = torch.randn(M, N).to(dtype)
    outs = [
        _forced(n, int8_dynamic_linear, x, w, ws, bias, activation=act, residual=res)
        for n in ("cpu", "torch")
    ]
    if act is None:  # scaling, bias, residual add: the same float32 operations
        assert torch.equal(outs[0], outs[1])
    else:  # the C++ approximations against ATen's
        assert rel_err(outs[0], outs[1]) <= (1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.skipif("cpu" not in available_backends(OP, torch.device("cpu")), reason="no _C")
@pytest.mark.parametrize("act", ACTS[1:])
def test_cpu_activations_elementwise_and_in_the_tails(act):
    """Each value against the activation in float64, written without cancellation (erfc,
    sigmoid), so that the tails are checked too; and NaN and +-inf."""
    x = torch.cat([torch.linspace(-14, 14, 100_001), torch.tensor([0.0, -0.0, 1e-30, -1e-30])])
    ones = torch.ones(x.numel(), 1, dtype=torch.int8)
    w, ws = torch.ones(1, 1, dtype=torch.int8), torch.ones(1)

    # an int8 GEMM of ones scaled by x: the accumulator's scaled value is x exactly; a zero
    # residual keeps the activation in the C++ pass (GELU alone goes to ATen's, in place)
    def run(ones, x):
        zero = torch.zeros(x.numel(), 1)
        return _forced(
            "cpu", int8_linear, ones, x, w, ws, None, torch.float32, activation=act, residual=zero
        )

    y = run(ones, x)[:, 0]
    xd = x.double()
    if act == "gelu":
        want = 0.5 * xd * torch.special.erfc(-xd / 2**0.5)
    elif act == "gelu_tanh":
        want = xd * torch.sigmoid(2 * 0.7978845608028654 * (xd + 0.044715 * xd**3))
    else:
        want = xd * torch.sigmoid(xd)
    tiny = want.abs() <= 1e-30
    rel = (y.double() - want).abs() / want.abs()
    near = (x.abs() <= 5) & ~tiny
    assert rel[near].max() <= (2e-7 if act == "silu" else 3e-6), rel[near].max()
    # beyond, the float32 rounding of the exponent's argument (up to ~100) shows, on
    # results below 1e-10 in magnitude
    assert rel[~tiny].max() <= (2e-7 if act == "silu" else 3e-5), rel[~tiny].max()
    assert (y[tiny].double() - want[tiny]).abs().max() <= 1e-30
    special = torch.tensor([float("nan"), float("inf"), float("-inf")])
    y = run(ones[:3], special)
    # the limits; PyTorch's own gelu gives +inf or NaN at +inf depending on its code path
    want = torch.tensor([float("nan"), float("inf"), float("nan")])
    torch.testing.assert_close(y[:, 0], want, equal_nan=True)


# --- shapes: leading dimensions, strides, empty ------------------------------------------


def test_leading_dims_and_strided_residual():
    x = torch.randn(2, 3, 40, device=DEVICE)[:, :, ::2]  # (2, 3, 20), strided
    w, ws = _w(24, 20)
    res = torch.randn(2, 3, 48, device=DEVICE)[..., ::2]
    out = int8_dynamic_linear(x, w, ws, activation="silu", residual=res)
    assert out.shape == (2, 3, 24)
    ref = ref_int8.int8_dynamic_linear(
        x.reshape(6, 20), w, ws, activation="silu", residual=res.reshape(6, 24)
    )
    _check(out.reshape(6, 24), ref, torch.float32)
    q, s = int8_dynamic_gated_linear(x, w, ws, quantize_output=True)
    assert q.shape == (2, 3, 12) and s.shape == (2, 3)


@pytest.mark.parametrize("shape, N", [((0, 8), 4), ((3, 0), 4), ((3, 8), 0)])
@pytest.mark.parametrize("quantize", [False, True])
def test_empty_and_k0(shape, N, quantize):
    x = torch.randn(*shape, device=DEVICE)
    w = torch.zeros(N, shape[-1], dtype=torch.int8, device=DEVICE)
    ws = torch.ones(N, device=DEVICE)
    bias = torch.randn(N, device=DEVICE)
    out = int8_dynamic_linear(x, w, ws, bias, activation="gelu", quantize_output=quantize)
    y = out[0] if quantize else out
    assert y.shape == (*shape[:-1], N)
    if not quantize and y.numel():
        torch.testing.assert_close(y, F.gelu(bias).expand_as(y))


# --- bad arguments ------------------------------------------------------------------------


def _bad_cases():
    x = torch.randn(4, 16)
    w, ws = reference.quantize_per_channel(torch.randn(6, 16))
    w7, ws7 = reference.quantize_per_channel(torch.randn(7, 16))
    x8, xs = reference.quantize_per_token(x)
    dyn, gat = int8_dynamic_linear, int8_dynamic_gated_linear
    return [
        (dyn, (x, w, ws), dict(activation="relu"), ValueError, "activation is 'relu'"),
        (dyn, (x, w, ws), dict(activation="GELU"), ValueError, "expected None, 'gelu'"),
        (dyn, (x, w, ws), dict(residual=torch.randn(4, 5)), ValueError, "residual has shape"),
        (dyn, (x, w, ws), dict(residual=torch.randn(4, 6).half()), TypeError, "residual has dtype"),
        (dyn, (x, w, ws), dict(residual=[0.0]), TypeError, "residual must be a torch.Tensor"),
        (dyn, (x, w, ws), dict(quantize_output=1), TypeError, "quantize_output must be a bool"),
        (
            dyn,
            (x, w, ws),
            dict(output_smooth_scale=torch.ones(6)),
            ValueError,
            "quantize_output is False",
        ),
        (
            dyn,
            (x, w, ws),
            dict(quantize_output=True, output_smooth_scale=torch.ones(5)),
            ValueError,
            "output_smooth_scale has shape",
        ),
        (
            dyn,
            (x, w, ws),
            dict(quantize_output=True, output_smooth_scale=torch.ones(6).half()),
            TypeError,
            "output_smooth_scale has dtype",
        ),
        (gat, (x, w7, ws7), {}, ValueError, "expected an even number"),
        (gat, (x, w, ws), dict(residual=torch.randn(4, 6)), ValueError, "expected the output's"),
        (
            int8_linear,
            (x8, xs, w, ws, None, torch.float16),
            dict(residual=torch.randn(4, 6)),
            TypeError,
            "expected the output's dtype torch.float16",
        ),
        (int8_linear, (x8, xs, w, ws), dict(gated="yes"), TypeError, "gated must be a bool"),
        (dyn, (x8, w, ws), dict(activation="silu"), TypeError, "x has dtype torch.int8"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_arguments(case):
    fn, args, kwargs, exc, match = _bad_cases()[case]
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


# --- opcheck and torch.compile ------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        dict(activation="gelu", gated=False, residual=True, quantize=False),
        dict(activation="silu", gated=True, residual=False, quantize=True),
        dict(activation=None, gated=False, residual=True, quantize=True),
    ],
)
@pytest.mark.parametrize("static", [False, True])
def test_opcheck(kw, static):
    M, N, K = 5, 12, 32
    x = torch.randn(M, K)
    w, ws = reference.quantize_per_channel(torch.randn(2 * N if kw["gated"] else N, K))
    res = torch.randn(M, N) if kw["residual"] else None
    s = torch.rand(N) + 0.5 if kw["quantize"] else None
    if static:
        x, xs = reference.quantize_per_token(x)
    else:
        xs = None
    args = (
        x,
        xs,
        w,
        ws,
        None,
        None,
        torch.float32,
        kw["activation"],
        kw["gated"],
        res,
        kw["quantize"],
        s,
    )
    torch.library.opcheck(torch.ops.fastllm.int8_fused_linear, args)


def test_compile_fullgraph():
    M, D, I = 6, 32, 24
    wgu, sgu = reference.quantize_per_channel(torch.randn(2 * I, D))
    wd, sd = reference.quantize_per_channel(torch.randn(D, I))

    def mlp(h):
        q, s = int8_dynamic_gated_linear(h, wgu, sgu, quantize_output=True)
        return int8_linear(q, s, wd, sd, None, torch.float32, activation=None, residual=h)

    h = torch.randn(M, D)
    torch._dynamo.reset()
    compiled = torch.compile(mlp, fullgraph=True)
    torch.testing.assert_close(compiled(h), mlp(h), rtol=0, atol=0)


def test_plain_call_keeps_the_plain_op():
    """No option: the existing op and backend record, not the fused one."""
    x = torch.randn(3, 16)
    w, ws = reference.quantize_per_channel(torch.randn(8, 16))
    int8_dynamic_linear(x, w, ws)
    assert fastllm.last_backend("int8_dynamic_linear") in ("cpu", "torch")
    assert int8_ops._plain(None, False, None, False, None)
