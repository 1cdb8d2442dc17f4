"""What one method of a comparison measured, as the runner gathers it and the reading and report use it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
    prediction_files: list[str] = field(default_factory=list)  # val_predictions.csv of each run (fold)

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
    def shipped(self) -> tuple[str, int | None]:
        """What a deployment stores per task: the adapter when there is one, else the checkpoint."""
        return ("adapter", self.adapter_bytes) if self.adapter_bytes else ("checkpoint", self.checkpoint_bytes)


def trainable_text(result: MethodResult) -> str:
    """The trainable share as people read it: 3 significant digits below 10%."""
    percent = 100 * result.trainable_fraction
    return f"{percent:.3g}%" if percent < 10 else f"{percent:.0f}%"


def megabytes(size: int | None) -> str:
    return "-" if size is None else f"{size / 1e6:.2f}"
