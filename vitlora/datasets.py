"""Product-image datasets: three layouts, timm transforms, robust decoding, seeded sampling.

Layouts (``layout="auto"`` detects them from ``root``):
- ``grocery``: ``train.txt``/``val.txt``/``test.txt`` + ``classes.csv`` (Grocery Store dataset).
- ``folder``: ``root/{train,val,test}/<class>/<image>``.
- ``csv``: a manifest ``path,label[,split]`` (paths relative to the manifest's folder).

Every layout becomes a list of ``(path, class index)`` per split plus the class names, checked
at set-up (missing files, unknown labels, empty classes) before any training starts.
"""

from __future__ import annotations

import csv
import logging
import math
import random
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm.data
import torch
from torch.utils.data import Dataset, DistributedSampler

from vitlora.images import BadImage, load_rgb

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
Sample = tuple[Path, int]
TRIVIAL_AUGMENT = ("trivial", "trivialaugment")


class DatasetError(ValueError):
    """A dataset that cannot be used as given; the message names the path and the problem."""


@dataclass
class DatasetIndex:
    """Class names and the ``(path, label)`` samples of each split present."""

    class_names: list[str]
    splits: dict[str, list[Sample]]


# --- layouts ---------------------------------------------------------------------------------


def detect_layout(root: Path) -> str:
    if (root / "train.txt").is_file() and (root / "classes.csv").is_file():
        return "grocery"
    if (root / "manifest.csv").is_file():
        return "csv"
    if (root / "train").is_dir():
        return "folder"
    raise DatasetError(
        f"{root}: cannot tell the dataset layout: expected train.txt + classes.csv (grocery), "
        "manifest.csv (csv) or a train/ folder of class folders (folder)."
    )


def read_grocery(root: Path, label_level: str = "fine") -> DatasetIndex:
    """The Grocery Store dataset: ``<split>.txt`` lines ``path, fine id, coarse id``."""
    classes_file = root / "classes.csv"
    if not classes_file.is_file():
        raise DatasetError(f"{classes_file}: missing (the grocery layout needs it).")
    with open(classes_file, newline="") as handle:
        rows = list(csv.reader(handle))
    column = 0 if label_level == "fine" else 2
    names: dict[int, str] = {}
    for number, row in enumerate(rows[1:], 2):
        if not any(field.strip() for field in row):
            continue
        try:
            names.setdefault(int(row[column + 1]), row[column].strip())
        except (IndexError, ValueError) as error:
            raise DatasetError(f"{classes_file}:{number}: expected 'name, id, coarse name, coarse id, ...'.") from error
    class_names = [names[i] for i in sorted(names)]
    if sorted(names) != list(range(len(names))):
        raise DatasetError(f"{classes_file}: class ids are not 0..{len(names) - 1}.")
    splits = {}
    for split in SPLITS:
        listing = root / f"{split}.txt"
        if not listing.is_file():
            continue
        samples = []
        for number, line in enumerate(listing.read_text().splitlines(), 1):
            if not line.strip():
                continue
            fields = [field.strip() for field in line.split(",")]
            try:
                label = int(fields[1 if label_level == "fine" else 2])
            except (IndexError, ValueError) as error:
                raise DatasetError(f"{listing}:{number}: expected 'path, fine id, coarse id'.") from error
            if not 0 <= label < len(class_names):
                raise DatasetError(f"{listing}:{number}: unknown {label_level} label {label}.")
            samples.append((root / fields[0], label))
        splits[split] = samples
    return DatasetIndex(class_names, splits)


def read_folders(root: Path) -> DatasetIndex:
    """``root/<split>/<class>/<image>``; the train split defines the classes."""
    train = root / "train"
    class_dirs = sorted(p for p in train.iterdir() if p.is_dir()) if train.is_dir() else []
    if not class_dirs:
        raise DatasetError(f"{train}: no class folders found.")
    class_names = [p.name for p in class_dirs]
    index = {name: i for i, name in enumerate(class_names)}
    splits = {}
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        samples = []
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            if class_dir.name not in index:
                raise DatasetError(f"{class_dir}: class {class_dir.name!r} is not among the train classes.")
            files = expand_image_paths([class_dir])
            if not files:
                raise DatasetError(f"{class_dir}: empty class folder (no images).")
            samples += [(f, index[class_dir.name]) for f in files]
        splits[split] = samples
    return DatasetIndex(class_names, splits)


