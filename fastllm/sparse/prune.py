"""Pruning masks: 2:4 semi-structured and block sparsity, by magnitude or Wanda.

Scores (per weight W[n, k]):

    magnitude   |W[n, k]|
    wanda       |W[n, k]| * ‖X_k‖₂     (act_norm[k]: the L2 norm of input channel k over
                                        calibration tokens, from `calibrate`)

2:4 keeps the 2 highest-scoring of every 4 consecutive weights along K (the input
dimension); ties go to the lower index. Block keeps the ``round(density * tiles)``
(at least 1) highest-scoring ``block_size`` tiles of the whole matrix, a tile
scoring the sum of its weights' scores; ties go to the earlier tile in row-major
order. Whole block-rows may end up empty.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from fastllm.calibration import collect_input_stats
from fastllm.sparse.format import _check_k, check_block_size

PATTERNS = ("2:4", "block")
METHODS = ("magnitude", "wanda")


def _scores(weight: torch.Tensor, method: str, act_norm) -> torch.Tensor:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    score = weight.detach().abs().float()
    if method == "magnitude":
        if act_norm is not None:
            raise ValueError("act_norm is only used by method='wanda'; got method='magnitude'")
        return score
    if act_norm is None:
        raise ValueError("method='wanda' needs act_norm (per-input-channel activation norms)")
    if not isinstance(act_norm, torch.Tensor):
        raise TypeError(f"act_norm must be a torch.Tensor, got {type(act_norm).__name__}")
    K = weight.shape[1]
    if act_norm.dim() != 1 or act_norm.numel() != K:
        raise ValueError(
            f"act_norm has shape {tuple(act_norm.shape)}; expected ({K},), one norm per "
            "input channel (in_features)"
        )
    return score * act_norm.detach().to(score.device, torch.float32)[None, :]


def prune(
    weight: torch.Tensor,
    pattern: str = "2:4",
    method: str = "magnitude",
    *,
    block_size=(64, 64),
    density: float = 0.5,
    act_norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """The keep-mask of ``weight`` (N, K) = (out_features, in_features): bool (N, K).

    pattern: "2:4" (exactly 2 of every 4 consecutive weights along K kept; ``density``
        and ``block_size`` are ignored) or "block" (``density`` of the ``block_size``
        tiles kept, the mask constant on each tile).
    method: "magnitude" or "wanda" (needs ``act_norm``, float (K,)).

    Raises ValueError for an unknown pattern or method, K not a multiple of 4 (2:4),
    sizes not divisible by block_size (block), density outside (0, 1], act_norm of the
    wrong length or missing for wanda.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(
            f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}"
        )
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    N, K = weight.shape
    if pattern == "2:4":
        _check_k("weight", K)
        score = _scores(weight, method, act_norm).reshape(N, K // 4, 4)
        # stable descending sort: ties keep the lower index
        order = score.sort(dim=-1, descending=True, stable=True).indices[..., :2]
        mask = torch.zeros(N, K // 4, 4, dtype=torch.bool, device=weight.device)
        mask.scatter_(2, order, True)
        return mask.view(N, K)

    _check_density(density)
    block_size = tuple(block_size) if isinstance(block_size, list) else block_size
    tiles = tile_scores(weight, method, block_size=block_size, act_norm=act_norm)
    return expand_tiles(keep_tiles(tiles, density), check_block_size((N, K), block_size))


def _check_density(density) -> None:
    if isinstance(density, bool) or not isinstance(density, int | float) or not 0 < density <= 1:
        raise ValueError(f"density must be a number in (0, 1], got {density!r}")


def tile_scores(
    weight: torch.Tensor, method: str = "magnitude", *, block_size=(64, 64), act_norm=None
) -> torch.Tensor:
    """float32 (N/bn, K/bk): the score of each (bn, bk) tile of ``weight`` (N, K), the sum
    of its weights' scores. A tile's score depends only on its own weights, so a shard of
    the weight (whole tiles) gives its part of the whole weight's tile scores."""
    N, K = weight.shape
    bn, bk = check_block_size((N, K), tuple(block_size))
    score = _scores(weight, method, act_norm)
    return score.reshape(N // bn, bn, K // bk, bk).sum(dim=(1, 3))


def keep_tiles(tiles: torch.Tensor, density: float) -> torch.Tensor:
    """bool, the shape of ``tiles``: the ``round(density * tiles)`` (at least 1)
    highest-scoring tiles of the whole matrix, ties to the earlier tile in row-major order."""
    _check_density(density)
    flat = tiles.flatten()
    keep = max(1, round(density * flat.numel()))
    order = flat.sort(descending=True, stable=True).indices[:keep]
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=tiles.device)
    mask[order] = True
    return mask.view(tiles.shape)


def expand_tiles(tile_mask: torch.Tensor, block_size) -> torch.Tensor:
    """The element mask (N, K) of a tile mask (N/bn, K/bk)."""
    bn, bk = block_size
    R, C = tile_mask.shape
    return tile_mask.view(R, 1, C, 1).expand(R, bn, C, bk).reshape(R * bn, C * bk)


def calibrate(model: nn.Module, batches: Iterable, *, filter_fn=None) -> dict[str, torch.Tensor]:
    """{qualified name: act_norm (float32 (in_features,))} for every nn.Linear of ``model``,
    the L2 norm of each input channel over all tokens of ``batches`` — what Wanda needs.

    Built on fastllm.calibration.collect_input_stats (forward hooks, no model-specific
    code); batches and filter_fn are passed as documented there."""
    stats = collect_input_stats(model, batches, filter_fn=filter_fn)
    return {name: s.norm for name, s in stats.items()}
