"""SmoothQuant: move activation outliers into the weights before int8 quantization.

    amax = fastllm.quant.calibrate(model, batches)      # per-input-channel max |x| per Linear
    result = fastllm.quant.smooth(model, amax, alpha=0.5)
    print(result)                                         # what was folded, kept or skipped
    fastllm.quant.quantize(model, "w8a8", smoothing=result)

For a linear layer y = x Wᵀ, per input channel j:

    s_j = amax(|x_j|)^α / amax(|W[:, j]|)^(1-α)
    y = (x / s) (W · s)ᵀ                                  (exact in real arithmetic)

so the activation's outlier channels shrink and the weight's grow, which splits the
quantization difficulty between them (Xiao et al., 2022).

Where a LayerNorm/RMSNorm's output feeds only linear layers, 1/s is folded into the
norm's weight (and bias) and s into each of those layers' weights: the float model
computes the same function and nothing runs at inference time. The layers sharing one
norm share one s (from the largest activation and weight ranges among them). Which
norm feeds which layers is read from a torch.fx trace of the model (norms and linears
kept as leaves) or, where torch.fx fails and an example batch is given, from one
observed forward pass (hooks and a TorchFunctionMode, matching tensors by identity), so
no model-specific code is needed; each fold is checked on a probe input (the norm's
output must scale by exactly 1/s), and undone where it does not.

Layers without such a norm (attention output, MLP down projection, or any layer of a
model that could not be analysed) are left alone, or, with ``unfoldable="runtime"``, get
their s as ``Int8Linear.smooth_scale`` (the input is divided by s at run time).

Under tensor parallelism (layers sharded by torch.distributed, fastllm.distributed) s is
the whole layer's on every rank: activation maxima come whole from
fastllm.calibration, the weight's per-input-channel maximum is taken over all ranks
(one all-reduce per column-wise layer), and each rank scales the columns it holds.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from fastllm import distributed
from fastllm.calibration import InputStats, collect_input_stats


def calibrate(
    model: nn.Module,
    batches: Iterable,
    *,
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
) -> dict[str, torch.Tensor]:
    """{qualified name: amax (float32 (in_features,))} for every nn.Linear of ``model``:
    the maximum |x_j| over all tokens of ``batches`` of each input channel.

    Built on fastllm.calibration.collect_input_stats (forward hooks, no model-specific
    code); batches and filter_fn are passed as documented there."""
    stats = collect_input_stats(model, batches, filter_fn=filter_fn)
    return {name: s.amax for name, s in stats.items()}


@dataclass
class SmoothResult:
    """What ``smooth`` did, per qualified linear-layer name.

    scales:  s (float32 (in_features,)) of every smoothed layer, folded or run-time
    folded:  layer -> the norm that absorbed 1/s (the layer's weight was multiplied by s)
    runtime: layer -> why s could not be folded; pass ``runtime_scale(name)`` as
             Int8Linear's smooth_scale (``quantize(..., smoothing=result)`` does)
    skipped: layer -> why it was left unsmoothed
    """

    alpha: float
    scales: dict[str, torch.Tensor] = field(default_factory=dict)
    folded: dict[str, str] = field(default_factory=dict)
    runtime: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def runtime_scale(self, name: str) -> torch.Tensor | None:
        """The smooth_scale to give Int8Linear.from_linear for layer `name`: s where it
        is kept for run time, None where it was folded (the weight already holds s) or
        not applied."""
        return self.scales[name] if name in self.runtime else None

    def get(self, name: str, default=None) -> torch.Tensor | None:
        """Like dict.get over the run-time smooth scales (``runtime_scale``)."""
        s = self.runtime_scale(name)
        return default if s is None else s

    def __str__(self) -> str:
        lines = [
            f"SmoothQuant alpha={self.alpha}: {len(self.folded)} folded into a norm, "
            f"{len(self.runtime)} smoothed at run time, {len(self.skipped)} not smoothed"
        ]
        lines += [f"  folded   {n} <- {norm}" for n, norm in self.folded.items()]
        lines += [f"  run time {n}: {why}" for n, why in self.runtime.items()]
        lines += [f"  skipped  {n}: {why}" for n, why in self.skipped.items()]
        return "\n".join(lines)


# --- which norm feeds which linears ----------------------------------------------------


def _is_norm(module: nn.Module) -> bool:
    """LayerNorm, RMSNorm and look-alikes (a class whose name says Norm, with a 1-D
    weight); batch, group and instance norms normalize over other dimensions."""
    name = type(module).__name__.lower()
    if "norm" not in name or any(k in name for k in ("batch", "group", "instance")):
        return False
    # read _parameters directly: under torch.fx tracing, attribute access gives proxies
    w = module._parameters.get("weight")
    return isinstance(w, torch.Tensor) and w.dim() == 1


class _LeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, nn.Linear) or _is_norm(m) or super().is_leaf_module(m, qualname)


@dataclass
class _Flow:
    """What feeds what: per linear, how often it ran and the norm module its input came
    straight from (or why not); per norm, how often it ran and its first consumer that
    is not a linear layer's input."""

    linear_calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    linear_src: dict[str, str | None] = field(default_factory=dict)
    linear_why: dict[str, str] = field(default_factory=dict)
    norm_calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    norm_other_use: dict[str, str] = field(default_factory=dict)


def _flow_by_fx(model: nn.Module) -> _Flow:
    """From a torch.fx trace (norms and linears kept as leaves); raises what torch.fx
    raises on a model it cannot trace."""
    graph = _LeafTracer().trace(model)
    modules = dict(model.named_modules())
    flow = _Flow()
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        mod = modules.get(node.target)
        if _is_norm(mod):
            flow.norm_calls[node.target] += 1
            for u in node.users:
                linear_input = (
                    u.op == "call_module"
                    and isinstance(modules.get(u.target), nn.Linear)
                    and u.args[0] is node
                    and node not in (*u.args[1:], *u.kwargs.values())
                )
                if not linear_input:
                    what = getattr(u.target, "__name__", u.target)
                    flow.norm_other_use.setdefault(node.target, f"{u.name} ({u.op} {what})")
        elif isinstance(mod, nn.Linear):
            flow.linear_calls[node.target] += 1
            src = node.args[0] if node.args else None
            if isinstance(src, torch.fx.Node) and src.op == "call_module":
                if _is_norm(modules[src.target]):
                    flow.linear_src[node.target] = src.target
                else:
                    kind = type(modules[src.target]).__name__
                    flow.linear_why[node.target] = (
                        f"its input comes from {src.target} ({kind}), not a LayerNorm/RMSNorm"
                    )
            else:
                flow.linear_why[node.target] = "its input does not come straight from a norm module"
    return flow


def _flow_by_running(model: nn.Module, example) -> _Flow:
    """From one forward pass on `example`: forward hooks note each norm's output tensor
    and each linear's input tensor, and a TorchFunctionMode sees every op that reads a
    norm's output; tensors are matched by identity. Only the path taken is seen."""
    from torch.overrides import TorchFunctionMode

    from fastllm.calibration import _run_batch

    flow = _Flow()
    outputs: dict[int, tuple[str, torch.Tensor]] = {}  # id -> (norm, tensor kept alive)
    in_linear: list[str] = []

    def norm_hook(name):
        def hook(module, args, out):
            flow.norm_calls[name] += 1
            if isinstance(out, torch.Tensor):
                outputs[id(out)] = (name, out)

        return hook

    def linear_pre(name):
        def hook(module, args):
            flow.linear_calls[name] += 1
            x = args[0] if args else None
            hit = outputs.get(id(x))
            if hit is not None and hit[1] is x:
                flow.linear_src[name] = hit[0]
            else:
                flow.linear_why[name] = "its input does not come straight from a norm module"
            in_linear.append(name)

        return hook

    def linear_post(module, args, out):
        in_linear.pop()

    def first_tensor_arg(args, kwargs):
        return args[0] if args else kwargs.get("input")

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            if not isinstance(out, torch.Tensor | tuple | list):
                return out  # metadata reads (shape, size, dim) use no values
            leaves = [*args, *kwargs.values()]
            for t in leaves:
                hit = outputs.get(id(t)) if isinstance(t, torch.Tensor) else None
                if hit is None or hit[1] is not t:
                    continue
                as_input = in_linear and func is F.linear and first_tensor_arg(args, kwargs) is t
                if not as_input:
                    name = getattr(func, "__name__", str(func))
                    flow.norm_other_use.setdefault(hit[0], name)
            return out

    handles = []
    for name, module in model.named_modules():
        if _is_norm(module):
            handles.append(module.register_forward_hook(norm_hook(name)))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_pre_hook(linear_pre(name)))
            handles.append(module.register_forward_hook(linear_post))
    try:
        with torch.no_grad(), Watch():
            _run_batch(model, example)
    finally:
        for h in handles:
            h.remove()
    return flow


