"""`fastllm.optimize(model)`: swap a model's layers for fastllm's in place.

    model = fastllm.optimize(model)                              # fused attention only
    model = fastllm.optimize(model, linear="w8a8", calibration=batches)   # + SmoothQuant int8
    model = fastllm.optimize(model, linear="block", density=0.3, block_size=(32, 32))
    print(fastllm.report(model))                                 # what was swapped, what served

Attention: a transformers model is switched to the "fastllm" attention implementation
through transformers' AttentionInterface and mask interface (fastllm.hf); an
`nn.MultiheadAttention` (also inside `nn.TransformerEncoderLayer`) becomes a
`fastllm.nn.FusedMultiheadAttention`.

Linear layers (`nn.Linear`, and transformers' GPT-2 `Conv1D`) become, by `linear=`:

    "w8a8"       Int8Linear, int8 weights and per-token int8 activations (SmoothQuant
                 with calibration batches, plain per-token quantization without)
    "w8a16"      Int8Linear, int8 weights, float activations
    "2:4"        Sparse24Linear, 2 of every 4 weights kept (Wanda with calibration
                 batches, magnitude without)
    "block"      BlockSparseLinear, `density` of the `block_size` tiles kept
    "2:4+w8a8"   Sparse24Linear over int8 values (when the sparse family provides it)

Layers named in `skip` (default: `lm_head`, whose precision matters most) stay in
float, as do layers `filter_fn(name, module)` rejects and layers whose shape the
target module does not take; the report says which and why. A model already
optimized is left as it is; calling optimize again only swaps what is still float.

All or nothing: every change optimize makes to the model (module swaps, attributes,
weights SmoothQuant rescales in place, the attention implementation of a transformers
model) is recorded as it is made, and an error at any step undoes them in reverse, so
the model is left exactly as it was; the RuntimeError raised names the layer and the
step that failed and is chained to the original error.

Tensor parallelism (fastllm.distributed): on a model sharded by torch.distributed
(transformers' `from_pretrained(..., tp_plan="auto")`, fastllm.distributed.parallelize,
torch's parallelize_module), every rank calls optimize with the same arguments and each
swaps its own shard; the layers keep the engine's input/output handling, and the int8
weights and scales, pruning masks and SmoothQuant factors are slices of those one
process computes for the whole model (the few collectives that takes run while
optimizing). What the shards cannot hold — a boundary inside a 2:4 group, a sparse
block or an attention head; a layer sharded some other way — is a ValueError before
anything is changed.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from fastllm import backend as _backend
from fastllm import distributed as _dist
from fastllm import quant as _quant
from fastllm import sparse as _sparse
from fastllm.nn import (
    BlockSparseLinear,
    FusedMultiheadAttention,
    Int8Linear,
    Sparse24Linear,
)

LINEAR_KINDS = ("w8a8", "w8a16", "2:4", "block", "2:4+w8a8")
# the fastllm.nn module each kind of linear layer becomes
_LINEAR_MODULES = {
    "w8a8": Int8Linear,
    "w8a16": Int8Linear,
    "2:4": Sparse24Linear,
    "block": BlockSparseLinear,
    "2:4+w8a8": Sparse24Linear,
}
METHODS = ("magnitude", "wanda")

_REPORT_ATTR = "_fastllm_report"


@dataclass(frozen=True)
class LinearConfig:
    """How linear layers are swapped. `fastllm.optimize(model, linear="block", density=0.3)`
    builds one from keyword options; pass one as `linear=` to reuse it.

    kind:        one of LINEAR_KINDS
    smoothquant: w8a8 only. None: SmoothQuant when calibration batches are given;
                 True: require them; False: never (plain per-token quantization)
    alpha:       SmoothQuant migration strength in [0, 1]
    method:      sparse only. None: "wanda" with calibration batches, else "magnitude"
    density:     block only: fraction of tiles kept, in (0, 1]
    block_size:  block only: (rows, cols) of a tile; must divide the layer's shape
    skip:        layer names kept in float: a name matches a layer whose qualified name
                 equals it or ends with "." + it
    unfoldable:  SmoothQuant, for layers with no norm to fold the scales into: "runtime"
                 divides their input by s at run time, "skip" leaves them unsmoothed
    """

    kind: str
    smoothquant: bool | None = None
    alpha: float = 0.5
    method: str | None = None
    density: float = 0.5
    block_size: tuple[int, int] = (64, 64)
    skip: tuple[str, ...] = ("lm_head",)
    unfoldable: str = "runtime"

    def __post_init__(self):
        if self.kind not in LINEAR_KINDS:
            raise ValueError(f"linear must be None or one of {LINEAR_KINDS}, got {self.kind!r}")
        if self.smoothquant not in (None, True, False):
            raise ValueError(f"smoothquant must be None, True or False, got {self.smoothquant!r}")
        if not (isinstance(self.alpha, int | float) and 0.0 <= self.alpha <= 1.0):
            raise ValueError(f"alpha must be a number in [0, 1], got {self.alpha!r}")
        if self.method is not None and self.method not in METHODS:
            raise ValueError(f"method must be None or one of {METHODS}, got {self.method!r}")
        if not (isinstance(self.density, int | float) and 0.0 < self.density <= 1.0):
            raise ValueError(f"density must be a number in (0, 1], got {self.density!r}")
        bs = tuple(self.block_size) if isinstance(self.block_size, list | tuple) else None
        if bs is None or len(bs) != 2 or not all(isinstance(b, int) and b > 0 for b in bs):
            raise ValueError(
                f"block_size must be a pair of positive ints (rows, cols), got {self.block_size!r}"
            )
        object.__setattr__(self, "block_size", bs)
        if isinstance(self.skip, str) or not all(isinstance(s, str) for s in self.skip):
            raise ValueError(f"skip must be a tuple of layer names, got {self.skip!r}")
        object.__setattr__(self, "skip", tuple(self.skip))
        if self.unfoldable not in ("runtime", "skip"):
            raise ValueError(f"unfoldable must be 'runtime' or 'skip', got {self.unfoldable!r}")
        if self.smoothquant and self.kind not in ("w8a8", "2:4+w8a8"):
            raise ValueError(f"smoothquant=True applies to w8a8, not linear={self.kind!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["block_size"] = list(self.block_size)
        d["skip"] = list(self.skip)
        return d


LINEAR_OPTIONS = tuple(f.name for f in dataclasses.fields(LinearConfig) if f.name != "kind")


# --- the report -----------------------------------------------------------------------------


@dataclass
class LayerEntry:
    name: str
    kind: str  # "attention" | "linear"
    action: str  # "swapped" | "kept" (already fastllm) | "skipped"
    before: str
    after: str | None = None
    reason: str | None = None
    backend: str | None = None  # filled in by report(model) after a forward pass


@dataclass
class Report:
    """What `optimize` did to a model; `fastllm.report(model)` fills in the backends
    that served each layer in the latest forward pass."""

    options: dict
    layers: list[LayerEntry] = field(default_factory=list)
    calibration: str = "none"
    notes: list[str] = field(default_factory=list)

    @property
    def swapped(self) -> list[LayerEntry]:
        return [e for e in self.layers if e.action == "swapped"]

    @property
    def skipped(self) -> list[LayerEntry]:
        return [e for e in self.layers if e.action == "skipped"]

    def backends(self) -> dict[str, int]:
        """{backend: number of layers it served in the latest forward pass}."""
        counts: dict[str, int] = {}
        for e in self.layers:
            if e.backend:
                counts[e.backend] = counts.get(e.backend, 0) + 1
        return counts

    def to_dict(self) -> dict:
        return {
            "options": self.options,
            "calibration": self.calibration,
            "notes": list(self.notes),
            "layers": [dataclasses.asdict(e) for e in self.layers],
        }

    def __str__(self) -> str:
        n_swapped, n_skipped = len(self.swapped), len(self.skipped)
        lines = [
            f"fastllm.optimize: {n_swapped} layers swapped, {n_skipped} skipped, "
            f"{len(self.layers) - n_swapped - n_skipped} already fastllm",
            f"  options: {self.options}",
            f"  calibration: {self.calibration}",
        ]
        lines += [f"  note: {n}" for n in self.notes]
        for e in self.layers:
            what = f"{e.before} -> {e.after}" if e.after else e.before
            extra = f" ({e.reason})" if e.reason else ""
            served = f" [served by {e.backend}]" if e.backend else ""
            lines.append(f"  {e.action:<8} {e.kind:<9} {e.name}: {what}{extra}{served}")
        return "\n".join(lines)

    __repr__ = __str__


def report(model: nn.Module) -> Report:
    """The report of `optimize` on `model`, with the backend that served each layer in
    its latest forward pass (None for layers not run since). ValueError if `model` was
    not optimized."""
    rep = getattr(model, _REPORT_ATTR, None)
    if rep is None:
        raise ValueError(
            f"{type(model).__name__} was not optimized by fastllm.optimize (no report attached)"
        )
    modules = dict(model.named_modules())
    for e in rep.layers:
        m = modules.get(e.name)
        if m is None or e.action == "skipped":  # a skipped module's own records are not fastllm's
            continue
        if e.kind == "attention" and e.after == "fastllm (transformers)":
            e.backend = _hf_backends(model)
        else:
            e.backend = getattr(m, "last_backend", None) or getattr(m, "fastllm_backend", None)
    return rep


def _hf_backends(model: nn.Module) -> str | None:
    from fastllm import hf

    served = sorted({m.fastllm_backend for _, m in hf.attention_modules(model)})
    return ", ".join(served) if served else None


def _is_fastllm_module(m: nn.Module) -> bool:
    """A fastllm.nn layer (what optimize swaps in)."""
    return type(m).__module__.startswith("fastllm.nn")


def _is_conv1d(m: nn.Module) -> bool:
    # transformers' GPT-2 style Conv1D: y = x @ weight + bias, weight (in, out)
    return type(m).__name__ == "Conv1D" and type(m).__module__.startswith("transformers")


def _as_linear(m: nn.Module) -> nn.Linear:
    if isinstance(m, nn.Linear):
        return m
    w = m.weight  # Conv1D: (in_features, out_features)
    lin = nn.Linear(w.shape[0], w.shape[1], bias=m.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w.t())
        if m.bias is not None:
            lin.bias.copy_(m.bias)
    return lin


def _name_matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


# --- all or nothing ------------------------------------------------------------------------


class _Changes:
    """Every change optimize makes to a model, recorded as it is made, so that `undo()`
    puts the model back exactly as it was (in reverse order); and where optimize is
    (`layer`, `step`), for the error message."""

    def __init__(self):
        self._undo: list[Callable[[], None]] = []
        self.layer = ""  # qualified name; "" for the whole model
        self.step = "starting"

    def at(self, layer: str, step: str) -> None:
        self.layer, self.step = layer, step

    def on_undo(self, fn: Callable[[], None]) -> None:
        self._undo.append(fn)

    def keep(self, obj, name: str) -> None:
        """Remembers `obj.name` (or that obj has no attribute `name` of its own)."""
        own = name in vars(obj) or (isinstance(obj, nn.Module) and name in obj._modules)
        old = getattr(obj, name) if own else None

        def restore():
            if own:
                setattr(obj, name, old)
            elif name in vars(obj) or (isinstance(obj, nn.Module) and name in obj._modules):
                delattr(obj, name)

        self._undo.append(restore)

    def setattr(self, obj, name: str, value) -> None:
        self.keep(obj, name)
        setattr(obj, name, value)

    def keep_tensors(self, tensors: Iterable[torch.Tensor]) -> None:
        """Remembers the values of tensors about to be changed in place (this rank's shard
        of a DTensor). The copies are kept in CPU memory, so that a model on a GPU needs no
        room there for them."""
        tensors = [_dist.local(t) for t in tensors]
        saved = [(t, t.detach().to("cpu", copy=True)) for t in tensors]

        def restore():
            with torch.no_grad():
                for t, old in saved:
                    t.copy_(old)

        self._undo.append(restore)

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()


def _running_layer(model: nn.Module, error: BaseException) -> str:
    """The qualified name of the innermost module of `model` whose code was running when
    `error` was raised (read from the `self` of the traceback's frames); "" if none."""
    modules = {id(m): (name, m) for name, m in model.named_modules()}
    found = ""
    tb = error.__traceback__
    while tb is not None:
        obj = tb.tb_frame.f_locals.get("self")
        hit = modules.get(id(obj))
        if hit is not None and hit[1] is obj:
            found = hit[0]
        tb = tb.tb_next
    return found


def _failure(model: nn.Module, changes: _Changes, error: Exception) -> RuntimeError:
    layer = changes.layer or _running_layer(model, error)
    where = f"layer {layer!r}" if layer else f"the model ({type(model).__name__})"
    detail = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    return RuntimeError(
        f"fastllm.optimize failed at {where} ({changes.step}): {detail}; "
        "the model was left as it was"
    )


# --- optimize ------------------------------------------------------------------------------

_OPTIONS = ("attention", "linear", "calibration", "fuse", "unpad", "filter_fn", "backend")


def _make_linear_config(linear, options: dict) -> LinearConfig | None:
    unknown = sorted(set(options) - set(LINEAR_OPTIONS))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown}; fastllm.optimize takes {list(_OPTIONS)} and, for "
            f"linear layers, {list(LINEAR_OPTIONS)}"
        )
    if linear is None:
        if options:
            raise ValueError(
                f"option(s) {sorted(options)} apply to linear layers, but linear=None; "
                f"pass linear= one of {LINEAR_KINDS}"
            )
        return None
    if isinstance(linear, LinearConfig):
        return dataclasses.replace(linear, **options) if options else linear
    if not isinstance(linear, str):
        raise ValueError(
            f"linear must be None, one of {LINEAR_KINDS} or a fastllm.LinearConfig, got {linear!r}"
        )
    return LinearConfig(kind=linear, **options)


