"""fastllm.quant: SmoothQuant calibration, smoothing (folded into norms or kept for run
time) and quantization of a small transformer-like model."""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, rel_err
from torch import nn

from fastllm import quant
from fastllm.calibration import collect_input_stats
from fastllm.nn import Int8Linear


def sqnr_db(out, ref):
    out, ref = out.double(), ref.double()
    return 10 * torch.log10(ref.square().sum() / (out - ref).square().sum()).item()


class RMSNormLike(nn.Module):
    """What LLaMA-style code defines itself (not torch.nn.RMSNorm)."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(
            x.dtype
        ) * self.weight


class OnePlusRMSNorm(RMSNormLike):
    """Gemma-style: scales by (1 + weight), so dividing weight by s is not a fold."""

    def forward(self, x):
        x32 = x.float()
        return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)


class Block(nn.Module):
    def __init__(self, d, norm2_cls=RMSNormLike):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        self.norm2 = norm2_cls(d)
        self.gate, self.up = nn.Linear(d, 2 * d, bias=False), nn.Linear(d, 2 * d, bias=False)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x):  # x: [B, S, d]
        h = self.ln1(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        att = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        x = x + self.o(att @ v)
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class TinyModel(nn.Module):
    def __init__(self, d=64, norm2_cls=RMSNormLike):
        super().__init__()
        self.blocks = nn.ModuleList([Block(d, norm2_cls), Block(d, norm2_cls)])
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, 40)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        h = self.ln_f(x)
        return self.head(h) + h[..., :40]  # ln_f also feeds an add: not foldable


def _model(norm2_cls=RMSNormLike, seed=0):
    torch.manual_seed(seed)
    m = TinyModel(norm2_cls=norm2_cls).to(DEVICE)
    with torch.no_grad():  # norm weights with outlier channels, as in trained LLMs
        for norm in (m.blocks[0].ln1, m.blocks[1].ln1, m.blocks[0].norm2, m.blocks[1].norm2):
            norm.weight.uniform_(0.5, 1.5)
            norm.weight[[3, 17, 40]] *= 40
        m.blocks[0].ln1.bias.normal_()
    return m.eval()


# smoothing alone changes the float model only by float32 rounding (weights times s,
# norm weights over s), which two blocks with 40x outlier channels amplify a little
FOLD_TOL = 5e-5


def _batches(n=4):
    return [torch.randn(2, 9, 64, device=DEVICE) for _ in range(n)]


def test_calibrate_is_collect_input_stats_amax():
    m = _model()
    batches = _batches()
    amax = quant.calibrate(m, batches)
    stats = collect_input_stats(m, batches)
    assert set(amax) == set(stats) and len(amax) == 2 * 7 + 1
    for name in amax:
        assert torch.equal(amax[name], stats[name].amax)


def test_smoothing_keeps_float_output_and_folds_where_it_can():
    m = _model()
    x = torch.randn(3, 11, 64, device=DEVICE)
    with torch.no_grad():
        before = m(x)
    ln1_weight = m.blocks[0].ln1.weight.detach().clone()
    result = quant.smooth(m, quant.calibrate(m, _batches()), alpha=0.5)
    with torch.no_grad():
        after = m(x)
    assert rel_err(after, before) <= FOLD_TOL
    # q, k, v fold into ln1 (a LayerNorm, with bias); gate, up into the RMSNorm look-alike
    for i in (0, 1):
        for n in ("q", "k", "v"):
            assert result.folded[f"blocks.{i}.{n}"] == f"blocks.{i}.ln1"
        for n in ("gate", "up"):
            assert result.folded[f"blocks.{i}.{n}"] == f"blocks.{i}.norm2"
        assert torch.equal(result.scales[f"blocks.{i}.q"], result.scales[f"blocks.{i}.v"])
        for n in ("o", "down"):
            assert "does not come straight from a norm" in result.skipped[f"blocks.{i}.{n}"]
    assert "also feeds something other than a linear" in result.skipped["head"]
    assert not result.runtime
    # folded layers get no run-time scale: their weights already hold s
    assert result.get("blocks.0.q") is None and result.runtime_scale("blocks.0.q") is None
    # the fold really happened: the outlier channels of ln1 shrank
    s = result.scales["blocks.0.q"].to(DEVICE)
    torch.testing.assert_close(m.blocks[0].ln1.weight.detach(), ln1_weight / s)
    assert s[[3, 17, 40]].min() > 2 * s.median()
    assert "folded" in str(result) and "blocks.0.down" in str(result)


def test_smoothing_improves_sqnr_with_outlier_channels():
    d = 256
    torch.manual_seed(1)
    model = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 192)).to(DEVICE).eval()
    with torch.no_grad():
        model[0].weight.uniform_(0.5, 1.5)
        model[0].weight[torch.arange(0, d, 37)] *= 60  # outlier input channels
    batches = [torch.randn(16, d, device=DEVICE) for _ in range(4)]
    x = torch.randn(64, d, device=DEVICE)
    with torch.no_grad():
        ref = model(x)
    plain = Int8Linear.from_linear(model[1], mode="w8a8")
    with torch.no_grad():
        sqnr_plain = sqnr_db(plain(model[0](x)), ref)
    result = quant.smooth(model, quant.calibrate(model, batches), alpha=0.5)
    assert result.folded == {"1": "0"}
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)
    quant.quantize(model, "w8a8")
    assert isinstance(model[1], Int8Linear)
    with torch.no_grad():
        sqnr_smooth = sqnr_db(model(x), ref)
    assert sqnr_smooth >= sqnr_plain + 6, (sqnr_plain, sqnr_smooth)
    assert sqnr_smooth >= 30


def test_runtime_smoothing_for_unfoldable_layers():
    m = _model()
    x = torch.randn(3, 11, 64, device=DEVICE)
    with torch.no_grad():
        ref = m(x)
    result = quant.smooth(m, quant.calibrate(m, _batches()), unfoldable="runtime")
    assert set(result.runtime) == {"blocks.0.o", "blocks.0.down", "blocks.1.o"} | {
        "blocks.1.down",
        "head",
    }
    assert not result.skipped
    with torch.no_grad():
        assert rel_err(m(x), ref) <= 1e-5  # run-time scales leave the float model alone
    replaced = quant.quantize(m, "w8a8", smoothing=result)
    assert len(replaced) == 15
    assert m.blocks[0].o.smooth_scale is not None and m.blocks[0].q.smooth_scale is None
    torch.testing.assert_close(m.head.smooth_scale, result.scales["head"].to(DEVICE))
    assert result.get("head") is result.scales["head"]
    with torch.no_grad():
        assert sqnr_db(m(x), ref) >= 25


def test_norm_that_is_not_a_fold_is_left_alone():
    m = _model(norm2_cls=OnePlusRMSNorm)
    x = torch.randn(2, 5, 64, device=DEVICE)
    with torch.no_grad():
        before = m(x)
    w_before = m.blocks[0].norm2.weight.detach().clone()
    result = quant.smooth(m, quant.calibrate(m, _batches()))
    assert "does not scale its output by 1/s" in result.skipped["blocks.0.up"]
    assert torch.equal(m.blocks[0].norm2.weight, w_before)  # restored
    assert result.folded["blocks.0.q"] == "blocks.0.ln1"
    with torch.no_grad():
        assert rel_err(m(x), before) <= FOLD_TOL


def test_untraceable_model_is_not_folded():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln, self.fc = nn.LayerNorm(32), nn.Linear(32, 16)

        def forward(self, x):
            if x.sum() > 1e9:  # data-dependent control flow: torch.fx cannot trace it
                x = x * 2
            return self.fc(self.ln(x))

    m = Branchy().to(DEVICE)
    x = torch.randn(4, 32, device=DEVICE)
    before = m(x).detach()
    result = quant.smooth(m, quant.calibrate(m, [x]), unfoldable="runtime")
    assert "torch.fx could not trace" in result.runtime["fc"]
    assert "pass example=" in result.runtime["fc"]
    assert rel_err(m(x).detach(), before) <= 1e-6


class BranchyTiny(TinyModel):
    def forward(self, x):
        if x.abs().sum() >= 0:  # always true, but torch.fx cannot trace it
            return super().forward(x)
        return x


def test_untraceable_model_folds_from_an_example_pass():
    traced, branchy = _model(), _model()
    branchy.__class__ = BranchyTiny
    batches = _batches()
    x = torch.randn(3, 11, 64, device=DEVICE)
    with torch.no_grad():
        before = branchy(x)
    by_fx = quant.smooth(traced, quant.calibrate(traced, batches))
    by_run = quant.smooth(branchy, quant.calibrate(branchy, batches), example=batches[0])
    assert by_run.folded == by_fx.folded and len(by_run.folded) == 10
    assert set(by_run.skipped) == set(by_fx.skipped)
    assert "also feeds something other than a linear" in by_run.skipped["head"]
    for name in by_fx.scales:
        torch.testing.assert_close(by_run.scales[name], by_fx.scales[name])
    with torch.no_grad():
        assert rel_err(branchy(x), before) <= FOLD_TOL


def test_bad_arguments():
    m = _model()
    amax = quant.calibrate(m, _batches(1))
    with pytest.raises(ValueError, match=r"alpha is 1.5; expected a number in \[0, 1\]"):
        quant.smooth(m, amax, alpha=1.5)
    with pytest.raises(ValueError, match="unfoldable is 'fold'"):
        quant.smooth(m, amax, unfoldable="fold")
    with pytest.raises(ValueError, match="'blocks.0.nope', which is not an nn.Linear"):
        quant.smooth(m, {"blocks.0.nope": torch.ones(64)})
    with pytest.raises(ValueError, match=r"stats\['head'\] has shape \(63,\); expected \(64,\)"):
        quant.smooth(m, {"head": torch.ones(63)})
    with pytest.raises(TypeError, match="stats must be a dict"):
        quant.smooth(m, [torch.ones(64)])
