"""fastllm.ops.sparse24_linear and block_sparse_linear on every backend against the reference."""

import pytest
import torch
from conftest import DEVICE, HAS_GPU, available_backends, poison_empty, rel_err

import fastllm
from fastllm import reference
from fastllm.sparse import compress_24, decompress_24, prune, to_block_sparse

OPS = ("sparse24_linear", "block_sparse_linear")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
# the Triton interpreter is slow: small shapes for it on a CPU, the list elsewhere
SMALL = not HAS_GPU


def _run(op, name, *args, **kwargs):
    with fastllm.use_backend(name):
        out = getattr(fastllm.ops, op)(*args, **kwargs)
    assert fastllm.last_backend(op) == name
    return out


def _weight24(N, K, dtype):
    w = torch.randn(N, K, device=DEVICE)
    values, metadata = compress_24(w.to(dtype), prune(w))
    return values, metadata


def _shapes24(name):
    if name == "triton" and SMALL:
        return [(1, 40, 200), (3, 24, 64), (17, 16, 132), (130, 72, 36)]
    return [(m, n, k) for m in (1, 3, 17, 257) for n, k in ((96, 200), (1000, 4096))]


def _weight_block(N, K, block, density, dtype, empty_row=False):
    w = torch.randn(N, K, device=DEVICE)
    mask = prune(w, "block", block_size=block, density=density)
    if empty_row:
        mask[: block[0]] = False
    return to_block_sparse(w.to(dtype), mask, block)


def test_backends_include_triton_and_torch():
    for op in OPS:
        assert {"torch", "reference", "triton"} <= set(available_backends(op))


# --- sparse24_linear -------------------------------------------------------------------


