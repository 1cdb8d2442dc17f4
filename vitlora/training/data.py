"""The Lightning data module: train/val/test/predict loaders over a product-image dataset.

Layouts, transforms and sampling live in :mod:`vitlora.datasets`; this module sizes them for a
backbone and hands them to the trainer.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import timm.data
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import Compose, InterpolationMode, TrivialAugmentWide

from vitlora.datasets import (
    SPLITS,
    TRIVIAL_AUGMENT,
    DatasetError,
    DatasetIndex,
    EpochShuffler,
    ImageDataset,
    Sample,
    UnpaddedShard,
    allow_zero_bit_posterize,
    backbone_data_config,
    check_images,
    class_balanced_weights,
    eval_transform,
    expand_image_paths,
    read_dataset,
    stratified_folds,
    stratified_split,
)
from vitlora.folds import appearance_folds, cached_features, image_features
from vitlora.images import BadImage

GROCERY_ROOT = "data/grocery-store"  # the one folder ``download`` fills: a mistyped root is an error, not a download


class ImageDataModule(L.LightningDataModule):
    """Train/val/test/predict loaders for a product-image dataset, sized for a timm backbone.

    Transforms follow the backbone's pretrained config (resolution, mean/std, interpolation,
    crop); training augmentation is timm's (random-resized crop, flip, RandAugment /
    TrivialAugment via ``auto_augment``: a timm string such as ``rand-m9-mstd0.5-inc1`` or
    ``trivial``; mixup/cutmix applied per batch).
    """

    def __init__(
        self,
        root: str = GROCERY_ROOT,
        layout: Literal["auto", "grocery", "folder", "csv"] = "auto",
        manifest: str | None = None,
        label_level: Literal["fine", "coarse"] = "fine",
        backbone: str = "vit_tiny_patch16_224.augreg_in21k_ft_in1k",
        img_size: int | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        val_fraction: float = 0.1,
        folds: int = 0,
        fold: int = 0,
        fold_by: Literal["random", "appearance"] = "random",
        scale: tuple[float, float] = (0.08, 1.0),
        hflip: float = 0.5,
        auto_augment: str | None = "rand-m9-mstd0.5-inc1",
        color_jitter: float | None = None,
        re_prob: float = 0.0,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        mixup_prob: float = 1.0,
        class_balance: float = 0.0,
        check_images: bool = True,
        fail_on_bad_images: bool = False,
        download: bool = False,
        seed: int = 0,
        predict_paths: list[str] | None = None,
        weights: str | None = None,
        pretrained: bool = True,
    ) -> None:
        """
        Args:
            root: Your images: a folder (class folders, train/val/test of class folders, a
                Grocery-style folder, or a folder with one CSV manifest) or a CSV file.
            layout: How root is organised; auto detects it and names it when fit starts.
            manifest: A CSV with columns path,label[,split] (paths relative to the CSV's folder).
            label_level: Grocery layout only: fine (81 classes) or coarse (43) labels. With fine
                labels validation and test also report coarse_top1 (predictions mapped to coarse classes).
            backbone: Set from model.backbone: its resolution, mean/std and crop shape the transforms.
            img_size: Set from model.img_size: another input resolution than the backbone's.
            batch_size: Training images per step (per device under DDP).
            eval_batch_size: Images per validation/test/predict batch (default: batch_size).
            num_workers: Loader processes; 0 loads in the main process.
            val_fraction: Share of each class carved from train (seeded, stratified) when the
                data has no val split.
            folds: K-fold cross-validation when at least 2: train and val are pooled and dealt
                into K stratified folds (seeded); fold ``fold`` is val, the others train. The test
                split is untouched.
            fold: Which fold is val, 0..folds-1.
            fold_by: random deals each class's images at random; appearance clusters each class
                by the pretrained backbone's features and makes each cluster a fold, so look-alike
                photos (one shelf, one visit) never sit on both sides: closer to a test split shot
                on other days. The features are cached (``$VITLORA_CACHE``, else ~/.cache/vitlora).
            scale: Area range of the random-resized crop, as fractions of the image.
            hflip: Probability of a horizontal flip.
            auto_augment: timm auto-augment string (e.g. rand-m9-mstd0.5-inc1), trivial, or null for none.
            color_jitter: Colour jitter strength, or null for none.
            re_prob: Random-erasing probability.
            mixup: Mixup alpha (0 turns it off).
            cutmix: CutMix alpha (0 turns it off).
            mixup_prob: Probability of mixing a batch when mixup or cutmix is on.
            class_balance: How often training draws rare classes: each image with probability
                proportional to (images of its class) ** -class_balance, so 0 draws as the data come,
                1 every class equally often, 0.5 in between. An epoch stays one draw per
                training image (with replacement when above 0).
            check_images: Decode every image once at set-up and skip unusable ones with a warning.
            fail_on_bad_images: Stop at the first unusable image instead of skipping it.
            download: Fetch the Grocery Store dataset when root is missing; only into
                data/grocery-store, so a mistyped root is an error, never a download.
            seed: Set from seed_everything: the val split, shuffles and augmentations.
            predict_paths: Image files or folders for predict (default: the test split, else val).
            weights: Set from model.weights: the backbone weights appearance folds see with.
            pretrained: Set from model.pretrained (False: a seeded random backbone sorts the folds).
        """
        super().__init__()
        if folds and not (folds >= 2 and 0 <= fold < folds):
            raise ValueError(f"data.fold must be 0..{folds - 1} and data.folds at least 2, got fold {fold} of {folds}.")
        if fold_by != "random" and not folds:
            raise ValueError(f"data.fold_by {fold_by} chooses how cross-validation folds are made: set data.folds too.")
        if not 0 <= class_balance <= 1:
            raise ValueError(
                f"data.class_balance must be in [0, 1] (0: as the data come, 1: equal), got {class_balance}."
            )
        if (mixup > 0 or cutmix > 0) and batch_size % 2:
            raise ValueError(f"mixup/cutmix pair images within a batch: batch_size must be even, got {batch_size}.")
        self.save_hyperparameters()
        self.root = Path(root)
        self._index: DatasetIndex | None = None
        self._datasets: dict[str, Dataset] = {}
        self.skipped: dict[str, int] = {}  # unusable images left out, per split
        self.mixup_fn = None

    # Classes are known before set-up, so the model can size its head from them.
    @property
    def index(self) -> DatasetIndex:
        if self._index is None:
            if self.hparams.download and not self.root.exists() and self.root.resolve() == Path(GROCERY_ROOT).resolve():
                from vitlora.training.download import download_grocery_store

                download_grocery_store(self.root)
            manifest = Path(self.hparams.manifest) if self.hparams.manifest else None
            self._index = read_dataset(self.root, self.hparams.layout, manifest, self.hparams.label_level)
            if self.hparams.folds:
                by_appearance = self.hparams.fold_by == "appearance"
                self._index.splits |= cross_validation_split(
                    self._index,
                    self.hparams.folds,
                    self.hparams.fold,
                    self.hparams.seed,
                    self.appearance_features if by_appearance else None,
                )
                self._index.layout += (
                    f", fold {self.hparams.fold + 1} of {self.hparams.folds} as val "
                    f"(train+val pooled, {'look-alikes kept together' if by_appearance else 'random'})"
                )
            elif "train" in self._index.splits and "val" not in self._index.splits and self.hparams.val_fraction > 0:
                self._index.splits["train"], self._index.splits["val"] = stratified_split(
                    self._index.splits["train"], self.hparams.val_fraction, self.hparams.seed
                )
        return self._index

    @property
    def class_names(self) -> list[str]:
        return self.index.class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    # Linked into the model like class_names: it scores predictions on the coarse level too.
    @property
    def fine_to_coarse(self) -> list[int] | None:
        """The coarse class index of each class, where the layout has coarse classes (else None)."""
        return self.index.fine_to_coarse

    @property
    def coarse_class_names(self) -> list[str] | None:
        return self.index.coarse_class_names

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
                usable = check_images(samples, self.hparams.fail_on_bad_images)
                self.skipped[split], samples = len(samples) - len(usable), usable
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
        world = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        # this process's share under DDP: shuffled for training, every image once for evaluation
        if train:
            weights = None
            if hp.class_balance > 0:
                weights = class_balanced_weights([label for _, label in dataset.samples], hp.class_balance)
            sampler = EpochShuffler(len(dataset), hp.seed, *world, weights=weights)
        else:
            sampler = UnpaddedShard(len(dataset), *world)
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

    def split_samples(self, split: str) -> list[Sample]:
        """The images of a split that is set up, in loader order (unusable ones already skipped)."""
        return self._datasets[split].samples

    @property
    def predict_samples(self) -> list[Sample]:
        """The images predicted, in loader order (unusable ones already skipped)."""
        return self._datasets["predict"].samples

    def appearance_features(self, samples: list[Sample]) -> torch.Tensor:
        """The pretrained backbone's features of ``samples`` at its own resolution, cached.

        Its own resolution, not ``img_size``: the folds must not change with the lever being compared.
        """
        hp = self.hparams
        weights = Path(hp.weights) if hp.weights else None
        source = f"{weights.resolve()}:{weights.stat().st_size}:{weights.stat().st_mtime_ns}" if weights else ""
        random_init = not (weights or hp.pretrained)
        key = ("appearance-folds-1", hp.backbone, source, f"random seed {hp.seed}" if random_init else "pretrained")

        def compute() -> torch.Tensor:
            from vitlora.backbone import create_backbone

            with torch.random.fork_rng():
                torch.manual_seed(hp.seed)  # a random backbone (pretrained off) sorts the same way every run
                model = create_backbone(hp.backbone, 0, weights=weights, pretrained=hp.pretrained)
            blank = torch.zeros(backbone_data_config(hp.backbone)["input_size"])
            dataset = BlankIfUnusable(ImageDataset(samples, eval_transform(hp.backbone)), blank)
            return image_features(model, dataset, hp.eval_batch_size or hp.batch_size, hp.num_workers)

        return cached_features(key, samples, compute)

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


class BlankIfUnusable(Dataset):
    """An image that cannot be decoded becomes ``blank``: set-up skips it later, with its usual warning."""

    def __init__(self, images: ImageDataset, blank: torch.Tensor) -> None:
        self.images, self.blank = images, blank

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        try:
            return self.images[index]
        except BadImage:
            return self.blank, -1


def cross_validation_split(
    index: DatasetIndex,
    folds: int,
    fold: int,
    seed: int,
    features: Callable[[list[Sample]], torch.Tensor] | None = None,
) -> dict[str, list[Sample]]:
    """train and val for one fold of K-fold cross-validation over the pooled train and val splits.

    With ``features`` (one row per image) look-alike images share a fold (appearance_folds);
    without, each class is dealt at random (stratified_folds).
    """
    pooled = index.splits.get("train", []) + index.splits.get("val", [])
    if len(pooled) < folds:
        raise DatasetError(
            f"{folds}-fold cross-validation needs at least {folds} train+val images, found {len(pooled)}."
        )
    if features is None:
        dealt = stratified_folds(pooled, folds, seed)
    else:
        fold_of = appearance_folds(features(pooled), [label for _, label in pooled], folds, seed)
        dealt = [[sample for sample, k in zip(pooled, fold_of, strict=True) if k == part] for part in range(folds)]
    return {"train": [s for k, part in enumerate(dealt) if k != fold for s in part], "val": dealt[fold]}


def batches_seen(trainer) -> int:
    """Training batches so far, restored on resume and advancing on every accumulated micro-batch."""
    return trainer.fit_loop.epoch_loop.batch_progress.total.ready
