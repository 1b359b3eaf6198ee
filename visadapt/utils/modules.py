"""Small facts about torch modules that every task reports."""

from __future__ import annotations

import torch.nn as nn


def trainable_parameters(model: nn.Module) -> int:
    """How many parameters ``model`` trains (``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
