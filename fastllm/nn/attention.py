"""FusedMultiheadAttention: torch.nn.MultiheadAttention on fastllm.ops.attention."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastllm.ops.attention import _sdpa, attention


class FusedMultiheadAttention(nn.Module):
    """A drop-in for ``torch.nn.MultiheadAttention`` (same arguments, same outputs).

    Build it from an existing module with ``FusedMultiheadAttention.from_module(mha)``.
    Inputs are (L, N, E) (or (N, L, E) with batch_first, or unbatched (L, E)).

    Which path serves a call:
      - no mask, or ``is_causal=True`` (taken, as in PyTorch, as a promise that attn_mask is
        the causal mask): ``fastllm.ops.attention`` (the fused kernels where they apply);
      - ``key_padding_mask`` or an ``attn_mask`` without is_causal (any bool or float mask,
        which no kernel takes): the torch backend, SDPA with the merged additive mask;
      - ``need_weights=True`` (PyTorch's default) or dropout while training: PyTorch's
        computation (``multi_head_attention_forward``'s order of operations) on the module's
        own projections, which may be fastllm's int8 or sparse layers after ``optimize``.
    Pass ``need_weights=False`` to get the fused path. Returns (output, weights or None).
    Not supported (rejected by from_module): add_bias_kv, add_zero_attn.

    Tensor parallelism (fastllm.distributed.parallelize with a plan that names q_proj,
    k_proj, v_proj colwise and out_proj rowwise): each rank projects, attends and
    projects back its own heads (the head count is read from the projections' output,
    not from num_heads), and out_proj's reduction joins them. A per-head 3-D attn_mask
    is cut to this rank's heads; need_weights=True is refused (the weights are spread
    over the ranks).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(
                f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}; expected "
                "a whole head_dim"
            )
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.dropout, self.batch_first = dropout, batch_first
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)

    @classmethod
    def from_module(cls, mha: nn.MultiheadAttention) -> FusedMultiheadAttention:
        """A FusedMultiheadAttention with mha's weights (copied), dtype and device."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"mha must be a torch.nn.MultiheadAttention, got {type(mha).__name__}")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError(
                "mha uses add_bias_kv or add_zero_attn, which FusedMultiheadAttention does not "
                "support; expected a module built without them"
            )
        w = mha.out_proj.weight
        new = cls(
            mha.embed_dim,
            mha.num_heads,
            dropout=mha.dropout,
            bias=mha.in_proj_bias is not None,
            kdim=mha.kdim,
            vdim=mha.vdim,
            batch_first=mha.batch_first,
            device=w.device,
            dtype=w.dtype,
        )
        e = mha.embed_dim
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                wq, wk, wv = mha.in_proj_weight.split(e)
            else:
                wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
            new.q_proj.weight.copy_(wq)
            new.k_proj.weight.copy_(wk)
            new.v_proj.weight.copy_(wv)
            if mha.in_proj_bias is not None:
                bq, bk, bv = mha.in_proj_bias.split(e)
                new.q_proj.bias.copy_(bq)
                new.k_proj.bias.copy_(bk)
                new.v_proj.bias.copy_(bv)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        new.train(mha.training)
        return new

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
            f"batch_first={self.batch_first}"
        )

    def _forward_with_weights(
        self, query, key, value, key_padding_mask, need_weights, attn_mask, avg, is_causal
    ):
        """PyTorch's multi_head_attention_forward when the weights are asked for (or dropout
        acts), on this module's own projections, whatever fastllm swapped them into (their
        weights may be int8 buffers): softmax(q / sqrt(d) k^T + mask) in the input dtype,
        dropout while training, P v, out_proj. (L, N, E) in and out. is_causal without an
        attn_mask is the top-left causal mask, as on the fused path."""
        lq, batch, _ = query.shape
        lk = key.shape[0]
        bh, d = batch * self.num_heads, self.head_dim
        q = self.q_proj(query).view(lq, bh, d).transpose(0, 1)
        k = self.k_proj(key).view(lk, bh, d).transpose(0, 1)
        v = self.v_proj(value).view(lk, bh, d).transpose(0, 1)
        causal = is_causal and attn_mask is None
        kt = k.transpose(1, 2)
        q = q * math.sqrt(1.0 / d)  # as PyTorch scales it
        if attn_mask is None and key_padding_mask is None and not causal:
            weights = torch.bmm(q, kt)
        else:
            mask = self._additive_mask(
                attn_mask, key_padding_mask, batch, lq, lk, q.dtype, causal, q.device
            )
            weights = torch.baddbmm(mask.view(bh, lq, lk), q, kt)
        weights = torch.softmax(weights, dim=-1)
        if self.training and self.dropout > 0:
            weights = F.dropout(weights, p=self.dropout)
        o = torch.bmm(weights, v).transpose(0, 1).reshape(lq, batch, self.embed_dim)
        out = self.out_proj(o)
        if not need_weights:
            return out, None
        weights = weights.view(batch, self.num_heads, lq, lk)
        return out, (weights.mean(dim=1) if avg else weights)

    def _local_heads(self) -> tuple[int, int] | None:
        """[first, last) of the heads this rank serves when q_proj is a tensor-parallel
        shard (a DTensor weight, or a fastllm layer's `tp`), else None."""
        shard = getattr(self.q_proj, "tp", None)
        if shard is None and hasattr(self.q_proj._parameters.get("weight"), "placements"):
            from fastllm import distributed

            shard = distributed.linear_shard(self.q_proj)
        if shard is None:
            return None
        return shard.start // self.head_dim, shard.stop // self.head_dim

    def _additive_mask(self, attn_mask, key_padding_mask, batch, lq, lk, dtype, causal, device):
        """Merged float mask (batch, heads, lq, lk): 0 to keep, -inf to drop (this rank's
        heads under tensor parallelism)."""
        h0, h1 = self._local_heads() or (0, self.num_heads)
        mask = torch.zeros(batch, h1 - h0, lq, lk, dtype=dtype, device=device)
        if causal:
            # what nn.MultiheadAttention does with is_causal: SDPA's top-left causal mask
            keep = torch.ones(lq, lk, dtype=torch.bool, device=mask.device).tril()
            mask = mask.masked_fill(~keep, float("-inf"))
        if attn_mask is not None:
            am = attn_mask
            if am.dim() == 3:  # (batch * heads, lq, lk)
                am = am.view(batch, self.num_heads, lq, lk)[:, h0:h1]
            if am.dtype == torch.bool:
                mask = mask.masked_fill(am, float("-inf"))
            else:
                mask = mask + am.to(dtype)
        if key_padding_mask is not None:
            kpm = key_padding_mask.view(batch, 1, 1, lk)
            if kpm.dtype == torch.bool:
                mask = mask.masked_fill(kpm, float("-inf"))
            else:
                mask = mask + kpm.to(dtype)
        return mask

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:  # -> (L, N, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)

        heads = self._local_heads()
        if heads is not None and (need_weights or (self.training and self.dropout > 0)):
            raise ValueError(
                "a tensor-parallel FusedMultiheadAttention computes its heads on several ranks: "
                "pass need_weights=False (and no dropout while training)"
            )
        if need_weights or (self.training and self.dropout > 0):
            out, weights = self._forward_with_weights(
                query,
                key,
                value,
                key_padding_mask,
                need_weights,
                attn_mask,
                average_attn_weights,
                is_causal,
            )
        else:
            weights = None
            lq, batch, _ = query.shape
            lk = key.shape[0]
            # projections in (N, L, E) so that q/k/v are (N, L, H, D) views
            # this rank's heads under tensor parallelism (all of them otherwise): -1
            q = self.q_proj(query.transpose(0, 1)).view(batch, lq, -1, self.head_dim)
            k = self.k_proj(key.transpose(0, 1)).view(batch, lk, -1, self.head_dim)
            v = self.v_proj(value.transpose(0, 1)).view(batch, lk, -1, self.head_dim)
            if (
                key_padding_mask is None
                and (attn_mask is None or is_causal)
                and (
                    not is_causal or lq == lk  # is_causal in PyTorch is top-left aligned
                )
            ):
                o = attention(q, k, v, causal=is_causal)
            else:
                o = self._masked(q, k, v, attn_mask, key_padding_mask, batch, lq, lk, is_causal)
            out = self.out_proj(o.reshape(batch, lq, -1)).transpose(0, 1)

        if unbatched:
            return out.squeeze(1), (weights.squeeze(0) if weights is not None else None)
        if self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _masked(self, q, k, v, attn_mask, key_padding_mask, batch, lq, lk, causal):
        # served by the torch path: SDPA with the merged additive mask
        mask = self._additive_mask(
            None if causal else attn_mask, key_padding_mask, batch, lq, lk, q.dtype, causal,
            q.device,
        )  # fmt: skip
        return _sdpa(q, k, v, mask=mask)
