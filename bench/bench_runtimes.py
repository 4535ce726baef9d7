"""fastllm against ONNX Runtime and OpenVINO on all-MiniLM-L6-v2, on the CPU.

    python -m bench.bench_runtimes                 # the README table
    python -m bench.bench_runtimes --quick         # a short run
    python -m bench.bench_runtimes --contended     # also with a busy process on one core
    python -m bench.bench_runtimes --sweep         # --contended under each OpenMP setting,
                                                   # one subprocess per setting
    fastllm bench runtimes                         # through bench/runner.py (quick sizes)

The inputs are those of `fastllm optimize`, built by its own helpers: the built-in
sentences in padded batches of 32 (at most 128 tokens), the first batch timed, every
fourth sentence for calibration (SmoothQuant, NNCF), accuracy as the cosine of mean-pooled
embeddings against the float32 PyTorch model over all sentences (mean and worst).

Contenders (a runtime that is not installed is skipped with a message; install them with
`pip install -e ".[runtimes]"`):

    pytorch-fp32         the unmodified model, eager
    fastllm-w8a8         fastllm.optimize(linear="w8a8"), SmoothQuant, eager
    fastllm-w8a8-compile the same under torch.compile(fullgraph=True)
    fastllm-w8a8-fused   fastllm.optimize(linear="w8a8", fuse=True): norms, activations and
                         residual adds in fastllm's ops; -fused-compile under torch.compile
    fastllm-w8a8-fused-unpad  the same with unpad=True: the encoder runs on the batch's
                         valid tokens only; -unpad-compile under torch.compile
    ort-fp32, ort-int8   ONNX Runtime: the model exported by torch.onnx.export, and
                         onnxruntime.quantization.quantize_dynamic (int8 weights, dynamic
                         per-tensor activation scales)
    ov-fp32, ov-bf16     OpenVINO on the same ONNX file (bf16 only where the CPU has it)
    ov-int8-weights      NNCF compress_weights (int8 weight-only)
    ov-int8-static       NNCF quantize (static int8, calibrated on the same sentences)

Every runtime gets the same thread count (torch.get_num_threads(), or --threads). The
contenders take turns within each round, in one process. Before timing, the benchmark
waits (a bounded time) for the machine to be quiet, and it records the load: the load
average, and the CPU that other processes used during each phase (psutil, when installed).

--contended: after the quiet phase, a background process spins on one core (pinned to the
last CPU this process may use, stopped when the phase ends and in any case after
HOG_LIMIT_S seconds) while the same rounds run again; the table gives each contender's
quiet and contended time and their ratio, the slowdown.

The table also gives each contender's minor page faults per call (the process's, over the
timed calls): eager PyTorch allocates every intermediate tensor afresh, and when glibc's
malloc has handed the freed blocks of a few MB back to the system, each page is faulted in
(and zeroed) again on its next use; the runtimes plan their memory once.

OpenMP settings such as OMP_WAIT_POLICY are read once, when the OpenMP runtime starts, and
glibc's MALLOC_* settings when malloc starts, so --sweep runs the benchmark again in a
fresh process for each setting of SETTINGS.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch

try:  # page faults per call (POSIX only)
    import resource
except ImportError:
    resource = None

HOG_LIMIT_S = 900  # a background spinner never outlives this, whatever happens to us
CONTENDERS = (
    "pytorch-fp32",
    "fastllm-w8a8",
    "fastllm-w8a8-compile",
    "fastllm-w8a8-fused",
    "fastllm-w8a8-fused-compile",
    "fastllm-w8a8-fused-unpad",
    "fastllm-w8a8-fused-unpad-compile",
    "ort-fp32",
    "ort-int8",
    "ov-fp32",
    "ov-bf16",
    "ov-int8-weights",
    "ov-int8-static",
)
QUICK_CONTENDERS = (
    "pytorch-fp32",
    "fastllm-w8a8",
    "fastllm-w8a8-fused",
    "fastllm-w8a8-fused-unpad",
    "ort-int8",
    "ov-fp32",
    "ov-int8-static",
)
# name -> (environment variables, extra arguments) for --sweep; each runs in its own process
SETTINGS = {
    "default": ({}, []),
    "OMP_WAIT_POLICY=PASSIVE": ({"OMP_WAIT_POLICY": "PASSIVE"}, []),
    "GOMP_SPINCOUNT=0": ({"GOMP_SPINCOUNT": "0"}, []),
    "threads=1": ({}, ["--threads", "1"]),
    "FASTLLM_BACKEND=torch": ({"FASTLLM_BACKEND": "torch"}, []),
    "MALLOC_MMAP/TRIM_THRESHOLD_": (
        {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824"},
        [],
    ),
}
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


# --- inputs: those of `fastllm optimize` ---------------------------------------------------


def load_inputs(batch_size: int = 32, max_length: int = 128):
    """(tokenizer, float32 model, evaluation batches, calibration batches), built exactly as
    `fastllm optimize` builds them (CPU, float32, every fourth sentence for calibration)."""
    from fastllm import optimize_cmd
    from fastllm._sentences import SENTENCES

    cpu = torch.device("cpu")
    path = optimize_cmd.model_dir(optimize_cmd.DEFAULT_MODEL)
    tok, model = optimize_cmd.load_model(path, cpu, torch.float32)
    batches = optimize_cmd.make_batches(tok, SENTENCES, batch_size, max_length, cpu)
    calib = optimize_cmd.make_batches(tok, SENTENCES[::4], batch_size, max_length, cpu)
    return tok, model, batches, calib


def _numpy_feed(batch: dict, names) -> dict:
    return {k: batch[k].numpy() for k in names}


class _Runtime:
    """A non-PyTorch model called like a transformers model: runtime(**batch) gives an
    object with .last_hidden_state (a float32 tensor), so fastllm optimize's embed() and
    the timing loop treat every contender alike."""

    def __init__(self, infer: Callable[[dict], object], names):
        self.infer, self.names = infer, names

    def __call__(self, **batch):
        out = self.infer(_numpy_feed(batch, self.names))
        return SimpleNamespace(last_hidden_state=torch.from_numpy(out))


class _Encoder(torch.nn.Module):
    """The transformers model with positional inputs and one output, for torch.onnx.export."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state


