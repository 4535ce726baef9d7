"""Small calls of every CUDA kernel, for `compute-sanitizer --tool memcheck`
(run by bench/gpu_check.sh). Odd sizes, so that tile edges are exercised."""

import torch

import fastllm


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    dev = "cuda"
    with fastllm.use_backend("cuda"):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for shape in [(1, 1), (3, 17), (5, 4097), (2, 3, 129)]:
                fastllm.ops.quantize_per_token(torch.randn(shape, device=dev).to(dtype))
    torch.cuda.synchronize()
    print("sanitize: all CUDA kernels called")


if __name__ == "__main__":
    main()
