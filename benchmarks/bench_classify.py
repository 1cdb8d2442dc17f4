"""Catalog-scale `vitlora classify` throughput vs the model's own forward-only throughput, side by side.

    python benchmarks/bench_classify.py --weights ../shared/weights/vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors \
        --photos ../shared/data/grocery-store/train --images 2000

classify: :func:`vitlora.inference.classify_files` on the first ``--images`` photos (decoded
in DataLoader workers, written to a CSV as it goes). Forward only: the same adapter model on
random tensors, the same number of images at the same batch size. The two alternate
(forward, classify, forward, ...) and the ratio is classify's images/s over the forward passes'
median.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from vitlora import LoRAConfig, inject_lora, save_adapter
from vitlora.apply import build_model_with_adapter
from vitlora.backbone import create_backbone
from vitlora.datasets import IMAGE_SUFFIXES
from vitlora.inference import classify_files

MODEL = "vit_tiny_patch16_224"


def forward_only(model: torch.nn.Module, images: int, batch_size: int) -> float:
    """Images/s of the model alone on random batches."""
    batch = torch.randn(batch_size, 3, 224, 224)
    start = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, images, batch_size):
            model(batch[: min(batch_size, images - first)])
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", required=True)
    parser.add_argument("--photos", required=True, type=Path)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    photos = sorted(p for p in args.photos.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[: args.images]
    if len(photos) < args.images:
        raise SystemExit(f"{args.photos}: only {len(photos)} photos")
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        torch.manual_seed(0)
        adapter = save_adapter(
            inject_lora(create_backbone(MODEL, 81, weights=args.weights), LoRAConfig(rank=8)), folder / "a.safetensors"
        )
        model, _ = build_model_with_adapter(adapter, args.weights)
        forward, classify = [forward_only(model, len(photos), args.batch_size)], []
        for round_ in range(args.rounds):
            output = folder / f"predictions{round_}.csv"
            start = time.perf_counter()
            written, _ = classify_files(
                adapter, photos, output, weights=args.weights, batch_size=args.batch_size,
                num_workers=args.num_workers, progress=False,
            )  # fmt: skip
            classify.append(written / (time.perf_counter() - start))
            forward.append(forward_only(model, len(photos), args.batch_size))
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; torch {torch.__version__}"
    )
    print(f"command: {' '.join(sys.argv)}\n")
    reference = statistics.median(forward)
    print(f"| {len(photos)} images, batch {args.batch_size} | images/s | vs forward only |\n|---|---|---|")
    print(f"| forward only (random tensors) | {reference:.1f} | 1.000 |")
    rate = statistics.median(classify)
    print(f"| vitlora classify ({args.num_workers} workers, CSV) | {rate:.1f} | {rate / reference:.3f} |")
    print(f"\nrounds: forward {[round(r, 1) for r in forward]}, classify {[round(r, 1) for r in classify]}")


if __name__ == "__main__":
    main()
