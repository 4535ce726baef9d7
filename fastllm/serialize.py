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
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from torch import nn

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
    tensors, aliases, seen, extra = {}, {}, {}, {}
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):  # get_extra_state() of a module: kept in the JSON
            extra[name] = t
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        if t.numel() and key in seen:  # tied weights are stored once
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().contiguous().cpu()

    modules = dict(model.named_modules())
    swapped = {}
    for e in rep.layers:
        if e.action not in ("swapped", "kept") or e.name not in modules or e.name == "":
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
    tmp = directory / (WEIGHTS_FILE + ".tmp")
    st.save_file(tensors, str(tmp), metadata={"format": FORMAT, "version": str(VERSION)})
    os.replace(tmp, directory / WEIGHTS_FILE)
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=1, default=str) + "\n")
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
            rep.layers.append(
                _opt.LayerEntry("", "attention", "swapped", f"transformers {previous_attn!r}",
                                "fastllm (transformers)")
            )  # fmt: skip
        # parents first: an encoder layer is rebuilt before its self_attn
        for name in sorted(meta["modules"], key=lambda n: n.count(".")):
            info = meta["modules"][name]
            parent, attr, old = _locate(model, name, directory)
            new = _rebuild(old, info, name, directory)
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


def _rebuild(old: nn.Module, info: dict, name: str, directory: Path) -> nn.Module:
    """The fastllm module `info` describes, built around the float module `old`. Weights
    are placeholders: the file's tensors replace them."""
    import fastllm.nn as fnn

    _opt = _optimize_module()
    where = f"{directory / CONFIG_FILE}: layer {name!r}"
    kind, typ, args = info["kind"], info["type"], info.get("args", {})
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
    lin = _opt._as_linear(old)
    w = lin.weight
    factory = {"device": w.device, "dtype": w.dtype}
    bias = lin.bias is not None
    if typ == "Sparse24Linear":
        return cls(lin.in_features, lin.out_features, bias, int8=args.get("int8", False), **factory)
    if typ == "BlockSparseLinear":
        bs = tuple(args.get("block_size", (64, 64)))
        return cls(lin.in_features, lin.out_features, bias, block_size=bs, **factory)
    if typ == "Int8Linear":
        smooth = bool(args.get("smooth", False))
        return cls(lin.in_features, lin.out_features, bias, mode=args["mode"], smooth=smooth,
                   **factory)  # fmt: skip
    raise ValueError(f"{where} is a {typ}, which fastllm.load does not rebuild")


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
        if name in variable and len(shape) == len(want):  # kept tiles: any number
            shape, want = shape[1:], want[1:]
        if shape != want:
            raise ValueError(
                f"{weights}: tensor {src!r} has shape {tuple(info['shape'])}; the model "
                f"expects {tuple(t.shape)}"
            )
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
