"""fastllm models as transformers checkpoints: `save_pretrained` / `from_pretrained` through
transformers' quantizer registry (the route torchao and bitsandbytes take).

    from fastllm.hf import FastllmConfig
    model = AutoModelForCausalLM.from_pretrained(float_path,
        quantization_config=FastllmConfig(linear="w8a16"))       # optimized while loading
    model.save_pretrained("out/")       # config.json carries the fastllm quantization_config
    model = AutoModelForCausalLM.from_pretrained("out/")   # in any process that imported fastllm

Two kinds of checkpoint, told apart by the config's `modules`:

- A float checkpoint given `quantization_config=FastllmConfig(linear=..., ...)` (no
  `modules`): transformers loads the float weights, then `fastllm.optimize` runs on the
  loaded model with the config's options (`_process_model_after_weight_loading`). It uses
  the calibration-free methods (per-token w8a8 without SmoothQuant, magnitude pruning)
  unless the config carries `calibration=` batches, which SmoothQuant and Wanda then use
  while loading. The batches stay in memory: they are not written to config.json (batches
  of tensors are not JSON, and a checkpoint needs only what they produced: the tensors).
- A checkpoint written by `save_pretrained` of a fastllm-optimized model: its
  `quantization_config` records, for each swapped layer, the fastllm module type and its
  constructor arguments (the records `fastllm.save` writes to fastllm.json). Before the
  weights are read (`_process_model_before_weight_loading`), each recorded layer of the
  model skeleton becomes an empty fastllm module of that type (built by fastllm.serialize,
  as `fastllm.load` builds them), checked against the checkpoint's safetensors headers:
  every tensor present, integer dtypes exact, shapes equal (a BlockSparseLinear takes the
  checkpoint's number of kept tiles). transformers then loads the int8 weights, scales,
  compressed sparse weights and the norms SmoothQuant rescaled straight into them: nothing
  is quantized, pruned or calibrated again, so the model is the saved one, tensor for
  tensor. After loading, the values the kernels trust (scales finite and > 0, 2:4
  metadata, block indices) are checked as `fastllm.load` checks them, fastllm attention is
  switched on if it was on, a forced backend is forced again, and `fastllm.report(model)`
  works. A layer tied to another (lm_head to the embeddings) that fastllm swapped is
  loaded untied, as it was saved.

`save_pretrained` records the model as it is when saved (a later `fastllm.optimize` call
included). `fastllm.optimize` and `fastllm.load` attach the quantizer to the transformers
models they return (`attach(model)`), so those save this way too.

Registration, and why `import fastllm` stays fast: transformers reads quantization configs
from two registries in `transformers.quantizers.auto`, a module `from_pretrained` always
has imported first (through `transformers.modeling_utils`). Importing transformers takes
seconds, so `import fastllm` must not do it. `fastllm/__init__.py` calls
`register_on_import()`: if `transformers.quantizers.auto` is already imported, fastllm
registers at once; otherwise a small finder on `sys.meta_path` waits for that one module,
and fastllm registers right after transformers has run it (the finder then removes
itself). So registration costs nothing in a process that never uses transformers, and
no transformers code is patched. This module imports no transformers code either:
`FastllmConfig` and `FastllmHfQuantizer` subclass transformers' classes, so they are built
on first use (module `__getattr__`, also what `fastllm.hf.FastllmConfig` goes through).
"""

from __future__ import annotations

import copy
import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

NAME = "fastllm"  # quant_method in config.json
_REGISTRY = "transformers.quantizers.auto"  # where transformers keeps both registries
_LAZY = ("FastllmConfig", "FastllmHfQuantizer")

registration_error: str | None = None  # why registering with transformers failed, if it did


def _opt():
    # the module, not the function `fastllm.optimize` that shadows it on the package
    return importlib.import_module("fastllm.optimize")


def _serialize():
    return importlib.import_module("fastllm.serialize")


# --- what a FastllmConfig holds, checked --------------------------------------------------


