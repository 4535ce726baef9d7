"""`fastllm serve MODEL_DIR`: transformers' OpenAI-compatible server on fastllm's kernels.

    fastllm serve path/to/llama                        # fastllm attention, float weights
    fastllm serve path/to/llama --linear w8a16         # + int8 weights, quantized on load
    fastllm serve path/to/llama-w8a16                  # a checkpoint save_pretrained wrote
    fastllm serve path/to/llama --linear w8a16 --continuous-batching

The server is the one `transformers serve` runs: the FastAPI app of
`transformers.cli.serving.build_server`, transformers' endpoint handlers and generation
code. So the endpoints (/v1/chat/completions, /v1/completions, /v1/responses, /v1/models,
/health, ...) and the request format are those of `transformers serve`, pinned to
MODEL_DIR: a request names the model as MODEL_DIR was given on the command line, or
names none. fastllm enters through public pieces of transformers only, and patches none:

- Loading. transformers' `ModelManager` loads the model the server uses (at start, and
  again after a POST /reset). `FastllmModelManager` subclasses it: its public
  `get_quantization_config()` answers `FastllmConfig(linear=...)` for a float MODEL_DIR,
  so that `from_pretrained` quantizes the layers through fastllm's quantizer, registered
  in transformers' quantizer registry (fastllm.hf_quantizer); a checkpoint written by
  `save_pretrained` carries that config in its config.json already. Its
  `load_model_and_processor()` then switches the model to the "fastllm" attention
  implementation registered in transformers' AttentionInterface (`fastllm.optimize`),
  which needs no quantizer.
- Requests. `build_server` takes the endpoint handlers as arguments; fastllm passes
  subclasses of transformers' own whose `handle_request` first answers with a 400 and a
  message what transformers answers with a 500 or not at all: `max_tokens`
  (`max_completion_tokens`, `max_output_tokens`) below 1 (generate() raises ValueError in
  the inference thread: "500 Internal Server Error", no message), chat `messages` that are
  not a list of messages (KeyError: 500), and a prompt that leaves no position for a new
  token under the model's max_position_embeddings, or fewer than max_tokens (transformers
  generates past the limit, with a warning in its log).

Why a subclass and not `transformers serve` options: `--attn-implementation` accepts only
eager, sdpa, flash_attention_2/3, flex_attention or a Hub kernel "org/repo" that
transformers downloads (ModelManager._validate_args), and `--quantization` only bnb-4bit
and bnb-8bit (get_quantization_config), while `from_pretrained` overrides the
attn_implementation of a config.json with the one the server passes (None).

Continuous batching (--continuous-batching) is transformers' paged continuous batching,
with fastllm's linear layers (--linear) and transformers' attention (sdpa): transformers
refuses every other attention implementation there.
`ContinuousBatchingManager.switch_to_cb_friendly_attn`
(transformers/generation/continuous_batching/continuous_api.py), run when the manager is
created, raises ValueError unless `model.config._attn_implementation` is "sdpa",
"paged|eager" or a name containing "flash" (`is_flash_attention_requested`); so
"fastllm" never reaches the continuous batching loop, and the server would answer every
request with a 500. Its decode path with block tables (where an attention function
would get block_table, k_cache and v_cache) is further limited to flash attention 2/3 on
CUDA or 2 on XPU (`ensure_decode_fast_path_is_available`, initialization.py).

Shutdown: SIGTERM or SIGINT stops uvicorn gracefully (in-flight requests finish),
transformers unloads the model, the continuous batching thread is stopped, and the
process exits with status 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import signal
import sys
import threading
from pathlib import Path

from fastllm.optimize_cmd import UsageError, model_dir

LINEAR_KINDS = ("w8a8", "w8a16", "2:4", "block", "2:4+w8a8")  # as fastllm.optimize takes them
# the fields that set the number of new tokens (chat, completions, responses), in the order
# transformers reads them: max_completion_tokens wins over max_tokens
MAX_TOKEN_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        metavar="MODEL_DIR",
        help="a local Hugging Face model directory: float weights, or a fastllm checkpoint "
        "written by save_pretrained (its config.json holds the fastllm quantization_config)",
    )
    parser.add_argument(
        "--linear",
        choices=LINEAR_KINDS,
        default=None,
        help="quantize the linear layers of a float MODEL_DIR while loading, as "
        "fastllm.optimize(linear=...) does, calibration-free; None: float linear layers",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument(
        "--continuous-batching",
        action="store_true",
        help="transformers' paged continuous batching; attention is then transformers' "
        "sdpa (its continuous batching takes no other implementation), linear layers "
        "fastllm's (--linear)",
    )
    parser.add_argument(
        "--cb-block-size",
        type=int,
        default=None,
        help="continuous batching: KV cache block size in tokens; None: transformers' choice",
    )
    parser.add_argument(
        "--cb-num-blocks",
        type=int,
        default=None,
        help="continuous batching: number of KV cache blocks; None: as many as "
        "--cb-max-memory-percent allows",
    )
    parser.add_argument(
        "--cb-max-batch-tokens",
        type=int,
        default=None,
        help="continuous batching: most tokens in one forward pass; None: transformers' choice",
    )
    parser.add_argument(
        "--cb-max-memory-percent",
        type=float,
        default=None,
        help="continuous batching: fraction of the memory for the KV cache; None: "
        "transformers' choice (0.9 of free GPU memory; on the CPU 0.6 of all RAM, "
        "allocated at the first request: give --cb-num-blocks there)",
    )
    parser.add_argument(
        "--device", default="auto", help="device_map for from_pretrained: auto, cpu, cuda:0, ..."
    )
    parser.add_argument(
        "--dtype", default="auto", help="auto (the checkpoint's), float32, bfloat16 or float16"
    )
    parser.add_argument("--default-seed", type=int, default=None, help="torch seed at start")
    parser.add_argument(
        "--log-level", default="warning", help="transformers' log level (info, warning, ...)"
    )
    parser.add_argument("--enable-cors", action="store_true", help="allow every origin (CORS)")


# --- checks before anything slow ----------------------------------------------------------

DTYPES = ("auto", "float32", "bfloat16", "float16")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _check_arguments(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}: expected 0 to 65535")
    for flag in ("cb_block_size", "cb_num_blocks", "cb_max_batch_tokens", "cb_max_memory_percent"):
        value = getattr(args, flag)
        if value is None:
            continue
        name = "--" + flag.replace("_", "-")
        if flag == "cb_max_memory_percent":
            if not 0 < value <= 1:
                raise UsageError(f"{name} {value}: expected a fraction in (0, 1]")
        elif value < 1:
            raise UsageError(f"{name} {value}: expected an integer >= 1")
        if not args.continuous_batching:
            raise UsageError(f"{name}: applies to --continuous-batching only")
    if args.dtype not in DTYPES:
        raise UsageError(f"--dtype {args.dtype}: expected one of {', '.join(DTYPES)}")
    if args.log_level.lower() not in LOG_LEVELS:
        raise UsageError(f"--log-level {args.log_level}: expected one of {', '.join(LOG_LEVELS)}")


def saved_quantization(path: Path) -> dict | None:
    """The quantization_config of MODEL_DIR's config.json, or None."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"MODEL_DIR {path}: cannot read its config.json ({e})") from None
    if not isinstance(config, dict):
        raise UsageError(f"MODEL_DIR {path}: its config.json is not a JSON object")
    quant = config.get("quantization_config")
    return quant if isinstance(quant, dict) else None


