"""Test set-up shared by every test file.

Without a GPU, Triton kernels run under the interpreter on CPU tensors: the
variable must be set before triton is first imported, so it is set here. The interpreter
is not thread-safe: tests that call ops from several threads keep the triton backend
out of them (compiled Triton on a GPU has no such limit).
"""

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastllm import backend  # noqa: E402

HAS_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_GPU else "cpu")


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Each test draws its own random inputs from a seed made of its name and FASTLLM_TEST_SEED
# (default 0): reproducible in CI, and a new set of inputs for every value of the variable.
TEST_SEED = int(os.environ.get("FASTLLM_TEST_SEED", "0"))


@pytest.fixture(autouse=True)
def _seed_and_unforce(request, monkeypatch):
    monkeypatch.delenv("FASTLLM_BACKEND", raising=False)
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()) ^ TEST_SEED)


def available_backends(op: str, device: torch.device = DEVICE) -> list[str]:
    """Backends of `op` that can run on `device` here (triton under the interpreter on CPU)."""
    return [b for b in backend.backends_of(op) if backend.unavailable_reason(b, device) is None]


def cpu_default(op: str) -> str:
    """The backend that serves `op` on CPU tensors when none is forced: the C++ kernels of
    fastllm._C where they exist and are built, else PyTorch."""
    return "cpu" if "cpu" in available_backends(op, torch.device("cpu")) else "torch"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; inf when out holds a NaN."""
    out, ref = out.double(), ref.double()
    if torch.isnan(out).any():
        return float("inf")
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def tiny_bert(**config):
    """A random 2-layer BertModel of width 64 (4 heads, MLP 112) in eval mode, seeded;
    `config` overrides or adds BertConfig fields (vocab_size defaults to 100)."""
    import transformers

    torch.manual_seed(0)
    fields = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=112)  # fmt: skip
    return transformers.BertModel(transformers.BertConfig(**{**fields, **config})).eval()


def poison_empty(monkeypatch) -> None:
    """Make torch.empty return garbage (NaN for floats, 99 for int8, -7 for other ints) so
    that output elements a kernel forgot to write show up in the comparison."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype == torch.int8:
            t.fill_(99)
        elif t.dtype != torch.bool:
            t.fill_(-7)
        return t

    monkeypatch.setattr(torch, "empty", empty)
