"""CUDA launchers of the attention kernels (csrc/attention/prefill.cu, decode.cu).

They take the normalized arguments that fastllm/ops/attention.py passes to every
backend, in the same order, already validated there:

    prefill(q, k, v, causal, scale, window_left, window_right, softcap,
            cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, return_lse)
        -> (out, lse or None)
    decode(q, k_cache, v_cache, cache_seqlens, block_table, scale, causal,
           window_left, window_right, softcap, num_splits) -> out

`supports_prefill` / `supports_decode` take the same arguments and return None, or
the reason these kernels cannot serve the call (the op then falls back to another
backend). Outputs and the split-KV workspace are allocated from shapes alone and
nothing here reads device memory on the host, so decode can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools

import torch

from fastllm import native

HEAD_DIMS = (64, 128)  # the head dims the kernels are instantiated for
DTYPES = (torch.float16, torch.bfloat16)
MAX_Q_LEN = 16  # decode rows per (token, head) tile
BLOCK_N = 64  # keys per tile in both kernels (decode splits work in whole tiles)
MIN_TILES_PER_SPLIT = 4  # a split reads at least 256 keys, so its fp32 partial is cheap
MAX_SPLITS = 128
_INT32_MAX = 2**31 - 1
_WINDOW_MAX = 2**30  # windows beyond any sequence mean "unbounded" anyway


# --- shape-only helpers (also used by the tests) ----------------------------------------------


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def decode_row_blocks(q_len: int, heads_q: int, heads_kv: int) -> int:
    """Thread blocks per (sequence, kv head): the q_len * group rows, 16 at a time."""
    return -(-(q_len * (heads_q // heads_kv)) // 16)


def choose_num_splits(
    batch: int, heads_q: int, heads_kv: int, q_len: int, capacity: int, num_sms: int
) -> int:
    """KV splits for decode, from shapes only: enough thread blocks for two per SM, but
    never fewer than MIN_TILES_PER_SPLIT tiles of cache capacity per split."""
    blocks = batch * heads_kv * decode_row_blocks(q_len, heads_q, heads_kv)
    tiles = -(-capacity // BLOCK_N)
    if blocks == 0 or tiles <= MIN_TILES_PER_SPLIT:
        return 1
    want = -(-2 * num_sms // blocks)
    return max(1, min(want, tiles // MIN_TILES_PER_SPLIT, MAX_SPLITS))


def decode_workspace_shapes(
    batch: int, q_len: int, heads_q: int, head_dim: int, num_splits: int
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Shapes of the fp32 partial outputs and log-sum-exps of split-KV decode (None: no
    workspace, one split writes the output directly)."""
    if num_splits <= 1:
        return None
    return (num_splits, batch, q_len, heads_q, head_dim), (num_splits, batch, q_len, heads_q)


def _window(causal: bool, window_left: int, window_right: int) -> tuple[int, int]:
    if causal:  # keys up to the query's own position (bottom-right aligned)
        window_right = 0
    left = -1 if window_left < 0 else min(window_left, _WINDOW_MAX)
    right = -1 if window_right < 0 else min(window_right, _WINDOW_MAX)
    return left, right


# --- supports ------------------------------------------------------------------------------


def _tensor_reason(name: str, t: torch.Tensor, *, vector_dims: int) -> str | None:
    """cp.async moves 16 bytes: a 16-byte aligned base and every stride but the last a
    multiple of 8 elements (the last one 1)."""
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        return f"{name} has stride {t.stride(-1)} on head_dim; the kernels need 1"
    if t.numel() == 0:
        return None
    if t.data_ptr() % 16 != 0:
        return f"{name} is not 16-byte aligned (data_ptr % 16 = {t.data_ptr() % 16})"
    dims = range(t.dim() - vector_dims - 1, t.dim() - 1)
    if any(t.stride(i) % 8 != 0 for i in dims if t.shape[i] > 1):  # size-1 dims: never stepped
        return f"{name} has strides {tuple(t.stride())}; the kernels need multiples of 8 elements"
    return None


def _common_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    if q.dtype not in DTYPES:
        return f"dtype {q.dtype} (the CUDA kernels take float16 and bfloat16)"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return f"q, k, v have dtypes {q.dtype}, {k.dtype}, {v.dtype}; the kernels need one dtype"
    d = q.shape[-1]
    if d not in HEAD_DIMS or k.shape[-1] != d or v.shape[-1] != d:
        return f"head_dim {d} (the CUDA kernels are built for head_dim {HEAD_DIMS})"
    return None


def _device_reason(t: torch.Tensor) -> str | None:
    if t.device.type != "cuda":
        return f"the CUDA kernels need CUDA tensors, got {t.device.type}"
    if not native.with_cuda():
        return "fastllm._C is not built with CUDA"
    mod = native.module()
    if not hasattr(mod, "attention_prefill"):
        return "fastllm._C was built without the attention kernels (rebuild it)"
    major, _ = torch.cuda.get_device_capability(t.device)
    if major < 8:
        return f"compute capability {major}.x (the kernels use sm_80 tensor-core instructions)"
    return None


