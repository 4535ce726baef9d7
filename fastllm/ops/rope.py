"""rope_kv_append: the rotary position embedding of q and the new keys, and the append of
the rotated keys and the values to a KV cache, in one pass: what every decode step of a
Llama-style model does between its q/k/v projections and decode_attention. Formulas:
fastllm/reference/rope.py; cache forms and target rules: fastllm.ops.kv_cache_append.

Every backend implementation receives, positionally:

    rope_kv_append(q, k_new, v_new, cos, sin, k_cache, v_cache, positions, block_table)
        q (B, n, Hq, D), k_new/v_new (B, n, Hkv, D), cos/sin (B or 1, n, R) with positions
        (B,); or q (T, Hq, D), k_new/v_new (T, Hkv, D), cos/sin (T, R) with slots (T,).
        A unit stride on the last dim of each; cos/sin of q's dtype or float32; R even,
        2 <= R <= D. positions contiguous int32/int64, block_table contiguous int32 or None.
      returns q rotated (a new contiguous tensor of q's shape and dtype) and writes the
      rotated keys and the values to the caches; out-of-range targets are skipped.
"""

from __future__ import annotations

from typing import Optional  # noqa: F401 - custom-op schemas read Optional[...] annotations

import torch

from fastllm import backend, reference
from fastllm.native import cpu as native_cpu
from fastllm.native import rope as native_rope
from fastllm.ops import _index
from fastllm.ops._checks import check_same_device, check_tensor
from fastllm.ops._eager import direct, shape_checks
from fastllm.ops.attention import (
    _bump_versions,
    _check_append,
    _check_append_targets,
    _unit_stride,
)
from fastllm.reference.rope import apply_rotary

# --- backends ------------------------------------------------------------------------------


@backend.register("rope_kv_append", "reference")
def _reference_impl(q, k_new, v_new, cos, sin, k_cache, v_cache, positions, block_table):
    return reference.rope_kv_append(
        q, k_new, v_new, cos, sin, k_cache, v_cache, positions, block_table=block_table
    )


@backend.register("rope_kv_append", "torch")
def _torch_impl(q, k_new, v_new, cos, sin, k_cache, v_cache, positions, block_table):
    # transformers' apply_rotary_pos_emb, then the torch kv_cache_append: the unfused
    # sequence, op for op (so bit for bit)
    q_rot = apply_rotary(q, cos, sin)
    k_rot = apply_rotary(k_new, cos, sin)
    append = backend.implementation("kv_cache_append", "torch")
    append(k_rot, v_new, k_cache, v_cache, positions, block_table)
    return q_rot.contiguous()


def _triton_supports(q, *args) -> str | None:
    from fastllm.triton_kernels.rope import MAX_HEAD_DIM

    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head_dim {q.shape[-1]} is above {MAX_HEAD_DIM}"
    return None


@backend.register("rope_kv_append", "triton", supports=_triton_supports)
def _triton_impl(*args):
    from fastllm.triton_kernels.rope import rope_kv_append

    return rope_kv_append(*args)


def _cpu_supports(q, k_new, v_new, cos, sin, k_cache, v_cache, positions, block_table):
    return (
        native_cpu.device_reason(q, k_new, v_new, cos, sin, k_cache, v_cache, positions)
        or native_rope.available_reason()
    )


backend.register("rope_kv_append", "cpu", supports=_cpu_supports)(native_rope.rope_kv_append)


# --- checks ----------------------------------------------------------------------------------


@shape_checks
def _check(q, k_new, v_new, cos, sin, k_cache, v_cache, positions, block_table):
    """Checks of everything but index values -> (slot mapping form, capacity, block size)."""
    slots, capacity, page = _check_append(k_new, v_new, k_cache, v_cache, positions, block_table)
    check_tensor("q", q)
    if q.dtype != k_new.dtype:
        raise TypeError(f"q has dtype {q.dtype} but k_new has {k_new.dtype}; expected equal")
    if q.dim() != k_new.dim() or q.shape[:-2] != k_new.shape[:-2]:
        lead = "(num_tokens," if slots else "(batch, n_new,"
        raise ValueError(
            f"q has shape {tuple(q.shape)} but k_new has {tuple(k_new.shape)}; expected "
            f"q {lead} Hq, head_dim) with k_new's leading dims {tuple(k_new.shape[:-2])}"
        )
    D = k_new.shape[-1]
    if q.shape[-1] != D:
        raise ValueError(f"q has head_dim {q.shape[-1]} but k_new has {D}; expected equal")
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(name, t)
        if t.dtype not in (q.dtype, torch.float32):
            raise TypeError(
                f"{name} has dtype {t.dtype}; expected q's dtype {q.dtype} (as transformers' "
                "rotary embedding returns it) or float32"
            )
    if sin.dtype != cos.dtype:
        raise TypeError(f"sin has dtype {sin.dtype} but cos has {cos.dtype}; expected equal")
    if sin.shape != cos.shape:
        raise ValueError(
            f"sin has shape {tuple(sin.shape)} but cos has {tuple(cos.shape)}; expected equal"
        )
    R = cos.shape[-1] if cos.dim() else 0
    if slots:
        ok, want = cos.dim() == 2 and cos.shape[0] == q.shape[0], f"({q.shape[0]}, rotary_dim)"
    else:
        B, n = q.shape[:2]
        ok = cos.dim() == 3 and cos.shape[0] in (1, B) and cos.shape[1] == n
        want = f"({B}, {n}, rotary_dim) or (1, {n}, rotary_dim)"
    if not ok:
        raise ValueError(f"cos has shape {tuple(cos.shape)}; expected {want}")
    if R < 2 or R % 2 or R > D:
        raise ValueError(
            f"cos has rotary_dim {R} (its last dim); expected an even number in [2, head_dim="
            f"{D}] (the half-split layout of transformers' rotate_half)"
        )
    check_same_device(q=q, k_new=k_new, cos=cos, sin=sin)
    return slots, capacity, page


