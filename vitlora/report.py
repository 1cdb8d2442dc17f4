"""Artefacts a person reads: per-class accuracy, and heatmap pictures (the confusion matrix, LoRA updates)."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from vitlora.files import atomic_write


def write_test_report(folder: Path, class_names: list[str], per_class: torch.Tensor, confusion: torch.Tensor) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    support = confusion.sum(dim=1)
    with (
        atomic_write(folder / "per_class_accuracy.csv") as tmp,
        open(tmp, "w", newline="") as handle,
    ):
        writer = csv.writer(handle)
        writer.writerow(["class", "accuracy", "support"])
        for name, accuracy, count in zip(class_names, per_class.tolist(), support.tolist(), strict=True):
            writer.writerow([name, f"{accuracy:.4f}" if count else "", int(count)])
    with atomic_write(folder / "confusion_matrix.png") as tmp:
        confusion_image(confusion, class_names).save(tmp, format="PNG")


def confusion_image(confusion: torch.Tensor, class_names: list[str], cell: int = 10) -> Image.Image:
    """Rows are true classes, columns predictions; shade is the row-normalised rate."""
    rates = confusion.float() / confusion.sum(dim=1, keepdim=True).clamp(min=1)
    title = "true class (rows) vs predicted (columns), row-normalised"
    return heatmap_image(rates, title, class_names, cell=cell, highlight_diagonal=True)


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
