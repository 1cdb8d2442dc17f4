"""`vitlora predict`'s writer: top-k per image into the run folder, one file under DDP."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from vitlora.inference import top_k_rows, write_predictions


class PredictionWriter(BasePredictionWriter):
    """Writes `vitlora predict` results to ``<log_dir>/predictions.csv`` (top-k per image)."""

    def __init__(self, top_k: int = 5, filename: str = "predictions.csv") -> None:
        super().__init__(write_interval="epoch")
        self.top_k, self.filename = top_k, filename

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        """Under DDP each rank predicted a share of the images: rank 0 gathers them and writes one file."""
        indices = [i for batch in batch_indices[0] for i in batch]
        probabilities = torch.cat(predictions).float().cpu() if predictions else torch.empty(0)
        if trainer.world_size > 1:  # every rank joins the gather, also one that got no images
            shares: list = [None] * trainer.world_size
            torch.distributed.all_gather_object(shares, (indices, probabilities))
            indices = [i for share, _ in shares for i in share]
            probabilities = torch.cat([share for _, share in shares if len(share)])
        folder = Path(trainer.log_dir or trainer.default_root_dir)  # a collective under DDP: every rank asks
        if not trainer.is_global_zero or not indices:
            return
        probabilities = probabilities[torch.tensor(indices).argsort()]  # back to the loader's order
        samples = trainer.datamodule.predict_samples
        rows = top_k_rows([str(path) for path, _ in samples], probabilities, pl_module.class_names, self.top_k)
        write_predictions(rows, folder / self.filename)
