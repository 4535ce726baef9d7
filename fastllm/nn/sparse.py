"""Sparse drop-ins for nn.Linear: 2:4 (Sparse24Linear) and block-sparse (BlockSparseLinear).

Each stores only its compressed weight, as buffers (so ``state_dict`` holds exactly
what the kernels read), and records in ``last_backend`` which backend served its
latest forward (not updated under torch.compile, where the op runs outside Python).

    layer = Sparse24Linear.from_linear(linear, method="wanda", act_norm=norms["mlp.up"])
    layer = BlockSparseLinear.from_linear(linear, block_size=(64, 64), density=0.3)

Tensor parallelism: as fastllm.nn.Int8Linear, a layer built for one rank's shard holds
the shard's compressed weight and in ``tp`` how it is sharded (None when whole);
row-wise shards all-reduce their partial sums after the epilogue and add the bias once.
A shard boundary must not cut a 2:4 group or a block (fastllm.optimize checks).
"""

from __future__ import annotations

import torch
from torch import nn

from fastllm import backend
from fastllm import ops as fops
from fastllm.ops._checks import INT8_MAX_K, check_int8_k
from fastllm.sparse.format import (
    BlockSparseWeight,
    check_block_size,
    check_block_sparse,
    compress_24,
    to_block_sparse,
)
from fastllm.sparse.prune import prune


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _check_linear(linear) -> None:
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")


