"""Are the explanation maps faithful? Deletion and insertion on Grocery val photos with a real adapter.

    python benchmarks/bench_explain.py ADAPTER --weights BASE [--images 200] [--steps 4] [--window 4]

For each val photo (a fixed, evenly spaced sample of ``--images``) the adapted model's predicted
class is explained with each method; its patches are then removed (deletion) or restored onto
a grey image (insertion) in the map's order, most attributed first, and in one random order per
photo, following the class's probability over ``--curve-steps`` points. A faithful map gives a
deletion AUC well below the random order's and an insertion AUC above it. Prints one table
(mean AUCs with a 95% interval, the share of photos where the map beats random, seconds per photo
per method) in Markdown. CPU-sized defaults: Integrated Gradients with --steps path steps, occlusion
of --window x --window patch squares. Exits with a message when the data or weights are absent.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from vitlora.apply import build_model_with_adapter
from vitlora.datasets import eval_transform, read_grocery
from vitlora.explain import METHODS, attribute_patches, most_attributed_first, perturbation_curves, random_order
from vitlora.explain.attribution import patch_index
from vitlora.images import load_rgb

SHARED = Path(__file__).resolve().parents[2] / "shared"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter", type=Path)
    parser.add_argument(
        "--weights", type=Path, default=SHARED / "weights" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors"
    )
    parser.add_argument("--root", type=Path, default=SHARED / "data" / "grocery-store")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--steps", type=int, default=4, help="integrated gradients' path steps")
    parser.add_argument("--window", type=int, default=4, help="occlusion square, in patches per side")
    parser.add_argument("--curve-steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


def mean_interval(values: list[float]) -> str:
    data = torch.tensor(values, dtype=torch.float64)
    half = 1.96 * data.std() / len(data) ** 0.5
    return f"{data.mean():.3f} ± {half:.3f}"


def report(args, model_name, count, correct, auc, wins, seconds, elapsed) -> None:
    """The Markdown table over the first ``count`` photos."""
    print(f"{count} Grocery val photos, {model_name} + {args.adapter.name} (top-1 on them {correct / count:.1%}),")
    print(
        f"IG steps {args.steps}, occlusion window {args.window}x{args.window} patches, {args.curve_steps + 1}-point curves;"
    )
    print(f"{platform.processor() or platform.machine()}, {args.threads} torch threads, torch {torch.__version__}, "
          f"{elapsed:.0f} s in all\n")  # fmt: skip
    print(
        "| order | deletion AUC (lower is better) | insertion AUC (higher is better) | beats random: del / ins | s per photo |"
    )
    print("| --- | --- | --- | --- | --- |")
    for method in (*METHODS, "random"):
        beat = (
            f"{wins[method]['deletion'] / count:.0%} / {wins[method]['insertion'] / count:.0%}"
            if method in wins
            else ""
        )
        timing = f"{seconds[method] / count:.2f}" if method in seconds else ""
        print(
            f"| {method} | {mean_interval(auc[method]['deletion'])} | {mean_interval(auc[method]['insertion'])} | {beat} | {timing} |",
            flush=True,
        )


def main() -> None:
    args = parse_args()
    for path in (args.adapter, args.weights, args.root):
        if not path.exists():
            sys.exit(f"{path} is absent: nothing to measure.")
    torch.set_num_threads(args.threads)
    model, adapter = build_model_with_adapter(args.adapter, args.weights)
    transform = eval_transform(adapter.model_name, adapter.model_kwargs.get("img_size"))
    samples = read_grocery(args.root).splits["val"]
    picked = [samples[round(i * len(samples) / args.images)] for i in range(min(args.images, len(samples)))]
    auc: dict[str, dict[str, list[float]]] = {m: {"deletion": [], "insertion": []} for m in (*METHODS, "random")}
    wins = {m: {"deletion": 0, "insertion": 0} for m in METHODS}
    seconds = dict.fromkeys(METHODS, 0.0)
    correct = 0
    started = time.perf_counter()
    for number, (path, label) in enumerate(picked):
        pixels = transform(load_rgb(path))[None]
        with torch.no_grad():
            target = model(pixels).argmax(-1)
        correct += int(target) == label
        patches = int(patch_index(model, *pixels.shape[-2:]).max()) + 1
        chance = perturbation_curves(
            model, pixels[0], int(target), random_order(patches, torch.Generator().manual_seed(number)),
            steps=args.curve_steps,
        )  # fmt: skip
        auc["random"]["deletion"].append(chance.deletion_auc)
        auc["random"]["insertion"].append(chance.insertion_auc)
        for method in METHODS:
            start = time.perf_counter()
            patch_map = attribute_patches(model, pixels, target, method, steps=args.steps, window=args.window)[0]
            seconds[method] += time.perf_counter() - start
            curves = perturbation_curves(
                model, pixels[0], int(target), most_attributed_first(patch_map), steps=args.curve_steps
            )
            auc[method]["deletion"].append(curves.deletion_auc)
            auc[method]["insertion"].append(curves.insertion_auc)
            wins[method]["deletion"] += curves.deletion_auc < chance.deletion_auc
            wins[method]["insertion"] += curves.insertion_auc > chance.insertion_auc
        if (number + 1) % 20 == 0 and number + 1 < len(picked):  # a running table: a long run can be read early
            report(args, adapter.model_name, number + 1, correct, auc, wins, seconds, time.perf_counter() - started)
    report(args, adapter.model_name, len(picked), correct, auc, wins, seconds, time.perf_counter() - started)


if __name__ == "__main__":
    main()
