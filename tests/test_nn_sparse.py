"""fastllm.nn.Sparse24Linear and BlockSparseLinear: drop-ins for nn.Linear."""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, available_backends, rel_err
from torch import nn

import fastllm
from fastllm.nn import BlockSparseLinear, Sparse24Linear
from fastllm.sparse import calibrate, prune


def _linear(K, N, bias=True, dtype=torch.float32):
    return nn.Linear(K, N, bias=bias, device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse24_from_linear_matches_pruned_linear(bias, dtype):
    lin = _linear(200, 40, bias, dtype)
    layer = Sparse24Linear.from_linear(lin)
    mask = prune(lin.weight)
    x = torch.randn(2, 3, 200, device=DEVICE).to(dtype)
    y = layer(x)
    expect = F.linear(
        x.double(),
        torch.where(mask, lin.weight, 0).double(),
        None if lin.bias is None else lin.bias.double(),
    )
    assert y.shape == (2, 3, 40) and y.dtype == dtype
    assert rel_err(y, expect) <= (1e-5 if dtype == torch.float32 else 1e-2)
    assert layer.last_backend == fastllm.last_backend("sparse24_linear")
    assert layer.last_backend in available_backends("sparse24_linear")


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_block_from_linear_matches_pruned_linear(density):
    lin = _linear(128, 96)
    layer = BlockSparseLinear.from_linear(lin, block_size=(16, 32), density=density)
    mask = prune(lin.weight, "block", block_size=(16, 32), density=density)
    x = torch.randn(5, 128, device=DEVICE)
    expect = F.linear(x.double(), torch.where(mask, lin.weight, 0).double(), lin.bias.double())
    assert rel_err(layer(x), expect) <= 1e-5
    assert layer.density == max(1, round(density * 24)) / 24
    assert layer.last_backend == fastllm.last_backend("block_sparse_linear")


@pytest.mark.parametrize("name", available_backends("sparse24_linear"))
def test_forced_backends_recorded(name):
    layer24 = Sparse24Linear.from_linear(_linear(64, 32))
    block = BlockSparseLinear.from_linear(_linear(64, 32), block_size=(16, 16))
    x = torch.randn(3, 64, device=DEVICE)
    with fastllm.use_backend(name):
        layer24(x)
        block(x)
    assert layer24.last_backend == name and block.last_backend == name


def test_wanda_from_calibration():
    model = nn.Sequential(_linear(64, 32), nn.ReLU(), _linear(32, 16))
    # activation scales that differ inside each group of 4 (where 2:4 chooses)
    scales = torch.tensor([0.05, 5.0, 0.5, 2.0], device=DEVICE).repeat(16)
    batches = [torch.randn(64, 64, device=DEVICE) * scales]
    norms = calibrate(model, batches)
    wanda = Sparse24Linear.from_linear(model[0], "wanda", norms["0"])
    magnitude = Sparse24Linear.from_linear(model[0])
    assert not torch.equal(wanda.metadata, magnitude.metadata)
    # on the calibration data, Wanda's pruned layer is the closer one
    x = batches[0]
    dense = model[0](x)
    assert rel_err(wanda(x), dense) < rel_err(magnitude(x), dense)
    block = BlockSparseLinear.from_linear(model[0], (16, 16), 0.5, "wanda", norms["0"])
    assert block.density == 0.5


def test_state_dict_round_trip_exact():
    lin = _linear(96, 64)
    for make, fresh in (
        (lambda: Sparse24Linear.from_linear(lin), lambda: Sparse24Linear(96, 64, device=DEVICE)),
        (
            lambda: BlockSparseLinear.from_linear(lin, (16, 32), 0.3),
            lambda: BlockSparseLinear(96, 64, block_size=(16, 32), device=DEVICE),
        ),
    ):
        layer = make()
        sd = layer.state_dict()
        assert not list(layer.parameters())  # buffers only, no dense weight
        assert "weight" not in sd
        other = fresh()
        other.load_state_dict(sd)
        sd2 = other.state_dict()
        assert list(sd) == list(sd2)
        for k in sd:
            assert sd[k].dtype == sd2[k].dtype and torch.equal(sd[k], sd2[k]), k
        x = torch.randn(4, 96, device=DEVICE)
        assert torch.equal(layer(x), other(x))


def test_stored_bytes():
    layer = Sparse24Linear.from_linear(_linear(4096, 64, bias=False, dtype=torch.bfloat16))
    stored = sum(t.numel() * t.element_size() for t in layer.state_dict().values())
    assert stored == 64 * 4096 * 2 * 0.5625  # half the values + 2 bits per kept value


def test_extra_repr():
    r = repr(Sparse24Linear.from_linear(_linear(64, 32)))
    assert "pattern=2:4" in r and "density=0.5" in r
    r = repr(BlockSparseLinear.from_linear(_linear(64, 32), (16, 16), density=0.25))
    assert "pattern=block 16x16" in r and "density=0.25" in r


def test_int8_combination():
    lin = _linear(256, 48)
    layer = Sparse24Linear.from_linear(lin, int8=True)
    assert layer.values.dtype == torch.int8 and layer.weight_scale.shape == (48,)
    assert "int8=True" in repr(layer)
    x = torch.randn(3, 7, 256, device=DEVICE)
    y = layer(x)
    # against the float 2:4 layer: int8 error only (SQNR > 30 dB)
    y_float = Sparse24Linear.from_linear(lin)(x)
    sqnr = 20 * torch.log10(y_float.norm() / (y - y_float).norm())
    assert sqnr > 30, sqnr
    # exactly the documented composition
    xq, xs = fastllm.ops.quantize_per_token(x)
    acc = fastllm.reference.sparse24_linear(xq, layer.values, layer.metadata)
    expect = (acc.float() * xs[..., None] * layer.weight_scale + lin.bias).to(x.dtype)
    torch.testing.assert_close(y, expect, rtol=1e-6, atol=1e-6)
    other = Sparse24Linear(256, 48, int8=True, device=DEVICE)
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other(x), y)


