"""Reference for int8 quantization."""

import torch


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row of the last dimension.

    scale = amax(|row|) / 127, q = clamp(round(x / scale), -127, 127), round half to
    even. A row whose scale would be 0 (all zeros) gets scale 1 and quantizes to 0.
    Computes in float32 (float64 for float64 input); scale has shape x.shape[:-1].
    """
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(compute)
    if x.shape[-1] == 0:
        amax = torch.zeros(x.shape[:-1], dtype=compute, device=x.device)
    else:
        amax = xf.abs().amax(dim=-1)
    scale = amax / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(xf / scale.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return q, scale
