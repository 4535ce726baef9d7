"""Saving and loading optimized models: the weights as safetensors, what was swapped as JSON.

    fastllm.save(model, "out/")          # out/fastllm.json + out/model.safetensors
    model = fastllm.load(float_model, "out/")     # or fastllm.load(hf_config, "out/")

`save` writes the model's whole state dict (int8 values and scales, compressed sparse
weights, and the float tensors, including norms that SmoothQuant rescaled) and a JSON
file with the format version, the options given to `optimize`, and for each swapped
layer its fastllm module type and constructor arguments.

`load` takes the float model (or, for transformers models, its config), swaps the same
layers with the recorded arguments (no calibration data needed: the recorded tensors
replace whatever the constructors compute), checks every tensor of the file against the
rebuilt model — name, shape, dtype, that the file holds all its bytes, and the values
the kernels trust (index ranges, 2:4 metadata, scales finite and > 0) — and only then
copies them in. Every field of both files is type-checked, and "weights" must name a
file inside the directory. Any problem raises ValueError naming the file and the key or
tensor, and undoes the swaps: a failed load leaves the model as it was.

Tensor parallelism (fastllm.distributed): one checkpoint for every TP size. `save` on a
sharded model is called on every rank; the shards are gathered on one rank, which writes
the same files one process would (the whole layers, in the same layout). `load` into a
sharded float model (from_pretrained(..., tp_plan="auto"), fastllm.distributed.parallelize)
rebuilds each rank's shard of the swapped layers and reads only that rank's slice of each
tensor from the safetensors file, so that its memory is proportional to its shard.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from torch import nn

from fastllm import distributed as _dist
from fastllm.sparse.format import BlockSparseWeight, check_block_sparse, decompress_24

FORMAT = "fastllm"
VERSION = 1
CONFIG_FILE = "fastllm.json"
WEIGHTS_FILE = "model.safetensors"

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _optimize_module():
    # the module, not the function `fastllm.optimize` that shadows it on the package
    import importlib

    return importlib.import_module("fastllm.optimize")


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError:
        raise ImportError(
            "fastllm.save/load need the safetensors package: pip install safetensors"
        ) from None
    return st


# --- save ----------------------------------------------------------------------------------


def _module_args(module: nn.Module) -> dict:
    """What `_rebuild` needs to construct the same module again (beyond the float layer)."""
    name = type(module).__name__
    if name == "Int8Linear":
        return {"mode": module.mode, "smooth": getattr(module, "smooth_scale", None) is not None}
    if name == "Sparse24Linear":
        return {"int8": bool(module.int8)}
    if name == "BlockSparseLinear":
        return {"block_size": list(module.block_size)}
    return {}


def _hf_info(model: nn.Module) -> dict | None:
    from fastllm import hf

    if not hf.is_hf_model(model):
        return None
    return {
        "class": type(model).__name__,
        "config": model.config.to_dict(),
    }


def save(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Writes `model` (optimized by fastllm.optimize) to `directory`; returns the directory."""
    from fastllm.optimize import _REPORT_ATTR

    rep = getattr(model, _REPORT_ATTR, None)
    if rep is None:
        raise ValueError(
            f"{type(model).__name__} was not optimized by fastllm.optimize; nothing to save "
            "(use torch.save or the model's own save method for a float model)"
        )
    st = _safetensors()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    state = model.state_dict()
    mesh = _model_mesh(model)
    whole = None
    if mesh is not None:  # every rank calls save; one of them writes
        _dist.agree(mesh, "fastllm.save", repr([(n, _global_shape(model, n, t))
                                                for n, t in state.items()]))  # fmt: skip
        whole = _gather_state(model, state, mesh)  # None on the ranks that do not write
        if whole is None:
            _dist.barrier(mesh, "fastllm.save: waiting for the rank that writes")
            return directory
    tensors, aliases, seen, extra = {}, {}, {}, {}
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):  # get_extra_state() of a module: kept in the JSON
            extra[name] = t
            continue
        lt = _dist.local(t)
        key = (lt.untyped_storage().data_ptr(), lt.storage_offset(), tuple(lt.shape), lt.stride())
        if lt.numel() and key in seen:  # tied weights are stored once
            aliases[name] = seen[key]
            continue
        seen[key] = name
        if whole is not None:
            t = whole[name]
        tensors[name] = t.detach().contiguous().cpu()

    modules = dict(model.named_modules())
    swapped = {}
    for e in rep.layers:
        if e.action not in ("swapped", "kept") or e.name not in modules or e.name == "":
            continue
        if e.kind not in _LAYER_TYPES:  # fused modules, hooks: made again by load (options)
            continue
        m = modules[e.name]
        swapped[e.name] = {
            "kind": e.kind,
            "from": e.before,
            "type": type(m).__name__,
            "args": _module_args(m),
        }
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "options": rep.options,
        "calibration": rep.calibration,
        "hf_attention": any(
            e.kind == "attention" and e.name == "" and e.action in ("swapped", "kept")
            for e in rep.layers
        ),
        "modules": swapped,
        "aliases": aliases,
        "extra_state": extra,
        "dtype": str(next((p.dtype for p in model.parameters() if p.is_floating_point()),
                          torch.float32)).removeprefix("torch."),
        "hf": _hf_info(model),
        "weights": WEIGHTS_FILE,
    }  # fmt: skip
    if mesh is not None:
        meta["saved_from"] = {"tp_size": mesh.size()}  # informational: loads at any TP size
    tmp = directory / (WEIGHTS_FILE + ".tmp")
    st.save_file(tensors, str(tmp), metadata={"format": FORMAT, "version": str(VERSION)})
    os.replace(tmp, directory / WEIGHTS_FILE)
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=1, default=str) + "\n")
    if mesh is not None:
        _dist.barrier(mesh, "fastllm.save: telling the other ranks the files are written")
    return directory


