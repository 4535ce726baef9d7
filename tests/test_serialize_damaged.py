"""fastllm.load on damaged save directories: every malformed file raises ValueError naming
the file and the key or tensor, and leaves the given model exactly as it was (module
types and state_dict, bit for bit), whatever the damage and however far loading got."""

import json
import os
import struct

import pytest
import torch
from test_serialize import Net  # the model test_serialize saves and loads
from torch import nn

import fastllm


def _encoder():
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


# checkpoint kind: (model, optimize kwargs, calibration input or None)
KINDS = {
    "w8a16": (Net, {"linear": "w8a16"}, None),
    "w8a8+smooth": (Net, {"linear": "w8a8"}, (3, 64)),
    "2:4": (Net, {"linear": "2:4"}, None),
    "2:4+w8a8": (Net, {"linear": "2:4+w8a8"}, None),
    "block": (Net, {"linear": "block", "block_size": (32, 32), "density": 0.5}, None),
    "encoder": (_encoder, {"linear": "w8a16"}, None),
}


def _model(kind, seed):
    torch.manual_seed(seed)
    return KINDS[kind][0]().eval()


def _save(kind, directory):
    _, kwargs, calib = KINDS[kind]
    model = _model(kind, 0)
    fastllm.optimize(model, calibration=[torch.randn(calib)] if calib else None, **kwargs)
    fastllm.save(model, directory)
    return directory


def _snapshot(model):
    """Everything a failed load must leave as it was: module names and types, and a copy
    of the state_dict."""
    state = {
        k: v.detach().clone() if isinstance(v, torch.Tensor) else v
        for k, v in model.state_dict().items()
    }
    return [(n, type(m)) for n, m in model.named_modules()], state


def _bits(t):
    return t.detach().cpu().reshape(-1).view(torch.uint8)


def _assert_unchanged(model, snapshot):
    modules, state = snapshot
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    now = model.state_dict()
    assert list(now) == list(state)
    for name, before in state.items():
        after = now[name]
        if isinstance(before, torch.Tensor):
            assert (after.dtype, after.shape) == (before.dtype, before.shape), name
            assert torch.equal(_bits(after), _bits(before)), name
        else:
            assert after == before, name
    assert not hasattr(model, "_fastllm_report")
    assert not model._forward_pre_hooks and not model._forward_hooks


# --- ways to damage a save directory ---------------------------------------------------------


def _json(change):
    """Edits fastllm.json in place: `change(meta)`."""

    def damage(d):
        path = d / "fastllm.json"
        meta = json.loads(path.read_text())
        change(meta)
        path.write_text(json.dumps(meta))

    return damage


def _raw_json(data: bytes):
    return lambda d: (d / "fastllm.json").write_bytes(data)


def _tensors(change):
    def damage(d):
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(d / "model.safetensors"))
        change(tensors)
        save_file(tensors, str(d / "model.safetensors"))

    return damage


def _set(name, index, value):
    """Sets one element of a tensor of the file."""

    def change(t):
        t[name].view(-1)[index] = value

    return _tensors(change)


def _header(change=None, raw=None):
    """Edits the safetensors header in place, `change(header)`, or replaces it by `raw`."""

    def damage(d):
        path = d / "model.safetensors"
        data = path.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
        if change is not None:
            change(header)
        new = json.dumps(header).encode() if raw is None else raw
        path.write_bytes(struct.pack("<Q", len(new)) + new + data[8 + n :])

    return damage


def _truncate(d):
    path = d / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def _symlink_to_other(d):
    (d / "model.safetensors").unlink()
    os.symlink(d.parent / "other" / "model.safetensors", d / "model.safetensors")


def _module(name, change):
    return _json(lambda m: change(m["modules"][name]))


def _args(name, change):
    return _json(lambda m: change(m["modules"][name]["args"]))


NESTED = b"[" * 100_000 + b"]" * 100_000
NAN, INF = float("nan"), float("inf")