def export_onnx(model, batch: dict, path: Path) -> Path:
    """The float32 model as ONNX (TorchScript exporter, opset 17, offline), batch and
    sequence dimensions dynamic."""
    if path.exists():
        return path
    import warnings

    dims = {0: "batch", 1: "sequence"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's TracerWarnings about Python ifs
        torch.onnx.export(
            _Encoder(model),
            tuple(batch[k] for k in INPUT_NAMES),
            str(path),
            input_names=list(INPUT_NAMES),
            output_names=["last_hidden_state"],
            dynamic_axes={k: dims for k in (*INPUT_NAMES, "last_hidden_state")},
            opset_version=17,
            dynamo=False,
        )
    return path


# --- contenders ---------------------------------------------------------------------------


def missing(name: str) -> str | None:
    """Why contender `name` cannot run here, or None."""
    need = {"ort": "onnxruntime", "ov": "openvino"}.get(name.split("-")[0])
    if need and importlib.util.find_spec(need) is None:
        return f"{need} not installed (pip install -e '.[runtimes]')"
    if name.startswith("ov-int8") and importlib.util.find_spec("nncf") is None:
        return "nncf not installed (pip install -e '.[runtimes]')"
    if name.startswith(("ort", "ov")) and importlib.util.find_spec("onnx") is None:
        return "onnx not installed (torch.onnx.export needs it)"
    if name == "ov-bf16":
        import openvino as ov

        caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        if "BF16" not in caps:
            return f"this CPU has no bf16 in OpenVINO ({', '.join(caps)})"
    return None


def _ort_session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return _Runtime(lambda feed: sess.run(None, feed)[0], names)


def _ov_compiled(model, threads: int, precision: str = "f32"):
    import openvino as ov

    compiled = ov.Core().compile_model(
        model,
        "CPU",
        {
            "INFERENCE_NUM_THREADS": threads,
            "INFERENCE_PRECISION_HINT": precision,
            "PERFORMANCE_HINT": "LATENCY",
        },
    )
    names = [i.get_any_name() for i in compiled.inputs]
    return _Runtime(lambda feed: compiled(feed)[0], names)


def build(name: str, base, calib: list[dict], batch: dict, cache: Path, threads: int):
    """Contender `name`, called like the transformers model."""
    if name == "pytorch-fp32":
        return base
    if name.startswith("fastllm-w8a8"):
        import fastllm

        model = copy.deepcopy(base)
        fastllm.optimize(
            model,
            calibration=calib,
            linear="w8a8",
            fuse="-fused" in name,
            unpad="-unpad" in name,
        )
        if not name.endswith("compile"):
            return model
        # the -unpad model differs from the padded one only by its encoder's hooks, on
        # which PyTorch does not guard by default: without this, each would run the graph
        # compiled first for the other
        torch._dynamo.config.skip_nnmodule_hook_guards = False
        return torch.compile(model, fullgraph=True)
    onnx_path = export_onnx(base, batch, cache / "model.onnx")
    if name == "ort-fp32":
        return _ort_session(onnx_path, threads)
    if name == "ort-int8":
        path = cache / "model-int8.onnx"
        if not path.exists():
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(str(onnx_path), str(path), weight_type=QuantType.QInt8)
        return _ort_session(path, threads)

    import openvino as ov

    if name in ("ov-fp32", "ov-bf16"):
        precision = {"ov-fp32": "f32", "ov-bf16": "bf16"}[name]
        return _ov_compiled(ov.Core().read_model(onnx_path), threads, precision)
    path = cache / f"{name}.xml"
    if not path.exists():
        import nncf

        model = ov.Core().read_model(onnx_path)
        if name == "ov-int8-weights":
            model = nncf.compress_weights(model)  # INT8_ASYM, per output channel
        else:
            data = nncf.Dataset(calib, lambda b: _numpy_feed(b, INPUT_NAMES))
            model = nncf.quantize(
                model, data, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calib)
            )
        ov.save_model(model, path, compress_to_fp16=False)
    return _ov_compiled(ov.Core().read_model(path), threads)


