"""A moving average of the trained weights only: weight EMA at the size of the adapter.

Averaging the weights over the last few hundred steps smooths out the noise of the final ones.
Whole-model EMA (timm's ``ModelEmaV3``, Lightning's ``EMAWeightAveraging``) keeps a second copy
of every weight, the frozen base included; a LoRA run only changes its adapter and head, so only
those are averaged here: for ViT-Ti r=8 that is 89 k numbers, not 5.6 M.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def ema_decay_at(decay: float, step: int) -> float:
    """The decay after ``step`` optimizer steps: ramped up from 0.1 (``(1 + step) / (10 + step)``),
    so the first steps, far from the trained weights, fade out quickly."""
    return min(decay, (1 + step) / (10 + step))


class TrainableAverage(nn.Module):
    """An exponential moving average of named parameters, kept as buffers beside them (they move
    with the module to its device; not persistent: checkpoints store them where the module says)."""

    def __init__(self, parameters: Iterable[tuple[str, nn.Parameter]], decay: float) -> None:
        super().__init__()
        if not 0 < decay < 1:
            raise ValueError(f"ema_decay must lie strictly between 0 and 1 (0.998 is typical), got {decay}.")
        self.decay = decay
        self.parameters_by_name = dict(parameters)  # the live tensors, not registered here
        self.swapped = False  # True while the parameters hold the averages (and the buffers the trained weights)
        for index, parameter in enumerate(self.parameters_by_name.values()):
            self.register_buffer(f"average_{index}", parameter.detach().clone(), persistent=False)

    def averages(self) -> dict[str, torch.Tensor]:
        """Name -> averaged tensor (the buffers themselves)."""
        return {name: getattr(self, f"average_{i}") for i, name in enumerate(self.parameters_by_name)}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Folds the parameters in after optimizer step ``step`` (1 for the first)."""
        weight = 1 - ema_decay_at(self.decay, step - 1)
        for average, parameter in zip(self.averages().values(), self.parameters_by_name.values(), strict=True):
            average.lerp_(parameter.detach().to(average.dtype), weight)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchanges the parameters and their averages (twice restores both)."""
        for average, parameter in zip(self.averages().values(), self.parameters_by_name.values(), strict=True):
            trained = parameter.detach().clone()
            parameter.copy_(average)
            average.copy_(trained)
        self.swapped = not self.swapped

    def trained_and_averaged(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Name -> trained tensor and name -> average, wherever each lives now (swapped or not)."""
        live = {name: parameter.detach() for name, parameter in self.parameters_by_name.items()}
        return (self.averages(), live) if self.swapped else (live, self.averages())

    @torch.no_grad()
    def load(self, averages: dict[str, torch.Tensor]) -> None:
        for name, average in self.averages().items():
            average.copy_(averages[name])
