"""`fastllm serve`: transformers' OpenAI-compatible server with fastllm registered.

End to end: `fastllm serve` runs in a subprocess on 127.0.0.1 (a free port) with a small
random-weight Llama and a tokenizer made here (bench/bench_serve.py writes both; no
download), and gets bounded traffic: every request has a timeout, every server is
stopped (SIGTERM, then SIGKILL) when its test ends, passed or failed. In-process: the
command line, the model manager that loads through fastllm, and what transformers'
continuous batching does with fastllm (see fastllm/serve.py).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
for _module in ("fastapi", "uvicorn", "openai", "pydantic", "accelerate"):  # its server's
    pytest.importorskip(_module)
pytest.importorskip("transformers.cli.serving")  # transformers' server as 5.24 has it

from fastllm import cli  # noqa: E402
from fastllm._sentences import SENTENCES  # noqa: E402
from fastllm.bench.bench_serve import Server, free_port, write_model_dir  # noqa: E402

PROMPTS = list(SENTENCES[:16])
NEW_TOKENS = 12
TIMEOUT = 60  # seconds, for any one request
START_TIMEOUT = 120  # seconds, for a server to answer /health
# w8a16 against the float model: greedy tokens agree up to the first difference on at
# least this fraction of all 16 x 12 tokens (measured with this model and these prompts:
# 176 of 192, 92%, with 14 of the 16 texts identical)
W8A16_AGREEMENT = 0.75


# --- the model, and what transformers' generate() makes of the prompts ----------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("serve") / "llama")


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return transformers.AutoTokenizer.from_pretrained(model_dir)


def _prompt_ids(tokenizer, content: str) -> list[int]:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": content}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )["input_ids"]


@torch.no_grad()
def _greedy(model, tokenizer) -> list[list[int]]:
    """The new tokens of greedy generate() for each prompt, one prompt at a time, as the
    server without continuous batching runs them."""
    out = []
    for p in PROMPTS:
        ids = torch.tensor([_prompt_ids(tokenizer, p)])
        seq = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                             do_sample=False)  # fmt: skip
        out.append(seq[0, ids.shape[1] :].tolist())
    return out


def _texts(tokenizer, token_lists) -> list[str]:
    return [tokenizer.decode(t, skip_special_tokens=True) for t in token_lists]


@pytest.fixture(scope="module")
def reference(model_dir, tokenizer) -> list[list[int]]:
    """The unmodified model's greedy tokens (transformers' sdpa attention, float)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return _greedy(model, tokenizer)


@pytest.fixture(scope="module")
def w8a16_model(model_dir):
    """The model as `--linear w8a16` loads it (fastllm's quantizer, fastllm attention)."""
    from fastllm.hf import FastllmConfig

    return transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=FastllmConfig(linear="w8a16")
    ).eval()


@pytest.fixture(scope="module")
def w8a16_reference(w8a16_model, tokenizer) -> list[list[int]]:
    return _greedy(w8a16_model, tokenizer)


# --- servers ----------------------------------------------------------------------------------


def _start(model: Path, *args: str, log_dir: Path) -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "fastllm", "serve", str(model), "--device", "cpu",
            "--host", "127.0.0.1", "--port", str(port), *args]  # fmt: skip
    log = log_dir / f"server-{port}.log"
    return Server(argv, port, log, start_timeout=START_TIMEOUT)


def _all_at_once(server: Server, prompts: list[str], stream: bool = False) -> list[str]:
    """One greedy chat completion per prompt, all sent at the same time."""
    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(server.chat, p, NEW_TOKENS, stream, TIMEOUT) for p in prompts]
        return [f.result(timeout=TIMEOUT * 2) for f in futures]


@pytest.fixture(scope="module")
def attention_server(model_dir, tmp_path_factory):
    with _start(model_dir, log_dir=tmp_path_factory.mktemp("logs")) as server:
        yield server


