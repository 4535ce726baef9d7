"""Serving: requests/s and p50/p99 latency of transformers' OpenAI-compatible server at
1, 4 and 16 concurrent clients, `transformers serve` on the unmodified model against
`fastllm serve` (attention only, and attention + w8a16), same model, same prompts, one run.

Each server is a process of its own on 127.0.0.1 (started, warmed up with two requests,
measured, stopped with SIGTERM), answering greedy chat completions of `new_tokens` tokens
for fastllm's built-in sentences; each client sends its requests one after the other.
`requests/s` counts completed requests over the wall time of one concurrency level;
latency is per request, first byte sent to last byte received. `transformers serve`
without continuous batching runs one generate() at a time, so the latency at 16 clients
is mostly queueing; the full run adds `--continuous-batching` to both servers.

The model is a Llama with random weights from a config (GPU: ~0.5B parameters in
bfloat16; CPU: a small one in float32) and a byte-level BPE tokenizer trained here on the
built-in sentences, with a chat template: nothing is downloaded. Needs transformers and
its serving dependencies (pip install 'fastllm[serve]'); skipped without them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastllm.bench.common import Context

CONCURRENCY = (1, 4, 16)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>")


def write_model_dir(
    path,
    *,
    hidden_size: int = 128,
    intermediate_size: int = 256,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    vocab_size: int = 512,
    max_position_embeddings: int = 512,
    initializer_range: float = 0.1,
    dtype: str = "float32",
    seed: int = 0,
) -> Path:
    """Writes a Llama with random weights and a tokenizer (byte-level BPE trained on
    fastllm's built-in sentences, a chat template, pad/bos/eos) into `path`, offline.

    initializer_range 0.1 (transformers' default: 0.02) gives a random model whose greedy
    texts differ from prompt to prompt, with logit margins wide enough that fastllm and
    PyTorch attention pick the same tokens. The model has no eos token (the tokenizer's
    is only text): every request generates exactly max_tokens tokens, whatever the
    weights, so that servers compare on equal work."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from fastllm._sentences import SENTENCES

    path = Path(path)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # the alphabet is the sentences' own (ASCII): every token decodes on its own
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False
    )
    tok.train_from_iterator(SENTENCES, trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|eos|>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    config = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=None,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).to(getattr(torch, dtype)).eval()
    model.generation_config.do_sample = False
    model.save_pretrained(path)
    return path


# --- a server process and its clients ------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    env.pop("TRITON_INTERPRET", None)  # tests set it; the server picks backends as deployed
    env.update(extra)
    return env


class Server:
    """A server process on 127.0.0.1:port: `with Server(argv, port, log) as s:` waits for
    GET /health, and stops it (SIGTERM, then SIGKILL) on leaving, whatever happened."""

    def __init__(
        self, argv: list[str], port: int, log: Path, start_timeout: float = 180.0, env=None
    ):
        self.argv, self.port, self.log_path = argv, port, Path(log)
        self.env = server_env(**(env or {}))
        self.url = f"http://127.0.0.1:{port}"
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None

    def __enter__(self) -> Server:
        self._log = open(self.log_path, "w")  # a file, not a pipe: a full pipe would block it
        self.proc = subprocess.Popen(
            self.argv, stdout=self._log, stderr=subprocess.STDOUT, env=self.env
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{' '.join(self.argv[:4])} exited with {self.proc.returncode} before "
                    f"serving:\n{self.log()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.3)
        raise TimeoutError(f"no answer on {self.url}/health after {self.start_timeout:.0f} s")

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout` s; the exit status (negative: a signal)."""
        if self.proc is None:
            return self.returncode
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.returncode = self.proc.returncode
        self.proc = None
        self._log.close()
        return self.returncode

    def __exit__(self, *exc) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def post(self, route: str, body, timeout: float = 120.0) -> tuple[int, str]:
        """(HTTP status, response text); `body` a dict (sent as JSON) or bytes (as they are)."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + route, data=data, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def chat(self, content: str, max_tokens: int, stream: bool = False, timeout: float = 120.0):
        """The text of a greedy chat completion (streamed chunks joined when `stream`)."""
        return self.completion(content, max_tokens, stream, timeout)[0]

    def completion(self, content: str, max_tokens: int, stream: bool = False, timeout=120.0):
        """(text, completion tokens) of a greedy chat completion of one user message."""
        body = {
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": stream,
        }
        status, text = self.post("/v1/chat/completions", body, timeout)
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {text[:500]}")
        if not stream:
            answer = json.loads(text)
            return answer["choices"][0]["message"]["content"], answer["usage"]["completion_tokens"]
        parts, tokens = [], None
        for line in text.splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[len("data: ") :])
                if "error" in chunk:
                    raise RuntimeError(f"stream error: {chunk['error']}")
                for choice in chunk.get("choices", []):
                    parts.append(choice.get("delta", {}).get("content") or "")
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        return "".join(parts), tokens


def load(server: Server, prompts: list[str], clients: int, requests: int, new_tokens: int):
    """Sends `requests` chat completions from `clients` threads, each client one request
    after the other; (requests/s, latencies in s, completion tokens in all)."""
    todo = [prompts[i % len(prompts)] for i in range(requests)]
    shares = [todo[i::clients] for i in range(clients)]

    def client(mine):
        out = []
        for p in mine:
            t0 = time.perf_counter()
            _, tokens = server.completion(p, new_tokens)
            out.append((time.perf_counter() - t0, tokens))
        return out

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = [r for rs in pool.map(client, shares) for r in rs]
    wall = time.perf_counter() - t0
    return requests / wall, [t for t, _ in done], sum(n for _, n in done)


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


# --- the benchmark ------------------------------------------------------------------------


def _shape(ctx: Context) -> tuple[str, dict]:
    if ctx.gpu and not ctx.quick:
        shape = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                     num_attention_heads=16, num_key_value_heads=8, vocab_size=2048,
                     max_position_embeddings=4096, dtype="bfloat16")  # fmt: skip
        return "llama-0.4B", shape
    if ctx.gpu:
        shape = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=4,
                     num_attention_heads=16, num_key_value_heads=8, vocab_size=2048,
                     max_position_embeddings=4096, dtype="bfloat16")  # fmt: skip
        return "llama-4-layer", shape
    return "llama-small", dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2)


def _servers(model: str, device: str, full: bool) -> dict[str, list[str]]:
    py = sys.executable
    tf = [py, "-m", "transformers.cli.transformers", "serve", model, "--device", device]
    fl = [py, "-m", "fastllm", "serve", model, "--device", device]
    servers = {
        "transformers serve": tf,
        "fastllm serve (attention)": fl,
        "fastllm serve (attention + w8a16)": fl + ["--linear", "w8a16"],
    }
    if full:
        # the same paged cache for both (16k tokens); left to transformers, it would take
        # 0.9 of the free GPU memory, or 0.6 of the RAM on the CPU
        cb = ["--continuous-batching", "--cb-num-blocks", "512", "--cb-block-size", "32"]
        servers["transformers serve --continuous-batching"] = tf + cb
        servers["fastllm serve --linear w8a16 --continuous-batching (sdpa attention)"] = (
            fl + ["--linear", "w8a16"] + cb
        )
    return servers


def run(ctx: Context) -> None:
    missing = [m for m in ("transformers", "fastapi", "uvicorn", "openai", "pydantic")
               if importlib.util.find_spec(m) is None]  # fmt: skip
    if missing:
        print(f"  {', '.join(missing)}: not installed (pip install 'fastllm[serve]'); skipped")
        return
    from fastllm._sentences import SENTENCES

    name, shape = _shape(ctx)
    new_tokens = 16 if ctx.quick else 64
    requests = {1: 4, 4: 8, 16: 16} if ctx.quick else {1: 16, 4: 32, 16: 64}
    prompts = list(SENTENCES[:16])
    device = "cuda" if ctx.gpu else "cpu"
    env = {}
    if not ctx.gpu and "OMP_NUM_THREADS" not in os.environ:
        # the clients run on the same CPU: one core is left to them, or PyTorch's threads
        # and theirs take turns, and the timings say more about the OS than the server
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) - 1))
    baseline: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="fastllm-bench-serve-") as tmp:
        model = str(write_model_dir(Path(tmp) / "model", **shape))
        threads = f", OMP_NUM_THREADS={env['OMP_NUM_THREADS']}" if env else ""
        print(f"  {name}, {new_tokens} new tokens per request, {device}{threads}", flush=True)
        for label, argv in _servers(model, device, full=not ctx.quick).items():
            port = free_port()
            log = Path(tmp) / f"server-{port}.log"
            t_start = time.perf_counter()
            try:
                argv = argv + ["--host", "127.0.0.1", "--port", str(port)]
                with Server(argv, port, log, env=env) as s:
                    started = time.perf_counter() - t_start
                    for p in prompts[:2]:  # warm-up
                        s.chat(p, new_tokens)
                    for c in CONCURRENCY:
                        rps, lat, tokens = load(s, prompts, c, requests[c], new_tokens)
                        _row(ctx, baseline, name, c, label, rps, lat, tokens, started)
            except (RuntimeError, TimeoutError, OSError) as e:
                print(f"  {label}: failed ({str(e).splitlines()[0]})\n{_tail(log)}", flush=True)
                ctx.add(bench="serve", case=f"{name}", impl=label, note=f"failed: {e}"[:200])


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-2000:] if log.exists() else ""


def _row(ctx, baseline, name, clients, label, rps, lat, tokens, started) -> None:
    baseline.setdefault(clients, rps)  # transformers serve, the first server
    p50, p99 = _percentile(lat, 0.5) * 1e3, _percentile(lat, 0.99) * 1e3
    row = ctx.add(
        bench="serve",
        case=f"{name} {clients} client{'s' if clients > 1 else ''}",
        impl=label,
        ms=p50,
        metric="requests/s",
        value=rps,
        speedup=rps / baseline[clients],
        p50_ms=p50,
        p99_ms=p99,
        requests=len(lat),
        tokens=tokens,
        note=f"p99 {p99:.1f} ms; {tokens} tokens in {len(lat)} requests; baseline: "
        f"transformers serve; server up in {started:.1f} s",
    )
    print(
        f"  {row['case']:<24} {label:<40} {rps:8.2f} req/s  p50 {p50:8.1f} ms  p99 {p99:8.1f} ms",
        flush=True,
    )
