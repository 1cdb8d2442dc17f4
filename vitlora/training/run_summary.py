"""What `vitlora fit` tells a person: the data and run folder at the start, one line per epoch
when no progress bar shows, and at the end the best checkpoint, its metrics and what to run next."""

from __future__ import annotations

import math
import shlex
import sys
from pathlib import Path

from lightning.pytorch.callbacks import Callback

CURVES_FILE = "training_curves.png"


class RunSummary(Callback):
    """Prints the opening and closing summary of a fit; writes its training curves into the run folder."""

    def __init__(self) -> None:
        self.validations: list[dict[str, float]] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        folder = trainer.log_dir  # a collective under DDP: every rank asks, rank 0 prints
        if not trainer.is_global_zero:
            return
        data = trainer.datamodule
        if data is not None and hasattr(data, "index"):
            print(describe_data(data))
        print(f"run folder: {folder}   (watch it: tensorboard --logdir {Path(folder).parent})")

    def on_train_start(self, trainer, pl_module) -> None:
        """Short epochs still log train/loss: Lightning logs every n-th step, n at most an epoch's steps."""
        batches = trainer.num_training_batches
        if math.isfinite(batches) and batches > 0:
            trainer.log_every_n_steps = max(1, min(trainer.log_every_n_steps, int(batches)))

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        self.validations.append({"epoch": trainer.current_epoch, "step": trainer.global_step, **metrics})
        if trainer.is_global_zero and (trainer.progress_bar_callback is None or not sys.stdout.isatty()):
            print(epoch_line(self.validations[-1], trainer.max_epochs), flush=True)

    def on_fit_end(self, trainer, pl_module) -> None:
        from vitlora.training.report import write_training_curves

        folder = Path(trainer.log_dir)  # a collective under DDP: every rank asks
        if not trainer.is_global_zero:
            return
        rows = getattr(trainer.logger, "rows", None)
        if rows:
            print(f"training curves: {write_training_curves(rows, folder / CURVES_FILE)}")
        checkpoint = trainer.checkpoint_callback
        best = getattr(checkpoint, "best_model_path", "") or getattr(checkpoint, "last_model_path", "")
        if not best:
            return
        print(f"best checkpoint: {best}")
        scored = [v for v in self.validations if "val/top1" in v]
        if scored:
            top = max(scored, key=lambda v: v["val/top1"])
            shown = ", ".join(f"{k} {v:.4f}" for k, v in top.items() if k.startswith("val/"))
            print(f"  at epoch {top['epoch'] + 1}, step {top['step']}: {shown}")
        quoted = shlex.quote(best)
        config = shlex.quote(str(folder / "config.yaml"))
        if pl_module.hparams.method != "full":
            print(f"next: vitlora export --ckpt_path {quoted} --output adapter.safetensors")
        data = trainer.datamodule
        evaluate = "test" if data is None or "test" in getattr(data.index, "splits", {"test": 0}) else "validate"
        print(f"      vitlora {evaluate} --config {config} --ckpt_path {quoted}")


def describe_data(data) -> str:
    """Root, layout, classes, images per split and images skipped: the data a run really uses."""
    index = data.index
    sizes = {split: len(samples) for split, samples in index.splits.items()}
    used = ", ".join(f"{split} {count - data.skipped.get(split, 0)}" for split, count in sizes.items())
    skipped = {split: n for split, n in data.skipped.items() if n}
    line = (
        f"data: {data.root} ({index.layout or data.hparams.layout}), {len(index.class_names)} classes; images: {used}"
    )
    if skipped:
        line += "; skipped (unreadable): " + ", ".join(f"{s} {n}" for s, n in skipped.items())
    return line


def epoch_line(metrics: dict[str, float], max_epochs: int | None) -> str:
    """``epoch 3/12 step 240: train/loss 0.812, val/top1 0.873 ...``: progress a log file can show."""
    shown = ", ".join(
        f"{k} {v:.4f}" for k, v in sorted(metrics.items()) if k.startswith(("train/loss", "val/")) and "_step" not in k
    )
    total = f"/{max_epochs}" if max_epochs and max_epochs > 0 else ""
    return f"epoch {int(metrics['epoch']) + 1}{total} step {int(metrics['step'])}: {shown}"