def optimize(
    model: nn.Module,
    *,
    attention: bool = True,
    linear: str | LinearConfig | None = None,
    calibration: Iterable | None = None,
    fuse: bool = False,
    unpad: bool = False,
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
    backend: str | None = None,
    **options,
) -> nn.Module:
    """Swaps `model`'s attention and linear layers for fastllm's, in place; returns `model`.

    Args:
        attention: use fastllm's fused attention (transformers models: through their
            attention interface; `nn.MultiheadAttention`: FusedMultiheadAttention).
        linear: None (keep float), one of LINEAR_KINDS, or a LinearConfig.
        calibration: an iterable of batches as the model's forward takes them (a mapping,
            such as a dict or a tokenizer's BatchEncoding, is passed as `model(**batch)`, a
            tuple or list as `model(*batch)`, else `model(batch)`), used by SmoothQuant
            (w8a8) and Wanda (sparse). Without it, the calibration-free methods are used;
            the report says so, and says when the batches were not used (w8a16).
        fuse: also replace the modules around the GEMMs by fused ones (fastllm.fusion):
            LayerNorm and RMSNorm modules by fastllm's norm ops; with linear="w8a8", the
            activation, residual add and re-quantization of BERT-, GPT-2- and Llama-type
            MLP and output blocks into the GEMMs' epilogues. Each is checked against the
            module it replaces on a probe input; the report lists what was fused and why
            the rest was not.
        unpad: run a transformers encoder (BERT-type, with attention=True) on the valid
            tokens of a padded batch only, packed into one sequence, and scatter its output
            back: the same values at the valid positions, zeros at the padded ones, and no
            work spent on padding (fastllm.unpad).
        filter_fn: `filter_fn(qualified_name, module) -> bool`; layers for which it is
            false are left alone.
        backend: force one fastllm backend ("cuda", "triton", "cpu", "torch", "reference") for
            every forward pass of `model` (as `fastllm.use_backend` does); None: per-call choice.
        **options: LinearConfig fields (smoothquant, alpha, method, density, block_size, skip).

    Raises ValueError for unknown options or values (listing the valid ones), before
    changing anything. An error while optimizing leaves the model as it was and raises
    RuntimeError naming the layer and the step that failed, chained to the original error.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(attention, bool):
        raise ValueError(f"attention must be True or False, got {attention!r}")
    if not isinstance(fuse, bool):
        raise ValueError(f"fuse must be True or False, got {fuse!r}")
    if not isinstance(unpad, bool):
        raise ValueError(f"unpad must be True or False, got {unpad!r}")
    if backend is not None and backend not in _backend.BACKENDS:
        raise ValueError(f"backend must be None or one of {_backend.BACKENDS}, got {backend!r}")
    if filter_fn is not None and not callable(filter_fn):
        raise ValueError(f"filter_fn must be callable(name, module) -> bool, got {filter_fn!r}")
    cfg = _make_linear_config(linear, options)
    if cfg is not None and cfg.smoothquant and calibration is None:
        raise ValueError("smoothquant=True needs calibration batches (calibration=...)")
    batches = list(calibration) if calibration is not None else None
    if batches is not None and not batches:
        raise ValueError("calibration is empty; pass at least one batch, or None")
    sparse = cfg is not None and cfg.kind in ("2:4", "block", "2:4+w8a8")
    if sparse and cfg.method == "wanda" and batches is None:
        raise ValueError("method='wanda' needs calibration batches (calibration=...)")

    opts = {
        "attention": attention,
        "linear": cfg.to_dict() if cfg else None,
        "fuse": fuse,
        "unpad": unpad,
        "backend": backend,
        "filter_fn": None if filter_fn is None else getattr(filter_fn, "__name__", "custom"),
    }
    # a new report: the model's own is replaced only when optimize succeeds
    rep: Report | None = copy.deepcopy(getattr(model, _REPORT_ATTR, None))
    if rep is None:
        rep = Report(options=opts)
    else:
        rep.notes.append(f"optimize called again with {opts}")
        rep.options = {**rep.options, **{k: v for k, v in opts.items() if v}}
    if cfg is None and batches is not None:
        rep.calibration = "linear=None: the calibration batches were not used"
    # a sharded model: checked (the same on every rank) before anything changes
    tp = _TensorParallel.of(model, cfg, filter_fn, opts, batches)
    if tp is not None:
        rep.notes.append(tp.note())

    changes = _Changes()
    was_training = model.training
    flags = [(m, m.training) for m in model.modules()]

    def restore_flags():
        for m, training in flags:
            m.training = training

    changes.on_undo(restore_flags)
    try:
        model.eval()
        if attention:
            _swap_attention(model, filter_fn, rep, changes)
            # before calibration runs the model: PyTorch's encoder layer would take its fused
            # path, which reads nn.MultiheadAttention's in_proj weights
            _guard_fast_paths(model, rep, changes)
        if cfg is not None:
            _swap_linears(model, cfg, batches, filter_fn, rep, changes, tp)
        if fuse:
            _fuse(model, cfg.kind if cfg is not None else None, filter_fn, rep, changes)
        if unpad:
            _unpad(model, rep, changes)
        _guard_fast_paths(model, rep, changes)
    except BaseException as e:
        error = _failure(model, changes, e) if isinstance(e, Exception) else None
        changes.undo()
        if error is None:  # KeyboardInterrupt and the like: undone, and passed on as they are
            raise
        raise error from e
    model.train(was_training)
    if backend is not None:
        _force_backend(model, backend)
    if not rep.layers:
        rep.notes.append(
            "nothing to swap: the model has no attention or linear layer fastllm serves"
        )
    setattr(model, _REPORT_ATTR, rep)
    _attach_hf_quantizer(model)
    return model


def _attach_hf_quantizer(model: nn.Module) -> None:
    """A transformers model gets fastllm's quantizer and config, so that
    model.save_pretrained writes a checkpoint from_pretrained rebuilds (fastllm.hf_quantizer)."""
    from fastllm import hf

    if hf.is_hf_model(model):
        from fastllm import hf_quantizer

        hf_quantizer.attach(model)


def is_optimized(model: nn.Module) -> bool:
    return getattr(model, _REPORT_ATTR, None) is not None


# --- attention -----------------------------------------------------------------------------


def _swap_attention(model: nn.Module, filter_fn, rep: Report, changes: _Changes) -> None:
    from fastllm import hf

    if hf.is_hf_model(model):
        changes.at("", "switching transformers attention to 'fastllm'")
        done = {e.name for e in rep.layers if e.kind == "attention"}
        if "" in done or hf.enabled(model):
            if "" not in done:
                rep.layers.append(
                    LayerEntry("", "attention", "kept", "fastllm (transformers)", None, None)
                )
            return
        # transformers picks the attention implementation per model, not per layer
        why = hf.unsupported_reason(model)
        if why is not None:
            rep.layers.append(LayerEntry("", "attention", "skipped", "transformers", None, why))
            return
        # set_attn_implementation writes the implementation into the model's config, its
        # submodels' configs and their sub-configs: all of them are kept for undo
        for config in _hf_configs(model):
            changes.keep(config, "_attn_implementation_internal")
        rep.layers.append(hf_attention_entry(hf.enable(model)))
        return
    _swap_mha(model, "", filter_fn, rep, changes)


def hf_attention_entry(previous: str) -> LayerEntry:
    """The report's entry for a transformers model switched to fastllm attention from the
    `previous` implementation (by optimize, fastllm.load and from_pretrained alike)."""
    return LayerEntry(
        "", "attention", "swapped", f"transformers {previous!r}", "fastllm (transformers)"
    )


def _hf_configs(model: nn.Module) -> list:
    """The transformers configs of `model` and of its modules, and all their sub-configs."""
    todo = [m.config for m in model.modules() if hasattr(m, "config")]
    found: dict[int, object] = {}
    while todo:
        config = todo.pop()
        if id(config) in found or not hasattr(config, "_attn_implementation_internal"):
            continue
        found[id(config)] = config
        todo += [getattr(config, key, None) for key in getattr(config, "sub_configs", {})]
    return list(found.values())


def _swap_mha(parent: nn.Module, prefix: str, filter_fn, rep: Report, changes: _Changes) -> None:
    for name, child in list(parent.named_children()):
        full = f"{prefix}.{name}" if prefix else name
        if isinstance(child, nn.MultiheadAttention) and not _is_fastllm_module(child):
            changes.at(full, "calling filter_fn")
            if filter_fn is not None and not filter_fn(full, child):
                rep.layers.append(
                    LayerEntry(full, "attention", "skipped", "MultiheadAttention", None,
                               "filtered out by filter_fn")
                )  # fmt: skip
                continue
            changes.at(full, "building FusedMultiheadAttention")
            try:
                new = FusedMultiheadAttention.from_module(child)
            except ValueError as e:
                rep.layers.append(
                    LayerEntry(full, "attention", "skipped", "MultiheadAttention", None,
                               f"unsupported: {e}")
                )  # fmt: skip
                continue
            record_attention_backend(new)
            changes.at(full, "swapping in FusedMultiheadAttention")
            changes.setattr(parent, name, new)
            rep.layers.append(
                LayerEntry(full, "attention", "swapped", "MultiheadAttention", type(new).__name__)
            )
        elif _is_fastllm_module(child) and "Attention" in type(child).__name__:
            if not any(e.name == full for e in rep.layers):
                rep.layers.append(LayerEntry(full, "attention", "kept", type(child).__name__))
        else:
            _swap_mha(child, full, filter_fn, rep, changes)


def record_attention_backend(module: nn.Module) -> None:
    """Records in `module.fastllm_backend` which fastllm ops served its latest forward
    (eager mode; nothing is recorded, and nothing traced, under torch.compile)."""

    # the trace open during a forward belongs to the thread running it (several threads
    # may run the module at once): kept per thread, not on the module
    local = threading.local()

    def enter(mod, args):
        if torch.compiler.is_compiling():
            return
        cm = _backend.trace()
        local.pending = (cm, cm.__enter__())

    def leave(mod, args, output):
        pending = getattr(local, "pending", None)
        local.pending = None
        if pending is None:
            return
        cm, calls = pending
        cm.__exit__(None, None, None)
        served = sorted({f"{op}:{b}" for op, b in calls})
        mod.fastllm_backend = ", ".join(served) if served else "PyTorch SDPA (masked path)"

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave, always_call=True)


class FusedTransformerEncoderLayer(nn.TransformerEncoderLayer):
    """An `nn.TransformerEncoderLayer` that always runs its submodules' own forward.

    PyTorch's layer has an inference fast path (`torch._transformer_encoder_layer_fwd`)
    that reads `self_attn.in_proj_weight` and the linear weights directly: it would
    bypass swapped modules. This subclass shares the original layer's submodules and
    parameters (same state_dict keys) and keeps only the module-by-module path.
    """

    @classmethod
    def from_layer(cls, layer: nn.TransformerEncoderLayer) -> FusedTransformerEncoderLayer:
        new = cls.__new__(cls)
        new.__dict__.update(layer.__dict__)  # the same submodules, parameters and flags
        new._modules = dict(layer._modules)
        new._parameters = dict(layer._parameters)
        new._buffers = dict(layer._buffers)
        return new

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        F = nn.functional
        src_key_padding_mask = F._canonical_mask(
            mask=src_key_padding_mask,
            mask_name="src_key_padding_mask",
            other_type=F._none_or_dtype(src_mask),
            other_name="src_mask",
            target_type=src.dtype,
        )
        src_mask = F._canonical_mask(
            mask=src_mask,
            mask_name="src_mask",
            other_type=None,
            other_name="",
            target_type=src.dtype,
            check_other=False,
        )
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x


def _guard_fast_paths(model: nn.Module, rep: Report, changes: _Changes) -> None:
    """PyTorch encoder layers holding fastllm modules must not take PyTorch's fused paths."""

    def walk(parent, prefix):
        for name, child in list(parent.named_children()):
            full = f"{prefix}.{name}" if prefix else name
            has_fastllm = any(_is_fastllm_module(m) for m in child.modules())
            if type(child) is nn.TransformerEncoderLayer and has_fastllm:
                changes.at(full, "swapping in FusedTransformerEncoderLayer")
                child = FusedTransformerEncoderLayer.from_layer(child)
                changes.setattr(parent, name, child)
                rep.layers.append(
                    LayerEntry(full, "layer", "swapped", "TransformerEncoderLayer",
                               "FusedTransformerEncoderLayer",
                               "runs the swapped modules (the fused fast path would bypass them)")
                )  # fmt: skip
            elif type(child) is FusedTransformerEncoderLayer and all(
                e.name != full for e in rep.layers
            ):  # swapped in before (fastllm.distributed.parallelize): saved like the others
                rep.layers.append(LayerEntry(full, "layer", "kept", "FusedTransformerEncoderLayer"))
            _no_nested(child, has_fastllm)
            walk(child, full)

    def _no_nested(m, has_fastllm):
        if isinstance(m, nn.TransformerEncoder) and has_fastllm:
            # no nested-tensor conversion of padded input
            changes.setattr(m, "use_nested_tensor", False)

    walk(model, "")
    _no_nested(model, any(_is_fastllm_module(m) for m in model.modules()))