# --- load ----------------------------------------------------------------------------------


_REQUIRED = object()

# what fastllm.load rebuilds: {"kind" of a layer in fastllm.json: its possible "type"s}
_LAYER_TYPES = {
    "layer": ("FusedTransformerEncoderLayer",),
    "attention": ("FusedMultiheadAttention",),
    "linear": ("Int8Linear", "Sparse24Linear", "BlockSparseLinear"),
}


def _show(value) -> str:
    """repr of a value read from a file, cut short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _field(obj: dict, key: str, ok, expected: str, where, default=_REQUIRED):
    """obj[key] if ok(obj[key]), `default` if the key is absent and has one; else
    ValueError naming `where`, the key, the value found and what was `expected`."""
    if key not in obj:
        if default is _REQUIRED:
            raise ValueError(f'{where}: "{key}" is missing; expected {expected}')
        return default
    if not ok(obj[key]):
        raise ValueError(f'{where}: "{key}" is {_show(obj[key])}; expected {expected}')
    return obj[key]


def _is_str(v) -> bool:
    return isinstance(v, str)


def _is_bool(v) -> bool:
    return isinstance(v, bool)


def _is_dict(v) -> bool:
    return isinstance(v, dict)


def _is_float_dtype(v) -> bool:
    dtype = getattr(torch, v, None) if isinstance(v, str) else None
    return isinstance(dtype, torch.dtype) and dtype.is_floating_point


def _is_block_size(v) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(type(b) is int and b > 0 for b in v)


def _is_shape(v) -> bool:
    return isinstance(v, list) and all(type(d) is int and d >= 0 for d in v)


def _is_offsets(v) -> bool:
    return (
        isinstance(v, list) and len(v) == 2 and all(type(o) is int for o in v) and 0 <= v[0] <= v[1]
    )


def _is_relative_name(v) -> bool:
    return (
        isinstance(v, str)
        and "\0" not in v
        and bool(Path(v).parts)
        and not Path(v).is_absolute()
        and ".." not in Path(v).parts
    )


def _one_of(choices: tuple):
    return lambda v: v in choices


def _read_meta(directory: Path) -> dict:
    """fastllm.json, with every field `load` reads type-checked ("weights": _weights_path)."""
    from fastllm.backend import BACKENDS
    from fastllm.nn.int8 import MODES

    path = directory / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; is {directory} a fastllm.save directory?")
    try:
        meta = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, or nested too deep
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: holds {_show(meta)}; expected a JSON object")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a fastllm save file (format {_show(meta.get('format'))})")
    if type(meta.get("version")) is not int or meta["version"] != VERSION:
        raise ValueError(
            f"{path}: format version {_show(meta.get('version'))} is not one this fastllm reads "
            f"(it reads version {VERSION}); save it again with this version"
        )
    options = _field(meta, "options", _is_dict, "an object", path)
    _field(options, "backend", _one_of((None, *BACKENDS)), f"null or one of {BACKENDS}", path, None)
    _field(options, "fuse", _is_bool, "true or false", path, False)
    _field(options, "unpad", _is_bool, "true or false", path, False)
    _field(meta, "calibration", _is_str, "a string", path, "none")
    _field(meta, "hf_attention", _is_bool, "true or false", path, False)
    _field(meta, "aliases", lambda v: _is_dict(v) and all(map(_is_str, v.values())),
           "an object mapping tensor names to tensor names", path)  # fmt: skip
    _field(meta, "extra_state", _is_dict, "an object", path, {})
    _field(meta, "dtype", _is_float_dtype, "a torch float dtype such as 'float16'", path, "float32")
    _field(meta, "hf", lambda v: v is None or (_is_dict(v) and _is_str(v.get("class"))),
           'null or an object with a "class" string', path, None)  # fmt: skip
    for name, info in _field(meta, "modules", _is_dict, "an object", path).items():
        where = f"{path}: layer {name!r}"
        if not isinstance(info, dict):
            raise ValueError(f"{where} is {_show(info)}; expected an object")
        kinds = tuple(_LAYER_TYPES)
        kind = _field(info, "kind", _one_of(kinds), f"one of {kinds}", where)
        types = _LAYER_TYPES[kind]
        typ = _field(info, "type", _one_of(types), f"one of {types}", where)
        _field(info, "from", _is_str, "a string", where)
        args = _field(info, "args", _is_dict, "an object", where, {})
        if typ == "Int8Linear":
            _field(args, "mode", _one_of(MODES), f"one of {MODES}", where)
            _field(args, "smooth", _is_bool, "true or false", where, False)
        elif typ == "Sparse24Linear":
            _field(args, "int8", _is_bool, "true or false", where, False)
        elif typ == "BlockSparseLinear":
            _field(args, "block_size", _is_block_size, "[bn, bk], two ints > 0", where, None)
    return meta


def _weights_path(directory: Path, meta: dict) -> Path:
    """The weights file fastllm.json names: a file inside `directory` (not an absolute
    path, no "..", not a link to a file elsewhere), or ValueError."""
    where, expected = directory / CONFIG_FILE, f"a file name inside {directory}/"
    name = _field(meta, "weights", _is_relative_name, expected, where)
    path = directory / name
    real, root = path.resolve(), directory.resolve()
    if real == root or not real.is_relative_to(root):
        raise ValueError(
            f'{where}: "weights" is {name!r}, which resolves to {real}, outside {directory}/; '
            f"expected {expected}"
        )
    return path


def read_header(path: Path) -> dict[str, dict]:
    """{tensor name: {"dtype", "shape", "data_offsets"}} of a safetensors file, checked
    against the file's size (a truncated file names its first incomplete tensor)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: truncated ({size} bytes, no safetensors header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ValueError(
                f"{path}: truncated (header of {n} bytes announced, {size - 8} bytes in the file)"
            )
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, or nested too deep
            raise ValueError(f"{path}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: safetensors header is {_show(header)}; expected a JSON object")
    _field(header, "__metadata__", lambda v: v is None or _is_dict(v), "an object", path, None)
    header.pop("__metadata__", None)
    for name, info in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict):
            raise ValueError(f"{where} is {_show(info)}; expected an object")
        _field(info, "dtype", _is_str, "a string such as 'F32'", where)
        _field(info, "shape", _is_shape, "a list of ints >= 0", where)
        _field(info, "data_offsets", _is_offsets, "[begin, end], ints 0 <= begin <= end", where)
    data = size - 8 - n
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        if info["data_offsets"][1] > data:
            raise ValueError(
                f"{path}: tensor {name!r} is truncated (needs bytes up to "
                f"{info['data_offsets'][1]} of the data section, the file has {data})"
            )
    return header


