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
rebuilt model — name, shape, dtype, and that the file holds all its bytes — and only
then copies them in. Any mismatch raises ValueError naming the file and the tensor, and
undoes the swaps: the model is never left half loaded.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from torch import nn

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


def _read_meta(directory: Path) -> dict:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; is {directory} a fastllm.save directory?")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a fastllm save file (format {meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise ValueError(
            f"{path}: format version {meta.get('version')!r} is not one this fastllm reads "
            f"(it reads version {VERSION}); save it again with this version"
        )
    for key in ("options", "modules", "aliases", "weights"):
        if key not in meta:
            raise ValueError(f"{path}: field {key!r} is missing")
    return meta


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
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: safetensors header is not valid JSON ({e})") from None
    header.pop("__metadata__", None)
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
    if cls is None:
        raise ValueError(
            f"{directory / CONFIG_FILE}: model class {hf_meta['class']!r} is not in this "
            f"transformers {transformers.__version__}"
        )
    model = cls(config)
    dtype = getattr(torch, meta.get("dtype", "float32"))
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
    weights = directory / meta["weights"]
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
    if meta["options"].get("backend"):
        _opt._force_backend(model, meta["options"]["backend"])
    model._fastllm_report = rep
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
