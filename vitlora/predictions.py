"""Top-k predictions per image, written as CSV or JSON: shared by `classify` and `predict`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from vitlora.files import atomic_write


def top_k_rows(paths: list[str], probabilities: torch.Tensor, class_names: list[str], k: int) -> list[dict]:
    values, indices = probabilities.topk(min(k, probabilities.shape[1]), dim=-1)
    return [
        {
            "path": path,
            "labels": [class_names[i] for i in idx],
            "probabilities": [round(v, 6) for v in vals],
            "error": "",
        }
        for path, vals, idx in zip(paths, values.tolist(), indices.tolist(), strict=True)
    ]


def write_predictions(rows: list[dict], output: Path) -> None:
    """``.json``: a list of rows; ``.csv``: path, label_1, prob_1, ..., error."""
    output = Path(output)
    with atomic_write(output) as tmp:
        if output.suffix == ".json":
            tmp.write_text(json.dumps(rows, indent=1))
            return
        k = max((len(row["labels"]) for row in rows), default=0)
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(
                [
                    "path",
                    *[c for i in range(1, k + 1) for c in (f"label_{i}", f"prob_{i}")],
                    "error",
                ]
            )
            for row in rows:
                pairs = [v for pair in zip(row["labels"], row["probabilities"], strict=True) for v in pair]
                writer.writerow([row["path"], *pairs, *[""] * (2 * k - len(pairs)), row["error"]])


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