def _model_from_config(config, meta: dict, directory: Path) -> nn.Module:
    hf_meta = meta.get("hf")
    if hf_meta is None:
        raise ValueError(
            f"{directory / CONFIG_FILE}: saved from a model that is not a transformers model; "
            "pass that model (in float) to fastllm.load instead of a config"
        )
    import transformers

    cls = getattr(transformers, hf_meta["class"], None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(
            f"{directory / CONFIG_FILE}: model class {hf_meta['class']!r} is not in this "
            f"transformers {transformers.__version__}"
        )
    model = cls(config)
    dtype = getattr(torch, meta.get("dtype", "float32"))  # a float dtype: _read_meta checked
    return model.to(dtype).eval()


def _undo(swaps) -> None:
    for parent, attr, old in reversed(swaps):
        setattr(parent, attr, old)


def load(model_or_config, directory: str | os.PathLike) -> nn.Module:
    """Rebuilds the model saved by `fastllm.save` in `directory` and returns it.

    model_or_config: the float model the optimized one was built from (modified in place),
    or a transformers config (the model class is taken from the save).
    """
    _opt = _optimize_module()
    directory = Path(directory)
    meta = _read_meta(directory)
    weights = _weights_path(directory, meta)
    header = read_header(weights)

    if isinstance(model_or_config, nn.Module):
        model = model_or_config
    elif hasattr(model_or_config, "to_dict") and hasattr(model_or_config, "model_type"):
        model = _model_from_config(model_or_config, meta, directory)
    else:
        raise TypeError(
            "model_or_config must be a torch.nn.Module or a transformers config, got "
            f"{type(model_or_config).__name__}"
        )
    if _opt.is_optimized(model):
        raise ValueError(
            f"{type(model).__name__} is already optimized; fastllm.load rebuilds from the float model"
        )

    # a sharded float model: checked the same way on every rank before anything changes
    shards = _float_shards(model)
    mesh = _dist.model_mesh(shards.values())
    if mesh is not None:
        _dist.require_process_group("fastllm.load into a sharded model")
        _dist.check_heads(shards, _dist.head_dims(model))
        _dist.agree(mesh, "fastllm.load", repr((sorted(header), sorted(meta["modules"].items()))))

    swaps = []  # (parent, attr, old module) to undo on failure
    previous_attn = None
    try:
        rep = _opt.Report(options=meta["options"], calibration=meta.get("calibration", "none"))
        if meta.get("hf_attention"):
            from fastllm import hf

            why = (
                hf.unsupported_reason(model)
                if hf.is_hf_model(model)
                else "not a transformers model"
            )
            if why is not None:
                raise ValueError(
                    f"{directory / CONFIG_FILE}: cannot restore fastllm attention: {why}"
                )
            previous_attn = hf.enable(model)
            rep.layers.append(_opt.hf_attention_entry(previous_attn))
        # parents first: an encoder layer is rebuilt before its self_attn
        for name in sorted(meta["modules"], key=lambda n: n.count(".")):
            info = meta["modules"][name]
            parent, attr, old = _locate(model, name, directory)
            new = _rebuild(old, info, name, directory, model, shards)
            setattr(parent, attr, new)
            swaps.append((parent, attr, old))
            rep.layers.append(_opt.LayerEntry(name, info["kind"], "swapped", info["from"],
                                              type(new).__name__))  # fmt: skip

        tensors = _read_checked(model, weights, header, meta["aliases"])
        extra = _check_extra(model, meta.get("extra_state", {}), directory)
        _check_values(model, tensors, meta["aliases"], weights)
    except BaseException:
        _undo(swaps)
        if previous_attn is not None:
            model.set_attn_implementation(previous_attn)
        raise
    # every check passed: nothing below can fail on the file's content
    state = {
        name: extra[name] if name in extra else tensors[meta["aliases"].get(name, name)]
        for name in model.state_dict()
    }
    model.load_state_dict(state, strict=True)
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoder) and swaps:
            m.use_nested_tensor = False
    model.eval()
    if meta["options"].get("backend") is not None:
        _opt._force_backend(model, meta["options"]["backend"])
    model._fastllm_report = rep
    if meta["options"].get("fuse"):
        _opt.apply_fusion(model)
    if meta["options"].get("unpad"):
        _opt.apply_unpad(model)
    _opt._attach_hf_quantizer(model)
    return model


