"""How near is a held-out photo to its nearest training twin, under each way of making folds?

    python benchmarks/bench_folds.py      # ../shared data and weights; about 2 min the first time

Cross-validation predicts the test score only if a held-out photo is as new to the model as a
test photo is. This measures, with the pretrained backbone's features (cosine similarity), how
close each held-out photo's most similar training photo of the same class is, for:
- ``random``: ``--data.folds 3`` (stratified random folds over train+val);
- ``appearance``: ``--data.folds 3 --data.fold_by appearance``;
- ``official val``: the dataset's own val split against its train split (another visit, as test is).
The features are the ones appearance folds use and cache. Exits with a message when ../shared is absent.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from vitlora.training.data import ImageDataModule

SHARED = Path(__file__).resolve().parents[2] / "shared"
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def nearest_twin(features: dict, held_out: list, training: list) -> torch.Tensor:
    """Each held-out sample's highest cosine similarity to a training sample of its class."""
    train_by_class: dict[int, torch.Tensor] = {}
    for label in {y for _, y in training}:
        train_by_class[label] = torch.stack([features[s] for s in training if s[1] == label])
    return torch.stack([(train_by_class[s[1]] @ features[s]).max() for s in held_out if s[1] in train_by_class])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=SHARED / "data" / "grocery-store")
    parser.add_argument(
        "--weights", type=Path, default=SHARED / "weights" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors"
    )
    parser.add_argument("--folds", type=int, default=3)
    args = parser.parse_args()
    if not args.root.is_dir() or not args.weights.is_file():
        sys.exit(f"bench_folds: needs {args.root} and {args.weights} (see ../shared's README).")

    def module(**kwargs) -> ImageDataModule:
        return ImageDataModule(str(args.root), weights=str(args.weights), num_workers=2, **kwargs)

    official = module().index.splits
    pooled = official["train"] + official["val"]
    raw = module().appearance_features(pooled)  # the cached features appearance folds use
    unit = torch.nn.functional.normalize(raw, dim=1)
    features = dict(zip(pooled, unit, strict=True))
    rows = {"official val (another visit)": nearest_twin(features, official["val"], official["train"])}
    for fold_by in ("random", "appearance"):
        scores = []
        for fold in range(args.folds):
            splits = module(folds=args.folds, fold=fold, fold_by=fold_by).index.splits
            scores.append(nearest_twin(features, splits["val"], splits["train"]))
        rows[f"{fold_by} {args.folds}-fold"] = torch.cat(scores)
    print(f"Nearest same-class training photo of each held-out photo, cosine similarity ({args.root.name}):\n")
    print("| held out | photos | " + " | ".join(f"q{int(q * 100)}" for q in QUANTILES) + " | share > 0.9 |")
    print("|---" * (len(QUANTILES) + 3) + "|")
    for name, values in rows.items():
        quantiles = torch.quantile(values, torch.tensor(QUANTILES))
        cells = " | ".join(f"{q:.3f}" for q in quantiles.tolist())
        print(f"| {name} | {len(values)} | {cells} | {(values > 0.9).float().mean():.0%} |")


if __name__ == "__main__":
    main()
