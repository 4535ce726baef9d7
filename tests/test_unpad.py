"""`fastllm.optimize(model, unpad=True)` (fastllm/unpad.py): a transformers encoder run on
the valid tokens of a padded batch against the same model on the padded batch — values at
the valid positions, zeros at the padded ones — and every case that must stay padded."""

import copy
import sys

import pytest
import torch
from conftest import cpu_default, rel_err, tiny_bert

import fastllm
from fastllm import unpad

transformers = pytest.importorskip("transformers")


def _bert(**kw):
    return tiny_bert(vocab_size=120, max_position_embeddings=64, **kw)


def _batch(lengths, seq_len=13, left=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 120, (len(lengths), seq_len), generator=g)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        if left:
            mask[b, seq_len - n :] = 1
        else:
            mask[b, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _pair(make=_bert, **kw):
    """(padded, unpadded): the same model optimized alike, with and without unpad."""
    base = make()
    padded, packed = copy.deepcopy(base), copy.deepcopy(base)
    fastllm.optimize(padded, **kw)
    fastllm.optimize(packed, unpad=True, **kw)
    return padded, packed


def _entry(model):
    (entry,) = [e for e in fastllm.report(model).layers if e.kind == "unpad"]
    return entry


@torch.no_grad()
def _hidden(model, batch, **kw):
    return model(**batch, **kw).last_hidden_state


CALIB = [_batch([13, 9, 4], seed=5)]


@pytest.mark.parametrize("left", [False, True], ids=["right", "left"])
@pytest.mark.parametrize(
    "options",
    [{}, {"linear": "w8a8", "calibration": CALIB, "fuse": True}],
    ids=["float", "w8a8+fused"],
)
def test_valid_positions_as_padded_and_pads_zero(options, left):
    padded, packed = _pair(**options)
    batch = _batch([13, 5, 1, 8], left=left)
    ref, out = _hidden(padded, batch), _hidden(packed, batch)
    valid = batch["attention_mask"].bool()
    if options and cpu_default("attention") == "cpu":
        # fastllm's CPU kernels compute each row alike whatever the other rows are
        assert torch.equal(out[valid], ref[valid])
    else:
        assert rel_err(out[valid], ref[valid]) < 1e-5
    assert torch.count_nonzero(out[~valid]) == 0
    assert out.shape == ref.shape
    entry = _entry(packed)
    assert (entry.name, entry.action, entry.before) == ("encoder", "swapped", "BertEncoder")
    # the attention layers saw the packed batch: one segment per sentence
    layer = packed.encoder.layer[0].attention.self
    assert layer.fastllm_backend == f"attention:{cpu_default('attention')}"


def test_a_sequence_with_no_valid_token():
    padded, packed = _pair()
    batch = _batch([6, 0, 13])
    ref, out = _hidden(padded, batch), _hidden(packed, batch)
    valid = batch["attention_mask"].bool()
    assert rel_err(out[valid], ref[valid]) < 1e-5
    assert torch.count_nonzero(out[1]) == 0


def _hooked_calls(model, batch, **kw):
    """Whether the encoder ran on packed tokens for this call, and its output."""
    seen = []
    handle = model.encoder.layer[0].register_forward_pre_hook(
        lambda m, args: seen.append(args[0].shape[0])
    )
    try:
        out = model(**batch, **kw)
    finally:
        handle.remove()
    return seen == [1], out


@pytest.mark.parametrize(
    "case",
    ["no padding", "position_ids", "output_hidden_states", "config flag", "training"],
)  # fmt: skip
def test_calls_that_stay_padded(case):
    padded, packed = _pair()
    batch = _batch([13, 6, 2])
    kw = {}
    if case == "no padding":
        batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
    elif case == "position_ids":
        kw["position_ids"] = torch.arange(13).expand(3, 13)
    elif case == "output_hidden_states":
        kw["output_hidden_states"] = True
    elif case == "config flag":
        packed.config.output_hidden_states = padded.config.output_hidden_states = True
    for m in (padded, packed):
        m.train(case == "training")  # dropout 0.1: the same seed for both
    torch.manual_seed(1)
    with torch.no_grad():
        ref = padded(**batch, **kw)
        torch.manual_seed(1)
        was_packed, out = _hooked_calls(packed, batch, **kw)
    assert not was_packed
    assert torch.equal(out.last_hidden_state, ref.last_hidden_state)
    if "hidden" in case or case == "config flag":
        assert len(out.hidden_states) == 3
        assert all(h.shape == (3, 13, 64) for h in out.hidden_states)
    # and a plain padded call to the same model is packed
    packed.config.output_hidden_states = False
    packed.eval()
    assert _hooked_calls(packed, _batch([13, 6, 2]))[0]


def test_models_that_are_not_packed():
    torch.manual_seed(0)
    gpt2 = transformers.GPT2Model(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2))
    fastllm.optimize(gpt2.eval(), unpad=True)
    assert _entry(gpt2).action == "skipped"
    assert "no encoder module" in _entry(gpt2).reason
    decoder = _bert(is_decoder=True)
    fastllm.optimize(decoder, unpad=True)
    assert _entry(decoder).reason.startswith("config.is_decoder is set")
    assert not unpad.is_enabled(decoder.encoder)
    # without fastllm attention there is no segment mask to pack by
    plain = _bert()
    fastllm.optimize(plain, attention=False, unpad=True)
    assert _entry(plain).action == "skipped"
    assert "needs fastllm attention" in _entry(plain).reason
    assert not unpad.is_enabled(plain.encoder)