def _locate(model: nn.Module, name: str, directory: Path):
    parent = model
    *path, attr = name.split(".")
    for p in path:
        parent = getattr(parent, p, None)
        if parent is None:
            break
    old = getattr(parent, attr, None) if parent is not None else None
    if old is None:
        raise ValueError(
            f"{directory / CONFIG_FILE}: layer {name!r} is not in the given "
            f"{type(model).__name__}; was it saved from a different model?"
        )
    return parent, attr, old


def _float_shards(model: nn.Module) -> dict:
    """{name: LinearShard} of the sharded nn.Linear layers of a float model."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            shard = _dist.linear_shard(m, name)
            if shard is not None:
                out[name] = shard
    return out


def _rebuild(
    old: nn.Module, info: dict, name: str, directory: Path, model=None, shards=None
) -> nn.Module:
    """The fastllm module `info` describes, built around the float module `old` (for a
    sharded `old`, this rank's shard, with the engine's input/output handling). Weights
    are placeholders: the file's tensors replace them."""
    import fastllm.nn as fnn

    _opt = _optimize_module()
    where = f"{directory / CONFIG_FILE}: layer {name!r}"
    kind, typ, args = info["kind"], info["type"], info.get("args", {})
    if kind in ("layer", "attention") and type(old).__name__ == typ:
        return old  # already fastllm's (fastllm.distributed.parallelize splits attention)
    if kind == "layer":
        if type(old) is not nn.TransformerEncoderLayer:
            raise ValueError(
                f"{where} should be a TransformerEncoderLayer, found {type(old).__name__}"
            )
        return _opt.FusedTransformerEncoderLayer.from_layer(old)
    cls = getattr(fnn, typ, None)
    if cls is None:
        raise ValueError(f"{where} is a {typ}, which this version of fastllm does not have")
    if kind == "attention":
        if not isinstance(old, nn.MultiheadAttention):
            raise ValueError(f"{where} should be a MultiheadAttention, found {type(old).__name__}")
        new = cls.from_module(old)
        _opt.record_attention_backend(new)
        return new
    if not (isinstance(old, nn.Linear) or _opt._is_conv1d(old)):
        raise ValueError(f"{where} should be a linear layer, found {type(old).__name__}")
    shard = (shards or {}).get(name)
    lin = old if shard is not None else _opt._as_linear(old)
    w = _dist.local(lin.weight)
    factory = {"device": w.device, "dtype": w.dtype}
    bias = lin.bias is not None
    in_f, out_f = lin.in_features, lin.out_features
    if shard is not None:
        handling = _dist.handling(model, name, old, shard)
        in_f, out_f = shard.local_in, shard.local_out
        unit = {"Sparse24Linear": "2:4", "BlockSparseLinear": "block"}.get(typ, typ)
        _dist.check_boundaries(name, shard, unit, tuple(args.get("block_size") or (64, 64)))
    if typ == "Sparse24Linear":
        new = cls(in_f, out_f, bias, int8=args.get("int8", False), **factory)
    elif typ == "BlockSparseLinear":
        bs = tuple(args.get("block_size") or (64, 64))
        new = cls(in_f, out_f, bias, block_size=bs, **factory)
    elif typ == "Int8Linear":
        smooth = bool(args.get("smooth", False))
        new = cls(in_f, out_f, bias, mode=args["mode"], smooth=smooth, **factory)
    else:
        raise ValueError(f"{where} is a {typ}, which fastllm.load does not rebuild")
    if shard is not None:
        new.tp = shard
        handling.attach(new)
    return new


