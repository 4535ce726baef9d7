"""Which backend serves each call.

Backends:

    cuda       hand-written CUDA kernels in fastllm._C          CUDA tensors
    triton     Triton kernels in fastllm.triton_kernels          CUDA tensors (CPU under TRITON_INTERPRET=1, forced only)
    cpu        hand-written C++ CPU kernels in fastllm._C       CPU tensors
    torch      the fastest PyTorch-native path                   any device
    reference  the oracle in fastllm.reference                   any device, never chosen automatically

`cuda → triton → torch` for CUDA tensors, `cpu → torch` for CPU tensors.

Each op registers one implementation per backend with a `supports(*args, **kwargs)`
check that returns None when it can serve the inputs, or a reason string when it
cannot, and optionally a `prefer(*args, **kwargs)` check that returns a reason when it
can but is known (measured) to be slower than the backends after it for such inputs.
Per call, the first backend in that order that is available here, supports the
inputs and is not set aside by `prefer` wins; an unsupported call falls back for that
call only. A forced backend ignores `prefer`.

Backends listed in `UNVERIFIED` take part only when forced.

Forcing a backend (`FASTLLM_BACKEND=triton`, or `with fastllm.use_backend("triton"):`)
skips the search: a forced backend that cannot serve a call raises
`BackendError` saying why, never falls back.

Every choice is recorded: `last_backend(op)` gives the latest one for an op, and
`with fastllm.backend.trace() as calls:` collects `(op, backend)` pairs.

The choice is cached per call signature (`signature`: each tensor's dtype, device, shape
and strides, and its address modulo 16 on a GPU; each scalar's type and value), with
everything else it depends on in the key: the op, the device, the forced backend,
TRITON_INTERPRET when triton is forced, `UNVERIFIED`, `unavailable_reason` and the
registry (`register` starts a new generation). So `supports` and `prefer` must read
nothing but that: metadata and scalars, never tensor values, and otherwise only what is
fixed for the life of the process (what the machine has, module constants). Whoever
changes such a thing afterwards (a test patching a threshold) calls `clear_cache()`.
Only successful choices are cached: a call no backend can serve is worked out (and its
error written) again every time. The cache is bounded (`CACHE_SIZE` entries, emptied
when full) and shared by all threads; what it records per call is per context, as below.

Threads. Forcing, `last_backend` and `trace` belong to the current context
(`contextvars`), not to the process: a thread sees only its own calls and forcing (a new
thread starts with nothing forced and nothing recorded; an asyncio task, or a thread run
through `contextvars.copy_context().run` or `asyncio.to_thread`, starts from a copy of its
parent's context, so a trace open in the parent also collects the child's calls).
FASTLLM_BACKEND is process-wide. The only mutable state dispatch shares between calls is
the choice cache (above), keyed on the forced backend, so that one context's forcing
never decides another's call; the registry is filled when the ops are imported and only read afterwards. Two lazy
initialisations are guarded here: the first probe of fastllm._C (loading it is not atomic
in fastllm.native: a thread that probed while another was loading it saw neither the
module nor an error) and every call of a triton implementation (see `_serialized`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch

BACKENDS = ("cuda", "triton", "cpu", "torch", "reference")
_GPU_ORDER = ("cuda", "triton", "torch")
_CPU_ORDER = ("cpu", "torch")

# Backends whose kernels compile but have not yet passed bench/gpu_check.sh on a GPU.
# Automatic dispatch skips them (forcing one still runs it, which is how the GPU tests
# reach them); an entry is removed once that script has passed on a GPU.
UNVERIFIED = {"cuda": "its CUDA kernels are compiled but not yet verified on a GPU"}


class BackendError(RuntimeError):
    """A forced backend cannot serve a call, or no backend can."""


@dataclass(frozen=True)
class Impl:
    fn: Callable
    supports: Callable[..., str | None]
    prefer: Callable[..., str | None]


_REGISTRY: dict[str, dict[str, Impl]] = {}
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "fastllm_backend", default=None
)
_traces: contextvars.ContextVar[tuple[list, ...]] = contextvars.ContextVar(
    "fastllm_traces", default=()
)
# op -> backend of the latest call in this context: a mapping that is replaced, never
# mutated, so that a context copied from this one (a task, a thread started with its
# parent's context) never writes into its parent's record
_last: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "fastllm_last_backend", default=MappingProxyType({})
)


def _always(*args, **kwargs) -> str | None:
    return None


def register(
    op: str,
    backend: str,
    *,
    supports: Callable[..., str | None] = _always,
    prefer: Callable[..., str | None] = _always,
):
    """Decorator: `fn` implements `op` on `backend` for the inputs `supports` accepts;
    the automatic choice also skips it where `prefer` gives a reason. Both take the op's
    arguments and read only their metadata and scalars (the choice is cached on those)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    def wrap(fn: Callable) -> Callable:
        impl = _serialized(fn) if backend == "triton" else fn
        _REGISTRY.setdefault(op, {})[backend] = Impl(impl, supports, prefer)
        clear_cache()
        return fn

    return wrap