# (id, checkpoint kind, damage, the error message: a regex)
DAMAGES = [
    # fastllm.json: not JSON, or not the schema
    ("json list", "w8a16", _raw_json(b"[1, 2]"), r"fastllm.json: holds \[1, 2\]; expected a JSON object"),
    ("json nested", "w8a16", _raw_json(NESTED), r"fastllm.json: not valid JSON"),
    ("json not utf-8", "w8a16", _raw_json(b'{"a": "\xff"}'), r"fastllm.json: not valid JSON"),
    ("version true", "w8a16", _json(lambda m: m.update(version=True)), r"fastllm.json: format version True"),
    ("options list", "w8a16", _json(lambda m: m.update(options=[])), r'fastllm.json: "options" is \[\]; expected an object'),
    ("options missing", "w8a16", _json(lambda m: m.pop("options")), r'fastllm.json: "options" is missing'),
    ("backend bogus", "w8a16", _json(lambda m: m["options"].update(backend="bogus")), r"fastllm.json: \"backend\" is 'bogus'; expected null or one of \('cuda'"),
    ("backend int", "w8a16", _json(lambda m: m["options"].update(backend=3)), r'fastllm.json: "backend" is 3; expected null or one of'),
    ("calibration int", "w8a16", _json(lambda m: m.update(calibration=5)), r'fastllm.json: "calibration" is 5; expected a string'),
    ("hf_attention str", "w8a16", _json(lambda m: m.update(hf_attention="yes")), r"fastllm.json: \"hf_attention\" is 'yes'; expected true or false"),
    ("hf int", "w8a16", _json(lambda m: m.update(hf=5)), r'fastllm.json: "hf" is 5; expected null or an object'),
    ("dtype module", "w8a16", _json(lambda m: m.update(dtype="nn")), r"fastllm.json: \"dtype\" is 'nn'; expected a torch float dtype"),
    ("modules list", "w8a16", _json(lambda m: m.update(modules=["up"])), r"fastllm.json: \"modules\" is \['up'\]; expected an object"),
    ("module str", "w8a16", _json(lambda m: m["modules"].update(up="x")), r"fastllm.json: layer 'up' is 'x'; expected an object"),
    ("kind int", "w8a16", _module("up", lambda i: i.update(kind=3)), r"fastllm.json: layer 'up': \"kind\" is 3; expected one of"),
    ("type int", "w8a16", _module("up", lambda i: i.update(type=5)), r"fastllm.json: layer 'up': \"type\" is 5; expected one of"),
    ("type dunder", "w8a16", _module("up", lambda i: i.update(type="__name__")), r"fastllm.json: layer 'up': \"type\" is '__name__'"),
    ("from missing", "w8a16", _module("up", lambda i: i.pop("from")), r"fastllm.json: layer 'up': \"from\" is missing"),
    ("args list", "w8a16", _module("up", lambda i: i.update(args=[])), r"fastllm.json: layer 'up': \"args\" is \[\]; expected an object"),
    ("mode missing", "w8a16", _args("up", lambda a: a.pop("mode")), r"fastllm.json: layer 'up': \"mode\" is missing"),
    ("mode unknown", "w8a16", _args("up", lambda a: a.update(mode="w4")), r"fastllm.json: layer 'up': \"mode\" is 'w4'; expected one of"),
    ("smooth str", "w8a8+smooth", _args("up", lambda a: a.update(smooth="no")), r"fastllm.json: layer 'up': \"smooth\" is 'no'; expected true or false"),
    ("int8 str", "2:4", _args("up", lambda a: a.update(int8="yes")), r"fastllm.json: layer 'up': \"int8\" is 'yes'; expected true or false"),
    ("block_size str", "block", _args("up", lambda a: a.update(block_size="ab")), r"fastllm.json: layer 'up': \"block_size\" is 'ab'; expected"),
    ("block_size zero", "block", _args("up", lambda a: a.update(block_size=[0, 32])), r"fastllm.json: layer 'up': \"block_size\" is \[0, 32\]; expected"),
    ("block_size bool", "block", _args("up", lambda a: a.update(block_size=[True, 1])), r"fastllm.json: layer 'up': \"block_size\" is \[True, 1\]; expected"),
    ("aliases list", "w8a16", _json(lambda m: m.update(aliases=[])), r'fastllm.json: "aliases" is \[\]; expected an object'),
    ("alias int", "w8a16", _json(lambda m: m.update(aliases={"lm_head.weight": 5})), r'fastllm.json: "aliases" is .*; expected an object'),
    ("extra_state list", "w8a16", _json(lambda m: m.update(extra_state=[])), r'fastllm.json: "extra_state" is \[\]; expected an object'),
    # fastllm.json: "weights" outside the directory
    ("weights int", "w8a16", _json(lambda m: m.update(weights=123)), r'fastllm.json: "weights" is 123; expected a file name inside'),
    ("weights empty", "w8a16", _json(lambda m: m.update(weights="")), r"fastllm.json: \"weights\" is ''; expected a file name inside"),
    ("weights /etc/passwd", "w8a16", _json(lambda m: m.update(weights="/etc/passwd")), r"fastllm.json: \"weights\" is '/etc/passwd'; expected a file name inside"),
    ("weights ..", "w8a16", _json(lambda m: m.update(weights="../other/model.safetensors")), r"fastllm.json: \"weights\" is '../other/model.safetensors'; expected a file name inside"),
    ("weights symlink", "w8a16", _symlink_to_other, r"fastllm.json: \"weights\" is 'model.safetensors', which resolves to .*other.*; expected a file name inside"),
    # the safetensors header
    ("header list", "w8a16", _header(raw=b"[]"), r"model.safetensors: safetensors header is \[\]; expected a JSON object"),
    ("header nested", "w8a16", _header(raw=NESTED), r"model.safetensors: safetensors header is not valid JSON"),
    ("header metadata int", "w8a16", _header(lambda h: h.update(__metadata__=5)), r"model.safetensors: \"__metadata__\" is 5; expected an object"),
    ("header entry int", "w8a16", _header(lambda h: h.update({"up.weight": 5})), r"model.safetensors: tensor 'up.weight' is 5; expected an object"),
    ("data_offsets missing", "w8a16", _header(lambda h: h["up.weight"].pop("data_offsets")), r"model.safetensors: tensor 'up.weight': \"data_offsets\" is missing"),
    ("data_offsets reversed", "w8a16", _header(lambda h: h["up.weight"]["data_offsets"].reverse()), r"model.safetensors: tensor 'up.weight': \"data_offsets\" is \[\d+, \d+\]; expected \[begin, end\]"),
    ("shape str", "w8a16", _header(lambda h: h["up.weight"].update(shape="ab")), r"model.safetensors: tensor 'up.weight': \"shape\" is 'ab'; expected a list"),
    ("dtype int", "w8a16", _header(lambda h: h["up.weight"].update(dtype=5)), r"model.safetensors: tensor 'up.weight': \"dtype\" is 5; expected a string"),
    # the tensors: names, dtypes, shapes
    ("truncated", "w8a16", _truncate, r"model.safetensors: tensor '[\w.]+' is truncated"),
    ("tensor missing", "w8a16", _tensors(lambda t: t.pop("up.weight_scale")), r"model.safetensors: tensor 'up.weight_scale' is missing"),
    ("tensor extra", "w8a16", _tensors(lambda t: t.update({"x.y": torch.zeros(3)})), r"model.safetensors: tensor 'x.y' is not in the rebuilt model"),
    ("wrong dtype", "w8a16", _tensors(lambda t: t.update({"up.weight_scale": t["up.weight_scale"].double()})), r"model.safetensors: tensor 'up.weight_scale' has dtype F64"),
    ("wrong shape", "w8a16", _tensors(lambda t: t.update({"up.weight": t["up.weight"][:, :60].contiguous()})), r"model.safetensors: tensor 'up.weight' has shape \(128, 60\)"),
    # the tensors: values the kernels trust
    ("nan scale", "w8a16", _set("down.weight_scale", 3, NAN), r"model.safetensors: tensor 'down.weight_scale' holds nan at index 3; expected finite scales > 0"),
    ("inf scale", "w8a16", _set("down.weight_scale", 0, INF), r"tensor 'down.weight_scale' holds inf at index 0"),
    ("negative scale", "w8a16", _set("down.weight_scale", 5, -0.5), r"tensor 'down.weight_scale' holds -0.5 at index 5"),
    ("zero scale", "w8a16", _set("down.weight_scale", 1, 0.0), r"tensor 'down.weight_scale' holds 0.0 at index 1"),
    ("nan smooth", "w8a8+smooth", _set("down.smooth_scale", 2, NAN), r"model.safetensors: tensor 'down.smooth_scale' holds nan at index 2"),
    ("zero smooth", "w8a8+smooth", _set("down.smooth_scale", 0, 0.0), r"tensor 'down.smooth_scale' holds 0.0 at index 0"),
    ("negative smooth", "w8a8+smooth", _set("down.smooth_scale", 7, -2.0), r"tensor 'down.smooth_scale' holds -2.0 at index 7"),
    ("2:4 nan scale", "2:4+w8a8", _set("down.weight_scale", 0, NAN), r"model.safetensors: tensor 'down.weight_scale' holds nan"),
    ("2:4 same indices", "2:4", _set("down.metadata", 9, 0), r"model.safetensors: tensor 'down.metadata': .*two indices"),
    ("2:4 descending", "2:4+w8a8", _set("up.metadata", 0, 0x7777), r"model.safetensors: tensor 'up.metadata': .*two indices"),
    ("col out of range", "block", _set("down.col_indices", 0, 4), r"model.safetensors: layer 'down': .*col_indices must lie in \[0, 4\)"),
    ("col negative", "block", _set("up.col_indices", 0, -1), r"model.safetensors: layer 'up': .*col_indices must lie in \[0, 2\)"),
    ("col not ascending", "block", _tensors(lambda t: t["up.col_indices"][:2].copy_(torch.tensor([1, 0]))), r"layer 'up': .*col_indices must ascend"),
    ("crow start", "block", _set("up.crow_indices", 0, 1), r"model.safetensors: layer 'up': .*crow_indices must rise from 0"),
    ("crow end", "block", _set("down.crow_indices", -1, 1), r"model.safetensors: layer 'down': .*crow_indices must rise from 0"),
    ("crow decreasing", "block", _set("up.crow_indices", 1, 100), r"model.safetensors: layer 'up': .*crow_indices must rise from 0"),
    ("encoder nan scale", "encoder", _set("layers.1.linear2.weight_scale", 0, NAN), r"tensor 'layers.1.linear2.weight_scale' holds nan"),
    ("encoder options list", "encoder", _json(lambda m: m.update(options=[])), r'"options" is \[\]; expected an object'),
]  # fmt: skip


@pytest.mark.parametrize("kind, damage, message", [pytest.param(*d[1:], id=d[0]) for d in DAMAGES])
def test_damaged_save_raises_and_leaves_model_unchanged(tmp_path, kind, damage, message):
    directory = _save(kind, tmp_path / "saved")
    _save(kind, tmp_path / "other")  # a valid save next to it, for "weights" to point at
    damage(directory)
    model = _model(kind, 2)
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=message):
        fastllm.load(model, directory)
    _assert_unchanged(model, snapshot)
    # the model is still a float model that a good save loads into
    assert fastllm.load(model, tmp_path / "other") is model
