"""fastllm.ops.quantize_per_token on every backend against the reference."""

import pytest
import torch
from conftest import DEVICE, available_backends, poison_empty

import fastllm
from fastllm import reference

OP = "quantize_per_token"
BACKENDS = available_backends(OP)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1), (3, 17), (5, 123, 129), (2, 4097), (7, 64)]


def _run(x, name):
    with fastllm.use_backend(name):
        out = fastllm.ops.quantize_per_token(x)
    assert fastllm.last_backend(OP) == name
    return out


def test_backends_include_triton_and_torch():
    # the README's test command must exercise the Triton kernels on a CPU machine too
    assert {"torch", "reference", "triton"} <= set(BACKENDS)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(name, dtype, shape, monkeypatch):
    x = (torch.randn(shape, device=DEVICE) * 3).to(dtype)
    ref_q, ref_s = reference.quantize_per_token(x)
    poison_empty(monkeypatch)
    q, s = _run(x, name)
    assert q.shape == x.shape and q.dtype == torch.int8
    assert s.shape == x.shape[:-1] and s.dtype == torch.float32
    torch.testing.assert_close(s, ref_s, rtol=0, atol=0)
    torch.testing.assert_close(q, ref_q, rtol=0, atol=0)


@pytest.mark.parametrize("name", BACKENDS)
def test_zero_rows_and_outliers(name):
    x = torch.randn(6, 300, device=DEVICE)
    x[1] = 0  # all-zero row
    x[3, 17] = 1e6  # one huge value dominates its row
    x[4, 5] = -3e4
    q, s = _run(x, name)
    ref_q, ref_s = reference.quantize_per_token(x)
    torch.testing.assert_close(q, ref_q, rtol=0, atol=0)
    torch.testing.assert_close(s, ref_s, rtol=0, atol=0)
    assert s[1].item() == 1.0 and (q[1] == 0).all()
    assert q[3, 17].item() == 127 and q[4, 5].item() == -127
    assert torch.isfinite(s).all()


@pytest.mark.parametrize("name", BACKENDS)
def test_values_at_and_next_to_rounding_ties(name):
    """x / scale exactly on a half-integer, and one float32 step either side of it: where a
    kernel that multiplies by 1 / scale (cpu) must still round as the division does. Rows of
    tiny values (scale near float32's smallest) too."""
    g = torch.Generator().manual_seed(0)
    scales = torch.rand(64, 1, generator=g) * 3 + 0.01
    halves = torch.randint(-127, 127, (64, 255), generator=g).float() + 0.5
    row = (halves * scales).float()  # x / s lands on or next to k + 0.5
    x = torch.cat([row, torch.nextafter(row, row + 1), torch.nextafter(row, row - 1)])
    x[:, 0] = 127 * scales.repeat(3, 1)[:, 0]  # the row's maximum, so scale = the intended s
    tiny = torch.randn(4, 255, generator=g) * 1e-39  # subnormal values: a scale below 1e-38
    x = torch.cat([x, tiny]).to(DEVICE)
    q, s = _run(x, name)
    ref_q, ref_s = reference.quantize_per_token(x)
    torch.testing.assert_close(s, ref_s, rtol=0, atol=0)
    torch.testing.assert_close(q, ref_q, rtol=0, atol=0)


@pytest.mark.parametrize("name", BACKENDS)
def test_non_contiguous_input(name):
    base = torch.randn(33, 4, 40, device=DEVICE, dtype=torch.float16)
    x = base.transpose(0, 1)  # (4, 33, 40), rows strided
    q, s = _run(x, name)
    ref_q, ref_s = reference.quantize_per_token(x.contiguous())
    assert torch.equal(q, ref_q) and torch.equal(s, ref_s)
    x = base[..., ::2]  # last dimension not unit-stride
    q, s = _run(x, name)
    ref_q, ref_s = reference.quantize_per_token(x.contiguous())
    assert torch.equal(q, ref_q) and torch.equal(s, ref_s)
    x = base[:1, 0].expand(5, 40)  # one row read five times (row stride 0)
    q, s = _run(x, name)
    ref_q, ref_s = reference.quantize_per_token(x.contiguous())
    assert torch.equal(q, ref_q) and torch.equal(s, ref_s)


