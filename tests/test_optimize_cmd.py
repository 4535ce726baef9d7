"""`fastllm optimize` on bad input: one line on stderr, exit status 2, no traceback, and
nothing slow run first. Small random-weight models saved to tmp_path; no download."""

import os
import subprocess
import sys

import pytest
import torch

from fastllm import cli

os.environ["HF_HUB_OFFLINE"] = "1"

QUICK = ["--sentences", "4", "--batch-size", "2", "--repeats", "1", "--no-progress"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "cat", "sat", "on", "mat"]


def _usage_error(argv, capsys) -> str:
    """Runs `fastllm` in-process; checks the exit status and returns the stderr line."""
    capsys.readouterr()  # not what the set-up printed (saving a model shows a progress bar)
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1, err
    assert err.startswith("fastllm optimize: error: ")
    return err.strip()


def _tiny_bert(path, tokenizer=True):
    """A 1-layer BERT with random weights, with a word-level vocabulary or no tokenizer."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        vocab_size=len(VOCAB), max_position_embeddings=64,
    )  # fmt: skip
    transformers.BertModel(cfg).save_pretrained(path)
    if tokenizer:
        (path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return path


def test_device_cuda_without_cuda(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = _usage_error(["optimize", "--device", "cuda"], capsys)
    assert err == (
        "fastllm optimize: error: --device cuda: CUDA is not available on this machine "
        "(torch.cuda.is_available() is False)"
    )


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--device", "gpu"], "--device gpu: not a device; expected cpu or cuda"),
        (["--device", "meta"], "--device meta: expected cpu or cuda"),
        (["--configs", "int4"], "--configs 'int4': unknown configuration(s) ['int4']; expected"),
        (["--configs", ","], "--configs ',': no configuration; expected some of attention, w8a8"),
        (["--batch-size", "0"], "--batch-size 0: expected an integer >= 1"),
        (["--sentences", "-1"], "--sentences -1: expected an integer >= 1"),
        (["--max-length", "0"], "--max-length 0: expected an integer >= 1"),
        (["--threads", "0"], "--threads 0: expected an integer >= 1"),
        (["--dtype", "int8"], "--dtype int8: expected one of float32, bfloat16, float16"),
    ],
)
def test_bad_values(argv, says, capsys):
    assert says in _usage_error(["optimize", *argv], capsys)


def test_model_dir_missing_or_a_file(tmp_path, capsys):
    err = _usage_error(["optimize", str(tmp_path / "nope")], capsys)
    assert err.endswith(f"MODEL_DIR {tmp_path / 'nope'}: does not exist; expected a local "
                        "Hugging Face model directory")  # fmt: skip
    (tmp_path / "file").write_text("")
    assert "is not a directory" in _usage_error(["optimize", str(tmp_path / "file")], capsys)
    err = _usage_error(["optimize", str(tmp_path)], capsys)
    assert "not a local Hugging Face model directory (it has no config.json)" in err


def test_model_dir_without_tokenizer(tmp_path, capsys):
    path = _tiny_bert(tmp_path, tokenizer=False)
    argv = ["optimize", str(path), "--configs", "attention,w8a16", *QUICK]
    err = _usage_error(argv, capsys)
    assert f"MODEL_DIR {path}: the model has no tokenizer; expected one of tokenizer.json" in err
    (path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")  # with a tokenizer, it runs
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert "| w8a16 |" in out and err == ""


def test_model_dir_without_weights(tmp_path, capsys):
    path = _tiny_bert(tmp_path)
    (path / "model.safetensors").unlink()
    err = _usage_error(["optimize", str(path), "--configs", "attention", *QUICK], capsys)
    assert f"MODEL_DIR {path}: transformers could not load the model (OSError: " in err


def test_process_exit_status_and_stderr():
    """The installed command's way: `python -m fastllm`, no traceback on stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "fastllm", "optimize", "--device", "gpu"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr == (
        "fastllm optimize: error: --device gpu: not a device; expected cpu or cuda\n"
    )
