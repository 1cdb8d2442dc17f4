"""PIL charts: round ticks, and marks where the numbers put them."""

import pytest
import torch

from vitlora.charts import SIZE, bar_chart, color, line_chart, nice_ticks, scatter_chart


def pixels_of(image, rgb) -> torch.Tensor:
    """(row, column) of every pixel of exactly this colour."""
    array = torch.tensor(list(image.getdata()), dtype=torch.int32).view(image.height, image.width, 3)
    return (array == torch.tensor(rgb, dtype=torch.int32)).all(-1).nonzero()


@pytest.mark.parametrize(
    ("low", "high", "expected"),
    [
        (0, 87, [0, 20, 40, 60, 80, 100]),
        (0, 2243, [0, 500, 1000, 1500, 2000, 2500]),
        (33.3, 66.7, [30, 40, 50, 60, 70]),
    ],
)
def test_nice_ticks_are_round_and_cover_the_range(low, high, expected):
    assert nice_ticks(low, high) == pytest.approx(expected)


def test_nice_ticks_of_a_single_value_still_span_it():
    ticks = nice_ticks(5.0, 5.0)
    assert ticks[0] < 5.0 < ticks[-1]


def test_bar_heights_are_proportional_to_the_values():
    image = bar_chart("throughput", ["a", "b", "c"], [10.0, 20.0, None], "images/s")
    assert image.size == SIZE
    heights = [pixels_of(image, color(i))[:, 0] for i in range(3)]
    a, b = (int(rows.max() - rows.min() + 1) for rows in heights[:2])
    assert b == pytest.approx(2 * a, abs=2)
    assert heights[0].max() == heights[1].max()  # both stand on the zero line
    assert len(heights[2]) == 0  # a missing value draws no bar


def test_scatter_points_go_right_with_x_and_up_with_y_on_a_log_axis():
    image = scatter_chart("acc", [("lora", 2_000, 80.0), ("full", 100_000, 90.0)], "params", "top-1", log_x=True)
    lora, full = (pixels_of(image, color(i)).float().mean(0) for i in range(2))
    assert full[1] > lora[1] and full[0] < lora[0]  # columns grow right, rows grow down
    width = SIZE[0] - 64 - 24  # the plot's span: decades 10^3..10^5 here
    assert (full[1] - lora[1]).item() == pytest.approx(width * (5 - 3.30103) / 2, abs=3)


def test_line_chart_draws_every_series_and_its_legend():
    image = line_chart("val", {"lora": [(1, 50.0), (2, 70.0)], "full": [(2, 60.0)]}, "step", "top-1")
    for i in range(2):
        assert len(pixels_of(image, color(i))) > 40  # line or dot, plus the legend swatch
    lora = pixels_of(image, color(0))
    plot = lora[lora[:, 0] > 44]  # below the legend row
    left, right = plot[plot[:, 1] < plot[:, 1].float().mean()], plot[plot[:, 1] > plot[:, 1].float().mean()]
    assert left[:, 0].float().mean() > right[:, 0].float().mean()  # 50% at step 1 sits lower than 70% at step 2