# --- linear layers -------------------------------------------------------------------------


def _linear_targets(model: nn.Module, cfg: LinearConfig, filter_fn, rep: Report, changes):
    """[(parent, attr, qualified name, module)] of the float linear layers to swap;
    records the skipped ones."""
    targets, seen = [], {e.name for e in rep.layers}

    def walk(parent, prefix):
        for name, child in parent.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if _is_fastllm_module(child) and "Linear" in type(child).__name__:
                if full not in seen:
                    rep.layers.append(LayerEntry(full, "linear", "kept", type(child).__name__))
                continue
            if isinstance(child, nn.MultiheadAttention):
                # its forward reads out_proj.weight directly; it never calls out_proj
                name_out = f"{full}.out_proj"
                if name_out not in seen:
                    rep.layers.append(LayerEntry(name_out, "linear", "skipped", "Linear", None,
                                                 "inside nn.MultiheadAttention, which reads its "
                                                 "weight directly (attention=True swaps the module)"))  # fmt: skip
                continue
            if isinstance(child, nn.Linear) or _is_conv1d(child):
                before = type(child).__name__
                changes.at(full, "calling filter_fn")
                if _name_matches(full, cfg.skip):
                    reason = f"kept in float (skip={list(cfg.skip)})"
                elif filter_fn is not None and not filter_fn(full, child):
                    reason = "filtered out by filter_fn"
                elif not child.weight.is_floating_point():
                    reason = f"weight dtype {child.weight.dtype} is not float"
                else:
                    targets.append((parent, name, full, child))
                    continue
                if full not in seen:
                    rep.layers.append(LayerEntry(full, "linear", "skipped", before, None, reason))
                continue
            walk(child, full)

    walk(model, "")
    return targets


