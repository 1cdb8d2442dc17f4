"""Small charts drawn with PIL alone (no plotting dependency): bars, labelled points, lines and heatmaps.

Each function returns an RGB image for a report; missing values (None) are shown as "n/a".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw

SIZE = (640, 400)
LEFT, TOP, RIGHT, BOTTOM = 64, 44, 24, 56  # plot margins in pixels
COLORS = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)  # fmt: skip
INK, GRID = (0, 0, 0), (225, 225, 225)


def color(index: int) -> tuple[int, int, int]:
    return COLORS[index % len(COLORS)]


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round values (1, 2, 2.5 or 5 times a power of ten apart) from <= low to >= high."""
    if not high > low:
        low, high = low - 0.5 * (abs(low) or 1), high + 0.5 * (abs(high) or 1)
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    first = math.floor(low / step + 1e-9) * step
    n = math.ceil((high - first) / step - 1e-9)
    return [round(first + i * step, 12) for i in range(n + 1)]


@dataclass(frozen=True)
class _Frame:
    """Maps data to pixels inside the plot margins; ``log_x`` plots log10 of x."""

    x_ticks: list[float]
    y_ticks: list[float]
    log_x: bool = False

    def x(self, value: float) -> float:
        low, high = self.x_ticks[0], self.x_ticks[-1]
        value = math.log10(value) if self.log_x else value
        return LEFT + (value - low) / (high - low) * (SIZE[0] - LEFT - RIGHT)

    def y(self, value: float) -> float:
        low, high = self.y_ticks[0], self.y_ticks[-1]
        return SIZE[1] - BOTTOM - (value - low) / (high - low) * (SIZE[1] - TOP - BOTTOM)


def _canvas(title: str, y_label: str) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", SIZE, "white")
    draw = ImageDraw.Draw(image)
    draw.text((SIZE[0] / 2, 14), title, fill=INK, anchor="mm")
    draw.text((8, TOP - 18), y_label, fill=INK)
    return image, draw


def _axes(draw: ImageDraw.ImageDraw, frame: _Frame, x_label: str, x_tick_labels: bool = True) -> None:
    bottom, right = SIZE[1] - BOTTOM, SIZE[0] - RIGHT
    for tick in frame.y_ticks:
        y = frame.y(tick)
        draw.line([(LEFT, y), (right, y)], fill=GRID)
        draw.text((LEFT - 6, y), _format(tick), fill=INK, anchor="rm")
    if x_tick_labels:
        for tick in frame.x_ticks:
            x = frame.x(10**tick if frame.log_x else tick)
            draw.line([(x, bottom), (x, bottom + 4)], fill=INK)
            draw.text((x, bottom + 8), _format(10**tick) if frame.log_x else _format(tick), fill=INK, anchor="mt")
    draw.line([(LEFT, TOP), (LEFT, bottom), (right, bottom)], fill=INK)
    draw.text(((LEFT + right) / 2, SIZE[1] - 12), x_label, fill=INK, anchor="mm")


def bar_chart(title: str, labels: Sequence[str], values: Sequence[float | None], unit: str) -> Image.Image:
    """One bar per label, from zero, with its value written above it."""
    image, draw = _canvas(title, unit)
    known = [v for v in values if v is not None]
    frame = _Frame([0.0, 1.0], nice_ticks(0.0, max(known, default=1.0) or 1.0))
    _axes(draw, frame, "", x_tick_labels=False)
    slot = (SIZE[0] - LEFT - RIGHT) / max(len(labels), 1)
    for i, (label, value) in enumerate(zip(labels, values, strict=True)):
        center = LEFT + (i + 0.5) * slot
        draw.text((center, SIZE[1] - BOTTOM + 8), label, fill=INK, anchor="mt")
        if value is None:
            draw.text((center, SIZE[1] - BOTTOM - 8), "n/a", fill=INK, anchor="mb")
            continue
        top = frame.y(value)
        draw.rectangle([center - 0.3 * slot, top, center + 0.3 * slot, frame.y(0.0)], fill=color(i))
        draw.text((center, top - 4), _format(value), fill=INK, anchor="mb")
    return image