def supports_prefill(
    q, k, v, causal, scale, window_left, window_right, softcap, cu_q, cu_k, mq, mk, return_lse
) -> str | None:
    """None if prefill() can serve this call of fastllm.ops.attention, else why not."""
    reason = _common_reason(q, k, v)
    if reason is not None:
        return reason
    vector_dims = 2 if cu_q is not None else 3
    for name, t in (("q", q), ("k", k), ("v", v)):
        reason = _tensor_reason(name, t, vector_dims=vector_dims)
        if reason is not None:
            return reason
    if cu_q is not None:
        for name, t in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
            if t.dtype != torch.int32 or (t.numel() > 1 and t.stride(0) != 1):
                return f"{name} must be contiguous int32, got {t.dtype} with stride {t.stride()}"
        batch = cu_q.shape[0] - 1
    else:
        batch = q.shape[0]
    if batch > 65535 or q.shape[-2] > 65535:
        return f"batch {batch} or heads {q.shape[-2]} above 65535 (grid limits)"
    if max(mq, mk) > _INT32_MAX or q.shape[0] > _INT32_MAX or k.shape[0] > _INT32_MAX:
        return "sequence lengths above 2^31 - 1"
    return _device_reason(q)


def supports_decode(
    q, k_cache, v_cache, cache_seqlens, block_table, scale, causal, wl, wr, softcap, num_splits
) -> str | None:
    """None if decode() can serve this call of fastllm.ops.decode_attention, else why not."""
    reason = _common_reason(q, k_cache, v_cache)
    if reason is not None:
        return reason
    if q.shape[1] > MAX_Q_LEN:
        return f"q_len {q.shape[1]} (the decode kernel takes at most {MAX_Q_LEN} new tokens)"
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        reason = _tensor_reason(name, t, vector_dims=3)
        if reason is not None:
            return reason
    if cache_seqlens.dtype != torch.int32 or (
        cache_seqlens.numel() > 1 and cache_seqlens.stride(0) != 1
    ):
        return f"cache_seqlens must be contiguous int32, got {cache_seqlens.dtype}"
    if block_table is not None:
        if block_table.dtype != torch.int32 or (
            block_table.shape[1] > 1 and block_table.stride(1) != 1
        ):
            return "block_table must be int32 with a unit stride on its last dimension"
        capacity = block_table.shape[1] * k_cache.shape[1]
        if k_cache.shape[0] > _INT32_MAX:
            return f"{k_cache.shape[0]} cache blocks (above 2^31 - 1)"
    else:
        capacity = k_cache.shape[1]
    if capacity > _INT32_MAX:
        return f"cache capacity {capacity} above 2^31 - 1"
    if num_splits > 65535:
        return f"num_splits {num_splits} above 65535"
    return _device_reason(q)


# --- launchers -----------------------------------------------------------------------------


def prefill_arguments(
    q,
    k,
    v,
    causal,
    scale,
    window_left,
    window_right,
    softcap,
    cu_q,
    cu_k,
    mq,
    mk,
    return_lse,
    kernel_fills_gaps=False,
) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """The output, the lse (or None) and the keyword arguments of the prefill kernels (CUDA
    and CPU alike; see csrc/attention/attention.h) for one call of fastllm.ops.attention.
    q (B, Sq, Hq, D) or packed (Tq, Hq, D) with cu_seqlens; out has q's shape (contiguous),
    lse is float32 (B, Hq, Sq) or (Hq, Tq). kernel_fills_gaps: the kernel itself writes the
    packed rows that no sequence covers (the CPU one does), so out and lse need no fill."""
    varlen = cu_q is not None
    heads_q, head_dim = q.shape[-2], q.shape[-1]
    heads_kv = k.shape[-2]
    # varlen: packed rows that no sequence covers (cu_seqlens left unchecked) stay 0, -inf
    fill = varlen and not kernel_fills_gaps
    alloc = torch.zeros if fill else torch.empty
    out = alloc(q.shape, dtype=q.dtype, device=q.device)
    if varlen:
        batch, total_q = cu_q.shape[0] - 1, q.shape[0]
        lse_shape = (heads_q, total_q)
        seqlen_q, seqlen_k = int(mq), int(mk)
        q_strides = (0, q.stride(0), q.stride(1))
        k_strides = (0, k.stride(0), k.stride(1))
        v_strides = (0, v.stride(0), v.stride(1))
        o_strides = (0, out.stride(0), out.stride(1))
        lse_strides = (0, total_q, 1)
    else:
        batch, seqlen_q = q.shape[0], q.shape[1]
        seqlen_k = k.shape[1]
        lse_shape = (batch, heads_q, seqlen_q)
        q_strides, k_strides, v_strides = q.stride()[:3], k.stride()[:3], v.stride()[:3]
        o_strides = out.stride()[:3]
        lse_strides = (heads_q * seqlen_q, seqlen_q, 1)
    lse = None
    if return_lse:
        lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
        if fill:
            lse.fill_(float("-inf"))
    left, right = _window(causal, window_left, window_right)
    kwargs = dict(
        q=q.data_ptr(),
        k=k.data_ptr(),
        v=v.data_ptr(),
        out=out.data_ptr(),
        lse=lse.data_ptr() if lse is not None else 0,
        cu_seqlens_q=cu_q.data_ptr() if varlen else 0,
        cu_seqlens_k=cu_k.data_ptr() if varlen else 0,
        total_q=q.shape[0] if varlen else 0,
        total_k=k.shape[0] if varlen else 0,
        q_strides=q_strides,
        k_strides=k_strides,
        v_strides=v_strides,
        o_strides=o_strides,
        lse_strides=lse_strides if lse is not None else (0, 0, 0),
        batch=batch,
        heads_q=heads_q,
        heads_kv=heads_kv,
        head_dim=head_dim,
        seqlen_q=seqlen_q,
        seqlen_k=seqlen_k,
        scale=float(scale),
        softcap=float(softcap),
        window_left=left,
        window_right=right,
        dtype=native.dtype_code(q),
    )
    return out, lse, kwargs


