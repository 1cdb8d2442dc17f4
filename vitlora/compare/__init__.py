"""`vitlora compare`: ways to adapt one backbone, trained on equal terms and reported side by side.

A compare config is the recipes users already know plus named sets of `vitlora fit` options::

    recipe: grocery_lora.yaml              # where every method starts (relative to this file)
    methods:
      lora: {}
      full: {recipe: grocery_full.yaml}    # a method may start from another recipe
      lora_r16: {model.lora.rank: 16}      # and change dotted options
    grid: {model.lr: [0.001, 0.0003]}      # optional: every method once per value (lora.lr-0.001, ...)
    folds: 5                               # optional: 5-fold cross-validation over train+val

Methods may differ only in how the model adapts and in the options a grid sweeps: seed, trainer,
data and backbone settings must otherwise be equal, or loading fails. Each run (a method, or one
fold of it) trains in a fresh process (vitlora.compare.measure), so its peak memory is its own,
up to one per GPU at once; this module gathers what those processes wrote into report.md,
report.json and charts, with a reading derived from the numbers.
"""

from __future__ import annotations

from vitlora.compare.config import Budget, CompareConfig, MethodSpec, load_compare_config, methods_from_recipes
from vitlora.compare.reading import comparison_reading
from vitlora.compare.result import MethodResult
from vitlora.compare.runner import compare_methods

__all__ = [
    "Budget",
    "CompareConfig",
    "MethodResult",
    "MethodSpec",
    "compare_methods",
    "comparison_reading",
    "load_compare_config",
    "methods_from_recipes",
]