def scatter_chart(
    title: str,
    points: Sequence[tuple[str, float, float]],
    x_label: str,
    y_label: str,
    log_x: bool = False,
) -> Image.Image:
    """Labelled points ``(label, x, y)``; ``log_x`` for quantities spanning decades (parameter counts)."""
    image, draw = _canvas(title, y_label)
    xs = [math.log10(x) if log_x else x for _, x, _ in points] or [0.0, 1.0]
    ys = [y for _, _, y in points] or [0.0, 1.0]
    if log_x:  # whole decades
        low = math.floor(min(xs))
        x_ticks = [float(t) for t in range(low, max(math.ceil(max(xs)), low + 1) + 1)]
    else:
        x_ticks = nice_ticks(min(xs), max(xs))
    frame = _Frame(x_ticks, nice_ticks(min(ys), max(ys)), log_x)
    _axes(draw, frame, x_label)
    for i, (label, x, y) in enumerate(points):
        cx, cy = frame.x(x), frame.y(y)
        draw.ellipse([cx - 5, cy - 5, cx + 5, cy + 5], fill=color(i))
        draw.text((cx + 8, cy), label, fill=INK, anchor="lm")
    return image


def line_chart(
    title: str, series: Mapping[str, Sequence[tuple[float, float]]], x_label: str, y_label: str
) -> Image.Image:
    """One line with dots per series, and a legend of series names."""
    image, draw = _canvas(title, y_label)
    xs = [x for points in series.values() for x, _ in points] or [0.0, 1.0]
    ys = [y for points in series.values() for _, y in points] or [0.0, 1.0]
    frame = _Frame(nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys)))
    _axes(draw, frame, x_label)
    for i, points in enumerate(series.values()):
        pixels = [(frame.x(x), frame.y(y)) for x, y in sorted(points)]
        if len(pixels) > 1:
            draw.line(pixels, fill=color(i), width=2)
        for px, py in pixels:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color(i))
    legend_x, legend_y = SIZE[0] - RIGHT, TOP - 13  # one row above the plot, right-aligned
    for i, name in reversed(list(enumerate(series))):
        legend_x -= draw.textlength(name) + 24
        draw.rectangle([legend_x, legend_y - 5, legend_x + 10, legend_y + 5], fill=color(i))
        draw.text((legend_x + 14, legend_y), name, fill=INK, anchor="lm")
    return image


def _format(value: float) -> str:
    """Short tick and value labels: 1.2M, 34k, 0.25, 87.5."""
    magnitude = abs(value)
    for limit, unit, suffix in ((1e9, 1e9, "G"), (1e6, 1e6, "M"), (1e4, 1e3, "k")):
        if magnitude >= limit:
            return f"{value / unit:.3g}{suffix}"
    return f"{value:.3g}" if magnitude < 100 else f"{value:.0f}"


def heatmap_image(
    values: torch.Tensor,
    title: str,
    row_labels: Sequence[str],
    column_labels: Sequence[str] = (),
    cell: int = 10,
    highlight_diagonal: bool = False,
) -> Image.Image:
    """A table of shaded cells, drawn with PIL alone so pictures need no plotting library.

    ``values`` in [0, 1] go from white to red (to blue on the diagonal when highlighted,
    the correct cells of a confusion matrix); NaN marks an empty cell, drawn grey.
    Columns widen to fit their labels, when given.
    """
    rows, columns = values.shape
    label_width = 7 * max((len(label) for label in row_labels), default=1) + 8
    width = max([cell, *(7 * len(label) + 4 for label in column_labels)])
    top = 24 + (14 if column_labels else 0)
    image = Image.new("RGB", (label_width + columns * width + 2, top + rows * cell + 2), "white")
    draw = ImageDraw.Draw(image)
    draw.text((4, 4), title, fill="black")
    for j, label in enumerate(column_labels):
        draw.text((label_width + j * width + 2, 22), label, fill="black")
    for i in range(rows):
        draw.text((4, top + i * cell - 1), row_labels[i][:40], fill="black")
        for j in range(columns):
            value = float(values[i, j])
            if math.isnan(value):
                color = (200, 200, 200)
            else:
                shade = round(255 * (1 - min(max(value, 0.0), 1.0)))
                color = (shade, shade, 255) if highlight_diagonal and i == j else (255, shade, shade)
            x, y = label_width + j * width, top + i * cell
            draw.rectangle([x, y, x + width - 1, y + cell - 1], fill=color)
    return image