def prefill(
    q, k, v, causal, scale, window_left, window_right, softcap, cu_q, cu_k, mq, mk, return_lse
):
    """fastllm.ops.attention on the CUDA kernel (arguments: `prefill_arguments`)."""
    out, lse, kwargs = prefill_arguments(
        q, k, v, causal, scale, window_left, window_right, softcap, cu_q, cu_k, mq, mk, return_lse
    )
    if q.numel() == 0:
        return out, lse
    with torch.cuda.device(q.device):
        native.module().attention_prefill(**kwargs, stream=native.stream_of(q))
    return out, lse


def decode_arguments(
    q, k_cache, v_cache, cache_seqlens, block_table, scale, causal, wl, wr, softcap
) -> tuple[torch.Tensor, dict]:
    """The output and the keyword arguments of the decode kernels (CUDA and CPU alike; see
    csrc/attention/attention.h) but the split-KV ones, for one call of
    fastllm.ops.decode_attention: q (B, q_len, Hq, D) against a contiguous
    (B, S_max, Hkv, D) or paged (num_blocks, block_size, Hkv, D) cache."""
    batch, q_len, heads_q, head_dim = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if block_table is not None:
        block_size, num_blocks = k_cache.shape[1], k_cache.shape[0]
        capacity = block_table.shape[1] * block_size
    else:
        block_size, num_blocks, capacity = 0, 0, k_cache.shape[1]
    left, right = _window(causal, wl, wr)
    kwargs = dict(
        q=q.data_ptr(),
        k_cache=k_cache.data_ptr(),
        v_cache=v_cache.data_ptr(),
        out=out.data_ptr(),
        cache_seqlens=cache_seqlens.data_ptr(),
        block_table=block_table.data_ptr() if block_table is not None else 0,
        q_strides=q.stride()[:3],
        k_strides=k_cache.stride()[:3],
        v_strides=v_cache.stride()[:3],
        o_strides=out.stride()[:3],
        block_table_stride=block_table.stride(0) if block_table is not None else 0,
        batch=batch,
        q_len=q_len,
        heads_q=heads_q,
        heads_kv=k_cache.shape[2],
        head_dim=head_dim,
        capacity=capacity,
        block_size=block_size,
        num_blocks=num_blocks,
        scale=float(scale),
        softcap=float(softcap),
        window_left=left,
        window_right=right,
        dtype=native.dtype_code(q),
    )
    return out, kwargs


def decode(
    q, k_cache, v_cache, cache_seqlens, block_table, scale, causal, wl, wr, softcap, num_splits
):
    """fastllm.ops.decode_attention on the CUDA kernels (arguments: `decode_arguments`).
    num_splits 0: chosen from the shapes and the SM count. Returns out (B, q_len, Hq, D)."""
    out, kwargs = decode_arguments(
        q, k_cache, v_cache, cache_seqlens, block_table, scale, causal, wl, wr, softcap
    )
    if out.numel() == 0:
        return out
    batch, q_len, heads_q, head_dim = q.shape
    if num_splits <= 0:
        num_splits = choose_num_splits(
            batch,
            heads_q,
            kwargs["heads_kv"],
            q_len,
            kwargs["capacity"],
            sm_count(_index(q.device)),
        )
    shapes = decode_workspace_shapes(batch, q_len, heads_q, head_dim, num_splits)
    o_partial = lse_partial = None
    if shapes is not None:
        o_partial = torch.empty(shapes[0], dtype=torch.float32, device=q.device)
        lse_partial = torch.empty(shapes[1], dtype=torch.float32, device=q.device)
    with torch.cuda.device(q.device):
        native.module().attention_decode(
            **kwargs,
            o_partial=o_partial.data_ptr() if o_partial is not None else 0,
            lse_partial=lse_partial.data_ptr() if lse_partial is not None else 0,
            num_splits=num_splits,
            stream=native.stream_of(q),
        )
    return out


__all__ = [
    "HEAD_DIMS",
    "choose_num_splits",
    "decode",
    "decode_row_blocks",
    "decode_workspace_shapes",
    "prefill",
    "sm_count",
    "supports_decode",
    "supports_prefill",
]
