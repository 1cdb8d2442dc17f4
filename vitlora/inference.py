"""Top-k predictions for image files with an adapter: ``vitlora classify``, from ten photos to a catalog.

A DataLoader's workers decode and transform the images while the model runs. :func:`classify`
returns the rows; :func:`classify_files` appends each batch's rows to a CSV or JSONL file as soon
as they are predicted, so an interrupted run keeps what it did and ``resume`` skips the paths
already written. An unreadable image becomes a row with its error, never the end of the run.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from vitlora.adapter import Adapter
from vitlora.apply import build_model_with_adapter
from vitlora.datasets import eval_transform, expand_image_paths
from vitlora.files import atomic_write
from vitlora.images import BadImage, load_rgb

STREAMED_SUFFIXES = (".csv", ".jsonl")


TTA_MODES = ("none", "flip", "flip-zoom")


def tta_views(images: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """The views test-time augmentation averages over, for a batch of eval-transformed images.

    Args:
        images: A batch ``(N, C, H, W)``, already resized and cropped for the model.
        mode: none (the batch), flip (and its mirror image), or flip-zoom (both, plus the central
            87.5% of each scaled back up: product photos often frame the item loosely).

    Returns:
        The views, each shaped like ``images``.

    Raises:
        ValueError: an unknown mode.
    """
    if mode not in TTA_MODES:
        raise ValueError(f"Unknown test-time augmentation {mode!r}: choose one of {list(TTA_MODES)}.")
    views = [images]
    if mode in ("flip", "flip-zoom"):
        views.append(images.flip(-1))
    if mode == "flip-zoom":
        height, width = images.shape[-2:]
        crop_h, crop_w = round(height * 0.875), round(width * 0.875)
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        centre = images[..., top : top + crop_h, left : left + crop_w]
        zoom = F.interpolate(centre, size=(height, width), mode="bicubic", align_corners=False)
        views += [zoom, zoom.flip(-1)]
    return views


def top_k_rows(paths: list[str], probabilities: torch.Tensor, class_names: list[str], k: int) -> list[dict]:
    """One row per image: its path, the k most probable labels and their probabilities."""
    values, indices = probabilities.topk(min(k, probabilities.shape[1]), dim=-1)
    return [
        {
            "path": path,
            "labels": [class_names[i] for i in idx],
            "probabilities": [round(v, 6) for v in vals],
            "error": "",
        }
        for path, vals, idx in zip(paths, values.tolist(), indices.tolist(), strict=True)
    ]


def write_predictions(rows: list[dict], output: Path) -> None:
    """``.json``: a list of rows; ``.csv``: path, label_1, prob_1, ..., error."""
    output = Path(output)
    with atomic_write(output) as tmp:
        if output.suffix == ".json":
            tmp.write_text(json.dumps(rows, indent=1))
            return
        k = max((len(row["labels"]) for row in rows), default=0)
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(
                [
                    "path",
                    *[c for i in range(1, k + 1) for c in (f"label_{i}", f"prob_{i}")],
                    "error",
                ]
            )
            for row in rows:
                pairs = [v for pair in zip(row["labels"], row["probabilities"], strict=True) for v in pair]
                writer.writerow([row["path"], *pairs, *[""] * (2 * k - len(pairs)), row["error"]])


class ImageFiles(Dataset):
    """``(index, image tensor or None, error)`` per file: a file that does not decode carries its error."""

    def __init__(self, paths: Sequence[Path], transform) -> None:
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            return index, self.transform(load_rgb(self.paths[index])), ""
        except BadImage as error:
            return index, None, str(error)


def collate_images(
    items: list[tuple[int, torch.Tensor | None, str]],
) -> tuple[list[int], torch.Tensor | None, list[str]]:
    """Indices and errors of every item; the decoded images stacked (None when none decoded)."""
    images = [image for _, image, _ in items if image is not None]
    return [i for i, _, _ in items], torch.stack(images) if images else None, [error for _, _, error in items]


def done_paths(output: Path) -> set[str]:
    """The paths an earlier run already wrote to ``output``; a last line cut off mid-write is removed."""
    if not output.is_file():
        return set()
    text = output.read_text()
    if text and not text.endswith("\n"):  # interrupted mid-line: that row is redone
        text = text[: text.rfind("\n") + 1]
        output.write_text(text)
    lines = text.splitlines()
    if output.suffix == ".jsonl":
        return {json.loads(line)["path"] for line in lines if line.strip()}
    return {row[0] for row in list(csv.reader(lines))[1:] if row}


class RowWriter:
    """Appends prediction rows to a .csv (path, label_1, prob_1, ..., error) or .jsonl file, flushed per batch."""

    def __init__(self, handle: IO[str], suffix: str, k: int, header: bool) -> None:
        self.handle, self.suffix, self.k = handle, suffix, k
        self.csv = csv.writer(handle) if suffix == ".csv" else None
        if self.csv and header:
            self.csv.writerow(["path", *[c for i in range(1, k + 1) for c in (f"label_{i}", f"prob_{i}")], "error"])

    def write(self, rows: list[dict]) -> None:
        for row in rows:
            if self.csv is None:
                self.handle.write(json.dumps(row) + "\n")
            else:
                pairs = [v for pair in zip(row["labels"], row["probabilities"], strict=True) for v in pair]
                self.csv.writerow([row["path"], *pairs, *[""] * (2 * self.k - len(pairs)), row["error"]])
        self.handle.flush()


@contextmanager
def open_rows(output: Path, k: int, resume: bool) -> Iterator[RowWriter]:
    """A :class:`RowWriter` on ``output``: appended to with ``resume``, else started afresh."""
    append = resume and output.is_file() and output.stat().st_size > 0
    with open(output, "a" if append else "w", newline="") as handle:
        yield RowWriter(handle, output.suffix, k, header=not append)


def predicted_batches(
    model: nn.Module, adapter: Adapter, paths: Sequence[Path], top_k: int, batch_size: int, num_workers: int = 0
) -> Iterator[list[dict]]:
    """Rows of each batch of ``paths`` in order: the one loop behind :func:`classify` and :func:`classify_files`."""
    loader = DataLoader(
        ImageFiles(paths, eval_transform(adapter.model_name, adapter.model_kwargs.get("img_size"))),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_images,
    )
    for indices, images, errors in loader:
        predicted = iter(())
        if images is not None:
            with torch.inference_mode():
                probabilities = model(images).softmax(-1)
            good = [str(paths[i]) for i, error in zip(indices, errors, strict=True) if not error]
            predicted = iter(top_k_rows(good, probabilities, adapter.labels, top_k))
        yield [
            {"path": str(paths[i]), "labels": [], "probabilities": [], "error": error} if error else next(predicted)
            for i, error in zip(indices, errors, strict=True)
        ]


def prediction_table(rows: list[dict]) -> str:
    """Rows as aligned text for a terminal: the path, then each label with its probability."""
    k = max((len(row["labels"]) for row in rows), default=0)
    table = [["path", *(f"top-{i}" for i in range(1, k + 1))]]
    table += [
        [row["path"], *(f"{label} {p:.3f}" for label, p in zip(row["labels"], row["probabilities"], strict=True))]
        for row in rows
    ]
    widths = [max(len(line[i]) for line in table if i < len(line)) for i in range(k + 1)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=False)) for line in table]
    for number, row in enumerate(rows, 1):
        if row["error"]:
            lines[number] = (
                f"{row['path'].ljust(widths[0])}  unreadable: {row['error'].removeprefix(row['path'] + ': ')}"
            )
    return "\n".join(line.rstrip() for line in lines)


def classify(
    adapter_path: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    weights: str | os.PathLike | None = None,
    top_k: int = 5,
    batch_size: int = 32,
    num_workers: int = 0,
) -> list[dict]:
    """Top-k rows per image with the model an adapter describes.

    Args:
        adapter_path: a vitlora adapter file.
        inputs: image files and folders (searched recursively).
        weights: a local base weights file (offline machines); else the adapter's recorded base.
        top_k: labels per image.
        batch_size: images per forward pass.
        num_workers: DataLoader worker processes decoding images (0: in this process).

    Returns:
        One dict per image (``path``, ``labels``, ``probabilities``, ``error``); an unreadable
        image gets a row with ``error`` set instead of labels.

    Raises:
        AdapterError: the adapter file or its base cannot be used.
        FileNotFoundError: an input that does not exist (checked before the model is built).
    """
    paths = expand_image_paths([Path(item) for item in inputs])
    model, adapter = build_model_with_adapter(adapter_path, weights)
    return [row for rows in predicted_batches(model, adapter, paths, top_k, batch_size, num_workers) for row in rows]


def classify_files(
    adapter_path: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    weights: str | os.PathLike | None = None,
    top_k: int = 5,
    batch_size: int = 64,
    num_workers: int = 2,
    resume: bool = False,
    progress: bool = True,
    on_unreadable: Callable[[str], None] | None = None,
) -> tuple[int, int]:
    """Top-k labels of every image in ``inputs`` (files, folders recursed) written row by row to ``output``.

    Args:
        adapter_path: the adapter file; its base is built as :func:`build_model_with_adapter` does.
        inputs: image files and folders.
        output: a ``.csv`` or ``.jsonl`` file, written as the run goes.
        weights: local base weights (offline machines).
        top_k: labels per image.
        batch_size: images per forward pass.
        num_workers: DataLoader worker processes decoding images (0: in this process).
        resume: skip the paths already in ``output`` and append the others.
        progress: show a progress bar with images/s and the time left (on stderr).
        on_unreadable: called with each unreadable image's error as it is met (the CLI reports them).

    Returns:
        The number of rows written and how many of them are unreadable images.

    Raises:
        ValueError: an output that is not .csv/.jsonl, or a ``top_k``/``batch_size`` below 1.
    """
    output = Path(output)
    if output.suffix not in STREAMED_SUFFIXES:
        raise ValueError(f"{output}: the output must end in {' or '.join(STREAMED_SUFFIXES)}.")
    if top_k < 1 or batch_size < 1:
        raise ValueError(f"top_k and batch_size must be at least 1, got {top_k} and {batch_size}.")
    paths = expand_image_paths([Path(item) for item in inputs])
    model, adapter = build_model_with_adapter(adapter_path, weights)
    skip = done_paths(output) if resume else set()
    paths = [path for path in paths if str(path) not in skip]
    written = unreadable = 0
    with (
        open_rows(output, min(top_k, adapter.num_classes), resume) as writer,
        tqdm(total=len(paths), unit="img", disable=not progress, smoothing=0.1) as bar,
    ):
        for rows in predicted_batches(model, adapter, paths, top_k, batch_size, num_workers):
            writer.write(rows)
            written += len(rows)
            for row in rows:
                if row["error"]:
                    unreadable += 1
                    if on_unreadable is not None:
                        on_unreadable(row["error"])
            bar.update(len(rows))
    return written, unreadable
