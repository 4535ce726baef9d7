"""Per-input-channel statistics of the inputs of every nn.Linear, collected with
forward hooks on calibration batches (no model-specific code).

One mechanism for everything that calibrates: SmoothQuant uses `amax`
(fastllm.quant), Wanda uses `norm` (fastllm.sparse).

Under tensor parallelism the statistics are those of the whole layer, on every rank: a
column-wise shard sees the whole (replicated) input; a row-wise shard sees only its
slice of the input features, and the slices of all ranks are joined at the end (one
collective per row-wise layer, fastllm.distributed.gather_input_stat).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from fastllm import distributed


@dataclass
class InputStats:
    """Statistics over every row seen by one linear layer, per input channel (float32, CPU)."""

    amax: torch.Tensor  # [in_features] max |x_j|
    sq_sum: torch.Tensor  # [in_features] sum of x_j^2
    rows: int  # rows (tokens) seen

    @property
    def norm(self) -> torch.Tensor:
        """‖X_j‖₂ over all rows seen: the activation norm Wanda uses."""
        return self.sq_sum.sqrt()


def _run_batch(model: nn.Module, batch) -> None:
    if isinstance(batch, Mapping):  # a dict, or a tokenizer's BatchEncoding (not a dict)
        model(**batch)
    elif isinstance(batch, list | tuple):
        model(*batch)
    else:
        model(batch)


@torch.no_grad()
def collect_input_stats(
    model: nn.Module,
    batches: Iterable,
    *,
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
) -> dict[str, InputStats]:
    """Runs `model` on each batch and returns {qualified name: InputStats} for every
    nn.Linear (or only those where filter_fn(name, module) is true).

    A batch is passed as model(**batch) for a mapping (a dict, a tokenizer's
    BatchEncoding), model(*batch) for a tuple or list, and model(batch) otherwise.
    Hooks are removed even if a batch fails.
    """
    stats: dict[str, InputStats] = {}
    handles = []

    def hook(name):
        def record(module, args):
            x = distributed.local(args[0].detach())  # a shard's slice under torch's TP hooks
            x = x.reshape(-1, x.shape[-1]).float()
            amax = x.abs().amax(dim=0).cpu()
            sq = x.square().sum(dim=0).cpu()
            if name in stats:
                s = stats[name]
                torch.maximum(s.amax, amax, out=s.amax)
                s.sq_sum += sq
                s.rows += x.shape[0]
            else:
                stats[name] = InputStats(amax, sq, x.shape[0])

        return record

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and (filter_fn is None or filter_fn(name, module)):
            handles.append(module.register_forward_pre_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            _run_batch(model, batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    modules = dict(model.named_modules())
    for name, s in stats.items():  # the same order on every rank
        m = modules[name]
        s.amax = distributed.gather_input_stat(m, s.amax, f"input statistics of {name!r}")
        s.sq_sum = distributed.gather_input_stat(m, s.sq_sum, f"input statistics of {name!r}")
    return stats
