"""Timing and reporting shared by every benchmark.

Timing (`measure`): on a GPU, CUDA events around each run, warm-up first, the L2
flushed before every run (a write over a buffer larger than the L2), the median
of many runs; on the CPU, a monotonic clock, warm-up, the median.

Rows are plain dicts; `write_results` writes them as results.json (with the
machine, library versions, git commit and date) and results.md (a table), and a
PNG chart on request.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

_FLUSH_BYTES = 256 * 1024 * 1024  # > the L2 of any current GPU (H200: 60 MB)
_flush_buf: dict[torch.device, torch.Tensor] = {}


@dataclass
class Context:
    """What a benchmark module's `run(ctx)` gets."""

    device: torch.device
    quick: bool = False  # small sizes, few repetitions (CI smoke runs, the README command)
    copy_gbps: float | None = None  # measured copy bandwidth, bytes read + written
    rows: list[dict] = field(default_factory=list)

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"

    def add(self, **row) -> dict:
        self.rows.append(row)
        return row


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fn: Callable[[], object], device: torch.device, *, quick: bool = False, flush_l2: bool = True
) -> dict:
    """Median time of fn() in milliseconds, plus the 20th and 80th percentiles."""
    if device.type == "cuda":
        return _measure_cuda(fn, device, quick=quick, flush_l2=flush_l2)
    return _measure_cpu(fn, quick=quick)


def _measure_cpu(fn, *, quick: bool) -> dict:
    budget = 0.15 if quick else 1.0
    fn()  # warm-up (and first-call compilation)
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    reps = int(min(max(budget / once, 3), 200))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return _summary(times)


def _measure_cuda(fn, device, *, quick: bool, flush_l2: bool) -> dict:
    if flush_l2 and device not in _flush_buf:
        _flush_buf[device] = torch.empty(_FLUSH_BYTES, dtype=torch.uint8, device=device)
    for _ in range(3 if quick else 10):
        fn()
    torch.cuda.synchronize(device)
    # estimate one run to pick the repetition count
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize(device)
    once = max(start.elapsed_time(end) / 5, 1e-3)
    reps = int(min(max((50 if quick else 300) / once, 10), 100 if quick else 1000))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        if flush_l2:
            _flush_buf[device].zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize(device)
    return _summary([s.elapsed_time(e) for s, e in zip(starts, ends)])


def _summary(times: list[float]) -> dict:
    times = sorted(times)
    n = len(times)
    return {
        "ms": statistics.median(times),
        "ms_p20": times[int(0.2 * (n - 1))],
        "ms_p80": times[int(0.8 * (n - 1))],
        "reps": n,
    }


def copy_bandwidth(device: torch.device, quick: bool = False) -> float:
    """Measured device-memory copy bandwidth in GB/s, counting bytes read + written."""
    nbytes = (64 if quick else 1024) * 1024 * 1024 if device.type == "cuda" else 64 * 1024 * 1024
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), device, quick=quick, flush_l2=False)
    return 2 * nbytes / (t["ms"] * 1e-3) / 1e9


def bench_seed(seed: int = 0) -> None:
    torch.manual_seed(seed)


# --- environment and reporting ----------------------------------------------------------


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            timeout=10,
        )
        if out.returncode == 0:
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
                cwd=Path(__file__).resolve().parent,
            ).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        pass
    return "unknown"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "device": str(device),
        "cpu": _cpu_name(),
        "threads": torch.get_num_threads(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return env


_COLUMNS = ("bench", "case", "impl", "ms", "metric", "value", "of_ceiling", "speedup", "note")


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def markdown_table(rows: list[dict]) -> str:
    cols = [c for c in _COLUMNS if any(c in r for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def write_results(
    rows: list[dict], env: dict, outdir: str | Path, plot: bool = False
) -> list[Path]:
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    paths = [outdir / "results.json", outdir / "results.md"]
    paths[0].write_text(json.dumps({"environment": env, "rows": rows}, indent=1) + "\n")
    head = env.get("gpu") or env.get("cpu")
    md = [
        f"# fastllm benchmarks on {head}",
        "",
        ", ".join(f"{k} {env[k]}" for k in ("date", "commit", "torch", "triton", "cuda", "python")),
        "",
        "`of_ceiling`: fraction of the measured copy bandwidth (memory-bound ops) or of the "
        "peak rate given in the row's note; `speedup`: over the row's baseline in the same run.",
        "",
        markdown_table(rows),
        "",
    ]
    paths[1].write_text("\n".join(md))
    if plot:
        paths.append(_plot(rows, outdir / "results.png", head))
    return paths


def _plot(rows: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labeled = [r for r in rows if r.get("value") is not None]
    fig, ax = plt.subplots(figsize=(10, 0.3 * len(labeled) + 1.5))
    labels = [f"{r['bench']} {r['case']} {r['impl']}" for r in labeled]
    ax.barh(range(len(labeled)), [r["value"] for r in labeled])
    ax.set_yticks(range(len(labeled)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(" / ".join(sorted({r.get("metric", "") for r in labeled})))
    ax.set_title(f"fastllm on {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
