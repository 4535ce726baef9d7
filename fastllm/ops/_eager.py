"""The cost of one eager call, kept small: decoding calls each op a few hundred times a
token with tiny tensors, where what Python does around the kernel is most of the time.
Measured on int8_dynamic_linear of [1, 64] x [64, 64] (bench/bench_overhead.py and a
breakdown of its parts; 1 thread of a loaded 2-core x86 CPU, PyTorch 2.13, medians):
53 us a call, of which ~4 us of kernels, ~8 us in the launchers (three allocations,
pointers), 3 us of argument checks, 3 us of the same checks again inside the registered
op, 8 us choosing the backend and ~16 us crossing the custom-op boundary (the
dispatcher, custom_op's autograd and dynamo-disable wrappers; 20-50 us for ops with
more arguments or that mutate one). Now 23 us: checks 2.7 us, `direct` 1.4 us, the
choice 4.9 us (backend.py caches it), no boundary, no second check. Two rules, and
neither drops a check:

- `shape_checks`: a check of the arguments' types, shapes, dtypes, devices and strides
  (never of tensor values) runs once per call signature (`backend.signature`); a later
  call with the same signature gets the first call's result without running it again.
  Only a check that passed is remembered: a bad argument raises, with the same message,
  on every call. Checks that read values (index ranges, block ids: fastllm/ops/_index.py)
  are never cached. While torch.compile traces, checks run as written (they become
  guards).

- `direct`: the public functions run the registered op's body (the checks aside, which
  they have just made) without going through torch.ops, where the dispatcher would do
  nothing but call it: eager mode, no dispatch or function mode (FakeTensorMode, make_fx,
  torch.export, FlopCounterMode, ...), no functorch transform, no JIT tracer, no
  profiler (so profiles still name the fastllm op), plain strided tensors (no subclass:
  DTensor, FakeTensor; not sparse or nested) on the CPU or a GPU, and no autograd to
  record (custom_op's "no autograd formula" error stays where it was). An op that
  mutates its arguments bumps their version counters as the dispatcher would. Anything
  else goes through torch.ops as before, and a direct torch.ops.fastllm call is checked
  by the op itself, as before. Under torch.compile the graph calls the custom ops, so
  compiled code still pays the boundary (bench/bench_overhead.py measures both).

Both caches are bounded (emptied when full) and shared by threads: a dict's get and set
are atomic, and an entry is only ever a function of its key.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from fastllm import backend

CACHE_SIZE = 4096
_MISS = object()


def shape_checks(check: Callable) -> Callable:
    """Decorator: `check(*args)` (positional arguments only) is a function of the
    arguments' signature alone, and so is what it returns; it is run once per signature
    that passes, and its result reused for later calls with that signature."""
    passed: dict[tuple, object] = {}

    @functools.wraps(check)
    def checked(*args):
        if torch.compiler.is_compiling():
            return check(*args)
        key = backend.signature(args)
        if key is None:
            return check(*args)
        result = passed.get(key, _MISS)
        if result is _MISS:
            result = check(*args)  # raises for a bad argument: nothing is stored
            if len(passed) >= CACHE_SIZE:
                passed.clear()
            passed[key] = result
        return result

    checked.cache_clear = passed.clear
    return checked


_C = torch._C
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_STRIDED = torch.strided
try:
    _dispatch_modes = _C._len_torch_dispatch_stack
    _function_modes = _C._is_torch_function_mode_enabled
    _functorch_layer = _C._functorch.peek_interpreter_stack
    _profiling = _C._autograd._profiler_enabled
    _jit_tracing = _C._get_tracing_state
except AttributeError:  # a PyTorch without one of these probes: always the dispatcher
    _DIRECT = False
else:
    _DIRECT = True


def direct(*tensors: torch.Tensor | None) -> bool:
    """Whether a public function may run its op's body itself instead of calling it
    through torch.ops, for these (already checked) tensor arguments (module docstring)."""
    if not _DIRECT or torch.compiler.is_compiling():
        return False
    if (
        _dispatch_modes()
        or _function_modes()
        or _functorch_layer() is not None
        or _profiling()
        or _jit_tracing() is not None
    ):
        return False
    grad = torch.is_grad_enabled()
    first = None
    for t in tensors:
        if t is None:
            continue
        if (
            t.__class__ not in _PLAIN_TENSORS
            or t.layout is not _STRIDED
            or t.is_nested
            or (grad and t.requires_grad)
        ):
            return False
        first = first if first is not None else t
    return first is not None and (first.is_cpu or first.is_cuda)
