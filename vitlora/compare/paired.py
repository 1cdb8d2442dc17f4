"""Paired statistics of two methods scored on the same images: McNemar's exact test and a paired bootstrap.

Two methods evaluated on the same val images make correlated mistakes (a blurry photo is hard for both), so
their accuracies are compared image by image: only the images where exactly one of them is right carry
evidence of a difference. Treating the two accuracies as independent samples overstates the noise whenever, as
usual, the methods mostly agree.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

COLUMNS = ("path", "label", "predicted")  # what vitlora.compare.measure.write_predictions writes
BOOTSTRAP_ROUNDS = 10_000
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class PairedComparison:
    """Two methods on the images both scored: accuracies and difference (first - second) as fractions."""

    images: int
    first_accuracy: float
    second_accuracy: float
    difference: float
    interval: tuple[float, float]  # 95% paired bootstrap interval of the difference
    first_only: int  # images the first method gets right and the second wrong
    second_only: int  # the reverse
    p_value: float  # McNemar's exact test: the chance of a split this uneven if both were equally accurate


def read_correct(files: Iterable[str | os.PathLike]) -> dict[str, bool]:
    """Whether each image's top-1 prediction is right, pooled over prediction files with disjoint images.

    A method cross-validated over K folds has one val_predictions.csv per fold; together they score
    every image once.

    Args:
        files: CSV files with the columns path, label, predicted (class numbers), one row per image.

    Returns:
        image path -> predicted == label.

    Raises:
        ValueError: as read_predictions.
    """
    return {path: label == predicted for path, (label, predicted) in read_predictions(files).items()}


def read_predictions(files: Iterable[str | os.PathLike]) -> dict[str, tuple[int, int]]:
    """Each image's label and top-1 prediction, pooled over prediction files with disjoint images.

    Args:
        files: CSV files with the columns path, label, predicted (class numbers), one row per image.

    Returns:
        image path -> (label, predicted).

    Raises:
        ValueError: a file is unreadable, lacks a column, has a malformed row, or scores an image
            already scored (in it or an earlier file); the message names the file (and the line).
    """
    predictions: dict[str, tuple[int, int]] = {}
    seen_in: dict[str, str] = {}
    for file in map(str, files):
        try:
            with open(file, newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle)
                missing = [column for column in COLUMNS if column not in (reader.fieldnames or [])]
                if missing:
                    raise ValueError(f"{file}: no {', '.join(missing)} column; expected a header {','.join(COLUMNS)}.")
                for row in reader:
                    where = f"{file}, line {reader.line_num}"
                    path, label, predicted = (row[column] for column in COLUMNS)
                    label, predicted = _class_number(label), _class_number(predicted)
                    if None in row or not path or label is None or predicted is None:
                        raise ValueError(f"{where}: expected path,label,predicted with class numbers, got {row}.")
                    if path in predictions:
                        raise ValueError(f"{where}: {path} is already scored in {seen_in[path]}.")
                    predictions[path], seen_in[path] = (label, predicted), file
        except (OSError, UnicodeDecodeError, csv.Error) as error:
            raise ValueError(f"{file}: cannot read predictions ({error}).") from error
    return predictions


def _class_number(text: str | None) -> int | None:
    try:
        number = int(text)  # None (a short row) or not a whole number: not a class
    except (TypeError, ValueError):
        return None
    return number if number >= 0 else None


def mcnemar_p(first_only: int, second_only: int) -> float:
    """McNemar's exact two-sided p-value: the binomial tail of the discordant images at one half, doubled.

    Computed with exact integers, so thousands of discordant images lose nothing to rounding.

    Args:
        first_only: images only the first method gets right.
        second_only: images only the second method gets right.

    Returns:
        The p-value, at most 1 (1 when the two counts are equal).

    Raises:
        ValueError: a negative count.
    """
    if first_only < 0 or second_only < 0:
        raise ValueError(f"Discordant counts must be non-negative, got {first_only} and {second_only}.")
    discordant, fewer = first_only + second_only, min(first_only, second_only)
    tail, term = 0, 1  # term: comb(discordant, k), updated in place of recomputing each
    for k in range(fewer + 1):
        tail += term
        term = term * (discordant - k) // (k + 1)
    return min(1.0, 2 * tail / 2**discordant)  # int / int is correctly rounded however large


def bootstrap_interval(
    first_only: int,
    second_only: int,
    images: int,
    *,
    rounds: int = BOOTSTRAP_ROUNDS,
    seed: int = BOOTSTRAP_SEED,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile interval of the accuracy difference (first - second) when the images are resampled in pairs.

    The sample gets one pseudo-image of each discordant kind (Bonett and Price's adjustment for paired
    proportions), so that methods agreeing on a few images do not claim a zero-width interval. Resampling
    images with replacement draws each kind of image (only the first right, only the second right, both
    alike) a multinomial number of times, and the difference depends on those counts alone: drawing the
    counts directly is the same bootstrap in O(rounds) instead of O(rounds x images).

    Args:
        first_only: images only the first method gets right.
        second_only: images only the second method gets right.
        images: images both methods scored.
        rounds: bootstrap resamples.
        seed: the same seed gives the same interval.
        level: the interval's coverage.

    Returns:
        (low, high) bounds of the difference, as fractions.

    Raises:
        ValueError: counts that do not fit in ``images``, or no images.
    """
    if images <= 0 or first_only < 0 or second_only < 0 or first_only + second_only > images:
        raise ValueError(f"{first_only} + {second_only} discordant images do not fit in {images} images.")
    size = images + 2  # with the two pseudo-images
    generator = torch.Generator().manual_seed(seed)
    total = torch.full((rounds,), float(size), dtype=torch.float64)
    drawn_first = torch.binomial(total, torch.full_like(total, (first_only + 1) / size), generator=generator)
    second_given_not_first = (second_only + 1) / (size - first_only - 1)
    drawn_second = torch.binomial(
        total - drawn_first, torch.full_like(total, second_given_not_first), generator=generator
    )
    tails = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    low, high = torch.quantile((drawn_first - drawn_second) / size, tails).tolist()
    return low, high