def check_model_dir(name: str, linear: str | None) -> dict | None:
    """Checks MODEL_DIR (config.json and tokenizer files) and --linear against it; returns
    its saved quantization_config (a fastllm checkpoint's: quant_method "fastllm") or None."""
    path = model_dir(name)  # a directory with config.json and a tokenizer, as optimize needs
    quant = saved_quantization(path)
    if quant is not None and linear is not None:
        method = quant.get("quant_method")
        if method == "fastllm":
            saved = quant.get("linear")
            kind = saved.get("kind") if isinstance(saved, dict) else None
            raise UsageError(
                f"--linear {linear}: MODEL_DIR {name} is a fastllm checkpoint (linear={kind}), "
                "served as it was saved; leave out --linear"
            )
        raise UsageError(
            f"--linear {linear}: MODEL_DIR {name} is already quantized "
            f"(quant_method={method!r}); fastllm quantizes float checkpoints"
        )
    return quant


# --- fastllm's pieces of the server, built on first use (transformers imports slowly) -----

_LAZY = ("FastllmModelManager", "FastllmChatCompletionHandler", "FastllmCompletionHandler",
         "FastllmResponseHandler")  # fmt: skip
_built: dict | None = None


def _classes() -> dict:
    """{name: class}: FastllmModelManager and the request-checking endpoint handlers."""
    global _built
    if _built is not None:
        return _built
    from jinja2 import TemplateError
    from transformers.cli.serving import Modality, ModelManager
    from transformers.cli.serving.chat_completion import ChatCompletionHandler
    from transformers.cli.serving.completion import CompletionHandler
    from transformers.cli.serving.response import ResponseHandler

    class FastllmModelManager(ModelManager):
        """transformers' ModelManager, loading through fastllm.

        linear: None or a kind of fastllm.optimize's `linear` (a float checkpoint is
            quantized by fastllm's quantizer while it loads).
        attention: switch every model loaded to fastllm attention (True), or keep it on
            transformers' sdpa (False: continuous batching takes nothing else).
        Other arguments: ModelManager's.
        """

        def __init__(self, *, linear: str | None, attention: bool, **kwargs):
            # set before ModelManager.__init__, which loads force_model
            self.fastllm_linear = linear
            self.fastllm_attention = attention
            self._fastllm_lock = threading.Lock()
            super().__init__(**kwargs)

        def get_quantization_config(self):
            if self.fastllm_linear is None:
                return super().get_quantization_config()
            from fastllm.hf import FastllmConfig

            return FastllmConfig(linear=self.fastllm_linear, attention=self.fastllm_attention)

        def load_model_and_processor(self, *args, **kwargs):
            # every request resolves its model here: the switch runs under the lock right
            # after a load, so no request gets a model before it is switched
            with self._fastllm_lock:
                model, processor = super().load_model_and_processor(*args, **kwargs)
                set_attention(model, self.fastllm_attention)
            return model, processor

    class _Checks:
        """Request checks run before transformers' handler (see the module docstring)."""

        def _fastllm_check(self, body: dict, prompt_ids=None) -> None:
            """HTTP 400 for a bad max-tokens field, and, when `prompt_ids(model,
            processor)` gives the prompt's tokens, for a prompt the model cannot extend."""
            max_new = check_max_tokens(body)
            forced = self.model_manager.force_model
            if prompt_ids is None or forced is None or body.get("model") not in (None, forced):
                return  # a request for another model gets transformers' own 400
            manager = self.model_manager
            model, processor = manager.load_model_and_processor(manager.process_model_name(forced))
            limit = max_positions(model)
            if limit is None:
                return
            n = len(prompt_ids(model, processor))
            if n >= limit:
                raise _bad(
                    f"the prompt is {n} tokens; this model takes {limit} positions "
                    "(max_position_embeddings), which leaves no room for a new token"
                )
            if max_new is not None and n + max_new > limit:
                raise _bad(
                    f"the prompt is {n} tokens and {max_new} new tokens were asked for: "
                    f"{n + max_new} positions; this model takes {limit} (max_position_embeddings)"
                )

    class FastllmChatCompletionHandler(_Checks, ChatCompletionHandler):
        async def handle_request(self, body: dict, request_id: str):
            check_messages(body)

            def prompt_ids(model, processor):
                if self.model_manager.get_model_modality(model, processor) != Modality.LLM:
                    return []  # images, audio: not counted here
                try:  # as transformers' handler renders them
                    kwargs = {
                        **self.chat_template_kwargs,
                        **(body.get("chat_template_kwargs") or {}),
                    }
                    return processor.apply_chat_template(
                        self.get_processor_inputs_from_messages(body["messages"], Modality.LLM),
                        add_generation_prompt=True,
                        tools=body.get("tools"),
                        tokenize=True,
                        return_dict=True,
                        **kwargs,
                    )["input_ids"]
                except (TemplateError, TypeError, ValueError, KeyError) as e:
                    raise _bad(
                        "messages: the model's chat template cannot render them "
                        f"({type(e).__name__}: {e})"
                    ) from None

            self._fastllm_check(body, prompt_ids)
            return await super().handle_request(body, request_id)

    class FastllmCompletionHandler(_Checks, CompletionHandler):
        async def handle_request(self, body: dict, request_id: str):
            def prompt_ids(model, processor):
                tokenizer = getattr(processor, "tokenizer", processor)
                return tokenizer(body.get("prompt", ""))["input_ids"]

            # transformers answers a prompt that is not a string with its own 400
            text = isinstance(body.get("prompt", ""), str)
            self._fastllm_check(body, prompt_ids if text else None)
            return await super().handle_request(body, request_id)

    class FastllmResponseHandler(_Checks, ResponseHandler):
        async def handle_request(self, body: dict, request_id: str):
            self._fastllm_check(body)
            return await super().handle_request(body, request_id)

    classes = (FastllmModelManager, FastllmChatCompletionHandler, FastllmCompletionHandler,
               FastllmResponseHandler)  # fmt: skip
    for cls in classes:  # where pickle and tracebacks find them
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
    _built = {cls.__name__: cls for cls in classes}
    return _built