def _check_extra(model: nn.Module, saved: dict, directory: Path) -> dict:
    """The non-tensor entries (get_extra_state) of the rebuilt model's state dict, checked
    against those saved in the JSON."""
    state = {n: v for n, v in model.state_dict().items() if not isinstance(v, torch.Tensor)}
    for name, value in state.items():
        if name not in saved:
            raise ValueError(f"{directory / CONFIG_FILE}: entry {name!r} of extra_state is missing")
        if saved[name] != value:
            raise ValueError(
                f"{directory / CONFIG_FILE}: extra_state {name!r} is {saved[name]!r}; the "
                f"rebuilt layer has {value!r}"
            )
    return {n: saved[n] for n in state}


def _read_checked(model: nn.Module, weights: Path, header: dict, aliases: dict) -> dict:
    st = _safetensors()
    expected = {n: t for n, t in model.state_dict().items() if isinstance(t, torch.Tensor)}
    sharded = _model_mesh(model) is not None
    names = {aliases.get(n, n) for n in expected}
    variable = {
        f"{prefix}.{b}" if prefix else b
        for prefix, m in model.named_modules()
        if type(m).__name__ == "BlockSparseLinear"
        for b in ("col_indices", "blocks")
    }
    missing = sorted(n for n in names if n not in header)
    if missing:
        raise ValueError(
            f"{weights}: tensor {missing[0]!r} is missing"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    unknown = sorted(set(header) - names)
    if unknown:
        raise ValueError(
            f"{weights}: tensor {unknown[0]!r} is not in the rebuilt model"
            + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
        )
    for name, t in expected.items():
        src = aliases.get(name, name)
        info = header[src]
        dtype = _DTYPES.get(info["dtype"])
        if dtype != t.dtype:
            raise ValueError(
                f"{weights}: tensor {src!r} has dtype {info['dtype']}; the model expects {t.dtype}"
            )
        shape, want = tuple(info["shape"]), tuple(t.shape)
        if sharded:  # the whole layer's shape (None: a BSR buffer of any length)
            want = _global_shape(model, name, t) or want
        if name in variable and len(shape) == len(want):  # kept tiles: any number
            shape, want = shape[1:], want[1:]
        if shape != want:
            raise ValueError(
                f"{weights}: tensor {src!r} has shape {tuple(info['shape'])}; the model "
                f"expects {_global_shape(model, name, t) if sharded else tuple(t.shape)}"
            )
    if sharded:
        return _read_sharded(weights, model, header, aliases)
    out = {}
    try:
        with st.safe_open(str(weights), framework="pt") as f:
            for name in header:
                out[name] = f.get_tensor(name)
    except Exception as e:  # safetensors raises its own error type
        raise ValueError(f"{weights}: cannot read tensor data ({e})") from None
    return out


# --- the values the kernels trust, checked in the file's tensors (one function per type) ----


def _check_scales(name: str, t: torch.Tensor) -> None:
    bad = (~(torch.isfinite(t) & (t > 0))).flatten().nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        raise ValueError(
            f"tensor {name!r} holds {t.flatten()[i].item()} at index {i}; "
            "expected finite scales > 0"
        )


def _check_int8_linear(m: nn.Module, layer: str, tensor) -> None:
    _check_scales(*tensor("weight_scale"))
    if m.smooth_scale is not None:  # SmoothQuant's factors, the input is divided by them
        _check_scales(*tensor("smooth_scale"))


def _check_sparse24_linear(m: nn.Module, layer: str, tensor) -> None:
    (_, values), (name, metadata) = tensor("values"), tensor("metadata")
    try:
        decompress_24(values, metadata, m.in_features)  # checks each group's two indices
    except ValueError as e:
        raise ValueError(f"tensor {name!r}: {e}") from None
    if m.int8:
        _check_scales(*tensor("weight_scale"))


def _check_block_sparse_linear(m: nn.Module, layer: str, tensor) -> None:
    crow, col, blocks = (tensor(b)[1] for b in ("crow_indices", "col_indices", "blocks"))
    bsw = BlockSparseWeight(crow, col, blocks, (m.out_features, m.in_features), m.block_size)
    try:
        check_block_sparse(bsw)  # crow from 0 to nnz, never decreasing; columns in range
    except ValueError as e:
        raise ValueError(f"layer {layer!r}: {e}") from None


_VALUE_CHECKS = {
    "Int8Linear": _check_int8_linear,
    "Sparse24Linear": _check_sparse24_linear,
    "BlockSparseLinear": _check_block_sparse_linear,
}


def _check_values(model: nn.Module, tensors: dict, aliases: dict, weights: Path) -> None:
    """ValueError naming the file and the tensor where the file's indices, metadata or
    scales for a rebuilt layer are ones its kernels cannot take."""
    for layer, m in model.named_modules():
        check = _VALUE_CHECKS.get(type(m).__name__)
        if check is None:
            continue

        def tensor(buffer, layer=layer):
            name = f"{layer}.{buffer}" if layer else buffer
            name = aliases.get(name, name)
            return name, tensors[name]

        try:
            check(m, layer, tensor)
        except ValueError as e:
            raise ValueError(f"{weights}: {e}") from None


# --- tensor parallelism: one checkpoint for every TP size --------------------------------------

# How each buffer of a sharded fastllm layer splits the whole layer's tensor, as
# (colwise, rowwise): "out" along the output features (dim 0), "in" along the input
# features (the last dim), "in/2" the 2:4 values (dim 1, half the input features),
# "nibbles" the 2:4 metadata (4 bits per group of 4 input features), None: whole on
# every rank. BlockSparseLinear's BSR buffers are split by block rows or block columns.
_SPLITS = {
    "Int8Linear": {
        "weight": ("out", "in"),
        "weight_scale": ("out", None),
        "bias": ("out", None),
        "smooth_scale": (None, "in"),
    },
    "Sparse24Linear": {
        "values": ("out", "in/2"),
        "metadata": ("out", "nibbles"),
        "weight_scale": ("out", None),
        "bias": ("out", None),
    },
    "BlockSparseLinear": {"bias": ("out", None)},
}
_BSR = ("crow_indices", "col_indices", "blocks")


def _sharded_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if getattr(m, "tp", None) is not None}


