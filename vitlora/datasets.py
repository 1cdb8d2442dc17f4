"""Product-image datasets: three layouts, timm transforms, robust decoding, seeded sampling.

Layouts (``layout="auto"`` detects them from ``root``):
- ``grocery``: ``train.txt``/``val.txt``/``test.txt`` + ``classes.csv`` (Grocery Store dataset).
- ``folder``: ``root/{train,val,test}/<class>/<image>``, or just ``root/<class>/<image>`` (all train).
- ``csv``: a manifest ``path,label[,split]`` (paths relative to the manifest's folder): ``root``
  itself when it is a ``.csv`` file, else ``root/manifest.csv`` or the one ``.csv`` in ``root``.

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
    """Class names and the ``(path, label)`` samples of each split present.

    A layout whose classes group into coarse classes (Grocery Store, fine labels) also gives each
    class's coarse class, so a classifier can be scored on the coarse level too; None otherwise.
    """

    class_names: list[str]
    splits: dict[str, list[Sample]]
    layout: str = ""  # how the samples were found, for the run's opening summary
    fine_to_coarse: list[int] | None = None  # coarse class index of each class
    coarse_class_names: list[str] | None = None


# --- layouts ---------------------------------------------------------------------------------


def detect_layout(root: Path) -> str:
    """The layout of the dataset folder ``root`` (see the module docstring), or a DatasetError saying what was found."""
    if (root / "train.txt").is_file() and (root / "classes.csv").is_file():
        return "grocery"
    if find_manifest(root) is not None:
        return "csv"
    if (root / "train").is_dir() or class_folders(root):
        return "folder"
    loose = [p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
    found = f"{len(loose)} images but no class folders" if loose else "no class folders, manifest or train.txt"
    raise DatasetError(
        f"{root}: cannot tell the dataset layout ({found}): put the images in one folder per class "
        "(root/<class>/*.jpg or root/{train,val}/<class>/*.jpg), or list them in a CSV with columns path,label[,split]."
    )


def find_manifest(root: Path) -> Path | None:
    """``root/manifest.csv``, else the only ``.csv`` in ``root`` whose header has path and label columns."""
    if (root / "manifest.csv").is_file():
        return root / "manifest.csv"
    candidates = [p for p in sorted(root.glob("*.csv")) if manifest_columns(p) is not None]
    return candidates[0] if len(candidates) == 1 else None


PATH_COLUMNS, LABEL_COLUMNS = ("path", "image", "file", "filename"), ("label", "class", "category")


def manifest_columns(manifest: Path) -> tuple[str, str] | None:
    """The manifest's path and label column names, or None when its header has none of them."""
    with open(manifest, newline="") as handle:
        header = [name.strip() for name in next(csv.reader(handle), [])]
    path = next((name for name in header if name.lower() in PATH_COLUMNS), None)
    label = next((name for name in header if name.lower() in LABEL_COLUMNS), None)
    return (path, label) if path and label else None


def class_folders(root: Path) -> list[Path]:
    """The visible subfolders of ``root`` that hold at least one image (at any depth)."""
    return [
        p
        for p in sorted(root.iterdir())
        if p.is_dir() and not p.name.startswith(".") and any(f.suffix.lower() in IMAGE_SUFFIXES for f in p.rglob("*"))
    ]


def read_grocery(root: Path, label_level: str = "fine") -> DatasetIndex:
    """The Grocery Store dataset: ``<split>.txt`` lines ``path, fine id, coarse id``.

    With fine labels the index also maps each fine class to its coarse class. classes.csv defines
    that mapping, and a listing line whose coarse id disagrees with it is an error naming the line.
    """
    classes_file = root / "classes.csv"
    if not classes_file.is_file():
        raise DatasetError(f"{classes_file}: missing (the grocery layout needs it).")
    fine_names, coarse_names, fine_to_coarse = read_grocery_classes(classes_file)
    fine = label_level == "fine"
    class_names = fine_names if fine else coarse_names
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
                ids = [int(field) for field in fields[1:3]]
                label = ids[0 if fine else 1]
            except (IndexError, ValueError) as error:
                raise DatasetError(f"{listing}:{number}: expected 'path, fine id, coarse id'.") from error
            if not 0 <= label < len(class_names):
                raise DatasetError(f"{listing}:{number}: unknown {label_level} label {label}.")
            if len(ids) == 2 and 0 <= ids[0] < len(fine_to_coarse) and ids[1] != fine_to_coarse[ids[0]]:
                raise DatasetError(
                    f"{listing}:{number}: fine class {ids[0]} ({fine_names[ids[0]]}) has coarse id {ids[1]} here "
                    f"but {fine_to_coarse[ids[0]]} ({coarse_names[fine_to_coarse[ids[0]]]}) in {classes_file.name}."
                )
            samples.append((root / fields[0], label))
        splits[split] = samples
    if not fine:
        return DatasetIndex(class_names, splits)
    return DatasetIndex(class_names, splits, fine_to_coarse=fine_to_coarse, coarse_class_names=coarse_names)