def _calibrate(model, cfg: LinearConfig, batches, rep: Report, names: set[str], changes, weights):
    """Returns (smooth scales or None, activation norms or None, pruning method) and
    records what was done. `names`: the layers to be swapped; `weights`: those of their
    weights that are the model's own (SmoothQuant rescales them in place)."""
    smooth_scales, act_norms = None, None
    int8 = cfg.kind in ("w8a8", "2:4+w8a8")
    sparse = cfg.kind in ("2:4", "block", "2:4+w8a8")
    use_smooth = int8 and cfg.smoothquant is not False and batches is not None
    method = cfg.method or ("wanda" if batches is not None else "magnitude")
    what = []
    if use_smooth:
        changes.at("", "calibration forward pass for SmoothQuant")
        stats = _quant.calibrate(model, batches, filter_fn=lambda n, m: n in names)
        # Sparse24Linear has no run-time scale: only folded smoothing applies to it
        unfoldable = "skip" if cfg.kind == "2:4+w8a8" else cfg.unfoldable
        changes.at("", "SmoothQuant smoothing")
        # smoothing rescales norm and linear weights in place
        norms = [m for m in model.modules() if _quant._is_norm(m)]
        changes.keep_tensors([p for m in norms for p in m.parameters(recurse=False)])
        changes.keep_tensors(weights)
        smooth_scales = _quant.smooth(
            model, stats, alpha=cfg.alpha, unfoldable=unfoldable, example=batches[0]
        )
        what.append(
            f"SmoothQuant alpha={cfg.alpha} from {len(batches)} batches: "
            f"{len(smooth_scales.folded)} layers folded into a norm, "
            f"{len(smooth_scales.runtime)} smoothed at run time, "
            f"{len(smooth_scales.skipped)} not smoothed"
        )
    elif int8:
        what.append(
            "w8a8 without SmoothQuant (per-token activation scales"
            + (", smoothquant=False)" if batches is not None else "): no calibration batches")
        )
    if sparse:
        if method == "wanda":  # optimize checked that batches were given
            changes.at("", "calibration forward pass for Wanda")
            act_norms = _sparse.calibrate(model, batches, filter_fn=lambda n, m: n in names)
            what.append(f"Wanda activation norms from {len(batches)} batches")
        else:
            what.append(
                "magnitude pruning"
                + (" (method='magnitude')" if batches is not None else ": no calibration batches")
            )
    if cfg.kind == "w8a16":
        what.append("w8a16 needs no calibration")
    rep.calibration = "; ".join(what)
    if batches is not None and smooth_scales is None and act_norms is None:
        rep.calibration += ": the calibration batches were not used"
    return smooth_scales, act_norms, method


