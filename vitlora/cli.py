"""The ``vitlora`` command: LightningCLI for fit/validate/test/predict, plus vitlora's own commands.

vitlora fit --config recipes/grocery_lora.yaml [--model.lora.rank 16 ...]
vitlora export --ckpt_path runs/.../last.ckpt --output grocery.safetensors
vitlora classify grocery.safetensors photos/ [--output preds.csv] [--weights BASE] [--top_k 5]
vitlora merge grocery.safetensors --output model.onnx [--weights BASE]
vitlora inspect grocery.safetensors [--plot updates.png]
vitlora compare --config recipes/grocery_compare.yaml --output comparisons/grocery [--budget.max_epochs 1 ...]
vitlora convert grocery.safetensors grocery-peft/ [--weights BASE]     # and back: a PEFT folder to .safetensors
vitlora explain grocery.safetensors photo.jpg --output explained/ [--method occlusion] [--target_class NAME]
vitlora serve adapters/ [--weights BASE] [--port 8000] [--max_batch_size 32] [--admin_token TOKEN]

Every command is one line of :data:`COMMANDS`: its handler is imported only when it runs, so
``vitlora --help`` and a mistyped option answer without loading torch or Lightning. A mistake in
the input (a missing file, a bad adapter or dataset, an invalid option value) ends the command
with one line ``vitlora <command>: <problem>`` on stderr and exit status 1; ``--debug`` (or
``VITLORA_DEBUG=1``) shows the traceback instead. vitlora's own options take either spelling,
``--top_k`` or ``--top-k``: underscores match the Lightning commands' ``--ckpt_path``.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import shlex
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

COMMANDS: dict[str, tuple[str, str]] = {  # name -> ("module:function(argv)", one line for --help)
    "fit": ("vitlora.cli:fit_stage", "train from a recipe: --config FILE, --model.*, --data.*, --trainer.*"),
    "validate": ("vitlora.cli:validate_stage", "val metrics of a checkpoint (--ckpt_path)"),
    "test": ("vitlora.cli:test_stage", "test metrics, per-class accuracy and confusion matrix of a checkpoint"),
    "predict": ("vitlora.cli:predict_stage", "top-k predictions.csv of a checkpoint on the test split or paths"),
    "export": ("vitlora.cli:export_command", "write a training checkpoint's adapter as one .safetensors file"),
    "classify": ("vitlora.cli:classify_command", "top-k labels for image files and folders with an adapter"),
    "merge": ("vitlora.cli:merge_command", "fold an adapter into its base: a plain timm .safetensors or .onnx"),
    "inspect": ("vitlora.cli:inspect_command", "an adapter's config, classes and per-layer update norms and ranks"),
    "compare": ("vitlora.cli:compare_command", "train several methods alike and write one report"),
    "convert": ("vitlora.cli:convert_command", "a vitlora adapter to a PEFT folder, or a PEFT folder back"),
    "explain": ("vitlora.cli:explain_command", "where each image's evidence lies, with and without the adapter"),
    "serve": ("vitlora.cli:serve_command", "many adapters on one base over HTTP (LitServe), with a web page"),
}
DEBUG_FLAG = "--debug"


def main(argv: list[str] | None = None) -> None:
    """``argv`` for calls from Python (tests); the console script reads the command line."""
    words = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in words or None  # None: VITLORA_DEBUG decides
    words = [word for word in words if word != DEBUG_FLAG]
    if not words or words[0] in ("-h", "--help"):
        print(usage())
        if not words:
            raise SystemExit(2)
        return
    if words[0] == "--version":
        from vitlora._version import __version__

        print(f"vitlora {__version__}")
        return
    name = words[0]
    if name not in COMMANDS:
        if name.startswith("-"):  # LightningCLI's own options before the stage: vitlora -c cfg.yaml fit
            with exit_on_bad_input("vitlora", debug):
                return run_lightning(words)
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise SystemExit(f"vitlora: unknown command '{name}'{hint}; `vitlora --help` lists them.")
    with exit_on_bad_input(name, debug):
        handler(name)(words[1:])


def usage() -> str:
    width = max(map(len, [*COMMANDS, "--version"]))
    lines = [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(
        [
            "usage: vitlora <command> [options]      (vitlora <command> --help: its options)",
            "",
            "LoRA, prompt tokens and bias tuning for timm Vision Transformers: train, evaluate, ship.",
            "",
            "commands:",
            *lines,
            "",
            "options:",
            f"  {DEBUG_FLAG:<{width}}  show the traceback of an error (or set VITLORA_DEBUG=1)",
            f"  {'--version':<{width}}  print vitlora's version",
        ]
    )


def handler(name: str) -> Callable[[list[str]], None]:
    module, function = COMMANDS[name][0].split(":")
    return getattr(importlib.import_module(module), function)


@contextmanager
def exit_on_bad_input(command: str, debug: bool | None = None) -> Iterator[None]:
    """Library errors already name the file and the problem: show that line, not a traceback.

    Args:
        command: the subcommand, for the ``vitlora <command>:`` prefix.
        debug: re-raise with the traceback; None reads ``VITLORA_DEBUG``.

    Raises:
        SystemExit: with the one-line message (exit status 1), for a bad input.
    """
    try:
        yield
    except Exception as error:
        if debug or (debug is None and os.environ.get("VITLORA_DEBUG", "") not in ("", "0")):
            raise
        if not is_bad_input(error):
            raise
        problem = " ".join(str(error).split()) or type(error).__name__
        raise SystemExit(f"vitlora {command}: {problem}") from error


def is_bad_input(error: Exception) -> bool:
    """Errors that describe the user's input, not a bug: invalid values, files, weights, exports.

    Only classes of modules already loaded are checked: an error cannot come from one that is not.
    """
    kinds: list[type] = [ValueError, OSError]
    for module, name in (
        ("vitlora.backbone", "WeightsUnavailable"),
        ("vitlora.merge", "ExportError"),
        ("lightning.fabric.utilities.exceptions", "MisconfigurationException"),
    ):
        if module in sys.modules:
            kinds.append(getattr(sys.modules[module], name))
    return isinstance(error, tuple(kinds))


def both_spellings(option: str) -> list[str]:
    """``--top_k`` and ``--top-k``: vitlora's options accept either (underscores like Lightning's)."""
    snake = option.replace("-", "_").replace("__", "--", 1)
    kebab = "--" + snake[2:].replace("_", "-")
    return list(dict.fromkeys([snake, kebab]))


# --- fit, validate, test, predict: LightningCLI ----------------------------------------------


def run_lightning(words: list[str]) -> None:
    """Errors surface while jsonargparse instantiates the model and data, or inside the trainer."""
    from vitlora.training.lightning_cli import build_cli

    build_cli(words)


def fit_stage(argv: list[str]) -> None:
    run_lightning(["fit", *argv])


def validate_stage(argv: list[str]) -> None:
    run_lightning(["validate", *argv])


def test_stage(argv: list[str]) -> None:
    run_lightning(["test", *argv])


def predict_stage(argv: list[str]) -> None:
    run_lightning(["predict", *argv])


# --- export ----------------------------------------------------------------------------------


def export_command(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="vitlora export", description="Write a lora or linear checkpoint as a vitlora adapter file."
    )
    parser.add_argument(*both_spellings("--ckpt_path"), dest="ckpt_path", required=True, type=Path)
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--weights", help="base weights file, if the checkpoint's source moved")
    args = parser.parse_args(argv)
    from vitlora.training.export import export_adapter

    path = export_adapter(args.ckpt_path, args.output, weights=args.weights)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")


# --- compare ---------------------------------------------------------------------------------


def compare_command(argv: list[str]) -> None:
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
    parser.add_argument(
        *both_spellings("--latency_rounds"), dest="latency_rounds", type=int, default=10, help="timing rounds"
    )
    parser.add_argument("--folds", type=int, metavar="K", help="K-fold cross-validation over train+val (config: folds)")
    parser.add_argument("--resume", action="store_true", help="continue --output: rerun only unfinished runs")
    parser.add_argument(
        "--parallel", type=_parallel, default="auto", metavar="N|auto", help="runs at once, one per GPU (auto)"
    )
    parser.add_argument(
        "--grid", action="append", default=[], metavar="KEY=V1,V2", help="sweep an option (repeatable; config: grid)"
    )
    args, shared_args = parser.parse_known_args(argv)
    if (args.config is None) == (args.recipes is None):
        parser.error("give either --config or --recipes.")
    if args.methods and args.config is None:
        parser.error("--methods selects from a --config.")
    stray = [word for word in shared_args if word.startswith("-") and "." not in word.split("=")[0]]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    from vitlora.compare import Budget, CompareConfig, compare_methods, load_compare_config, methods_from_recipes
    from vitlora.compare.config import parse_grid_option

    budget = Budget(args.max_epochs, args.limit_train_batches, args.limit_val_batches)
    grid = dict(parse_grid_option(option) for option in args.grid)
    if args.config:
        config = load_compare_config(args.config, args.methods, grid)
    else:
        config = CompareConfig(methods_from_recipes(args.recipes, grid))
    results = compare_methods(
        config.methods,
        args.output,
        shared_args=shared_args,
        budget=budget,
        latency_rounds=args.latency_rounds,
        folds=args.folds if args.folds is not None else config.folds or 1,  # the command line wins
        parallel=args.parallel,
        resume=args.resume,
        command=shlex.join(["vitlora", "compare", *argv]),
    )
    print(f"wrote {args.output / 'report.md'}")
    failed = [result.name for result in results if not result.ok]
    if failed:
        raise SystemExit(f"{len(failed)} of {len(results)} methods failed ({', '.join(failed)}): see the report.")


def _parallel(text: str) -> int | str:
    """--parallel: a number of runs at once, or auto (one per visible GPU)."""
    return text if text == "auto" else int(text)


def _batches(text: str) -> int | float:
    """Lightning's limit_*_batches: a count of batches, or a fraction with a decimal point."""
    return float(text) if "." in text else int(text)


