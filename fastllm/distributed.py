"""Tensor parallelism: fastllm's layers on each rank's shard of a model that
torch.distributed sharded.

fastllm has no collective layer, launcher or sharding format of its own. A model is
sharded by the engines that exist, and fastllm swaps each rank's shard:

    # transformers' own plan (each model's base_model_tp_plan), under torchrun
    model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto")
    model = fastllm.optimize(model, linear="w8a8", calibration=batches)
    model.generate(...)                        # the same tokens on every rank

    # a model without a plan: a plan in transformers' format and a DeviceMesh
    fastllm.distributed.parallelize(bert, mesh=mesh)          # the shipped BERT plan
    fastllm.distributed.parallelize(encoder, {"layers.*.linear1": "colwise",
                                              "layers.*.linear2": "rowwise"}, mesh)

    # torch.distributed.tensor.parallel.parallelize_module(model, mesh, {...}) works too

How a sharded layer is recognised: its weight is a DTensor over a 1-D mesh, Shard(0)
("colwise": this rank holds some output features, the input is replicated) or Shard(1)
("rowwise": it holds some input features, the outputs are partial sums). The engine
that sharded it attached the input/output handling to the module: transformers
(`TensorParallelLayer.install_forward`, the style looked up in the model's `_tp_plan`)
or torch (`distribute_module`'s forward hooks). The fastllm module built for the shard
computes on local tensors, records how it is sharded in its `tp` attribute (a
LinearShard), and gets the same handling: the transformers style installed on it
again, or torch's hooks carried over.

The contract of a sharded fastllm module is that of nn.Linear with DTensor parameters:
a DTensor input gives a DTensor output. Column-wise: the local output features, as
Shard(-1). Row-wise: the local partial sums, all-reduced after the epilogue (a
functional collective, so that torch.compile traces it), then the bias added once,
as Replicate. The engine's output handling then lays it out as its style says.

Setting a model up (optimize, save, load, parallelize) is checked before anything is
changed, the same way on every rank; then the ranks agree that they all run the same
step, and every collective fastllm issues while setting up waits at most
FASTLLM_TP_TIMEOUT seconds (300), so that a rank that fails makes the others fail rather
than wait forever. The collectives inside a forward pass are bounded by the process
group's own timeout (init_process_group(timeout=...)); launchers (torchrun) stop the
other ranks when one exits with an error.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn


def setup_timeout() -> float:
    """FASTLLM_TP_TIMEOUT in seconds (default 300), read when a set-up step runs: a bad
    value is an error of that step, never of `import fastllm`."""
    raw = os.environ.get("FASTLLM_TP_TIMEOUT", "300")
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"FASTLLM_TP_TIMEOUT={raw!r}; expected a number of seconds > 0")
    return value


COLWISE, ROWWISE = "colwise", "rowwise"

# The plan fastllm ships for BERT-type encoders (BertModel and its heads; MiniLM,
# all-MiniLM-L6-v2 among them), in transformers' format, relative to the base model:
# q, k, v split by heads, the attention output projection joins them; the MLP's first
# layer split by columns, its second by rows. Two all-reduces per layer.
BERT_PLAN = {
    "encoder.layer.*.attention.self.query": "colwise",
    "encoder.layer.*.attention.self.key": "colwise",
    "encoder.layer.*.attention.self.value": "colwise",
    "encoder.layer.*.attention.output.dense": "rowwise",
    "encoder.layer.*.intermediate.dense": "colwise",
    "encoder.layer.*.output.dense": "rowwise",
}
# model_type of a transformers config -> the plan fastllm ships for it
PLANS = {"bert": BERT_PLAN}


# --- tensors ------------------------------------------------------------------------------


def available() -> bool:
    return torch.distributed.is_available()


def is_dtensor(t) -> bool:
    # no DTensor exists before torch.distributed.tensor is imported: not imported here
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local(t):
    """The tensor this rank holds: a DTensor's local shard, any other tensor itself."""
    return t.to_local() if is_dtensor(t) else t


def chunk_ranges(size: int, parts: int) -> tuple[tuple[int, int], ...]:
    """[start, stop) of each of `parts` shards of `size` elements, as DTensor's Shard
    splits a dimension (torch.chunk: the first shards ceil(size / parts) long, the
    last shorter, possibly empty)."""
    step = -(-size // parts)
    return tuple((min(i * step, size), min((i + 1) * step, size)) for i in range(parts))


def _contiguous_stride(shape) -> tuple[int, ...]:
    stride, acc = [], 1
    for d in reversed(shape):
        stride.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(stride))


