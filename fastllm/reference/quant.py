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


def quantize_per_channel(w: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per slice along `dim` (per output channel for a weight [N, K], dim=0).

    scale[c] = amax(|w| over every dimension but `dim`) / 127, q = clamp(round(w / scale),
    -127, 127) with scale broadcast along `dim`. A channel whose scale would be 0 gets
    scale 1 and quantizes to 0. Computes in float32 (float64 for float64 input); scale
    has shape (w.shape[dim],).
    """
    dim = dim % w.dim()
    compute = torch.float64 if w.dtype == torch.float64 else torch.float32
    wf = w.to(compute)
    others = [d for d in range(w.dim()) if d != dim]
    if w.numel() == 0:
        amax = torch.zeros(w.shape[dim], dtype=compute, device=w.device)
    else:
        amax = wf.abs().amax(dim=others) if others else wf.abs()
    scale = amax / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    shape = [1] * w.dim()
    shape[dim] = -1
    q = torch.round(wf / scale.view(shape)).clamp(-127, 127).to(torch.int8)
    return q, scale
