"""One run folder with both TensorBoard events and a ``metrics.csv`` a spreadsheet can open."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from vitlora.files import atomic_write


class RunLogger(TensorBoardLogger):
    """TensorBoard logger that also keeps every logged metric in ``<log_dir>/metrics.csv``.

    A run that fails before logging anything (no such checkpoint, no test split...) removes
    its folder again when it holds nothing but the config and an empty event file.
    """

    def __init__(
        self,
        save_dir: str = "runs",
        name: str = "vitlora",
        version: int | str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(save_dir, name=name, version=version, default_hp_metric=False, **kwargs)
        self._rows: list[dict] = []

    @rank_zero_only
    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        super().log_metrics(metrics, step)
        self._rows.append({"step": step, **{k: float(v) for k, v in metrics.items()}})

    @rank_zero_only
    def save(self) -> None:
        super().save()
        if not self._rows:
            return
        columns = list(dict.fromkeys(key for row in self._rows for key in row))
        path = Path(self.log_dir) / "metrics.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as tmp, open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self._rows)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        folder = Path(self.log_dir)
        if status == "failed" and not self._rows and folder.is_dir() and holds_no_results(folder):
            shutil.rmtree(folder)
            if not any(folder.parent.iterdir()):  # runs/<name>/ made for this run alone
                folder.parent.rmdir()


def holds_no_results(folder: Path) -> bool:
    """Only what every run writes before its first step: config, hyperparameters, TensorBoard events."""
    return all(
        path.is_file() and (path.name in ("config.yaml", "hparams.yaml") or path.name.startswith("events.out.tfevents"))
        for path in folder.iterdir()
    )