def test_optimize_twice_hooks_once_and_state_dict_is_unchanged():
    base = _bert()
    model = copy.deepcopy(base)
    fastllm.optimize(model, unpad=True)
    fastllm.optimize(model, unpad=True)
    assert _entry(model).action == "kept"
    assert len(model.encoder._forward_pre_hooks) == 1
    assert len(model.encoder._forward_hooks) == 1
    assert model.state_dict().keys() == base.state_dict().keys()
    with pytest.raises(ValueError, match="unpad must be True or False, got 'yes'"):
        fastllm.optimize(_bert(), unpad="yes")


def test_an_error_while_optimizing_removes_the_hooks(monkeypatch):
    model = _bert()

    def fail(model, *args):
        raise RuntimeError("boom")

    monkeypatch.setattr(sys.modules["fastllm.optimize"], "_guard_fast_paths", fail)
    with pytest.raises(RuntimeError, match="boom"):
        fastllm.optimize(model, unpad=True)
    assert not unpad.is_enabled(model.encoder)
    assert not model.encoder._forward_hooks


def test_save_and_load_hook_the_encoder_again(tmp_path):
    padded, packed = _pair(linear="w8a8", calibration=CALIB, fuse=True)
    batch = _batch([13, 5, 9])
    fastllm.save(packed, tmp_path / "f")
    loaded = fastllm.load(_bert(), tmp_path / "f")
    assert unpad.is_enabled(loaded.encoder)
    assert torch.equal(_hidden(loaded, batch), _hidden(packed, batch))
    packed.save_pretrained(tmp_path / "hf")
    loaded = transformers.BertModel.from_pretrained(tmp_path / "hf").eval()
    assert loaded.config.quantization_config.unpad is True
    assert unpad.is_enabled(loaded.encoder)
    assert torch.equal(_hidden(loaded, batch), _hidden(packed, batch))
    with pytest.raises(ValueError, match="unpad must be True or False"):
        fastllm.hf.FastllmConfig(unpad=1)


def test_a_batch_with_no_valid_token_gives_zeros():
    """One token is packed all the same (the packed length is never 0) and dropped."""
    _, packed = _pair()
    batch = _batch([0, 0, 0])
    was_packed, out = _hooked_calls(packed, batch)
    assert was_packed
    assert out.last_hidden_state.shape == (3, 13, 64)
    assert torch.count_nonzero(out.last_hidden_state) == 0


