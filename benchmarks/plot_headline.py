"""The README's headline chart, drawn from the 12-epoch Grocery Store rows of benchmarks/RESULTS.md.

python benchmarks/plot_headline.py docs/headline.png
"""

from __future__ import annotations

import sys

from vitlora.charts import color, figure_image, new_figure

# method: (val top-1 %, trainable %, seconds per epoch on the 2-core CPU, file to ship in MB)
ROWS = {
    "LoRA r=8 q,v": (93.9, 1.59, 113, 0.36),  # adapter file
    "full fine-tuning": (93.2, 100.0, 130, 66.7),  # checkpoint
    "linear probe": (77.4, 0.28, 61, 0.06),  # adapter file; 8 epochs (plateaus by 6-8)
}
PANELS = (
    ("val top-1 (%)", 0, "{:.1f}"),
    ("trainable parameters (%)", 1, "{:g}"),
    ("time per epoch (s, 2-core CPU)", 2, "{:.0f}"),
    ("file to ship (MB)", 3, "{:g}"),
)


def main(output: str) -> None:
    figure = new_figure((1200, 330))
    figure.suptitle(
        "ViT-Ti on Grocery Store (81 classes, 296 val photos), 12 epochs (linear probe 8: it plateaus by 6)"
    )
    names = list(ROWS)
    for axes, (title, column, fmt) in zip(figure.subplots(1, len(PANELS)), PANELS, strict=True):
        values = [ROWS[name][column] for name in names]
        bars = axes.barh(names[::-1], values[::-1], color=[color(i) for i in range(len(names))][::-1])
        axes.bar_label(bars, labels=[fmt.format(v) for v in values[::-1]], padding=3)
        axes.set_title(title)
        axes.margins(x=0.3)
        axes.set_xticks([])
        if column:
            axes.set_yticks([])
    figure_image(figure).save(output)


if __name__ == "__main__":
    main(sys.argv[1])