def test_compile_fullgraph():
    model = nn.Sequential(
        Sparse24Linear.from_linear(_linear(64, 32)),
        nn.ReLU(),
        BlockSparseLinear.from_linear(_linear(32, 32), (16, 16), 0.5),
        nn.ReLU(),
        Sparse24Linear.from_linear(_linear(32, 8), int8=True),
    )
    x = torch.randn(2, 5, 64, device=DEVICE)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), model(x))


def test_bad_input():
    with pytest.raises(TypeError, match="linear must be an nn.Linear, got Conv1d"):
        Sparse24Linear.from_linear(nn.Conv1d(4, 4, 1))
    with pytest.raises(ValueError, match="K = 30 .*multiple of 4"):
        Sparse24Linear.from_linear(_linear(30, 8))
    with pytest.raises(ValueError, match="in_features = 30"):
        Sparse24Linear(30, 8)
    with pytest.raises(ValueError, match=r"\(40, 64\) is not divisible by block_size \(16, 16\)"):
        BlockSparseLinear.from_linear(_linear(64, 40), (16, 16))
    with pytest.raises(ValueError, match="density must be a number in \\(0, 1\\], got 0"):
        BlockSparseLinear.from_linear(_linear(64, 32), (16, 16), density=0)
    with pytest.raises(ValueError, match="method must be one of"):
        BlockSparseLinear.from_linear(_linear(64, 32), (16, 16), method="random")
    with pytest.raises(ValueError, match=r"act_norm has shape \(32,\); expected \(64,\)"):
        Sparse24Linear.from_linear(_linear(64, 32), "wanda", torch.ones(32))
    layer = Sparse24Linear.from_linear(_linear(64, 32))
    with pytest.raises(ValueError, match="x has 63 features"):
        layer(torch.randn(2, 63, device=DEVICE))
    block = BlockSparseLinear.from_linear(_linear(64, 32), (16, 16))
    sd = block.state_dict()
    sd["col_indices"] = sd["col_indices"] + 10
    with pytest.raises(ValueError, match="col_indices must lie in"):
        BlockSparseLinear(64, 32, block_size=(16, 16)).load_state_dict(sd)


def test_int8_refuses_k_past_int32_accumulator():
    # a 2:4 row sums in_features/2 int8 products: in_features <= 2 * 133,144
    with pytest.raises(ValueError, match=r"K = 266292 .*expected K <= 266288"):
        Sparse24Linear(266_292, 1, int8=True, device="meta")
    Sparse24Linear(266_288, 1, int8=True, device="meta")
    Sparse24Linear(266_292, 1, device="meta")  # float: no limit
