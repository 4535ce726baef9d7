"""fastllm.ops.rms_norm and layer_norm (with residual add and int8 output) on every
backend against the reference."""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, available_backends, poison_empty, rel_err

import fastllm
from fastllm import reference

BACKENDS = available_backends("rms_norm")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
SHAPES = [(1, 1), (3, 17), (5, 7, 123), (2, 1000), (4, 4097)]
NORMS = ["rms_norm", "layer_norm"]


def _inputs(norm, shape, dtype, residual=False):
    x = (torch.randn(shape, device=DEVICE) * 2 + 0.5).to(dtype)
    K = shape[-1]
    w = (torch.rand(K, device=DEVICE) + 0.5).to(dtype)
    b = torch.randn(K, device=DEVICE).to(dtype) if norm == "layer_norm" else None
    r = torch.randn(shape, device=DEVICE).to(dtype) if residual else None
    return x, w, b, r


def _call(fn_owner, norm, x, w, b, **kw):
    fn = getattr(fn_owner, norm)
    return fn(x, w, **kw) if norm == "rms_norm" else fn(x, w, b, **kw)


def _run(name, norm, x, w, b, **kw):
    with fastllm.use_backend(name):
        out = _call(fastllm.ops, norm, x, w, b, **kw)
    assert fastllm.last_backend(norm) == name
    return out


def test_backends_include_triton_cpu_and_torch():
    assert {"torch", "reference", "triton"} <= set(BACKENDS)
    assert available_backends("layer_norm") == BACKENDS


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(name, norm, dtype, shape, residual, monkeypatch):
    x, w, b, r = _inputs(norm, shape, dtype, residual)
    ref = _call(reference, norm, x, w, b, residual=r)
    poison_empty(monkeypatch)
    out = _run(name, norm, x, w, b, residual=r)
    if residual:
        (y, new_r), (ref_y, ref_r) = out, ref
        assert new_r.shape == x.shape and new_r.dtype == dtype
        # x + residual rounds once to dtype; the Triton interpreter truncates to bf16
        if name == "triton" and dtype == torch.bfloat16 and DEVICE.type == "cpu":
            assert rel_err(new_r, ref_r) <= TOL[dtype]
        else:
            assert torch.equal(new_r, ref_r)
    else:
        y, ref_y = out, ref
    assert y.shape == x.shape and y.dtype == dtype
    assert rel_err(y, ref_y) <= TOL[dtype], rel_err(y, ref_y)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (5, 7, 123), (2, 1000)])
def test_quantized_equals_norm_then_quantize(
    name, norm, dtype, shape, residual, smooth, monkeypatch
):
    # the fused op gives exactly what the unfused sequence gives on the same backend:
    # y = norm(x [+ residual]) in x's dtype, then quantize_per_token(y.float() / smooth)
    x, w, b, r = _inputs(norm, shape, dtype, residual)
    s = torch.rand(shape[-1], device=DEVICE) + 0.25 if smooth else None
    out = _run(name, norm, x, w, b, residual=r)
    y = out[0] if residual else out
    with fastllm.use_backend(name):
        want_q, want_s = fastllm.ops.quantize_per_token(y.float() / s if smooth else y)
    poison_empty(monkeypatch)
    fused = _run(name, norm, x, w, b, residual=r, quantize=True, smooth_scale=s)
    (q, scale), new_r = fused if residual else (fused, None)
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == x.shape[:-1]
    assert torch.equal(scale, want_s) and torch.equal(q, want_q)
    if residual:
        assert torch.equal(new_r, out[1])


