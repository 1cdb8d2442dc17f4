"""The ``vitlora`` command: LightningCLI for fit/validate/test/predict, plus export and classify.

vitlora fit --config recipes/grocery_lora.yaml [--model.lora.rank 16 ...]
vitlora export --ckpt_path runs/.../last.ckpt --output grocery.safetensors
vitlora classify grocery.safetensors photos/ --output preds.csv [--weights BASE] [--top-k 5]
vitlora merge grocery.safetensors --output model.safetensors [--format onnx] [--weights BASE]
vitlora inspect grocery.safetensors [--plot updates.png]
vitlora compare --config recipes/grocery_compare.yaml --output comparisons/grocery [--budget.max_epochs 1 ...]
vitlora convert grocery.safetensors grocery-peft/ [--weights BASE]     # and back: a PEFT folder to .safetensors
vitlora serve adapters/ [--weights BASE] [--port 8000] [--max-batch-size 32] [--admin-token TOKEN]
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from vitlora.data import ImageDataModule
from vitlora.module import ImageClassifier
from vitlora.predictions import PredictionWriter, top_k_rows, write_predictions

EXTRA_COMMANDS = ("export", "classify", "merge", "inspect", "compare", "convert", "serve")


class VitloraCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.backbone", "data.backbone")
        parser.link_arguments("model.img_size", "data.img_size")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")
        parser.link_arguments("seed_everything", "model.seed")
        parser.link_arguments("seed_everything", "data.seed")


def trainer_defaults() -> dict:
    return {
        "logger": {
            "class_path": "vitlora.logging.RunLogger",
            "init_args": {"save_dir": "runs", "name": "vitlora"},
        },
        "callbacks": [
            ModelCheckpoint(monitor="val/top1", mode="max", save_last=True, filename="best-{epoch}-{step}"),
            LearningRateMonitor(logging_interval="step"),
            PredictionWriter(),
        ],
        "log_every_n_steps": 10,
    }


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
            "serve": serve_command,
        }
        commands[words[0]](words[1:])
        return
    if words[:1] in (["-h"], ["--help"]):
        print("Extra commands: " + ", ".join(f"vitlora {command} --help" for command in EXTRA_COMMANDS) + "\n")
    build_cli(argv)


def build_cli(args: list[str] | None, *, run: bool = True, callbacks: Sequence[Callback] = ()) -> VitloraCLI:
    """The CLI of ``vitlora fit`` and friends; ``run=False`` only parses and instantiates, for callers
    (vitlora.measure) that drive the trainer themselves, with extra ``callbacks``."""
    defaults = trainer_defaults()
    defaults["callbacks"] += list(callbacks)
    return VitloraCLI(
        ImageClassifier,
        ImageDataModule,
        trainer_defaults=defaults,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        run=run,
        args=args,
    )


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
    path = export_adapter(args.ckpt_path, args.output, weights=args.weights)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")


def export_adapter(ckpt_path: Path, output: Path, weights: str | None = None) -> Path:
    from vitlora.adapter import save_adapter

    if not Path(ckpt_path).is_file():
        raise SystemExit(f"{ckpt_path}: no such checkpoint.")
    overrides = {"weights": weights} if weights else {}
    try:
        module = ImageClassifier.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True, **overrides)
    except FileNotFoundError as error:
        raise SystemExit(
            f"{error} The checkpoint rebuilds its frozen base from it: pass --weights BASE_FILE."
        ) from error
    hp = module.hparams
    if hp.method == "full":
        raise SystemExit(f"{ckpt_path}: a 'full' run trains every weight; it has no adapter to export.")
    model_kwargs = dict(hp.model_kwargs or {})
    if hp.img_size:
        model_kwargs["img_size"] = hp.img_size
    return save_adapter(
        module.model,
        output,
        class_names=module.class_names,
        model_name=hp.backbone,
        model_kwargs=model_kwargs,
    )


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
    parser.add_argument("--output", required=True, type=Path, help=".csv or .jsonl (written as it goes) or .json")
    parser.add_argument("--weights", help="local base weights file (offline machines)")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=2, help="processes decoding images (.csv/.jsonl)")
    parser.add_argument("--resume", action="store_true", help="skip the paths already in the .csv/.jsonl output")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.output.suffix in (".csv", ".jsonl"):
        from vitlora.inference import classify_files

        with exit_on_bad_input("classify"):
            written, failed = classify_files(
                args.adapter,
                args.inputs,
                args.output,
                weights=args.weights,
                top_k=args.top_k,
                batch_size=args.batch_size,
                num_workers=args.num_workers,
                resume=args.resume,
                progress=not args.no_progress,
            )
        print(f"wrote {written} predictions to {args.output}" + (f" ({failed} unreadable)" if failed else ""))
        return
    if args.output.suffix != ".json":
        raise SystemExit(f"{args.output}: the output must end in .csv, .jsonl or .json.")
    rows = classify(
        args.adapter,
        args.inputs,
        weights=args.weights,
        top_k=args.top_k,
        batch_size=args.batch_size,
    )
    write_predictions(rows, args.output)
    failed = sum(1 for row in rows if row["error"])
    print(f"wrote {len(rows)} predictions to {args.output}" + (f" ({failed} unreadable)" if failed else ""))


def classify(
    adapter_path: Path,
    inputs: list[Path],
    weights: str | None = None,
    top_k: int = 5,
    batch_size: int = 32,
) -> list[dict]:
    """Top-k rows per image; unreadable images get a row with ``error`` set instead of labels."""
    import torch

    from vitlora.adapter import build_model_with_adapter
    from vitlora.data import eval_transform, expand_image_paths
    from vitlora.images import BadImage, load_rgb

    model, adapter = build_model_with_adapter(adapter_path, weights)
    transform = eval_transform(adapter.model_name, adapter.model_kwargs.get("img_size"))
    names = adapter.class_names or [str(i) for i in range(adapter.num_classes)]
    rows: list[dict] = []
    pending: list[tuple[int, torch.Tensor]] = []

    def flush() -> None:
        with torch.inference_mode():
            probabilities = model(torch.stack([tensor for _, tensor in pending])).softmax(-1)
        predicted = top_k_rows([rows[i]["path"] for i, _ in pending], probabilities, names, top_k)
        for (i, _), row in zip(pending, predicted, strict=True):
            rows[i] = row
        pending.clear()

    for path in expand_image_paths(inputs):
        rows.append({"path": str(path), "labels": [], "probabilities": [], "error": ""})
        try:
            pending.append((len(rows) - 1, transform(load_rgb(path))))
        except BadImage as error:
            rows[-1]["error"] = str(error)
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    return rows


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


# --- serve -----------------------------------------------------------------------------------


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
    parser.add_argument("--max-batch-size", type=int, default=32, help="images per forward pass, adapters mixed")
    parser.add_argument("--batch-timeout", type=float, default=0.01, help="seconds a batch waits to fill")
    parser.add_argument("--workers", type=int, default=1, help="inference worker processes per device")
    parser.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--max-image-bytes", type=int, default=MAX_IMAGE_BYTES, help="largest image file accepted")
    parser.add_argument("--admin-token", help="enables POST/DELETE /adapters (or set VITLORA_ADMIN_TOKEN)")
    args = parser.parse_args(argv)
    with exit_on_bad_input("serve"):
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
