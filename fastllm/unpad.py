"""Padding-free forward passes of transformers encoders: `fastllm.optimize(model, unpad=True)`.

A padded batch of sentences of different lengths spends much of an encoder's work on its
padding: every linear layer, norm and activation runs on every position, pads included,
and only attention looks at the mask (all-MiniLM-L6-v2's benchmark batch, 32 sentences
padded to 30 tokens, holds 447 tokens in 960 positions). With unpad, the valid tokens of the
batch are gathered into one packed sequence [1, tokens, hidden] before the encoder's first
layer; the encoder's own layers run on it, their attention calls getting a packed mask
(one varlen segment per sentence, `PackedMask`); after the last layer the result is
scattered back to [batch, seq_len, hidden], with **zeros at the padded positions**
(fastllm leaves the outputs at padded positions unspecified in any case: fastllm.hf). Every
per-token operation sees the same rows as in the padded batch, so the valid positions get
the same values (bit for bit with fastllm's CPU kernels: tests/test_unpad.py).

How: a forward pre-hook and a forward hook on the encoder module (PyTorch's
`register_forward_pre_hook` / `register_forward_hook`, with kwargs): no transformers code
is patched, the module tree and the state_dict are unchanged, and the hooks keep no state
between calls (the post-hook finds what it needs on the packed mask it is handed back).

Which module: in a transformers model that is neither a decoder nor an encoder-decoder
(no causal or cross-attention layers), the outermost module whose forward takes
`hidden_states` first and an `attention_mask`, and which holds its layers in an
nn.ModuleList (BERT, RoBERTa, XLM-RoBERTa, ELECTRA...: `encoder`; DistilBERT: `transformer`),
and which passes `probe`: on a random batch with padding, packed and padded give the same
values at the valid positions (an encoder that computes positions from its input's layout
would not). Others are reported as skipped, with the reason.

A call goes through padded, as without unpad, when packing would gain nothing or could
change a result: the mask is not fastllm's segment mask of a bidirectional layer (no
padding in the batch, attention not fastllm's, a 4-D mask given by the user), another
tensor argument reaches the encoder (position_ids, encoder_hidden_states, position
embeddings: per-position inputs that would need packing too), a cache is passed, every
layer's hidden states or attentions are asked for (`output_hidden_states`,
`output_attentions`, in the call or in the config: they are collected per layer, in the
padded shape), or the module is in training mode.

Under torch.compile the encoder is packed as well. The packed length is a size that
depends on the data, made by one op (`fastllm::unpad_index`; never 0 tokens: a batch
without any valid token packs one and drops it): with fullgraph=True (or PyTorch's
`torch._dynamo.config.capture_dynamic_output_shape_ops`) it stays in the graph and one
graph serves every batch of a padded shape; otherwise PyTorch breaks the graph at that op
(its default for such ops) and the hook runs eagerly between the compiled parts. The
attention calls of a compiled graph get the padded length as their max_seqlen (the
longest sentence is a value of the data); an eager call gets the longest sentence.
PyTorch does not guard compiled graphs on module hooks by default
(`torch._dynamo.config.skip_nnmodule_hook_guards`): a process that compiles the same
architecture with and without unpad should set it to False, or each model may run the
graph compiled first for the other (the same values at the valid positions, but the
padded positions and the speed of the other).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from fastllm import hf
from fastllm.fusion import rel_error


class PackedMask(hf.SegmentMask):
    """The mask a packed encoder call hands to its attention layers: one bidirectional
    segment per sequence (cu_seqlens over the packed tokens, max_seqlen the longest), and
    what the post-hook needs to scatter the result back: `index`, int64 (tokens,), the
    positions of the valid tokens in the flattened [batch * seq_len] padded batch, and
    the padded shape (batch, seq_len)."""

    def __init__(self, cu_seqlens, max_seqlen, index, batch, seq_len):
        tokens = index.numel()
        super().__init__(
            cu_seqlens, cu_seqlens, tokens, tokens, False, -1,
            dense=self._block_diagonal, max_seqlen=max_seqlen,
        )  # fmt: skip
        self.index = index
        self.batch = batch
        self.seq_len = seq_len

    def _block_diagonal(self) -> torch.Tensor:
        """bool (1, 1, tokens, tokens): each token sees the tokens of its own sequence."""
        cu = self.cu_seqlens_q.long()
        lengths = cu.diff()
        seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths)
        return (seq[:, None] == seq[None, :])[None, None]


def _forward_params(module: nn.Module) -> list[str]:
    try:
        return list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):  # no signature to read: not a module this recognises
        return []


def _is_encoder(module: nn.Module) -> bool:
    params = _forward_params(module)
    return (
        bool(params)
        and params[0] == "hidden_states"
        and "attention_mask" in params
        and any(isinstance(c, nn.ModuleList) for c in module.children())
    )


def find_encoder(model: nn.Module) -> tuple[str, nn.Module] | str:
    """(qualified name, module) of the encoder `unpad` hooks, or why there is none."""
    if not hf.is_hf_model(model):
        return "not a transformers model"
    config = model.config
    for flag in ("is_decoder", "is_encoder_decoder", "add_cross_attention"):
        if getattr(config, flag, False):
            return f"config.{flag} is set: only encoder-only models are packed"
    for name, module in model.named_modules():
        if _is_encoder(module):
            return name, module
    return (
        "no encoder module found (a module whose forward takes hidden_states and "
        "attention_mask and whose layers are an nn.ModuleList)"
    )


def is_enabled(module: nn.Module) -> bool:
    return any(h is _pack for h in module._forward_pre_hooks.values())


def enable(module: nn.Module) -> list:
    """Hooks `module` (an encoder found by find_encoder); returns the hooks' handles."""
    return [
        module.register_forward_pre_hook(_pack, with_kwargs=True),
        module.register_forward_hook(_scatter, with_kwargs=True),
    ]


