"""The reading: which method to pick and why, derived from the numbers."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

from vitlora.compare.paired import PairedComparison, paired_comparison, read_predictions
from vitlora.compare.result import MethodResult, megabytes, trainable_text

NOISY_INTERVAL = 0.05  # a close call whose 95% interval is wider than 5 points: the reading asks for more images
SIGNIFICANCE = 0.05  # McNemar p below this: a real gap


@dataclass(frozen=True)
class Standing:
    """A finished method's val top-1 on the images it was scored on, with its per-image predictions if known."""

    result: MethodResult
    top1: float
    images: int
    predictions: dict[str, tuple[int, int]] | None  # image path -> (label, predicted), pooled over folds

    @cached_property
    def correct(self) -> dict[str, bool] | None:
        """image path -> right, for paired statistics."""
        if self.predictions is None:
            return None
        return {path: label == predicted for path, (label, predicted) in self.predictions.items()}


def standings(results: Sequence[MethodResult]) -> list[Standing]:
    """The finished methods, most accurate first (then fewest trainable parameters).

    A method with prediction files is scored on them, pooled, so that a cross-validated method counts
    every fold's images; one without falls back to its logged val top-1.

    Args:
        results: the methods of a comparison, failed ones included.

    Returns:
        A Standing per finished method with a val score.

    Raises:
        ValueError: a prediction file is unreadable or malformed (see read_predictions).
    """
    found = []
    for result in results:
        predictions = read_predictions(result.prediction_files) if result.ok and result.prediction_files else None
        if predictions:
            right = sum(label == predicted for label, predicted in predictions.values())
            found.append(Standing(result, right / len(predictions), len(predictions), predictions))
        elif result.ok and "top1" in result.val:
            found.append(Standing(result, result.val["top1"], result.val_images, None))
    return sorted(found, key=lambda s: (-s.top1, s.result.trainable))


def paired_with_best(ranked: Sequence[Standing]) -> dict[str, PairedComparison]:
    """The most accurate method against each other one, image by image, where both have per-image predictions.

    Args:
        ranked: standings(), most accurate first.

    Returns:
        other method's name -> PairedComparison of the best (first) against it (second).

    Raises:
        ValueError: two methods with predictions share no image.
    """
    if not ranked or ranked[0].correct is None:
        return {}
    best = ranked[0].correct
    return {s.result.name: paired_comparison(best, s.correct) for s in ranked[1:] if s.correct is not None}


def standard_error(accuracy: float, images: int) -> float:
    """Binomial standard error of an accuracy, Agresti-Coull style so that 100% on few images still has one."""
    adjusted = (accuracy * images + 2) / (images + 4)
    return math.sqrt(adjusted * (1 - adjusted) / (images + 4))


def comparison_reading(
    results: Sequence[MethodResult],
    *,
    ranked: Sequence[Standing] | None = None,
    pairs: Mapping[str, PairedComparison] | None = None,
) -> list[str]:
    """Plain-language conclusions from the numbers: which method to pick and why.

    Methods with per-image predictions are compared with the most accurate image by image: a gap is
    real when McNemar's exact test on the images only one of them gets right gives p < 0.05. Without
    predictions, two accuracies count as equal when they differ by at most two standard errors of their
    difference. Among the methods within noise of the most accurate, the one that trains the fewest
    parameters is recommended (then the faster step).

    Args:
        results: the methods of a comparison, failed ones included.
        ranked: standings(results), when the caller has them already (the report does), so that
            the prediction files are read once.
        pairs: paired_with_best(ranked), likewise.

    Returns:
        The reading, one sentence or short paragraph per line.

    Raises:
        ValueError: a prediction file is unreadable or malformed.
    """
    ranked = standings(results) if ranked is None else ranked
    failed = [r.name for r in results if not r.ok]
    failures = [f"Not compared: {', '.join(failed)} failed (see Failures)."] if failed else []
    if not ranked:
        return ["No method finished, so there is nothing to compare.", *failures]
    best, pairs = ranked[0], paired_with_best(ranked) if pairs is None else pairs
    folds = len(best.result.prediction_files)
    pooled = f" pooled over {folds} folds" if best.correct and folds > 1 else ""
    lines = [
        f"**{best.result.name}** is the most accurate on val: top-1 {100 * best.top1:.1f}% on {best.images:,} "
        f"images{pooled} (standard error {100 * standard_error(best.top1, best.images):.1f} points)."
    ]
    close, close_call_width = [best.result], 0.0
    for other in ranked[1:]:
        pair = pairs.get(other.result.name)
        within, width, line = _paired_line(best, other, pair) if pair else _unpaired_line(best, other)
        lines.append(line)
        if within:
            close.append(other.result)
            close_call_width = max(close_call_width, width)
    done = [s.result for s in ranked]
    if len(done) > 1:
        lines.append("Trainable parameters: " + ", ".join(f"{r.name} {trainable_text(r)}" for r in done) + ".")
    pick = min(close, key=lambda r: (r.trainable, r.step_time_s or math.inf))
    lines.append(_recommendation(pick, best.result, close, done))
    merged = pick.latency_ratio("merged")
    if merged is not None:
        lines.append(f"Served merged, {pick.name} takes {merged:.2f}x the base model's inference time.")
    if close_call_width > NOISY_INTERVAL:
        lines.append(
            f"A close call's 95% interval of the difference spans {100 * close_call_width:.0f} points with "
            f"{best.images:,} val images: evaluate on more images before a close call."
        )
    return lines + failures


