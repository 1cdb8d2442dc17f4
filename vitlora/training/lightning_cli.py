"""The LightningCLI behind ``vitlora fit|validate|test|predict``: recipes, links and trainer defaults.

``vitlora.cli`` runs it for the command line; ``vitlora.compare.measure`` builds it without
running, to drive the trainer itself with extra callbacks.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from vitlora.training.checkpoints import AtomicCheckpointIO, LastCheckpointAtEnd, ResumeInsideEpoch, step_checkpoint
from vitlora.training.data import ImageDataModule
from vitlora.training.logging import place_run_logger
from vitlora.training.module import ImageClassifier
from vitlora.training.predictions import PredictionWriter
from vitlora.training.quiet import quiet_lightning
from vitlora.training.run_summary import RunSummary

EVALUATION_SETTINGS = ("tta", "explain_worst")  # how a model is scored, not what its weights are


class VitloraCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.backbone", "data.backbone")
        parser.link_arguments("model.img_size", "data.img_size")
        parser.link_arguments("model.weights", "data.weights")
        parser.link_arguments("model.pretrained", "data.pretrained")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")
        parser.link_arguments("data.fine_to_coarse", "model.fine_to_coarse", apply_on="instantiate")
        parser.link_arguments("data.coarse_class_names", "model.coarse_class_names", apply_on="instantiate")
        parser.link_arguments("seed_everything", "model.seed")
        parser.link_arguments("seed_everything", "data.seed")
        parser.add_argument(
            "--checkpoint_every_n_steps",
            type=int | None,
            default=None,
            help="also refresh last.ckpt every N optimizer steps: a killed run resumes inside its epoch",
        )

    def _parse_ckpt_path(self) -> None:
        """Lightning puts a checkpoint's model settings over the recipe's and the command line's, so that
        the weights fit. How the model is scored (EVALUATION_SETTINGS) is the user's to choose: what they
        asked for wins. Of the rest, name what the checkpoint overrides, so that a resume with another
        ``--model.lr`` is not a silent surprise."""
        subcommand = self.config.get("subcommand")
        if not subcommand or not self.config[subcommand].get("ckpt_path"):
            return super()._parse_ckpt_path()
        config = self.config[subcommand]
        asked = flat_settings(config.get("model"))
        defaults = flat_settings(self._subcommand_parsers[subcommand].get_defaults().get("model"))
        super()._parse_ckpt_path()
        config = self.config[subcommand]
        chosen = [key for key in asked if not same_setting(asked[key], defaults.get(key))]
        for key in EVALUATION_SETTINGS:
            if key in chosen:
                config[f"model.{key}"] = asked[key]
        kept = flat_settings(config.get("model"))
        ignored = [
            f"model.{key}={asked[key]} (checkpoint: {kept.get(key, 'none')})"
            for key in chosen
            if not same_setting(asked[key], kept.get(key))
        ]
        if ignored:
            print(
                f"note: {config.ckpt_path} keeps the model settings it was trained with; ignored: {', '.join(ignored)}",
                file=sys.stderr,
            )

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        every_n_steps = self._get(self.config_init, "checkpoint_every_n_steps")
        if every_n_steps is not None:  # a checkpoint callback: Lightning keeps those last
            trainer.callbacks.append(step_checkpoint(every_n_steps))
        return trainer

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        place_run_logger(config, self.subcommand or "")
        precision = native_precision(config.trainer.precision, config.trainer.accelerator)
        if precision != config.trainer.precision:
            print(
                f"note: this CPU has no bf16 instructions (AVX512-BF16 or AMX), where {config.trainer.precision} "
                f"runs ~20x slower than float32: training in {precision} instead.",
                file=sys.stderr,
            )
            config.trainer.precision = precision


def same_setting(a: object, b: object) -> bool:
    """Equal as the config writes them, or as paths (``../weights.safetensors`` and its absolute form)."""
    if str(a) == str(b):
        return True
    return isinstance(a, str) and isinstance(b, str) and Path(a).resolve() == Path(b).resolve()


def flat_settings(namespace, prefix: str = "") -> dict[str, object]:
    """A config namespace (or dict) as ``{"lora.rank": 8, ...}``."""
    items = namespace.as_dict() if hasattr(namespace, "as_dict") else namespace
    flat: dict[str, object] = {}
    for key, value in (items or {}).items():
        if isinstance(value, dict):
            flat |= flat_settings(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def native_precision(precision, accelerator) -> str | int | None:
    """``precision``, or 32-true where it asks for bf16 on a CPU that would only emulate it.

    Without AVX512-BF16 or AMX, oneDNN emulates bf16 and a ViT step takes ~20x longer than in
    float32; the recipes ask for bf16-mixed because GPUs and recent CPUs run it natively."""
    if not str(precision).startswith("bf16") or not runs_on_cpu(accelerator):
        return precision
    return precision if cpu_has_bf16() else "32-true"


def cpu_has_bf16() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def runs_on_cpu(accelerator) -> bool:
    if str(accelerator) == "cpu":
        return True
    if str(accelerator) != "auto":
        return False
    return not torch.cuda.is_available() and not torch.backends.mps.is_available()


def trainer_defaults() -> dict:
    return {
        "logger": {
            "class_path": "vitlora.training.logging.RunLogger",
            "init_args": {"save_dir": None, "name": "vitlora"},
        },
        "callbacks": [
            ModelCheckpoint(
                monitor="val/top1",
                mode="max",
                save_last=True,
                filename="best-{epoch}-{step}",
                enable_version_counter=False,  # one last.ckpt, shared with the step checkpoints
            ),
            LearningRateMonitor(logging_interval="step"),
            PredictionWriter(),
            ResumeInsideEpoch(),
            LastCheckpointAtEnd(),
            RunSummary(),
        ],
        "log_every_n_steps": 10,
        "enable_model_summary": False,  # ImageClassifier prints its own: parameters by group, trainable %
        "plugins": [{"class_path": f"{AtomicCheckpointIO.__module__}.{AtomicCheckpointIO.__name__}"}],
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
    return VitloraCLI(  # vitlora.cli turns the errors it raises for bad input into one line
        ImageClassifier,
        ImageDataModule,
        trainer_defaults=defaults,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        run=run,
        args=args,
    )
