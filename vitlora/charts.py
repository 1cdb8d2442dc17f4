"""Report charts drawn with matplotlib (off-screen, never pyplot): bars, labelled points, lines and heatmaps.

Each function returns an RGB image for a report; missing values (None) are shown as "n/a".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:  # matplotlib loads on the first chart: `vitlora inspect` without --plot never pays for it
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

SIZE = (800, 500)  # pixels of the bar, scatter and line charts
DPI = 100


def color(index: int) -> str:
    """Matplotlib's default cycle: the same colour for the same method in every chart."""
    return f"C{index % 10}"


def new_figure(size: tuple[float, float] = SIZE) -> Figure:
    """A figure of ``size`` pixels, drawn by the Agg canvas (no display, no global pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def figure_image(figure: Figure) -> Image.Image:
    """The rendered figure as an RGB image."""
    figure.canvas.draw()
    return Image.fromarray(np.asarray(figure.canvas.buffer_rgba())[..., :3].copy())


def bar_chart(title: str, labels: Sequence[str], values: Sequence[float | None], unit: str) -> Image.Image:
    """One bar per label, from zero, with its value written above it."""
    figure = new_figure()
    axes = figure.add_subplot()
    heights = [value or 0.0 for value in values]
    bars = axes.bar(range(len(labels)), heights, color=[color(i) for i in range(len(labels))], width=0.6)
    axes.bar_label(bars, labels=[_format(v) if v is not None else "n/a" for v in values], padding=3)
    axes.set_xticks(range(len(labels)), labels)
    axes.set_title(title)
    axes.set_ylabel(unit)
    axes.margins(y=0.12)
    axes.grid(axis="y", alpha=0.3)
    return figure_image(figure)


def scatter_chart(
    title: str,
    points: Sequence[tuple[str, float, float]],
    x_label: str,
    y_label: str,
    log_x: bool = False,
    y_errors: Sequence[float | None] | None = None,
    min_y_span: float = 0.0,
) -> Image.Image:
    """Labelled points ``(label, x, y)``; ``log_x`` for quantities spanning decades (parameter counts).

    ``y_errors`` draws a bar of plus/minus that much through each point (e.g. the spread over folds),
    and ``min_y_span`` keeps the y axis at least that tall, so that points closer than the noise do not
    fill the whole height and look far apart. Labels that would overlap are moved apart vertically."""
    figure = new_figure()
    axes = figure.add_subplot()
    for i, (_, x, y) in enumerate(points):
        axes.scatter([x], [y], s=60, color=color(i), zorder=3)
        if y_errors and y_errors[i]:
            axes.errorbar([x], [y], yerr=[y_errors[i]], color=color(i), capsize=5, zorder=2)
    if log_x:
        axes.set_xscale("log")
    axes.set_title(title)
    axes.set_xlabel(x_label)
    axes.set_ylabel(y_label)
    axes.grid(alpha=0.3)
    axes.margins(x=0.25, y=0.2)
    low, high = axes.get_ylim()
    if high - low < min_y_span:
        middle = (low + high) / 2
        axes.set_ylim(middle - min_y_span / 2, middle + min_y_span / 2)
    _place_labels(figure, axes, points)
    return figure_image(figure)


def _place_labels(figure: Figure, axes: Axes, points: Sequence[tuple[str, float, float]]) -> None:
    """Writes each label right of its point, pushed down in 14-point steps until it overlaps no earlier one."""
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    placed = []
    for label, x, y in sorted(points, key=lambda p: -p[2]):
        for shift in range(0, 40):
            offset = (8, -14 * (shift // 2) if shift % 2 == 0 else 14 * ((shift + 1) // 2))
            text = axes.annotate(label, (x, y), xytext=offset, textcoords="offset points", va="center")
            box = text.get_window_extent(renderer).expanded(1.05, 1.1)
            if not any(box.overlaps(other) for other in placed):
                placed.append(box)
                break
            text.remove()


def line_chart(
    title: str, series: Mapping[str, Sequence[tuple[float, float]]], x_label: str, y_label: str
) -> Image.Image:
    """One line with dots per series, and a legend of series names."""
    figure = new_figure()
    axes = figure.add_subplot()
    for i, (name, points) in enumerate(series.items()):
        xs, ys = zip(*sorted(points), strict=True) if points else ((), ())
        axes.plot(xs, ys, marker="o", markersize=4, color=color(i), label=name)
    axes.set_title(title)
    axes.set_xlabel(x_label)
    axes.set_ylabel(y_label)
    axes.grid(alpha=0.3)
    if series:
        axes.legend()
    return figure_image(figure)


def draw_heatmap(
    figure: Figure,
    axes: Axes,
    values: torch.Tensor,
    row_labels: Sequence[str],
    column_labels: Sequence[str] = (),
    scale_label: str = "",
    vmax: float | None = None,
    font_size: float = 10,
) -> None:
    """Shaded cells with a colour bar; NaN cells are grey. Labels name every row and column."""
    data = np.ma.masked_invalid(values.float().numpy())
    cmap = _heat_cmap()
    image = axes.imshow(data, cmap=cmap, vmin=0.0, vmax=vmax, aspect="auto", interpolation="nearest")
    axes.set_yticks(range(len(row_labels)), list(row_labels), fontsize=font_size)
    if column_labels:
        upright = max(len(label) for label in column_labels) > 4
        axes.set_xticks(range(len(column_labels)), list(column_labels), fontsize=font_size, rotation=90 * upright)
    else:
        axes.set_xticks([])
    colorbar = figure.colorbar(image, ax=axes, fraction=0.04, pad=0.02)
    colorbar.set_label(scale_label)


def _heat_cmap():
    from matplotlib import colormaps

    return colormaps["viridis"].with_extremes(bad="lightgrey")


def heatmap_image(
    values: torch.Tensor,
    title: str,
    row_labels: Sequence[str],
    column_labels: Sequence[str] = (),
    scale_label: str = "",
    cell: int = 28,
) -> Image.Image:
    """A labelled heatmap with a colour bar; ``cell`` pixels per row and column (at least 640 x 360 in all)."""
    rows, columns = values.shape
    label_room = 8 * max((len(label) for label in row_labels), default=4)
    width = max(640, label_room + columns * cell + 200)
    height = max(360, rows * cell + 8 * max((len(label) for label in column_labels), default=0) + 120)
    figure = new_figure((width, height))
    axes = figure.add_subplot()
    draw_heatmap(figure, axes, values, row_labels, column_labels, scale_label)
    axes.set_title(title, wrap=True)
    return figure_image(figure)


def _format(value: float) -> str:
    """Short value labels: 1.2M, 34k, 0.25, 87.5."""
    magnitude = abs(value)
    for limit, unit, suffix in ((1e9, 1e9, "G"), (1e6, 1e6, "M"), (1e4, 1e3, "k")):
        if magnitude >= limit:
            return f"{value / unit:.3g}{suffix}"
    return f"{value:.3g}" if magnitude < 100 else f"{value:.0f}"