def _paired_line(best: Standing, other: Standing, pair: PairedComparison) -> tuple[bool, float, str]:
    """(within noise, width of the interval, the sentence) for a method compared image by image with the best."""
    within = pair.p_value >= SIGNIFICANCE
    sign = 1 if pair.difference >= 0 else -1  # the interval of the gap as stated, lower or higher
    low, high = sorted(sign * bound for bound in pair.interval)
    p_value = "p < 0.001" if pair.p_value < 0.001 else f"p = {pair.p_value:.3g}"
    a, b = best.result.name, other.result.name
    text = (
        f"{b} is {100 * abs(pair.difference):.1f} points {'lower' if sign > 0 else 'higher'} on the same "
        f"{pair.images:,} images: {'within noise' if within else 'a real gap'} (McNemar {p_value}; 95% interval "
        f"of the difference {100 * low:.1f} to {100 * high:.1f} points; {a} is right where {b} is wrong on "
        f"{pair.first_only:,} images, the reverse on {pair.second_only:,})."
    )
    return within, high - low, text


def _unpaired_line(best: Standing, other: Standing) -> tuple[bool, float, str]:
    """The fallback without per-image predictions: the accuracies as independent binomial samples."""
    gap = best.top1 - other.top1
    noise = 2 * math.hypot(standard_error(best.top1, best.images), standard_error(other.top1, other.images))
    within = gap <= noise
    text = (
        f"{other.result.name} is {100 * gap:.1f} points lower: {'within noise' if within else 'a real gap'} "
        f"(unpaired: no per-image predictions; two standard errors of the difference: {100 * noise:.1f} points)."
    )
    return within, 2 * noise, text


def _recommendation(pick: MethodResult, best: MethodResult, close: list[MethodResult], done: list[MethodResult]) -> str:
    if len(done) == 1:
        return f"Only {best.name} finished, so there is nothing to weigh it against."
    if pick is not best:
        return f"Pick **{pick.name}**: as accurate as {best.name} within noise, {_costs(pick, best)}."
    if len(close) > 1:
        return f"Pick **{best.name}**: the most accurate, and nothing within noise of it trains fewer parameters."
    cheapest = min(done[1:], key=lambda r: r.trainable)
    return (
        f"Pick **{best.name}**: nothing comes within noise of its accuracy. "
        f"Against {cheapest.name}, the cheapest alternative, it costs {_costs(best, cheapest)}."
    )


def _costs(a: MethodResult, b: MethodResult) -> str:
    """What ``a`` costs next to ``b``: parameters, stored bytes per task, step time, peak memory."""
    if a.trainable == b.trainable:  # a sweep's variants often train the very same tensors
        parts = [f"training the same {a.trainable:,} parameters"]
    else:
        parts = [f"training {trainable_text(a)} of the parameters instead of {trainable_text(b)}"]
    (a_kind, a_bytes), (b_kind, b_bytes) = a.shipped, b.shipped
    if a_bytes and b_bytes and megabytes(a_bytes) != megabytes(b_bytes):
        parts.append(
            f"storing a {megabytes(a_bytes)} MB {a_kind} per task instead of a {megabytes(b_bytes)} MB {b_kind}"
        )
    if a.step_time_s and b.step_time_s:
        parts.append(f"at {a.step_time_s / b.step_time_s:.2f}x the training step time")
    if a.peak_memory_mb and b.peak_memory_mb:
        parts.append(f"{a.peak_memory_mb / b.peak_memory_mb:.2f}x the peak memory")
    return ", ".join(parts)