# --- registered op ---------------------------------------------------------------------------


def _run(q, k_new, v_new, cos, sin, k_cache, v_cache, positions, block_table):
    # positions keep int64 (flat slots of a large cache), read contiguous, as kv_cache_append
    positions, block_table = positions.contiguous(), _index.kernel_index(block_table)
    q, k_new, v_new = _unit_stride(q), _unit_stride(k_new), _unit_stride(v_new)
    cos, sin = _unit_stride(cos), _unit_stride(sin)
    args = (q, k_new, v_new, cos, sin, k_cache, v_cache, positions, block_table)
    if q.numel() == 0 and k_new.numel() == 0:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    name = backend.select("rope_kv_append", k_cache.device, *args)
    return backend.implementation("rope_kv_append", name)(*args)


@torch.library.custom_op("fastllm::rope_kv_append", mutates_args=("k_cache", "v_cache"))
def _rope_kv_append_op(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    positions: torch.Tensor,
    block_table: Optional[torch.Tensor],  # noqa: UP045
) -> torch.Tensor:
    _check(q, k_new, v_new, cos, sin, k_cache, v_cache, positions, block_table)
    return _run(q, k_new, v_new, cos, sin, k_cache, v_cache, positions, block_table)


@_rope_kv_append_op.register_fake
def _(q, k_new, v_new, cos, sin, k_cache, v_cache, positions, block_table):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


_OPS = torch.ops.fastllm


# --- public function -------------------------------------------------------------------------


def rope_kv_append(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping_or_positions: torch.Tensor,
    *,
    block_table: torch.Tensor | None = None,
    validate: bool | None = None,
) -> torch.Tensor:
    """Rotary embedding of q and k_new, and the rotated keys and the values written into a
    KV cache in place; returns q rotated. One pass for what a decode step otherwise runs as
    ``apply_rotary_pos_emb`` then ``kv_cache_append``.

    The rotation is transformers' ``apply_rotary_pos_emb`` (``x * cos + rotate_half(x) *
    sin``, half-split layout: dims d and d + R/2 rotate together) over the first R =
    cos.shape[-1] dims of each head; dims R..D pass through (the partial rotary of GPT-NeoX
    and Phi). With cos/sin in q's dtype, as LlamaRotaryEmbedding returns them, each product
    and the sum round to that dtype just as the unfused PyTorch ops round them (the torch
    backend gives apply_rotary_pos_emb + kv_cache_append bit for bit, and so do the cpu
    kernel and, on a GPU, the Triton kernel); with float32 cos/sin the rotation is computed
    in float32 and rounded to q's dtype once.

    Two forms, as kv_cache_append:
        positions: q (B, n, Hq, D), k_new/v_new (B, n, Hkv, D), cos/sin (B, n, R) (or
            (1, n, R) for every sequence) and int (B,) start positions: token t of
            sequence b goes to position positions[b] + t of a contiguous cache
            (B, max_seqlen, Hkv, D), or through block_table (B, max_blocks) to a paged
            cache (num_blocks, block_size, Hkv, D).
        slot mapping: q (T, Hq, D), k_new/v_new (T, Hkv, D), cos/sin (T, R) and int (T,)
            flat slots of the cache viewed as (num_blocks * block_size, Hkv, D); -1 skips
            the token's key and value (q is still rotated). No block_table in this form.

    In a transformers decode step: q, k, v from the projections viewed as (B, n, H, D)
    (before the transpose to (B, H, n, D)), ``cos, sin = position_embeddings``, positions
    = the cache lengths before the step.

    q, k_new, v_new, caches: one float dtype (float32, float16, bfloat16), any strides (a
    view whose last stride is not 1 is copied; the caches need a unit stride on D).
    cos/sin: q's dtype or float32, R even with 2 <= R <= D. validate: as kv_cache_append
    (check targets and block ids: None when the index tensors are on the CPU, True
    always, False never); unchecked targets outside the cache are skipped, never written.

    Returns q rotated, (B, n, Hq, D) or (T, Hq, D), contiguous, q's dtype.
    Raises TypeError for non-tensors and dtypes, ValueError for shapes, devices, an odd or
    too-large rotary dim, and (when checked) targets outside the cache.
    """
    positions = slot_mapping_or_positions
    args = (q, k_new, v_new, cos, sin, k_cache, v_cache, positions, block_table)
    slots, capacity, page = _check(*args)
    if _index.value_checks_wanted(validate, positions, block_table):
        _check_append_targets(k_new, k_cache, positions, block_table, slots, capacity, page)
    if direct(*args):
        out = _run(*args)
        _bump_versions(k_cache, v_cache)
        return out
    return _OPS.rope_kv_append(*args)
