"""Heatmap pictures: the confusion matrix and any other table of values in [0, 1], drawn with PIL."""

import torch

from vitlora.charts import heatmap_image
from vitlora.training.report import confusion_image


def cell_colour(image, origin, size, row, column):
    """The colour at the centre of a cell, given the top-left corner of the grid and the cell size."""
    return image.getpixel((origin[0] + size[0] * column + size[0] // 2, origin[1] + size[1] * row + size[1] // 2))


def test_confusion_image_shades_row_rates_blue_on_the_diagonal_and_red_off_it():
    image = confusion_image(torch.tensor([[3, 1], [0, 4]]), ["a", "b"], cell=10)
    origin = (7 * 1 + 8, 24)  # one-letter labels; the title line
    assert image.size == (origin[0] + 2 * 10 + 2, origin[1] + 2 * 10 + 2)
    assert cell_colour(image, origin, (10, 10), 0, 0) == (64, 64, 255)  # 3/4 right: 255 * (1 - 0.75) = 63.75
    assert cell_colour(image, origin, (10, 10), 0, 1) == (255, 191, 191)  # 1/4 wrong
    assert cell_colour(image, origin, (10, 10), 1, 0) == (255, 255, 255)
    assert cell_colour(image, origin, (10, 10), 1, 1) == (0, 0, 255)


def test_heatmap_widens_columns_for_their_labels_and_greys_empty_cells():
    values = torch.tensor([[0.0, float("nan")], [1.0, 0.5]])
    image = heatmap_image(values, "title", ["r0", "r1"], ["a-long-label", "b"], cell=16)
    origin, size = (7 * 2 + 8, 24 + 14), (7 * len("a-long-label") + 4, 16)  # the label row moves the grid down
    assert image.size == (origin[0] + 2 * size[0] + 2, origin[1] + 2 * 16 + 2)
    assert cell_colour(image, origin, size, 0, 0) == (255, 255, 255)
    assert cell_colour(image, origin, size, 0, 1) == (200, 200, 200)
    assert cell_colour(image, origin, size, 1, 0) == (255, 0, 0)
    assert cell_colour(image, origin, size, 1, 1) == (255, 128, 128)  # no blue diagonal unless asked