@pytest.fixture(scope="module")
def w8a16_server(model_dir, tmp_path_factory):
    with _start(model_dir, "--linear", "w8a16", log_dir=tmp_path_factory.mktemp("logs")) as s:
        yield s


# --- the command line (in-process, nothing loaded) -----------------------------------------


def test_help_shows_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    options = ["--linear", "--host", "--port", "--continuous-batching", "--cb-block-size",
               "--cb-num-blocks", "--cb-max-batch-tokens", "--cb-max-memory-percent",
               "--device", "--dtype", "--default-seed", "--log-level", "--enable-cors"]  # fmt: skip
    for option in options:
        assert option in out
    assert out.count("(default:") == len(options)
    for default in ("(default: 127.0.0.1)", "(default: 8000)", "(default: None)",
                    "(default: False)", "(default: auto)"):  # fmt: skip
        assert default in out
    assert "MODEL_DIR" in out


def _checkpoint_config(path: Path, quant: dict) -> Path:
    path.mkdir()
    (path / "config.json").write_text(
        json.dumps({"model_type": "llama", "quantization_config": quant})
    )
    (path / "tokenizer.json").write_text("{}")
    return path


@pytest.mark.parametrize(
    "case, args, message",
    [
        ("missing", ["{tmp}/nope"], "does not exist"),
        ("no config", ["{tmp}"], "has no config.json"),
        ("no tokenizer", ["{tmp}/notok"], "has no tokenizer"),
        ("fastllm checkpoint", ["{tmp}/ckpt", "--linear", "w8a8"], "is a fastllm checkpoint"),
        ("other quantization", ["{tmp}/bnb", "--linear", "w8a16"], "already quantized"),
        ("port", ["{tmp}/ckpt", "--port", "70000"], "--port 70000"),
        ("cb option", ["{tmp}/ckpt", "--cb-num-blocks", "8"], "--continuous-batching only"),
        ("cb value", ["{tmp}/ckpt", "--continuous-batching", "--cb-block-size", "0"], ">= 1"),
        (
            "cb memory",
            ["{tmp}/ckpt", "--continuous-batching", "--cb-max-memory-percent", "2"],
            "(0, 1]",
        ),
        ("dtype", ["{tmp}/ckpt", "--dtype", "int4"], "--dtype int4"),
    ],
)
def test_bad_command_line_is_one_line_and_exit_2(tmp_path, capsys, case, args, message):
    notok = tmp_path / "notok"
    notok.mkdir()
    (notok / "config.json").write_text("{}")
    _checkpoint_config(tmp_path / "ckpt", {"quant_method": "fastllm", "linear": {"kind": "w8a16"}})
    _checkpoint_config(tmp_path / "bnb", {"quant_method": "bitsandbytes"})
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", *[a.format(tmp=tmp_path) for a in args]])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastllm serve: error:") and message in err
    assert len(err.splitlines()) == 1


# --- loading through fastllm (in-process) ----------------------------------------------------


def test_model_manager_loads_through_fastllm(model_dir, tokenizer):
    from fastllm import hf
    from fastllm.nn import Int8Linear
    from fastllm.serve import FastllmModelManager

    manager = FastllmModelManager(linear="w8a16", attention=True, device="cpu",
                                  force_model=str(model_dir))  # fmt: skip
    try:
        model, processor = manager.load_model_and_processor(str(model_dir))
        assert hf.enabled(model)
        assert sum(isinstance(m, Int8Linear) for m in model.modules()) == 14  # 7 per layer
        with torch.no_grad():
            model(torch.tensor([_prompt_ids(tokenizer, PROMPTS[0])]))
        served = {m.fastllm_backend for _, m in hf.attention_modules(model)}
        assert served and all(s.startswith("attention:") for s in served), served
    finally:
        manager.shutdown()


# --- one server, attention only ---------------------------------------------------------------


