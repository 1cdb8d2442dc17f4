"""Deletion and insertion curves (Petsiuk et al., RISE, 2018): is a map faithful to the model?

Deletion replaces the patches a map ranks first by the reference (the normalisation mean, as the
attributions use) and follows the target-class probability as more patches go; a faithful map
makes it fall fast (a low area under the curve). Insertion starts from the reference image and
puts the top-ranked patches back first; a faithful map makes it rise fast (a high area). A random
patch order is the baseline every map must beat.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vitlora.explain.attribution import patch_index


@dataclass(frozen=True)
class Curves:
    """The target's probability after removing (deletion) or restoring (insertion) each fraction of patches."""

    fractions: torch.Tensor
    deletion: torch.Tensor
    insertion: torch.Tensor

    @property
    def deletion_auc(self) -> float:
        return float(torch.trapezoid(self.deletion, self.fractions))

    @property
    def insertion_auc(self) -> float:
        return float(torch.trapezoid(self.insertion, self.fractions))


def most_attributed_first(patch_map: torch.Tensor) -> torch.Tensor:
    """Patch indices (row-major) from the highest attribution to the lowest."""
    return patch_map.flatten().argsort(descending=True, stable=True)


def random_order(patches: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randperm(patches, generator=generator)


@torch.no_grad()
def perturbation_curves(
    model: nn.Module,
    pixels: torch.Tensor,
    target: int,
    order: torch.Tensor,
    *,
    steps: int = 16,
    batch_size: int = 34,
) -> Curves:
    """Deletion and insertion curves of one image for a patch order.

    Args:
        model: an eval-mode classifier over normalised pixels.
        pixels: one ``3 x H x W`` normalised image.
        target: the class whose probability is followed.
        order: every patch index (row-major on the model's grid), the first to be deleted / inserted first.
        steps: points after the start (at least 1); each moves about ``patches / steps`` patches.
        batch_size: images per forward pass.

    Returns:
        :class:`Curves` at fractions ``0, 1/steps, ..., 1`` of the patches.
    """
    index = patch_index(model, pixels.shape[-2], pixels.shape[-1]).to(pixels.device)
    patches = int(index.max()) + 1
    if sorted(order.tolist()) != list(range(patches)):
        raise ValueError(f"order must list each of the {patches} patches once.")
    rank = torch.empty(patches, dtype=torch.long, device=pixels.device)
    rank[order.to(pixels.device)] = torch.arange(patches, device=pixels.device)
    counts = torch.linspace(0, patches, steps + 1, device=pixels.device).round().long()
    moved = (rank[index][None] < counts[1:-1, None, None])[:, None]  # the steps - 1 inner points
    reference = torch.zeros_like(pixels)
    images = torch.cat(
        [pixels[None], reference[None], torch.where(moved, reference, pixels), torch.where(moved, pixels, reference)]
    )
    probabilities = torch.cat([model(chunk).softmax(-1)[:, target] for chunk in images.split(batch_size)]).float().cpu()
    start, end, inner = probabilities[0:1], probabilities[1:2], probabilities[2:].view(2, steps - 1)
    deletion, insertion = torch.cat([start, inner[0], end]), torch.cat([end, inner[1], start])
    return Curves(counts.float().cpu() / patches, deletion, insertion)