# Triton's runtime is not safe to enter from several threads at once: its JIT fills plain
# dicts on a kernel's first call (a compilation per new specialization), CompiledKernel
# loads its binary lazily, and the interpreter (TRITON_INTERPRET=1) patches
# triton.language while a kernel runs. So every call of a triton implementation holds
# this lock: compilation happens once per specialization, and interpreted kernels never
# overlap. Launches are asynchronous on a GPU: the lock covers the host side of a launch
# (microseconds; the GIL serializes most of it anyway), never the kernel's run. An RLock:
# an implementation may call another op.
_TRITON_LOCK = threading.RLock()


def _serialized(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def call(*args, **kwargs):
        with _TRITON_LOCK:
            return fn(*args, **kwargs)

    return call


def ops() -> list[str]:
    return sorted(_REGISTRY)


def backends_of(op: str) -> list[str]:
    return [b for b in BACKENDS if b in _REGISTRY.get(op, {})]


def implementation(op: str, backend: str) -> Callable:
    try:
        return _REGISTRY[op][backend].fn
    except KeyError:
        raise BackendError(
            f"op {op!r} has no {backend!r} implementation; it has {backends_of(op)}"
        ) from None


# --- what this machine has ------------------------------------------------------------


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_NATIVE_LOCK = threading.Lock()
_native_loaded = False


def _load_native():
    """fastllm.native with fastllm._C loaded, or its load error recorded. The first load
    runs under a lock: fastllm.native marks the module loaded before the import finishes,
    so a thread asking meanwhile would see neither module nor error (and take the cpu
    backend for unavailable, or fail); a thread arriving during the load waits for it."""
    global _native_loaded
    from fastllm import native

    if not _native_loaded:
        with _NATIVE_LOCK:
            native.load_error()
            _native_loaded = True
    return native


def unavailable_reason(backend: str, device: torch.device | None = None) -> str | None:
    """None if `backend` can run here on tensors of `device`, else why not."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend in ("torch", "reference"):
        return None
    if backend == "cpu":
        _load_native()
        from fastllm.native import cpu as native_cpu

        if device is not None and device.type != "cpu":
            return f"the cpu backend takes CPU tensors, got {device.type} tensors"
        return native_cpu.available_reason()
    if backend == "cuda":
        native = _load_native()
        if native.load_error() is not None:
            return f"fastllm._C is not importable ({native.load_error()})"
        if not native.with_cuda():
            return "fastllm._C was built without CUDA (no nvcc at build time)"
        if not torch.cuda.is_available():
            return "PyTorch sees no CUDA GPU"
        if device is not None and device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, got {device.type} tensors"
        return None
    # triton
    try:
        found = importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken or blocked install
        found = False
    if not found:
        return "triton is not installed (pip install triton)"
    if device is not None and device.type == "cpu":
        if not triton_interpreted():
            return "triton runs CPU tensors only under TRITON_INTERPRET=1"
        return None
    if device is not None and device.type != "cuda":
        return f"triton needs CUDA tensors, got {device.type} tensors"
    if device is None and not torch.cuda.is_available() and not triton_interpreted():
        return "PyTorch sees no CUDA GPU (and TRITON_INTERPRET is not set)"
    return None


# --- forcing --------------------------------------------------------------------------


def forced_backend() -> str | None:
    """The backend forced by `use_backend` or else by FASTLLM_BACKEND, or None."""
    name = _forced.get()
    if name is None:
        name = os.environ.get("FASTLLM_BACKEND") or None
        if name is not None and name not in BACKENDS:
            raise BackendError(
                f"FASTLLM_BACKEND={name!r} is not a backend; expected one of {BACKENDS}"
            )
    return name


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force `name` for every op inside the block (None: automatic choice)."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


# --- choosing and recording -----------------------------------------------------------


def why_not(op: str, backend: str, device: torch.device, *args, **kwargs) -> str | None:
    """None if `backend` can serve this call of `op`, else the reason."""
    impl = _REGISTRY.get(op, {}).get(backend)
    if impl is None:
        return f"{op} has no {backend} implementation"
    reason = unavailable_reason(backend, device)
    if reason is None:
        reason = impl.supports(*args, **kwargs)
    return reason


# The choices made so far: key (see `select`) -> backend name. Read and written without a
# lock: a dict's get and set are atomic, two threads that miss at once both work the
# choice out (the same answer), and emptying it when full only costs later misses.
CACHE_SIZE = 4096
_choices: dict[tuple, str] = {}
_generation = 0  # part of every key: a new one forgets every cached choice


def clear_cache() -> None:
    """Forget every cached backend choice (after changing what `supports`/`prefer` or
    `unavailable_reason` read)."""
    global _generation
    _generation += 1
    _choices.clear()


_PLAIN_TENSORS = frozenset({torch.Tensor, torch.nn.Parameter})
_SCALARS = frozenset({int, float, bool, str, torch.dtype, torch.device})
_STRIDED = torch.strided


def signature(args) -> tuple | None:
    """A hashable description of `args` that decides every check of shapes, dtypes,
    devices and strides and every backend's `supports`/`prefer`: for a tensor its dtype,
    device, shape and strides (on CUDA also its address modulo 16, for the kernels'
    alignment rules), for a scalar its type and value (True and 1 differ), for a tuple or
    list the same of each element, None as None. Tensor values are never part of it.

    None when an argument has no such description (a tensor subclass such as a FakeTensor
    or DTensor, a sparse or nested tensor, another object): such calls are checked and dispatched
    without a cache. The flat layout is unambiguous: a tensor starts with a dtype
    instance, a scalar with its class."""
    key = []
    add = key.append
    for a in args:
        cls = a.__class__
        if cls in _PLAIN_TENSORS:
            if a.layout is not _STRIDED or a.is_nested:  # sparse, mkldnn, nested
                return None
            add(a.dtype)
            add(a.device)
            add(a.shape)
            add(a.stride())
            if a.is_cuda:
                add(a.data_ptr() % 16)
        elif a is None:
            add(None)
        elif cls in _SCALARS:
            add(cls)
            add(a)
        elif cls is tuple or cls is list:
            inner = signature(a)
            if inner is None:
                return None
            add(cls)
            add(inner)
        else:
            return None
    return tuple(key)


def select(op: str, device: torch.device, *args, **kwargs) -> str:
    """The backend that serves this call of `op` (recorded for `last_backend`/`trace`).
    Cached per call signature (module docstring); a cached choice is the one `choose`
    would make, and is recorded the same way."""
    forced = forced_backend()
    chosen = key = None
    if not kwargs:
        sig = signature(args)
        if sig is not None:
            key = (
                op,
                device,
                forced,
                _generation,
                unavailable_reason,
                # what else the answer depends on: the interpreter only for a forced triton
                # (auto order never tries triton on CPU tensors), UNVERIFIED only unforced
                os.environ.get("TRITON_INTERPRET") if forced == "triton" else None,
                tuple(UNVERIFIED) if forced is None else None,
                sig,
            )
            chosen = _choices.get(key)
    if chosen is None:
        chosen = choose(op, device, forced, *args, **kwargs)
        if key is not None:
            if len(_choices) >= CACHE_SIZE:
                _choices.clear()
            _choices[key] = chosen
    last = _last.get()
    if last.get(op) != chosen:
        _last.set({**last, op: chosen})
    for calls in _traces.get():
        calls.append((op, chosen))
    return chosen


def choose(op: str, device: torch.device, forced: str | None, *args, **kwargs) -> str:
    """The backend for this call of `op`, worked out (uncached, unrecorded): `forced` or
    the first in the device's order that is available, supports the inputs and is not
    set aside by `prefer`. Raises BackendError when none can serve the call."""
    if forced is not None:
        reason = why_not(op, forced, device, *args, **kwargs)
        if reason is not None:
            raise BackendError(
                f"fastllm.ops.{op}: backend {forced!r} is forced but cannot serve this call: {reason}"
            )
        return forced
    order = _GPU_ORDER if device.type == "cuda" else _CPU_ORDER
    reasons = {}
    for name in order:
        if name in UNVERIFIED:
            reasons[name] = f"{UNVERIFIED[name]} (force it with FASTLLM_BACKEND={name})"
            continue
        reasons[name] = why_not(op, name, device, *args, **kwargs)
        if reasons[name] is None:
            reasons[name] = _REGISTRY[op][name].prefer(*args, **kwargs)
        if reasons[name] is None:
            return name
    detail = "; ".join(f"{b}: {r}" for b, r in reasons.items())
    raise BackendError(f"fastllm.ops.{op}: no backend can serve this call ({detail})")


def last_backend(op: str) -> str | None:
    """The backend that served the latest call of `op` in this thread (this context), if any."""
    return _last.get().get(op)


@contextlib.contextmanager
def trace() -> Iterator[list[tuple[str, str]]]:
    """Collects `(op, backend)` for every op call inside the block, in this thread (this
    context and the contexts copied from it inside the block)."""
    calls: list[tuple[str, str]] = []
    token = _traces.set(_traces.get() + (calls,))
    try:
        yield calls
    finally:
        _traces.reset(token)