def _build_linear(kind, lin: nn.Linear, name, cfg, smooth_scales, act_norms, method):
    act_norm = act_norms.get(name) if act_norms is not None and method == "wanda" else None
    if act_norm is not None and not isinstance(act_norm, torch.Tensor):
        act_norm = act_norm.norm  # fastllm.calibration.InputStats
    cls = _LINEAR_MODULES[kind]
    if cls is Int8Linear:
        scale = None
        if smooth_scales is not None:
            scale = smooth_scales.get(name)
        return Int8Linear.from_linear(lin, mode=kind, smooth_scale=scale)
    m = method if act_norm is not None else "magnitude"
    if cls is BlockSparseLinear:
        return BlockSparseLinear.from_linear(
            lin, block_size=cfg.block_size, density=cfg.density, method=m, act_norm=act_norm
        )
    return Sparse24Linear.from_linear(lin, method=m, act_norm=act_norm, int8=kind == "2:4+w8a8")


def _swap_linears(
    model, cfg: LinearConfig, batches, filter_fn, rep: Report, changes: _Changes, tp=None
) -> None:
    targets = _linear_targets(model, cfg, filter_fn, rep, changes)
    if not targets:
        rep.notes.append(f"linear={cfg.kind!r}: no float linear layer left to swap")
        return
    # GPT-2's Conv1D becomes the equivalent nn.Linear first, so that calibration hooks
    # and SmoothQuant see it like any other linear layer.
    conv, as_lin = {}, {}
    for i, (parent, attr, name, child) in enumerate(targets):
        if _is_conv1d(child):
            changes.at(name, "converting Conv1D to nn.Linear")
            lin = as_lin.setdefault(id(child), _as_linear(child))
            conv[name] = child
            changes.setattr(parent, attr, lin)
            targets[i] = (parent, attr, name, lin)
    names = {t[2] for t in targets}
    weights = [t[3].weight for t in targets if t[2] not in conv]  # not the Conv1D copies
    smooth_scales, act_norms, method = _calibrate(model, cfg, batches, rep, names, changes, weights)
    done: dict[int, nn.Module] = {}
    new_cls = _LINEAR_MODULES[cfg.kind].__name__
    for parent, attr, name, child in targets:
        before = "Conv1D" if name in conv else type(child).__name__
        if id(child) in done:  # one module used in two places stays one module
            changes.at(name, f"swapping in {new_cls} (shared module)")
            changes.setattr(parent, attr, done[id(child)])
            rep.layers.append(LayerEntry(name, "linear", "swapped", before,
                                         type(done[id(child)]).__name__, "shared module"))  # fmt: skip
            continue
        changes.at(name, f"building {new_cls} {cfg.kind}")
        try:
            if tp is not None and name in tp.shards:
                new = tp.build(cfg.kind, child, name, cfg, smooth_scales, act_norms, method)
            else:
                new = _build_linear(cfg.kind, child, name, cfg, smooth_scales, act_norms, method)
        except ValueError as e:
            if name in conv:  # back to Conv1D, keeping what SmoothQuant folded into the weight
                changes.keep_tensors([conv[name].weight])
                with torch.no_grad():
                    conv[name].weight.copy_(child.weight.t())
                changes.setattr(parent, attr, conv[name])
            rep.layers.append(
                LayerEntry(name, "linear", "skipped", before, None, f"shape unsupported: {e}")
            )
            continue
        done[id(child)] = new
        changes.at(name, f"swapping in {new_cls}")
        changes.setattr(parent, attr, new)
        rep.layers.append(LayerEntry(name, "linear", "swapped", before, type(new).__name__))
    rep.options["method"] = method if cfg.kind in ("2:4", "block", "2:4+w8a8") else None


