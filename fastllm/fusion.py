"""Which modules of a model `fastllm.optimize(model, fuse=True)` replaces by fused ones.

Patterns are recognised from the module tree, never from a model's source: a container
module whose children are linear layers, at most one activation, at most one LayerNorm and
dropouts is matched by its children (one linear + activation: FusedDenseAct; one linear +
LayerNorm, forward(h, r): FusedDenseResidualNorm; two linears + activation: FusedMLP; three
+ activation: FusedGatedMLP), the activation by what it computes on a probe vector (GELU
exact or tanh, SiLU), and then the candidate is run against the container on a random
probe input: it is swapped in only if it computes what the container computes. RMSNorm
modules (a class named ...RMSNorm with a 1-D weight and an eps: in PyTorch, five to seven
ops) become one fastllm.ops.rms_norm, checked the same way; nn.LayerNorm stays (PyTorch's
layer_norm is one kernel already, and the fused containers call it after their epilogue).
Whatever does not match stays as it is, with the reason.

    (qualified name, kind, action, before, after, reason)   the report's entries:
    kind "norm" | "fused", action "swapped" | "skipped" | "kept"
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fastllm import distributed as _dist
from fastllm.nn import Int8Linear
from fastllm.nn.fused import (
    ACTIVATIONS,
    FusedDenseAct,
    FusedDenseResidualNorm,
    FusedGatedMLP,
    FusedMLP,
    FusedRMSNorm,
    _check_w8a8,
    _FusedContainer,
    _positional_params,
    rms_norm_eps,
)

FUSED_TYPES = (_FusedContainer, FusedRMSNorm)
# relative error (Frobenius) allowed between a fused module and the module it replaces on
# the probe input: float rounding, and an int8 step flipped now and then where the fused
# epilogue quantizes a value that the unfused path rounded to the other side of a step
_TOLERANCE = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 2e-2}


def is_rms_norm(m: nn.Module) -> bool:
    w = m._parameters.get("weight")
    return (
        type(m).__name__.lower().endswith("rmsnorm")
        and isinstance(w, torch.Tensor)
        and w.dim() == 1
        and list(m._parameters) == ["weight"]
        and not m._modules
        and rms_norm_eps(m) is not None
    )


def _is_linear(m: nn.Module) -> bool:
    name = type(m).__name__
    return isinstance(m, nn.Linear) or name == "Conv1D" or name.endswith("Linear")


def _is_leaf_function(m: nn.Module) -> bool:
    """A module with no state and no children (an activation, if anything)."""
    return not m._parameters and not m._buffers and not m._modules


def activation_name(m: nn.Module, device) -> str | None:
    """Which epilogue activation `m` computes ("gelu", "gelu_tanh", "silu"), found by
    running it on a probe vector; None for any other function (or one that fails)."""
    x = torch.linspace(-8.0, 8.0, 1601, device=device)
    try:
        with torch.no_grad():
            y = m(x.clone())
    except Exception:  # not a function of one tensor: not an activation the epilogue has
        return None
    if not isinstance(y, torch.Tensor) or y.shape != x.shape or y.dtype != x.dtype:
        return None
    for name, fn in ACTIVATIONS.items():
        if (y - fn(x)).abs().max().item() <= 1e-5:
            return name
    return None


def rel_error(got, want) -> float:
    """||got - want|| / ||want|| (Frobenius), in float32."""
    got, want = got.float(), want.float()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def _probe(original: nn.Module, fused, inputs) -> str | None:
    """None if `fused` computes what `original` does on `inputs`, else why not."""
    dtype = inputs[0].dtype
    if dtype not in _TOLERANCE:
        return f"dtype {dtype}: the fused ops take float32, float16 and bfloat16"
    try:
        with torch.no_grad():
            want = original(*inputs)
            got = fused(*inputs)
    except Exception as e:
        return f"the fused module fails on a probe input: {type(e).__name__}: {e}"
    if not (isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor)):
        return f"{type(original).__name__} does not return one tensor"
    if got.shape != want.shape:
        return f"output shape {tuple(got.shape)} differs from {tuple(want.shape)} on a probe input"
    err = rel_error(got, want)
    if not err <= _TOLERANCE[dtype]:
        return (
            f"output differs from {type(original).__name__}'s on a probe input "
            f"(relative error {err:.3g} > {_TOLERANCE[dtype]:g})"
        )
    return None


def _randn(*shape, device, dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


# --- containers ----------------------------------------------------------------------------


def _candidates(container: nn.Module) -> tuple[list, str | None]:
    """([(fused class, roles, activation)], why none) for a container whose children are
    linears, activations, a LayerNorm and dropouts; ([], None) for any other module."""
    lins, acts, norms = [], [], []
    for name, c in container.named_children():
        if _is_linear(c):
            lins.append(name)
        elif isinstance(c, nn.LayerNorm):
            norms.append(name)
        elif isinstance(c, nn.Dropout):
            continue
        elif _is_leaf_function(c):
            acts.append(name)
        else:
            return [], None
    children = dict(container.named_children())
    if not any(isinstance(children[n], Int8Linear) for n in lins):
        return [], None
    for n in lins:
        try:
            _check_w8a8(children[n], n)
        except ValueError as e:
            return [], str(e)
    device = children[lins[0]].weight.device
    act = None
    if len(acts) == 1:
        act = activation_name(children[acts[0]], device)
        if act is None:
            what = type(children[acts[0]]).__name__
            return [], f"its activation {what} is not one the epilogue computes {list(ACTIVATIONS)}"
    elif len(acts) > 1:
        return [], f"{len(acts)} stateless children {acts}; the patterns have one activation"
    shape = {n: tuple(children[n].weight.shape) for n in lins}  # (out, in)
    found = []
    if len(lins) == 1 and len(acts) == 1 and not norms:
        found.append((FusedDenseAct, {"linear": lins[0], "act": acts[0]}, act))
    elif len(lins) == 1 and len(norms) == 1 and not acts:
        found.append((FusedDenseResidualNorm, {"linear": lins[0], "norm": norms[0]}, None))
    elif len(lins) == 2 and len(acts) == 1 and not norms:
        for up, down in (lins, lins[::-1]):
            if shape[up][0] == shape[down][1]:
                found.append((FusedMLP, {"up": up, "act": acts[0], "down": down}, act))
    elif len(lins) == 3 and len(acts) == 1 and not norms:
        for down in lins:
            a, b = [n for n in lins if n != down]
            if shape[a] == shape[b] and shape[a][0] == shape[down][1]:
                for gate, up in ((a, b), (b, a)):
                    roles = {"gate": gate, "up": up, "act": acts[0], "down": down}
                    found.append((FusedGatedMLP, roles, act))
    if not found:
        what = f"{len(lins)} linear, {len(acts)} activation, {len(norms)} LayerNorm"
        return [], f"its children ({what}) match no fused pattern"
    return found, None


def _probe_inputs(cls, container, roles, model_dtype) -> tuple:
    children = dict(container.named_children())
    first = children[roles.get("linear") or roles.get("up") or roles["gate"]]
    device = first.weight.device
    dtype = first.bias.dtype if first.bias is not None else model_dtype
    if cls is FusedDenseResidualNorm:
        dtype = children[roles["norm"]].weight.dtype
    x = _randn(2, 3, first.in_features, device=device, dtype=dtype, seed=0)
    if cls is FusedDenseResidualNorm:
        return x, _randn(2, 3, first.out_features, device=device, dtype=dtype, seed=1)
    return (x,)


def _fuse_container(container, found, model_dtype, changes):
    """(fused module or None, reason), trying the candidates `found` in turn."""
    n_inputs = len([p for p in _positional_params(container) if p.default is p.empty])
    problems = []
    # FusedGatedMLP makes the children's buffers views of its own: put back unless it is
    # kept, and when optimize undoes its changes
    saved = [(m, dict(m._buffers)) for m in container.children()]

    def restore():
        for m, buffers in saved:
            m._buffers.update(buffers)

    for cls, roles, act in found:
        if n_inputs != cls.N_INPUTS:
            problems.append(f"its forward takes {n_inputs} tensors, {cls.__name__} {cls.N_INPUTS}")
            continue
        try:
            fused = cls(container, roles, act)
            why = _probe(container, fused._fused, _probe_inputs(cls, container, roles, model_dtype))
        except ValueError as e:
            why = str(e)
        if why is None:
            changes.on_undo(restore)
            return fused, None
        restore()
        problems.append(why)
    return None, "; ".join(dict.fromkeys(problems))


def _fuse_norm(norm: nn.Module, model_dtype):
    """(fused norm or None, reason)."""
    w = norm._parameters.get("weight")
    if not isinstance(w, torch.Tensor):
        return None, "no weight"
    if _dist.is_dtensor(w):
        return None, "its weight is a DTensor (fused norms take local tensors)"
    if w.dtype not in _TOLERANCE:
        return None, f"weight dtype {w.dtype}"
    try:
        fused = FusedRMSNorm.from_module(norm)
    except ValueError as e:
        return None, str(e)
    x = _randn(2, 3, w.shape[0], device=w.device, dtype=w.dtype, seed=2)
    why = _probe(norm, fused, (x,))
    return (fused, None) if why is None else (None, why)


# --- the pass ------------------------------------------------------------------------------


def fuse(
    model: nn.Module,
    filter_fn: Callable[[str, nn.Module], bool] | None,
    changes,
    seen: set[str],
) -> list[tuple]:
    """Swaps the fused modules into `model` in place (each swap through
    ``changes.setattr``, so that optimize can undo it); returns the report entries. `seen`:
    names the report has already (their "kept" entries are not repeated)."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    entries: list[tuple] = []

    def walk(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            full = f"{prefix}.{name}" if prefix else name
            before = type(child).__name__
            if isinstance(child, FUSED_TYPES):
                if full not in seen:
                    kind = "fused" if isinstance(child, _FusedContainer) else "norm"
                    entries.append((full, kind, "kept", before, None, None))
                walk(child, full)
                continue
            if type(child).__module__.startswith("fastllm.nn"):
                continue
            norm = is_rms_norm(child)
            found, why = ([], None) if norm else _candidates(child)
            if norm or found or why:
                kind = "norm" if norm else "fused"
                changes.at(full, "calling filter_fn")
                if filter_fn is not None and not filter_fn(full, child):
                    entries.append(
                        (full, kind, "skipped", before, None, "filtered out by filter_fn")
                    )
                    continue
                changes.at(full, "building and checking the fused module")
                if norm:
                    new, why = _fuse_norm(child, dtype)
                elif found:
                    new, why = _fuse_container(child, found, dtype, changes)
                else:
                    new = None
                if new is None:
                    entries.append((full, kind, "skipped", before, None, why))
                    if not norm:
                        walk(child, full)
                    continue
                changes.at(full, f"swapping in {type(new).__name__}")
                changes.setattr(parent, name, new)
                what = (
                    f"{new.activation} in the epilogue"
                    if getattr(new, "activation", None)
                    else None
                )
                entries.append((full, kind, "swapped", before, type(new).__name__, what))
                walk(new, full)
                continue
            walk(child, full)

    walk(model, "")
    return entries