def probe(model: nn.Module, module: nn.Module) -> str | None:
    """None when the hooked encoder `module` gives, on a random probe batch with padding,
    the values it gives without the hooks at the valid positions (and zeros at the pads);
    else why not. Packing moves each sentence to another place in a longer sequence, so an
    encoder that derives positions or biases from its input's layout inside (rotary or
    relative positions computed from the sequence length) fails it and stays padded."""
    from transformers import masking_utils

    param = next((p for p in module.parameters() if p.is_floating_point()), None)
    width = getattr(model.config, "hidden_size", None)
    if param is None or not isinstance(width, int):
        return "no float parameter or no config.hidden_size to build a probe input from"
    lengths = (7, 4, 2)
    padding = torch.zeros(len(lengths), lengths[0], dtype=torch.long, device=param.device)
    for b, n in enumerate(lengths):
        padding[b, :n] = 1
    g = torch.Generator(device=param.device).manual_seed(0)
    hidden = torch.randn(
        *padding.shape, width, generator=g, device=param.device, dtype=torch.float32
    ).to(param.dtype)
    mask = hf.attention_mask(
        batch_size=len(lengths),
        q_length=lengths[0],
        kv_length=lengths[0],
        mask_function=masking_utils.bidirectional_mask_function,
        attention_mask=padding,
        device=param.device,
    )
    valid = padding.bool()
    try:
        with torch.no_grad():
            ref = _last_hidden(module.forward(hidden, attention_mask=mask))  # no hooks
            out = _last_hidden(module(hidden, attention_mask=mask))
            packed = bool(torch.count_nonzero(out[~valid]) == 0)
            err = rel_error(out[valid], ref[valid])
    except Exception as e:  # a forward that needs more arguments, weights not in memory...
        return f"the probe call failed: {type(e).__name__}: {e}"
    if not packed:
        return "the probe call was not packed (see fastllm.unpad for the calls that stay padded)"
    if not err <= PROBE_TOLERANCE:  # NaN fails too
        return (
            f"on a probe batch the packed encoder differs from the padded one (relative "
            f"error {err:.2e} > {PROBE_TOLERANCE}): its layers depend on the layout "
            "of the batch (positions computed inside the encoder?)"
        )
    return None


# float rounding between the padded and the packed attention calls; a position computed
# from the packed layout changes the values by far more
PROBE_TOLERANCE = 1e-3


def _last_hidden(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple):  # a ModelOutput is a dict, not a tuple
        return output[0]
    return output["last_hidden_state"]


_PASSED = ("hidden_states", "attention_mask")


def _argument(args: tuple, kwargs: dict, position: int, name: str):
    return args[position] if len(args) > position else kwargs.get(name)


def _has_tensor(value) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, list | tuple):
        return any(_has_tensor(v) for v in value)
    return False


def _packable(module: nn.Module, args: tuple, kwargs: dict) -> bool:
    if module.training:
        return False
    config = getattr(module, "config", None)
    for flag in ("output_hidden_states", "output_attentions"):
        if kwargs.get(flag) or getattr(config, flag, False):
            return False
    if kwargs.get("use_cache") or kwargs.get("cache") is not None:
        return False
    if kwargs.get("past_key_values") is not None:
        return False
    others = list(args[len(_PASSED) :]) + [v for k, v in kwargs.items() if k not in _PASSED]
    return not any(_has_tensor(v) for v in others)


