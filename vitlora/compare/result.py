"""What one method of a comparison measured, as the runner gathers it and the reading and report use it."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

PREDICTIONS_FILE = "{split}_predictions.csv"  # path,label,predicted per image, beside measurements.json
COST_FIELDS = ("step_time_s", "images_per_s", "peak_memory_mb", "checkpoint_bytes", "adapter_bytes", "steps")
TOTAL_FIELDS = ("val_images", "fit_s", "wall_s")  # fold runs score disjoint images and take their own time
SHARED_FIELDS = (  # the same in every fold run (else left at the default): what was trained, on what
    "method", "test_images", "trainable", "total", "memory_kind", "checkpoint", "adapter", "latency_batch", "device",
    "fit_command", "class_names",
)  # fmt: skip


@dataclass
class MethodResult:
    """One method's numbers: accuracies as fractions, files in bytes, times in seconds."""

    name: str
    recipe: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)
    fit_command: str = ""
    run_dir: str = ""
    error: str | None = None
    method: str = ""
    val: dict[str, float] = field(default_factory=dict)
    val_images: int = 0
    test: dict[str, float] = field(default_factory=dict)
    test_images: int = 0
    trainable: int = 0
    total: int = 0
    step_time_s: float | None = None
    images_per_s: float | None = None
    steps: int = 0
    peak_memory_mb: float | None = None
    memory_kind: str = ""
    checkpoint: str | None = None
    checkpoint_bytes: int | None = None
    adapter: str | None = None
    adapter_bytes: int | None = None
    latency_s: dict[str, float] = field(default_factory=dict)
    latency_batch: int = 0
    fit_s: float | None = None
    wall_s: float | None = None
    device: str = ""
    curve: list[dict[str, float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    prediction_files: list[str] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)  # val_predictions.csv of each run (fold)
    folds: int = 0  # K of K-fold cross-validation over train+val; 0: one run on the data's own val split
    val_sd: dict[str, float] = field(default_factory=dict)  # sample standard deviation over the folds
    test_sd: dict[str, float] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)  # each run (fold): folder, command, scores, error

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def trainable_fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def latency_ratio(self, kind: str) -> float | None:
        """Latency of ``unmerged`` or ``merged`` relative to the base model."""
        if kind not in self.latency_s or not self.latency_s.get("base"):
            return None
        return self.latency_s[kind] / self.latency_s["base"]

    @property
    def finished_folds(self) -> list[int]:
        """The folds this result combines: fewer than ``folds`` while a cross-validation is under way."""
        return [run["fold"] for run in self.runs if run["fold"] is not None]

    @property
    def shipped(self) -> tuple[str, int | None]:
        """What a deployment stores per task: the adapter when there is one, else the checkpoint."""
        return ("adapter", self.adapter_bytes) if self.adapter_bytes else ("checkpoint", self.checkpoint_bytes)


def combine_runs(
    runs: Sequence[MethodResult], folds: int = 0, fold_numbers: Sequence[int] | None = None, **described: Any
) -> MethodResult:
    """One method's result from its runs, in fold order: one run is itself, K fold runs are combined.

    val and test: the mean over folds per metric, with the sample standard deviation; val images,
    fit and wall time: the sum (each fold scores its own images); step time, throughput, memory,
    file sizes and latency: the median; what every run shares (parameters, device) is kept. A
    failed run fails the method, naming the fold. ``fold_numbers``: which of the ``folds`` folds the
    runs are, when only some have finished (default: all, 0 to K - 1). ``described``: the method's own
    fields (name, recipe, overrides, run_dir)."""
    numbers = list(range(len(runs)) if fold_numbers is None else fold_numbers)
    if len(numbers) != len(runs):
        raise ValueError(f"{len(runs)} runs but {len(numbers)} fold numbers ({numbers}).")
    labels = [f"fold {fold}: " if folds else "" for fold in numbers]
    summaries = [
        {"fold": fold if folds else None, "run_dir": r.run_dir, "fit_command": r.fit_command, "error": r.error}
        | {"val": r.val, "val_images": r.val_images, "test": r.test, "wall_s": r.wall_s}
        for fold, r in zip(numbers, runs, strict=True)
    ]
    described |= {"folds": folds, "runs": summaries}
    for name in SHARED_FIELDS:
        values = [getattr(r, name) for r in runs]
        if all(value == values[0] for value in values):
            described[name] = values[0]
    errors = [label + r.error for label, r in zip(labels, runs, strict=True) if r.error]
    if errors:
        return MethodResult(**described, error="; ".join(errors))
    combined: dict[str, Any] = {
        "val": _mean_per_metric([r.val for r in runs]),
        "test": _mean_per_metric([r.test for r in runs]),
        "val_sd": _sd_per_metric([r.val for r in runs]),
        "test_sd": _sd_per_metric([r.test for r in runs]),
        "latency_s": {
            kind: statistics.median(r.latency_s[kind] for r in runs) for kind in _common(r.latency_s for r in runs)
        },
        "curve": _mean_curve([r.curve for r in runs]),
        "notes": list(dict.fromkeys(note for r in runs for note in r.notes)),
        "prediction_files": [path for r in runs for path in r.prediction_files],
    }
    for name in COST_FIELDS:
        combined[name] = _median([getattr(r, name) for r in runs])
    for name in TOTAL_FIELDS:
        values = [getattr(r, name) for r in runs]
        combined[name] = None if None in values else sum(values)
    return MethodResult(**described, **combined)


def _common(dicts) -> list[str]:
    """The keys every dict has, in the first one's order."""
    dicts = list(dicts)
    return [key for key in dicts[0] if all(key in d for d in dicts)] if dicts else []


def _mean_per_metric(splits: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.fmean(split[key] for split in splits) for key in _common(splits)}


def _sd_per_metric(splits: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.stdev(split[key] for split in splits) for key in _common(splits)} if len(splits) > 1 else {}


def _median(values: list[Any]) -> Any:
    """The median of the known values (None when none is); whole numbers stay whole."""
    known = [value for value in values if value is not None]
    if not known:
        return None
    middle = statistics.median(known)
    return round(middle) if all(isinstance(value, int) for value in known) else middle


def _mean_curve(curves: list[list[dict[str, float]]]) -> list[dict[str, float]]:
    """Point by point mean of the folds' validation curves (they validate at the same epochs); none if they differ."""
    if len({len(curve) for curve in curves}) != 1:
        return []
    return [_mean_per_metric(list(points)) for points in zip(*curves, strict=True)]


def trainable_text(result: MethodResult) -> str:
    """The trainable share as people read it: 3 significant digits below 10%."""
    percent = 100 * result.trainable_fraction
    return f"{percent:.3g}%" if percent < 10 else f"{percent:.0f}%"


def megabytes(size: int | None) -> str:
    return "-" if size is None else f"{size / 1e6:.2f}"