def test_reference_follows_llama_and_torch():
    x = torch.randn(6, 300, dtype=torch.bfloat16)
    w = torch.randn(300, dtype=torch.bfloat16)
    b = torch.randn(300, dtype=torch.bfloat16)
    # transformers' LlamaRMSNorm.forward, verbatim
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert torch.equal(reference.rms_norm(x, w), w * h.to(torch.bfloat16))
    for dtype in DTYPES:
        xd, wd, bd = x.to(dtype), w.to(dtype), b.to(dtype)
        want = F.layer_norm(xd, (300,), wd, bd, 1e-5)
        assert rel_err(reference.layer_norm(xd, wd, bd), want) <= TOL[dtype]
    # and against float64
    x64, w64 = x.double(), w.double()
    want = x64 / (x64.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * w64
    assert rel_err(reference.rms_norm(x64, w64), want) < 1e-12
    assert rel_err(reference.rms_norm(x.float(), w.float()), want) < 1e-6


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("norm", NORMS)
def test_strided_inputs(name, norm):
    base = torch.randn(9, 4, 80, device=DEVICE)
    w = torch.rand(40, device=DEVICE) + 0.5
    b = torch.randn(40, device=DEVICE)
    views = [
        base[:, :, :40].transpose(0, 1),  # rows strided
        base[..., ::2],  # last dim not unit-stride: copied
        base[:1, 0, :40].expand(5, 40),  # one row read five times
    ]
    for x in views:
        r = torch.randn(x.shape, device=DEVICE).transpose(0, -1).contiguous().transpose(0, -1)
        y, new_r = _run(name, norm, x, w, b, residual=r)
        ref_y, ref_r = _call(reference, norm, x.contiguous(), w, b, residual=r.contiguous())
        assert rel_err(y, ref_y) <= 1e-5 and torch.equal(new_r, ref_r)
        q, s = _run(name, norm, x, w, b, quantize=True)
        with fastllm.use_backend(name):
            want = fastllm.ops.quantize_per_token(_call(fastllm.ops, norm, x.contiguous(), w, b))
        assert torch.equal(q, want[0]) and torch.equal(s, want[1])


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("quantize", [False, True])
def test_empty_rows(name, quantize):
    x = torch.randn(0, 3, 16, device=DEVICE)
    w = torch.ones(16, device=DEVICE)
    with fastllm.use_backend(name):
        (y, new_r) = fastllm.ops.rms_norm(x, w, residual=x, quantize=quantize)
    if quantize:
        assert y[0].shape == (0, 3, 16) and y[1].shape == (0, 3)
    else:
        assert y.shape == (0, 3, 16)
    assert new_r.shape == (0, 3, 16)


def test_zero_row_quantizes_to_zero():
    x = torch.zeros(2, 64, device=DEVICE)
    for name in BACKENDS:
        q, s = _run(name, "rms_norm", x, torch.ones(64, device=DEVICE), None, quantize=True)
        assert (q == 0).all() and (s == 1).all(), name


_X = torch.randn(2, 8)
_W = torch.ones(8)


@pytest.mark.parametrize(
    "kwargs, err, words",
    [
        (dict(x=_X.long()), TypeError, ["x", "torch.int64", "float32"]),
        (dict(x=_X.double(), weight=_W.double()), TypeError, ["x", "torch.float64"]),
        (dict(x=torch.tensor(1.0)), ValueError, ["x", "at least 1 dimension"]),
        (dict(x=torch.ones(2, 0), weight=torch.ones(0)), ValueError, ["x", "(2, 0)", "at least 1"]),
        (dict(weight=_W.half()), TypeError, ["weight", "torch.float16", "x has torch.float32"]),
        (dict(weight=torch.ones(9)), ValueError, ["weight", "(9,)", "(8,)"]),
        (dict(weight=[1.0] * 8), TypeError, ["weight", "list"]),
        (dict(residual=_X.half()), TypeError, ["residual", "torch.float16"]),
        (dict(residual=torch.ones(3, 8)), ValueError, ["residual", "(3, 8)", "(2, 8)"]),
        (dict(smooth_scale=torch.ones(8)), ValueError, ["smooth_scale", "quantize"]),
        (
            dict(quantize=True, smooth_scale=torch.ones(8).half()),
            TypeError,
            ["smooth_scale", "float16"],
        ),
        (
            dict(quantize=True, smooth_scale=torch.ones(7)),
            ValueError,
            ["smooth_scale", "(7,)", "(8,)"],
        ),
        (dict(quantize=1), TypeError, ["quantize", "bool", "int"]),
        (dict(eps=-1.0), ValueError, ["eps", "-1.0"]),
        (dict(eps=float("nan")), ValueError, ["eps", "nan"]),
    ],
)
def test_bad_input(kwargs, err, words):
    args = dict(x=_X, weight=_W)
    args.update(kwargs)
    x, w = args.pop("x"), args.pop("weight")
    for call in (
        lambda: fastllm.ops.rms_norm(x, w, **args),
        lambda: fastllm.ops.layer_norm(x, w, None, **args),
    ):
        with pytest.raises(err) as info:
            call()
        for word in words:
            assert word in str(info.value), (word, str(info.value))


def test_bias_checked():
    with pytest.raises(TypeError, match="bias has dtype torch.float16 but x has torch.float32"):
        fastllm.ops.layer_norm(_X, _W, _W.half())
    with pytest.raises(ValueError, match=r"bias has shape \(3,\); expected \(8,\)"):
        fastllm.ops.layer_norm(_X, _W, torch.ones(3))


def test_registered_op_checks_input():
    with pytest.raises(TypeError, match="weight has dtype"):
        torch.ops.fastllm.rms_norm(_X, _W.half(), None, None, 1e-6, False)
    y, r = torch.ops.fastllm.layer_norm(_X, _W, None, _X, None, 1e-5, False)
    assert y.shape == r.shape == _X.shape


@pytest.mark.parametrize("quantize", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_opcheck(residual, quantize):
    x = torch.randn(5, 33, device=DEVICE)
    w = torch.rand(33, device=DEVICE)
    r = torch.randn_like(x) if residual else None
    s = torch.rand(33, device=DEVICE) + 0.5 if quantize else None
    torch.library.opcheck(torch.ops.fastllm.rms_norm.default, (x, w, r, s, 1e-6, quantize))
    torch.library.opcheck(
        torch.ops.fastllm.layer_norm.default, (x, w, torch.randn_like(w), r, s, 1e-5, quantize)
    )


def test_compile_fullgraph():
    def block(x, r, w, b, s):
        # a decoder layer's norms: add + norm, then add + norm quantized for a W8A8 GEMM
        h, r = fastllm.ops.rms_norm(x, w, residual=r)
        (q, scale), r = fastllm.ops.layer_norm(h, w, b, residual=r, quantize=True, smooth_scale=s)
        return q.float() * scale[..., None] + r

    x, r = torch.randn(2, 3, 64, device=DEVICE), torch.randn(2, 3, 64, device=DEVICE)
    w, b = torch.rand(64, device=DEVICE) + 0.5, torch.randn(64, device=DEVICE)
    s = torch.rand(64, device=DEVICE) + 0.5
    compiled = torch.compile(block, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, r, w, b, s), block(x, r, w, b, s), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["triton", "torch"])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 4096), (4096, 4096), (3, 14336), (7, 16384)])
def test_gpu_real_sizes(name, norm, dtype, shape, monkeypatch):
    x, w, b, r = _inputs(norm, shape, dtype, residual=True)
    ref_y, ref_r = _call(reference, norm, x, w, b, residual=r)
    poison_empty(monkeypatch)
    y, new_r = _run(name, norm, x, w, b, residual=r)
    assert torch.equal(new_r, ref_r) and rel_err(y, ref_y) <= TOL[dtype]
    s = torch.rand(shape[-1], device="cuda") + 0.25
    q, scale = _run(name, norm, x, w, b, quantize=True, smooth_scale=s)
    with fastllm.use_backend(name):
        want = fastllm.ops.quantize_per_token(_run(name, norm, x, w, b).float() / s)
    assert torch.equal(q, want[0]) and torch.equal(scale, want[1])
