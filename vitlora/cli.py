"""The ``vitlora`` command: LightningCLI for fit/validate/test/predict, plus export and classify.

vitlora fit --config recipes/grocery_lora.yaml [--model.lora.rank 16 ...]
vitlora export --ckpt_path runs/.../last.ckpt --output grocery.safetensors
vitlora classify grocery.safetensors photos/ --output preds.csv [--weights BASE] [--top-k 5]
vitlora merge grocery.safetensors --output model.safetensors [--format onnx] [--weights BASE]
vitlora inspect grocery.safetensors [--plot updates.png]
vitlora compare --config recipes/grocery_compare.yaml --output comparisons/grocery [--budget.max_epochs 1 ...]
vitlora convert grocery.safetensors grocery-peft/ [--weights BASE]     # and back: a PEFT folder to .safetensors
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

EXTRA_COMMANDS = ("export", "classify", "merge", "inspect", "compare", "convert")


def main(argv: list[str] | None = None) -> None:
    """``argv`` for calls from Python (tests); the console script reads the command line."""
    words = list(sys.argv[1:] if argv is None else argv)
    if words and words[0] in EXTRA_COMMANDS:
        commands = {
            "export": export_command,
            "classify": classify_command,
            "merge": merge_command,
            "inspect": inspect_command,
            "compare": compare_command,
            "convert": convert_command,
        }
        commands[words[0]](words[1:])
        return
    if words[:1] in (["-h"], ["--help"]):
        print("Extra commands: " + ", ".join(f"vitlora {command} --help" for command in EXTRA_COMMANDS) + "\n")
    from vitlora.training.lightning_cli import build_cli

    build_cli(argv)


@contextmanager
def exit_on_bad_input(command: str) -> Iterator[None]:
    """Library errors already name the file and the problem: show that line, not a traceback."""
    from vitlora.backbone import WeightsUnavailable
    from vitlora.merge import ExportError

    try:
        yield
    except (ValueError, OSError, ExportError, WeightsUnavailable) as error:
        raise SystemExit(f"vitlora {command}: {error}") from error


# --- export ----------------------------------------------------------------------------------


def export_command(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="vitlora export", description="Write a lora or linear checkpoint as a vitlora adapter file."
    )
    parser.add_argument("--ckpt_path", required=True, type=Path)
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--weights", help="base weights file, if the checkpoint's source moved")
    args = parser.parse_args(argv)
    from vitlora.training.export import export_adapter

    with exit_on_bad_input("export"):
        path = export_adapter(args.ckpt_path, args.output, weights=args.weights)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")


# --- compare ---------------------------------------------------------------------------------


def compare_command(argv: list[str]) -> None:
    from vitlora.compare import Budget, compare_methods, load_compare_config, methods_from_recipes

    parser = argparse.ArgumentParser(
        prog="vitlora compare",
        description="Train several methods on the same backbone, data, epochs and seed; write one report.",
        epilog="Any other --section.key value (e.g. --data.root DIR --model.weights FILE) goes to every method's fit.",
        allow_abbrev=False,
    )
    parser.add_argument("--config", type=Path, help="a compare config: a recipe and named methods")
    parser.add_argument("--recipes", nargs="+", type=Path, help="or recipes, one method each (named by file)")
    parser.add_argument("--methods", nargs="+", help="only these methods of --config, in this order")
    parser.add_argument("--output", required=True, type=Path, help="a new folder for the report and the runs")
    limits = parser.add_argument_group("budget", "a shorter run, the same for every method")
    limits.add_argument("--budget.max_epochs", dest="max_epochs", type=int, metavar="N")
    batches = {"type": _batches, "metavar": "N|FRACTION"}
    limits.add_argument(
        "--budget.limit_train_batches", dest="limit_train_batches", help="10, or 0.25 of them", **batches
    )
    limits.add_argument("--budget.limit_val_batches", dest="limit_val_batches", help="val and test batches", **batches)
    parser.add_argument("--latency-rounds", type=int, default=10, help="interleaved inference timing rounds")
    args, shared_args = parser.parse_known_args(argv)
    if (args.config is None) == (args.recipes is None):
        parser.error("give either --config or --recipes.")
    if args.methods and args.config is None:
        parser.error("--methods selects from a --config.")
    stray = [word for word in shared_args if word.startswith("-") and "." not in word.split("=")[0]]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    budget = Budget(args.max_epochs, args.limit_train_batches, args.limit_val_batches)
    with exit_on_bad_input("compare"):
        methods = load_compare_config(args.config, args.methods) if args.config else methods_from_recipes(args.recipes)
        results = compare_methods(
            methods,
            args.output,
            shared_args=shared_args,
            budget=budget,
            latency_rounds=args.latency_rounds,
            command=shlex.join(["vitlora", "compare", *argv]),
        )
    print(f"wrote {args.output / 'report.md'}")
    failed = [result.name for result in results if not result.ok]
    if failed:
        raise SystemExit(f"{len(failed)} of {len(results)} methods failed ({', '.join(failed)}): see the report.")


def _batches(text: str) -> int | float:
    """Lightning's limit_*_batches: a count of batches, or a fraction with a decimal point."""
    return float(text) if "." in text else int(text)