def _norm_groups(flow: _Flow, how: str) -> tuple[dict[str, list[str]], dict[str, str]]:
    """({norm: [linears fed only by it]}, {linear: why it has no foldable norm})."""
    groups: dict[str, list[str]] = {}
    why_not: dict[str, str] = {}
    for name, n_calls in flow.linear_calls.items():
        src = flow.linear_src.get(name)
        if n_calls > 1:
            why_not[name] = f"called {n_calls} times in the {how}"
        elif src is None:
            why_not[name] = flow.linear_why.get(name, "its input does not come from a norm")
        elif flow.norm_calls[src] > 1:
            why_not[name] = f"its norm {src} is called more than once"
        elif src in flow.norm_other_use:
            why_not[name] = (
                f"its norm {src} also feeds something other than a linear layer's input "
                f"({flow.norm_other_use[src]})"
            )
        else:
            groups.setdefault(src, []).append(name)
    # a norm with one unfoldable consumer cannot be folded for the others either
    for norm, names in list(groups.items()):
        if any(n in why_not for n in names):
            del groups[norm]
            for n in names:
                why_not.setdefault(n, f"its norm {norm} feeds a layer that cannot be folded")
    return groups, why_not


# --- smoothing -------------------------------------------------------------------------


def _amax(stats, name: str) -> torch.Tensor:
    v = stats[name]
    return (v.amax if isinstance(v, InputStats) else v).detach().float().cpu()