def test_attention_only_matches_generate(attention_server, reference, tokenizer):
    texts = _all_at_once(attention_server, PROMPTS)  # 16 concurrent requests
    assert texts == _texts(tokenizer, reference)


def test_streaming_returns_the_same_text(attention_server):
    for p in PROMPTS[:2]:
        assert attention_server.chat(p, NEW_TOKENS, stream=True, timeout=TIMEOUT) == (
            attention_server.chat(p, NEW_TOKENS, timeout=TIMEOUT)
        )


def _long_message(tokenizer, tokens: int) -> str:
    text = " ".join(PROMPTS)
    while len(_prompt_ids(tokenizer, text)) < tokens:
        text += " " + text
    return text


BAD_REQUESTS = {
    "malformed JSON": (b'{"messages": [{"role": "user", "content": "hi"', 422, "JSON decode"),
    "unknown model": ({"model": "no/such-model"}, 400, "pinned"),
    "max_tokens 0": ({"max_tokens": 0}, 400, "max_tokens is 0"),
    "max_tokens -5": ({"max_tokens": -5}, 400, "max_tokens is -5"),
    "max_completion_tokens 0": ({"max_completion_tokens": 0}, 400, "max_completion_tokens"),
    "streamed max_tokens 0": ({"max_tokens": 0, "stream": True}, 400, "max_tokens is 0"),
    "no messages": ({"messages": None}, 400, "messages"),
    "prompt past max_position_embeddings": ({"content": 600}, 400, "max_position_embeddings"),
    "prompt + max_tokens past it": ({"content": 400, "max_tokens": 200}, 400, "positions"),
}


def test_bad_requests_get_4xx_and_the_server_goes_on(attention_server, tokenizer, reference):
    expected = _texts(tokenizer, reference[:1])[0]
    for name, (change, status, message) in BAD_REQUESTS.items():
        if isinstance(change, bytes):
            body = change
        else:
            body = {"messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 4}
            body.update(change)
            if "content" in body:  # a prompt of about that many tokens
                body["messages"][0]["content"] = _long_message(tokenizer, body.pop("content"))
            if body["messages"] is None:
                del body["messages"]
        got, text = attention_server.post("/v1/chat/completions", body, TIMEOUT)
        assert got == status, f"{name}: HTTP {got} {text[:300]}"
        detail = json.loads(text)["detail"]
        assert detail and message in json.dumps(detail), f"{name}: {detail}"
        # and the next request is served as before
        assert attention_server.chat(PROMPTS[0], NEW_TOKENS, timeout=TIMEOUT) == expected, name


def test_completions_and_models_endpoints(attention_server, model_dir):
    status, text = attention_server.post("/v1/completions", {"prompt": "The cat", "max_tokens": 0})
    assert status == 400 and "max_tokens" in text
    status, text = attention_server.post("/v1/completions", {"prompt": "The cat", "max_tokens": 3})
    assert status == 200 and json.loads(text)["usage"]["completion_tokens"] == 3
    status, text = attention_server.post(
        "/v1/responses", {"input": "The cat", "max_output_tokens": 0}
    )
    assert status == 400 and "max_output_tokens" in text
    import urllib.request

    with urllib.request.urlopen(attention_server.url + "/v1/models", timeout=TIMEOUT) as r:
        assert [m["id"] for m in json.load(r)["data"]] == [str(model_dir)]


def test_shutdown_is_clean(attention_server):
    log_before = attention_server.log()
    assert "fastllm serve:" in log_before and "attention: fastllm" in log_before
    code = attention_server.stop(timeout=30)  # SIGTERM
    assert code == 0
    log = attention_server.log()
    assert "Application shutdown complete" in log
    assert "Traceback" not in log


# --- w8a16: quantized while loading, and a saved checkpoint ----------------------------------


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """The fraction of tokens of `a` before the first difference from `b`, over prompts."""
    same = 0
    for x, y in zip(a, b):
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        same += n
    return same / sum(len(x) for x in a)


def test_w8a16_server(w8a16_server, w8a16_reference, reference, tokenizer):
    assert "linear: 14 x Int8Linear" in w8a16_server.log()
    texts = _all_at_once(w8a16_server, PROMPTS)
    # the server runs the model from_pretrained(quantization_config=FastllmConfig) loads
    assert texts == _texts(tokenizer, w8a16_reference)
    # which agrees with the float model on most tokens
    assert _agreement(reference, w8a16_reference) >= W8A16_AGREEMENT
    # POST /reset unloads the model; the next request loads it again, through fastllm
    differ = [i for i, (a, b) in enumerate(zip(reference, w8a16_reference)) if a != b][:2]
    assert differ  # prompts on which w8a16 and float differ: they tell which model answers
    assert w8a16_server.post("/reset", {}, TIMEOUT)[0] == 200
    for i in differ:
        assert w8a16_server.chat(PROMPTS[i], NEW_TOKENS, timeout=TIMEOUT) == texts[i]


def test_saved_checkpoint_server(w8a16_model, w8a16_server, tokenizer, tmp_path):
    ckpt = tmp_path / "llama-w8a16"
    w8a16_model.save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)
    with _start(ckpt, log_dir=tmp_path) as server:
        assert "linear: 14 x Int8Linear" in server.log()
        texts = _all_at_once(server, PROMPTS[:4])
    assert texts == _all_at_once(w8a16_server, PROMPTS[:4])