# --- classify --------------------------------------------------------------------------------


def classify_command(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="vitlora classify", description="Top-k labels for images with an adapter.")
    parser.add_argument("adapter", type=Path)
    parser.add_argument("inputs", nargs="+", type=Path, help="image files or folders")
    parser.add_argument("--output", required=True, type=Path, help="predictions .csv or .json")
    parser.add_argument("--weights", help="local base weights file (offline machines)")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    if args.output.suffix not in (".csv", ".json"):
        raise SystemExit(f"{args.output}: the output must end in .csv or .json.")
    from vitlora.inference import classify, write_predictions

    with exit_on_bad_input("classify"):
        rows = classify(args.adapter, args.inputs, weights=args.weights, top_k=args.top_k, batch_size=args.batch_size)
    write_predictions(rows, args.output)
    failed = sum(1 for row in rows if row["error"])
    print(f"wrote {len(rows)} predictions to {args.output}" + (f" ({failed} unreadable)" if failed else ""))


# --- merge and inspect -----------------------------------------------------------------------


def merge_command(argv: list[str]) -> None:
    from vitlora.merge import FORMATS, ONNX_TOLERANCE, merge_adapter

    parser = argparse.ArgumentParser(
        prog="vitlora merge", description="Fold an adapter into its base: one plain timm model for deployment."
    )
    parser.add_argument("adapter", type=Path)
    parser.add_argument("--output", required=True, type=Path, help="model.safetensors or model.onnx")
    parser.add_argument("--format", choices=FORMATS, default="safetensors")
    parser.add_argument("--weights", help="local base weights file (offline machines)")
    parser.add_argument("--tolerance", type=float, default=ONNX_TOLERANCE, help="max |onnx - torch| logit")
    args = parser.parse_args(argv)
    with exit_on_bad_input("merge"):
        path = merge_adapter(
            args.adapter, args.output, weights=args.weights, format=args.format, tolerance=args.tolerance
        )
    checked = f", onnxruntime matches torch within {args.tolerance:g}" if args.format == "onnx" else ""
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB{checked})")


def inspect_command(argv: list[str]) -> None:
    from vitlora.inspection import inspect_adapter, write_update_heatmap

    parser = argparse.ArgumentParser(
        prog="vitlora inspect", description="Config, classes and per-layer update norms and ranks of an adapter."
    )
    parser.add_argument("adapter", type=Path)
    parser.add_argument("--plot", type=Path, help="write a blocks x targets heatmap of update norms (.png)")
    args = parser.parse_args(argv)
    with exit_on_bad_input("inspect"):
        summary = inspect_adapter(args.adapter)
        print(summary)
        if args.plot:
            print(f"wrote {write_update_heatmap(summary, args.plot)}")


# --- convert ---------------------------------------------------------------------------------


def convert_command(argv: list[str]) -> None:
    from vitlora.peft_format import convert_adapter

    parser = argparse.ArgumentParser(
        prog="vitlora convert",
        description="Convert a vitlora adapter file (.safetensors) to a PEFT adapter folder, or a PEFT folder back.",
    )
    parser.add_argument("source", type=Path, help="a vitlora .safetensors adapter or a PEFT adapter folder")
    parser.add_argument("output", type=Path, help="a PEFT folder, or a .safetensors file for a PEFT source")
    parser.add_argument("--weights", help="local base weights file (offline machines)")
    parser.add_argument("--model", help="timm model name of the base, for PEFT adapters that record none")
    args = parser.parse_args(argv)
    with exit_on_bad_input("convert"):
        path = convert_adapter(args.source, args.output, weights=args.weights, model_name=args.model)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
