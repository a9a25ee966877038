"""Pruning masks that survive later training: the trainer re-applies them after every optimizer step."""

from __future__ import annotations

import torch
from torch import nn

_ATTRIBUTE = "_potstill_masks"


def attach_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    existing = dict(getattr(model, _ATTRIBUTE, {}))
    existing.update({name: mask.bool() for name, mask in masks.items()})
    object.__setattr__(model, _ATTRIBUTE, existing)
    apply_masks(model)


def masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return getattr(model, _ATTRIBUTE, {})


@torch.no_grad()
def apply_masks(model: nn.Module) -> None:
    parameters = dict(model.named_parameters())
    for name, mask in masks(model).items():
        parameters[name].mul_(mask.to(parameters[name].dtype))


def sparsity(model: nn.Module, names: list[str] | None = None) -> float:
    parameters = dict(model.named_parameters())
    chosen = [parameters[n] for n in (names if names is not None else parameters)]
    total = sum(p.numel() for p in chosen)
    zeros = sum(int((p == 0).sum()) for p in chosen)
    return zeros / max(1, total)
