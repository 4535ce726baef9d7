"""fastllm checkpoints through transformers' quantizer registry: from_pretrained with a
FastllmConfig optimizes while loading; save_pretrained -> from_pretrained gives back the
same model, tensor for tensor, in this process and in a fresh one that only imported
fastllm; damaged checkpoints and bad configs raise errors that name what is wrong.
No network access: HF_HUB_OFFLINE=1, random-weight models from small configs."""

import copy
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")
transformers.utils.logging.set_verbosity_error()

import fastllm  # noqa: E402
from fastllm import hf_quantizer  # noqa: E402
from fastllm.hf import FastllmConfig  # noqa: E402

AutoModel = transformers.AutoModelForCausalLM


def _llama(**kw):
    """A 2-layer Llama-shaped model (hidden 64, 4 query heads, 2 KV heads)."""
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=128, pad_token_id=0,
        **kw,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval()


def _qwen2_tied():
    cfg = transformers.Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, vocab_size=128, max_position_embeddings=128, pad_token_id=0,
        tie_word_embeddings=True,
    )  # fmt: skip
    return transformers.Qwen2ForCausalLM(cfg).eval()


def _gpt2():
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=128, pad_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def float_dirs(tmp_path_factory):
    """Float checkpoints written by save_pretrained: {"llama", "llama-bf16", "qwen2", "gpt2"}."""
    dirs = {}
    for name, build, dtype in [
        ("llama", _llama, torch.float32),
        ("llama-bf16", _llama, torch.bfloat16),
        ("qwen2", _qwen2_tied, torch.float32),
        ("gpt2", _gpt2, torch.float32),
    ]:
        torch.manual_seed(0)
        dirs[name] = tmp_path_factory.mktemp(name)
        build().to(dtype).save_pretrained(dirs[name])
    return dirs


def _ids(batch=2, length=9):
    return torch.randint(3, 128, (batch, length))


def _fastllm_types(model) -> dict[str, str]:
    return {n: type(m).__name__ for n, m in model.named_modules() if type(m).__module__.startswith("fastllm.nn")}  # fmt: skip


def _assert_same(a, b, ids):
    """Same module types, every entry of the state dict equal (dtype and values), same logits."""
    assert [type(m) for m in a.modules()] == [type(m) for m in b.modules()]
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name, t in sa.items():
        if isinstance(t, torch.Tensor):
            assert sb[name].dtype == t.dtype and torch.equal(sb[name], t), name
        else:  # get_extra_state() (Int8Linear's mode)
            assert sb[name] == t, name
    assert a.config._attn_implementation == b.config._attn_implementation
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def _saved_config(directory) -> dict:
    return json.loads((directory / "config.json").read_text())["quantization_config"]


# configuration: (FastllmConfig arguments, with calibration batches, the linear module type)
CASES = {
    "w8a8": ({"linear": "w8a8"}, False, "Int8Linear"),
    "w8a8+smoothquant": ({"linear": "w8a8"}, True, "Int8Linear"),
    "w8a16": ({"linear": "w8a16"}, False, "Int8Linear"),
    "2:4": ({"linear": "2:4"}, False, "Sparse24Linear"),
    "2:4 wanda": ({"linear": "2:4"}, True, "Sparse24Linear"),
    "block": ({"linear": "block", "block_size": (32, 32), "density": 0.5}, False, "BlockSparseLinear"),
    "2:4+w8a8": ({"linear": "2:4+w8a8"}, False, "Sparse24Linear"),
    "attention only": ({}, False, None),
}  # fmt: skip


def _load_optimized(float_dir, case, ids):
    kwargs, calibrate, _ = CASES[case]
    config = FastllmConfig(calibration=[ids] if calibrate else None, **kwargs)
    return AutoModel.from_pretrained(float_dir, quantization_config=config)


