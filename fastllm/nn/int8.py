"""Int8Linear: a drop-in for nn.Linear holding int8 weights.

    layer = Int8Linear.from_linear(linear, mode="w8a8")     # int8 activations and weights
    layer = Int8Linear.from_linear(linear, mode="w8a16")    # int8 weights only (decode)

Everything is a buffer, so ``state_dict`` holds exactly what the kernels read and
round-trips exactly: ``weight`` int8 (out, in), ``weight_scale`` float32 (out,), ``bias``
(out,) in the original layer's dtype or None, and ``smooth_scale`` float32 (in,) or None
(SmoothQuant's per-input-channel factor kept at run time: the input is divided by it,
the weight was multiplied by it before quantization). ``module.to(dtype)`` casts the
bias only: the scales stay float32.

``last_backend`` records which backend served the latest forward (not updated under
torch.compile, where the op runs outside Python).

Tensor parallelism: a layer built for one rank's shard of a sharded nn.Linear
(fastllm.optimize does it) holds that shard's buffers, in_features/out_features of the
shard, and in ``tp`` how it is sharded (fastllm.distributed.LinearShard; None when it is
whole). Column-wise shards compute their output features; row-wise shards compute
partial sums, all-reduced after the epilogue, the bias added once after the reduction.
The scales are those of the whole layer: a row-wise shard quantizes its rows against
their maximum over all ranks, so that every rank's int8 weights and scales are a slice
of what one process computes.

W8A8 on a row-wise shard quantizes the activations per token over this rank's slice of
the input features only. That is at least as accurate as quantizing the whole row: a
slice's max |x| is at most the row's, so its step (max / 127) is at most the step one
process would use, and every element's rounding error at most the same bound; the int32
products are exact, each rank's partial sum is dequantized in float with its own
scale, and only float partial sums are added by the reduction.
"""

from __future__ import annotations

import torch
from torch import nn

from fastllm import backend
from fastllm import ops as fops
from fastllm.ops._checks import check_int8_k

MODES = ("w8a8", "w8a16")
_OPS = {"w8a8": "int8_dynamic_linear", "w8a16": "int8_weight_only_linear"}


def _check_mode(mode) -> str:
    if mode not in MODES:
        raise ValueError(f"mode is {mode!r}; expected one of {MODES}")
    return mode


def _check_smooth_scale(smooth_scale, in_features: int) -> None:
    if not isinstance(smooth_scale, torch.Tensor):
        raise TypeError(f"smooth_scale must be a torch.Tensor, got {type(smooth_scale).__name__}")
    if tuple(smooth_scale.shape) != (in_features,):
        raise ValueError(
            f"smooth_scale has shape {tuple(smooth_scale.shape)}; expected ({in_features},), "
            "one factor per input feature"
        )
    if not smooth_scale.is_floating_point():
        raise TypeError(f"smooth_scale has dtype {smooth_scale.dtype}; expected a float dtype")
    if not (torch.isfinite(smooth_scale).all() and (smooth_scale > 0).all()):
        raise ValueError("smooth_scale must be finite and > 0 everywhere")


