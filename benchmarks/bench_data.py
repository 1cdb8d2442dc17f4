"""Data-pipeline throughput (images/s) on the Grocery Store photos: is decoding what limits training?

    python benchmarks/bench_data.py                          # ../shared/data/grocery-store, workers 0 and 2
    python benchmarks/bench_data.py --root data/grocery-store --images 512 --workers 0 4 8 --device cuda

Stages, each timed through a DataLoader (batch --batch) for every worker count, after one warm-up
batch so worker start-up is not counted:
- ``decode``: vitlora's ``load_rgb`` (PIL decode + RGB conversion), to a uint8 tensor;
- ``train``: decode + the recipes' training transform (random-resized crop 25-100 %, flip,
  normalise) at --img-size, as ``ImageDataModule`` builds it;
- ``eval``: decode + resize, centre crop, normalise.
Then torchvision's ``decode_jpeg`` on the file bytes in the main process, and batched on the GPU
with ``--device cuda``. Compare with the images/s a training step consumes (bench_gpu.py).
One torch thread per process, as DataLoader workers have it.
Exits with a message when the dataset is absent.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch.utils.data import DataLoader
from torchvision.io import decode_jpeg
from torchvision.transforms.functional import pil_to_tensor

from vitlora.datasets import ImageDataset, read_dataset
from vitlora.training.data import ImageDataModule

DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "grocery-store"


def as_lists(batch: list) -> tuple[list, list]:
    """Decoded photos differ in size: keep them as a list instead of stacking."""
    return [image for image, _ in batch], [label for _, label in batch]


def throughput(dataset, batch: int, workers: int, collate_fn=None) -> float:
    loader = DataLoader(dataset, batch_size=batch, num_workers=workers, collate_fn=collate_fn)
    batches = iter(loader)
    first = len(next(batches)[0])
    start = time.perf_counter()
    count = sum(len(images) for images, _ in batches)
    seconds = time.perf_counter() - start
    return count / seconds if count else first / seconds


def torchvision_decode(paths: list[Path], device: str, batch: int) -> float:
    """images/s of ``decode_jpeg`` on bytes already read, in batches (the file reads are not timed)."""
    data = [torchvision.io.read_file(str(path)) for path in paths]
    decode_jpeg(data[:batch], device=device)  # warm-up (CUDA: initialises nvjpeg)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(0, len(data), batch):
        decode_jpeg(data[i : i + batch], device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return len(data) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--images", type=int, default=256, help="training photos timed per stage")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--backbone", default="vit_tiny_patch16_224.augreg_in21k_ft_in1k")
    parser.add_argument("--device", default="cpu", help="also time torchvision's decode_jpeg batched on this device")
    args = parser.parse_args()
    if not args.root.is_dir():
        print(f"{args.root}: no dataset here, nothing to measure (pass --root).")
        return
    torch.set_num_threads(1)  # as in DataLoader workers; several threads on tiny per-image ops only contend

    samples = read_dataset(args.root, layout="grocery").splits["train"][: args.images]
    data = ImageDataModule(
        str(args.root), backbone=args.backbone, img_size=args.img_size, auto_augment=None, scale=(0.25, 1.0)
    )
    stages = {
        "decode": ImageDataset(samples, pil_to_tensor),
        "train": ImageDataset(samples, data.transform(train=True), seed=0),
        "eval": ImageDataset(samples, data.transform(train=False)),
    }
    print(f"\n{len(samples)} Grocery Store training photos from {args.root}, batch {args.batch}, {args.img_size} px")
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; torch {torch.__version__}")
    print(f"command: {' '.join(sys.argv)}\n")
    print("| stage | " + " | ".join(f"{w} workers (images/s)" for w in args.workers) + " |")
    print("|---|" + "---|" * len(args.workers))
    for name, dataset in stages.items():
        collate = as_lists if name == "decode" else None
        rates = [throughput(dataset, args.batch, workers, collate) for workers in args.workers]
        print(f"| {name} | " + " | ".join(f"{rate:.0f}" for rate in rates) + " |")
    paths = [path for path, _ in samples]
    print(f"\n| torchvision decode_jpeg, batch {args.batch} | images/s |\n|---|---|")
    print(f"| cpu, main process | {torchvision_decode(paths, 'cpu', args.batch):.0f} |")
    if args.device != "cpu":
        print(f"| {args.device} | {torchvision_decode(paths, args.device, args.batch):.0f} |")


if __name__ == "__main__":
    main()
