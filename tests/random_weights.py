"""Random weights for parity tests: O(1) activations through many layers."""
import math

import torch


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int, scale: float = 1.5) -> None:
    """Fan-in scaled matrices (std scale / sqrt(fan_in)), norm weights around 1."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.dim() == 1:
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(torch.randn(p.shape, generator=g) * scale / math.sqrt(p.shape[1]))
