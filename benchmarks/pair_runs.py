"""Pair two methods' cross-validated runs from two `vitlora compare` outputs, image by image.

    python benchmarks/pair_runs.py comparisons/confirm/runs/lora comparisons/confirm_full/runs/full

One comparison holding both methods pairs them in its report; this does the same for methods trained
by separate comparisons on the same folds (same recipe seed, `--folds`, `--data.fold_by`), e.g. a
confirmation of LoRA and a later one of full fine-tuning. Only folds finished in both are paired, and
a fold whose held-out photos differ between the two is refused: the runs were not on the same folds.
Per fold and pooled: each method's top-1, the difference, McNemar's exact p and a paired bootstrap
interval (vitlora.compare.paired, as the report computes them).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from vitlora.compare.paired import PairedComparison, paired_comparison, read_correct
from vitlora.compare.result import PREDICTIONS_FILE
from vitlora.compare.runner import RESULT_FILE

VAL_PREDICTIONS = PREDICTIONS_FILE.format(split="val")
FOLD_RUN = re.compile(r"fold(\d+)")


def finished_folds(method_dir: Path) -> dict[int, Path]:
    """Fold number -> predictions file, for the fold runs of a method that finished."""
    if not method_dir.is_dir():
        raise SystemExit(f"pair_runs: {method_dir}: no such folder; give <output>/runs/<method>.")
    return {
        int(match[1]): run / VAL_PREDICTIONS
        for run in sorted(method_dir.iterdir())
        if run.is_dir() and (match := FOLD_RUN.fullmatch(run.name))
        if (run / RESULT_FILE).is_file() and (run / VAL_PREDICTIONS).is_file()
    }


def pair_rows(first_dir: Path, second_dir: Path) -> list[tuple[str, PairedComparison]]:
    """(label, PairedComparison) per fold finished in both, then pooled over those folds."""
    first, second = finished_folds(first_dir), finished_folds(second_dir)
    shared = sorted(first.keys() & second.keys())
    if not shared:
        raise SystemExit(
            f"pair_runs: no fold finished in both {first_dir} ({sorted(first)}) and {second_dir} ({sorted(second)})."
        )
    rows, pooled_first, pooled_second = [], {}, {}
    for fold in shared:
        a, b = read_correct([first[fold]]), read_correct([second[fold]])
        if a.keys() != b.keys():
            raise SystemExit(
                f"pair_runs: fold {fold} holds out other photos in {first[fold]} than in {second[fold]} "
                "(other folds, or another --data.root: photos are named by their path)."
            )
        rows.append((f"fold {fold}", paired_comparison(a, b)))
        pooled_first |= a
        pooled_second |= b
    if len(shared) > 1:
        rows.append((f"pooled ({len(shared)} folds)", paired_comparison(pooled_first, pooled_second)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", type=Path, help="a method's folder of fold runs: <output>/runs/<method>")
    parser.add_argument("second", type=Path, help="the other method's, trained on the same folds")
    args = parser.parse_args()
    try:
        rows = pair_rows(args.first, args.second)
    except ValueError as error:  # an unreadable predictions file, named in the message
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