def _model_mesh(model: nn.Module):
    """The tensor-parallel mesh of a sharded model (its fastllm layers' or its DTensors'),
    None for a model in one process."""
    for m in _sharded_layers(model).values():
        return m.tp.mesh
    for t in [*model.parameters(), *model.buffers()]:
        if _dist.is_dtensor(t):
            return t.device_mesh
    return None


def _writes(mesh) -> bool:
    """The rank that writes: mesh rank 0, in the mesh that holds global rank 0."""
    return mesh.get_local_rank() == 0 and 0 in mesh.mesh.flatten().tolist()


def _rule(m: nn.Module, buffer: str) -> str | None:
    col, row = _SPLITS.get(type(m).__name__, {}).get(buffer, (None, None))
    return col if m.tp.style == _dist.COLWISE else row


def _owner(name: str, layers: dict) -> tuple[nn.Module | None, str]:
    prefix, _, buffer = name.rpartition(".")
    return layers.get(prefix), buffer


def _global_shape(model: nn.Module, name: str, t) -> tuple | None:
    """The shape of tensor `name` in a checkpoint (the whole layer's), from this rank's
    model; None for a BSR buffer (its length is the checkpoint's)."""
    if not isinstance(t, torch.Tensor):
        return None
    m, buffer = _owner(name, _sharded_layers(model))
    if m is None:
        return tuple(t.shape)
    s, shape = m.tp, list(t.shape)
    rule = _rule(m, buffer)
    if buffer in _BSR:
        bn = m.block_size[0]
        return (s.out_features // bn + 1,) if buffer == "crow_indices" else None
    if rule == "out":
        shape[0] = s.out_features
    elif rule == "in":
        shape[-1] = s.in_features
    elif rule == "in/2":
        shape[1] = s.in_features // 2
    elif rule == "nibbles":
        shape[1] = -(-s.in_features // 16)
    return tuple(shape)


def _nibbles(metadata: torch.Tensor, groups: int) -> torch.Tensor:
    """int16 (N, C) 2:4 metadata -> int64 (N, groups), one 4-bit nibble per group of 4."""
    words = metadata.to(torch.int64) & 0xFFFF
    shifts = torch.arange(0, 16, 4, device=metadata.device)
    nib = (words[..., None] >> shifts) & 0xF
    return nib.reshape(metadata.shape[0], -1)[:, :groups]


def _pack(nibbles: torch.Tensor) -> torch.Tensor:
    """(N, groups) nibbles -> int16 (N, ceil(groups / 4)) metadata (nibbles past the last
    group 0, the 16 bits as they are)."""
    N, G = nibbles.shape
    padded = torch.zeros(N, -(-G // 4) * 4, dtype=torch.int64, device=nibbles.device)
    padded[:, :G] = nibbles
    shifts = torch.arange(0, 16, 4, device=nibbles.device)
    words = (padded.view(N, -1, 4) << shifts).sum(-1)
    return torch.where(words >= 32768, words - 65536, words).to(torch.int16)


def _merge_bsr(pieces: list[tuple], shard, block_size) -> dict[str, torch.Tensor]:
    """The whole layer's BSR buffers from every rank's (crow, col, blocks)."""
    bn, bk = block_size
    if shard.style == _dist.COLWISE:  # block rows, one rank after another
        crows, offset = [pieces[0][0][:1]], 0
        for crow, _, _ in pieces:
            crows.append(crow[1:] + offset)
            offset += int(crow[-1])
        return {
            "crow_indices": torch.cat(crows),
            "col_indices": torch.cat([p[1] for p in pieces]),
            "blocks": torch.cat([p[2] for p in pieces]),
        }
    rows = pieces[0][0].numel() - 1  # block columns: each row's tiles, rank after rank
    cols, blocks, counts = [], [], []
    for i in range(rows):
        n = 0
        for (crow, col, blk), (a, _) in zip(pieces, shard.ranges):
            lo, hi = int(crow[i]), int(crow[i + 1])
            cols.append(col[lo:hi] + a // bk)
            blocks.append(blk[lo:hi])
            n += hi - lo
        counts.append(n)
    crow = torch.zeros(rows + 1, dtype=torch.int32)
    crow[1:] = torch.tensor(counts, dtype=torch.int64).cumsum(0)
    return {"crow_indices": crow, "col_indices": torch.cat(cols), "blocks": torch.cat(blocks)}


def _gather_layer(m: nn.Module, name: str, mesh) -> dict[str, torch.Tensor] | None:
    """{buffer: the whole layer's tensor} of sharded fastllm layer `m`, on mesh rank 0."""
    s = m.tp
    out: dict[str, torch.Tensor] = {}
    what = f"fastllm.save: gathering layer {name!r}"
    for buffer, t in m.named_buffers(recurse=False):
        if buffer in _BSR:
            continue
        rule = _rule(m, buffer)
        if rule is None:
            out[buffer] = t
            continue
        if rule == "nibbles":
            t = _nibbles(t, (s.stop - s.start) // 4)
        dim = {"out": 0, "in": -1, "in/2": 1, "nibbles": 1}[rule]
        whole = _dist.gather_cat(t, mesh, dim, what, dst=0)
        if whole is not None:
            out[buffer] = _pack(whole) if rule == "nibbles" else whole
    if type(m).__name__ == "BlockSparseLinear":
        parts = [_dist.gather_pieces(getattr(m, b), mesh, what, dst=0) for b in _BSR]
        if parts[0] is not None:
            pieces = [tuple(p[r].cpu() for p in parts) for r in range(mesh.size())]
            out.update(_merge_bsr(pieces, s, m.block_size))
    return out if mesh.get_local_rank() == 0 else None


def _gather_state(model: nn.Module, state: dict, mesh) -> dict | None:
    """The state dict of the whole model on the rank that writes (None elsewhere): every
    sharded tensor gathered (collectives in the same order on every rank)."""
    layers = _sharded_layers(model)
    whole_layers = {n: _gather_layer(m, n, mesh) for n, m in layers.items()}
    out = {}
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            continue
        m, buffer = _owner(name, layers)
        if m is not None:
            full = whole_layers[name.rpartition(".")[0]]
            out[name] = None if full is None else full[buffer]
        elif _dist.is_dtensor(t):
            out[name] = _gather_dtensor(t, name)
        else:
            out[name] = t
    return out if _writes(mesh) else None


def _gather_dtensor(t, name: str):
    (p,) = t.placements
    if p.is_replicate():
        return t.to_local()
    if not p.is_shard():
        raise ValueError(
            f"tensor {name!r} has placement {p}; fastllm.save gathers Shard and Replicate"
        )
    what = f"fastllm.save: gathering {name!r}"
    return _dist.gather_cat(t.to_local(), t.device_mesh, p.dim, what, dst=0)


def _read_slice(f, name: str, rule: str | None, shard, header_shape):
    """This rank's slice of checkpoint tensor `name` under `rule` (only its bytes read)."""
    if rule is None:
        return f.get_tensor(name)
    a, b = shard.start, shard.stop
    sl = f.get_slice(name)
    if rule == "out":
        return sl[a:b]
    if rule == "in":
        return sl[a:b] if len(header_shape) == 1 else sl[:, a:b]
    if rule == "in/2":
        return sl[:, a // 2 : b // 2]
    # nibbles: the 16-column chunks that hold groups a/4 .. b/4, cut and packed again
    c0, c1 = a // 16, -(-b // 16)
    nib = _nibbles(sl[:, c0:c1], (c1 - c0) * 4)
    g0 = a // 4 - 4 * c0
    return _pack(nib[:, g0 : g0 + (b - a) // 4])


def _read_bsr_slice(f, prefix: str, m: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's block rows (colwise) or block columns (rowwise) of a BSR weight; the
    index arrays are read whole, only this rank's tiles of `blocks`."""
    s, (bn, bk) = m.tp, m.block_size
    crow = f.get_tensor(f"{prefix}.crow_indices").to(torch.int64)
    col = f.get_tensor(f"{prefix}.col_indices")
    blocks = f.get_slice(f"{prefix}.blocks")
    if s.style == _dist.COLWISE:
        r0, r1 = s.start // bn, s.stop // bn
        lo, hi = int(crow[r0]), int(crow[r1])
        return {
            "crow_indices": (crow[r0 : r1 + 1] - lo).to(torch.int32),
            "col_indices": col[lo:hi],
            "blocks": blocks[lo:hi],
        }
    c0, c1 = s.start // bk, s.stop // bk
    cols, parts, counts = [], [], []
    for i in range(crow.numel() - 1):
        lo, hi = int(crow[i]), int(crow[i + 1])
        row = col[lo:hi].to(torch.int64)
        # ascending per row: this rank's columns are one run
        first = lo + int((row < c0).sum())
        last = lo + int((row < c1).sum())
        cols.append(col[first:last] - c0)
        if last > first:
            parts.append(blocks[first:last])
        counts.append(last - first)
    out_crow = torch.zeros(len(counts) + 1, dtype=torch.int32)
    out_crow[1:] = torch.tensor(counts, dtype=torch.int64).cumsum(0)
    shape = tuple(f.get_slice(f"{prefix}.blocks").get_shape())
    empty = torch.zeros(0, *shape[1:], dtype=_DTYPES[f.get_slice(f"{prefix}.blocks").get_dtype()])
    return {
        "crow_indices": out_crow,
        "col_indices": torch.cat(cols).to(torch.int32) if cols else col[:0],
        "blocks": torch.cat(parts) if parts else empty,
    }


def _read_sharded(weights: Path, model: nn.Module, header: dict, aliases: dict) -> dict:
    """Every tensor of the file the rebuilt sharded `model` needs, as this rank holds it:
    its slice for sharded layers and DTensors (wrapped as DTensors again), whole for the
    others."""
    from torch.distributed.tensor import DTensor

    st = _safetensors()
    layers = _sharded_layers(model)
    state = model.state_dict()
    out = {}
    try:
        with st.safe_open(str(weights), framework="pt") as f:
            for prefix, m in layers.items():
                if type(m).__name__ == "BlockSparseLinear":
                    for b, t in _read_bsr_slice(f, prefix, m).items():
                        out[f"{prefix}.{b}"] = t
            for name, t in state.items():
                if not isinstance(t, torch.Tensor) or name in out:
                    continue
                src = aliases.get(name, name)
                m, buffer = _owner(name, layers)
                if m is not None:
                    out[name] = _read_slice(f, src, _rule(m, buffer), m.tp, header[src]["shape"])
                elif _dist.is_dtensor(t):
                    (p,) = t.placements
                    if p.is_shard():
                        a, b = _dist.chunk_ranges(t.shape[p.dim], t.device_mesh.size())[
                            t.device_mesh.get_local_rank()
                        ]
                        index = (slice(None),) * p.dim + (slice(a, b),)
                        piece = f.get_slice(src)[index]
                    else:
                        piece = f.get_tensor(src)
                    out[name] = DTensor.from_local(
                        piece.to(t.device), t.device_mesh, t.placements, run_check=False,
                        shape=t.shape, stride=t.stride(),
                    )  # fmt: skip
                else:
                    out[name] = f.get_tensor(src)
    except ValueError:
        raise
    except Exception as e:  # safetensors raises its own error type
        raise ValueError(f"{weights}: cannot read tensor data ({e})") from None
    return out
