"""Test-time artefacts a person reads: per-class accuracy and a confusion-matrix picture."""

from __future__ import annotations

import csv
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
    n = confusion.shape[0]
    rates = confusion.float() / confusion.sum(dim=1, keepdim=True).clamp(min=1)
    label_width = 7 * max((len(name) for name in class_names), default=1) + 8
    size = (label_width + n * cell + 2, 24 + n * cell + 2)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.text((4, 4), "true class (rows) vs predicted (columns), row-normalised", fill="black")
    for i in range(n):
        draw.text((4, 24 + i * cell - 1), class_names[i][:40], fill="black")
        for j in range(n):
            shade = int(255 * (1 - float(rates[i, j])))
            color = (shade, shade, 255) if i == j else (255, shade, shade)
            x, y = label_width + j * cell, 24 + i * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=color)
    return image
