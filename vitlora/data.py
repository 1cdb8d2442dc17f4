"""Product-image datasets for training: three layouts, timm transforms, robust decoding.

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
from typing import Literal

import lightning as L
import numpy as np
import timm.data
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms import Compose, InterpolationMode, TrivialAugmentWide

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
    """Folders become the images inside them (recursively, sorted); files stay as given."""
    files: list[Path] = []
    for item in map(Path, items):
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

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self.dataset), generator=generator).tolist()
        padding = self.total_size - len(order)
        order += (order * math.ceil(padding / len(order)))[:padding]
        return iter([(i, self.epoch) for i in order[self.rank :: self.num_replicas]])


# --- the data module ---------------------------------------------------------------------------


class ImageDataModule(L.LightningDataModule):
    """Train/val/test/predict loaders for a product-image dataset, sized for a timm backbone.

    Transforms follow the backbone's pretrained config (resolution, mean/std, interpolation,
    crop); training augmentation is timm's (random-resized crop, flip, RandAugment /
    TrivialAugment via ``auto_augment``: a timm string such as ``rand-m9-mstd0.5-inc1`` or
    ``trivial``; mixup/cutmix applied per batch).
    """

    def __init__(
        self,
        root: str = "data/grocery-store",
        layout: Literal["auto", "grocery", "folder", "csv"] = "auto",
        manifest: str | None = None,
        label_level: Literal["fine", "coarse"] = "fine",
        backbone: str = "vit_tiny_patch16_224.augreg_in21k_ft_in1k",
        img_size: int | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        val_fraction: float = 0.1,
        scale: tuple[float, float] = (0.08, 1.0),
        hflip: float = 0.5,
        auto_augment: str | None = "rand-m9-mstd0.5-inc1",
        color_jitter: float | None = None,
        re_prob: float = 0.0,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        mixup_prob: float = 1.0,
        check_images: bool = True,
        fail_on_bad_images: bool = False,
        download: bool = False,
        seed: int = 0,
        predict_paths: list[str] | None = None,
    ) -> None:
        super().__init__()
        if (mixup > 0 or cutmix > 0) and batch_size % 2:
            raise ValueError(f"mixup/cutmix pair images within a batch: batch_size must be even, got {batch_size}.")
        self.save_hyperparameters()
        self.root = Path(root)
        self._index: DatasetIndex | None = None
        self._datasets: dict[str, Dataset] = {}
        self.mixup_fn = None

    # Classes are known before set-up, so the model can size its head from them.
    @property
    def index(self) -> DatasetIndex:
        if self._index is None:
            if self.hparams.download and not self.root.exists():
                from vitlora.download import download_grocery_store

                download_grocery_store(self.root)
            manifest = Path(self.hparams.manifest) if self.hparams.manifest else None
            self._index = read_dataset(self.root, self.hparams.layout, manifest, self.hparams.label_level)
            if "train" in self._index.splits and "val" not in self._index.splits and self.hparams.val_fraction > 0:
                self._index.splits["train"], self._index.splits["val"] = _stratified_split(
                    self._index.splits["train"], self.hparams.val_fraction, self.hparams.seed
                )
        return self._index

    @property
    def class_names(self) -> list[str]:
        return self.index.class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def transform(self, train: bool):
        config = backbone_data_config(self.hparams.backbone, self.hparams.img_size)
        if not train:
            return eval_transform(self.hparams.backbone, self.hparams.img_size)
        hp = self.hparams
        allow_zero_bit_posterize()
        trivial = hp.auto_augment in TRIVIAL_AUGMENT
        stages = timm.data.create_transform(
            input_size=config["input_size"],
            is_training=True,
            scale=hp.scale,
            hflip=hp.hflip,
            auto_augment=None if trivial else hp.auto_augment,
            color_jitter=hp.color_jitter,
            re_prob=hp.re_prob,
            interpolation=config["interpolation"],
            mean=config["mean"],
            std=config["std"],
            separate=True,
        )
        primary, secondary, final = (list(stage.transforms) for stage in stages)
        if trivial:  # torchvision's TrivialAugmentWide, where timm puts its auto-augment
            mode = InterpolationMode.BICUBIC if config["interpolation"] == "bicubic" else InterpolationMode.BILINEAR
            secondary.insert(0, TrivialAugmentWide(interpolation=mode))
        return Compose(primary + secondary + final)

    def setup(self, stage: str | None = None) -> None:
        wanted = {
            "fit": ("train", "val"),
            "validate": ("val",),
            "test": ("test",),
            "predict": ("predict",),
        }
        for split in wanted.get(stage, SPLITS):
            if split in self._datasets:
                continue
            samples = self._predict_samples() if split == "predict" else self.index.splits.get(split)
            if not samples:
                raise DatasetError(f"{self.root}: no {split} split in this dataset.")
            if self.hparams.check_images:
                samples = check_images(samples, self.hparams.fail_on_bad_images)
            seed = self.hparams.seed if split == "train" else None
            self._datasets[split] = ImageDataset(samples, self.transform(split == "train"), seed)
        if stage in ("fit", None) and (self.hparams.mixup > 0 or self.hparams.cutmix > 0):
            self.mixup_fn = timm.data.Mixup(
                mixup_alpha=self.hparams.mixup,
                cutmix_alpha=self.hparams.cutmix,
                prob=self.hparams.mixup_prob,
                label_smoothing=0.0,
                num_classes=self.num_classes,
            )

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        dataset = self._datasets[split]
        hp = self.hparams
        sampler = None
        if train:  # this process's share under DDP (Lightning shards evaluation loaders itself)
            world = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
            sampler = EpochShuffler(len(dataset), hp.seed, *world)
        return DataLoader(
            dataset,
            batch_size=hp.batch_size if train else (hp.eval_batch_size or hp.batch_size),
            sampler=sampler,
            drop_last=train and (len(sampler) > hp.batch_size or self.mixup_fn is not None),
            num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")

    @property
    def predict_samples(self) -> list[Sample]:
        """The images predicted, in loader order (unusable ones already skipped)."""
        return self._datasets["predict"].samples

    def _predict_samples(self) -> list[Sample]:
        """``predict_paths`` (files or folders, label -1), else the test split, else val."""
        if not self.hparams.predict_paths:
            return self.index.splits.get("test") or self.index.splits.get("val") or []
        return [(f, -1) for f in expand_image_paths(self.hparams.predict_paths)]

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Mixup/CutMix on whole training batches, seeded by the step: soft targets out."""
        if self.mixup_fn is None or self.trainer is None or not self.trainer.training:
            return batch
        images, targets = batch
        np.random.seed((self.hparams.seed * 1_000_003 + batches_seen(self.trainer)) % 2**32)
        return self.mixup_fn(images, targets)


def batches_seen(trainer) -> int:
    """Training batches so far, restored on resume and advancing on every accumulated micro-batch."""
    return trainer.fit_loop.epoch_loop.batch_progress.total.ready


def _stratified_split(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
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