# --- the machine's load -------------------------------------------------------------------


def _psutil():
    try:
        import psutil
    except ImportError:
        return None
    return psutil


def busy_others(seconds: float = 1.0, top: int = 3) -> dict:
    """Cores kept busy by other processes over `seconds` (we sleep meanwhile), and the
    busiest of them: {'cores', 'top': ['pid name 95%', ...], 'loadavg'}."""
    info = {"loadavg": [round(x, 2) for x in os.getloadavg()], "cores": None, "top": []}
    psutil = _psutil()
    if psutil is None:
        time.sleep(seconds)
        return info
    procs = list(psutil.process_iter(["pid", "name"]))
    for p in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    info["cores"] = round(psutil.cpu_percent(seconds) * psutil.cpu_count() / 100, 2)
    use = []
    for p in procs:
        try:
            use.append((p.cpu_percent(None), p.info["pid"], p.info["name"]))
        except psutil.Error:
            pass
    info["top"] = [f"{pid} {n} {pc:.0f}%" for pc, pid, n in sorted(use, reverse=True)[:top] if pc]
    return info


def wait_quiet(max_wait: float, threshold: float = 0.25) -> dict:
    """Waits up to max_wait seconds for other processes to use under `threshold` cores;
    returns the last reading, with 'quiet' and 'waited_s'."""
    t0 = time.monotonic()
    while True:
        info = busy_others()
        quiet = info["cores"] is None or info["cores"] < threshold
        if quiet or time.monotonic() - t0 >= max_wait:
            info.update(quiet=quiet, waited_s=round(time.monotonic() - t0, 1))
            return info


class LoadMeter:
    """CPU that other processes used while a phase ran: (machine busy time - ours -
    the background spinner's) / wall time, in cores; and the load average at the end."""

    def __init__(self, exclude_pid: int | None = None):
        self.psutil = _psutil()
        self.exclude = exclude_pid

    def _busy(self) -> tuple[float, float, float]:
        t = self.psutil.cpu_times()
        busy = sum(t) - t.idle - getattr(t, "iowait", 0.0)
        own = sum(self.psutil.Process().cpu_times()[:2])
        other = 0.0
        if self.exclude is not None:
            try:
                other = sum(self.psutil.Process(self.exclude).cpu_times()[:2])
            except self.psutil.Error:
                pass
        return busy, own, other

    def __enter__(self):
        self.wall = time.monotonic()
        self.start = self._busy() if self.psutil else None
        return self

    def __exit__(self, *exc):
        wall = time.monotonic() - self.wall
        self.result = {"loadavg_end": [round(x, 2) for x in os.getloadavg()]}
        if self.start is not None:
            end = self._busy()
            busy, own, hog = (e - s for e, s in zip(end, self.start))
            self.result.update(
                others_cores=round((busy - own - hog) / wall, 2),
                ours_cores=round(own / wall, 2),
                hog_cores=round(hog / wall, 2) if self.exclude else None,
            )