class Sparse24Linear(nn.Module):
    """y = x Wᵀ + b with W 2:4 sparse, stored compressed (fastllm.sparse.format).

    Buffers: ``values`` (out, in/2), ``metadata`` int16 (out, ceil(in/16)), ``bias``
    (out,) or None. With ``int8=True``, ``values`` are int8 with per-output-channel
    float32 ``weight_scale`` (out,): the input is quantized per token
    (fastllm.ops.quantize_per_token), multiplied on the int8 2:4 kernels with an int32
    accumulator, and rescaled: y = acc · x_scale · weight_scale + b, in x's dtype.
    """

    pattern = "2:4"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        int8: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if in_features % 4:
            raise ValueError(f"in_features = {in_features}; 2:4 sparsity needs a multiple of 4")
        if int8:
            check_int8_k(in_features, 2 * INT8_MAX_K)  # a 2:4 row sums in_features/2 products
        self.in_features, self.out_features, self.int8 = in_features, out_features, int8
        dtype = dtype or torch.get_default_dtype()
        vdtype = torch.int8 if int8 else dtype
        self.register_buffer(
            "values", torch.zeros(out_features, in_features // 2, dtype=vdtype, device=device)
        )
        self.register_buffer(
            "metadata",
            torch.zeros(out_features, -(-in_features // 16), dtype=torch.int16, device=device),
        )
        # metadata of all-zero groups: kept indices (0, 1) in every nibble
        self.metadata.fill_(compress_24(torch.zeros(1, 16))[1].item())
        if in_features % 16:
            self.metadata[:, -1] = compress_24(torch.zeros(1, in_features % 16))[1].item()
        if int8:
            self.register_buffer(
                "weight_scale", torch.ones(out_features, dtype=torch.float32, device=device)
            )
        else:
            self.weight_scale = None
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None
        self.last_backend: str | None = None
        self.tp = None  # fastllm.distributed.LinearShard of a tensor-parallel shard

    @classmethod
    @torch.no_grad()
    def from_linear(
        cls,
        linear: nn.Linear,
        method: str = "magnitude",
        act_norm: torch.Tensor | None = None,
        *,
        int8: bool = False,
        row_max=None,
    ) -> Sparse24Linear:
        """Prunes ``linear.weight`` to 2:4 (fastllm.sparse.prune) and compresses it.
        int8: quantizes the pruned weight per output channel (symmetric, amax / 127).
        row_max: for a shard holding some columns of a layer's rows (tensor parallelism):
        maps this shard's per-row max |W| to the whole layer's (LinearShard.row_max)."""
        _check_linear(linear)
        w = linear.weight.detach()
        mask = prune(w, "2:4", method, act_norm=act_norm)
        layer = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            int8=int8,
            device=w.device,
            dtype=w.dtype,
        )
        if int8:
            wf = (w * mask).float()
            amax = wf.abs().amax(dim=1)
            scale = (row_max(amax) if row_max is not None else amax) / 127
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            w = torch.round(wf / scale[:, None]).clamp(-127, 127).to(torch.int8)
            layer.weight_scale.copy_(scale)
        values, metadata = compress_24(w, mask)
        layer.values.copy_(values)
        layer.metadata.copy_(metadata)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        return layer

    @property
    def density(self) -> float:
        return 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp is not None:  # a tensor-parallel shard: local compute, collectives around
            return self.tp(x, self._forward, self.bias)
        return self._forward(x, self.bias)

    def _forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if not self.int8:
            y = fops.sparse24_linear(x, self.values, self.metadata, bias)
        else:
            xq, xs = fops.quantize_per_token(x)
            acc = fops.sparse24_linear(xq, self.values, self.metadata)
            y = acc.float() * xs[..., None] * self.weight_scale
            if bias is not None:
                y = y + bias.float()
            y = y.to(x.dtype)
        if not _compiling():
            self.last_backend = backend.last_backend("sparse24_linear")
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, pattern=2:4, density=0.5"
            + (", int8=True" if self.int8 else "")
            + (f", tp={self.tp}" if self.tp is not None else "")
        )


class BlockSparseLinear(nn.Module):
    """y = x Wᵀ + b with W block-sparse, stored as BSR tiles (fastllm.sparse.format).

    Buffers: ``crow_indices`` int32 (out/bn + 1,), ``col_indices`` int32 (nnz,),
    ``blocks`` (nnz, bn, bk), ``bias`` (out,) or None. out_features and in_features
    must be multiples of the block size (ValueError otherwise: no padding).
    ``load_state_dict`` accepts any number of kept tiles.
    """

    pattern = "block"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        block_size=(64, 64),
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.block_size = check_block_size((out_features, in_features), tuple(block_size))
        bn, bk = self.block_size
        self.in_features, self.out_features = in_features, out_features
        dtype = dtype or torch.get_default_dtype()
        self.register_buffer(
            "crow_indices",
            torch.zeros(out_features // bn + 1, dtype=torch.int32, device=device),
        )
        self.register_buffer("col_indices", torch.zeros(0, dtype=torch.int32, device=device))
        self.register_buffer("blocks", torch.zeros(0, bn, bk, dtype=dtype, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None
        self.last_backend: str | None = None
        self.tp = None  # fastllm.distributed.LinearShard of a tensor-parallel shard

    @classmethod
    @torch.no_grad()
    def from_linear(
        cls,
        linear: nn.Linear,
        block_size=(64, 64),
        density: float = 0.5,
        method: str = "magnitude",
        act_norm: torch.Tensor | None = None,
        *,
        mask: torch.Tensor | None = None,
    ) -> BlockSparseLinear:
        """Keeps the ``density`` fraction of ``block_size`` tiles of ``linear.weight``
        with the highest scores (fastllm.sparse.prune, pattern="block").

        mask: bool (out_features, in_features), constant on each tile: the tiles to keep,
        chosen elsewhere (a tensor-parallel shard keeps its part of the whole layer's
        choice); method, density and act_norm are then not used."""
        _check_linear(linear)
        w = linear.weight.detach()
        if mask is None:
            mask = prune(
                w, "block", method, block_size=tuple(block_size), density=density,
                act_norm=act_norm,
            )  # fmt: skip
        elif tuple(mask.shape) != tuple(w.shape) or mask.dtype != torch.bool:
            raise ValueError(
                f"mask has shape {tuple(mask.shape)} and dtype {mask.dtype}; expected bool "
                f"{tuple(w.shape)}, the weight's shape"
            )
        layer = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            block_size=block_size,
            device=w.device,
            dtype=w.dtype,
        )
        layer.set_weight(to_block_sparse(w, mask, layer.block_size))
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        return layer

    def set_weight(self, weight_bsr: BlockSparseWeight) -> None:
        """Replaces the stored weight (same shape and block size)."""
        if tuple(weight_bsr.shape) != (self.out_features, self.in_features) or tuple(
            weight_bsr.block_size
        ) != tuple(self.block_size):
            raise ValueError(
                f"weight_bsr has shape {tuple(weight_bsr.shape)} and block_size "
                f"{tuple(weight_bsr.block_size)}; this layer needs "
                f"({self.out_features}, {self.in_features}) and {self.block_size}"
            )
        check_block_sparse(weight_bsr)
        self.crow_indices = weight_bsr.crow_indices.clone()
        self.col_indices = weight_bsr.col_indices.clone()
        self.blocks = weight_bsr.blocks.clone()

    @property
    def weight_bsr(self) -> BlockSparseWeight:
        return BlockSparseWeight(
            self.crow_indices,
            self.col_indices,
            self.blocks,
            (self.out_features, self.in_features),
            self.block_size,
        )

    @property
    def density(self) -> float:
        """Fraction of tiles kept."""
        bn, bk = self.block_size
        total = (self.out_features // bn) * (self.in_features // bk)
        return self.col_indices.numel() / total if total else 1.0

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the number of kept tiles is the checkpoint's: resize before loading
        for name in ("col_indices", "blocks"):
            t = state_dict.get(prefix + name)
            if isinstance(t, torch.Tensor) and t.shape != getattr(self, name).shape:
                old = getattr(self, name)
                setattr(self, name, torch.empty(t.shape, dtype=old.dtype, device=old.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        check_block_sparse(self.weight_bsr)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp is not None:  # a tensor-parallel shard: local compute, collectives around
            return self.tp(x, self._forward, self.bias)
        return self._forward(x, self.bias)

    def _forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = fops.block_sparse_linear(x, self.weight_bsr, bias)
        if not _compiling():
            self.last_backend = backend.last_backend("block_sparse_linear")
        return y

    def extra_repr(self) -> str:
        bn, bk = self.block_size
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, pattern=block {bn}x{bk}, density={self.density:.3g}"
            + (f", tp={self.tp}" if self.tp is not None else "")
        )
