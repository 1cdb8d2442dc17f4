"""Top-k predictions for image files with an adapter (``vitlora classify``), written as CSV or JSON."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from vitlora.apply import build_model_with_adapter
from vitlora.datasets import eval_transform, expand_image_paths
from vitlora.files import atomic_write
from vitlora.images import BadImage, load_rgb


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
) -> list[dict]:
    """Top-k rows per image with the model an adapter describes.

    Args:
        adapter_path: a vitlora adapter file.
        inputs: image files and folders (searched recursively).
        weights: a local base weights file (offline machines); else the adapter's recorded base.
        top_k: labels per image.
        batch_size: images per forward pass.

    Returns:
        One dict per image (``path``, ``labels``, ``probabilities``, ``error``); an unreadable
        image gets a row with ``error`` set instead of labels.

    Raises:
        AdapterError: the adapter file or its base cannot be used.
        FileNotFoundError: an input that does not exist (checked before the model is built).
    """
    paths = expand_image_paths([Path(item) for item in inputs])
    model, adapter = build_model_with_adapter(adapter_path, weights)
    transform = eval_transform(adapter.model_name, adapter.model_kwargs.get("img_size"))
    names = adapter.labels
    rows: list[dict] = []
    pending: list[tuple[int, torch.Tensor]] = []

    def flush() -> None:
        with torch.inference_mode():
            probabilities = model(torch.stack([tensor for _, tensor in pending])).softmax(-1)
        predicted = top_k_rows([rows[i]["path"] for i, _ in pending], probabilities, names, top_k)
        for (i, _), row in zip(pending, predicted, strict=True):
            rows[i] = row
        pending.clear()

    for path in paths:
        rows.append({"path": str(path), "labels": [], "probabilities": [], "error": ""})
        try:
            pending.append((len(rows) - 1, transform(load_rgb(path))))
        except BadImage as error:
            rows[-1]["error"] = str(error)
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    return rows
