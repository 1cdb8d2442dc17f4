"""Explanations from files: an adapter and image paths in, sheets and tables out (``vitlora explain``)."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from vitlora.explain.core import Explanation, explain_pixels, with_heads_of
from vitlora.explain.sheet import sheet_png
from vitlora.files import atomic_write

SUMMARY_COLUMNS = (
    "image", "method", "target_class", "target_source", "adapted_probability", "base_probability",
    "adapted_top1", "base_top1", "adapted_top10_share", "base_top10_share", "adapted_positive_share",
    "base_positive_share", "adapted_peak", "base_peak", "map_correlation", "sheet",
)  # fmt: skip


def write_explanations(explanations: Sequence[Explanation], folder: str | os.PathLike, top_k: int = 5) -> list[dict]:
    """One sheet per image (``<stem>.png``) plus ``explanations.csv`` and ``.json`` in ``folder``.

    Returns:
        The records written to the JSON file, one per image and method, each naming its sheet.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    by_image: dict[str, list[Explanation]] = {}
    for explanation in explanations:
        by_image.setdefault(explanation.name, []).append(explanation)
    records, stems = [], set()
    for name, group in by_image.items():
        stem = _unique_stem(Path(name).stem, stems)
        with atomic_write(folder / f"{stem}.png") as tmp:
            tmp.write_bytes(sheet_png(group, top_k=min(top_k, 3)))
        records += [{**explanation.record(top_k), "sheet": f"{stem}.png"} for explanation in group]
    with atomic_write(folder / "explanations.json") as tmp:
        tmp.write_text(json.dumps(records, indent=1))
    with atomic_write(folder / "explanations.csv") as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, SUMMARY_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for record in records:
            writer.writerow(
                {
                    **record,
                    "adapted_top1": record["adapted_top_k"][0][0],
                    "base_top1": record["base_top_k"][0][0],
                    "adapted_peak": "x".join(map(str, record["adapted_peak"])),
                    "base_peak": "x".join(map(str, record["base_peak"])),
                }
            )
    return records


def _unique_stem(stem: str, taken: set[str]) -> str:
    candidate, number = stem, 1
    while candidate in taken or candidate in ("explanations",):
        number += 1
        candidate = f"{stem}-{number}"
    taken.add(candidate)
    return candidate


def class_index(class_names: Sequence[str], name: str) -> int:
    """The index of a class by name; a ValueError naming a few known classes otherwise."""
    if name in class_names:
        return list(class_names).index(name)
    known = ", ".join(class_names[:8]) + (", ..." if len(class_names) > 8 else "")
    raise ValueError(f"unknown target class {name!r}: the adapter's classes are {known}.")


def load_explained_model(
    adapter_path: str | os.PathLike, weights: str | os.PathLike | None = None
) -> tuple[nn.Module, nn.Module | None, object]:
    """The adapted model, a separate base with its head when the update cannot be switched off in place
    (tuned biases), and the adapter."""
    from vitlora.apply import build_base, build_model_with_adapter

    model, adapter = build_model_with_adapter(adapter_path, weights)
    base = with_heads_of(build_base(adapter, weights), model) if adapter.bias_tuning else None
    return model, base, adapter


def explain_images(
    adapter_path: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    weights: str | os.PathLike | None = None,
    methods: Sequence[str] = ("integrated-gradients",),
    target_class: str | None = None,
    top_k: int = 5,
    steps: int = 32,
    batch_size: int = 32,
) -> list[dict]:
    """Explains image files with an adapter and writes sheets and tables into ``output`` (what ``vitlora explain`` does).

    Args:
        adapter_path: a vitlora adapter file.
        inputs: image files or folders of images.
        output: the folder for ``<image>.png`` sheets and ``explanations.csv`` / ``.json``.
        weights: local base weights file (offline machines).
        methods: attribution methods, each a row of every sheet.
        target_class: explain this class (by name) instead of each image's predicted one.
        top_k: predictions listed per image in the tables.
        steps: Integrated Gradients' path steps.
        batch_size: images per forward pass inside the methods.

    Returns:
        The records written to ``explanations.json``.

    Raises:
        ValueError: an unreadable image or adapter, an unknown class or method, no images.
    """
    from vitlora.datasets import backbone_data_config, eval_transform, expand_image_paths
    from vitlora.images import load_rgb

    paths = expand_image_paths(inputs)
    if not paths:
        raise ValueError(f"no images in {', '.join(map(str, inputs))}.")
    model, base, adapter = load_explained_model(adapter_path, weights)
    class_names = adapter.labels
    target = None if target_class is None else class_index(class_names, target_class)
    img_size = adapter.model_kwargs.get("img_size")
    transform, config = eval_transform(adapter.model_name, img_size), backbone_data_config(adapter.model_name, img_size)
    explanations: list[Explanation] = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        pixels = torch.stack([transform(load_rgb(path)) for path in chunk])
        explanations += explain_pixels(
            model,
            pixels,
            names=[path.name for path in chunk],
            class_names=class_names,
            mean=config["mean"],
            std=config["std"],
            methods=methods,
            targets=None if target is None else torch.full((len(chunk),), target),
            base=base,
            steps=steps,
            batch_size=batch_size,
        )
    return write_explanations(explanations, output, top_k)


def explain_image_png(
    model: nn.Module,
    adapter: object,
    image: Image.Image,
    *,
    base: nn.Module | None = None,
    methods: Sequence[str] = ("integrated-gradients",),
    target_class: str | None = None,
    name: str = "image",
) -> bytes:
    """The explanation sheet of one decoded RGB image as PNG bytes, for serving.

    Args:
        model: the adapted eval-mode model, as ``build_model_with_adapter`` returns it.
        adapter: its :class:`vitlora.adapter.Adapter` (model name, image size, class names).
        image: an RGB picture (``vitlora.images.load_rgb``).
        base: a separate base with the adapter's head (needed for bias-tuned adapters only).
        methods: attribution methods, one row each.
        target_class: explain this class instead of the predicted one.
        name: the image's label on the sheet.
    """
    from vitlora.datasets import backbone_data_config, eval_transform

    class_names = adapter.labels
    img_size = adapter.model_kwargs.get("img_size")
    config = backbone_data_config(adapter.model_name, img_size)
    pixels = eval_transform(adapter.model_name, img_size)(image)[None]
    targets = None if target_class is None else torch.tensor([class_index(class_names, target_class)])
    explanations = explain_pixels(
        model,
        pixels,
        names=[name],
        class_names=class_names,
        mean=config["mean"],
        std=config["std"],
        methods=methods,
        targets=targets,
        base=base,
    )
    return sheet_png(explanations)
