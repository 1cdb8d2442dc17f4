"""Where in an image a model finds its answer, and how an adapter moved that from its pretrained base.

``explain_images`` (``vitlora explain``) writes one sheet per image and tables of the numbers;
``explain_pixels`` works on tensors; ``perturbation_curves`` checks a map's faithfulness.
See docs/explain.md for what the maps mean and what they do not prove.
"""

from vitlora.explain.attribution import METHODS, attribute_patches
from vitlora.explain.core import (
    Explanation,
    MapSummary,
    explain_pixels,
    summarize_map,
    update_disabled,
    with_heads_of,
)
from vitlora.explain.faithfulness import Curves, most_attributed_first, perturbation_curves, random_order
from vitlora.explain.run import explain_image_png, explain_images, write_explanations
from vitlora.explain.sheet import sheet_png

__all__ = [
    "METHODS",
    "Curves",
    "Explanation",
    "MapSummary",
    "attribute_patches",
    "explain_image_png",
    "explain_images",
    "explain_pixels",
    "most_attributed_first",
    "perturbation_curves",
    "random_order",
    "sheet_png",
    "summarize_map",
    "update_disabled",
    "with_heads_of",
    "write_explanations",
]