# --- collectives while setting up: bounded waits --------------------------------------------


def _wait(work, what: str) -> None:
    try:
        work.wait(timeout=datetime.timedelta(seconds=setup_timeout()))
    except RuntimeError as e:
        if "timed out" not in str(e).lower() and "timeout" not in str(e).lower():
            raise RuntimeError(f"fastllm tensor parallel: {what}: {e}") from e
        raise RuntimeError(
            f"fastllm tensor parallel: {what}: the other ranks did not take part within "
            f"{setup_timeout():g} s (FASTLLM_TP_TIMEOUT); a rank failed or is not running the same "
            f"step ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from e


def all_reduce_max(t: torch.Tensor, mesh, what: str) -> torch.Tensor:
    """Elementwise maximum of `t` over the ranks of `mesh` (in place; returned)."""
    import torch.distributed as dist

    t = t.contiguous()
    _wait(dist.all_reduce(t, op=dist.ReduceOp.MAX, group=mesh.get_group(), async_op=True), what)
    return t


def gather_pieces(t: torch.Tensor, mesh, what: str, dst: int | None = None):
    """Every rank's `t` (same dtype and number of dimensions, any shapes), in mesh order:
    on every rank (dst=None), or only on mesh rank `dst` (the others get None)."""
    import torch.distributed as dist

    group = mesh.get_group()
    n = mesh.size()
    dtype, t = t.dtype, t.contiguous()
    shape = torch.tensor(list(t.shape), dtype=torch.int64, device=t.device)
    shapes = [torch.empty_like(shape) for _ in range(n)]
    _wait(dist.all_gather(shapes, shape, group=group, async_op=True), what + " (shapes)")
    shapes = [tuple(int(v) for v in s.tolist()) for s in shapes]
    # sent as bytes: gloo takes no int8, int16 or bool tensors
    width = t.element_size()
    numels = [int(torch.Size(s).numel()) * width for s in shapes]
    biggest = max(numels)
    flat = t.reshape(-1).view(torch.uint8)
    if flat.numel() < biggest:
        flat = torch.cat([flat, flat.new_zeros(biggest - flat.numel())])
    me = mesh.get_local_rank()
    if dst is None:
        out = [torch.empty_like(flat) for _ in range(n)]
        _wait(dist.all_gather(out, flat, group=group, async_op=True), what)
    else:
        out = [torch.empty_like(flat) for _ in range(n)] if me == dst else None
        group_dst = dist.get_global_rank(group, dst)
        _wait(dist.gather(flat, out, dst=group_dst, group=group, async_op=True), what)
        if out is None:
            return None
    return [o[:k].view(dtype).view(s) for o, k, s in zip(out, numels, shapes)]


def gather_cat(t: torch.Tensor, mesh, dim: int, what: str, dst: int | None = None):
    """The ranks' `t` concatenated along `dim` (None on ranks other than `dst`)."""
    pieces = gather_pieces(t, mesh, what, dst)
    return None if pieces is None else torch.cat(pieces, dim=dim)


def barrier(mesh, what: str) -> None:
    all_reduce_max(torch.zeros(1, device=_mesh_device(mesh)), mesh, what)


def _mesh_device(mesh) -> torch.device:
    if mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(mesh.device_type)


def agree(mesh, what: str, signature: str) -> None:
    """Every rank of `mesh` is at step `what` with the same `signature` (a text that
    says what the step will do), or RuntimeError on every rank, within FASTLLM_TP_TIMEOUT."""
    digest = int.from_bytes(hashlib.sha256(signature.encode()).digest()[:7], "little")
    mine = torch.tensor([digest], dtype=torch.int64, device=_mesh_device(mesh))
    every = gather_pieces(mine, mesh, f"{what}: checking that every rank runs it")
    values = [int(v) for v in every]
    if len(set(values)) > 1:
        odd = [i for i, v in enumerate(values) if v != values[0]]
        raise RuntimeError(
            f"fastllm tensor parallel: {what}: the ranks were called with different arguments "
            f"or models (mesh ranks {odd} differ from rank 0); call it with the same ones on "
            "every rank"
        )


def require_process_group(what: str) -> None:
    if not available() or not torch.distributed.is_initialized():
        raise RuntimeError(
            f"{what}: torch.distributed has no process group; run under torchrun (or "
            "torch.distributed.run), or call torch.distributed.init_process_group first"
        )


# --- how a linear layer is sharded ----------------------------------------------------------


@dataclass(eq=False)
class LinearShard:
    """This rank's part of a linear layer y = x Wᵀ + b sharded over a 1-D mesh.

    style:        "colwise" (rows of W: some output features) or "rowwise" (columns of
                  W: some input features; the outputs are partial sums)
    in_features, out_features: the whole layer's
    ranges:       [start, stop) of every mesh rank along the sharded dimension
    rank:         this process's place in the mesh
    """

    style: str
    mesh: object
    in_features: int
    out_features: int
    ranges: tuple[tuple[int, int], ...]
    rank: int

    @property
    def size(self) -> int:
        return len(self.ranges)

    @property
    def dim(self) -> int:
        """The dimension of W (out, in) that is sharded."""
        return 0 if self.style == COLWISE else 1

    @property
    def start(self) -> int:
        return self.ranges[self.rank][0]

    @property
    def stop(self) -> int:
        return self.ranges[self.rank][1]

    @property
    def local_in(self) -> int:
        return self.stop - self.start if self.style == ROWWISE else self.in_features

    @property
    def local_out(self) -> int:
        return self.stop - self.start if self.style == COLWISE else self.out_features

    def in_slice(self, v: torch.Tensor | None) -> torch.Tensor | None:
        """This rank's part of a per-input-feature vector of the whole layer."""
        if v is None or self.style == COLWISE:
            return v
        return v[self.start : self.stop]

    def out_slice(self, v: torch.Tensor | None) -> torch.Tensor | None:
        """This rank's part of a per-output-feature vector of the whole layer."""
        if v is None or self.style == ROWWISE:
            return v
        return v[self.start : self.stop]

    def row_max(self, v: torch.Tensor) -> torch.Tensor:
        """Per output feature, the maximum of `v` over the ranks that hold the other
        input features of the same rows (rowwise: one all-reduce; colwise: v)."""
        if self.style == COLWISE:
            return v
        return all_reduce_max(v.clone(), self.mesh, "per-output-channel maximum")

    def __call__(self, x, forward: Callable, bias):
        """The sharded forward of a fastllm linear module: forward(x_local, bias) computes
        on local tensors. A DTensor input gives a DTensor output (module docstring)."""
        from torch.distributed.tensor import DTensor, Replicate, Shard

        as_dtensor = isinstance(x, DTensor)
        if as_dtensor:
            p = x.placements[0]
            if self.style == COLWISE and not p.is_replicate():
                x = x.redistribute(placements=[Replicate()])
            elif self.style == ROWWISE and not p.is_shard(x.dim() - 1):
                x = x.redistribute(placements=[Shard(x.dim() - 1)])
            x = x.to_local()
        if self.style == COLWISE:
            y = forward(x, bias)
            if as_dtensor:
                shape = (*y.shape[:-1], self.out_features)
                y = DTensor.from_local(
                    y, self.mesh, [Shard(y.dim() - 1)], run_check=False, shape=shape,
                    stride=_contiguous_stride(shape),
                )  # fmt: skip
            return y
        # row-wise: partial sums; the reduction after the epilogue, then the bias once
        y = _all_reduce_sum(forward(x, None), self.mesh)
        if bias is not None:
            y = y + bias.to(y.dtype)
        if as_dtensor:
            y = DTensor.from_local(y, self.mesh, [Replicate()], run_check=False)
        return y

    def __repr__(self) -> str:
        what = "output" if self.style == COLWISE else "input"
        return (
            f"{self.style} {self.rank}/{self.size}: {what} features "
            f"[{self.start}:{self.stop}] of {self.in_features}->{self.out_features}"
        )

    def __deepcopy__(self, memo):
        return self  # the mesh belongs to the process; the description does not change


def _all_reduce_sum(y: torch.Tensor, mesh) -> torch.Tensor:
    import torch.distributed._functional_collectives as funcol

    y = funcol.all_reduce(y, "sum", mesh)
    if isinstance(y, funcol.AsyncCollectiveTensor):  # eager mode; traced graphs wait inline
        y = y.wait()
    return y


def linear_shard(module: nn.Module, name: str = "") -> LinearShard | None:
    """How `module` (nn.Linear, or a module with a 2-D `weight`) is sharded, or None if its
    weight is not a DTensor. ValueError for layouts fastllm does not take."""
    w = module._parameters.get("weight")
    if w is None:
        w = getattr(module, "weight", None)
    b = module._parameters.get("bias")
    if not is_dtensor(w):
        if is_dtensor(b):
            raise ValueError(
                f"layer {name!r}: its bias is a DTensor but its weight is not; a model "
                "sharded some other way than by a tensor-parallel plan"
            )
        return None
    where = f"layer {name!r}" if name else type(module).__name__
    from torch.distributed.tensor import Replicate, Shard

    mesh = w.device_mesh
    if mesh.ndim != 1:
        raise ValueError(
            f"{where}: its weight is sharded over a {mesh.ndim}-D mesh; fastllm takes layers "
            "sharded over one mesh dimension (tensor parallelism)"
        )
    if w.dim() != 2:
        raise ValueError(f"{where}: weight of {w.dim()} dimensions; expected 2 (out, in)")
    (p,) = w.placements
    if type(p) is Shard and p.dim % 2 in (0, 1):
        style = COLWISE if p.dim % 2 == 0 else ROWWISE
    elif isinstance(p, Replicate):
        return None  # every rank holds the whole layer
    else:
        raise ValueError(
            f"{where}: its weight has placement {p}; fastllm swaps layers sharded Shard(0) "
            "(colwise) or Shard(1) (rowwise), not packed or strided layouts"
        )
    out_f, in_f = w.shape
    size = in_f if style == ROWWISE else out_f
    ranges = chunk_ranges(size, mesh.size())
    rank = mesh.get_local_rank()
    if w.to_local().shape[p.dim % 2] != ranges[rank][1] - ranges[rank][0]:
        raise ValueError(
            f"{where}: its local shard has shape {tuple(w.to_local().shape)}, not the part "
            f"{ranges[rank]} of a Shard({p.dim}) split of {tuple(w.shape)} over {mesh.size()} ranks"
        )
    want_bias = Shard(0) if style == COLWISE else Replicate()
    if b is not None and is_dtensor(b) and b.placements != (want_bias,):
        raise ValueError(
            f"{where}: a {style} layer's bias should be {want_bias}, found {b.placements[0]}"
        )
    return LinearShard(style, mesh, in_f, out_f, ranges, rank)


def local_linear(module: nn.Module) -> nn.Linear:
    """An nn.Linear over this rank's shard of `module`'s weight and bias (the same
    memory, no copy)."""
    # rowwise: every rank holds the whole bias (added once, after the reduction)
    w, b = local(module.weight), local(module.bias)
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta", dtype=w.dtype)
    lin.weight = nn.Parameter(w.detach(), requires_grad=False)
    if b is not None:
        lin.bias = nn.Parameter(b.detach(), requires_grad=False)
    return lin


# --- the engines' input/output handling, carried over to a new module ------------------------


def _plan_style(model: nn.Module, name: str) -> str | None:
    """The style that a transformers-format `_tp_plan` (on `model` or a submodule) gives
    to module `name`."""
    from transformers.distributed.parallel_utils import replace_layer_number_by_wildcard

    for prefix, m in model.named_modules():
        plan = m.__dict__.get("_tp_plan")
        if not isinstance(plan, dict) or not plan:
            continue
        if prefix and not name.startswith(prefix + "."):
            continue
        rel = name[len(prefix) + 1 :] if prefix else name
        style = plan.get(replace_layer_number_by_wildcard(rel))
        if style is None:
            style = plan.get(rel)
        if style is not None:
            return style
    return None


def _torch_tp_hooks(module: nn.Module) -> bool:
    hooks = [*module._forward_pre_hooks.values(), *module._forward_hooks.values()]
    return any(getattr(h, "__qualname__", "").startswith("distribute_module.") for h in hooks)


@dataclass(eq=False)
class Handling:
    """How to give a new module the input/output handling of the sharded module it
    replaces: the transformers style installed again, or torch's hooks carried over."""

    engine: str  # "transformers" | "torch"
    style: object = None
    mesh: object = None
    old: nn.Module | None = None

    def attach(self, new: nn.Module) -> None:
        if self.engine == "transformers":
            out = getattr(self.style, "output_layouts", None)
            shard = getattr(new, "tp", None)
            if (
                shard is not None
                and shard.style == COLWISE
                and getattr(self.style, "use_local_output", False)
                and getattr(out, "is_shard", lambda: False)()
                and out.dim == -1
            ):
                # transformers' path for modules that compute on local tensors: the input
                # and the output stay plain tensors (no DTensor wrapping per call); without
                # it the module takes and gives DTensors, with the same result
                new._hf_quantized_needs_local_tp = True
            self.style.install_forward(new, self.mesh)
            return
        old = self.old
        for attr in ("_forward_pre_hooks", "_forward_hooks"):
            getattr(new, attr).update(getattr(old, attr))
        new._forward_pre_hooks_with_kwargs.update(old._forward_pre_hooks_with_kwargs)
        new._forward_hooks_with_kwargs.update(old._forward_hooks_with_kwargs)
        new._forward_hooks_always_called.update(old._forward_hooks_always_called)


def handling(model: nn.Module, name: str, module: nn.Module, shard: LinearShard) -> Handling:
    """How `module` (sharded as `shard`) got its input/output handling; ValueError for a
    module sharded some other way."""
    if "forward" in module.__dict__:  # transformers' TensorParallelLayer.install_forward
        style_name = _plan_style(model, name) if _transformers_loaded() else None
        if style_name is None:
            raise ValueError(
                f"layer {name!r} is sharded and its forward was replaced, but no tp_plan of "
                "the model names it; fastllm swaps layers sharded by transformers' tp_plan, "
                "fastllm.distributed.parallelize or torch's parallelize_module"
            )
        from transformers.distributed.tensor_parallel import ALL_PARALLEL_STYLES

        style = ALL_PARALLEL_STYLES[style_name]
        want = {COLWISE: "ColwiseParallel", ROWWISE: "RowwiseParallel"}[shard.style]
        if type(style).__name__ != want:
            raise ValueError(
                f"layer {name!r} has tp_plan style {style_name!r} ({type(style).__name__}); "
                f"its weight is sharded {shard.style}, which fastllm serves under {want} styles"
            )
        return Handling("transformers", style, shard.mesh)
    if _torch_tp_hooks(module):
        return Handling("torch", old=module)
    raise ValueError(
        f"layer {name!r} has a sharded weight but no tensor-parallel input/output handling "
        "(no transformers tp_plan style, no torch parallelize_module hooks): a model sharded "
        "some other way, which fastllm does not swap"
    )


def _transformers_loaded() -> bool:
    return "transformers" in sys.modules


# --- checks before anything is changed ------------------------------------------------------


def _head_dim(parent: nn.Module | None) -> int | None:
    for attr in ("head_dim", "attention_head_size"):
        v = getattr(parent, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def head_dims(model: nn.Module) -> dict[str, int]:
    """{module name: head_dim} of the attention modules of `model` (those with a
    head_dim or attention_head_size: transformers' attention layers,
    nn.MultiheadAttention, FusedMultiheadAttention)."""
    return {n: hd for n, m in model.named_modules() if (hd := _head_dim(m)) is not None}


def check_heads(shards: dict[str, LinearShard], dims: dict[str, int]) -> None:
    """ValueError where a shard boundary of an attention projection (a layer whose parent
    is in `dims`, head_dims) falls inside a head: a head count that does not divide by
    the TP size."""
    for name, shard in shards.items():
        hd = dims.get(name.rpartition(".")[0])
        if hd is None:
            continue
        heads = (shard.out_features if shard.style == COLWISE else shard.in_features) // hd
        cut = _first_cut(shard, hd)
        if cut is not None:
            rank, a, b = cut
            raise ValueError(
                f"layer {name!r}: {heads} attention heads (head_dim {hd}) do not divide by the "
                f"tensor-parallel size {shard.size}: rank {rank} would hold features [{a}:{b}], "
                "part of a head; use a TP size that divides the number of heads (and of "
                "key/value heads)"
            )


def _first_cut(shard: LinearShard, unit: int) -> tuple[int, int, int] | None:
    """(rank, start, stop) of the first rank whose features [start:stop) do not begin and
    end on a multiple of `unit`; None if every shard is whole units."""
    for rank, (a, b) in enumerate(shard.ranges):
        if a % unit or b % unit:
            return rank, a, b
    return None


def check_boundaries(name: str, shard: LinearShard, kind: str, block_size) -> None:
    """ValueError where a shard boundary breaks what `kind` stores as one unit: a 2:4
    group (4 input features) or a (rows, cols) sparse block."""
    if kind in ("2:4", "2:4+w8a8") and shard.style == ROWWISE:
        unit, what, along = 4, "a 2:4 group", "input features (groups of 4)"
    elif kind == "block":
        unit = block_size[0] if shard.style == COLWISE else block_size[1]
        what = f"a {block_size[0]}x{block_size[1]} sparse block"
        along = ("output" if shard.style == COLWISE else "input") + f" features (blocks of {unit})"
    else:
        return
    cut = _first_cut(shard, unit)
    if cut is not None:
        rank, a, b = cut
        raise ValueError(
            f"layer {name!r} ({shard.style}, {shard.size} ranks): rank {rank} holds {along} "
            f"[{a}:{b}], a shard boundary that breaks {what}; use a TP size for which every "
            "shard is a whole number of them, or skip the layer"
        )


def model_mesh(shards: Iterable[LinearShard]):
    """The one mesh the shards are on (ValueError for several)."""
    meshes = {(s.mesh.device_type, tuple(s.mesh.mesh.flatten().tolist())): s.mesh for s in shards}
    if len(meshes) > 1:
        raise ValueError(
            "the model's layers are sharded over different device meshes; fastllm takes a "
            "model sharded over one tensor-parallel mesh"
        )
    return next(iter(meshes.values()), None)


def model_is_sharded(model: nn.Module) -> bool:
    return any(is_dtensor(t) for t in [*model.parameters(), *model.buffers()])


# --- statistics of a shard's inputs ---------------------------------------------------------


def gather_input_stat(module: nn.Module, v: torch.Tensor, what: str) -> torch.Tensor:
    """A per-input-feature statistic `v` recorded by a hook on `module` (float, CPU),
    made whole: a row-wise shard sees only its slice of the input, so the slices of all
    ranks are concatenated (one collective); otherwise `v` itself."""
    shard = linear_shard(module)
    if shard is None or shard.style == COLWISE or v.numel() == shard.in_features:
        return v
    dev = _mesh_device(shard.mesh)
    return gather_cat(v.to(dev), shard.mesh, 0, what).cpu()


def column_amax(lin: nn.Module) -> torch.Tensor:
    """max |W[:, j]| over all output rows, per input feature j, of the whole layer
    (float32, CPU): colwise shards take the maximum over the ranks (one all-reduce),
    rowwise shards concatenate their columns."""
    w = lin.weight.detach()
    v = local(w).abs().amax(dim=0).float()
    shard = linear_shard(lin) if is_dtensor(w) else None
    if shard is None:
        return v.cpu()
    if shard.style == COLWISE:
        return all_reduce_max(v, shard.mesh, "per-input-channel weight maximum").cpu()
    return gather_cat(v, shard.mesh, 0, "per-input-channel weight maximum").cpu()


# --- applying a plan -------------------------------------------------------------------------


def plan_for(model: nn.Module) -> dict[str, str] | None:
    """The plan for `model`: its own transformers tp_plan where it has one, else the one
    fastllm ships for its config's model_type (BERT), prefixed to reach its base model."""
    own = getattr(model, "_tp_plan", None) if _is_hf(model) else None
    if own:
        return dict(own)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    plan = PLANS.get(model_type)
    if plan is None:
        return None
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and getattr(model, prefix, None) is not None and model.base_model is not model:
        return {f"{prefix}.{k}": v for k, v in plan.items()}
    return dict(plan)


def _is_hf(model) -> bool:
    if not _transformers_loaded():
        return False
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def _pattern(key: str) -> re.Pattern:
    # "layers.*.mlp.up" -> layers.<number>.mlp.up, as transformers matches its plans
    return re.compile("\\.".join(r"\d+" if part == "*" else re.escape(part)
                                 for part in key.split(".")))  # fmt: skip


def expand_plan(model: nn.Module, plan: dict[str, str], extra=()) -> dict[str, str]:
    """{module name: style} for every module a plan entry names (a "*" stands for a
    layer number); `extra`: names of modules about to exist. ValueError for an entry
    that names no module."""
    names = [n for n, _ in model.named_modules() if n] + list(extra)
    out: dict[str, str] = {}
    unmatched = []
    for key, style in plan.items():
        pat = _pattern(key)
        hits = [n for n in names if pat.fullmatch(n)]
        if not hits:
            unmatched.append(key)
        for n in hits:
            out[n] = style
    if unmatched:
        raise ValueError(
            f"the tensor-parallel plan has entries that name no module of "
            f"{type(model).__name__}: {unmatched}; entries are module names, with * for a "
            f"layer number (e.g. {_example_name(names)!r})"
        )
    return out


def _example_name(names: list[str]) -> str:
    lin = next((n for n in names if n.count(".") >= 2), names[0] if names else "layers.*.linear1")
    return re.sub(r"\.\d+(\.|$)", r".*\1", lin)


def _resolve_mesh(mesh, model: nn.Module):
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    world = torch.distributed.get_world_size()
    if mesh is None:
        return init_device_mesh(device.type, (world,))
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"mesh must be a torch.distributed DeviceMesh, got {type(mesh).__name__}")
    if mesh.ndim > 1:
        if "tp" not in (mesh.mesh_dim_names or ()):
            raise ValueError(
                f"mesh is {mesh.ndim}-D with dimensions {mesh.mesh_dim_names}; pass a 1-D mesh "
                "or one with a 'tp' dimension"
            )
        mesh = mesh["tp"]
    if mesh.get_coordinate() is None:
        raise ValueError(
            f"mesh {mesh.mesh.tolist()} does not include this process (global rank "
            f"{torch.distributed.get_rank()}); every rank that calls parallelize must be in it"
        )
    if mesh.device_type != device.type:
        raise ValueError(
            f"mesh is on {mesh.device_type!r} but the model's parameters are on {device.type!r}"
        )
    if mesh.size() < 2:
        raise ValueError(
            f"mesh {mesh.mesh.tolist()} has {mesh.size()} rank: nothing to shard over; pass a "
            f"mesh of the ranks that share the model (this job has {world} processes)"
        )
    return mesh


def parallelize(model: nn.Module, plan: dict[str, str] | None = None, mesh=None) -> nn.Module:
    """Shards `model` in place with a tensor-parallel plan in transformers' format, by
    transformers' own engine (the styles of ALL_PARALLEL_STYLES: parameters become
    DTensors, each module gets its style's input/output handling), as
    from_pretrained(tp_plan=...) does; then `fastllm.optimize` swaps each rank's shard.

    model: an unsharded nn.Module with the same weights on every rank (each rank keeps
        its slice: no communication).
    plan: {module name: style}, "*" standing for a layer number, e.g.
        {"layers.*.linear1": "colwise", "layers.*.linear2": "rowwise"}. None: the model's
        own tp_plan (transformers), else the one fastllm ships for it (BERT_PLAN).
        nn.MultiheadAttention keeps q, k, v in one packed weight that no style splits by
        heads: entries naming its `q_proj`, `k_proj`, `v_proj` (and `out_proj`) turn it
        into fastllm.nn.FusedMultiheadAttention (the same function, separate projections)
        first, so that each rank serves its own heads.
    mesh: a 1-D DeviceMesh (or one with a "tp" dimension); None: all ranks of the
        default process group, on the device type of the model's parameters.

    Raises, before changing anything: RuntimeError without a process group; TypeError or
    ValueError for a mesh that is not 1-D, does not include this rank or is on another
    device type; ValueError for a model already sharded, a plan with an unknown style or
    an entry that names no module, or heads that do not divide by the mesh size.
    """
    require_process_group("fastllm.distributed.parallelize")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if model_is_sharded(model):
        raise ValueError(
            f"{type(model).__name__} is already sharded (it holds DTensors); parallelize "
            "takes an unsharded model"
        )
    mesh = _resolve_mesh(mesh, model)
    if plan is None:
        plan = plan_for(model)
        if plan is None:
            raise ValueError(
                f"{type(model).__name__} has no tensor-parallel plan and fastllm ships none for "
                f"it (it has plans for {sorted(PLANS)}); pass plan={{module name: style}}"
            )
    if not isinstance(plan, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in plan.items()
    ):
        raise TypeError(f"plan must be a dict of module name -> style name, got {plan!r}")
    from transformers.distributed.tensor_parallel import (
        ALL_PARALLEL_STYLES,
        apply_tensor_parallelism,
    )

    unknown = sorted({s for s in plan.values() if s not in ALL_PARALLEL_STYLES})
    if unknown:
        raise ValueError(
            f"plan has unknown styles {unknown}; transformers' styles are "
            f"{sorted(ALL_PARALLEL_STYLES)}"
        )
    mha = _attention_to_split(model, plan)
    split = [f"{n}.{p}" for n in mha for p in ("q_proj", "k_proj", "v_proj")]
    expanded = expand_plan(model, plan, extra=split)
    _check_plan(model, expanded, mesh, mha)
    agree(mesh, "fastllm.distributed.parallelize", repr(sorted(expanded.items())))

    # every check passed: from here on the model changes
    _split_attention(model, mha)
    flat: dict[str, str] = {}
    modules = dict(model.named_modules())
    for name, style in expanded.items():
        for p, _ in modules[name].named_parameters(recurse=False):
            flat[f"{name}.{p}"] = style
        flat[name] = style
    apply_tensor_parallelism(model, mesh, flat)
    model._tp_plan = dict(plan)
    model._tp_size = mesh.size()
    model._device_mesh = mesh
    return model


def _attention_to_split(model: nn.Module, plan: dict[str, str]) -> list[str]:
    """Names of the nn.MultiheadAttention modules the plan reaches into."""
    out = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.MultiheadAttention):
            continue
        for key in plan:
            head, _, leaf = key.rpartition(".")
            if leaf in ("q_proj", "k_proj", "v_proj") and head and _pattern(head).fullmatch(name):
                out.append(name)
                break
    return out


