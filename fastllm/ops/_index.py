"""How the ops read index tensors: cu_seqlens, cache_seqlens, block tables, positions and
slot mappings (attention), crow/col indices (block-sparse). One set of rules, every op
family and every backend:

- Index tensors may be int32 or int64 and any strided view (``cu[::2]``,
  ``block_table[:, ::2]``). The registered ops hand every backend contiguous int32
  (`kernel_index`), so that no launcher can read a view as if it were contiguous, and a
  direct ``torch.ops.fastllm`` call is read the same way as a public-function call.
- Value checks (ranges, prefix sums, block ids) read the values, which costs a device sync
  on a GPU: they run when asked for (``validate=True``) or free (CPU tensors), never while
  tracing for torch.compile (`value_checks_wanted`). What runs without them clamps or masks
  by construction: bad values give wrong numbers in their own rows, never an access
  outside a tensor. They run on every call (fastllm/ops/_eager.py caches only the checks
  of metadata); a small CPU tensor is read as a Python list, which costs a microsecond
  where a few tensor ops would cost ten.
"""

from __future__ import annotations

import torch

from fastllm.ops._checks import check_tensor

INDEX_DTYPES = (torch.int32, torch.int64)
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def value_checks_wanted(validate: bool | None, *tensors: torch.Tensor | None) -> bool:
    """Data-dependent checks: asked for (True), free (None and every tensor on the CPU),
    and never while tracing for torch.compile."""
    if validate is False or torch.compiler.is_compiling():
        return False
    if validate:
        return True
    return all(t is None or t.is_cpu for t in tensors)


def check_index(name: str, t, *, dim: int, length: int | None = None, what: str = "") -> None:
    """An int32/int64 index tensor of `dim` dimensions whose first size is `length`."""
    check_tensor(name, t, dtypes=INDEX_DTYPES, dim=dim)
    if length is not None and t.shape[0] != length:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {what}")


def check_cu_seqlens_pair(cu_seqlens_q, cu_seqlens_k) -> int:
    """cu_seqlens_q and cu_seqlens_k: 1-d index tensors of one length, batch + 1 >= 1;
    returns batch."""
    check_index("cu_seqlens_q", cu_seqlens_q, dim=1)
    batch = cu_seqlens_q.shape[0] - 1
    if batch < 0:
        raise ValueError("cu_seqlens_q is empty; expected batch + 1 >= 1 entries")
    check_index(
        "cu_seqlens_k",
        cu_seqlens_k,
        dim=1,
        length=batch + 1,
        what=f"({batch + 1},) like cu_seqlens_q",
    )
    return batch


def kernel_index(t: torch.Tensor | None) -> torch.Tensor | None:
    """t as the kernels read it: contiguous int32. int64 values beyond int32 saturate (to a
    value every backend then treats as out of range) instead of wrapping around."""
    if t is None:
        return None
    if t.dtype != torch.int32:
        t = t.clamp(_INT32_MIN, _INT32_MAX).to(torch.int32)
    return t.contiguous()


def check_seqlens(name: str, value, batch: int) -> None:
    """A per-sequence length argument: a tensor (batch,) or one int for all."""
    if isinstance(value, int) and not isinstance(value, bool):
        return
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"{name} must be an int32/int64 tensor of shape (batch={batch},) or an int, "
            f"got {type(value).__name__}"
        )
    check_index(name, value, dim=1, length=batch, what=f"(batch={batch},)")


def seqlens_tensor(name: str, value, batch: int, device: torch.device) -> torch.Tensor:
    """A per-sequence length argument given as a tensor (batch,) or one int for all."""
    check_seqlens(name, value, batch)
    if isinstance(value, torch.Tensor):
        return value
    return torch.full((batch,), value, dtype=torch.int32, device=device)


# Up to this many values, a CPU index tensor is read as a Python list for a value check.
SMALL_VALUES = 1024


def _small_cpu(t: torch.Tensor) -> bool:
    return t.is_cpu and t.numel() <= SMALL_VALUES


def check_cu_seqlens(
    name: str, cu: torch.Tensor, total: int | None, max_seqlen: int, *, padded: bool = False
) -> None:
    """cu: prefix sums of the lengths of sequences packed into `total` tokens (None: not
    checked). padded: the sequences may stop short of `total` (a padded batch)."""
    if _small_cpu(cu):  # one read into a list: a padded batch's attention checks it per layer
        values = cu.tolist()
        lengths = [b - a for a, b in zip(values, values[1:])]
        first, end = values[0], values[-1]
        decreasing = any(n < 0 for n in lengths)
        longest = max(lengths, default=0)
    else:
        diffs = cu[1:] - cu[:-1]
        first, end = cu[0].item(), cu[-1].item()
        decreasing = bool((diffs < 0).any().item())
        longest = diffs.max().item() if diffs.numel() else 0
    if first != 0 or decreasing:
        raise ValueError(
            f"{name} = {cu.tolist()} must start at 0 and never decrease (prefix sums of lengths)"
        )
    if total is not None and (end > total if padded else end != total):
        raise ValueError(
            f"{name} ends at {end} but the packed tensor has {total} tokens; expected "
            + ("at most that many" if padded else "equal")
        )
    if longest > max_seqlen:
        raise ValueError(
            f"{name} holds a sequence of {longest} tokens, longer than the "
            f"given max_seqlen {max_seqlen}"
        )


def check_block_table(name: str, table, batch: int) -> None:
    check_index(name, table, dim=2, length=batch, what=f"(batch={batch}, max_blocks_per_seq)")


def check_block_ids(
    table: torch.Tensor, first: torch.Tensor, last: torch.Tensor, num_blocks: int
) -> None:
    """The block ids of columns first[b] <= c < last[b] of each row are in [0, num_blocks)."""
    bad_at = None
    if _small_cpu(table):
        for b, (row, lo, hi) in enumerate(zip(table.tolist(), first.tolist(), last.tolist())):
            cols = range(max(lo, 0), min(hi, len(row)))
            c = next((c for c in cols if not 0 <= row[c] < num_blocks), None)
            if c is not None:
                bad_at = b, c
                break
    else:
        cols = torch.arange(table.shape[1], device=table.device)[None, :]
        used = (cols >= first[:, None]) & (cols < last[:, None])
        bad = used & ((table < 0) | (table >= num_blocks))
        if bad.any().item():
            bad_at = tuple(int(x) for x in bad.nonzero()[0].tolist())
    if bad_at is not None:
        b, c = bad_at
        raise ValueError(
            f"block_table[{b}, {c}] = {int(table[b, c])} is not a block id; expected "
            f"0 <= id < num_blocks = {num_blocks}"
        )


def first_outside(t: torch.Tensor, low: int, high: int) -> int | None:
    """The index of the first value of the 1-d t outside [low, high], or None."""
    if _small_cpu(t):
        return next((i for i, v in enumerate(t.tolist()) if not low <= v <= high), None)
    bad = (t < low) | (t > high)
    return int(bad.nonzero()[0, 0]) if bad.any().item() else None


def check_range(name: str, t: torch.Tensor, low: int, high: int, what: str) -> None:
    """Every value of the 1-d t in [low, high]; the error names the first one outside."""
    i = first_outside(t, low, high)
    if i is not None:
        raise ValueError(f"{name}[{i}] = {int(t[i])} is outside [{low}, {high}]: expected {what}")