# --- classify --------------------------------------------------------------------------------


def classify_command(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="vitlora classify", description="Top-k labels for images with an adapter.")
    parser.add_argument("adapter", type=Path, help="a vitlora adapter file (.safetensors)")
    parser.add_argument("inputs", nargs="+", type=Path, help="image files or folders")
    parser.add_argument(
        "--output", type=Path, help=".csv or .jsonl (written as it goes), .json, or none: a table on stdout"
    )
    parser.add_argument("--weights", help="local base weights file (offline machines)")
    parser.add_argument(*both_spellings("--top_k"), dest="top_k", type=int, default=5)
    parser.add_argument(*both_spellings("--batch_size"), dest="batch_size", type=int, default=32)
    parser.add_argument(
        *both_spellings("--num_workers"), dest="num_workers", type=int, default=2, help="processes decoding images"
    )
    parser.add_argument("--resume", action="store_true", help="skip the paths already in the .csv/.jsonl output")
    parser.add_argument(*both_spellings("--no_progress"), dest="no_progress", action="store_true")
    args = parser.parse_args(argv)
    if args.adapter.suffix == ".ckpt":
        raise ValueError(
            f"{args.adapter}: a training checkpoint, not an adapter: "
            f"run `vitlora export --ckpt_path {args.adapter} --output ADAPTER.safetensors` first."
        )
    from vitlora.files import check_output_path
    from vitlora.inference import classify, classify_files, prediction_table, write_predictions

    def report(problem: str) -> None:
        print(f"vitlora classify: skipped {problem}", file=sys.stderr)

    if args.output is not None and args.output.suffix in (".csv", ".jsonl"):
        written, failed = classify_files(
            args.adapter, args.inputs, args.output, weights=args.weights, top_k=args.top_k,
            batch_size=args.batch_size, num_workers=args.num_workers, resume=args.resume,
            progress=not args.no_progress and sys.stderr.isatty(), on_unreadable=report,
        )  # fmt: skip
        summary = f"{written - failed} of {written} images classified" + (f", {failed} unreadable" if failed else "")
        print(f"wrote {args.output}: {summary}")
        return
    if args.output is not None:
        check_output_path(args.output, (".csv", ".jsonl", ".json"))
    rows = classify(
        args.adapter, args.inputs, weights=args.weights, top_k=args.top_k, batch_size=args.batch_size,
        num_workers=args.num_workers,
    )  # fmt: skip
    unreadable = [row["error"] for row in rows if row["error"]]
    for problem in unreadable:
        report(problem)
    summary = f"{len(rows) - len(unreadable)} of {len(rows)} images classified" + (
        f", {len(unreadable)} unreadable" if unreadable else ""
    )
    if args.output is None:
        print(prediction_table(rows))
        print(summary)
        return
    write_predictions(rows, args.output)
    print(f"wrote {args.output}: {summary}")