class Int8Linear(nn.Module):
    """y = x Wᵀ + b with W int8 per output channel: W ≈ weight * weight_scale[:, None].

    mode "w8a8": x is quantized per token (dynamic) and multiplied on int8 kernels with
    an int32 accumulator (fastllm.ops.int8_dynamic_linear). mode "w8a16": x stays in
    its float dtype, the weight is converted in the kernel
    (fastllm.ops.int8_weight_only_linear). The output has x's dtype; x may have any
    leading shape (..., in_features).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        mode: str = "w8a8",
        smooth: bool = False,
        device=None,
        dtype=None,
    ):
        """An all-zero layer to load a state_dict into. dtype: the bias dtype. mode "w8a8"
        takes in_features <= 133,144 (the int32 accumulator; ValueError beyond)."""
        super().__init__()
        self.mode = _check_mode(mode)
        if mode == "w8a8":
            check_int8_k(in_features)
        self.in_features, self.out_features = in_features, out_features
        dtype = dtype or torch.get_default_dtype()
        self.register_buffer(
            "weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer(
            "weight_scale", torch.ones(out_features, dtype=torch.float32, device=device)
        )
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None
        if smooth:
            self.register_buffer(
                "smooth_scale", torch.ones(in_features, dtype=torch.float32, device=device)
            )
        else:
            self.smooth_scale = None
        self.last_backend: str | None = None
        self.tp = None  # fastllm.distributed.LinearShard of a tensor-parallel shard

    @classmethod
    @torch.no_grad()
    def from_linear(
        cls,
        linear: nn.Linear,
        mode: str = "w8a8",
        smooth_scale: torch.Tensor | None = None,
        *,
        row_max=None,
    ) -> Int8Linear:
        """Quantizes ``linear.weight`` per output channel (fastllm.ops.quantize_per_channel).

        smooth_scale: (in_features,) positive factors s (SmoothQuant, from
        fastllm.quant.smooth): the weight is quantized as W * s[None, :] and the input is
        divided by s at run time, so that the float result is unchanged.
        row_max: for a shard holding some columns of a layer's rows (tensor parallelism):
            a function from this shard's per-row max |W·s| (out_features,) to the rows'
            maximum over the whole layer (LinearShard.row_max), so that the scales are the
            whole layer's.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        _check_mode(mode)
        w = linear.weight.detach()
        if smooth_scale is not None:
            _check_smooth_scale(smooth_scale, linear.in_features)
        layer = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            mode=mode,
            smooth=smooth_scale is not None,
            device=w.device,
            dtype=linear.bias.dtype if linear.bias is not None else w.dtype,
        )
        wf = w.float()
        if smooth_scale is not None:
            s = smooth_scale.detach().to(device=w.device, dtype=torch.float32)
            wf = wf * s[None, :]
            layer.smooth_scale.copy_(s)
        if row_max is not None:
            # the rows' maximum over the whole layer, appended as one more column, is the
            # amax quantize_per_channel takes: the scales and the rounding of every element
            # are those the whole layer gets
            amax = row_max(wf.abs().amax(dim=1))
            wf = torch.cat([wf, amax.to(wf)[:, None]], dim=1)
        w_int8, w_scale = fops.quantize_per_channel(wf, dim=0)
        layer.weight.copy_(w_int8[:, : linear.in_features])
        layer.weight_scale.copy_(w_scale)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp is not None:  # a tensor-parallel shard: local compute, collectives around
            return self.tp(x, self._forward, self.bias)
        return self._forward(x, self.bias)

    def _forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"Int8Linear input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"Int8Linear(in_features={self.in_features}) got input of shape "
                f"{tuple(x.shape)}; expected (..., {self.in_features})"
            )
        if self.mode == "w8a8":
            # the division by smooth_scale happens inside the quantization
            y = fops.int8_dynamic_linear(
                x, self.weight, self.weight_scale, bias, smooth_scale=self.smooth_scale
            )
        else:
            if self.smooth_scale is not None:
                x = x / self.smooth_scale.to(x.dtype)
            y = fops.int8_weight_only_linear(x, self.weight, self.weight_scale, bias)
        if not torch.compiler.is_compiling():
            self.last_backend = backend.last_backend(_OPS[self.mode])
        return y

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight this layer multiplies by (smooth_scale divided back out)."""
        w = self.weight.float() * self.weight_scale[:, None]
        if self.smooth_scale is not None:
            w = w / self.smooth_scale[None, :]
        return w

    def _apply(self, fn, *args, **kwargs):
        # module.to(dtype) / .half() cast every float buffer; the scales stay float32
        # (moved to the new device only), as the kernels read them
        scales = {n: self._buffers.get(n) for n in ("weight_scale", "smooth_scale")}
        out = super()._apply(fn, *args, **kwargs)
        for name, old in scales.items():
            new = self._buffers.get(name)
            if old is not None and new is not None and new.dtype != torch.float32:
                self._buffers[name] = old.to(device=new.device)
        return out

    def get_extra_state(self) -> dict:
        return {"mode": self.mode}

    def set_extra_state(self, state: dict) -> None:
        self.mode = _check_mode(state["mode"])

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, mode={self.mode}, "
            f"weight=int8{tuple(self.weight.shape)}, weight_scale=float32({self.out_features},)"
            + (
                f", smooth_scale=float32({self.in_features},)"
                if self.smooth_scale is not None
                else ""
            )
            + (f", tp={self.tp}" if self.tp is not None else "")
        )