def _pack(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: the valid tokens of the padded batch as one packed sequence."""
    hidden = _argument(args, kwargs, 0, "hidden_states")
    mask = _argument(args, kwargs, 1, "attention_mask")
    if (
        not isinstance(hidden, torch.Tensor)
        or hidden.dim() != 3
        or hidden.shape[0] * hidden.shape[1] == 0  # no position at all
        or type(mask) is not hf.SegmentMask
        or mask.cu_seqlens_k is None
        or mask.causal
        or mask.window_left >= 0
        or mask.cache_seqlens is not None
        or not (mask.q_len == mask.kv_len == hidden.shape[1])
        or not _packable(module, args, kwargs)
    ):
        return None
    batch, seq_len, width = hidden.shape
    gather, scatter, cu = torch.ops.fastllm.unpad_index(mask.cu_seqlens_k, seq_len)
    if torch.compiler.is_compiling():
        # the longest sentence is a value of the data: the padded length bounds it
        max_seqlen = seq_len
    else:
        max_seqlen = int(cu.diff().max())
    packed = PackedMask(cu, max_seqlen, scatter, batch, seq_len)
    tokens = hidden.reshape(batch * seq_len, width).index_select(0, gather).unsqueeze(0)
    args, kwargs = list(args), dict(kwargs)
    for position, name, value in ((0, "hidden_states", tokens), (1, "attention_mask", packed)):
        if len(args) > position:
            args[position] = value
        else:
            kwargs[name] = value
    return tuple(args), kwargs


@torch.library.custom_op("fastllm::unpad_index", mutates_args=())
def _unpad_index(
    cu_seqlens_k: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where the valid tokens of a padded batch go, from the key segments [pad before,
    valid, pad after] of each sequence of its SegmentMask (a bidirectional layer's queries
    are all of its positions): (gather, scatter, cu_seqlens), gather and scatter int64
    (tokens,) the valid positions in the flattened [batch * seq_len] batch, cu_seqlens
    int32 (batch + 1,) the packed sequences. A batch without any valid token packs one
    token all the same (position 0, counted in the last sequence) and scatters it to
    position batch * seq_len, one past the batch, which _repad drops: the packed length is
    never 0, which the compiled graphs rely on (a size that depends on the data, >= 1)."""
    batch = (cu_seqlens_k.shape[0] - 1) // 3
    before, valid, _ = cu_seqlens_k.diff().view(batch, 3).long().unbind(1)
    pos = torch.arange(seq_len, device=cu_seqlens_k.device)
    keep = (pos >= before[:, None]) & (pos < (before + valid)[:, None])
    gather = keep.view(-1).nonzero().squeeze(1)
    cu = torch.nn.functional.pad(valid.cumsum(0), (1, 0)).to(torch.int32)
    if gather.numel() == 0:
        gather = gather.new_zeros(1)
        cu[-1] = 1
        return gather, torch.full_like(gather, batch * seq_len), cu
    return gather, gather.clone(), cu


@_unpad_index.register_fake
def _(cu_seqlens_k, seq_len):
    tokens = torch.library.get_ctx().new_dynamic_size(min=1)
    batch = (cu_seqlens_k.shape[0] - 1) // 3
    index = cu_seqlens_k.new_empty((tokens,), dtype=torch.int64)
    return index, torch.empty_like(index), cu_seqlens_k.new_empty((batch + 1,), dtype=torch.int32)


def _repad(packed: PackedMask, out: torch.Tensor) -> torch.Tensor:
    width = out.shape[-1]
    rows = packed.batch * packed.seq_len
    full = out.new_zeros(rows + 1, width)  # the last row: a batch without a valid token
    full.index_copy_(0, packed.index, out.reshape(-1, width))
    return full[:rows].view(packed.batch, packed.seq_len, width)


def _scatter(module: nn.Module, args: tuple, kwargs: dict, output):
    """Forward hook: the packed result back in the padded batch's shape."""
    packed = _argument(args, kwargs, 1, "attention_mask")
    if not isinstance(packed, PackedMask):
        return None
    full = _repad(packed, _last_hidden(output))
    if isinstance(output, torch.Tensor):
        return full
    if isinstance(output, tuple):
        return (full, *output[1:])
    output["last_hidden_state"] = full
    return output
