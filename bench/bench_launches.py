"""Kernel launches per decoder layer in one decode step of a Llama-type model, w8a8 with and
without `fuse=True` (counted, not timed).

A small random Llama (float16, hidden 64, GQA) is optimized both ways with the backend a
GPU takes (`triton`), prefilled with a few tokens, and one decode step is counted. The
count per layer is the difference between a 4-layer and a 2-layer model, halved, so that
embedding, final norm and lm_head drop out.

What counts as a launch:
  on a GPU   every CUDA kernel the profiler records (torch.profiler, ProfilerActivity.CUDA)
  on a CPU   what would be one on a GPU: every Triton kernel run by the interpreter
             (TRITON_INTERPRET=1), and every ATen op outside them that computes (views,
             allocations and fastllm's own op wrappers are not counted)

    fastllm bench launches
    python bench/bench_launches.py
"""

from __future__ import annotations

import collections
import contextlib
import copy

import torch

import fastllm
from fastllm.bench.common import Context

# ATen ops that launch nothing on a GPU (allocation, metadata, host reads)
_NOT_LAUNCHES = {
    "empty",
    "empty_strided",
    "empty_like",
    "new_empty",
    "new_empty_strided",
    "lift_fresh",
    "detach",
    "_local_scalar_dense",
    "sym_size",
    "sym_stride",
    "sym_numel",
    "is_same_size",
}


@contextlib.contextmanager
def _count_interpreted(counts: collections.Counter):
    """Counts, into counts["launches"], the Triton kernels the interpreter runs and the
    ATen ops outside them that compute."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from triton.runtime import interpreter

    inside = [False]
    run = interpreter.InterpretedFunction.run

    def counted_run(self, *args, **kwargs):
        if not inside[0]:
            counts["launches"] += 1
            counts[f"triton:{self.fn.__name__}"] += 1
        inside[0] = True
        try:
            return run(self, *args, **kwargs)
        finally:
            inside[0] = False

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ns, name = func._schema.name.split("::")
            if not inside[0] and ns == "aten" and not func.is_view and name not in _NOT_LAUNCHES:
                counts["launches"] += 1
                counts[f"aten:{name}"] += 1
            return func(*args, **(kwargs or {}))

    interpreter.InterpretedFunction.run = counted_run
    try:
        with Count():
            yield
    finally:
        interpreter.InterpretedFunction.run = run


@contextlib.contextmanager
def _count_cuda(counts: collections.Counter):
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        yield
        torch.cuda.synchronize()
    for evt in prof.events():
        if evt.device_type == DeviceType.CUDA and "memcpy" not in evt.name.lower():
            counts["launches"] += 1
            counts[f"cuda:{evt.name[:60]}"] += 1


def _model(layers: int, device):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return transformers.LlamaForCausalLM(cfg).eval().to(device, torch.float16)


def decode_step_launches(layers: int, fuse: bool, device) -> collections.Counter:
    """The launches of one decode step (batch 2, 7 cached tokens) of a `layers`-layer model."""
    base = _model(layers, device)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0)).to(device)
    model = fastllm.optimize(
        copy.deepcopy(base), linear="w8a8", calibration=[ids], fuse=fuse, backend="triton"
    )
    counts: collections.Counter = collections.Counter()
    counter = _count_cuda if device.type == "cuda" else _count_interpreted
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
        model(ids[:, -1:], past_key_values=cache, use_cache=True)  # warm-up (autotuning)
        cache = model(ids, use_cache=True).past_key_values
        with counter(counts):
            model(ids[:, -1:], past_key_values=cache, use_cache=True)
    return counts


def per_layer(fuse: bool, device) -> float:
    two, four = (decode_step_launches(n, fuse, device)["launches"] for n in (2, 4))
    return (four - two) / 2


def run(ctx: Context) -> None:
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        print("  launches: skipped, transformers (the Llama model) is not installed")
        return
    if fastllm.backend.unavailable_reason("triton", ctx.device) is not None:
        print("  launches: skipped, the triton backend is not available here")
        return
    counts = {fuse: per_layer(fuse, ctx.device) for fuse in (False, True)}
    for fuse, n in counts.items():
        ctx.add(
            bench="launches",
            op="llama decode step, per layer",
            config="w8a8" + (" + fuse" if fuse else ""),
            backend="triton",
            metric="launches",
            value=n,
        )
        print(f"  decode step, per layer, w8a8{' + fuse' if fuse else '':7}: {n:g} launches")


if __name__ == "__main__":
    import os

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    run(Context(device=device))
