"""Explanations of one model's predictions, adapted and with its update switched off, side by side.

"The update switched off" is the frozen base with the adapter's head: every change the adapter
makes inside the trunk (LoRA/DoRA updates, prompt tokens) is off, the classifier stays, so both
maps explain the same class with the same head. The difference map then shows where the adapter
moved the evidence for that class.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from vitlora.explain.attribution import attribute_patches, patch_size
from vitlora.lora import lora_disabled
from vitlora.prompts import prompts_disabled
from vitlora.trainable import bias_tuning_enabled

TOP_SHARE = 0.10  # the summary's "top patches": this fraction of the grid


@contextmanager
def update_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` as its frozen base with its own head for the duration: LoRA/DoRA updates and prompt tokens off.

    Raises:
        ValueError: for a bias-tuned model, whose tuned biases replaced the base's own: pass a separately
            built base (see :func:`with_heads_of`) instead.
    """
    if bias_tuning_enabled(model):
        raise ValueError(
            "the model's biases are tuned and the base's own biases are gone: build the base separately "
            "(vitlora.adapter.build_base) and give it the adapter's head with with_heads_of."
        )
    with ExitStack() as stack:
        stack.enter_context(lora_disabled(model))
        stack.enter_context(prompts_disabled(model))
        yield model


def with_heads_of(base: nn.Module, adapted: nn.Module) -> nn.Module:
    """``base`` (a plain timm model of the same architecture) with ``adapted``'s classifier head(s), in eval mode."""
    from vitlora.apply import reset_classifier_like
    from vitlora.targets import classifier_prefixes

    if getattr(base, "num_classes", None) != adapted.num_classes:
        reset_classifier_like(base, adapted.num_classes)
    heads = {k: v for k, v in adapted.state_dict().items() if k.startswith(classifier_prefixes(adapted))}
    missing = base.load_state_dict(heads, strict=False).unexpected_keys
    if missing:
        raise ValueError(f"the base has no place for the adapter's head tensors {missing[:3]}.")
    return base.eval()


@dataclass(frozen=True)
class MapSummary:
    """Numbers of one signed patch map (positive: the patch raises the class's probability).

    ``top_share``: the share of the positive attribution inside the top 10% of patches (1.0: all of it
    there; 0.1: spread evenly). ``positive_share``: positive mass over all absolute mass. ``peak``:
    (row, column) of the highest patch. ``total``: the signed sum, in probability units.
    """

    top_share: float
    positive_share: float
    peak: tuple[int, int]
    total: float