def _linear_dict(linear, options: dict) -> dict | None:
    """`linear` (+ LinearConfig options) as LinearConfig.to_dict(), or None."""
    opt = _opt()
    unknown = sorted(set(options) - set(opt.LINEAR_OPTIONS))
    if unknown:
        raise ValueError(
            f"FastllmConfig got unknown argument(s) {unknown}; it takes linear, attention, "
            f"backend, calibration and, for linear layers, {list(opt.LINEAR_OPTIONS)}"
        )
    if isinstance(linear, dict):  # as config.json holds it
        fields = set(opt.LinearConfig.__dataclass_fields__)
        if "kind" not in linear or not set(linear) <= fields:
            raise ValueError(
                f"linear is {linear!r}; expected one of {opt.LINEAR_KINDS} or an object with "
                f"a 'kind' and some of the fields {sorted(fields - {'kind'})}"
            )
        linear = opt.LinearConfig(**linear)
    cfg = opt._make_linear_config(linear, options)
    return cfg.to_dict() if cfg is not None else None


def _check_modules(modules) -> dict | None:
    """The per-layer records (fastllm.json's "modules"), every field type-checked."""
    from fastllm.nn.int8 import MODES

    s = _serialize()
    if modules is None:
        return None
    if not isinstance(modules, dict):
        raise ValueError(f"modules is {s._show(modules)}; expected null or an object")
    for name, info in modules.items():
        where = f"quantization_config.modules[{name!r}]"
        if not isinstance(info, dict):
            raise ValueError(f"{where} is {s._show(info)}; expected an object")
        kinds = tuple(s._LAYER_TYPES)
        kind = s._field(info, "kind", s._one_of(kinds), f"one of {kinds}", where)
        types = s._LAYER_TYPES[kind]
        typ = s._field(info, "type", s._one_of(types), f"one of {types}", where)
        s._field(info, "from", s._is_str, "a string", where)
        args = s._field(info, "args", s._is_dict, "an object", where, {})
        if typ == "Int8Linear":
            s._field(args, "mode", s._one_of(MODES), f"one of {MODES}", where)
            s._field(args, "smooth", s._is_bool, "true or false", where, False)
        elif typ == "Sparse24Linear":
            s._field(args, "int8", s._is_bool, "true or false", where, False)
        elif typ == "BlockSparseLinear":
            s._field(args, "block_size", s._is_block_size, "[bn, bk], two ints > 0", where)
    return copy.deepcopy(modules)


def _batches(calibration) -> list | None:
    if calibration is None:
        return None
    if isinstance(calibration, torch.Tensor) or not hasattr(calibration, "__iter__"):
        raise ValueError(
            f"calibration must be an iterable of batches (a list of input_ids tensors, of "
            f"dicts, ...) or None, got {type(calibration).__name__}"
        )
    batches = list(calibration)
    if not batches:
        raise ValueError("calibration is empty; pass at least one batch, or None")
    return batches


# --- the config of an optimized model -----------------------------------------------------


def _report(model: nn.Module):
    rep = getattr(model, _opt()._REPORT_ATTR, None)
    if rep is None:
        raise ValueError(
            f"{type(model).__name__} was not optimized by fastllm.optimize (no report attached)"
        )
    return rep


def module_records(model: nn.Module) -> dict:
    """{layer name: {"kind", "from", "type", "args"}} for every fastllm module `optimize`
    put in `model`: the records fastllm.save writes to fastllm.json."""
    s = _serialize()
    modules = dict(model.named_modules())
    records = {}
    for e in _report(model).layers:
        if e.kind not in s._LAYER_TYPES:  # fused modules, hooks: made again after loading
            continue
        if e.action in ("swapped", "kept") and e.name and e.name in modules:
            m = modules[e.name]
            records[e.name] = {
                "kind": e.kind,
                "from": e.before,
                "type": type(m).__name__,
                "args": s._module_args(m),
            }
    return records


def config_for(model: nn.Module):
    """The FastllmConfig recording `model` (optimized by fastllm.optimize, or loaded): what
    save_pretrained writes to config.json, and what from_pretrained rebuilds without
    calibration data."""
    rep = _report(model)
    options = copy.deepcopy(rep.options)
    attention = any(
        e.kind == "attention" and e.name == "" and e.action in ("swapped", "kept")
        for e in rep.layers
    )  # as fastllm.save records "hf_attention"
    config_cls, _ = _classes()
    return config_cls(
        linear=options.get("linear"),
        attention=attention,
        fuse=options.get("fuse", False),
        unpad=options.get("unpad", False),
        backend=options.get("backend"),
        modules=module_records(model),
        options=options,
        calibration_report=rep.calibration,
    )