def _smooth_factor(act_amax: torch.Tensor, w_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    s = act_amax.pow(alpha) / w_amax.pow(1 - alpha)
    # a channel never active (or a weight column of zeros) carries no information: keep it
    s = torch.where((act_amax > 0) & (w_amax > 0), s, torch.ones_like(s))
    return s.clamp(1e-5, 1e5)


@torch.no_grad()
def _fold(norm: nn.Module, linears: list[nn.Linear], s: torch.Tensor) -> str | None:
    """Divides the norm's affine parameters by s and multiplies the linears' weight
    columns by s; checks on a probe that the norm's output scaled by 1/s. On failure,
    restores everything and returns why."""
    w = norm.weight
    b = getattr(norm, "bias", None)
    b = b if isinstance(b, torch.Tensor) and b.shape == w.shape else None
    sd = s.to(device=w.device)
    gen = torch.Generator(device=w.device).manual_seed(0)  # leaves the global RNG alone
    probe = torch.randn(4, w.shape[0], generator=gen, device=w.device).to(w.dtype)
    saved = [t.detach().clone() for t in (w, b) if t is not None]
    try:
        before = norm(probe).float()
        w.copy_(w.float() / sd)
        if b is not None:
            b.copy_(b.float() / sd)
        after = norm(probe).float()
    except Exception as e:  # the probe's shape or dtype does not suit this module
        for t, old in zip([t for t in (w, b) if t is not None], saved):
            t.copy_(old)
        return f"its norm could not be probed ({type(e).__name__}: {e})"
    tol = 1e-4 if w.dtype == torch.float32 else 2e-2
    err = (after * sd - before).norm() / before.norm().clamp_min(1e-30)
    if not err <= tol:
        for t, old in zip([t for t in (w, b) if t is not None], saved):
            t.copy_(old)
        return (
            f"its norm {type(norm).__name__} does not scale its output by 1/s when its "
            "weight is divided by s (not of the form f(x) * weight + bias)"
        )
    for lin in linears:
        shard = distributed.linear_shard(lin)
        cols = sd if shard is None else shard.in_slice(sd)  # the columns this rank holds
        w = distributed.local(lin.weight)
        w.copy_(w.float() * cols.to(w.device)[None, :])
    return None


@torch.no_grad()
def smooth(
    model: nn.Module,
    stats: dict[str, torch.Tensor | InputStats],
    alpha: float = 0.5,
    *,
    unfoldable: str = "skip",
    example=None,
) -> SmoothResult:
    """Migrates activation outliers of the linear layers named in ``stats`` into their
    weights (module docstring), in place.

    Args:
        model: the float model (nn.Linear layers; the one ``stats`` were calibrated on).
        stats: {qualified linear name: amax (in_features,)} from ``calibrate``, or the
            InputStats of fastllm.calibration.collect_input_stats.
        alpha: migration strength in [0, 1]; 0.5 is the usual choice, larger moves more
            of the range into the weights.
        unfoldable: for a layer without a norm to fold into, "skip" leaves it alone,
            "runtime" records its s for Int8Linear.smooth_scale (the model is unchanged).
        example: one batch (passed as calibrate passes batches). Where torch.fx cannot
            trace the model, one forward pass on it finds which norm feeds which layers
            (matching tensors by identity); without it such a model is not folded.

    Returns:
        a SmoothResult saying, per layer, whether s was folded, kept for run time, or why
        the layer was skipped. The model's float output is unchanged up to rounding.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha is {alpha!r}; expected a number in [0, 1]")
    if unfoldable not in ("skip", "runtime"):
        raise ValueError(f"unfoldable is {unfoldable!r}; expected 'skip' or 'runtime'")
    if not isinstance(stats, dict):
        raise TypeError(f"stats must be a dict name -> amax, got {type(stats).__name__}")
    modules = dict(model.named_modules())
    for name in stats:
        lin = modules.get(name)
        if not isinstance(lin, nn.Linear):
            raise ValueError(f"stats has an entry {name!r}, which is not an nn.Linear of model")
        amax = _amax(stats, name)
        if tuple(amax.shape) != (lin.in_features,):
            raise ValueError(
                f"stats[{name!r}] has shape {tuple(amax.shape)}; expected "
                f"({lin.in_features},), the in_features of that layer"
            )

    result = SmoothResult(alpha=float(alpha))
    flow, how, fx_error = None, "", ""
    try:
        flow, how = _flow_by_fx(model), "traced graph"
    except Exception as e:  # torch.fx cannot trace data-dependent control flow, etc.
        fx_error = f"torch.fx could not trace the model ({type(e).__name__}: {str(e)[:200]})"
        if example is not None:
            flow, how = _flow_by_running(model, example), "forward pass on the example"
    if flow is not None:
        groups, why_not = _norm_groups(flow, how)
    else:
        groups = {}
        reason = fx_error + "; pass example= to find the norms by running the model"
        why_not = {name: reason for name in stats}

    def w_amax(lin: nn.Linear) -> torch.Tensor:  # max |W[:, j]| of the whole layer
        return distributed.column_amax(lin)

    for norm_name, names in groups.items():
        missing = [n for n in names if n not in stats]
        if missing:
            for n in names:
                why_not[n] = f"{missing[0]}, which shares its norm {norm_name}, has no stats"
            continue
        linears = [modules[n] for n in names]
        act = torch.stack([_amax(stats, n) for n in names]).amax(0)
        wmax = torch.stack([w_amax(lin) for lin in linears]).amax(0)
        s = _smooth_factor(act, wmax, alpha)
        problem = _fold(modules[norm_name], linears, s)
        if problem is not None:
            for n in names:
                why_not[n] = problem
            continue
        for n in names:
            result.scales[n] = s
            result.folded[n] = norm_name

    for name in stats:
        if name in result.folded:
            continue
        reason = why_not.get(name, "it was not called in the traced graph")
        if unfoldable == "runtime":
            result.scales[name] = _smooth_factor(_amax(stats, name), w_amax(modules[name]), alpha)
            result.runtime[name] = reason
        else:
            result.skipped[name] = reason
    return result


def quantize(
    model: nn.Module,
    mode: str = "w8a8",
    *,
    smoothing: SmoothResult | None = None,
    filter_fn: Callable[[str, nn.Linear], bool] | None = None,
) -> list[str]:
    """Replaces every nn.Linear of ``model`` (where filter_fn(name, module) is true) by
    fastllm.nn.Int8Linear in ``mode``, in place, with the run-time smooth scales of
    ``smoothing``. Returns the names replaced."""
    from fastllm.nn.int8 import Int8Linear

    replaced = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and (filter_fn is None or filter_fn(full, child)):
                s = smoothing.runtime_scale(full) if smoothing is not None else None
                setattr(module, child_name, Int8Linear.from_linear(child, mode, smooth_scale=s))
                replaced.append(full)
    return replaced