# --- merge and inspect -----------------------------------------------------------------------


def merge_command(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="vitlora merge", description="Fold an adapter into its base: one plain timm model for deployment."
    )
    parser.add_argument("adapter", type=Path)
    parser.add_argument("--output", required=True, type=Path, help="model.safetensors or model.onnx")
    parser.add_argument("--format", help="safetensors or onnx (default: from the --output suffix)")
    parser.add_argument("--weights", help="local base weights file (offline machines)")
    parser.add_argument("--tolerance", type=float, help="max |onnx - torch| logit (default 1e-4)")
    args = parser.parse_args(argv)
    from vitlora.merge import merge_adapter

    format = args.format or ("onnx" if args.output.suffix == ".onnx" else "safetensors")
    checks = {} if args.tolerance is None else {"tolerance": args.tolerance}
    path = merge_adapter(args.adapter, args.output, weights=args.weights, format=format, **checks)
    checked = ", onnxruntime matches torch" if format == "onnx" else ""
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB{checked})")


def inspect_command(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="vitlora inspect", description="Config, classes and per-layer update norms and ranks of an adapter."
    )
    parser.add_argument("adapter", type=Path)
    parser.add_argument("--plot", type=Path, help="write a blocks x targets heatmap of update norms (.png)")
    args = parser.parse_args(argv)
    from vitlora.inspection import inspect_adapter, write_update_heatmap

    summary = inspect_adapter(args.adapter)
    print(summary)
    if args.plot:
        print(f"wrote {write_update_heatmap(summary, args.plot)}")


