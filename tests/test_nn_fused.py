"""The fused modules (fastllm/nn/fused.py) and `optimize(fuse=True)` on modules of
PyTorch alone: patterns that must not match, torch.compile, the RMSNorm fallback, and on a
GPU the fused blocks at real sizes on the triton backend. Models of transformers:
tests/test_fusion.py."""

import copy

import pytest
import torch
from conftest import DEVICE, rel_err
from torch import nn

import fastllm
from fastllm.nn.fused import FusedGatedMLP, FusedMLP, FusedRMSNorm


def _entries(model, kind):
    return {e.name: e for e in fastllm.report(model).layers if e.kind == kind}


class LlamaRMSNorm(nn.Module):  # transformers' formula
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(x.dtype)


class GatedMLP(nn.Module):  # transformers' LlamaMLP
    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MLP(nn.Module):  # GPT-2 / ViT type
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        return self.drop(self.fc2(self.act(self.fc1(x))))


class Block(nn.Module):  # norm, gated MLP, norm, MLP: no attention
    def __init__(self, dim=32, hidden=48):
        super().__init__()
        self.norm = LlamaRMSNorm(dim)
        self.mlp = GatedMLP(dim, hidden)
        self.ln = nn.LayerNorm(dim)
        self.ffn = MLP(dim, hidden)

    def forward(self, x):
        h = self.ln(x + self.mlp(self.norm(x)))
        return h + self.ffn(h)


# --- what must not match --------------------------------------------------------------------


class ActFirst(nn.Module):  # dense(act(x)): the children of FusedDenseAct, wired otherwise
    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(16, 24)
        self.act = nn.GELU()

    def forward(self, x):
        return self.dense(self.act(x))


class TanhBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(16, 24)
        self.act = nn.Tanh()

    def forward(self, x):
        return self.act(self.dense(x))


class GeluBlock(TanhBlock):
    def __init__(self, approximate="none"):
        super().__init__()
        self.act = nn.GELU(approximate=approximate)


class GemmaRMSNorm(nn.Module):  # y * (1 + w): an RMSNorm by name and layout, not by formula
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim) * 0.1)
        self.eps = 1e-6

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = ActFirst()
        self.b = TanhBlock()
        self.c = GeluBlock()
        self.d = GeluBlock("tanh")
        self.norm = GemmaRMSNorm(24)
        self.proj = nn.Linear(24, 16)

    def forward(self, x):
        y = self.a(x) + self.b(x) + self.c(x) + self.d(x)
        return self.proj(self.norm(y))


def test_patterns_that_do_not_match_stay_with_the_reason():
    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(4, 7, 16)
    plain = fastllm.optimize(copy.deepcopy(net), linear="w8a8")
    fused = fastllm.optimize(copy.deepcopy(net), linear="w8a8", fuse=True)
    entries = {**_entries(fused, "fused"), **_entries(fused, "norm")}
    assert entries["a"].action == "skipped" and "output differs" in entries["a"].reason
    assert entries["b"].action == "skipped" and "Tanh" in entries["b"].reason
    assert entries["c"].action == "swapped" and fused.c.activation == "gelu"
    assert entries["d"].action == "swapped" and fused.d.activation == "gelu_tanh"
    assert entries["norm"].action == "skipped" and "output differs" in entries["norm"].reason
    assert type(fused.a) is ActFirst and type(fused.norm) is GemmaRMSNorm
    with torch.no_grad():
        assert rel_err(fused(x), plain(x)) <= 1e-5


def test_bad_fuse_argument():
    with pytest.raises(ValueError, match="fuse must be True or False, got 1"):
        fastllm.optimize(nn.Linear(4, 4), fuse=1)


# --- torch.compile --------------------------------------------------------------------------


def test_compile_fullgraph():
    torch.manual_seed(0)
    block = Block().eval()
    x = torch.randn(2, 5, 32)
    fastllm.optimize(block, linear="w8a8", calibration=[x], fuse=True)
    assert type(block.mlp) is FusedGatedMLP and type(block.norm) is FusedRMSNorm
    assert type(block.ffn) is FusedMLP and block.ffn.activation == "gelu_tanh"
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), block(x), rtol=0, atol=0)


def test_fused_rms_norm_falls_back_for_other_dtypes():
    x = torch.randn(3, 16, dtype=torch.bfloat16)  # a float32 weight: computed in PyTorch
    rms = FusedRMSNorm(nn.Parameter(torch.rand(16)), 1e-6)
    want = LlamaRMSNorm(16, 1e-6)
    want.weight = rms.weight
    torch.testing.assert_close(rms(x), want(x))
    with pytest.raises(ValueError, match="LlamaRMSNorm layout"):
        FusedRMSNorm.from_module(nn.LayerNorm(16))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim, hidden", [(4096, 14336), (1000, 2736)])
@pytest.mark.parametrize("tokens", [1, 5, 300])
def test_gpu_fused_blocks_on_triton(dtype, dim, hidden, tokens):
    """The fused blocks on CUDA (the triton backend) against the unfused optimized block at
    Llama-8B sizes and odd ones, decode and prefill row counts."""
    torch.manual_seed(0)
    base = Block(dim, hidden).eval().to(DEVICE, dtype)
    x = torch.randn(2, tokens, dim, device=DEVICE, dtype=dtype)
    plain = fastllm.optimize(copy.deepcopy(base), linear="w8a8", calibration=[x])
    fused = fastllm.optimize(copy.deepcopy(base), linear="w8a8", calibration=[x], fuse=True)
    assert type(fused.mlp) is FusedGatedMLP and type(fused.ffn) is FusedMLP
    with torch.no_grad(), fastllm.use_backend("triton"):
        want, got = plain(x), fused(x)
        assert fused.mlp.last_backend == "triton" and fused.norm.last_backend == "triton"
    assert rel_err(got, want) <= 2e-2