_VIEWS = {
    "one_column": lambda: torch.randn(1, 40, device=DEVICE).t(),  # (40, 1), strides (1, 40)
    "transposed": lambda: torch.randn(7, 40, device=DEVICE).t(),
    "column_major": lambda: torch.randn(40, 7, device=DEVICE).t().contiguous().t(),
    "every_other_row": lambda: torch.randn(10, 40, device=DEVICE)[::2],
    "every_other_column": lambda: torch.randn(5, 80, device=DEVICE)[:, ::2],
    "transposed_3d": lambda: torch.randn(6, 3, 5, device=DEVICE).transpose(0, 2),
}


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("view", list(_VIEWS))
def test_strided_input_public_and_registered_op(name, view):
    # the registered op is reachable past the public function: it lays x out itself
    x = _VIEWS[view]()
    ref_q, ref_s = reference.quantize_per_token(x.contiguous())
    with fastllm.use_backend(name):
        outs = [fastllm.ops.quantize_per_token(x), torch.ops.fastllm.quantize_per_token(x)]
    for q, s in outs:
        assert torch.equal(q, ref_q) and torch.equal(s, ref_s), view


def test_registered_op_checks_input():
    with pytest.raises(TypeError, match="x has dtype torch.int64"):
        torch.ops.fastllm.quantize_per_token(torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"dim 2 is out of range for w of shape \(3, 4\)"):
        torch.ops.fastllm.quantize_per_channel(torch.ones(3, 4), 2)
    q, s = torch.ops.fastllm.quantize_per_token(torch.ones(2, 0, 3))
    assert q.shape == (2, 0, 3) and s.shape == (2, 0)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 8), (4, 0), (2, 0, 5)])
def test_empty(name, shape):
    x = torch.randn(shape, device=DEVICE)
    q, s = _run(x, name) if x.numel() else fastllm.ops.quantize_per_token(x)
    assert q.shape == x.shape and s.shape == x.shape[:-1]
    assert (s == 1).all()


def test_reference_against_float64():
    x = torch.randn(64, 257, dtype=torch.float64) * 5
    q, s = reference.quantize_per_token(x.float())
    scale64 = x.abs().amax(-1) / 127
    q64 = torch.round(x / scale64[:, None])
    assert (s.double() - scale64).abs().max() <= 1e-6 * scale64.max()
    # float32 division can move a value across a .5 boundary: at most one step, rarely
    diff = (q.double() - q64).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
    # dequantization error is at most half a step per element
    assert ((q.double() * scale64[:, None] - x).abs() <= scale64[:, None] * 0.5 + 1e-6).all()


@pytest.mark.parametrize(
    "bad, err, words",
    [
        (torch.arange(6).reshape(2, 3), TypeError, ["x", "torch.int64", "float32"]),
        (torch.ones(3, dtype=torch.float64), TypeError, ["x", "torch.float64"]),
        (torch.ones(3, dtype=torch.bool), TypeError, ["x", "torch.bool"]),
        (torch.tensor(1.0), ValueError, ["x", "at least 1 dimension", "()"]),
        ([1.0, 2.0], TypeError, ["x", "list"]),
    ],
)
def test_bad_input(bad, err, words):
    with pytest.raises(err) as info:
        fastllm.ops.quantize_per_token(bad)
    for w in words:
        assert w in str(info.value)


def test_opcheck():
    x = torch.randn(5, 33, device=DEVICE)
    torch.library.opcheck(torch.ops.fastllm.quantize_per_token.default, (x,))


def test_compile_fullgraph():
    def f(x):
        q, s = fastllm.ops.quantize_per_token(x)
        return q.float() * s[..., None]

    x = torch.randn(4, 9, 64, device=DEVICE)
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), f(x))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 4096), (4096, 4096), (8192, 14336), (3, 100003)])
def test_gpu_real_sizes(name, dtype, shape, monkeypatch):
    x = (torch.randn(shape, device="cuda") * 2).to(dtype)
    x[0, 3] = 1e4
    ref_q, ref_s = reference.quantize_per_token(x)
    poison_empty(monkeypatch)
    q, s = _run(x, name)
    assert torch.equal(s, ref_s)
    assert torch.equal(q, ref_q)