# --- convert ---------------------------------------------------------------------------------


def convert_command(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="vitlora convert",
        description="Convert a vitlora adapter file (.safetensors) to a PEFT adapter folder, or a PEFT folder back.",
    )
    parser.add_argument("source", type=Path, help="a vitlora .safetensors adapter or a PEFT adapter folder")
    parser.add_argument("output", type=Path, help="a PEFT folder, or a .safetensors file for a PEFT source")
    parser.add_argument("--weights", help="local base weights file (offline machines)")
    parser.add_argument("--model", help="timm model name of the base, for PEFT adapters that record none")
    args = parser.parse_args(argv)
    from vitlora.peft_format import convert_adapter

    print(f"wrote {convert_adapter(args.source, args.output, weights=args.weights, model_name=args.model)}")


# --- explain and serve -----------------------------------------------------------------------


def explain_command(argv: list[str]) -> None:
    from vitlora.explain import METHODS, explain_images

    parser = argparse.ArgumentParser(
        prog="vitlora explain",
        description="Where each image's evidence lies, with the adapter's update and with it switched off: "
        "one PNG sheet per image plus explanations.csv/.json (docs/explain.md).",
    )
    parser.add_argument("adapter", type=Path)
    parser.add_argument("inputs", nargs="+", type=Path, help="image files or folders")
    parser.add_argument("--output", required=True, type=Path, help="folder for the sheets and tables")
    parser.add_argument("--weights", help="local base weights file (offline machines)")
    parser.add_argument("--method", nargs="+", choices=METHODS, default=[METHODS[0]], help="one sheet row each")
    parser.add_argument(
        *both_spellings("--target_class"), dest="target_class", help="explain this class instead of the predicted one"
    )
    parser.add_argument(*both_spellings("--top_k"), dest="top_k", type=int, default=5)
    parser.add_argument("--steps", type=int, default=32, help="integrated gradients' path steps")
    args = parser.parse_args(argv)
    records = explain_images(
        args.adapter,
        args.inputs,
        args.output,
        weights=args.weights,
        methods=args.method,
        target_class=args.target_class,
        top_k=args.top_k,
        steps=args.steps,
    )
    print(f"wrote {len({r['sheet'] for r in records})} sheets and explanations.csv/.json to {args.output}")


def serve_command(argv: list[str]) -> None:
    from vitlora.serving.limits import MAX_IMAGE_BYTES, Limits

    parser = argparse.ArgumentParser(
        prog="vitlora serve",
        description="Serve many adapters on one base model over HTTP (LitServe): POST /predict, GET /adapters, a page at /.",
    )
    parser.add_argument("sources", nargs="+", help="adapter .safetensors files or folders of them")
    parser.add_argument("--weights", help="local base weights file (offline machines)")
    parser.add_argument("--host", default="127.0.0.1", choices=["127.0.0.1", "0.0.0.0", "::"])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        *both_spellings("--max_batch_size"),
        dest="max_batch_size",
        type=int,
        default=32,
        help="images per forward pass, adapters mixed",
    )
    parser.add_argument(
        *both_spellings("--batch_timeout"),
        dest="batch_timeout",
        type=float,
        default=0.01,
        help="seconds a batch waits to fill",
    )
    parser.add_argument("--workers", type=int, default=1, help="inference worker processes per device")
    parser.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument(
        *both_spellings("--max_image_bytes"),
        dest="max_image_bytes",
        type=int,
        default=MAX_IMAGE_BYTES,
        help="largest image file accepted",
    )
    parser.add_argument(
        *both_spellings("--admin_token"),
        dest="admin_token",
        help="enables POST/DELETE /adapters (or set VITLORA_ADMIN_TOKEN)",
    )
    args = parser.parse_args(argv)
    from vitlora.serving.api import ServeConfig, serve

    serve(
        ServeConfig(
            tuple(args.sources),
            weights=args.weights,
            host=args.host,
            port=args.port,
            max_batch_size=args.max_batch_size,
            batch_timeout=args.batch_timeout,
            workers=args.workers,
            accelerator=args.accelerator,
            limits=Limits(max_image_bytes=args.max_image_bytes),
            admin_token=args.admin_token,
        )
    )


if __name__ == "__main__":
    main()