def attach(model: nn.Module) -> nn.Module:
    """Gives a transformers model optimized by `fastllm.optimize` (or `fastllm.load`) the
    fastllm quantizer, and the config recording its layers in
    `model.config.quantization_config`, so that `model.save_pretrained(dir)` writes a
    checkpoint `from_pretrained(dir)` rebuilds. Returns `model`."""
    from fastllm import hf

    if not hf.is_hf_model(model):
        raise ValueError(
            f"model is a {type(model).__name__}, not a transformers PreTrainedModel; "
            "fastllm.save saves other models"
        )
    config = config_for(model)
    _, quantizer_cls = _classes()
    if isinstance(getattr(model, "hf_quantizer", None), quantizer_cls):
        model.hf_quantizer.quantization_config = config
    else:
        model.hf_quantizer = quantizer_cls(config, pre_quantized=True)
    model.config.quantization_config = config
    return model


# --- loading: before and after transformers reads the weights ------------------------------


def _locate(model: nn.Module, name: str, typ: str) -> tuple[nn.Module, str, nn.Module]:
    parent_name, _, attr = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name)
    except AttributeError:
        parent = None
    old = getattr(parent, attr, None) if parent is not None else None
    if not isinstance(old, nn.Module):
        raise ValueError(
            f"quantization_config.modules records layer {name!r} ({typ}), which "
            f"{type(model).__name__} does not have; was the checkpoint saved from another model?"
        )
    return parent, attr, old


def _headers(checkpoint_files) -> dict[str, tuple[Path, dict]]:
    """{tensor name: (file, {"dtype", "shape", ...})} over the checkpoint's safetensors files."""
    s = _serialize()
    found = {}
    for f in checkpoint_files:
        path = Path(f)
        if path.suffix != ".safetensors":
            raise ValueError(
                f"{path}: a fastllm checkpoint is made of safetensors files (save_pretrained "
                "writes them)"
            )
        for name, info in s.read_header(path).items():
            found[name] = (path, info)
    return found


def _check_against_checkpoint(new: nn.Module, name: str, headers: dict, where: Path) -> None:
    """Every tensor of the empty fastllm module `new` must be in the checkpoint with the
    same shape and, for integer tensors, the same dtype (float ones are cast on loading,
    as transformers casts every float tensor). A BlockSparseLinear takes the checkpoint's
    number of kept tiles."""
    s = _serialize()
    typ = type(new).__name__
    for buf, t in list(new.named_buffers(recurse=False)):
        key = f"{name}.{buf}"
        if key not in headers:
            raise ValueError(
                f"{where}: tensor {key!r} is missing from the checkpoint; its config.json "
                f"records layer {name!r} as {typ}"
            )
        path, info = headers[key]
        dtype, shape = s._DTYPES.get(info["dtype"]), tuple(info["shape"])
        if typ == "BlockSparseLinear" and buf in ("col_indices", "blocks"):
            if len(shape) == t.dim() and shape[1:] == tuple(t.shape[1:]):
                t = torch.empty(shape, dtype=t.dtype, device=t.device)
                setattr(new, buf, t)
        both_float = t.is_floating_point() and dtype is not None and dtype.is_floating_point
        if dtype != t.dtype and not both_float:
            raise ValueError(
                f"{path}: tensor {key!r} has dtype {info['dtype']}; the {typ} expects {t.dtype}"
            )
        if shape != tuple(t.shape):
            raise ValueError(
                f"{path}: tensor {key!r} has shape {shape}; the {typ} expects {tuple(t.shape)}"
            )


def _without_extra_state(module, state_dict, prefix, local_metadata) -> None:
    state_dict.pop(prefix + "_extra_state", None)


def _own_unsaved_buffers(module: nn.Module) -> list[str]:
    return [n for n in module._non_persistent_buffers_set if module._buffers.get(n) is not None]