@pytest.mark.parametrize("name", available_backends("sparse24_linear"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse24_matches_reference(name, dtype, monkeypatch):
    for M, N, K in _shapes24(name):
        if name != "triton" and dtype != torch.float32 and M * N * K > 4e7:
            continue  # bf16/fp16 CPU matmuls at the largest sizes: fp32 covers them
        values, metadata = _weight24(N, K, dtype)
        x = torch.randn(M, K, device=DEVICE).to(dtype)
        bias = torch.randn(N, device=DEVICE).to(dtype)
        ref = reference.sparse24_linear(x, values, metadata, bias)
        with monkeypatch.context() as mp:
            poison_empty(mp)
            y = _run("sparse24_linear", name, x, values, metadata, bias)
        assert y.shape == (M, N) and y.dtype == dtype
        assert rel_err(y, ref) <= TOL[dtype], (M, N, K)


@pytest.mark.parametrize("name", available_backends("sparse24_linear"))
def test_sparse24_int8_exact(name, monkeypatch):
    for M, N, K in [(1, 40, 200), (17, 24, 64)]:
        wq = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=DEVICE)
        values, metadata = compress_24(wq, prune(wq.float()))
        x = torch.randint(-127, 128, (M, K), dtype=torch.int8, device=DEVICE)
        ref = reference.sparse24_linear(x, values, metadata)
        expect = x.double() @ decompress_24(values, metadata).double().t()
        assert torch.equal(ref.double(), expect)
        with monkeypatch.context() as mp:
            poison_empty(mp)
            y = _run("sparse24_linear", name, x, values, metadata)
        assert y.dtype == torch.int32 and torch.equal(y, ref)


@pytest.mark.parametrize("join", [True, False])
@pytest.mark.parametrize("dtype", DTYPES + [torch.int8])
def test_sparse24_triton_both_expansions(join, dtype):
    # the kernel expands W by split/join (default) or by per-column gathers (fallback)
    from fastllm.triton_kernels.sparse import sparse24_linear

    M, N, K = 5, 24, 100
    if dtype == torch.int8:
        w = torch.randint(-127, 128, (N, K), dtype=dtype, device=DEVICE)
        x = torch.randint(-127, 128, (M, K), dtype=dtype, device=DEVICE)
    else:
        w = torch.randn(N, K, device=DEVICE).to(dtype)
        x = torch.randn(M, K, device=DEVICE).to(dtype)
    values, metadata = compress_24(w, prune(w.float()))
    ref = reference.sparse24_linear(x, values, metadata)
    y = sparse24_linear(x, values, metadata, None, join=join)
    if dtype == torch.int8:
        assert torch.equal(y, ref)
    else:
        assert rel_err(y, ref) <= TOL[dtype]


@pytest.mark.parametrize("name", available_backends("sparse24_linear"))
def test_sparse24_leading_dims_strides_no_bias(name):
    values, metadata = _weight24(24, 64, torch.float32)
    base = torch.randn(5, 2, 3, 64, device=DEVICE)
    x = base.transpose(0, 1)[..., ::1]  # (2, 5, 3, 64), rows strided
    y = _run("sparse24_linear", name, x, values, metadata)
    ref = reference.sparse24_linear(x.contiguous(), values, metadata)
    assert y.shape == (2, 5, 3, 24) and rel_err(y, ref) <= 1e-5
    x = torch.randn(3, 128, device=DEVICE)[:, ::2]  # last dim not unit-stride
    assert (
        rel_err(
            _run("sparse24_linear", name, x, values, metadata),
            reference.sparse24_linear(x.contiguous(), values, metadata),
        )
        <= 1e-5
    )


def test_sparse24_empty():
    values, metadata = _weight24(8, 16, torch.float32)
    bias = torch.randn(8, device=DEVICE)
    y = fastllm.ops.sparse24_linear(torch.randn(0, 3, 16, device=DEVICE), values, metadata, bias)
    assert y.shape == (0, 3, 8)


def test_reference_against_float64():
    w = torch.randn(40, 200, dtype=torch.float64)
    mask = prune(w)
    values, metadata = compress_24(w, mask)
    x, b = torch.randn(9, 200, dtype=torch.float64), torch.randn(40, dtype=torch.float64)
    expect = torch.einsum("mk,nk->mn", x, torch.where(mask, w, 0.0)) + b
    assert rel_err(reference.sparse24_linear(x, values, metadata, b), expect) < 1e-14
    y32 = reference.sparse24_linear(x.float(), values.float(), metadata, b.float())
    assert rel_err(y32, expect) < 1e-6
    bsw = to_block_sparse(w, prune(w, "block", block_size=(8, 40), density=0.4), (8, 40))
    expect = x @ bsw.to_dense().t() + b
    assert rel_err(reference.block_sparse_linear(x, bsw, b), expect) < 1e-14


# --- block_sparse_linear -----------------------------------------------------------------


def _block_cases(name):
    if name == "triton" and SMALL:
        return [((1, 64, 96), (16, 32)), ((17, 96, 64), (32, 16)), ((130, 32, 64), (16, 16))]
    return [((m, 384, 640), (64, 64)) for m in (1, 3, 17, 257)] + [((5, 96, 160), (16, 32))]


@pytest.mark.parametrize("name", available_backends("block_sparse_linear"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_block_matches_reference(name, dtype, density, monkeypatch):
    for (M, N, K), block in _block_cases(name):
        bsw = _weight_block(N, K, block, density, dtype, empty_row=density == 0.5)
        x = torch.randn(M, K, device=DEVICE).to(dtype)
        bias = torch.randn(N, device=DEVICE).to(dtype)
        ref = reference.block_sparse_linear(x, bsw, bias)
        with monkeypatch.context() as mp:
            poison_empty(mp)
            y = _run("block_sparse_linear", name, x, bsw, bias)
        assert y.shape == (M, N) and y.dtype == dtype
        assert rel_err(y, ref) <= TOL[dtype], (M, N, K, block)
        if density == 0.5:  # the all-empty first block-row gives exactly the bias
            assert torch.equal(y[:, : block[0]], bias[: block[0]].expand(M, -1))


@pytest.mark.parametrize("name", available_backends("block_sparse_linear"))
def test_block_nothing_kept_no_bias_leading_dims(name):
    w = torch.randn(32, 64, device=DEVICE)
    bsw = to_block_sparse(w, torch.zeros(2, 4, dtype=torch.bool, device=DEVICE), (16, 16))
    x = torch.randn(2, 3, 64, device=DEVICE)
    y = _run("block_sparse_linear", name, x, bsw)
    assert y.shape == (2, 3, 32) and (y == 0).all()
    bsw = _weight_block(32, 64, (16, 16), 0.5, torch.float32)
    x = torch.randn(4, 2, 64, device=DEVICE).transpose(0, 1)
    ref = reference.block_sparse_linear(x.contiguous(), bsw)
    assert rel_err(_run("block_sparse_linear", name, x, bsw), ref) <= 1e-5


def test_block_triton_needs_power_of_two_tiles():
    bsw = _weight_block(48, 40, (24, 20), 0.5, torch.float32)
    x = torch.randn(3, 40, device=DEVICE)
    with pytest.raises(fastllm.BackendError, match="bn = 24.*power of 2"):
        _run("block_sparse_linear", "triton", x, bsw)
    # the torch backend serves it
    ref = reference.block_sparse_linear(x, bsw)
    assert rel_err(_run("block_sparse_linear", "torch", x, bsw), ref) <= 1e-5


# --- custom ops ----------------------------------------------------------------------------


def test_opcheck():
    values, metadata = _weight24(24, 64, torch.float32)
    x, b = torch.randn(5, 64, device=DEVICE), torch.randn(24, device=DEVICE)
    op = torch.ops.fastllm.sparse24_linear.default
    torch.library.opcheck(op, (x, values, metadata, b))
    torch.library.opcheck(op, (x, values, metadata, None))
    xq = torch.randint(-127, 128, (3, 64), dtype=torch.int8, device=DEVICE)
    vq, mq = compress_24(
        torch.randint(-9, 9, (24, 64), dtype=torch.int8, device=DEVICE),
        prune(torch.randn(24, 64, device=DEVICE)),
    )
    torch.library.opcheck(op, (xq, vq, mq, None))
    bsw = _weight_block(32, 64, (16, 16), 0.5, torch.float32)
    op = torch.ops.fastllm.block_sparse_linear.default
    torch.library.opcheck(op, (x, *bsw[:3], torch.randn(32, device=DEVICE), 32))
    torch.library.opcheck(op, (x, *bsw[:3], None, 32))


def test_compile_fullgraph():
    values, metadata = _weight24(24, 64, torch.float32)
    bsw = _weight_block(24, 24, (8, 8), 0.5, torch.float32)

    def f(x):
        h = fastllm.ops.sparse24_linear(x, values, metadata)
        return fastllm.ops.block_sparse_linear(torch.relu(h), bsw)

    x = torch.randn(2, 5, 64, device=DEVICE)
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), f(x))


# --- bad input -------------------------------------------------------------------------------


def test_sparse24_bad_input():
    values, metadata = _weight24(8, 32, torch.float32)
    x = torch.randn(3, 32, device=DEVICE)
    op = fastllm.ops.sparse24_linear
    with pytest.raises(ValueError, match=r"x has 30 features .* K = 32"):
        op(torch.randn(3, 30, device=DEVICE), values, metadata)
    with pytest.raises(TypeError, match="values has dtype torch.float16 but x has torch.float32"):
        op(x, values.half(), metadata)
    with pytest.raises(TypeError, match="x has dtype torch.float64"):
        op(x.double(), values, metadata)
    with pytest.raises(ValueError, match=r"metadata has shape \(8, 1\) but values \(8, 16\)"):
        op(x, values, metadata[:, :1])
    with pytest.raises(ValueError, match=r"metadata has shape \(7, 2\)"):
        op(x, values, metadata[:7])
    with pytest.raises(ValueError, match="K = 30 .*multiple of 4"):
        op(torch.randn(3, 30, device=DEVICE), values[:, :15], metadata)
    with pytest.raises(ValueError, match=r"bias has shape \(9,\); expected \(8,\)"):
        op(x, values, metadata, torch.randn(9, device=DEVICE))
    with pytest.raises(TypeError, match="bias has dtype torch.float16"):
        op(x, values, metadata, torch.randn(8, device=DEVICE).half())
    with pytest.raises(ValueError, match="bias must be None for int8"):
        xq = torch.zeros(3, 32, dtype=torch.int8, device=DEVICE)
        op(xq, values.to(torch.int8), metadata, torch.zeros(8, dtype=torch.int8, device=DEVICE))
    with pytest.raises(TypeError, match="values must be a torch.Tensor"):
        op(x, values.tolist(), metadata)


def test_block_bad_input():
    bsw = _weight_block(32, 64, (16, 16), 0.5, torch.float32)
    x = torch.randn(3, 64, device=DEVICE)
    op = fastllm.ops.block_sparse_linear
    with pytest.raises(TypeError, match="weight_bsr must be a fastllm.sparse.BlockSparseWeight"):
        op(x, tuple(bsw))
    with pytest.raises(ValueError, match=r"x has 48 features .* K = 64"):
        op(torch.randn(3, 48, device=DEVICE), bsw)
    with pytest.raises(TypeError, match="blocks has dtype torch.float32 but x has torch.bfloat16"):
        op(x.bfloat16(), bsw)
    with pytest.raises(ValueError, match=r"bias has shape \(16,\); expected \(32,\)"):
        op(x, bsw, torch.randn(16, device=DEVICE))
    with pytest.raises(ValueError, match=r"\(32, 64\) is not divisible by block_size \(16, 48\)"):
        op(x, bsw._replace(block_size=(16, 48)))
    if DEVICE.type == "cpu":  # index contents are checked for CPU tensors
        with pytest.raises(ValueError, match=r"col_indices must lie in \[0, 4\)"):
            op(x, bsw._replace(col_indices=bsw.col_indices + 4))


# --- unchecked index values: read within bounds on every backend --------------------------

_INVALID_INDICES = r"""
import sys
import torch
import fastllm
from fastllm.sparse import BlockSparseWeight

name = sys.argv[1]
ops = torch.ops.fastllm


def any_int(shape, high, g):
    # half near the valid range (off-by-a-few), half anywhere in int32 / int16
    big = torch.randint(-(2**31), 2**31 - 1, shape, generator=g).to(torch.int32)
    near = torch.randint(-3, high + 4, shape, generator=g).to(torch.int32)
    return torch.where(torch.rand(shape, generator=g) < 0.5, near, big)


block = torch.compile(
    lambda x, bsw: fastllm.ops.block_sparse_linear(x, bsw), fullgraph=True, backend="eager"
)
s24 = torch.compile(
    lambda x, v, m: fastllm.ops.sparse24_linear(x, v, m), fullgraph=True, backend="eager"
)
for seed in range(4):
    g = torch.Generator().manual_seed(seed)
    # float32 M <= 64: the torch backend's MKL BSR path; M = 80 and bfloat16: to_dense
    for M, dtype in ((3, torch.float32), (80, torch.float32), (5, torch.bfloat16)):
        N, K, bn, bk, nnz = 64, 96, 16, 16, 9
        crow, col = any_int((N // bn + 1,), nnz, g), any_int((nnz,), K // bk, g)
        blocks = torch.randn(nnz, bn, bk, generator=g).to(dtype)
        bsw = BlockSparseWeight(crow, col, blocks, (N, K), (bn, bk))
        x = torch.randn(M, K, generator=g).to(dtype)
        with fastllm.use_backend(name):
            ys = [
                block(x, bsw),
                ops.block_sparse_linear(x, crow, col, blocks, None, N),
                fastllm.ops.block_sparse_linear(x, bsw, validate=False),
            ]
        for y in ys:
            assert y.shape == (M, N) and torch.isfinite(y).all(), (seed, M, dtype)
    # 2:4 metadata with any bits (nibbles with i0 >= i1 included)
    N, K = 24, 96
    meta = torch.randint(-(2**15), 2**15, (N, K // 16), generator=g).to(torch.int16)
    for x, values in (
        (torch.randn(3, K, generator=g), torch.randn(N, K // 2, generator=g)),
        (torch.randint(-127, 128, (3, K), generator=g).to(torch.int8),
         torch.randint(-127, 128, (N, K // 2), generator=g).to(torch.int8)),
    ):
        with fastllm.use_backend(name):
            for call in (s24, ops.sparse24_linear):
                try:
                    y = call(x, values, meta) if call is s24 else call(x, values, meta, None)
                except ValueError as e:  # the reference decompresses with its checks
                    assert name == "reference" and "metadata" in str(e), e
                    continue
                assert y.shape == (3, N) and (y.dtype == torch.int32 or torch.isfinite(y).all())
print("ok")
"""


@pytest.mark.parametrize("name", available_backends("block_sparse_linear", torch.device("cpu")))
def test_invalid_indices_are_read_in_bounds(name):
    # Random crow/col (not monotone, past nnz, negative, huge) and 2:4 metadata, unchecked:
    # under torch.compile, through torch.ops.fastllm, and with validate=False. Wrong numbers
    # are allowed, a read out of bounds is not: in a subprocess, so a crash fails the test.
    import os
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _INVALID_INDICES, name],
        env={**os.environ, "TORCHDYNAMO_VERBOSE": "0"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0 and "ok" in out.stdout, (out.returncode, out.stderr[-3000:])


def test_validate_switch():
    bsw = _weight_block(32, 64, (16, 16), 0.5, torch.float32)
    bad = bsw._replace(col_indices=bsw.col_indices + 4)
    x = torch.randn(3, 64, device=DEVICE)
    with pytest.raises(ValueError, match=r"col_indices must lie in \[0, 4\)"):
        fastllm.ops.block_sparse_linear(x, bad, validate=True)
    if DEVICE.type == "cpu":  # checked by default where it costs no sync
        with pytest.raises(ValueError, match=r"col_indices must lie in \[0, 4\)"):
            fastllm.ops.block_sparse_linear(x, bad)
    clamped = bsw._replace(col_indices=torch.full_like(bsw.col_indices, 3))
    for name in available_backends("block_sparse_linear"):
        y = _run("block_sparse_linear", name, x, bad, validate=False)  # read as column 3
        assert torch.equal(y, _run("block_sparse_linear", name, x, clamped, validate=False))


def test_to_dense_reads_invalid_indices_in_range():
    w = torch.randn(32, 64, device=DEVICE)
    bsw = to_block_sparse(w, prune(w, "block", block_size=(16, 16), density=0.5), (16, 16))
    crow = torch.tensor([5, -7, 2**30], dtype=torch.int32, device=DEVICE)
    col = torch.full_like(bsw.col_indices, -9)
    dense = bsw._replace(crow_indices=crow, col_indices=col).to_dense()
    # read as crow = [0, 0, nnz], columns 0: every tile lands in block (1, 0)
    assert dense.shape == (32, 64) and torch.isfinite(dense).all()
    assert (dense[:16] == 0).all() and (dense[16:, 16:] == 0).all()


# --- every tensor argument as a strided view, on every backend -----------------------------


def _strided(t: torch.Tensor, garbage) -> torch.Tensor:
    """t's values as a view that is not contiguous: the even rows of a tensor twice as long
    whose odd rows hold `garbage`, so that reading the view as contiguous gives wrong values."""
    big = torch.empty((2 * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
    big[0::2], big[1::2] = t, garbage
    return big[0::2]


def _op_args(op):
    """Contiguous arguments of torch.ops.fastllm.<op>, by name, and the views of each: the
    garbage next to index tensors is in range, so a misread gives wrong numbers, not a crash."""
    x = torch.randn(5, 64, device=DEVICE)
    views = {"x": _strided(x, float("nan")), "x_t": x.t().contiguous().t()}
    if op == "sparse24_linear":
        values, metadata = _weight24(24, 64, torch.float32)
        args = dict(x=x, values=values, metadata=metadata, bias=torch.randn(24, device=DEVICE))
        views["metadata"] = _strided(metadata, _weight24(24, 64, torch.float32)[1])
    else:
        bsw = _weight_block(32, 64, (16, 16), 0.5, torch.float32)
        crow, col, blocks = bsw[:3]
        args = dict(x=x, crow_indices=crow, col_indices=col, blocks=blocks)
        args.update(bias=torch.randn(32, device=DEVICE), N=32)
        views["crow_indices"] = _strided(crow, crow)  # read as contiguous: [0, 0, c1, ...]
        views["col_indices"] = _strided(col, (col + 1) % 4)
    for name, t in args.items():
        if name not in views and isinstance(t, torch.Tensor):
            views[name] = _strided(t, float("nan"))
    return args, views


def _public(op, args):
    if op == "sparse24_linear":
        return fastllm.ops.sparse24_linear(
            args["x"], args["values"], args["metadata"], args["bias"]
        )
    bsw = fastllm.sparse.BlockSparseWeight(
        args["crow_indices"], args["col_indices"], args["blocks"], (32, 64), (16, 16)
    )
    return fastllm.ops.block_sparse_linear(args["x"], bsw, args["bias"])


_STRIDED_CASES = [
    (op, name, arg) for op in OPS for name in available_backends(op) for arg in _op_args(op)[1]
]


@pytest.mark.parametrize("op, name, arg", _STRIDED_CASES)
def test_strided_arguments(op, name, arg):
    args, views = _op_args(op)
    call = getattr(torch.ops.fastllm, op)
    with fastllm.use_backend(name):
        expect = call(*args.values())
        strided = {**args, arg.removesuffix("_t"): views[arg]}
        assert not strided[arg.removesuffix("_t")].is_contiguous()
        y_op = call(*strided.values())  # the registered op, past the public function
        y_public = _public(op, strided)
    assert rel_err(y_op, expect) <= 1e-6 and rel_err(y_public, expect) <= 1e-6


def test_registered_ops_check_shapes():
    # a direct torch.ops.fastllm call is checked like the public function (no value reads)
    bsw = _weight_block(32, 64, (16, 16), 0.5, torch.float32)
    x = torch.randn(3, 64, device=DEVICE)
    ops = torch.ops.fastllm
    with pytest.raises(ValueError, match=r"crow_indices has 2 entries"):
        ops.block_sparse_linear(x, bsw.crow_indices[:2], *bsw[1:3], None, 32)
    with pytest.raises(ValueError, match=r"blocks has shape .*expected \(\d+, 16, 16\)"):
        ops.block_sparse_linear(x, bsw.crow_indices, bsw.col_indices[:1], bsw.blocks, None, 32)
    with pytest.raises(ValueError, match=r"bias has shape \(24,\); expected \(32,\)"):
        ops.block_sparse_linear(x, *bsw[:3], torch.randn(24, device=DEVICE), 32)
    values, metadata = _weight24(24, 64, torch.float32)
    with pytest.raises(ValueError, match=r"metadata has shape \(24, 3\)"):
        ops.sparse24_linear(x, values, torch.zeros(24, 3, dtype=torch.int16), None)
    with pytest.raises(ValueError, match="x must have 2 dimensions"):
        ops.sparse24_linear(x[None], values, metadata, None)


def _all_127_24(K):
    """int8 x = 127 and a 2:4 weight of 127s: each output sums K/2 products of 127 * 127."""
    dense = torch.tensor([127, 127, 0, 0], dtype=torch.int8, device=DEVICE).repeat(1, K // 4)
    return (torch.full((1, K), 127, dtype=torch.int8, device=DEVICE), *compress_24(dense))


def test_sparse24_int8_k_limit():
    # a 2:4 row sums K/2 int8 products: the int32 accumulator holds K <= 2 * 133,144
    from fastllm.ops._checks import INT8_MAX_K

    K = 2 * INT8_MAX_K + 4
    x, values, metadata = _all_127_24(K)
    match = rf"K = {K} .*expected K <= {2 * INT8_MAX_K}"
    with pytest.raises(ValueError, match=match):
        fastllm.ops.sparse24_linear(x, values, metadata)
    with pytest.raises(ValueError, match=match):
        torch.ops.fastllm.sparse24_linear(x, values, metadata, None)
    x, values, metadata = _all_127_24(2 * INT8_MAX_K)
    for name in available_backends("sparse24_linear"):
        if name == "triton" and SMALL:
            continue  # 2,000 K steps under the interpreter: torch and reference suffice
        y = _run("sparse24_linear", name, x, values, metadata)
        assert y.item() == INT8_MAX_K * 127 * 127 == 2_147_479_576


# --- GPU: real sizes, every backend -----------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_sparse24_real_sizes(name, dtype, monkeypatch):
    for M in (1, 3, 17, 257):
        for N, K in ((1000, 4096), (96, 200), (4096, 4096)):
            values, metadata = _weight24(N, K, dtype)
            x = torch.randn(M, K, device="cuda").to(dtype)
            bias = torch.randn(N, device="cuda").to(dtype)
            ref = reference.sparse24_linear(x, values, metadata, bias)
            with monkeypatch.context() as mp:
                poison_empty(mp)
                y = _run("sparse24_linear", name, x, values, metadata, bias)
            assert rel_err(y, ref) <= TOL[dtype], (M, N, K)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_gpu_block_real_sizes(name, dtype, density, monkeypatch):
    for M in (1, 17, 257):
        bsw = _weight_block(4096, 4096, (64, 64), density, dtype, empty_row=True)
        x = torch.randn(M, 4096, device="cuda").to(dtype)
        bias = torch.randn(4096, device="cuda").to(dtype)
        ref = reference.block_sparse_linear(x, bsw, bias)
        with monkeypatch.context() as mp:
            poison_empty(mp)
            y = _run("block_sparse_linear", name, x, bsw, bias)
        assert rel_err(y, ref) <= TOL[dtype], (M, density)
        assert torch.equal(y[:, :64], bias[:64].expand(M, -1))


# --- the Triton kernels compile for a real GPU (no GPU needed) ----------------------------

_AOT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastllm.triton_kernels import sparse as S

def compile_(fn, sig, consts):
    sig = {**sig, **{k: "constexpr" for k in consts}}
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32))

ints = lambda *names: {n: "i32" for n in names}
compile_(
    S._block_sparse_linear_kernel,
    {"x_ptr": "*bf16", "crow_ptr": "*i32", "col_ptr": "*i32", "blocks_ptr": "*bf16",
     "bias_ptr": "*bf16", "y_ptr": "*bf16", **ints("M", "N", "KB", "NNZ", "stride_xm", "stride_ym")},
    {"BN": 64, "BK": 64, "BLOCK_M": 64, "HAS_BIAS": True, "UPCAST": False, "PRECISION": None},
)
for dt, out, prec in (("bf16", "bf16", None), ("i8", "i32", None), ("fp32", "fp32", "ieee")):
    compile_(
        S._sparse24_linear_kernel,
        {"x_ptr": f"*{dt}", "values_ptr": f"*{dt}", "meta_ptr": "*i16", "bias_ptr": f"*{out}",
         "y_ptr": f"*{out}", **ints("M", "N", "K", "stride_xm", "stride_vn", "stride_metan", "stride_ym")},
        {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 128, "HAS_BIAS": False, "UPCAST": False,
         "PRECISION": prec, "INT8": dt == "i8", "JOIN": True},
    )
print("compiled")
"""


@pytest.mark.skipif(HAS_GPU, reason="on a GPU the kernels run for real")
def test_triton_kernels_compile_for_sm90():
    # the interpreter accepts code that the compiler rejects: compile for sm_90 to PTX
    # (Triton ships its own ptxas), in a subprocess where TRITON_INTERPRET is unset
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", _AOT], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-3000:]
