"""fastllm.nn.Int8Linear: quantization error against the float layer, state_dict,
shapes, errors, torch.compile."""

import pytest
import torch
from conftest import DEVICE, HAS_GPU, available_backends
from torch import nn

import fastllm
from fastllm.nn import Int8Linear

INTERPRETED = fastllm.backend.triton_interpreted() and not HAS_GPU


def sqnr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of out against ref, in dB."""
    out, ref = out.double(), ref.double()
    return 10 * torch.log10(ref.square().sum() / (out - ref).square().sum()).item()


def _linear(K, N, bias=True, dtype=torch.float32):
    return nn.Linear(K, N, bias=bias).to(device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("mode, min_db", [("w8a8", 30.0), ("w8a16", 40.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sqnr_against_float_layer(mode, min_db, dtype):
    K, N = 512, 384
    lin = _linear(K, N, dtype=dtype)
    x = torch.randn(4, 33, K, device=DEVICE, dtype=dtype)
    q = Int8Linear.from_linear(lin, mode=mode)
    with torch.no_grad():
        ref = lin.double()(x.double())
    out = q(x)
    assert out.dtype == dtype and out.shape == (4, 33, N)
    assert sqnr_db(out, ref) >= min_db
    # a check that can fail: a layer with another weight is far off
    other = Int8Linear.from_linear(_linear(K, N, dtype=dtype), mode=mode)
    assert sqnr_db(other(x), ref) < 10


@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("smooth", [False, True])
def test_state_dict_round_trip(mode, bias, smooth):
    K, N = 72, 40
    lin = _linear(K, N, bias=bias, dtype=torch.bfloat16)
    s = torch.rand(K, device=DEVICE) + 0.5 if smooth else None
    q = Int8Linear.from_linear(lin, mode=mode, smooth_scale=s)
    sd = q.state_dict()
    assert sd["weight"].dtype == torch.int8 and sd["weight_scale"].dtype == torch.float32
    assert ("bias" in sd) == bias and ("smooth_scale" in sd) == smooth
    if bias:
        assert sd["bias"].dtype == torch.bfloat16  # kept in the original layer's dtype
    fresh = Int8Linear(K, N, bias=bias, smooth=smooth, mode="w8a16", dtype=torch.bfloat16)
    fresh.to(DEVICE).load_state_dict(sd)
    assert fresh.mode == mode  # carried in the extra state
    for k, v in fresh.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert v.dtype == sd[k].dtype and torch.equal(v, sd[k]), k
    x = torch.randn(3, K, device=DEVICE, dtype=torch.bfloat16)
    assert torch.equal(fresh(x), q(x))


def test_smooth_scale_keeps_float_result():
    K, N = 96, 48
    lin = _linear(K, N)
    x = torch.randn(20, K, device=DEVICE)
    s = torch.rand(K, device=DEVICE) * 4 + 0.25
    plain = Int8Linear.from_linear(lin, mode="w8a16")
    smoothed = Int8Linear.from_linear(lin, mode="w8a16", smooth_scale=s)
    # W * s is quantized, then divided by s: at most half a step of W * s, over s
    bound = 0.5 * smoothed.weight_scale[:, None] / s[None, :] + 1e-7
    assert ((smoothed.dequantized_weight() - lin.weight.detach()).abs() <= bound).all()
    with torch.no_grad():
        ref = lin(x)
    # random factors (up to 17x apart) cost weight precision, but the result stays close
    assert sqnr_db(smoothed(x), ref) >= 30 and sqnr_db(plain(x), ref) >= 40


def test_to_dtype_keeps_float32_scales():
    lin = _linear(32, 16)
    q = Int8Linear.from_linear(lin, mode="w8a8", smooth_scale=torch.rand(32, device=DEVICE) + 1)
    scale = q.weight_scale.clone()
    q = q.to(torch.bfloat16)
    assert q.bias.dtype == torch.bfloat16 and q.weight.dtype == torch.int8
    assert q.weight_scale.dtype == torch.float32 and torch.equal(q.weight_scale, scale)
    assert q.smooth_scale.dtype == torch.float32
    x = torch.randn(4, 32, device=DEVICE, dtype=torch.bfloat16)
    with torch.no_grad():
        assert q(x).dtype == torch.bfloat16 and sqnr_db(q(x), lin(x.float())) > 25
    q.half()
    assert q.weight_scale.dtype == torch.float32 and q.bias.dtype == torch.float16


@pytest.mark.parametrize("shape", [(7,), (2, 7), (2, 3, 7), (1, 2, 3, 7), (0, 7)])
@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
def test_any_leading_shape(shape, mode):
    lin = _linear(7, 5)
    q = Int8Linear.from_linear(lin, mode=mode)
    x = torch.randn(shape, device=DEVICE)
    out = q(x)
    assert out.shape == (*shape[:-1], 5)
    if x.numel():
        with torch.no_grad():
            assert sqnr_db(out, lin(x)) > 25


@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
def test_last_backend_and_repr(mode):
    q = Int8Linear.from_linear(_linear(16, 8), mode=mode)
    assert q.last_backend is None
    q(torch.randn(2, 16, device=DEVICE))
    if DEVICE.type == "cpu":  # the C++ kernels where they exist (w8a8), else PyTorch
        op = "int8_dynamic_linear" if mode == "w8a8" else "int8_weight_only_linear"
        assert q.last_backend == ("cpu" if "cpu" in available_backends(op) else "torch")
    assert q.last_backend in fastllm.backend.BACKENDS
    if "triton" in available_backends("int8_dynamic_linear"):
        with fastllm.use_backend("triton"):
            q(torch.randn(2, 16, device=DEVICE))
        assert q.last_backend == "triton"
    r = repr(q)
    assert f"mode={mode}" in r and "int8(8, 16)" in r and "in_features=16" in r


def test_errors():
    lin = _linear(16, 8)
    with pytest.raises(ValueError, match=r"mode is 'int4'; expected one of \('w8a8', 'w8a16'\)"):
        Int8Linear.from_linear(lin, mode="int4")
    with pytest.raises(TypeError, match="linear must be an nn.Linear, got Conv1d"):
        Int8Linear.from_linear(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match=r"smooth_scale has shape \(15,\); expected \(16,\)"):
        Int8Linear.from_linear(lin, smooth_scale=torch.ones(15))
    with pytest.raises(ValueError, match="smooth_scale must be finite and > 0"):
        Int8Linear.from_linear(lin, smooth_scale=torch.zeros(16))
    with pytest.raises(TypeError, match="smooth_scale has dtype torch.int64"):
        Int8Linear.from_linear(lin, smooth_scale=torch.ones(16, dtype=torch.long))
    q = Int8Linear.from_linear(lin)
    with pytest.raises(ValueError, match=r"in_features=16\) got input of shape \(3, 15\)"):
        q(torch.randn(3, 15, device=DEVICE))
    with pytest.raises(TypeError, match="x has dtype torch.int64"):
        q(torch.ones(3, 16, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="mode is 'w4a4'"):
        q.load_state_dict({**q.state_dict(), "_extra_state": {"mode": "w4a4"}})


@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
def test_compile_fullgraph_mlp(mode):
    mlp = nn.Sequential(_linear(64, 128), nn.GELU(), _linear(128, 32)).eval()
    s = torch.rand(64, device=DEVICE) + 0.5
    mlp[0] = Int8Linear.from_linear(mlp[0], mode=mode, smooth_scale=s)
    mlp[2] = Int8Linear.from_linear(mlp[2], mode=mode)
    x = torch.randn(3, 5, 64, device=DEVICE)
    eager = mlp(x)
    compiled = torch.compile(mlp, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), eager)
    if not INTERPRETED and DEVICE.type == "cuda":
        inductor = torch.compile(mlp, fullgraph=True)
        torch.testing.assert_close(inductor(x), eager, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("mode, min_db", [("w8a8", 30.0), ("w8a16", 40.0)])
@pytest.mark.parametrize("M", [1, 16, 1000])
def test_gpu_sqnr_real_size(mode, min_db, M):
    lin = nn.Linear(4096, 4096, device="cuda", dtype=torch.bfloat16)
    q = Int8Linear.from_linear(lin, mode=mode)
    x = torch.randn(M, 4096, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ref = lin.float()(x.float())
    assert sqnr_db(q(x), ref) >= min_db
    assert q.last_backend in ("cuda", "triton")


def test_w8a8_refuses_k_past_int32_accumulator():
    # K * 127**2 must fit the int32 accumulator: refused when built, before any allocation
    with pytest.raises(ValueError, match=r"K = 133145 .*expected K <= 133144"):
        Int8Linear(133_145, 1, mode="w8a8", device="meta")
    Int8Linear(133_144, 1, mode="w8a8", device="meta")
    Int8Linear(133_145, 1, mode="w8a16", device="meta")  # float accumulation: no limit
