"""A normal run prints what matters: Lightning's advertising tip and a deprecation warning from
inside Lightning are noise to a person training a model."""

from __future__ import annotations

import logging
import warnings

NOISE = ("💡 Tip:", "Loading `train_dataloader` to estimate")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(NOISE)


def quiet_lightning() -> None:
    """Drops Lightning's logger tip, its ``LeafSpec`` deprecation warning, the checkpoint-folder
    warning of an evaluation run from another folder, and the log-interval warning
    (:class:`~vitlora.training.run_summary.RunSummary` shortens the interval for short epochs)."""
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)  # "Seed set to 0"
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        target = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in target.filters):
            target.addFilter(_DropNoise())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")  # vitlora.cli passes them
    warnings.filterwarnings("ignore", message=r"The dirpath has changed from")  # evaluating a run from elsewhere
    warnings.filterwarnings("ignore", message=r"The number of training batches .* is smaller than the logging interval")
