"""matplotlib charts: marks where the numbers put them, labels that never overlap, a colour scale."""

import numpy as np
import pytest
import torch

from vitlora.charts import (
    SIZE,
    _place_labels,
    bar_chart,
    heatmap_image,
    line_chart,
    new_figure,
    scatter_chart,
)

C0, C1, C2 = (31, 119, 180), (255, 127, 14), (44, 160, 44)  # matplotlib's first three cycle colours
VIRIDIS_LOW, VIRIDIS_HIGH, GREY = (68, 1, 84), (253, 231, 36), (211, 211, 211)


def pixels_of(image, rgb) -> torch.Tensor:
    """(row, column) of every pixel of exactly this colour."""
    array = torch.from_numpy(np.asarray(image).astype(np.int32))
    return (array == torch.tensor(rgb, dtype=torch.int32)).all(-1).nonzero()


def test_bar_heights_are_proportional_to_the_values():
    image = bar_chart("throughput", ["a", "b", "c"], [10.0, 20.0, None], "images/s")
    assert image.size == SIZE
    a, b, missing = (pixels_of(image, rgb)[:, 0] for rgb in (C0, C1, C2))
    height_a, height_b = (int(rows.max() - rows.min() + 1) for rows in (a, b))
    assert height_b == pytest.approx(2 * height_a, rel=0.02)  # edge rows are antialiased
    assert a.max() == b.max()  # both stand on the zero line
    assert len(missing) == 0  # a missing value draws no bar


def test_scatter_points_go_right_with_x_and_up_with_y_on_a_log_axis():
    image = scatter_chart("acc", [("lora", 2_000, 80.0), ("full", 100_000, 90.0)], "params", "top-1", log_x=True)
    lora, full = (pixels_of(image, rgb).float().mean(0) for rgb in (C0, C1))
    assert full[1] > lora[1] and full[0] < lora[0]  # columns grow right, rows grow down


def test_scatter_points_closer_than_min_y_span_stay_close():
    points = [("lora", 2_000, 95.4), ("full", 100_000, 95.6)]
    rows = {}
    for span in (0.0, 2.0):
        image = scatter_chart("acc", points, "params", "top-1", log_x=True, min_y_span=span)
        rows[span] = abs(float(pixels_of(image, C0)[:, 0].float().mean() - pixels_of(image, C1)[:, 0].float().mean()))
    assert rows[0.0] > 0.4 * SIZE[1]  # left alone, 0.2 points fill most of the height
    assert 0.02 * SIZE[1] < rows[2.0] < 0.15 * SIZE[1]  # a 2-point axis: a tenth of it, still in order


def test_scatter_error_bars_reach_plus_and_minus_the_error():
    points = [("lora", 2_000, 95.0), ("full", 100_000, 95.0)]
    image = scatter_chart("acc", points, "params", "top-1", log_x=True, y_errors=[1.0, None], min_y_span=4.0)
    lora, full = (pixels_of(image, rgb)[:, 0] for rgb in (C0, C1))
    # with no bar a point is a dot about 9 px tall; a 1-point bar on a 4.8-point axis is ~40% of the plot
    assert int(full.max() - full.min()) < 15
    assert int(lora.max() - lora.min()) > 0.3 * SIZE[1]
    assert abs(float(lora.float().mean() - full.float().mean())) < 3  # centred on the point


def test_scatter_labels_of_close_points_do_not_overlap():
    figure = new_figure()
    axes = figure.add_subplot()
    points = [(f"method-{i}", 1.0 + i * 1e-3, 50.0 + i * 1e-3) for i in range(5)]
    axes.scatter([x for _, x, _ in points], [y for _, _, y in points])
    _place_labels(figure, axes, points)
    boxes = [text.get_window_extent() for text in axes.texts]
    assert len(boxes) == 5
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])


def test_line_chart_draws_every_series():
    image = line_chart("val", {"lora": [(1, 50.0), (2, 70.0)], "full": [(2, 60.0)]}, "step", "top-1")
    lora = pixels_of(image, C0)
    assert len(lora) > 40 and len(pixels_of(image, C1)) > 10  # lines, dots and legend swatches
    plot = lora[lora[:, 1] < image.width * 0.8]  # left of the legend
    left, right = plot[plot[:, 1] < plot[:, 1].float().mean()], plot[plot[:, 1] > plot[:, 1].float().mean()]
    assert left[:, 0].float().mean() > right[:, 0].float().mean()  # 50% at step 1 sits lower than 70% at step 2


def test_heatmap_has_a_colour_scale_and_greys_empty_cells():
    values = torch.tensor([[0.0, float("nan")], [1.0, 0.5]])
    image = heatmap_image(values, "a title that is shown whole", ["r0", "r1"], ["a-long-label", "b"], "norm")
    assert image.width >= 640 and image.height >= 360
    for rgb in (VIRIDIS_LOW, VIRIDIS_HIGH, GREY):
        assert len(pixels_of(image, rgb)) > 100  # low and high cells (and the colour bar), the empty cell
