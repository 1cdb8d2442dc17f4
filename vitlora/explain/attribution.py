"""Patch attribution maps from captum: how much each image patch raises one class's probability.

Both methods explain the same quantity, the softmax probability of the target class, against the
same reference, an all-zero input (the normalisation mean, a flat grey): Integrated Gradients
(gradient-based, Sundararajan et al. 2017) integrates the gradient along the straight path from
the reference to the image; occlusion (perturbation-based) replaces one patch at a time by the
reference and records the drop. Both work on pixels through the model's forward pass only, so
every timm family (class token, average pooling, attention pool, register tokens, distilled
heads, rotary EVA) needs no per-family code. Maps come back on the model's patch grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from captum.attr import FeatureAblation, IntegratedGradients
from torch import nn

METHODS = ("integrated-gradients", "occlusion")


def patch_size(model: nn.Module) -> tuple[int, int]:
    """The (height, width) in pixels of the model's patches."""
    size = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if size is None:
        raise ValueError(f"{type(model).__name__} has no patch_embed.patch_size: only patch-based ViTs are explained.")
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def patch_index(model: nn.Module, height: int, width: int) -> torch.Tensor:
    """``height x width``: the patch (row-major on the grid) each pixel belongs to.

    Pixels past the last whole patch (an image size that is no multiple of the patch) join the
    last row or column of patches."""
    patch_h, patch_w = patch_size(model)
    rows, cols = max(height // patch_h, 1), max(width // patch_w, 1)
    row = (torch.arange(height) // patch_h).clamp(max=rows - 1)
    col = (torch.arange(width) // patch_w).clamp(max=cols - 1)
    return row[:, None] * cols + col[None, :]


def grid_shape(model: nn.Module, pixels: torch.Tensor) -> tuple[int, int]:
    patch_h, patch_w = patch_size(model)
    return max(pixels.shape[-2] // patch_h, 1), max(pixels.shape[-1] // patch_w, 1)


def class_probabilities(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function attributions explain: images to softmax probabilities."""
    return lambda images: model(images).softmax(-1)


def attribute_patches(
    model: nn.Module,
    pixels: torch.Tensor,
    targets: torch.Tensor,
    method: str = "integrated-gradients",
    *,
    steps: int = 32,
    window: int = 1,
    batch_size: int = 32,
) -> torch.Tensor:
    """Signed per-patch attributions of each image's target-class probability.

    Args:
        model: an eval-mode classifier over normalised pixels.
        pixels: ``B x 3 x H x W`` normalised images.
        targets: ``B`` class indices to explain.
        method: one of :data:`METHODS`.
        steps: Integrated Gradients' path steps (ignored by occlusion).
        window: occlusion removes squares of ``window x window`` patches together (fewer, coarser
            perturbations: ``window**2`` times faster); every patch of a square gets the square's drop.
        batch_size: images per forward pass inside the method.

    Returns:
        ``B x rows x cols`` on the patch grid, in probability units: positive where a patch raises the
        target's probability. Integrated Gradients' map sums to about p(image) - p(grey image);
        occlusion's entries are each patch's own drop in probability.

    Raises:
        ValueError: for an unknown method or a model without patches.
    """
    if method not in METHODS:
        raise ValueError(f"unknown attribution method {method!r}: choose one of {', '.join(METHODS)}.")
    index = patch_index(model, pixels.shape[-2], pixels.shape[-1]).to(pixels.device)
    rows, cols = grid_shape(model, pixels)
    forward = class_probabilities(model)
    targets = targets.tolist()
    with torch.enable_grad():
        if method == "integrated-gradients":
            attribution = IntegratedGradients(forward).attribute(
                pixels, baselines=0.0, target=targets, n_steps=steps, internal_batch_size=batch_size
            )
            per_pixel, reduce = attribution.sum(1), "sum"  # a patch's share is the sum of its pixels' shares
        else:
            squares = (index // cols // window) * math.ceil(cols / window) + index % cols // window
            attribution = FeatureAblation(forward).attribute(
                pixels,
                baselines=0.0,
                target=targets,
                feature_mask=squares[None, None],
                perturbations_per_eval=batch_size,
            )
            per_pixel, reduce = attribution[:, 0], "mean"  # every pixel of a patch carries the patch's drop
    flat = index.flatten().expand(pixels.shape[0], -1)
    grid = torch.zeros(pixels.shape[0], rows * cols, dtype=per_pixel.dtype, device=per_pixel.device)
    grid = grid.scatter_reduce(1, flat, per_pixel.flatten(1).detach(), reduce=reduce, include_self=False)
    return grid.view(-1, rows, cols)
