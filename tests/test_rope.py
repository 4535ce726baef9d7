"""fastllm.ops.rope_kv_append (rotary embedding of q and k + KV-cache append) on every
backend against the reference, and against the unfused sequence a transformers model
runs: apply_rotary_pos_emb, then fastllm.ops.kv_cache_append."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import DEVICE, available_backends, poison_empty, rel_err

import fastllm
from fastllm import reference

BACKENDS = available_backends("rope_kv_append")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
FORMS = ["contiguous", "paged", "slots"]
# (batch, n_new, Hq, Hkv, head_dim, rotary_dim): odd sizes, GQA, MQA, partial rotary
SHAPES = [
    (1, 1, 1, 1, 2, 2),
    (3, 1, 6, 2, 24, 24),
    (2, 3, 4, 4, 40, 16),
    (5, 2, 8, 1, 64, 64),
    (2, 1, 3, 3, 130, 66),
]


def _interp_bf16(name, dtype) -> bool:
    # the Triton interpreter truncates to bfloat16 instead of rounding to nearest: three
    # roundings (two products, the sum) each off by up to one ulp (2**-8 relative)
    return name == "triton" and dtype == torch.bfloat16 and DEVICE.type == "cpu"


def _cos_sin(lead, rot, dtype, cos_dtype):
    """cos/sin as LlamaRotaryEmbedding computes them: float32 angles, cast to the dtype."""
    inv = 1.0 / (10000 ** (torch.arange(0, rot, 2, device=DEVICE).float() / rot))
    pos = torch.randint(0, 4096, lead, device=DEVICE).float()
    freqs = pos[..., None] * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(cos_dtype or dtype), emb.sin().to(cos_dtype or dtype)


def _case(form, shape, dtype, cos_dtype=None):
    """Inputs of one call: (q, k, v, cos, sin, k_cache, v_cache, targets, block_table)."""
    B, n, Hq, Hkv, D, R = shape
    page = 4
    if form == "slots":
        T = B * n
        q, k, v = (torch.randn(T, h, D, device=DEVICE).to(dtype) for h in (Hq, Hkv, Hkv))
        cos, sin = _cos_sin((T,), R, dtype, cos_dtype)
        num_blocks = T + 2
        slots = torch.randperm(num_blocks * page, device=DEVICE)[:T]
        if T > 1:
            slots[T // 2] = -1  # padding
        targets, table = slots, None
    else:
        q, k, v = (torch.randn(B, n, h, D, device=DEVICE).to(dtype) for h in (Hq, Hkv, Hkv))
        cos, sin = _cos_sin((B, n), R, dtype, cos_dtype)
        max_len = 3 * page + 1
        targets = torch.randint(0, max_len - n + 1, (B,), device=DEVICE)
        if form == "contiguous":
            num_blocks, page, table = B, max_len, None
        else:
            nb = (max_len + page - 1) // page
            num_blocks = B * nb + 1
            perm = torch.randperm(num_blocks, device=DEVICE)[: B * nb]
            table = perm.view(B, nb).to(torch.int32)
    k_cache = torch.randn(num_blocks, page, Hkv, D, device=DEVICE).to(dtype)
    v_cache = torch.randn(num_blocks, page, Hkv, D, device=DEVICE).to(dtype)
    return q, k, v, cos, sin, k_cache, v_cache, targets, table


def _run(name, q, k, v, cos, sin, kc, vc, targets, table, **kw):
    with fastllm.use_backend(name):
        out = fastllm.ops.rope_kv_append(
            q, k, v, cos, sin, kc, vc, targets, block_table=table, **kw
        )
    assert fastllm.last_backend("rope_kv_append") == name
    return out


def _assert_same(name, dtype, got, want):
    if _interp_bf16(name, dtype):
        assert rel_err(got, want) <= 3 * 2**-8
    else:
        assert torch.equal(got, want), (got.float() - want.float()).abs().max()


def test_backends_include_triton_and_torch():
    assert {"reference", "torch", "triton"} <= set(BACKENDS)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("cos32", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(name, shape, form, dtype, cos32, monkeypatch):
    q, k, v, cos, sin, kc, vc, targets, table = _case(
        form, shape, dtype, torch.float32 if cos32 else None
    )
    kc_ref, vc_ref = kc.clone(), vc.clone()
    want = reference.rope_kv_append(q, k, v, cos, sin, kc_ref, vc_ref, targets, block_table=table)
    poison_empty(monkeypatch)
    out = _run(name, q, k, v, cos, sin, kc, vc, targets, table)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    _assert_same(name, dtype, out, want)
    _assert_same(name, dtype, kc, kc_ref)
    assert torch.equal(vc, vc_ref)  # values are copied, never rounded


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ["contiguous", "paged"])
def test_equals_transformers_then_kv_cache_append(name, dtype, form):
    # a Llama decode step, unfused: q/k/v (B, n, H, D) -> transpose to (B, H, n, D), cos/sin
    # from LlamaRotaryEmbedding, apply_rotary_pos_emb, transpose back, kv_cache_append
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    config = llama.LlamaConfig(
        hidden_size=6 * 32, num_attention_heads=6, num_key_value_heads=2, head_dim=32
    )
    rotary = llama.LlamaRotaryEmbedding(config).to(DEVICE)
    q, k, v, _, _, kc, vc, targets, table = _case(form, (3, 2, 6, 2, 32, 32), dtype)
    position_ids = targets[:, None] + torch.arange(2, device=DEVICE)
    cos, sin = rotary(q, position_ids)
    assert cos.dtype == dtype and cos.shape == (3, 2, 32)
    q_t, k_t = llama.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    kc_want, vc_want = kc.clone(), vc.clone()
    with fastllm.use_backend(name if name in ("torch", "triton") else None):
        fastllm.ops.kv_cache_append(
            k_t.transpose(1, 2), v, kc_want, vc_want, targets, block_table=table
        )
    out = _run(name, q, k, v, cos, sin, kc, vc, targets, table)
    _assert_same(name, dtype, out, q_t.transpose(1, 2))
    _assert_same(name, dtype, kc, kc_want)
    assert torch.equal(vc, vc_want)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_partial_rotary_equals_gpt_neox(name, dtype):
    neox = pytest.importorskip("transformers.models.gpt_neox.modeling_gpt_neox")
    q, k, v, cos, sin, kc, vc, targets, table = _case("contiguous", (2, 3, 4, 4, 40, 16), dtype)
    q_t, k_t = neox.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
    kc_want, vc_want = kc.clone(), vc.clone()
    fastllm.ops.kv_cache_append(k_t, v, kc_want, vc_want, targets)
    out = _run(name, q, k, v, cos, sin, kc, vc, targets, table)
    _assert_same(name, dtype, out, q_t)
    _assert_same(name, dtype, kc, kc_want)


def test_reference_against_float64_rotation():
    # the rotation of pairs (x[d], x[d + R/2]) by angle a[d]: a complex product
    B, n, H, D, R = 2, 3, 4, 48, 32
    x = torch.randn(B, n, H, D, dtype=torch.float64)
    ang = torch.rand(B, n, R // 2, dtype=torch.float64) * 100
    emb = torch.cat((ang, ang), -1)
    z = (
        torch.complex(x[..., : R // 2], x[..., R // 2 : R])
        * torch.polar(torch.ones_like(ang), ang)[:, :, None]
    )
    want = torch.cat((z.real, z.imag, x[..., R:]), -1)
    got = reference.rope.apply_rotary(x, emb.cos(), emb.sin())
    assert rel_err(got, want) < 1e-14
    got32 = reference.rope.apply_rotary(x.float(), emb.cos().float(), emb.sin().float())
    assert rel_err(got32, want) < 1e-6


@pytest.mark.parametrize("name", BACKENDS)
def test_strided_views(name):
    B, n, Hq, Hkv, D = 3, 2, 4, 2, 32
    # q, k, v as views of one fused qkv projection, (B, n, (Hq + 2 Hkv) * D)
    qkv = torch.randn(B, n, (Hq + 2 * Hkv) * D, device=DEVICE)
    q = qkv[..., : Hq * D].view(B, n, Hq, D)
    k = qkv[..., Hq * D : (Hq + Hkv) * D].view(B, n, Hkv, D)
    v = qkv[..., (Hq + Hkv) * D :].view(B, n, Hkv, D)
    ang = torch.rand(1, n, D // 2, device=DEVICE) * 10
    emb = torch.cat((ang, ang), -1)
    cos, sin = emb.cos().expand(B, n, D), emb.sin().expand(B, n, D)  # stride 0 on batch
    pos_all = torch.tensor([0, 99, 5, 99, 3, 99], device=DEVICE)  # int64, stride 2
    table_all = torch.arange(2 * B * 4, device=DEVICE).view(B, 8)  # int64, strided view
    table = table_all[:, ::2]
    kc = torch.randn(2 * B * 4, 3, Hkv, 2 * D, device=DEVICE)[..., :D]  # cache with padded rows
    vc = torch.randn(2 * B * 4, 3, Hkv, 2 * D, device=DEVICE)[..., ::2].contiguous()
    kc_ref, vc_ref = kc.clone(), vc.clone()
    want = reference.rope_kv_append(
        q, k, v, cos, sin, kc_ref, vc_ref, pos_all[::2], block_table=table
    )
    out = _run(name, q, k, v, cos, sin, kc, vc, pos_all[::2], table)
    assert torch.equal(out, want) and torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
    # a q whose last stride is not 1 is copied first
    q2 = torch.randn(B, n, Hq, 2 * D, device=DEVICE)[..., ::2]
    out = _run(name, q2, k, v, cos, sin, kc, vc, pos_all[::2], table)
    want = reference.rope.apply_rotary(q2.contiguous(), cos, sin)
    assert torch.equal(out, want)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("form", FORMS)
def test_unchecked_targets_out_of_range_are_skipped(name, form):
    q, k, v, cos, sin, kc, vc, targets, table = _case(form, (4, 2, 2, 2, 16, 16), torch.float32)
    big = 2**40
    if form == "slots":
        targets = torch.tensor([-5, kc.shape[0] * kc.shape[1], big, 3] * 2, device=DEVICE)
    else:
        targets = torch.tensor([-1, kc.shape[1] * 99, big, 1], device=DEVICE)
        if table is not None:
            table[3, 0] = 10**6  # a bad block id on the last sequence's first block
            table[3, 1] = -3
    kc_ref, vc_ref = kc.clone(), vc.clone()
    want = reference.rope_kv_append(q, k, v, cos, sin, kc_ref, vc_ref, targets, block_table=table)
    out = _run(name, q, k, v, cos, sin, kc, vc, targets, table, validate=False)
    assert torch.equal(out, want) and torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)


_UNSAFE_SCRIPT = r"""
import os, sys, torch, fastllm
name = sys.argv[1]
torch.manual_seed(0)
D, H = 16, 2
for form in ("contiguous", "paged", "slots"):
    for t in (2**31 - 1, -2**31, 2**40, -2**62, 2**63 - 1):
        # the caches are the middle of a larger buffer: anything written outside shows up
        size = 2 * 4 * 2 * H * D  # both caches: 2 blocks of 4 rows, k and v heads interleaved
        buf = torch.zeros(3 * size)
        kv = buf[size : 2 * size].view(2, 4, 2 * H, D)
        kc, vc = kv[:, :, :H], kv[:, :, H:]
        if form == "slots":
            q, k, v = torch.randn(2, H, D), torch.randn(2, H, D), torch.randn(2, H, D)
            cos, sin = torch.randn(2, D), torch.randn(2, D)
            pos, table = torch.tensor([t, t], dtype=torch.int64), None
        else:
            q, k, v = (torch.randn(2, 3, H, D) for _ in range(3))
            cos, sin = torch.randn(2, 3, D), torch.randn(2, 3, D)
            pos = torch.tensor([t, 2], dtype=torch.int64)
            table = None
            if form == "paged":
                table = torch.tensor([[t, t], [2**31 - 1, -7]], dtype=torch.int64)
        with fastllm.use_backend(name):
            fastllm.ops.rope_kv_append(q, k, v, cos, sin, kc, vc, pos, block_table=table,
                                       validate=False)
        assert buf[:size].abs().sum() == 0 and buf[2 * size :].abs().sum() == 0, (form, t)