# --- fused modules -------------------------------------------------------------------------


def _fuse(model, linear: str | None, filter_fn, rep: Report, changes: _Changes) -> None:
    from fastllm import fusion

    seen = {e.name for e in rep.layers}
    where = {(e.name, e.kind): i for i, e in enumerate(rep.layers)}
    for entry in fusion.fuse(model, filter_fn, changes, seen):
        new = LayerEntry(*entry)
        if (new.name, new.kind) in where:  # looked at again (optimize called again)
            rep.layers[where[new.name, new.kind]] = new
        else:
            rep.layers.append(new)
    if linear != "w8a8":
        what = f"linear={linear!r}"
        rep.notes.append(
            f"fuse with {what}: the norms are fused; the GEMM epilogue fusions take w8a8 layers"
        )


def apply_fusion(model: nn.Module) -> None:
    """Swaps in the fused modules of a model being rebuilt from a save made with fuse=True
    (fastllm.load, transformers' from_pretrained): the same modules, checked the same way,
    recorded in its report."""
    rep = getattr(model, _REPORT_ATTR)
    changes = _Changes()
    try:
        linear = rep.options.get("linear")
        _fuse(model, linear.get("kind") if isinstance(linear, dict) else None, None, rep, changes)
    except BaseException:
        changes.undo()
        raise