def read_grocery_classes(classes_file: Path) -> tuple[list[str], list[str], list[int]]:
    """Fine class names, coarse class names and the coarse id of each fine class, from the rows
    ``name, id, coarse name, coarse id, ...`` of a Grocery Store classes.csv (after its header).

    Raises:
        DatasetError: naming the line of a malformed row, of a fine class given two coarse ids or
            of a coarse id given two names; or ids that are not 0..N-1.
    """
    with open(classes_file, newline="") as handle:
        rows = list(csv.reader(handle))
    fine_names: dict[int, str] = {}
    coarse_names: dict[int, str] = {}
    coarse_of: dict[int, tuple[int, int]] = {}  # fine id -> (coarse id, line that said so)
    for number, row in enumerate(rows[1:], 2):
        if not any(field.strip() for field in row):
            continue
        try:
            fine, coarse = int(row[1]), int(row[3])
        except (IndexError, ValueError) as error:
            raise DatasetError(f"{classes_file}:{number}: expected 'name, id, coarse name, coarse id, ...'.") from error
        fine_names.setdefault(fine, row[0].strip())
        coarse_names.setdefault(coarse, row[2].strip())
        if coarse_names[coarse] != row[2].strip():
            raise DatasetError(
                f"{classes_file}:{number}: coarse id {coarse} is named {row[2].strip()!r} here "
                f"but {coarse_names[coarse]!r} above."
            )
        known, line = coarse_of.setdefault(fine, (coarse, number))
        if known != coarse:
            raise DatasetError(
                f"{classes_file}:{number}: fine class {fine} ({fine_names[fine]}) has coarse id {coarse} here "
                f"but {known} on line {line}."
            )
    for level, names in (("class", fine_names), ("coarse class", coarse_names)):
        if sorted(names) != list(range(len(names))):
            raise DatasetError(f"{classes_file}: {level} ids are not 0..{len(names) - 1}.")
    return (
        [fine_names[i] for i in range(len(fine_names))],
        [coarse_names[i] for i in range(len(coarse_names))],
        [coarse_of[i][0] for i in range(len(coarse_of))],
    )


def read_folders(root: Path) -> DatasetIndex:
    """``root/<split>/<class>/<image>`` (the train split defines the classes), or ``root/<class>/<image>``,
    all of it train."""
    if not (root / "train").is_dir():
        class_dirs = class_folders(root)
        if not class_dirs:
            raise DatasetError(f"{root}: no class folders with images found.")
        samples = [(f, i) for i, d in enumerate(class_dirs) for f in expand_image_paths([d])]
        return DatasetIndex([d.name for d in class_dirs], {"train": samples}, "folder (root/<class>/, no splits)")
    train = root / "train"
    class_dirs = sorted(p for p in train.iterdir() if p.is_dir() and not p.name.startswith("."))
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
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if class_dir.name not in index:
                raise DatasetError(f"{class_dir}: class {class_dir.name!r} is not among the train classes.")
            files = expand_image_paths([class_dir])
            if not files:
                raise DatasetError(f"{class_dir}: empty class folder (no images).")
            samples += [(f, index[class_dir.name]) for f in files]
        splits[split] = samples
    return DatasetIndex(class_names, splits, f"folder ({'/, '.join(splits)}/ of class folders)")


def read_manifest(manifest: Path) -> DatasetIndex:
    """A CSV ``path,label[,split]`` with a header; without ``split`` every row is train.

    The path column may also be called image, file or filename, the label column class or category.
    """
    if not manifest.is_file():
        raise DatasetError(f"{manifest}: no such manifest.")
    columns = manifest_columns(manifest)
    if columns is None:
        raise DatasetError(f"{manifest}: expected a header with columns path,label[,split].")
    path_column, label_column = columns
    with open(manifest, newline="") as handle:
        rows = list(csv.DictReader(handle))
    by_split: dict[str, list[tuple[Path, str]]] = {}
    for number, row in enumerate(rows, 2):
        path, label = (row.get(path_column) or "").strip(), (row.get(label_column) or "").strip()
        if not path or not label:
            raise DatasetError(f"{manifest}:{number}: a row needs both a {path_column} and a {label_column}.")
        split = (row.get("split") or "train").strip()
        if split not in SPLITS:
            raise DatasetError(f"{manifest}:{number}: unknown split {split!r} (use {', '.join(SPLITS)}).")
        by_split.setdefault(split, []).append((manifest.parent / path, label))
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
    return DatasetIndex(class_names, splits, f"csv ({manifest.name})")