def paired_comparison(
    first: Mapping[str, bool], second: Mapping[str, bool], *, rounds: int = BOOTSTRAP_ROUNDS, seed: int = BOOTSTRAP_SEED
) -> PairedComparison:
    """Two methods compared on the images both scored (the intersection of their paths).

    Args:
        first: image path -> right, as read_correct returns for one method.
        second: the same for the other method.
        rounds: bootstrap resamples for the interval.
        seed: the bootstrap's seed.

    Returns:
        The PairedComparison of first against second.

    Raises:
        ValueError: the two share no image.
    """
    shared = first.keys() & second.keys()
    if not shared:
        raise ValueError(f"No image scored by both methods ({len(first)} and {len(second)} images): nothing to pair.")
    first_right = sum(first[path] for path in shared)
    second_right = sum(second[path] for path in shared)
    first_only = sum(first[path] and not second[path] for path in shared)
    second_only = sum(second[path] and not first[path] for path in shared)
    return PairedComparison(
        images=len(shared),
        first_accuracy=first_right / len(shared),
        second_accuracy=second_right / len(shared),
        difference=(first_right - second_right) / len(shared),
        interval=bootstrap_interval(first_only, second_only, len(shared), rounds=rounds, seed=seed),
        first_only=first_only,
        second_only=second_only,
        p_value=mcnemar_p(first_only, second_only),
    )


def paired_by_fold(
    first: Mapping[int, str | os.PathLike], second: Mapping[int, str | os.PathLike]
) -> list[tuple[str, PairedComparison]]:
    """Two methods cross-validated on the same folds in separate comparisons, paired fold by fold and pooled.

    Args:
        first: fold number -> that fold's predictions file, for one method.
        second: the same for the other method.

    Returns:
        ("fold k", comparison) for each fold in both, then ("pooled (n folds)", comparison) over them
        when there are several.

    Raises:
        ValueError: no fold in both; a fold whose files score other images (the two were not split alike:
            other folds, or another spelling of the data root, as images are named by their path); or as
            read_correct.
    """
    shared = sorted(first.keys() & second.keys())
    if not shared:
        raise ValueError(f"No fold finished for both methods (folds {sorted(first)} and {sorted(second)}).")
    rows = []
    for fold in shared:
        a, b = read_correct([first[fold]]), read_correct([second[fold]])
        if a.keys() != b.keys():
            raise ValueError(
                f"Fold {fold} holds out other images in {first[fold]} than in {second[fold]} (other folds, "
                "or another spelling of --data.root: images are named by their path)."
            )
        rows.append((f"fold {fold}", paired_comparison(a, b)))
    if len(shared) > 1:  # read_correct pools as the report does: an image held out by two folds is refused
        pooled = [read_correct([files[fold] for fold in shared]) for files in (first, second)]
        rows.append((f"pooled ({len(shared)} folds)", paired_comparison(*pooled)))
    return rows
