"""Fused modules: the work between a model's GEMMs done inside fastllm's ops.

    FusedRMSNorm          an RMSNorm (transformers' LlamaRMSNorm and look-alikes) on fastllm.ops.rms_norm
    FusedDenseAct         act(dense(x))                      BERT's intermediate
                          -> the activation in the W8A8 GEMM's epilogue
    FusedDenseResidualNorm norm(dropout(dense(h)) + r)       BERT's (self-)output
                          -> the residual add in the epilogue, then fastllm.ops.layer_norm
    FusedMLP              down(act(up(x)))                   GPT-2 / ViT-type MLPs
                          -> act and the int8 quantization of down's input in up's epilogue
    FusedGatedMLP         down(act(gate(x)) * up(x))         Llama-type MLPs
                          -> gate and up in one GEMM (act(gate) * up in its epilogue, quantized
                             for down), then down on the int8 result

Each fused container replaces a model's own container module (BertIntermediate, LlamaMLP,
...) and holds that container's children under their own names, so the state_dict keys
and tensors are unchanged. ``from_module(container, roles)`` builds one; which child plays
which role, and whether the fused forward computes what the container computes, is for the
caller to establish (fastllm.optimize runs both on a probe input). The container itself is
kept (not as a submodule) as ``original``: in training mode, where dropout acts, the fused
module runs it instead.

The linear layers must be Int8Linear in mode "w8a8" (the epilogues are those of
fastllm.ops.int8_linear); ``last_backend`` records the backend of the latest GEMM.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from fastllm import backend
from fastllm import ops as fops
from fastllm.distributed import is_dtensor
from fastllm.nn.int8 import Int8Linear
from fastllm.ops._checks import FLOAT_DTYPES

# what the epilogues compute, by the name the int8 ops take
ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"),
    "silu": F.silu,
}


def _norm_input_ok(x, weight) -> bool:
    """Whether the fastllm norm op takes x (else the module computes the same in PyTorch:
    another dtype than the weight's, a DTensor of a sequence-parallel engine)."""
    return (
        isinstance(x, torch.Tensor)
        and not is_dtensor(x)
        and x.dtype in FLOAT_DTYPES
        and x.dtype == weight.dtype
        and x.dim() >= 1
        and x.device == weight.device
    )


def rms_norm_eps(norm: nn.Module) -> float | None:
    """The epsilon of an RMSNorm module (``variance_epsilon`` in transformers' Llama family,
    ``eps`` in others and in torch.nn.RMSNorm), or None if it has none as a number."""
    for attr in ("variance_epsilon", "eps"):
        eps = getattr(norm, attr, None)
        if isinstance(eps, int | float) and not isinstance(eps, bool):
            return float(eps)
    return None


class FusedRMSNorm(nn.Module):
    """RMSNorm as transformers' LlamaRMSNorm computes it,
    ``weight * (h32 * rsqrt(mean(h32**2) + eps)).to(x.dtype)``, on fastllm.ops.rms_norm.

    ``weight`` is the original module's parameter (same state_dict key). Inputs the op does
    not take (another dtype than the weight's) are computed by that formula in PyTorch.
    """

    def __init__(self, weight: nn.Parameter, eps: float):
        super().__init__()
        self.weight = weight
        self.eps = eps
        self.last_backend: str | None = None

    @property
    def variance_epsilon(self) -> float:  # the name transformers' RMSNorm modules use
        return self.eps

    @classmethod
    def from_module(cls, norm: nn.Module) -> FusedRMSNorm:
        weight = norm._parameters.get("weight")
        eps = rms_norm_eps(norm)
        if (
            not isinstance(weight, nn.Parameter)
            or weight.dim() != 1
            or list(norm._parameters) != ["weight"]
            or eps is None
        ):
            raise ValueError(
                f"{type(norm).__name__} has parameters {list(norm._parameters)} and eps "
                f"{getattr(norm, 'eps', None)!r}; FusedRMSNorm takes the LlamaRMSNorm layout "
                "(one 1-D weight, a numeric eps)"
            )
        new = cls(weight, eps)
        new.train(norm.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _norm_input_ok(x, self.weight):
            h = x.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
            return self.weight * h.to(x.dtype)
        y = fops.rms_norm(x, self.weight, self.eps)
        if not torch.compiler.is_compiling():
            self.last_backend = backend.last_backend("rms_norm")
        return y

    def extra_repr(self) -> str:
        return f"({self.weight.shape[0]},), eps={self.eps}"


# --- fused containers ----------------------------------------------------------------------


class _FusedContainer(nn.Module):
    """Holds a container's children under their names; ``roles`` maps a role ("linear",
    "act", "norm", "up", "down", "gate") to the name of the child that plays it."""

    ROLES: tuple[str, ...] = ()
    N_INPUTS = 1  # tensors the container's forward takes

    def __init__(self, container: nn.Module, roles: dict[str, str], activation: str | None):
        super().__init__()
        if sorted(roles) != sorted(self.ROLES):
            raise ValueError(f"roles must name {self.ROLES}, got {sorted(roles)}")
        children = dict(container.named_children())
        for role, name in roles.items():
            if name not in children:
                raise ValueError(f"roles[{role!r}] = {name!r} is not a child of the container")
        for name, child in children.items():
            self.add_module(name, child)
        self.roles = dict(roles)
        self.activation = activation
        # not a submodule: its children are these, and its state would be saved twice
        self.__dict__["original"] = container
        self._signature = inspect.signature(container.forward)
        self._params = [p.name for p in _positional_params(container)]
        self.train(container.training)
        self.last_backend: str | None = None
        for role in ("linear", "up", "gate", "down"):
            if role in roles:
                _check_w8a8(self._role(role), f"{roles[role]} ({role})")

    def _role(self, role: str) -> nn.Module:
        return self._modules[self.roles[role]]

    def _inputs(self, args, kwargs) -> tuple:
        """The tensors the container's forward takes, positionally or by name."""
        if not kwargs and len(args) == self.N_INPUTS:
            return args
        bound = self._signature.bind(*args, **kwargs)
        return tuple(bound.arguments[n] for n in self._params[: self.N_INPUTS])

    def _down(self, q, s, dtype) -> torch.Tensor:
        """The down projection on the int8 output of the epilogue before it."""
        down = self._role("down")
        y = fops.int8_linear(q, s, down.weight, down.weight_scale, down.bias, out_dtype=dtype)
        self._served("int8_linear")
        return y

    def _served(self, op: str) -> None:
        if not torch.compiler.is_compiling():
            self.last_backend = backend.last_backend(op)

    def forward(self, *args, **kwargs):
        if self.training:  # dropout acts: the container's own forward
            return self.original(*args, **kwargs)
        return self._fused(*self._inputs(args, kwargs))

    def _fused(self, *inputs):
        raise NotImplementedError

    def extra_repr(self) -> str:
        roles = ", ".join(f"{r}={n}" for r, n in self.roles.items())
        act = f", activation={self.activation}" if self.activation else ""
        return f"fuses {type(self.original).__name__}: {roles}{act}"


def _positional_params(module: nn.Module) -> list[inspect.Parameter]:
    return [
        p
        for p in inspect.signature(module.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]


def _check_w8a8(m: nn.Module, what: str) -> None:
    if not isinstance(m, Int8Linear) or m.mode != "w8a8":
        kind = f"Int8Linear {m.mode}" if isinstance(m, Int8Linear) else type(m).__name__
        raise ValueError(f"{what} is {kind}; the fused epilogues take Int8Linear w8a8 layers")
    if m.tp is not None:
        raise ValueError(f"{what} is a tensor-parallel shard; fused containers take whole layers")


def _int8_args(lin: Int8Linear) -> tuple:
    return lin.weight, lin.weight_scale, lin.bias, lin.smooth_scale


class FusedDenseAct(_FusedContainer):
    """act(linear(x)) with act in the W8A8 GEMM's epilogue (BERT's intermediate)."""

    ROLES = ("linear", "act")

    def _fused(self, x):
        lin = self._role("linear")
        y = fops.int8_dynamic_linear(x, *_int8_args(lin), activation=self.activation)
        self._served("int8_fused_linear")
        return y


class FusedDenseResidualNorm(_FusedContainer):
    """norm(dropout(linear(h)) + r): the residual added in the GEMM's epilogue, then
    fastllm.ops.layer_norm (BERT's output and self-output; dropout is identity in eval)."""

    ROLES = ("linear", "norm")
    N_INPUTS = 2

    def _fused(self, h, r):
        lin, norm = self._role("linear"), self._role("norm")
        y = fops.int8_dynamic_linear(h, *_int8_args(lin), residual=r)
        self._served("int8_fused_linear")
        return norm(y)


class FusedMLP(_FusedContainer):
    """down(act(up(x))): act and the per-token int8 quantization of down's input (with
    down's SmoothQuant factor) in up's epilogue; down runs on the int8 result, so the
    wide intermediate is written once, as int8."""

    ROLES = ("up", "act", "down")

    def _fused(self, x):
        up, down = self._role("up"), self._role("down")
        q, s = fops.int8_dynamic_linear(
            x,
            *_int8_args(up),
            activation=self.activation,
            quantize_output=True,
            output_smooth_scale=down.smooth_scale,
        )
        return self._down(q, s, x.dtype)


class FusedGatedMLP(_FusedContainer):
    """down(act(gate(x)) * up(x)) in two GEMMs: gate and up as one (N = 2I, x quantized and
    read once, act(gate) * up and the int8 quantization of down's input in its epilogue),
    then down on the int8 result.

    The gate and up weights, scales and biases live in concatenated buffers; the children's
    buffers are views of them (the state_dict is unchanged and loading into the children
    updates them). Moving the module (``.to()``) builds them again.
    """

    ROLES = ("gate", "up", "act", "down")

    def __init__(self, container, roles, activation):
        super().__init__(container, roles, activation)
        gate, up = self._role("gate"), self._role("up")
        if gate.weight.shape != up.weight.shape:
            raise ValueError(
                f"gate weight {tuple(gate.weight.shape)} and up weight "
                f"{tuple(up.weight.shape)} differ; the gated GEMM takes equal shapes"
            )
        if (gate.bias is None) != (up.bias is None):
            raise ValueError("one of gate and up has a bias and the other not")
        a, b = gate.smooth_scale, up.smooth_scale
        if (a is None) != (b is None) or (a is not None and not torch.equal(a, b)):
            raise ValueError(
                "gate and up have different SmoothQuant factors (smoothed at run time "
                "one by one); the gated GEMM quantizes their shared input once"
            )
        self._tie()

    def _tie(self) -> None:
        """Concatenates gate's and up's buffers and makes theirs views of the result."""
        gate, up = self._role("gate"), self._role("up")
        names = ["weight", "weight_scale"] + (["bias"] if gate.bias is not None else [])
        n = gate.weight.shape[0]
        for name in names:
            cat = torch.cat([getattr(gate, name), getattr(up, name)])
            self.register_buffer(f"gate_up_{name}", cat, persistent=False)
            gate._buffers[name], up._buffers[name] = cat[:n], cat[n:]
        if gate.bias is None:
            self.gate_up_bias = None

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._tie()  # the children's buffers were moved one by one
        return out

    def _fused(self, x):
        down = self._role("down")
        q, s = fops.int8_dynamic_gated_linear(
            x,
            self.gate_up_weight,
            self.gate_up_weight_scale,
            self.gate_up_bias,
            self._role("gate").smooth_scale,
            activation=self.activation,
            quantize_output=True,
            output_smooth_scale=down.smooth_scale,
        )
        return self._down(q, s, x.dtype)
