"""Pair two methods' cross-validated runs from two `vitlora compare` outputs, image by image.

    python benchmarks/pair_runs.py comparisons/confirm/runs/lora comparisons/confirm_full/runs/full

One comparison holding both methods pairs them in its report; this does the same for methods trained
by separate comparisons on the same folds (same recipe seed, `--folds`, `--data.fold_by`), e.g. a
confirmation of LoRA and a later one of full fine-tuning. Only folds finished in both are paired, and
a fold whose held-out photos differ between the two is refused: the runs were not on the same folds.
Per fold and pooled: each method's top-1, the difference, McNemar's exact p and a paired bootstrap
interval (vitlora.compare.paired.paired_by_fold, with the functions the report uses).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vitlora.compare.paired import paired_by_fold
from vitlora.compare.runner import finished_fold_predictions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", type=Path, help="a method's folder of fold runs: <output>/runs/<method>")
    parser.add_argument("second", type=Path, help="the other method's, trained on the same folds")
    args = parser.parse_args()
    try:
        rows = paired_by_fold(finished_fold_predictions(args.first), finished_fold_predictions(args.second))
    except ValueError as error:  # a missing folder, unmatched folds, an unreadable predictions file: named
        raise SystemExit(f"pair_runs: {error}") from None
    print(
        f"| folds | photos | {args.first.name} | {args.second.name} | difference (95% interval) | only first / only second right | McNemar p |"
    )
    print("|---|---|---|---|---|---|---|")
    for label, pair in rows:
        low, high = pair.interval
        print(
            f"| {label} | {pair.images:,} | {100 * pair.first_accuracy:.1f} | {100 * pair.second_accuracy:.1f} | "
            f"{100 * pair.difference:+.1f} ({100 * low:+.1f} to {100 * high:+.1f}) | "
            f"{pair.first_only} / {pair.second_only} | {pair.p_value:.2g} |"
        )


if __name__ == "__main__":
    main()
