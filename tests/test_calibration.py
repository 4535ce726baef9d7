"""fastllm.calibration: hooks collect per-channel input statistics of every Linear."""

import torch
from torch import nn

from fastllm.calibration import collect_input_stats


def test_stats_match_direct_computation():
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    batches = [torch.randn(4, 7, 6), torch.randn(2, 6)]
    stats = collect_input_stats(model, batches)
    assert set(stats) == {"0", "2"}
    x = torch.cat([b.reshape(-1, 6) for b in batches])
    torch.testing.assert_close(stats["0"].amax, x.abs().amax(0))
    torch.testing.assert_close(stats["0"].norm, x.norm(dim=0))
    assert stats["0"].rows == 30
    h = torch.relu(model[0](x))
    torch.testing.assert_close(stats["2"].amax, h.abs().amax(0))
    # hooks are gone afterwards
    assert not model[0]._forward_pre_hooks and not model[2]._forward_pre_hooks


def test_filter_and_batch_forms():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x, scale=1.0):
            return self.b(self.a(x) * scale)

    net = Net()
    stats = collect_input_stats(
        net,
        [torch.randn(3, 4), (torch.randn(3, 4), 2.0), {"x": torch.randn(3, 4)}],
        filter_fn=lambda name, m: name == "b",
    )
    assert list(stats) == ["b"] and stats["b"].rows == 9
