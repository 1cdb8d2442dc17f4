"""A callback the DDP test passes to `vitlora fit` in a subprocess: every rank saves its trainable weights."""

from pathlib import Path

from lightning.pytorch.callbacks import Callback
from safetensors.torch import save_file

from vitlora.files import atomic_write


class SaveTrainableWeightsPerRank(Callback):
    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_train_end(self, trainer, module) -> None:
        state = {n: p.detach().contiguous() for n, p in module.model.named_parameters() if p.requires_grad}
        with atomic_write(self.folder / f"rank{trainer.global_rank}.safetensors") as tmp:
            save_file(state, tmp)