def test_a_batch_without_positions_stays_as_it_is():
    model = _bert()
    fastllm.optimize(model, unpad=True)
    for batch, seq_len in ((0, 5), (2, 0)):
        hidden = torch.zeros(batch, seq_len, 64)
        cu = torch.zeros(3 * batch + 1, dtype=torch.int32)
        mask = fastllm.hf.SegmentMask(cu, cu, seq_len, seq_len, False, -1)
        assert unpad._pack(model.encoder, (hidden, mask), {}) is None


def test_unpad_index():
    # two sequences of 4 positions: [valid 3, pad 1] and [pad 1, valid 2, pad 1]
    segments = torch.tensor([0, 3, 1, 1, 2, 1])
    cu_k = torch.nn.functional.pad(segments.cumsum(0), (1, 0)).to(torch.int32)
    gather, scatter, cu = torch.ops.fastllm.unpad_index(cu_k, 4)
    assert gather.tolist() == scatter.tolist() == [0, 1, 2, 5, 6]
    assert gather.dtype == torch.int64 and cu.dtype == torch.int32
    assert cu.tolist() == [0, 3, 5]
    # no valid token: position 0 packed as one token of the last sequence, scattered to
    # one past the batch
    gather, scatter, cu = torch.ops.fastllm.unpad_index(
        torch.tensor([0, 0, 0, 4, 4, 4, 4], dtype=torch.int32), 4
    )
    assert (gather.tolist(), scatter.tolist(), cu.tolist()) == ([0], [8], [0, 0, 1])
    torch.library.opcheck(torch.ops.fastllm.unpad_index.default, (cu_k, 4))


@pytest.mark.parametrize(
    "options, fullgraph, dynamic",
    [
        ({}, True, None),
        ({"linear": "w8a8", "calibration": CALIB, "fuse": True}, True, None),
        ({}, False, None),
        ({}, True, True),
    ],
    ids=["float", "w8a8+fused", "float-graph-break", "float-dynamic"],
)
def test_torch_compile_packs(options, fullgraph, dynamic):
    """Under torch.compile the encoder runs packed too: the packed length is a size that
    depends on the data (fastllm::unpad_index), in the graph with fullgraph=True; without
    it PyTorch's default breaks the graph there and the hook runs eagerly. Padded
    positions are exact zeros only when the call was packed (the padded model computes
    values there)."""
    padded, packed = _pair(**options)
    torch._dynamo.reset()  # every test compiles the same transformers code objects
    compiled = torch.compile(packed, fullgraph=fullgraph, dynamic=dynamic)
    batches = [
        _batch([13, 5, 1, 8]),
        _batch([4, 11, 7, 2], seed=1),
        _batch([9, 3, 6], seq_len=9, left=True, seed=2),
        _batch([0, 0, 0], seed=3),
        _batch([13, 13], seed=4),  # no padding: stays padded
    ]
    with torch.no_grad():
        for batch in batches:
            out = compiled(**batch).last_hidden_state
            ref, eager = _hidden(padded, batch), _hidden(packed, batch)
            valid = batch["attention_mask"].bool()
            assert out.shape == ref.shape
            assert torch.count_nonzero(out[~valid]) == 0
            if valid.any():
                assert valid.all() or torch.count_nonzero(ref[~valid]) > 0
                assert rel_err(out[valid], eager[valid]) < 1e-5
                assert rel_err(out[valid], ref[valid]) < 1e-5


def test_packed_mask_dense_form():
    cu = torch.tensor([0, 2, 2, 5], dtype=torch.int32)
    m = unpad.PackedMask(cu, 3, torch.arange(5), 3, 4)
    seq = torch.tensor([0, 0, 2, 2, 2])
    assert torch.equal(m.dense(), (seq[:, None] == seq[None, :])[None, None])
    assert (m.q_len, m.kv_len, m.max_seqlen, m.causal) == (5, 5, 3, False)


