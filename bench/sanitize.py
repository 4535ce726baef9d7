"""Small calls of every CUDA kernel, for `compute-sanitizer --tool memcheck`
(run by bench/gpu_check.sh). Odd sizes, so that tile edges are exercised."""

import torch

import fastllm


def _attention_kernels(dev: str) -> None:
    """The CUDA attention kernels through their launchers (odd sizes, every head dim,
    varlen with empty sequences, window/softcap, split-KV, paged caches, and metadata
    past the cache's end, which the decode kernel must clamp rather than read)."""
    from fastllm.native import attention as na

    probe = torch.empty(1, 1, 1, 64, dtype=torch.float16, device=dev)
    reason = na._device_reason(probe)
    if reason is not None:
        print(f"sanitize: attention kernels skipped ({reason})")
        return
    for dtype in (torch.float16, torch.bfloat16):
        for d in na.HEAD_DIMS:
            s = d**-0.5

            def rnd(*shape, dtype=dtype):
                return torch.randn(shape, device=dev).to(dtype)

            q, k, v = rnd(2, 67, 4, d), rnd(2, 93, 2, d), rnd(2, 93, 2, d)
            for causal, wl, sc in ((False, -1, 0.0), (True, -1, 0.0), (True, 20, 7.0)):
                r = 0 if causal else -1
                na.prefill(q, k, v, causal, s, wl, r, sc, None, None, 67, 93, True)
            cu_q = torch.tensor([0, 0, 1, 71, 74], dtype=torch.int32, device=dev)
            cu_k = torch.tensor([0, 5, 5, 98, 99], dtype=torch.int32, device=dev)
            qp, kp, vp = rnd(74, 4, d), rnd(99, 1, d), rnd(99, 1, d)
            na.prefill(qp, kp, vp, True, s, -1, 0, 0.0, cu_q, cu_k, 70, 93, True)
            for q_len in (1, 3):
                qd = rnd(3, q_len, 8, d)
                kc, vc = rnd(3, 150, 2, d), rnd(3, 150, 2, d)
                lens = torch.tensor([1, 77, 150], dtype=torch.int32, device=dev)
                for ns in (1, 3):
                    na.decode(qd, kc, vc, lens, None, s, True, -1, 0, 0.0, ns)
                for bs in (16, 32):
                    pages_k, pages_v = rnd(40, bs, 2, d), rnd(40, bs, 2, d)
                    table = torch.randperm(40, device=dev)[:30].view(3, 10).int()
                    na.decode(qd, pages_k, pages_v, lens, table, s, True, 9, 0, 5.0, 3)
                    # lengths past the table and block ids out of range: clamped / zero-filled
                    bad = torch.tensor([10 * bs + 50, 5, 2], dtype=torch.int32, device=dev)
                    table[0, 3], table[1, 0] = -1, 1000
                    na.decode(qd, pages_k, pages_v, bad, table, s, False, -1, -1, 0.0, 2)
                bad = torch.tensor([500, 2, 3], dtype=torch.int32, device=dev)
                na.decode(qd, kc, vc, bad, None, s, True, -1, 0, 0.0, 1)


def _int8_kernels(dev: str) -> None:
    """The CUDA int8 matmuls through their launchers: W8A8 on both tile shapes with
    partial tiles in M, N and K, every out dtype; W8A16 with and without split-K."""
    from fastllm.native import int8 as ni

    def q(*shape):
        return torch.randint(-128, 128, shape, dtype=torch.int8, device=dev)

    x, w = q(37, 208), q(75, 208)
    reason = ni.device_reason(x, w)
    if reason is not None:
        print(f"sanitize: int8 kernels skipped ({reason})")
        return
    for m in (1, 37):
        for out_dtype in (torch.float32, torch.float16, torch.bfloat16):
            bias = torch.randn(75, device=dev).to(out_dtype) if m == 1 else None
            xs, ws = torch.rand(m, device=dev), torch.rand(75, device=dev)
            ni.w8a8_linear(x[:m], xs, w, ws, bias, out_dtype)
    for dtype in (torch.float16, torch.bfloat16):
        for m in (1, 9, 17, 64):
            xa = torch.randn(m, 1040, device=dev).to(dtype)
            wa, ws = q(75, 1040), torch.rand(75, device=dev)
            for splits in (1, 3):
                ni.w8a16_linear(xa, wa, ws, torch.randn(75, device=dev), splits=splits)


def _sparse_kernels(dev: str) -> None:
    """The CUDA 2:4 kernel through its launcher: both tile shapes, partial tiles in M
    and N, split-K."""
    from fastllm.native import sparse as ns
    from fastllm.sparse.format import compress_24

    for dtype in (torch.float16, torch.bfloat16):
        w = torch.randn(75, 192, device=dev).to(dtype)
        w.view(75, 48, 4)[..., 1::2] = 0
        values, meta = compress_24(w)
        reason = ns.supports_sparse24(torch.randn(3, 192, device=dev).to(dtype), values, meta)
        if reason is not None:
            print(f"sanitize: sparse kernels skipped ({reason})")
            return
        for m, splits in ((1, 1), (5, 3), (33, 1)):
            xs = torch.randn(m, 192, device=dev).to(dtype)
            ns.sparse24_linear(xs, values, meta, torch.randn(75, device=dev), splits=splits)


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    dev = "cuda"
    with fastllm.use_backend("cuda"):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for shape in [(1, 1), (3, 17), (5, 4097), (2, 3, 129)]:
                fastllm.ops.quantize_per_token(torch.randn(shape, device=dev).to(dtype))
    _attention_kernels(dev)
    _int8_kernels(dev)
    _sparse_kernels(dev)
    torch.cuda.synchronize()
    print("sanitize: all CUDA kernels called")


if __name__ == "__main__":
    main()
