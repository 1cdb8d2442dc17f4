"""Checkpoints that survive ``kill -9``: written atomically, and every N optimizer steps if asked.

Lightning's ``TorchCheckpointIO`` writes straight to the final path, so a kill during a save
leaves a truncated ``last.ckpt``; :class:`AtomicCheckpointIO` writes beside it and renames.
A step checkpoint refreshes the same ``last.ckpt`` the epoch-end checkpoint writes, so
``vitlora fit --ckpt_path .../last.ckpt`` always resumes from the newest state, also inside an
epoch: :class:`ResumeInsideEpoch` makes the training sampler skip the batches already trained on.
"""

from __future__ import annotations

import warnings
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from vitlora.datasets import EpochShuffler
from vitlora.files import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temporary file beside the checkpoint, fsync, then rename over it."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        with atomic_write(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)


def step_checkpoint(every_n_steps: int) -> ModelCheckpoint:
    """Refreshes ``last.ckpt`` every ``every_n_steps`` optimizer steps (no other files)."""
    if every_n_steps < 1:
        raise ValueError(f"checkpoint_every_n_steps must be a positive number of steps, got {every_n_steps}.")
    return ModelCheckpoint(
        every_n_train_steps=every_n_steps, save_top_k=0, save_last=True, enable_version_counter=False
    )


class LastCheckpointAtEnd(Callback):
    """``last.ckpt`` holds the final weights when fit ends.

    Lightning refreshes ``last.ckpt`` only in a step where a checkpoint is saved (a better val
    score, or every N steps): a run whose last validation did not improve ended with a
    ``last.ckpt`` some steps old, so exporting it did not give the trained adapter.
    """

    def on_train_end(self, trainer, pl_module) -> None:
        keepers = [callback for callback in trainer.checkpoint_callbacks if callback.save_last]
        if not keepers or max(c._last_global_step_saved for c in keepers) == trainer.global_step:
            return
        keeper = keepers[0]
        path = keeper.last_model_path or keeper.format_checkpoint_name({}, keeper.CHECKPOINT_NAME_LAST)
        trainer.save_checkpoint(path)
        for callback in keepers:  # they share one last.ckpt (no version counter)
            callback.last_model_path = path


class ResumeInsideEpoch(Callback):
    """Continues a run resumed from a checkpoint saved inside an epoch with the very next batch.

    Lightning restarts the training loader at the epoch's first batch (and has already drawn
    it, before the checkpoint was loaded): this tells the :class:`EpochShuffler` how many
    batches of the epoch are done and restarts the loader. Augmentation and per-step seeds
    depend on (seed, epoch, image) and the restored step count, so the rest of the run is
    the uninterrupted one's.
    """

    def on_train_start(self, trainer, pl_module) -> None:
        position = position_in_epoch(trainer)
        loader = trainer.train_dataloader
        if position is None or not isinstance(getattr(loader, "sampler", None), EpochShuffler):
            return
        epoch, batches_done = position
        if batches_done >= trainer.num_training_batches:  # saved at the epoch's end: Lightning starts the next
            return
        loader.sampler.resume(epoch, batches_done * loader.batch_size)
        iter(trainer.fit_loop._data_fetcher)  # a fresh iterator: Lightning only makes one before resuming
        warnings.filterwarnings("ignore", "You're resuming from a checkpoint that ended before the epoch ended")


def position_in_epoch(trainer) -> tuple[int, int] | None:
    """``(epoch, batches trained in it)`` when fit resumes from a checkpoint saved inside an epoch."""
    loop = trainer.fit_loop
    if not loop.restarting:
        return None
    return loop.epoch_progress.current.processed, loop.epoch_loop.batch_progress.current.processed