def read_manifest(manifest: Path) -> DatasetIndex:
    """A CSV ``path,label[,split]`` with a header; without ``split`` every row is train."""
    if not manifest.is_file():
        raise DatasetError(f"{manifest}: no such manifest.")
    with open(manifest, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise DatasetError(f"{manifest}: expected a header with columns path,label[,split].")
    by_split: dict[str, list[tuple[Path, str]]] = {}
    for number, row in enumerate(rows, 2):
        if not (row.get("path") or "").strip() or not (row.get("label") or "").strip():
            raise DatasetError(f"{manifest}:{number}: a row needs both a path and a label.")
        split = (row.get("split") or "train").strip()
        if split not in SPLITS:
            raise DatasetError(f"{manifest}:{number}: unknown split {split!r} (use {', '.join(SPLITS)}).")
        by_split.setdefault(split, []).append((manifest.parent / row["path"].strip(), row["label"].strip()))
    if "train" not in by_split:
        raise DatasetError(f"{manifest}: no train rows.")
    class_names = sorted({label for _, label in by_split["train"]})
    index = {name: i for i, name in enumerate(class_names)}
    splits = {}
    for split, items in by_split.items():
        unknown = sorted({label for _, label in items} - index.keys())
        if unknown:
            raise DatasetError(f"{manifest}: {split} rows use labels not in train: {unknown[:5]}.")
        splits[split] = [(path, index[label]) for path, label in items]
    return DatasetIndex(class_names, splits)


def read_dataset(
    root: Path, layout: str = "auto", manifest: Path | None = None, label_level: str = "fine"
) -> DatasetIndex:
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder does not exist.")
    if layout == "auto":
        layout = "csv" if manifest else detect_layout(root)
    if layout == "grocery":
        index = read_grocery(root, label_level)
    elif layout == "folder":
        index = read_folders(root)
    elif layout == "csv":
        index = read_manifest(Path(manifest) if manifest else root / "manifest.csv")
    else:
        raise DatasetError(f"Unknown layout {layout!r}: use auto, grocery, folder or csv.")
    missing = [str(path) for samples in index.splits.values() for path, _ in samples if not path.is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} listed image files do not exist, e.g. {missing[:3]}.")
    return index


def expand_image_paths(items: Sequence[str | Path]) -> list[Path]:
    """Folders become the images inside them (recursively, sorted); files stay as given.

    Raises:
        FileNotFoundError: an item that is neither a file nor a folder (a typo must not pass silently).
    """
    files: list[Path] = []
    for item in map(Path, items):
        if not item.exists():
            raise FileNotFoundError(f"{item}: no such file or folder.")
        if item.is_dir():
            files += sorted(f for f in item.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(item)
    return files


# --- transforms -------------------------------------------------------------------------------


def backbone_data_config(backbone: str, img_size: int | None = None) -> dict:
    """Resolution, mean/std, interpolation and crop from the backbone's pretrained config."""
    cfg = timm.models.get_pretrained_cfg(backbone) or timm.models.get_pretrained_cfg(backbone.split(".")[0])
    config = timm.data.resolve_data_config({}, pretrained_cfg=cfg.to_dict() if cfg else {})
    if img_size:
        config["input_size"] = (3, img_size, img_size)
    return config


def allow_zero_bit_posterize() -> None:
    """timm's RandAugment ``inc1`` levels can posterize to 0 bits, which Pillow >= 12 rejects
    (crashing a loader worker mid-epoch); clamp to 1 bit, the same extreme augmentation."""
    from timm.data import auto_augment

    original = auto_augment.posterize
    if getattr(original, "clamped", False):
        return

    def posterize(img, bits_to_keep, **kwargs):
        return original(img, max(1, bits_to_keep), **kwargs)

    posterize.clamped = True
    auto_augment.posterize = posterize
    for name, op in list(auto_augment.NAME_TO_OP.items()):
        if op is original:
            auto_augment.NAME_TO_OP[name] = posterize


def eval_transform(backbone: str, img_size: int | None = None):
    return timm.data.create_transform(**backbone_data_config(backbone, img_size), is_training=False)


# --- decoding, checking and sampling -------------------------------------------------------


def check_images(samples: Sequence[Sample], fail_fast: bool = False, workers: int = 4) -> list[Sample]:
    """Decodes every image once; skips unusable ones with a warning each (or raises)."""

    def check(sample: Sample) -> str | None:
        try:
            load_rgb(sample[0])
        except BadImage as error:
            if fail_fast:
                raise
            return str(error)
        return None

    with ThreadPoolExecutor(workers) as pool:
        problems = list(pool.map(check, samples))
    for problem in filter(None, problems):
        warnings.warn(f"skipping image {problem}", stacklevel=2)
    bad = sum(p is not None for p in problems)
    if bad:
        log.warning("skipped %d of %d images that could not be decoded", bad, len(samples))
    return [sample for sample, problem in zip(samples, problems, strict=True) if problem is None]


class ImageDataset(Dataset):
    """Decoded, transformed images. With a seed, item ``(index, epoch)`` draws its random
    augmentation from a generator seeded by ``(seed, epoch, index)``: the same every run,
    whatever the worker count or a resume."""

    def __init__(self, samples: Sequence[Sample], transform, seed: int | None = None) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        path, label = self.samples[index]
        image = load_rgb(path)
        if self.seed is not None:
            seed = hash((self.seed, epoch, index)) & 0x7FFFFFFF
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
        return self.transform(image), label


class EpochShuffler(DistributedSampler):
    """A shuffle that depends only on ``(seed, epoch)``, so resumed runs see the same order.

    Under DDP every rank draws the same order and takes every ``num_replicas``-th index of it
    (padded by repeats to equal shares), so the ranks' batches at one step hold exactly the
    images one process would draw with their combined batch size. Being a DistributedSampler,
    Lightning keeps it rather than wrapping it in a second shuffle; it calls ``set_epoch`` on
    it each epoch."""

    def __init__(self, size: int, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.resumed_at: tuple[int, int] | None = None

    def resume(self, epoch: int, samples_done: int) -> None:
        """Sets ``epoch`` and starts it after the first ``samples_done`` of this rank's share: a run
        resumed from a checkpoint saved inside that epoch continues with the very next batch.
        ``len()`` stays the whole share, as the training loop counts the batches already done."""
        self.set_epoch(epoch)
        self.resumed_at = (epoch, samples_done)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self.dataset), generator=generator).tolist()
        padding = self.total_size - len(order)
        order += (order * math.ceil(padding / len(order)))[:padding]
        share = order[self.rank :: self.num_replicas]
        if self.resumed_at is not None and self.resumed_at[0] == self.epoch:
            share = share[self.resumed_at[1] :]
        return iter([(i, self.epoch) for i in share])


class UnpaddedShard(DistributedSampler):
    """Evaluation under DDP: rank ``r`` takes images ``r, r + world, ...`` in order, none repeated.

    DistributedSampler pads the shares to equal length with repeats, so metrics would count
    some images twice; here shares differ by at most one image and every image counts once
    (torchmetrics syncs its states across ranks, whatever the share sizes)."""

    def __init__(self, size: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=False)
        self.num_samples = len(range(rank, size, num_replicas))
        self.total_size = size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))


def stratified_split(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    rng = random.Random(seed)
    train, val = [], []
    by_class: dict[int, list[Sample]] = {}
    for sample in samples:
        by_class.setdefault(sample[1], []).append(sample)
    for items in by_class.values():
        items = items[:]
        rng.shuffle(items)
        take = round(len(items) * fraction) if len(items) > 1 else 0
        val += items[:take]
        train += items[take:]
    return train, val
