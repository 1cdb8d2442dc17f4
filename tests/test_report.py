"""The test report's pictures: a labelled, row-normalised confusion matrix with its worst pairs, and training curves."""

import torch
from PIL import Image

from vitlora.training.report import confusion_image, most_confused, write_training_curves


def test_most_confused_pairs_are_ranked_by_images_with_row_rates():
    confusion = torch.tensor([[8, 2, 0], [3, 1, 0], [0, 0, 5]])
    assert [line.split() for line in most_confused(confusion, ["apple", "pear", "kiwi"], 5)] == [
        ["pear", "->", "apple", "75%", "(3)"],
        ["apple", "->", "pear", "20%", "(2)"],
    ]


def test_confusion_image_of_81_classes_is_large_enough_to_read_every_name():
    names = [f"class-name-{i}" for i in range(81)]
    confusion = torch.eye(81, dtype=torch.long) * 3 + torch.roll(torch.eye(81, dtype=torch.long), 1, dims=1)
    image = confusion_image(confusion, names)
    assert image.height >= 81 * 10 and image.width > image.height  # rows of readable text, plus the pair list


def test_training_curves_plot_loss_per_step_and_top1_per_epoch(tmp_path):
    rows = [{"step": s, "train/loss": 2.0 / (s + 1)} for s in range(10)]
    rows += [{"step": 4, "epoch": 0, "val/top1": 0.5}, {"step": 9, "epoch": 1, "val/top1": 0.7}]
    path = write_training_curves(rows, tmp_path / "curves.png")
    assert Image.open(path).size == (1100, 420)