def _swap_in_empty_modules(model: nn.Module, config, checkpoint_files) -> list:
    """Replaces each recorded layer of the model skeleton (on the meta device) by an empty
    fastllm module of the recorded type, checked against the checkpoint's headers.

    Returns handles of state_dict hooks, to remove once the weights are in: while they
    load, the modules' non-tensor state (Int8Linear's mode, which the constructor set from
    the record) is kept out of the state dict, where transformers' loader would take it
    for a missing tensor."""
    s, opt = _serialize(), _opt()
    hooks = []
    if not config.modules:
        return hooks
    if not checkpoint_files:
        raise ValueError(
            "a fastllm checkpoint loads from safetensors files; from_pretrained got none "
            "(loading from a state_dict= or a GGUF file is not supported)"
        )
    headers = _headers(checkpoint_files)
    where = Path(checkpoint_files[0]).parent
    tied = getattr(model, "all_tied_weights_keys", None) or {}  # {tied tensor: its source}
    for name in sorted(config.modules, key=lambda n: n.count(".")):  # parents first
        info = config.modules[name]
        parent, attr, old = _locate(model, name, info["type"])
        if info["kind"] == "linear" and not (isinstance(old, nn.Linear) or opt._is_conv1d(old)):
            raise ValueError(
                f"quantization_config.modules records layer {name!r} as {info['type']} made "
                f"from a linear layer; {type(model).__name__} has a {type(old).__name__} there"
            )
        # the skeleton is built with "meta" as the default device: the module's tensors go
        # there (the constructors take the float layer's device), the constructors' small
        # helper tensors (Sparse24Linear's metadata pattern, read with .item()) on the CPU
        with torch.device("cpu"):
            new = s._rebuild(old, info, name, where)
        _check_against_checkpoint(new, name, headers, where)
        if type(new).get_extra_state is not nn.Module.get_extra_state:
            hooks.append(new.register_state_dict_post_hook(_without_extra_state))
        setattr(parent, attr, new)
        # a layer tied to another (lm_head to the embeddings) is untied once swapped: the
        # checkpoint holds its own tensors, and transformers must not tie it back
        for key in [k for k in tied if k.startswith(name + ".")]:
            del tied[key]
        # transformers then initializes, module by module, what the checkpoint did not
        # fill. The fastllm module is filled; its parent's init may reach into it by name
        # (GPT-2 redraws `c_proj.weight`, which a sparse module does not have). A parent
        # whose own tensors are all saved has nothing left to initialize.
        new._is_hf_initialized = True
        if not _own_unsaved_buffers(parent):
            parent._is_hf_initialized = True
    return hooks


def _finish_loading(model: nn.Module, config, checkpoint_files) -> None:
    """Once the checkpoint's tensors are in: checks the values the kernels trust, switches
    fastllm attention on, forces the backend and attaches the report (as fastllm.load)."""
    from fastllm import hf

    s, opt = _serialize(), _opt()
    where = Path(checkpoint_files[0]).parent if checkpoint_files else Path(".")
    if config.modules:
        tensors = {n: t for n, t in model.state_dict().items() if isinstance(t, torch.Tensor)}
        s._check_values(model, tensors, {}, where)
    options = config.options or {"attention": config.attention, "linear": config.linear,
                                 "backend": config.backend}  # fmt: skip
    rep = opt.Report(
        options=copy.deepcopy(options), calibration=config.calibration_report or "none"
    )
    if config.attention:
        why = hf.unsupported_reason(model)
        if why is not None:
            raise ValueError(
                f"{where}: quantization_config has attention=true, but fastllm attention "
                f"cannot be switched on for {type(model).__name__}: {why}"
            )
        rep.layers.append(opt.hf_attention_entry(hf.enable(model)))
    modules = dict(model.named_modules())
    for name, info in (config.modules or {}).items():
        rep.layers.append(
            opt.LayerEntry(name, info["kind"], "swapped", info["from"],
                           type(modules[name]).__name__)
        )  # fmt: skip
    if config.backend is not None:
        opt._force_backend(model, config.backend)
    setattr(model, opt._REPORT_ATTR, rep)
    if config.fuse:
        rep.options["fuse"] = True
        opt.apply_fusion(model)
    if config.unpad:
        rep.options["unpad"] = True
        opt.apply_unpad(model)


# --- registration --------------------------------------------------------------------------


def register() -> None:
    """Registers "fastllm" in transformers' quantization config and quantizer registries
    (imports transformers; registering twice does nothing)."""
    auto = importlib.import_module(_REGISTRY)
    config_cls, quantizer_cls = _classes()
    if auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(NAME) is not config_cls:
        auto.register_quantization_config(NAME)(config_cls)
    if auto.AUTO_QUANTIZER_MAPPING.get(NAME) is not quantizer_cls:
        auto.register_quantizer(NAME)(quantizer_cls)


