"""The reading: which method to pick and why, derived from the numbers."""

from __future__ import annotations

import math
from collections.abc import Sequence

from vitlora.compare.result import MethodResult, megabytes, trainable_text

NOISY_GAP = 0.05  # a close call noisier than 5 points: the reading asks for more evaluation images


def standard_error(accuracy: float, images: int) -> float:
    """Binomial standard error of an accuracy, Agresti-Coull style so that 100% on few images still has one."""
    adjusted = (accuracy * images + 2) / (images + 4)
    return math.sqrt(adjusted * (1 - adjusted) / (images + 4))


def comparison_reading(results: Sequence[MethodResult]) -> list[str]:
    """Plain-language conclusions from the numbers: which method to pick and why.

    Two val top-1 accuracies count as equal when they differ by at most two standard errors of
    their difference; among the methods within that noise of the most accurate, the one that
    trains the fewest parameters is recommended (then the faster step)."""
    done = sorted((r for r in results if r.ok and "top1" in r.val), key=lambda r: (-r.val["top1"], r.trainable))
    failed = [r.name for r in results if not r.ok]
    failures = [f"Not compared: {', '.join(failed)} failed (see Failures)."] if failed else []
    if not done:
        return ["No method finished, so there is nothing to compare.", *failures]
    best = done[0]
    error = standard_error(best.val["top1"], best.val_images)
    lines = [
        f"**{best.name}** is the most accurate on val: top-1 {100 * best.val['top1']:.1f}% on {best.val_images} "
        f"images (standard error {100 * error:.1f} points)."
    ]
    close, close_call_noise = [best], 0.0
    for other in done[1:]:
        gap = best.val["top1"] - other.val["top1"]
        noise = 2 * math.hypot(error, standard_error(other.val["top1"], other.val_images))
        verdict = "within noise" if gap <= noise else "a real gap"
        if gap <= noise:
            close.append(other)
            close_call_noise = max(close_call_noise, noise)
        lines.append(
            f"{other.name} is {100 * gap:.1f} points lower: {verdict} (two standard errors of the difference: "
            f"{100 * noise:.1f} points)."
        )
    if len(done) > 1:
        lines.append("Trainable parameters: " + ", ".join(f"{r.name} {trainable_text(r)}" for r in done) + ".")
    pick = min(close, key=lambda r: (r.trainable, r.step_time_s or math.inf))
    lines.append(_recommendation(pick, best, close, done))
    merged = pick.latency_ratio("merged")
    if merged is not None:
        lines.append(f"Served merged, {pick.name} takes {merged:.2f}x the base model's inference time.")
    if close_call_noise > NOISY_GAP:
        lines.append(
            f"With {best.val_images} val images, gaps up to {100 * close_call_noise:.0f} points are noise: "
            "evaluate on more images before a close call."
        )
    return lines + failures


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
    parts = [f"training {trainable_text(a)} of the parameters instead of {trainable_text(b)}"]
    (a_kind, a_bytes), (b_kind, b_bytes) = a.shipped, b.shipped
    if a_bytes and b_bytes:
        parts.append(
            f"storing a {megabytes(a_bytes)} MB {a_kind} per task instead of a {megabytes(b_bytes)} MB {b_kind}"
        )
    if a.step_time_s and b.step_time_s:
        parts.append(f"at {a.step_time_s / b.step_time_s:.2f}x the training step time")
    if a.peak_memory_mb and b.peak_memory_mb:
        parts.append(f"{a.peak_memory_mb / b.peak_memory_mb:.2f}x the peak memory")
    return ", ".join(parts)