print("safe")
"""


@pytest.mark.parametrize("name", BACKENDS)
def test_unchecked_invalid_targets_are_memory_safe(name):
    # run in a subprocess: an out-of-bounds write may crash rather than fail
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run(
        [sys.executable, "-c", _UNSAFE_SCRIPT, name],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0 and "safe" in res.stdout, res.stderr[-3000:]


@pytest.mark.parametrize("form", FORMS)
def test_checked_targets_raise(form):
    q, k, v, cos, sin, kc, vc, targets, table = _case(form, (2, 2, 2, 2, 16, 16), torch.float32)
    bad = targets.clone()
    bad[1] = 10**6
    for validate in (None, True):
        with pytest.raises(ValueError, match=r"slot_mapping_or_positions\[1\] = 1000000"):
            fastllm.ops.rope_kv_append(
                q, k, v, cos, sin, kc, vc, bad, block_table=table, validate=validate
            )
    if table is not None:
        table[1, 0] = -1
        targets[1] = 0
        with pytest.raises(ValueError, match=r"block_table\[1, 0\] = -1 is not a block id"):
            fastllm.ops.rope_kv_append(q, k, v, cos, sin, kc, vc, targets, block_table=table)


@pytest.mark.parametrize("name", BACKENDS)
def test_empty_batch(name):
    q, k, v = torch.randn(0, 1, 4, 16), torch.randn(0, 1, 2, 16), torch.randn(0, 1, 2, 16)
    cos = sin = torch.randn(0, 1, 16)
    kc = vc = torch.zeros(0, 8, 2, 16)
    with fastllm.use_backend(name):
        out = fastllm.ops.rope_kv_append(
            q, k, v, cos, sin, kc, vc, torch.zeros(0, dtype=torch.int64)
        )
    assert out.shape == (0, 1, 4, 16)


def _args(**over):
    a = dict(
        q=torch.randn(2, 1, 4, 8),
        k=torch.randn(2, 1, 2, 8),
        v=torch.randn(2, 1, 2, 8),
        cos=torch.randn(2, 1, 8),
        sin=torch.randn(2, 1, 8),
        kc=torch.zeros(2, 5, 2, 8),
        vc=torch.zeros(2, 5, 2, 8),
        pos=torch.tensor([0, 1]),
    )
    a.update(over)
    return a


@pytest.mark.parametrize(
    "over, err, words",
    [
        (dict(q=torch.randn(2, 1, 4, 8).half()), TypeError, ["q", "float16", "k_new"]),
        (dict(q=torch.randn(2, 2, 4, 8)), ValueError, ["q", "(2, 2, 4, 8)", "(2, 1)"]),
        (dict(q=torch.randn(2, 1, 4, 6)), ValueError, ["q", "head_dim 6", "8"]),
        (dict(q=[1.0]), TypeError, ["q", "list"]),
        (dict(cos=torch.randn(2, 1, 8).double()), TypeError, ["cos", "float64", "float32"]),
        (dict(sin=torch.randn(2, 1, 8).half()), TypeError, ["sin", "float16"]),
        (
            dict(cos=torch.randn(2, 8), sin=torch.randn(2, 8)),
            ValueError,
            ["cos", "(2, 8)", "(2, 1, rotary_dim)"],
        ),
        (
            dict(cos=torch.randn(3, 1, 8), sin=torch.randn(3, 1, 8)),
            ValueError,
            ["cos", "(3, 1, 8)"],
        ),
        (dict(sin=torch.randn(2, 1, 6)), ValueError, ["sin", "(2, 1, 6)", "(2, 1, 8)"]),
        (dict(cos=torch.randn(2, 1, 5), sin=torch.randn(2, 1, 5)), ValueError, ["rotary_dim 5"]),
        (dict(cos=torch.randn(2, 1, 10), sin=torch.randn(2, 1, 10)), ValueError, ["rotary_dim 10"]),
        (dict(k=torch.randn(2, 1, 2, 8).half()), TypeError, ["k_new", "float16"]),
        (dict(pos=torch.tensor([0.0, 1.0])), TypeError, ["slot_mapping_or_positions"]),
        (dict(pos=torch.tensor([0, 5])), ValueError, ["slot_mapping_or_positions[1] = 5"]),
    ],
)
def test_bad_input(over, err, words):
    a = _args(**over)
    with pytest.raises(err) as info:
        fastllm.ops.rope_kv_append(
            a["q"], a["k"], a["v"], a["cos"], a["sin"], a["kc"], a["vc"], a["pos"]
        )
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_registered_op_checks_input():
    a = _args()
    with pytest.raises(TypeError, match="cos has dtype"):
        torch.ops.fastllm.rope_kv_append(
            a["q"], a["k"], a["v"], a["cos"].double(), a["sin"], a["kc"], a["vc"], a["pos"], None
        )
    out = torch.ops.fastllm.rope_kv_append(
        a["q"], a["k"], a["v"], a["cos"], a["sin"], a["kc"], a["vc"], a["pos"], None
    )
    assert out.shape == a["q"].shape and a["kc"].abs().sum() > 0


@pytest.mark.parametrize("form", FORMS)
def test_opcheck(form):
    q, k, v, cos, sin, kc, vc, targets, table = _case(form, (2, 2, 4, 2, 16, 8), torch.float32)
    if table is not None:
        table = table.to(DEVICE)
    # the caches are written (in place): each run of opcheck writes the same values
    torch.library.opcheck(
        torch.ops.fastllm.rope_kv_append.default, (q, k, v, cos, sin, kc, vc, targets, table)
    )


def test_compile_fullgraph():
    def step(q, k, v, cos, sin, kc, vc, lens):
        q = fastllm.ops.rope_kv_append(q, k, v, cos, sin, kc, vc, lens)
        return fastllm.ops.decode_attention(q, kc, vc, lens + q.shape[1])

    q, k, v, cos, sin, kc, vc, lens, _ = _case("contiguous", (2, 1, 4, 2, 32, 32), torch.float32)
    kc2, vc2 = kc.clone(), vc.clone()
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    got = compiled(q, k, v, cos, sin, kc, vc, lens)
    want = step(q, k, v, cos, sin, kc2, vc2, lens)
    assert torch.equal(got, want) and torch.equal(kc, kc2) and torch.equal(vc, vc2)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", FORMS)
def test_gpu_real_sizes(name, dtype, form, monkeypatch):
    # Llama-3-8B decode: 32 q heads, 8 kv heads, head_dim 128; a batch of 64
    q, k, v, cos, sin, kc, vc, targets, table = _case(form, (64, 1, 32, 8, 128, 128), dtype)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    want = reference.rope_kv_append(q, k, v, cos, sin, kc_ref, vc_ref, targets, block_table=table)
    poison_empty(monkeypatch)
    out = _run(name, q, k, v, cos, sin, kc, vc, targets, table)
    assert torch.equal(out, want) and torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
