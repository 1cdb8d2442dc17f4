"""The LightningCLI behind ``vitlora fit|validate|test|predict``: recipes, links and trainer defaults.

``vitlora.cli`` runs it for the command line; ``vitlora.compare.measure`` builds it without
running, to drive the trainer itself with extra callbacks.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from vitlora.backbone import WeightsUnavailable
from vitlora.datasets import DatasetError
from vitlora.training.data import ImageDataModule
from vitlora.training.logging import place_run_logger
from vitlora.training.module import ImageClassifier
from vitlora.training.predictions import PredictionWriter
from vitlora.training.quiet import quiet_lightning
from vitlora.training.run_summary import RunSummary


class VitloraCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.backbone", "data.backbone")
        parser.link_arguments("model.img_size", "data.img_size")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")
        parser.link_arguments("seed_everything", "model.seed")
        parser.link_arguments("seed_everything", "data.seed")

    def before_instantiate_classes(self) -> None:
        place_run_logger(self.config[self.subcommand] if self.subcommand else self.config, self.subcommand or "")


def trainer_defaults() -> dict:
    return {
        "logger": {
            "class_path": "vitlora.training.logging.RunLogger",
            "init_args": {"save_dir": None, "name": "vitlora"},
        },
        "callbacks": [
            ModelCheckpoint(monitor="val/top1", mode="max", save_last=True, filename="best-{epoch}-{step}"),
            LearningRateMonitor(logging_interval="step"),
            PredictionWriter(),
            RunSummary(),
        ],
        "log_every_n_steps": 10,
        "enable_model_summary": False,  # ImageClassifier prints its own: parameters by group, trainable %
    }


def build_cli(args: list[str] | None, *, run: bool = True, callbacks: Sequence[Callback] = ()) -> VitloraCLI:
    """The CLI of ``vitlora fit`` and friends.

    Args:
        args: the command line after ``vitlora`` (``["fit", "--config", ...]``), or None for sys.argv.
        run: False only parses and instantiates, for callers that drive the trainer themselves.
        callbacks: extra trainer callbacks, after the defaults.
    """
    quiet_lightning()
    defaults = trainer_defaults()
    defaults["callbacks"] += list(callbacks)
    try:
        return VitloraCLI(
            ImageClassifier,
            ImageDataModule,
            trainer_defaults=defaults,
            save_config_kwargs={"overwrite": True},
            seed_everything_default=0,
            run=run,
            args=args,
        )
    except (DatasetError, WeightsUnavailable, FileNotFoundError) as error:  # they name the path and the fix
        command = (args or sys.argv[1:] or ["fit"])[0]
        raise SystemExit(f"vitlora {command}: {error}") from error
