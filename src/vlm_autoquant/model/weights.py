"""Copies of a loaded model that share its weight tensors."""

from __future__ import annotations

import copy

import torch


def sharing_weights(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` whose parameters and buffers are the original's own tensors.

    ModelOpt's fake quantization never writes the weights: a search adds quantizer modules
    beside them and reads them (the gradient searcher toggles `requires_grad` and restores it).
    So a family can be searched on this copy without a second copy of the weights on the GPU,
    and the original stays pristine for the next family.
    """
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)
