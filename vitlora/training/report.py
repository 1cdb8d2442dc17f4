"""What `vitlora test` leaves a person to read: per-class accuracy and the confusion matrix."""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from PIL import Image

from vitlora.charts import heatmap_image
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
