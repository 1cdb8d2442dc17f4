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
        save_dir: str | None = None,
        name: str = "vitlora",
        version: int | str | None = None,
        **kwargs,
    ) -> None:
        """``save_dir`` None: ``runs``; the CLI puts it under ``--trainer.default_root_dir`` (see :func:`place_run_logger`)."""
        super().__init__(save_dir or "runs", name=name, version=version, default_hp_metric=False, **kwargs)
        self._rows: list[dict] = []

    @rank_zero_only
    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        super().log_metrics(metrics, step)
        self._rows.append({"step": step, **{k: float(v) for k, v in metrics.items()}})

    @rank_zero_only
    def continue_at(self, step: int) -> None:
        """Continues this folder's logs at global step ``step``, where a fit resumed from a checkpoint:
        ``metrics.csv`` keeps its rows from before that step, and TensorBoard drops the interrupted
        run's events from that step on (they are logged again), instead of showing both.

        Lightning logs a batch's metrics at the step count before its optimizer step, so the rows a
        checkpoint of step G covers are those logged at steps below G."""
        if self._experiment is not None:  # purge_step acts only when a writer starts
            self._experiment.close()
            self._experiment = None
        self._kwargs["purge_step"] = step
        try:
            self.experiment  # noqa: B018 (starts the writer now, which purges)
        finally:
            del self._kwargs["purge_step"]  # a writer this logger starts later must not purge again
        path = Path(self.log_dir) / "metrics.csv"
        if not path.is_file():
            return
        with open(path, newline="") as handle:
            earlier = [
                {"step": int(float(row["step"])), **{k: float(v) for k, v in row.items() if k != "step" and v != ""}}
                for row in csv.DictReader(handle)
                if row.get("step") not in (None, "") and int(float(row["step"])) < step
            ]
        self._rows[:0] = earlier

    @property
    def rows(self) -> list[dict]:
        """Every logged metric so far, one dict per logging call (``step`` and the metrics)."""
        return self._rows

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


def place_run_logger(config, subcommand: str) -> None:
    """Where a run logger without an explicit ``save_dir`` writes (``config``: the subcommand's namespace).

    fit: under ``--trainer.default_root_dir`` (default ``runs``). validate, test and predict of a
    checkpoint in ``<run>/checkpoints/``: into ``<run>/<subcommand>/``, beside the fit that made it
    (also with the run's own ``config.yaml``), unless a logger ``version`` is given.
    """
    logger = config.trainer.logger
    if not hasattr(logger, "init_args") or not str(logger.class_path).endswith("RunLogger"):
        return
    ckpt = Path(config.get("ckpt_path") or "")
    evaluating = subcommand in ("validate", "test", "predict") and ckpt.parent.name == "checkpoints"
    if evaluating and logger.init_args.get("version") is None:  # a new version_N is never the place for it
        run = ckpt.parent.parent
        logger.init_args.save_dir, logger.init_args.name = str(run.parent.parent), run.parent.name
        logger.init_args.version, logger.init_args.sub_dir = run.name, subcommand
    elif logger.init_args.get("save_dir") is None:
        logger.init_args.save_dir = config.trainer.get("default_root_dir") or "runs"