@pytest.mark.parametrize("case", list(CASES))
def test_from_pretrained_optimizes_and_round_trips(float_dirs, tmp_path, case):
    _, calibrate, linear_type = CASES[case]
    ids = _ids()
    model = _load_optimized(float_dirs["llama"], case, ids)
    assert model.config._attn_implementation == "fastllm"
    types = _fastllm_types(model)
    if linear_type is None:
        assert types == {}
    else:
        assert set(types.values()) == {linear_type} and len(types) == 14  # 7 per layer
        assert type(model.lm_head) is nn.Linear  # skip=("lm_head",) by default
    calibration = fastllm.report(model).calibration
    if calibrate:
        assert ("SmoothQuant" if "w8a8" in case else "Wanda") in calibration
    if case == "w8a8+smoothquant":
        assert any(m.smooth_scale is not None for m in model.modules() if hasattr(m, "smooth_scale"))  # fmt: skip

    model.save_pretrained(tmp_path)
    saved = _saved_config(tmp_path)
    assert saved["quant_method"] == "fastllm" and "calibration" not in saved
    assert {n: r["type"] for n, r in saved["modules"].items()} == types
    assert saved["attention"] is True and saved["calibration_report"] == calibration

    loaded = AutoModel.from_pretrained(tmp_path)  # no calibration data: the tensors are saved
    _assert_same(model, loaded, ids)
    rep = fastllm.report(loaded)
    assert rep.calibration == calibration
    assert sorted(e.name for e in rep.swapped) == sorted(["", *types])