def summarize_map(patch_map: torch.Tensor) -> MapSummary:
    values = patch_map.flatten().double()
    positive = values.clamp(min=0)
    top = positive.topk(max(1, math.ceil(TOP_SHARE * values.numel()))).values.sum()
    mass = values.abs().sum()
    peak = int(values.argmax())
    return MapSummary(
        top_share=float(top / positive.sum()) if positive.sum() > 0 else 0.0,
        positive_share=float(positive.sum() / mass) if mass > 0 else 0.0,
        peak=(peak // patch_map.shape[-1], peak % patch_map.shape[-1]),
        total=float(values.sum()),
    )


def map_correlation(first: torch.Tensor, second: torch.Tensor) -> float | None:
    """Pearson correlation of two maps over patches; None when one of them is flat."""
    a, b = first.flatten().double(), second.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    scale = a.norm() * b.norm()
    return float(a @ b / scale) if scale > 0 else None


@dataclass
class Explanation:
    """One image explained with one method: the target class, both models' predictions and maps.

    ``image`` is what the model saw (``H x W x 3`` uint8, after resizing and cropping); the maps are
    ``rows x cols`` on the patch grid, signed, in probability units.
    """

    name: str
    method: str
    target: int
    target_name: str
    target_named: bool  # given by the caller rather than the adapted model's prediction
    image: np.ndarray
    patch_size: tuple[int, int]
    adapted_map: torch.Tensor
    base_map: torch.Tensor
    adapted_probabilities: torch.Tensor
    base_probabilities: torch.Tensor
    class_names: list[str] = field(repr=False)

    @property
    def adapted_summary(self) -> MapSummary:
        return summarize_map(self.adapted_map)

    @property
    def base_summary(self) -> MapSummary:
        return summarize_map(self.base_map)

    @property
    def correlation(self) -> float | None:
        return map_correlation(self.adapted_map, self.base_map)

    def top_k(self, k: int, base: bool = False) -> list[tuple[str, float]]:
        probabilities = self.base_probabilities if base else self.adapted_probabilities
        values, indices = probabilities.topk(min(k, probabilities.numel()))
        return [(self.class_names[i], float(v)) for v, i in zip(values.tolist(), indices.tolist(), strict=True)]

    def record(self, top_k: int = 5) -> dict:
        """The numbers, as one JSON-ready mapping (CSV and JSON files; serving)."""
        adapted, base = self.adapted_summary, self.base_summary
        return {
            "image": self.name,
            "method": self.method,
            "target_class": self.target_name,
            "target_source": "named" if self.target_named else "predicted",
            "adapted_probability": round(float(self.adapted_probabilities[self.target]), 6),
            "base_probability": round(float(self.base_probabilities[self.target]), 6),
            "adapted_top_k": [[name, round(p, 6)] for name, p in self.top_k(top_k)],
            "base_top_k": [[name, round(p, 6)] for name, p in self.top_k(top_k, base=True)],
            "adapted_top10_share": round(adapted.top_share, 4),
            "base_top10_share": round(base.top_share, 4),
            "adapted_positive_share": round(adapted.positive_share, 4),
            "base_positive_share": round(base.positive_share, 4),
            "adapted_peak": list(adapted.peak),
            "base_peak": list(base.peak),
            "adapted_total": round(adapted.total, 6),
            "base_total": round(base.total, 6),
            "map_correlation": None if self.correlation is None else round(self.correlation, 4),
            "grid": list(self.adapted_map.shape),
            "adapted_map": [[round(v, 6) for v in row] for row in self.adapted_map.tolist()],
            "base_map": [[round(v, 6) for v in row] for row in self.base_map.tolist()],
        }


def display_images(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> list[np.ndarray]:
    """Normalised ``B x 3 x H x W`` pixels back to what a person sees: ``H x W x 3`` uint8 each."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    images = (pixels.detach().float().cpu() * std_t + mean_t).clamp(0, 1).mul(255).round().to(torch.uint8)
    return list(images.permute(0, 2, 3, 1).numpy())


def explain_pixels(
    model: nn.Module,
    pixels: torch.Tensor,
    *,
    names: Sequence[str],
    class_names: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    methods: Sequence[str] = ("integrated-gradients",),
    targets: torch.Tensor | None = None,
    base: nn.Module | None = None,
    steps: int = 32,
    batch_size: int = 32,
) -> list[Explanation]:
    """Explains a batch with each method, adapted and with the update switched off.

    Args:
        model: the adapted eval-mode model.
        pixels: ``B x 3 x H x W`` normalised images, as the model's eval transform makes them.
        names: one label per image (its file name) for the sheets and tables.
        class_names: one name per class of the model.
        mean: the normalisation mean (to show the images).
        std: the normalisation std.
        methods: attribution methods (see :data:`vitlora.explain.attribution.METHODS`).
        targets: ``B`` classes to explain; None: each image's class predicted by the adapted model.
        base: the frozen base with the adapter's head; None: ``model`` under :func:`update_disabled`.
        steps: Integrated Gradients' path steps.
        batch_size: images per forward pass inside the methods.

    Returns:
        One :class:`Explanation` per image and method, images outermost.

    Raises:
        ValueError: for an unknown method, mismatched lengths, or a bias-tuned model without ``base``.
    """
    if len(names) != len(pixels) or (targets is not None and len(targets) != len(pixels)):
        raise ValueError(
            f"got {len(pixels)} images for {len(names)} names and {0 if targets is None else len(targets)} targets."
        )
    with torch.no_grad():
        adapted_probabilities = model(pixels).softmax(-1).float().cpu()
        with frozen_base(model, base) as frozen:
            base_probabilities = frozen(pixels).softmax(-1).float().cpu()
    named = targets is not None
    targets = (targets if named else adapted_probabilities.argmax(-1)).to(pixels.device)
    maps = {}
    for method in methods:
        adapted_maps = attribute_patches(model, pixels, targets, method, steps=steps, batch_size=batch_size)
        with frozen_base(model, base) as frozen:
            base_maps = attribute_patches(frozen, pixels, targets, method, steps=steps, batch_size=batch_size)
        maps[method] = adapted_maps.float().cpu(), base_maps.float().cpu()
    images, patch = display_images(pixels, mean, std), patch_size(model)
    return [
        Explanation(
            name=names[i],
            method=method,
            target=int(targets[i]),
            target_name=class_names[int(targets[i])],
            target_named=named,
            image=images[i],
            patch_size=patch,
            adapted_map=maps[method][0][i],
            base_map=maps[method][1][i],
            adapted_probabilities=adapted_probabilities[i],
            base_probabilities=base_probabilities[i],
            class_names=list(class_names),
        )
        for i in range(len(pixels))
        for method in methods
    ]


def frozen_base(model: nn.Module, base: nn.Module | None) -> AbstractContextManager[nn.Module]:
    """``base`` when given, else ``model`` under :func:`update_disabled`."""
    return update_disabled(model) if base is None else nullcontext(base)