class Hog:
    """A background process that spins on one CPU (the last one we may run on) until
    stopped, and for at most `limit_s` seconds in any case."""

    def __init__(self, limit_s: float = HOG_LIMIT_S):
        self.cpu = max(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        self.limit_s = limit_s
        self.proc = None

    def __enter__(self):
        pin = f"os.sched_setaffinity(0, {{{self.cpu}}})\n" if self.cpu is not None else ""
        code = f"import os, time\n{pin}end = time.monotonic() + {self.limit_s}\n"
        code += "while time.monotonic() < end:\n    pass\n"
        self.proc = subprocess.Popen([sys.executable, "-c", code])
        time.sleep(0.3)  # let it start spinning
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


# --- timing -------------------------------------------------------------------------------


def minor_faults() -> int | None:
    """Minor page faults of this process so far (every thread), or None where the resource
    module is missing. A fault is a page the kernel hands out (zeroed) on first touch: what a
    tensor allocated from memory the allocator had returned to the system costs."""
    if resource is None:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@torch.no_grad()
def alternate(
    models: dict, batch: dict, rounds: int, warmup: int = 2, faults: dict | None = None
) -> dict[str, list]:
    """Milliseconds of each model(**batch) per round; the models take turns in each round,
    so that a change of load during the run slows them all alike. `faults`, when given,
    receives each model's minor page faults per call (mean over the rounds)."""
    for model in models.values():
        for _ in range(warmup):
            model(**batch)
    times: dict[str, list[float]] = {name: [] for name in models}
    counted: dict[str, int] = dict.fromkeys(models, 0)
    for _ in range(rounds):
        for name, model in models.items():
            f0 = minor_faults()
            t0 = time.perf_counter()
            model(**batch)
            times[name].append((time.perf_counter() - t0) * 1e3)
            if f0 is not None:
                counted[name] += minor_faults() - f0
    if faults is not None and resource is not None:
        faults.update({name: n / rounds for name, n in counted.items()})
    return times


def _stats(ms: list[float]) -> dict:
    s = sorted(ms)
    return {"ms": statistics.median(s), "ms_min": s[0], "ms_max": s[-1], "runs": len(s)}


def measure(args) -> dict:
    """Builds the contenders, checks accuracy, times them quiet (and contended); returns
    a JSON-able dict of everything the tables need."""
    from fastllm import optimize_cmd

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    names = args.contenders or (QUICK_CONTENDERS if args.quick else CONTENDERS)
    tok, base, batches, calib = load_inputs()
    timed = batches[0]
    cache = Path(args.cache_dir or tempfile.mkdtemp(prefix="fastllm-runtimes-"))
    cache.mkdir(parents=True, exist_ok=True)

    models, skipped, rows = {}, {}, {}
    ref = optimize_cmd.embed(base, batches)
    for name in names:
        why = missing(name)
        if why is not None:
            skipped[name] = why
            print(f"  {name}: skipped, {why}", file=sys.stderr, flush=True)
            continue
        t0 = time.perf_counter()
        model = build(name, base, calib, timed, cache, threads)
        cos = (optimize_cmd.embed(model, batches) * ref).sum(-1)
        rows[name] = {
            "contender": name,
            "cos_mean": cos.mean().item(),
            "cos_min": cos.min().item(),
            "build_s": round(time.perf_counter() - t0, 1),
        }
        models[name] = model
        print(f"  {name}: built in {rows[name]['build_s']} s", file=sys.stderr, flush=True)

    rounds = args.rounds or (3 if args.quick else 10)
    phases = {"quiet": None}
    if args.contended:
        phases["contended"] = Hog
    load = {}
    for phase, hog_cls in phases.items():
        if phase == "quiet":
            load["before_quiet"] = wait_quiet(args.wait_quiet)
        faults: dict[str, float] = {}
        if hog_cls is None:
            with LoadMeter() as meter:
                times = alternate(models, timed, rounds, faults=faults)
        else:
            with hog_cls() as hog, LoadMeter(hog.proc.pid) as meter:
                times = alternate(models, timed, rounds, faults=faults)
        load[phase] = meter.result
        for name, ms in times.items():
            rows[name][phase] = {**_stats(ms), "faults": faults.get(name)}
    for row in rows.values():
        row["x_fp32"] = (
            rows["pytorch-fp32"]["quiet"]["ms"] / row["quiet"]["ms"]
            if ("pytorch-fp32" in rows)
            else None
        )
        if args.contended:
            row["slowdown"] = row["contended"]["ms"] / row["quiet"]["ms"]
    return {
        "setting": args.setting,
        "env": {
            k: os.environ.get(k)
            for k in (
                "OMP_WAIT_POLICY",
                "GOMP_SPINCOUNT",
                "OMP_NUM_THREADS",
                "FASTLLM_BACKEND",
                "MALLOC_MMAP_THRESHOLD_",
                "MALLOC_TRIM_THRESHOLD_",
                "GLIBC_TUNABLES",
                "LD_PRELOAD",
            )
        },
        "threads": threads,
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "batch": list(timed["input_ids"].shape),
        "sentences": sum(b["input_ids"].shape[0] for b in batches),
        "rounds": rounds,
        "torch": torch.__version__,
        "versions": _versions(),
        "load": load,
        "rows": list(rows.values()),
        "skipped": skipped,
    }


def _versions() -> dict:
    out = {}
    for mod in ("onnxruntime", "openvino", "nncf"):
        if importlib.util.find_spec(mod) is not None:
            out[mod] = getattr(__import__(mod), "__version__", "?")
    return out


# --- output -------------------------------------------------------------------------------


def _load_line(result: dict) -> str:
    load = result["load"]
    q = load.get("before_quiet", {})
    parts = [
        f"threads {result['threads']} of {result['cpus']} CPUs",
        f"batch {result['batch'][0]} x {result['batch'][1]} tokens",
        f"median of {result['rounds']} alternating rounds",
        f"before timing: load average {q.get('loadavg')}, others busy {q.get('cores')} cores"
        + (
            ""
            if q.get("quiet", True)
            else f" (NOT quiet after {q.get('waited_s')} s wait: {', '.join(q.get('top', []))})"
        ),
    ]
    for phase in ("quiet", "contended"):
        if phase in load:
            m = load[phase]
            parts.append(
                f"{phase} phase: others {m.get('others_cores')} cores, ours "
                f"{m.get('ours_cores')}"
                + (f", spinner {m['hog_cores']}" if m.get("hog_cores") is not None else "")
            )
    return "; ".join(parts)


def table(result: dict) -> str:
    contended = any("contended" in r for r in result["rows"])
    head = ["contender", "ms", "× fp32", "cosine mean / min", "page faults / call"]
    if contended:
        head += ["contended ms", "slowdown"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        q = r["quiet"]
        cells = [
            r["contender"],
            f"{q['ms']:.1f} ({q['ms_min']:.0f}–{q['ms_max']:.0f})",
            f"{r['x_fp32']:.2f}" if r["x_fp32"] else "",
            f"{r['cos_mean']:.4f} / {r['cos_min']:.4f}",
            f"{q['faults']:.0f}" if q.get("faults") is not None else "",
        ]
        if contended:
            c = r["contended"]
            cells += [
                f"{c['ms']:.1f} ({c['ms_min']:.0f}–{c['ms_max']:.0f})",
                f"{r['slowdown']:.2f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    for name, why in result["skipped"].items():
        lines.append(f"| {name} | skipped: {why} | | | |" + (" | |" if contended else ""))
    return "\n".join(lines) + "\n\n" + _load_line(result)


def sweep_table(results: list[dict]) -> str:
    """One line per (setting, contender): quiet, contended, slowdown, and the slowdown
    relative to the OpenVINO int8 static one in the same run."""
    lines = [
        "| setting | threads | contender | quiet ms | contended ms | slowdown | / OpenVINO's |",
        "|---|---|---|---|---|---|---|",
    ]
    for res in results:
        by = {r["contender"]: r for r in res["rows"]}
        ov = next((by[n]["slowdown"] for n in ("ov-int8-static", "ov-fp32") if n in by), None)
        for r in res["rows"]:
            rel = f"{r['slowdown'] / ov:.2f}" if ov else ""
            lines.append(
                f"| {res['setting']} | {res['threads']} | {r['contender']} | "
                f"{r['quiet']['ms']:.1f} | {r['contended']['ms']:.1f} | "
                f"{r['slowdown']:.2f} | {rel} |"
            )
    loads = [f"{res['setting']}: {_load_line(res)}" for res in results]
    return "\n".join(lines) + "\n\n" + "\n".join(loads)


def sweep(args) -> list[dict]:
    """--contended once per setting of SETTINGS, each in a fresh process (OpenMP reads its
    environment once); the exported and quantized models are shared through one folder."""
    cache = Path(args.cache_dir or tempfile.mkdtemp(prefix="fastllm-runtimes-"))
    results = []
    for setting in args.settings or list(SETTINGS):
        env_extra, extra = SETTINGS[setting]
        cmd = [
            sys.executable,
            "-m",
            "bench.bench_runtimes",
            "--contended",
            "--json",
            "--cache-dir",
            str(cache),
            "--setting",
            setting,
            "--wait-quiet",
            str(args.wait_quiet),
            *extra,
        ]
        if args.rounds:
            cmd += ["--rounds", str(args.rounds)]
        if args.quick:
            cmd.append("--quick")
        if args.contenders:
            cmd += ["--contenders", ",".join(args.contenders)]
        if args.threads and "--threads" not in extra:
            cmd += ["--threads", str(args.threads)]
        print(f"-- {setting}", file=sys.stderr, flush=True)
        out = subprocess.run(
            cmd,
            env={**os.environ, **env_extra},
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent.parent,
        )
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            continue
        try:
            results.append(json.loads(out.stdout))
        except json.JSONDecodeError:
            print(f"no JSON from the {setting} run; its output began {out.stdout[:300]!r}",
                  file=sys.stderr)  # fmt: skip
            continue
        print(table(results[-1]), file=sys.stderr, flush=True)
    return results


# --- entry points -------------------------------------------------------------------------


def run(ctx) -> None:
    """`fastllm bench runtimes`: the quick quiet table, as rows of the runner's results."""
    if ctx.gpu:
        ctx.add(bench="runtimes", case="(CPU benchmark: run with --device cpu)", impl="-")
        return
    args = parse_args(["--quick"] if ctx.quick else [])
    result = measure(args)
    case = f"all-MiniLM-L6-v2 b{result['batch'][0]}x{result['batch'][1]}"
    for r in result["rows"]:
        ctx.add(
            bench="runtimes",
            case=case,
            impl=r["contender"],
            ms=r["quiet"]["ms"],
            speedup=r["x_fp32"],
            note=f"cos {r['cos_mean']:.4f}/{r['cos_min']:.4f}, {result['threads']} threads",
        )
    for name, why in result["skipped"].items():
        ctx.add(bench="runtimes", case=case, impl=name, note=f"skipped: {why}")
    print(table(result))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.bench_runtimes",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="fewer contenders and rounds")
    p.add_argument("--contended", action="store_true", help="also time with one core taken")
    p.add_argument("--sweep", action="store_true", help="--contended under each setting")
    p.add_argument(
        "--settings",
        type=lambda s: s.split(","),
        default=None,
        help=f"for --sweep, from {list(SETTINGS)}",
    )
    p.add_argument(
        "--contenders",
        type=lambda s: s.split(","),
        default=None,
        help=f"comma-separated, from {list(CONTENDERS)}",
    )
    p.add_argument("--threads", type=int, default=None, help="threads for every runtime")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 10, quick 3)")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=20.0,
        help="seconds to wait at most for a quiet machine (default %(default)s)",
    )
    p.add_argument("--cache-dir", default=None, help="keep the ONNX/OpenVINO files here")
    p.add_argument("--setting", default="as started", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = p.parse_args(argv)
    unknown = sorted(set(args.contenders or ()) - set(CONTENDERS))
    unknown += sorted(set(args.settings or ()) - set(SETTINGS))
    if unknown:
        p.error(f"unknown contender(s) or setting(s) {unknown}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.sweep:
        results = sweep(args)
        print(json.dumps(results, indent=1) if args.json else sweep_table(results))
        return 0 if results else 1
    if args.json:
        # only the JSON on stdout: the runtimes' own progress output (NNCF's progress
        # bars write to stdout when it is not a terminal) goes to stderr
        with contextlib.redirect_stdout(sys.stderr):
            result = measure(args)
        print(json.dumps(result, indent=1))
        return 0
    print(table(measure(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
