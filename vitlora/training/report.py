"""What `vitlora test` leaves a person to read: per-class accuracy (also per coarse class, where the
classes have coarse ones) and the confusion matrix."""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from matplotlib.ticker import MaxNLocator
from PIL import Image

from vitlora.charts import draw_heatmap, figure_image, new_figure
from vitlora.files import atomic_write


def write_test_report(
    folder: Path,
    class_names: list[str],
    per_class: torch.Tensor,
    confusion: torch.Tensor,
    coarse_class_names: list[str] | None = None,
    fine_to_coarse: list[int] | None = None,
) -> None:
    """per_class_accuracy.csv and confusion_matrix.png; with coarse classes also
    coarse_per_class_accuracy.csv, each prediction mapped to its coarse class."""
    folder.mkdir(parents=True, exist_ok=True)
    write_per_class_accuracy(folder / "per_class_accuracy.csv", class_names, per_class, confusion.sum(dim=1))
    if fine_to_coarse is not None:
        coarse = coarse_confusion(confusion, fine_to_coarse, len(coarse_class_names))
        support = coarse.sum(dim=1)
        accuracy = coarse.diagonal() / support.clamp(min=1)
        write_per_class_accuracy(folder / "coarse_per_class_accuracy.csv", coarse_class_names, accuracy, support)
    with atomic_write(folder / "confusion_matrix.png") as tmp:
        confusion_image(confusion, class_names).save(tmp, format="PNG")


def write_per_class_accuracy(path: Path, class_names: list[str], accuracy: torch.Tensor, support: torch.Tensor) -> None:
    """``class,accuracy,support`` per class; the accuracy of a class without images is left empty."""
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["class", "accuracy", "support"])
        for name, value, count in zip(class_names, accuracy.tolist(), support.tolist(), strict=True):
            writer.writerow([name, f"{value:.4f}" if count else "", int(count)])


def coarse_confusion(confusion: torch.Tensor, fine_to_coarse: list[int], coarse_classes: int) -> torch.Tensor:
    """The confusion matrix between coarse classes: each fine cell added into the cell of its
    (true coarse, predicted coarse) pair, as if every prediction were mapped to its coarse class."""
    membership = torch.nn.functional.one_hot(torch.tensor(fine_to_coarse), coarse_classes).to(confusion.dtype)
    return membership.T @ confusion @ membership


def confusion_image(confusion: torch.Tensor, class_names: list[str], pairs: int = 25) -> Image.Image:
    """Rows are true classes, columns predictions, shaded by the row-normalised rate, every class
    named; beside it the ``pairs`` most confused (true -> predicted) pairs with their rates."""
    support = confusion.sum(dim=1, keepdim=True)
    rates = torch.where(support > 0, confusion.float() / support.clamp(min=1), float("nan"))  # grey: no images
    n = len(class_names)
    font = 10 if n <= 20 else 7
    side = max(500, n * (2 * font) + 320)  # two points of height per point of font: names never overlap
    figure = new_figure((side + 560, side + 60))
    grid = figure.add_gridspec(1, 2, width_ratios=[side, 560])
    axes = figure.add_subplot(grid[0])
    draw_heatmap(figure, axes, rates, class_names, class_names, "share of the true class's images", 1.0, font)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class (grey: no images)")
    axes.set_title("Confusion matrix (rows normalised: each row sums to 1)")
    listing = figure.add_subplot(grid[1])
    listing.axis("off")
    listing.set_title(f"Most confused pairs (of {int(confusion.sum())} images)", loc="left")
    listing.text(
        0,
        1,
        "\n".join(most_confused(confusion, class_names, pairs)) or "none: every image right",
        va="top",
        family="monospace",
        fontsize=9,
        transform=listing.transAxes,
    )
    return figure_image(figure)


def most_confused(confusion: torch.Tensor, class_names: list[str], count: int) -> list[str]:
    """``true -> predicted  rate (images)`` for the off-diagonal cells with the most images."""
    off = confusion.clone()
    off.fill_diagonal_(0)
    support = confusion.sum(dim=1).clamp(min=1)
    order = [int(i) for i in off.flatten().argsort(descending=True)[:count] if off.flatten()[i] > 0]
    n = confusion.shape[1]
    return [
        f"{class_names[i // n][:24]:>24} -> {class_names[i % n][:24]:<24} {off[i // n, i % n] / support[i // n]:4.0%} "
        f"({int(off[i // n, i % n])})"
        for i in order
    ]


def write_training_curves(rows: list[dict], path: Path) -> Path:
    """Training loss per step and validation top-1 per epoch, side by side, from a RunLogger's rows."""
    loss = [(row["step"], row["train/loss"]) for row in rows if "train/loss" in row]
    top1 = [(row["epoch"] + 1, row["val/top1"]) for row in rows if "val/top1" in row and "epoch" in row]
    figure = new_figure((1100, 420))
    left, right = figure.subplots(1, 2)
    for axes, points, title, x_label, style in (
        (left, loss, "training loss", "step", "-"),
        (right, top1, "validation top-1 accuracy", "epoch", "o-"),
    ):
        if points:
            axes.plot(*zip(*points, strict=True), style, color="C0")
        axes.set_title(title)
        axes.set_xlabel(x_label)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
    with atomic_write(path) as tmp:
        figure_image(figure).save(tmp, format="PNG")
    return path