# --- padding-free encoders ----------------------------------------------------------------


def _unpad(model: nn.Module, rep: Report, changes: _Changes) -> None:
    from fastllm import hf, unpad

    changes.at("", "hooking the encoder for padding-free calls")
    found = unpad.find_encoder(model)
    if isinstance(found, str):
        entry = LayerEntry("", "unpad", "skipped", type(model).__name__, None, found)
    else:
        name, module = found
        before = type(module).__name__
        if unpad.is_enabled(module):
            entry = LayerEntry(name, "unpad", "kept", before, None, None)
        elif not hf.enabled(model):
            why = "needs fastllm attention (attention=True): its mask gives the segments"
            entry = LayerEntry(name, "unpad", "skipped", before, None, why)
        else:
            handles = unpad.enable(module)
            changes.on_undo(lambda: [h.remove() for h in handles])
            why = unpad.probe(model, module)
            if why is None:
                entry = LayerEntry(name, "unpad", "swapped", before, f"{before} on valid tokens")
            else:
                for h in handles:
                    h.remove()
                entry = LayerEntry(name, "unpad", "skipped", before, None, why)
    rep.layers = [e for e in rep.layers if e.kind != "unpad"] + [entry]


def apply_unpad(model: nn.Module) -> None:
    """Hooks the encoder of a model rebuilt from a save made with unpad=True (fastllm.load,
    transformers' from_pretrained), recorded in its report."""
    _unpad(model, getattr(model, _REPORT_ATTR), _Changes())


# --- tensor parallelism --------------------------------------------------------------------


def _would_take(kind: str, lin: nn.Module, cfg: LinearConfig) -> None:
    """ValueError where the whole layer's shape is one `kind` does not take (what
    `from_linear` raises on it in one process: the layer is then skipped)."""
    from fastllm.ops._checks import INT8_MAX_K, check_int8_k

    out_f, in_f = lin.weight.shape
    if kind == "w8a8":
        check_int8_k(in_f)
    elif kind == "block":
        from fastllm.sparse.format import check_block_size

        check_block_size((out_f, in_f), cfg.block_size)
    elif kind in ("2:4", "2:4+w8a8"):
        if in_f % 4:
            raise ValueError(f"in_features = {in_f}; 2:4 sparsity needs a multiple of 4")
        if kind == "2:4+w8a8":
            check_int8_k(in_f, 2 * INT8_MAX_K)