def _register_quietly() -> None:
    """register(), run inside transformers' own import: a failure there (a transformers
    without these registries, "fastllm" registered by another package) must not break
    importing transformers, so it becomes a warning and `registration_error`."""
    global registration_error
    try:
        register()
        registration_error = None
    except (ImportError, AttributeError, ValueError) as e:
        registration_error = f"{type(e).__name__}: {e}"
        warnings.warn(
            f"fastllm could not register its transformers quantizer ({registration_error}); "
            "from_pretrained of fastllm checkpoints will not work in this process",
            RuntimeWarning,
            stacklevel=2,
        )


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Finds no module itself. When `transformers.quantizers.auto` is about to be imported,
    it leaves sys.meta_path, asks the other finders for that module and wraps its loader,
    so that fastllm registers right after the module has run."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _REGISTRY:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = module.__spec__.loader = self.loader  # the module's own, again
        self.loader.exec_module(module)
        _register_quietly()


def register_on_import() -> None:
    """Registers now if transformers' registries are imported, else as soon as they are
    (see the module docstring). `import fastllm` calls it; it imports nothing."""
    if _REGISTRY in sys.modules:
        _register_quietly()
    elif not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())


# --- the transformers classes, built on first use ------------------------------------------


def __getattr__(name: str):
    if name in _LAZY:
        return dict(zip(_LAZY, _classes()))[name]
    raise AttributeError(f"fastllm.hf_quantizer (and fastllm.hf) has no attribute {name!r}")


_built: tuple[type, type] | None = None