def test_round_trip_in_a_fresh_process(float_dirs, tmp_path):
    """Every configuration, loaded in a process that imports fastllm and nothing of it
    after; a second process imports transformers' modeling code before fastllm."""
    ids = _ids()
    dirs = []
    for i, case in enumerate(CASES):
        model = _load_optimized(float_dirs["llama"], case, ids)
        directory = tmp_path / f"case{i}"
        model.save_pretrained(directory)
        with torch.no_grad():
            logits = model(ids).logits
        expected = {
            "types": [type(m).__name__ for m in model.modules()],
            "state": model.state_dict(),
            "ids": ids,
            "logits": logits,
        }
        torch.save(expected, tmp_path / f"case{i}.pt")
        dirs.append(str(directory))
    script = r"""
import sys, torch
if sys.argv[1] == "transformers-first":
    import transformers.modeling_utils
import fastllm  # the only fastllm import: it registers the quantizer
from transformers import AutoModelForCausalLM

for d in sys.argv[2:]:
    exp = torch.load(d + ".pt")
    m = AutoModelForCausalLM.from_pretrained(d)
    assert [type(x).__name__ for x in m.modules()] == exp["types"], d
    state = m.state_dict()
    assert list(state) == list(exp["state"]), d
    for k, t in exp["state"].items():
        same = (state[k].dtype == t.dtype and torch.equal(state[k], t)
                if isinstance(t, torch.Tensor) else state[k] == t)
        assert same, (d, k)
    with torch.no_grad():
        assert torch.equal(m(exp["ids"]).logits, exp["logits"]), d
print("loaded", len(sys.argv) - 2)
"""
    for order, todo in [("fastllm-first", dirs), ("transformers-first", dirs[:2])]:
        out = subprocess.run(
            [sys.executable, "-c", script, order, *todo], capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr[-3000:]
        assert out.stdout.strip().endswith(f"loaded {len(todo)}")


def test_import_fastllm_does_not_import_transformers():
    code = (
        "import sys, fastllm, fastllm.hf, fastllm.hf_quantizer as q\n"
        "print('transformers' in sys.modules,"
        " any(isinstance(f, q._RegisterOnImport) for f in sys.meta_path))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]


def test_registered_with_transformers():
    from transformers.quantizers import auto

    config_cls, quantizer_cls = hf_quantizer._classes()
    assert FastllmConfig is config_cls is hf_quantizer.FastllmConfig
    assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING["fastllm"] is config_cls
    assert auto.AUTO_QUANTIZER_MAPPING["fastllm"] is quantizer_cls
    hf_quantizer.register()  # twice: nothing changes
    assert auto.AUTO_QUANTIZER_MAPPING["fastllm"] is quantizer_cls
    assert hf_quantizer.registration_error is None
    config = auto.AutoQuantizationConfig.from_dict({"quant_method": "fastllm", "linear": "w8a16"})
    assert isinstance(config, config_cls) and config.linear["kind"] == "w8a16"


@pytest.mark.parametrize("linear, calibrated", [("w8a8", "SmoothQuant"), ("2:4", "Wanda")])
def test_optimize_attach_save_pretrained(float_dirs, tmp_path, linear, calibrated):
    """fastllm.optimize with calibration, then save_pretrained: from_pretrained rebuilds the
    same modules with no calibration data."""
    ids = _ids()
    model = AutoModel.from_pretrained(float_dirs["llama"])
    fastllm.optimize(model, linear=linear, calibration=[ids, _ids()])
    assert calibrated in fastllm.report(model).calibration
    hf_quantizer.attach(model)
    model.save_pretrained(tmp_path)
    assert set(_saved_config(tmp_path)["modules"]) == set(_fastllm_types(model))
    _assert_same(model, AutoModel.from_pretrained(tmp_path), ids)


@pytest.mark.parametrize("linear", ["w8a8", "2:4"])
def test_optimize_then_save_pretrained(float_dirs, tmp_path, linear):
    ids = _ids()
    model = AutoModel.from_pretrained(float_dirs["llama"])
    fastllm.optimize(model, linear=linear, calibration=[ids])
    model.save_pretrained(tmp_path)
    assert set(_saved_config(tmp_path)["modules"]) == set(_fastllm_types(model))
    _assert_same(model, AutoModel.from_pretrained(tmp_path), ids)


def test_optimize_again_after_loading(float_dirs, tmp_path):
    """save_pretrained records the model as it is when saved."""
    ids = _ids()
    model = _load_optimized(float_dirs["llama"], "attention only", ids)
    model.save_pretrained(tmp_path / "a")
    model = AutoModel.from_pretrained(tmp_path / "a")
    fastllm.optimize(model, linear="w8a16")
    model.save_pretrained(tmp_path / "b")
    assert {r["type"] for r in _saved_config(tmp_path / "b")["modules"].values()} == {"Int8Linear"}
    loaded = AutoModel.from_pretrained(tmp_path / "b")
    assert set(_fastllm_types(loaded).values()) == {"Int8Linear"}
    _assert_same(model, loaded, ids)


def test_callers_config_is_left_alone(float_dirs):
    ids = _ids()
    batches = [ids]
    config = FastllmConfig(linear="w8a8", calibration=batches)
    model = AutoModel.from_pretrained(float_dirs["llama"], quantization_config=config)
    assert config.modules is None and config.calibration == batches  # reusable as it was
    recorded = model.config.quantization_config
    assert recorded is not config and set(recorded.modules) == set(_fastllm_types(model))
    assert "calibration" not in config.to_dict() and "calibration" not in dict(config)
    json.dumps(recorded.to_dict())
    assert copy.deepcopy(config).calibration[0] is ids  # batches shared, not copied


@pytest.mark.parametrize(
    "name, linear", [("llama-bf16", "w8a16"), ("llama-bf16", "2:4+w8a8"), ("gpt2", "2:4"),
                     ("gpt2", "block"), ("gpt2", "w8a8")],
)  # fmt: skip
def test_round_trip_dtypes_and_conv1d(float_dirs, tmp_path, name, linear):
    """bfloat16 checkpoints (scales stay float32), GPT-2's Conv1D layers."""
    ids = _ids()
    options = {"block_size": (32, 32)} if linear == "block" else {}
    config = FastllmConfig(linear=linear, calibration=[ids], **options)
    model = AutoModel.from_pretrained(float_dirs[name], quantization_config=config)
    assert _fastllm_types(model)
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    _assert_same(model, loaded, ids)
    if name == "llama-bf16":
        layer = loaded.model.layers[0].mlp.up_proj
        assert loaded.dtype == torch.bfloat16 and layer.weight_scale.dtype == torch.float32


def test_swapped_layer_tied_to_the_embeddings(float_dirs, tmp_path):
    ids = _ids()
    config = FastllmConfig(linear="w8a16", skip=())
    model = AutoModel.from_pretrained(float_dirs["qwen2"], quantization_config=config)
    assert type(model.lm_head).__name__ == "Int8Linear"
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert loaded.lm_head.weight.dtype == torch.int8
    _assert_same(model, loaded, ids)


def test_sharded_checkpoint_device_map_and_forced_backend(float_dirs, tmp_path):
    ids = _ids()
    config = FastllmConfig(linear="block", block_size=(32, 32), backend="torch")
    model = AutoModel.from_pretrained(float_dirs["llama"], quantization_config=config)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    loaded = AutoModel.from_pretrained(tmp_path, device_map="cpu")
    _assert_same(model, loaded, ids)
    assert loaded.model.layers[0].mlp.up_proj.last_backend == "torch"
    assert fastllm.report(loaded).options["backend"] == "torch"


def test_float_checkpoint_whose_config_json_asks_for_fastllm(float_dirs, tmp_path):
    shutil.copytree(float_dirs["llama"], tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fastllm", "linear": "w8a16"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = AutoModel.from_pretrained(tmp_path)
    assert set(_fastllm_types(model).values()) == {"Int8Linear"}
    assert model.config.quantization_config.modules  # it now records the layers


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"linear": "w4"}, r"linear must be None or one of .*, got 'w4'"),
        ({"linear": "w8a8", "alpah": 0.5}, r"unknown argument\(s\) \['alpah'\]"),
        ({"attention": "yes"}, r"attention must be True or False, got 'yes'"),
        ({"backend": "gpu"}, r"backend must be None or one of .*, got 'gpu'"),
        ({"linear": "block", "density": 0}, r"density must be a number in \(0, 1\], got 0"),
        ({"density": 0.3}, r"option\(s\) \['density'\] apply to linear layers, but linear=None"),
        ({"linear": "w8a8", "smoothquant": True}, r"smoothquant=True needs calibration batches"),
        ({"linear": "2:4", "method": "wanda"}, r"method='wanda' needs calibration batches"),
        ({"linear": "w8a8", "calibration": []}, r"calibration is empty"),
        ({"linear": "w8a8", "calibration": torch.zeros(2, 3)}, r"calibration must be an iterable"),
        ({"linear": {"kind": "w8a8", "bits": 4}}, r"linear is .*; expected one of"),
        ({"quant_method": "torchao"}, r"quant_method is 'torchao'; expected 'fastllm'"),
        ({"modules": {}, "version": 99}, r"version is 99; this fastllm reads version 1"),
        ({"modules": {}, "calibration": [1]}, r"calibration applies to float checkpoints"),
        ({"modules": {"x": {"kind": "linear", "type": "Linear8", "from": "Linear"}}},
         r"modules\['x'\]: \"type\" is 'Linear8'; expected one of"),
        ({"modules": {"x": {"kind": "linear", "type": "Int8Linear", "from": "Linear",
                            "args": {"mode": "w4a4"}}}},
         r"modules\['x'\]: \"mode\" is 'w4a4'; expected one of"),
    ],
)  # fmt: skip
def test_config_errors_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FastllmConfig(**kwargs)