def _check_plan(model: nn.Module, expanded: dict[str, str], mesh, mha: list[str]) -> None:
    """What parallelize can check before changing anything: the linear styles name linear
    layers, and heads divide by the mesh size (`mha`: attention modules to be split, whose
    q_proj, k_proj, v_proj do not exist yet)."""
    from transformers.distributed.tensor_parallel import ALL_PARALLEL_STYLES

    modules = dict(model.named_modules())
    shards: dict[str, LinearShard] = {}
    for name, style_name in expanded.items():
        kind = type(ALL_PARALLEL_STYLES[style_name]).__name__
        if kind not in ("ColwiseParallel", "RowwiseParallel"):
            continue
        parent, _, leaf = name.rpartition(".")
        if parent in mha and leaf in ("q_proj", "k_proj", "v_proj"):
            a = modules[parent]
            in_f = {"q_proj": a.embed_dim, "k_proj": a.kdim, "v_proj": a.vdim}[leaf]
            out_f = a.embed_dim
        else:
            m = modules[name]
            if not (hasattr(m, "in_features") and hasattr(m, "out_features")):
                raise ValueError(
                    f"plan entry for {name!r}: style {style_name!r} shards linear layers, but "
                    f"{name!r} is a {type(m).__name__} (no in_features/out_features)"
                )
            in_f, out_f = m.in_features, m.out_features
        style = COLWISE if kind == "ColwiseParallel" else ROWWISE
        size = out_f if style == COLWISE else in_f
        ranges = chunk_ranges(size, mesh.size())
        shards[name] = LinearShard(style, mesh, in_f, out_f, ranges, mesh.get_local_rank())
    check_heads(shards, head_dims(model))


def _split_attention(model: nn.Module, mha: list[str]) -> None:
    if not mha:
        return
    from fastllm.nn import FusedMultiheadAttention
    from fastllm.optimize import FusedTransformerEncoderLayer

    modules = dict(model.named_modules())
    for name in mha:
        parent_name, _, attr = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        setattr(parent, attr, FusedMultiheadAttention.from_module(modules[name]))
    # an encoder layer's fused fast path reads in_proj_weight: it runs its modules instead
    for name, m in list(model.named_modules()):
        if type(m) is nn.TransformerEncoderLayer and isinstance(
            m.self_attn, FusedMultiheadAttention
        ):
            parent_name, _, attr = name.rpartition(".")
            parent = dict(model.named_modules())[parent_name] if parent_name else model
            setattr(parent, attr, FusedTransformerEncoderLayer.from_layer(m))
        if isinstance(m, nn.TransformerEncoder):
            m.use_nested_tensor = False
