"""One PNG per image that a person reads at a glance: photo, adapted map, base map, their difference.

Each map is shown as each patch's share of the map's absolute attribution (in %), so the adapted
and base maps are comparable whatever their probabilities: red raises the explained class,
blue lowers it, and the colour fades out where a patch carries little. Both share one colour
scale; the difference (adapted minus base share) has its own diverging scale.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from vitlora.explain.core import Explanation

MAP_COLORS, DIFFERENCE_COLORS = "RdBu_r", "PuOr"
PANEL_INCHES = 3.0


def attribution_shares(patch_map: torch.Tensor) -> np.ndarray:
    """Each patch's signed share of the map's absolute attribution, in percent."""
    mass = float(patch_map.abs().sum())
    return (patch_map / mass * 100 if mass > 0 else torch.zeros_like(patch_map)).double().numpy()


def to_pixels(grid: np.ndarray, shape: tuple[int, int], patch: tuple[int, int]) -> np.ndarray:
    """A patch-grid map on the image's pixels: each pixel takes its patch's value (edge pixels the last patch's)."""
    rows, cols = grid.shape
    row = np.minimum(np.arange(shape[0]) // patch[0], rows - 1)
    col = np.minimum(np.arange(shape[1]) // patch[1], cols - 1)
    return grid[row[:, None], col[None, :]]


def colour_limit(values: np.ndarray) -> float:
    """The colour scale's end: the 98th percentile of ``|values|``, so a lone extreme patch does not fade all others."""
    return max(float(np.quantile(np.abs(values), 0.98)), 1e-9)


def overlay(image: np.ndarray, values: np.ndarray, limit: float, colors: str) -> np.ndarray:
    """``values`` in a diverging colormap over a faded grey photo; opacity grows with ``|value|``."""
    grey = image.astype(np.float64).mean(-1, keepdims=True) / 255.0
    background = 0.35 + 0.55 * grey
    strength = np.clip(np.abs(values) / limit, 0.0, 1.0)[..., None] if limit > 0 else np.zeros((*values.shape, 1))
    rgb = colormaps[colors](Normalize(-limit, limit)(values))[..., :3]
    return background * (1 - 0.85 * strength) + rgb * 0.85 * strength


def sheet_figure(explanations: Sequence[Explanation], top_k: int = 3) -> Figure:
    """One row per method of the same image: photo | adapted | update off | difference, top-k in the caption."""
    first = explanations[0]
    if any(e.name != first.name for e in explanations):
        raise ValueError("a sheet shows one image: got explanations of several.")
    rows = len(explanations)
    figure = Figure(figsize=(4 * PANEL_INCHES + 1.2, rows * (PANEL_INCHES + 0.2) + 1.2), layout="constrained")
    axes = figure.subplots(rows, 4, squeeze=False)
    for row, explanation in zip(axes, explanations, strict=True):
        _draw_row(figure, row, explanation)
    source = "named" if first.target_named else "predicted by the adapted model"
    figure.suptitle(f"{first.name}: where the evidence for '{first.target_name}' ({source}) lies", fontsize=12)
    figure.text(0.01, 0.005, _caption(first, top_k), fontsize=9, family="monospace", va="bottom")
    figure.get_layout_engine().set(rect=(0, 0.09 * 2 / rows, 1, 1 - 0.09 * 2 / rows))
    return figure


def _draw_row(figure: Figure, axes: Sequence, explanation: Explanation) -> None:
    image, patch = explanation.image, explanation.patch_size
    adapted, base = attribution_shares(explanation.adapted_map), attribution_shares(explanation.base_map)
    limit = colour_limit(np.concatenate([adapted.ravel(), base.ravel()]))
    difference = adapted - base
    difference_limit = colour_limit(difference)
    size = image.shape[:2]
    summary_a, summary_b = explanation.adapted_summary, explanation.base_summary
    target = explanation.target
    correlation = explanation.correlation
    panels = (
        (image, f"photo ({explanation.method})", None),
        (
            overlay(image, to_pixels(adapted, size, patch), limit, MAP_COLORS),
            f"adapted: p={explanation.adapted_probabilities[target]:.2f}, top-10% share {summary_a.top_share:.2f}",
            ScalarMappable(Normalize(-limit, limit), MAP_COLORS),
        ),
        (
            overlay(image, to_pixels(base, size, patch), limit, MAP_COLORS),
            f"update off (base + head): p={explanation.base_probabilities[target]:.2f}, top-10% share {summary_b.top_share:.2f}",
            ScalarMappable(Normalize(-limit, limit), MAP_COLORS),
        ),
        (
            overlay(image, to_pixels(difference, size, patch), difference_limit, DIFFERENCE_COLORS),
            "adapted - update off" + ("" if correlation is None else f" (map corr. {correlation:.2f})"),
            ScalarMappable(Normalize(-difference_limit, difference_limit), DIFFERENCE_COLORS),
        ),
    )
    for axis, (picture, title, scale) in zip(axes, panels, strict=True):
        axis.imshow(picture, interpolation="nearest")
        axis.set_title(title, fontsize=9)
        axis.set_xticks([])
        axis.set_yticks([])
        if scale is not None:
            label = "share of attribution, %" if scale.cmap.name == MAP_COLORS else "adapted - off, % points"
            figure.colorbar(scale, ax=axis, shrink=0.8, label=label, extend="both")


def _caption(explanation: Explanation, top_k: int) -> str:
    def ranked(base: bool) -> str:
        return "  ".join(f"{i + 1}. {name} {p:.1%}" for i, (name, p) in enumerate(explanation.top_k(top_k, base)))

    return (
        f"with the update: {ranked(False)}\nupdate off:      {ranked(True)}\n"
        "red raises the class, blue lowers it; difference: purple = more weight with the update, orange = less"
    )


def sheet_png(explanations: Sequence[Explanation], top_k: int = 3) -> bytes:
    """The sheet of one image's explanations as PNG bytes."""
    buffer = io.BytesIO()
    FigureCanvasAgg(sheet_figure(explanations, top_k)).print_png(buffer)
    return buffer.getvalue()