def __getattr__(name: str):
    if name in _LAZY:
        return _classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def set_attention(model, fastllm_attention: bool) -> None:
    """Switches a loaded transformers model to fastllm attention, or back to sdpa."""
    import fastllm
    from fastllm import hf

    if fastllm_attention and not hf.enabled(model):
        fastllm.optimize(model)  # attention only; a model the quantizer optimized keeps its layers
    elif not fastllm_attention and hf.enabled(model):
        model.set_attn_implementation("sdpa")


def max_positions(model) -> int | None:
    """The model's max_position_embeddings, or None where it has none."""
    config = model.config.get_text_config()
    limit = getattr(config, "max_position_embeddings", None)
    return limit if isinstance(limit, int) and limit > 0 else None


def _bad(detail: str):
    from fastapi import HTTPException

    return HTTPException(status_code=400, detail=detail)


def check_max_tokens(body: dict) -> int | None:
    """The number of new tokens a request asks for (None: the server's default); HTTP 400
    for a value that is not an integer >= 1."""
    asked = None
    for name in MAX_TOKEN_FIELDS:
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _bad(f"{name} is {value!r}; expected an integer >= 1")
        if asked is None:
            asked = value
    return asked


def check_messages(body: dict) -> None:
    """HTTP 400 unless `messages` is a non-empty list of objects with a string "role"."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad(
            f"messages is {json.dumps(messages)[:80]}; expected a non-empty list of messages"
        )
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad(f'messages[{i}] is {json.dumps(m)[:80]}; expected an object with a "role"')


# --- the command ---------------------------------------------------------------------------


def _summary(model) -> str:
    """One line: the model class, its attention, its fastllm linear layers, any notes."""
    import fastllm
    from fastllm import hf

    parts = [type(model).__name__]
    parts.append(
        "attention: " + ("fastllm" if hf.enabled(model) else model.config._attn_implementation)
    )
    try:
        rep = fastllm.report(model)
    except ValueError:
        rep = None
    if rep is not None:
        swapped: dict[str, int] = {}
        for e in rep.layers:
            if e.kind == "linear" and e.action in ("swapped", "kept"):
                after = e.after or e.before
                swapped[after] = swapped.get(after, 0) + 1
        if swapped:
            parts.append("linear: " + ", ".join(f"{n} x {t}" for t, n in sorted(swapped.items())))
        parts += [f"note: {n}" for n in rep.notes]
        parts += [
            f"attention not switched: {e.reason}" for e in rep.skipped if e.kind == "attention"
        ]
    return "; ".join(parts)


def _exit_on_sigterm(signum, frame):
    # uvicorn restores this handler and raises SIGTERM again once it has shut down: the
    # process then ends through SystemExit, with the cleanup below, instead of being killed
    raise SystemExit(0)


def run(args: argparse.Namespace) -> int:
    _check_arguments(args)
    saved = check_model_dir(args.model, args.linear)
    if importlib.util.find_spec("transformers") is None:
        raise UsageError("fastllm serve runs transformers' server: pip install 'fastllm[serve]'")
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        raise UsageError(
            "transformers' server needs fastapi, uvicorn, openai and pydantic: "
            "pip install 'fastllm[serve]'"
        )
    fastllm_checkpoint = saved is not None and saved.get("quant_method") == "fastllm"
    if args.linear is not None or fastllm_checkpoint:
        # only --linear and fastllm checkpoints need fastllm's quantizer; attention does not
        try:
            from fastllm import hf_quantizer

            hf_quantizer.register()
        except (ImportError, AttributeError, ValueError) as e:
            what = (
                f"--linear {args.linear}" if args.linear else f"the fastllm checkpoint {args.model}"
            )
            raise UsageError(
                f"{what} needs fastllm's transformers quantizer (fastllm.hf_quantizer), which "
                f"could not be registered: {type(e).__name__}: {e}"
            ) from None
    attention = not args.continuous_batching
    if args.continuous_batching:
        print(
            "fastllm serve: --continuous-batching: attention is transformers' sdpa "
            "(transformers' continuous batching refuses other attention implementations)"
            + ("" if args.linear or fastllm_checkpoint else "; without --linear no fastllm "
               "kernel is used"),
            file=sys.stderr,
        )  # fmt: skip

    import uvicorn
    from transformers import ContinuousBatchingConfig
    from transformers.cli.serving import build_server
    from transformers.cli.serving.systemone import SystemOneHandler
    from transformers.cli.serving.transcription import TranscriptionHandler
    from transformers.cli.serving.utils import GenerationState, set_torch_seed
    from transformers.utils import logging

    if args.default_seed is not None:
        set_torch_seed(args.default_seed)
    logging.get_logger("transformers").setLevel(logging.log_levels[args.log_level.lower()])

    built = _classes()
    try:
        manager = built["FastllmModelManager"](
            linear=args.linear,
            attention=attention,
            device=args.device,
            dtype=args.dtype,
            continuous_batching=args.continuous_batching,
            force_model=args.model,  # loaded now; requests name it as given
        )
    except (OSError, ValueError, RuntimeError) as e:
        print(f"fastllm serve: error: could not load {args.model}: {type(e).__name__}: {e}",
              file=sys.stderr)  # fmt: skip
        return 1
    model, _ = manager.load_model_and_processor(manager.process_model_name(args.model))
    print(f"fastllm serve: {args.model}: {_summary(model)}", file=sys.stderr)

    cb_kwargs = {
        k: v
        for k, v in {
            "block_size": args.cb_block_size,
            "num_blocks": args.cb_num_blocks,
            "max_batch_tokens": args.cb_max_batch_tokens,
            "max_memory_percent": args.cb_max_memory_percent,
        }.items()
        if v is not None
    }
    state = GenerationState(
        continuous_batching=args.continuous_batching,
        cb_config=ContinuousBatchingConfig(**cb_kwargs) if cb_kwargs else None,
    )
    handlers = dict(model_manager=manager, generation_state=state)
    app = build_server(
        manager,
        built["FastllmChatCompletionHandler"](**handlers),
        completion_handler=built["FastllmCompletionHandler"](**handlers),
        response_handler=built["FastllmResponseHandler"](**handlers),
        transcription_handler=TranscriptionHandler(manager, state),
        systemone_handler=SystemOneHandler(**handlers),
        generation_state=state,
        enable_cors=args.enable_cors,
    )
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info"))
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        server.run()
    except KeyboardInterrupt:  # SIGINT, raised again by uvicorn after its graceful shutdown
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        state.shutdown()  # the continuous batching thread, which is not a daemon
        manager.shutdown()
    return 0 if server.started else 1