# --- continuous batching ----------------------------------------------------------------------


def test_continuous_batching_refuses_fastllm_attention(w8a16_model):
    """What keeps fastllm attention out of transformers' continuous batching (the day this
    fails, transformers lets registered implementations in: serve.py can use them)."""
    from transformers import GenerationConfig

    from fastllm import hf

    assert hf.enabled(w8a16_model)
    with pytest.raises(ValueError, match="not supported for continuous batching"):
        w8a16_model.init_continuous_batching(generation_config=GenerationConfig(max_new_tokens=2))


def test_continuous_batching_server(model_dir, w8a16_model, tokenizer, tmp_path):
    """--continuous-batching: fastllm's w8a16 layers, transformers' sdpa attention and
    paged cache; the same greedy tokens as generate() on that model, one prompt at a time."""
    w8a16_model.set_attn_implementation("sdpa")
    try:
        expected = _texts(tokenizer, _greedy(w8a16_model, tokenizer))
    finally:
        w8a16_model.set_attn_implementation("fastllm")
    # a small paged cache: on the CPU transformers would take 0.6 of the machine's RAM
    cache = ["--cb-num-blocks", "64", "--cb-block-size", "32", "--cb-max-batch-tokens", "256"]
    args = ["--linear", "w8a16", "--continuous-batching", *cache]
    with _start(model_dir, *args, log_dir=tmp_path) as s:
        assert "attention: sdpa" in s.log() and "linear: 14 x Int8Linear" in s.log()
        texts = _all_at_once(s, PROMPTS)  # 16 requests batched together
        streamed = s.chat(PROMPTS[0], NEW_TOKENS, stream=True, timeout=TIMEOUT)
        code = s.stop(timeout=30)
    assert texts == expected
    assert streamed == expected[0]
    assert code == 0  # the continuous batching thread stopped too


_HEALTH_ONLY = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"{}")
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def test_server_is_stopped_when_a_test_fails(tmp_path):
    """The Server context manager (bench_serve.py) that runs every server here stops its
    process whatever happens inside (a process that ignores SIGTERM is killed)."""
    port = free_port()
    server = Server([sys.executable, "-c", _HEALTH_ONLY, str(port)], port, tmp_path / "log")
    with pytest.raises(RuntimeError, match="boom"):
        with server:
            pid = server.proc.pid
            raise RuntimeError("boom")
    assert server.proc is None and server.returncode == -signal.SIGTERM
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
