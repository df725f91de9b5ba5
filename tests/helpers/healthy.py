"""Give randomly initialized models healthy activations before an oracle test.

torchvision's ``weights=None`` models often produce near-zero or constant
outputs (docs/oracle.md, "A degenerate reference"); any comparison passes on those. This module
re-initializes all-zero weights and recalibrates BatchNorm statistics on random
batches in train mode.
"""

from __future__ import annotations

import torch
from torch import nn


def make_healthy(model: nn.Module, input_shape, *, batches: int = 2, batch_size: int = 4,
                 seed: int = 0) -> nn.Module:
    """Modify ``model`` in place (a test fixture, not library code) and return it in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            tiny_constant = p.numel() > 1 and bool((p == p.flatten()[0]).all()) and float(p.abs().max()) < 1e-3
            if tiny_constant and not name.endswith("bias"):  # e.g. ConvNeXt's layer scale of 1e-6
                p.uniform_(0.5, 1.5, generator=gen)
            elif p.numel() and bool((p == 0).all()):
                if name.endswith("bias"):
                    p.normal_(0.0, 0.1, generator=gen)
                else:
                    p.normal_(1.0 if p.ndim == 1 else 0.0, 0.2 if p.ndim == 1 else 0.05, generator=gen)
            elif p.ndim == 1 and name.endswith("weight"):  # norm scales: make channels distinct
                p.mul_(1.0 + 0.5 * torch.rand(p.shape, generator=gen))
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the calibration batches
        if bns:
            model.train()
            shape = (batch_size, *tuple(input_shape)[1:])
            for _ in range(batches):
                model(torch.randn(shape, generator=gen))
    return model.eval()