class _TensorParallel:
    """The sharded layers of a model (fastllm.distributed): their LinearShard and how the
    engine that sharded them handles their inputs and outputs."""

    def __init__(self, mesh, shards: dict, handlings: dict):
        self.mesh, self.shards, self.handlings = mesh, shards, handlings

    @classmethod
    def of(cls, model, cfg, filter_fn, opts, batches) -> _TensorParallel | None:
        if not _dist.model_is_sharded(model):
            return None
        _dist.require_process_group("fastllm.optimize on a sharded model")
        shards = {}
        for name, m in model.named_modules():
            if _is_conv1d(m) and _dist.is_dtensor(m.weight):
                raise ValueError(f"layer {name!r}: a sharded Conv1D, which fastllm does not swap")
            if isinstance(m, nn.Linear):
                shard = _dist.linear_shard(m, name)
                if shard is not None:
                    shards[name] = shard
        mesh = _dist.model_mesh(shards.values())
        _dist.check_heads(shards, _dist.head_dims(model))
        handlings = {}
        for name, m in model.named_modules() if cfg is not None else ():
            if not isinstance(m, nn.Linear) or _name_matches(name, cfg.skip):
                continue
            if filter_fn is not None and not filter_fn(name, m):
                continue
            shard = shards.get(name)
            if shard is None:
                if _dist.is_dtensor(m.weight):
                    raise ValueError(
                        f"layer {name!r}: its weight is a replicated DTensor; fastllm swaps "
                        "layers sharded colwise or rowwise (keep it in float with skip=...)"
                    )
                continue
            handlings[name] = _dist.handling(model, name, m, shard)
            try:
                _would_take(cfg.kind, m, cfg)
            except ValueError:
                continue  # skipped, as in one process
            _dist.check_boundaries(name, shard, cfg.kind, cfg.block_size)
        if mesh is None:  # only embeddings or other layers fastllm does not swap are sharded
            return None
        signature = repr((opts, None if batches is None else len(batches),
                          sorted((n, s.style, s.ranges) for n, s in shards.items())))  # fmt: skip
        _dist.agree(mesh, "fastllm.optimize", signature)
        return cls(mesh, shards, handlings)

    def note(self) -> str:
        n_col = sum(s.style == _dist.COLWISE for s in self.shards.values())
        return (
            f"tensor parallel: {self.mesh.size()} ranks ({self.mesh.device_type}), this is rank "
            f"{self.mesh.get_local_rank()}; {len(self.shards)} sharded linear layers "
            f"({n_col} colwise, {len(self.shards) - n_col} rowwise), each rank swaps its shard"
        )

    def build(self, kind, child, name, cfg, smooth_scales, act_norms, method) -> nn.Module:
        """The fastllm module for this rank's shard of layer `name`, with the engine's
        input/output handling. ValueError (the layer is skipped) where one process would
        not take the whole layer."""
        _would_take(kind, child, cfg)
        shard = self.shards[name]
        lin = _dist.local_linear(child)
        act_norm = act_norms.get(name) if act_norms is not None and method == "wanda" else None
        if act_norm is not None and not isinstance(act_norm, torch.Tensor):
            act_norm = act_norm.norm  # fastllm.calibration.InputStats
        act_norm = shard.in_slice(act_norm)
        row_max = shard.row_max if shard.style == _dist.ROWWISE else None
        cls = _LINEAR_MODULES[kind]
        if cls is Int8Linear:
            scale = shard.in_slice(smooth_scales.get(name) if smooth_scales is not None else None)
            new = Int8Linear.from_linear(lin, mode=kind, smooth_scale=scale, row_max=row_max)
        elif cls is BlockSparseLinear:
            m = method if act_norm is not None else "magnitude"
            mask = self._block_mask(shard, lin, name, cfg, m, act_norm)
            new = BlockSparseLinear.from_linear(lin, block_size=cfg.block_size, mask=mask)
        else:
            m = method if act_norm is not None else "magnitude"
            new = Sparse24Linear.from_linear(
                lin, method=m, act_norm=act_norm, int8=kind == "2:4+w8a8", row_max=row_max
            )
        new.tp = shard
        self.handlings[name].attach(new)
        return new

    @staticmethod
    def _block_mask(shard, lin, name, cfg, method, act_norm) -> torch.Tensor:
        """This shard's part of the whole layer's choice of tiles: the tile scores of every
        rank joined (one collective), the highest kept, this rank's tiles taken."""
        import importlib

        _prune = importlib.import_module("fastllm.sparse.prune")  # the package exports prune()
        bn, bk = cfg.block_size
        tiles = _prune.tile_scores(lin.weight, method, block_size=(bn, bk), act_norm=act_norm)
        whole = _dist.gather_cat(tiles, shard.mesh, shard.dim, f"tile scores of {name!r}")
        keep = _prune.keep_tiles(whole, cfg.density)
        unit = bn if shard.style == _dist.COLWISE else bk
        part = slice(shard.start // unit, shard.stop // unit)
        keep = keep[part] if shard.style == _dist.COLWISE else keep[:, part]
        return _prune.expand_tiles(keep, (bn, bk))


# --- forcing a backend for a model ---------------------------------------------------------


def _force_backend(model: nn.Module, name: str) -> None:
    for h in getattr(model, "_fastllm_backend_hooks", ()):
        h.remove()
    tokens: list = []

    def enter(module, args, kwargs=None):
        tokens.append(_backend._forced.set(name))

    def leave(module, args, output, kwargs=None):
        if tokens:
            _backend._forced.reset(tokens.pop())

    model._fastllm_backend_hooks = (
        model.register_forward_pre_hook(enter),
        model.register_forward_hook(leave, always_call=True),
    )
