"""Which test-time augmentation helps? Re-score finished runs with each TTA mode, image by image.

    python benchmarks/bench_tta.py /work/screen_app --method lora.img_size-224

TTA changes only evaluation, so the runs a `vitlora compare` already trained (every fold) are
scored again with ``model.tta`` none, flip and flip-zoom: the final weights of each fold run
(``checkpoints/last.ckpt``) on the very val images of that fold, as its config.yaml builds them.
Each mode is paired with the mode the run was trained with (McNemar's exact test, a paired
bootstrap interval), pooled over the folds, as `vitlora compare`'s report pairs methods, and the
ten weakest classes (under the run's own mode) are shown under every mode.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml

from vitlora.compare.measure import split_predictions
from vitlora.compare.paired import paired_comparison
from vitlora.inference import TTA_MODES
from vitlora.training.data import ImageDataModule
from vitlora.training.module import ImageClassifier


def fold_correctness(
    run: Path, modes: tuple[str, ...]
) -> tuple[dict[str, dict[str, bool]], dict[str, str], str, float]:
    """Per mode, image path -> right for the val images of this fold run; each image's class; the run's
    own mode; seconds per mode."""
    config = yaml.safe_load((run / "config.yaml").read_text())
    model = config["model"]  # the options vitlora fit links from the model (config.yaml leaves them out of data)
    linked = {key: model[key] for key in ("backbone", "img_size", "weights", "pretrained")}
    data = ImageDataModule(**config["data"], **linked, seed=config["seed_everything"])
    data.setup("validate")
    module = ImageClassifier.load_from_checkpoint(
        run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    module.eval()
    trained_with = module.hparams.tta
    samples = data.split_samples("val")
    labels = torch.tensor([label for _, label in samples])
    classes = {str(path): data.class_names[label] for path, label in samples}
    right, started = {}, time.perf_counter()
    for mode in modes:
        module.hparams.tta = mode
        correct = (split_predictions(module, data.val_dataloader()) == labels).tolist()
        right[mode] = {str(path): ok for (path, _), ok in zip(samples, correct, strict=True)}
    return right, classes, trained_with, (time.perf_counter() - started) / len(modes)


def weakest_classes_table(correct: dict[str, dict[str, bool]], classes: dict[str, str], ranked_by: str) -> str:
    """Top-1 per true class under every mode, for the ten classes weakest under ``ranked_by``."""
    per_class: dict[str, list[str]] = {}
    for path, name in classes.items():
        per_class.setdefault(name, []).append(path)

    def accuracy(mode: str, name: str) -> float:
        return 100 * sum(correct[mode][path] for path in per_class[name]) / len(per_class[name])

    weakest = sorted(per_class, key=lambda name: (accuracy(ranked_by, name), name))[:10]
    lines = [f"| class | images | {' | '.join(correct)} |", "|---|---|" + "---|" * len(correct)]
    for name in weakest:
        scores = " | ".join(f"{accuracy(mode, name):.1f}" for mode in correct)
        lines.append(f"| {name} | {len(per_class[name])} | {scores} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("output", type=Path, help="a vitlora compare --output folder")
    parser.add_argument("--method", required=True, help="the method's folder under runs/")
    args = parser.parse_args()
    runs = sorted((args.output / "runs" / args.method).glob("fold*")) or [args.output / "runs" / args.method]
    correct: dict[str, dict[str, bool]] = {mode: {} for mode in TTA_MODES}
    classes: dict[str, str] = {}
    seconds, trained_with = 0.0, "flip"
    for run in runs:
        right, fold_classes, trained_with, per_mode = fold_correctness(run, TTA_MODES)
        classes |= fold_classes
        seconds += per_mode
        for mode in TTA_MODES:
            correct[mode] |= right[mode]
        print(f"{run.name}: " + ", ".join(f"{m} {100 * sum(r.values()) / len(r):.2f}" for m, r in right.items()))
    images = len(correct[trained_with])
    print(f"\n{args.method}: {len(runs)} run(s), {images} val images, trained with tta {trained_with}\n")
    print(
        f"| tta | val top-1 | vs {trained_with}: points (95% interval) | McNemar p (only this right / only {trained_with}) |"
    )
    print("|---|---|---|---|")
    for mode in TTA_MODES:
        pair = paired_comparison(correct[mode], correct[trained_with])
        low, high = (100 * bound for bound in pair.interval)
        print(
            f"| {mode} | {100 * pair.first_accuracy:.2f} | {100 * pair.difference:+.2f} ({low:+.2f} to {high:+.2f}) "
            f"| {pair.p_value:.3f} ({pair.first_only} / {pair.second_only}) |"
        )
    print(f"\nweakest ten classes under {trained_with}, top-1 (%) per TTA mode:\n")
    print(weakest_classes_table(correct, classes, trained_with))
    print(f"\nval pass per mode and fold run: {seconds / len(runs):.0f} s on average")


if __name__ == "__main__":
    main()
