"""fastllm.sparse.prune and calibrate: mask validity, Wanda vs magnitude, bad input."""

import pytest
import torch
from torch import nn

from fastllm.calibration import collect_input_stats
from fastllm.sparse import calibrate, prune


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
@pytest.mark.parametrize("shape", [(1, 4), (7, 20), (96, 200), (33, 1028)])
def test_24_keeps_exactly_two_of_four_the_largest(method, shape):
    w = torch.randn(shape)
    norm = torch.rand(shape[1]) * 5 if method == "wanda" else None
    mask = prune(w, "2:4", method, act_norm=norm)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    groups = mask.view(shape[0], -1, 4)
    assert (groups.sum(-1) == 2).all()
    score = w.abs() * (norm if norm is not None else 1)
    score = score.view(shape[0], -1, 4)
    kept_min = torch.where(groups, score, torch.inf).amin(-1)
    dropped_max = torch.where(groups, -torch.inf, score).amax(-1)
    assert (kept_min >= dropped_max).all()


def test_24_ties_keep_lower_indices():
    mask = prune(torch.ones(2, 8))
    assert mask.tolist() == [[True, True, False, False] * 2] * 2


def test_wanda_picks_documented_weights_by_hand():
    # scores |W| * ‖X_j‖: the first two inputs carry 10x the activation norm
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0], [-4.0, 0.5, 3.0, -2.0]])
    act_norm = torch.tensor([10.0, 10.0, 1.0, 1.0])
    magnitude = prune(w, "2:4", "magnitude")
    wanda = prune(w, "2:4", "wanda", act_norm=act_norm)
    assert magnitude.tolist() == [[False, False, True, True], [True, False, True, False]]
    # row 0: 10, 20, 3, 4 -> inputs 0, 1;  row 1: 40, 5, 3, 2 -> inputs 0, 1
    assert wanda.tolist() == [[True, True, False, False], [True, True, False, False]]


def test_wanda_differs_from_magnitude_when_norms_are_uneven():
    w = torch.randn(64, 128)
    norm = torch.rand(128) ** 4 * 100  # very uneven channels
    assert not torch.equal(prune(w, method="wanda", act_norm=norm), prune(w))
    # uniform norms score as magnitude does
    assert torch.equal(prune(w, method="wanda", act_norm=torch.full((128,), 3.0)), prune(w))
    b_w = prune(w, "block", "wanda", block_size=(16, 16), density=0.5, act_norm=norm)
    assert not torch.equal(b_w, prune(w, "block", block_size=(16, 16), density=0.5))


@pytest.mark.parametrize("density", [0.1, 0.25, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("shape, block", [((128, 192), (32, 64)), ((96, 160), (16, 32))])
def test_block_density_exact_and_tiles_constant(density, shape, block):
    w = torch.randn(shape)
    mask = prune(w, "block", block_size=block, density=density)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    bn, bk = block
    tiles = mask.view(shape[0] // bn, bn, shape[1] // bk, bk)
    assert torch.equal(tiles.any(dim=(1, 3)), tiles.all(dim=(1, 3)))
    n_tiles = tiles.shape[0] * tiles.shape[2]
    kept = int(tiles.any(dim=(1, 3)).sum())
    assert kept == max(1, round(density * n_tiles))
    # the kept tiles are the ones with the largest |W| sums
    score = w.abs().view(shape[0] // bn, bn, shape[1] // bk, bk).sum(dim=(1, 3))
    keep = tiles.any(dim=(1, 3))
    if 0 < kept < n_tiles:
        assert score[keep].min() >= score[~keep].max()


def test_block_keeps_the_documented_tiles_by_hand():
    w = torch.zeros(4, 4)
    w[0:2, 2:4] = 5.0  # tile (0, 1)
    w[2:4, 0:2] = 1.0  # tile (1, 0)
    w[0:2, 0:2] = 2.0  # tile (0, 0)
    mask = prune(w, "block", block_size=(2, 2), density=0.5)
    expect = torch.zeros(4, 4, dtype=torch.bool)
    expect[0:2, :] = True
    assert torch.equal(mask, expect)
    # a heavy input channel moves the choice under Wanda
    mask = prune(
        w,
        "block",
        "wanda",
        block_size=(2, 2),
        density=0.25,
        act_norm=torch.tensor([100.0, 100.0, 1.0, 1.0]),
    )
    assert mask[0:2, 0:2].all() and mask.sum() == 4


def test_calibrate_uses_the_shared_hooks():
    model = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 4))
    batches = [torch.randn(5, 8), torch.randn(2, 3, 8)]
    norms = calibrate(model, batches)
    stats = collect_input_stats(model, batches)
    assert set(norms) == {"0", "2"}
    for name in norms:
        torch.testing.assert_close(norms[name], stats[name].norm)
    x = torch.cat([b.reshape(-1, 8) for b in batches])
    torch.testing.assert_close(norms["0"], x.norm(dim=0))
    # usable as Wanda's act_norm
    mask = prune(model[0].weight, method="wanda", act_norm=norms["0"])
    assert (mask.view(12, 2, 4).sum(-1) == 2).all()


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(pattern="3:4"), ["pattern", "'3:4'", "2:4", "block"]),
        (dict(method="l1"), ["method", "'l1'", "magnitude", "wanda"]),
        (dict(method="wanda"), ["wanda", "act_norm"]),
        (dict(method="wanda", act_norm=torch.ones(7)), ["act_norm", "(7,)", "(16,)"]),
        (dict(method="wanda", act_norm=torch.ones(2, 8)), ["act_norm", "(2, 8)", "(16,)"]),
        (dict(act_norm=torch.ones(16)), ["act_norm", "wanda"]),
        (dict(pattern="block", block_size=(16, 16), density=0), ["density", "(0, 1]", "0"]),
        (dict(pattern="block", block_size=(16, 16), density=1.5), ["density", "1.5"]),
        (dict(pattern="block", block_size=(16, 16), density=-0.1), ["density", "-0.1"]),
        (dict(pattern="block", block_size=(16, 5)), ["(32, 16)", "block_size (16, 5)", "divides"]),
        (dict(pattern="block", block_size=(0, 4)), ["block_size", "(0, 4)"]),
    ],
)
def test_bad_input(kwargs, words):
    w = torch.randn(32, 16)
    with pytest.raises(ValueError) as info:
        prune(w, **kwargs)
    for word in words:
        assert word in str(info.value)


def test_bad_shapes():
    with pytest.raises(ValueError, match="K = 6.*multiple of 4"):
        prune(torch.randn(3, 6))
    with pytest.raises(ValueError, match="2-D"):
        prune(torch.randn(8))
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        prune([[1.0, 2.0, 3.0, 4.0]])
