"""fastllm.nn.FusedMultiheadAttention against torch.nn.MultiheadAttention."""

import pytest
import torch
from conftest import DEVICE, available_backends, rel_err
from torch import nn

import fastllm
from fastllm.nn import FusedMultiheadAttention


def _pair(batch_first, embed=48, heads=4, **kw):
    mha = nn.MultiheadAttention(embed, heads, batch_first=batch_first, **kw).to(DEVICE).eval()
    return mha, FusedMultiheadAttention.from_module(mha)


def _x(batch_first, n=3, length=7, embed=48):
    shape = (n, length, embed) if batch_first else (length, n, embed)
    return torch.randn(shape, device=DEVICE)


def _causal(length):
    return nn.Transformer.generate_square_subsequent_mask(length, device=DEVICE)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("masks", ["none", "causal", "padding", "float", "bool", "causal+padding"])
def test_matches_multihead_attention(batch_first, masks):
    mha, fused = _pair(batch_first)
    x = _x(batch_first)
    kpm = torch.zeros(3, 7, dtype=torch.bool, device=DEVICE)
    kpm[1, 4:] = True  # the second sequence is padded after 4 tokens
    kw = {
        "none": {},
        "causal": {"attn_mask": _causal(7), "is_causal": True},
        "padding": {"key_padding_mask": kpm},
        "float": {"attn_mask": torch.randn(7, 7, device=DEVICE)},
        "bool": {"attn_mask": torch.rand(7, 7, device=DEVICE) > 0.7},
        "causal+padding": {
            "attn_mask": _causal(7),
            "is_causal": True,
            "key_padding_mask": torch.zeros(3, 7, device=DEVICE).masked_fill(kpm, float("-inf")),
        },
    }[masks]
    if masks == "bool":
        kw["attn_mask"][:, 0] = False  # every row keeps a key
    with torch.no_grad():
        expect, _ = mha(x, x, x, need_weights=False, **kw)
        with fastllm.backend.trace() as calls:
            got, weights = fused(x, x, x, need_weights=False, **kw)
    assert weights is None
    assert rel_err(got, expect) <= 1e-5
    # only the unmasked and is_causal calls go through the fused op
    assert bool(calls) == (masks in ("none", "causal"))


def test_cross_attention_kdim_vdim_and_unbatched():
    mha = nn.MultiheadAttention(32, 2, kdim=24, vdim=40).to(DEVICE).eval()
    fused = FusedMultiheadAttention.from_module(mha)
    q, k, v = (torch.randn(5, 2, d, device=DEVICE) for d in (32, 24, 40))
    k, v = torch.randn(9, 2, 24, device=DEVICE), torch.randn(9, 2, 40, device=DEVICE)
    with torch.no_grad():
        assert (
            rel_err(fused(q, k, v, need_weights=False)[0], mha(q, k, v, need_weights=False)[0])
            < 1e-5
        )
        got, expect = (
            fused(q[:, 0], k[:, 0], v[:, 0], need_weights=False),
            mha(q[:, 0], k[:, 0], v[:, 0]),
        )
        assert got[0].shape == (5, 32) and rel_err(got[0], expect[0]) < 1e-5


def test_need_weights_is_pytorchs():
    mha, fused = _pair(True)
    x = _x(True)
    with torch.no_grad():
        (a, wa), (b, wb) = mha(x, x, x), fused(x, x, x)
    assert rel_err(b, a) < 1e-5 and rel_err(wb, wa) < 1e-5


@pytest.mark.parametrize("masks", ["none", "padding", "float"])
def test_need_weights_on_int8_projections(masks):
    # after optimize, q/k/v/out_proj are W8A8 layers whose weights are int8 buffers: the
    # weights path runs the module's own projections, as the fused path does
    mha, fused = _pair(False)
    x = _x(False)
    kpm = torch.zeros(3, 7, dtype=torch.bool, device=DEVICE)
    kpm[2, 3:] = True
    kw = {
        "none": {},
        "padding": {"key_padding_mask": kpm},
        "float": {"attn_mask": torch.randn(7, 7, device=DEVICE)},
    }[masks]
    model = nn.Sequential(fused)
    fastllm.optimize(model, linear="w8a8")
    assert type(fused.q_proj).__name__ != "Linear"
    with torch.no_grad():
        expect, expect_w = mha(x, x, x, **kw)
        out, weights = fused(x, x, x, **kw)
        per_head = fused(x, x, x, average_attn_weights=False, **kw)[1]
        fused_out, none = fused(x, x, x, need_weights=False, **kw)
    assert none is None and weights.shape == expect_w.shape and per_head.shape == (3, 4, 7, 7)
    assert rel_err(out, fused_out) < 1e-5  # the same projections, the same attention
    assert rel_err(out, expect) < 0.05 and rel_err(weights, expect_w) < 0.05  # int8 error
    assert torch.allclose(per_head.mean(dim=1), weights)


def test_need_weights_with_is_causal_alone_is_causal():
    # nn.MultiheadAttention wants attn_mask with is_causal; this module takes is_causal alone
    # as the causal mask on every path, the weights path included
    _, fused = _pair(False)
    x = _x(False)
    with torch.no_grad():
        out, weights = fused(x, x, x, is_causal=True)
        expect, _ = fused(x, x, x, need_weights=False, is_causal=True)
    assert rel_err(out, expect) < 1e-5
    keep = torch.ones(7, 7, dtype=torch.bool, device=DEVICE).tril()
    assert torch.all(weights[:, ~keep] == 0) and torch.all(weights[:, keep] > 0)


@pytest.mark.parametrize("name", [n for n in available_backends("attention") if n != "reference"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_half_on_each_backend(name, batch_first):
    mha, _ = _pair(batch_first, embed=64, heads=4)
    x = _x(batch_first, n=2, length=11, embed=64)
    with torch.no_grad():
        expect, _ = mha(x, x, x, need_weights=False, attn_mask=_causal(11), is_causal=True)
        fused = FusedMultiheadAttention.from_module(mha.half())
        with fastllm.use_backend(name):
            got, _ = fused(x.half(), x.half(), x.half(), need_weights=False, is_causal=True)
    assert fastllm.last_backend("attention") == name
    assert got.dtype == torch.float16 and rel_err(got, expect) <= 1e-2


def test_rejects_unsupported_modules():
    with pytest.raises(ValueError, match="add_bias_kv"):
        FusedMultiheadAttention.from_module(nn.MultiheadAttention(16, 2, add_bias_kv=True))
    with pytest.raises(TypeError, match="Linear"):
        FusedMultiheadAttention.from_module(nn.Linear(4, 4))


def test_compile_fullgraph():
    mha, fused = _pair(True)
    x = _x(True)
    f = lambda t: fused(t, t, t, need_weights=False, is_causal=True)[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="eager")(x), f(x))