def _classes() -> tuple[type, type]:
    """(FastllmConfig, FastllmHfQuantizer), defined the first time they are needed."""
    global _built
    if _built is not None:
        return _built
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    if _built is not None:  # that import ran transformers.quantizers.auto: fastllm registered
        return _built

    class FastllmConfig(QuantizationConfigMixin):
        """fastllm as a transformers quantization config.

            from_pretrained(path, quantization_config=FastllmConfig(linear="w8a16"))
            from_pretrained(path, quantization_config=FastllmConfig(linear="w8a8",
                                                                    calibration=batches))

        Args, as `fastllm.optimize` takes them:
            linear: None (linear layers stay float), one of "w8a8", "w8a16", "2:4", "block",
                "2:4+w8a8", or a fastllm.LinearConfig.
            attention: switch the model to fastllm attention (default True). In a saved
                checkpoint's config: whether it was on.
            fuse: also swap in the fused modules (fastllm.optimize's fuse=); in a saved
                checkpoint's config: they are built again after its tensors load.
            unpad: run the encoder on the valid tokens of a padded batch only
                (fastllm.optimize's unpad=); in a saved checkpoint's config: hooked again.
            backend: force one fastllm backend for every forward pass; None: chosen per call.
            calibration: batches for SmoothQuant (w8a8) and Wanda (sparse) when a float
                checkpoint is optimized while loading. Kept in memory only, never written
                to config.json; None: the calibration-free methods.
            **options: LinearConfig fields (smoothquant, alpha, method, density, block_size,
                skip, unfoldable).

        Written by save_pretrained, read back by from_pretrained:
            modules: {layer name: {"kind", "from", "type", "args"}}, the fastllm module each
                layer is, built empty before the checkpoint's tensors load into it (a saved
                fastllm checkpoint). None: a float checkpoint, optimized after loading.
            options, calibration_report: what fastllm.optimize recorded, for fastllm.report.
            version: the version of the records (fastllm.serialize.VERSION).

        Raises ValueError naming the argument, the value and what was expected.
        """

        def __init__(
            self,
            linear=None,
            *,
            attention: bool = True,
            fuse: bool = False,
            unpad: bool = False,
            backend: str | None = None,
            calibration=None,
            modules: dict | None = None,
            options: dict | None = None,
            calibration_report: str | None = None,
            version: int | None = None,
            quant_method: str = NAME,
            **linear_options,
        ):
            from fastllm.backend import BACKENDS

            s = _serialize()
            if quant_method != NAME:
                raise ValueError(f"quant_method is {quant_method!r}; expected {NAME!r}")
            if version is not None and version != s.VERSION:
                raise ValueError(
                    f"version is {version!r}; this fastllm reads version {s.VERSION} (save the "
                    "model again with this version)"
                )
            if not isinstance(attention, bool):
                raise ValueError(f"attention must be True or False, got {attention!r}")
            if not isinstance(fuse, bool):
                raise ValueError(f"fuse must be True or False, got {fuse!r}")
            if not isinstance(unpad, bool):
                raise ValueError(f"unpad must be True or False, got {unpad!r}")
            if backend is not None and backend not in BACKENDS:
                raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")
            if options is not None and not isinstance(options, dict):
                raise ValueError(f"options is {s._show(options)}; expected None or a dict")
            if calibration_report is not None and not isinstance(calibration_report, str):
                raise ValueError(
                    f"calibration_report is {s._show(calibration_report)}; expected a string"
                )
            if modules is not None and calibration is not None:
                raise ValueError(
                    "calibration applies to float checkpoints (modules=None); this config "
                    "records a fastllm checkpoint, whose tensors are already calibrated"
                )
            self.quant_method = NAME
            self.version = s.VERSION
            self.linear = _linear_dict(linear, linear_options)
            self.attention = attention
            self.fuse = fuse
            self.unpad = unpad
            self.backend = backend
            self.modules = _check_modules(modules)
            self.options = copy.deepcopy(options)
            self.calibration_report = calibration_report
            self.calibration = _batches(calibration)
            if self.modules is None and self.calibration is None and self.linear is not None:
                for option, value, needs in (("smoothquant", True, "SmoothQuant"),
                                             ("method", "wanda", "Wanda")):  # fmt: skip
                    if self.linear[option] == value:
                        raise ValueError(
                            f"{option}={value!r} needs calibration batches for {needs}: "
                            "FastllmConfig(calibration=...)"
                        )

        def optimize_options(self) -> dict:
            """The keyword arguments of fastllm.optimize this config stands for."""
            linear = _opt().LinearConfig(**self.linear) if self.linear is not None else None
            return {
                "attention": self.attention,
                "linear": linear,
                "fuse": self.fuse,
                "unpad": self.unpad,
                "backend": self.backend,
            }

        def to_dict(self) -> dict:
            return {k: copy.deepcopy(v) for k, v in self.__dict__.items() if k != "calibration"}

        def __iter__(self):
            yield from self.to_dict().items()

        def __deepcopy__(self, memo):
            # transformers deep-copies the model's config, and this config with it: the
            # calibration batches (only read) are shared, not copied
            new = copy.copy(self)
            for k, v in self.__dict__.items():
                if k != "calibration":
                    setattr(new, k, copy.deepcopy(v, memo))
            return new

    class FastllmHfQuantizer(HfQuantizer):
        """transformers' side of FastllmConfig (see the fastllm.hf_quantizer docstring)."""

        requires_calibration = False

        def __init__(self, quantization_config, **kwargs):
            if not isinstance(quantization_config, FastllmConfig):
                raise TypeError(
                    "quantization_config must be a fastllm.hf.FastllmConfig, got "
                    f"{type(quantization_config).__name__}"
                )
            super().__init__(quantization_config, **kwargs)
            self.checkpoint_files = None
            self._hooks = []

        def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
            self.checkpoint_files = checkpoint_files
            self._hooks = _swap_in_empty_modules(model, self.quantization_config, checkpoint_files)
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            config = self.quantization_config
            while self._hooks:
                self._hooks.pop().remove()
            if config.modules is None:  # a float checkpoint: optimized now
                _opt().optimize(model, calibration=config.calibration, **config.optimize_options())
            else:
                _finish_loading(model, config, self.checkpoint_files)
            # from here on the config records the model (the caller's config is left as it was)
            self.quantization_config = model.config.quantization_config = config_for(model)
            return model

        def get_state_dict_and_metadata(self, model):
            # save_pretrained asks for the state dict before it writes config.json: the
            # config records the model as it is now. The state dict leaves out the
            # non-tensor entries (Int8Linear's mode), which safetensors cannot hold and the
            # records carry.
            self.quantization_config = model.config.quantization_config = config_for(model)
            state = {n: t for n, t in model.state_dict().items() if isinstance(t, torch.Tensor)}
            return state, {}

        def is_serializable(self, *args, **kwargs) -> bool:
            return True

        @property
        def is_trainable(self) -> bool:
            return False

        @property
        def is_compileable(self) -> bool:
            return True

    for cls in (FastllmConfig, FastllmHfQuantizer):  # where pickle finds them
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
    _built = (FastllmConfig, FastllmHfQuantizer)
    return _built