@pytest.fixture(scope="module")
def w8a16_dir(float_dirs, tmp_path_factory):
    directory = tmp_path_factory.mktemp("w8a16")
    config = FastllmConfig(linear="w8a16")
    AutoModel.from_pretrained(float_dirs["llama"], quantization_config=config).save_pretrained(
        directory
    )
    return directory


def _edit_tensors(directory, change):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = directory / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    save_file(tensors, str(path), metadata=metadata)


def _edit_records(directory, change):
    config = json.loads((directory / "config.json").read_text())
    change(config["quantization_config"]["modules"])
    (directory / "config.json").write_text(json.dumps(config))


UP = "model.layers.0.mlp.up_proj"


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: _edit_tensors(d, lambda t: t.pop(f"{UP}.weight_scale")),
         rf"tensor '{UP}.weight_scale' is missing from the checkpoint; its config.json records "
         rf"layer '{UP}' as Int8Linear"),
        (lambda d: _edit_tensors(d, lambda t: t.__setitem__(f"{UP}.weight", t[f"{UP}.weight"].short())),
         rf"model.safetensors: tensor '{UP}.weight' has dtype I16; the Int8Linear expects torch.int8"),
        (lambda d: _edit_tensors(d, lambda t: t.__setitem__(f"{UP}.weight", t[f"{UP}.weight"][:, :60].contiguous())),
         rf"tensor '{UP}.weight' has shape \(128, 60\); the Int8Linear expects \(128, 64\)"),
        (lambda d: _edit_tensors(d, lambda t: t[f"{UP}.weight_scale"].zero_()),
         rf"tensor '{UP}.weight_scale' holds 0.0 at index 0; expected finite scales > 0"),
        (lambda d: _edit_records(d, lambda m: m.__setitem__("model.layers.0.mlp.nope", m.pop(UP))),
         r"records layer 'model.layers.0.mlp.nope' \(Int8Linear\), which LlamaForCausalLM "
         r"does not have"),
        (lambda d: _edit_records(d, lambda m: m.__setitem__("model.norm", m.pop(UP))),
         r"records layer 'model.norm' as Int8Linear made from a linear layer; "
         r"LlamaForCausalLM has a LlamaRMSNorm there"),
    ],
)  # fmt: skip
def test_damaged_checkpoint_names_file_and_tensor(w8a16_dir, tmp_path, damage, message):
    shutil.copytree(w8a16_dir, tmp_path, dirs_exist_ok=True)
    damage(tmp_path)
    with pytest.raises(ValueError, match=message):
        AutoModel.from_pretrained(tmp_path)