def read_dataset(
    root: Path, layout: str = "auto", manifest: Path | None = None, label_level: str = "fine"
) -> DatasetIndex:
    """The classes and samples of the dataset at ``root`` (a folder, or a CSV manifest file).

    Raises:
        DatasetError: ``root`` does not exist, its layout is unclear, or a listing names
            missing files or unknown labels.
    """
    root = Path(root)
    if root.is_file() and root.suffix.lower() == ".csv" and layout in ("auto", "csv"):
        root, manifest, layout = root.parent, root, "csv"
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder does not exist (give the folder of your images as data.root).")
    if layout == "auto":
        layout = "csv" if manifest else detect_layout(root)
    if layout == "grocery":
        index = read_grocery(root, label_level)
        index.layout = "grocery (train.txt, classes.csv)"
    elif layout == "folder":
        index = read_folders(root)
    elif layout == "csv":
        found = Path(manifest) if manifest else find_manifest(root)
        index = read_manifest(found or root / "manifest.csv")
    else:
        raise DatasetError(f"Unknown layout {layout!r}: use auto, grocery, folder or csv.")
    missing = [str(path) for samples in index.splits.values() for path, _ in samples if not path.is_file()]
    if missing:
        raise DatasetError(f"{root}: {len(missing)} listed image files do not exist, e.g. {missing[:3]}.")
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
    whatever the worker count or a resume. Item ``(index, epoch, repeat)``, an image drawn again
    in one epoch, gets another augmentation."""

    def __init__(self, samples: Sequence[Sample], transform, seed: int | None = None) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, ...]) -> tuple[torch.Tensor, int]:
        index, epoch, *repeat = key if isinstance(key, tuple) else (key, 0)
        path, label = self.samples[index]
        image = load_rgb(path)
        if self.seed is not None:
            seed = hash((self.seed, epoch, index, *repeat)) & 0x7FFFFFFF
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
    it each epoch. With ``weights`` an epoch is ``size`` draws with replacement, each image in
    proportion to its weight (:func:`class_balanced_weights`), seeded the same way."""

    def __init__(
        self, size: int, seed: int, num_replicas: int = 1, rank: int = 0, weights: torch.Tensor | None = None
    ) -> None:
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        if weights is not None and weights.shape != (size,):
            raise ValueError(
                f"EpochShuffler: one weight per image, {size} images but weights of shape {tuple(weights.shape)}."
            )
        self.weights = weights
        self.resumed_at: tuple[int, int] | None = None

    def resume(self, epoch: int, samples_done: int) -> None:
        """Sets ``epoch`` and starts it after the first ``samples_done`` of this rank's share: a run
        resumed from a checkpoint saved inside that epoch continues with the very next batch.
        ``len()`` stays the whole share, as the training loop counts the batches already done."""
        self.set_epoch(epoch)
        self.resumed_at = (epoch, samples_done)

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.weights is None:
            order = torch.randperm(len(self.dataset), generator=generator).tolist()
        else:
            order = torch.multinomial(self.weights, len(self.dataset), replacement=True, generator=generator).tolist()
        drawn: dict[int, int] = {}  # an image drawn again this epoch is keyed by its repeat: another augmentation
        keys = []
        for i in order:
            repeat = drawn[i] = drawn.get(i, -1) + 1
            keys.append((i, self.epoch, repeat) if repeat else (i, self.epoch))
        padding = self.total_size - len(keys)
        keys += (keys * math.ceil(padding / len(keys)))[:padding]
        share = keys[self.rank :: self.num_replicas]
        if self.resumed_at is not None and self.resumed_at[0] == self.epoch:
            share = share[self.resumed_at[1] :]
        return iter(share)


def class_balanced_weights(labels: Sequence[int], power: float) -> torch.Tensor:
    """A sampling weight per image, ``(images of its class) ** -power``: 0 draws as the data come,
    1 draws every class equally often, 0.5 (square-root balancing) lifts rare classes halfway."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    return torch.bincount(labels).double()[labels] ** -power


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
        take = max(1, round(len(items) * fraction)) if len(items) > 1 else 0  # every class in val
        val += items[:take]
        train += items[take:]
    return train, val


def stratified_folds(samples: Sequence[Sample], folds: int, seed: int) -> list[list[Sample]]:
    """``samples`` dealt into ``folds`` disjoint folds, each class spread evenly (seeded).

    Each class is shuffled, then dealt round-robin starting where the previous class stopped,
    so fold sizes differ by at most one image and every class with at least ``folds`` images
    appears in every fold.
    """
    if folds < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {folds}.")
    rng = random.Random(seed)
    by_class: dict[int, list[Sample]] = {}
    for sample in samples:
        by_class.setdefault(sample[1], []).append(sample)
    dealt: list[list[Sample]] = [[] for _ in range(folds)]
    position = 0
    for label in sorted(by_class):
        items = by_class[label][:]
        rng.shuffle(items)
        for item in items:
            dealt[position % folds].append(item)
            position += 1
    return dealt