def test_an_encoder_whose_layers_depend_on_the_layout_stays_padded():
    """Positions computed inside the encoder (here a pre-hook adding one per position, as
    rotary or relative positions derived from the sequence length would) differ between the
    packed and the padded batch: the probe finds it and the encoder is not hooked."""
    model = _bert()

    def add_positions(module, args):
        pos = torch.arange(args[0].shape[1], dtype=args[0].dtype)
        return (args[0] + 0.1 * pos[None, :, None], *args[1:])

    model.encoder.layer[0].register_forward_pre_hook(add_positions)
    fastllm.optimize(model, unpad=True)
    entry = _entry(model)
    assert entry.action == "skipped"
    assert "depend on the layout of the batch" in entry.reason
    assert not unpad.is_enabled(model.encoder)


@pytest.mark.parametrize("kind", ["roberta", "distilbert", "classifier"])
def test_other_encoders(kind):
    torch.manual_seed(0)
    small = dict(vocab_size=120, max_position_embeddings=64)
    bert_like = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=48, **small)  # fmt: skip
    if kind == "roberta":
        model, name = transformers.RobertaModel(transformers.RobertaConfig(**bert_like)), "encoder"
    elif kind == "distilbert":
        cfg = transformers.DistilBertConfig(dim=32, hidden_dim=48, n_layers=1, n_heads=2, **small)
        model, name = transformers.DistilBertModel(cfg), "transformer"
    else:
        cfg = transformers.BertConfig(**bert_like)
        model, name = transformers.BertForSequenceClassification(cfg), "bert.encoder"
    padded, packed = copy.deepcopy(model.eval()), model.eval()
    fastllm.optimize(padded)
    fastllm.optimize(packed, unpad=True)
    assert (_entry(packed).name, _entry(packed).action) == (name, "swapped")
    batch = _batch([13, 7, 3])
    with torch.no_grad():
        ref, out = padded(**batch), packed(**batch)
    if kind == "classifier":  # pooled from the first token, valid in every sentence
        assert rel_err(out.logits, ref.logits) < 1e-5
    else:
        valid = batch["attention_mask"].bool()
        got, want = out.last_hidden_state, ref.last_hidden_state
        assert rel_err(got[valid], want[valid]) < 1e-5
        assert torch.count_nonzero(got[~valid]) == 0


@pytest.mark.gpu
def test_cuda_bf16_packed_encoder():
    """On a GPU the packed batch goes to the varlen attention kernels with its longest
    sentence as max_seqlen (not the packed length)."""
    padded, packed = (m.to("cuda", torch.bfloat16) for m in _pair())
    batch = {k: v.cuda() for k, v in _batch([13, 5, 1, 8, 11]).items()}
    with fastllm.backend.trace() as calls:
        out = _hidden(packed, batch)
    ref = _hidden(padded, batch)
    valid = batch["attention_mask"].bool()
    assert rel_err(out[valid], ref[valid]) < 1e-2
    assert torch.count_nonzero(out[~valid]) == 0
    served = {b for op, b in calls if op == "attention"}
    assert served <= {"cuda", "triton"} and served, served
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(packed, fullgraph=True)(**batch).last_hidden_state
    assert rel_err(compiled[valid], out[valid]) < 1e-2
    assert torch.count_nonzero(compiled[~valid]) == 0


def test_a_probe_that_fails_leaves_the_encoder_padded():
    model = _bert()

    def fail(module, args):
        raise RuntimeError("weights not in memory")

    handle = model.encoder.layer[0].register_forward_pre_hook(fail)
    fastllm.optimize(model, unpad=True)  # no error: the encoder stays as it was
    handle.remove()
    entry = _entry(model)
    assert entry.action == "skipped"
    assert entry.reason == "the probe call failed: RuntimeError: weights not in memory"
    assert not unpad.is_enabled(model.encoder) and not model.encoder._forward_hooks
