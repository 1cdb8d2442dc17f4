"""The ``vitlora`` command: LightningCLI for fit/validate/test/predict, plus export and classify.

vitlora fit --config recipes/grocery_lora.yaml [--model.lora.rank 16 ...]
vitlora export --ckpt_path runs/.../last.ckpt --output grocery.safetensors
vitlora classify grocery.safetensors photos/ --output preds.csv [--weights BASE] [--top-k 5]
vitlora convert grocery.safetensors grocery-peft/ [--weights BASE]     # and back: a PEFT folder to .safetensors
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from vitlora.data import ImageDataModule
from vitlora.module import ImageClassifier
from vitlora.predictions import PredictionWriter, top_k_rows, write_predictions

if TYPE_CHECKING:
    from torch import nn

    from vitlora.adapter import Adapter

EXTRA_COMMANDS = ("export", "classify", "convert")


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
        {"export": export_command, "classify": classify_command, "convert": convert_command}[words[0]](words[1:])
        return
    if words[:1] in (["-h"], ["--help"]):
        print("Extra commands: vitlora export --help, vitlora classify --help, vitlora convert --help\n")
    VitloraCLI(
        ImageClassifier,
        ImageDataModule,
        trainer_defaults=trainer_defaults(),
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        args=argv,
    )


# --- export ----------------------------------------------------------------------------------


def export_command(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="vitlora export", description="Write a LoRA checkpoint as a vitlora adapter file."
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
    if hp.method != "lora":
        raise SystemExit(f"{ckpt_path}: a {hp.method!r} run has no LoRA adapter to export.")
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

    from vitlora.adapter import apply_adapter, read_adapter
    from vitlora.data import eval_transform, expand_image_paths
    from vitlora.images import BadImage, load_rgb

    adapter = read_adapter(adapter_path)
    model = apply_adapter(base_model(adapter, weights), adapter).eval()
    transform = eval_transform(adapter.model_name, (adapter.metadata.get("model_kwargs") or {}).get("img_size"))
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


def base_model(adapter: Adapter, weights: str | None = None, model_name: str | None = None) -> nn.Module:
    """The plain timm model an adapter belongs on, from its recorded (or the given) name and model kwargs."""
    from vitlora.adapter import AdapterError
    from vitlora.backbone import create_backbone

    name = model_name or adapter.model_name
    if not name:
        raise AdapterError(adapter.path, "records no timm model name to build the base model from.")
    kwargs = dict(adapter.metadata.get("model_kwargs") or {})
    return create_backbone(name, adapter.num_classes, weights=weights, **kwargs)


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
    path = convert(args.source, args.output, weights=args.weights, model_name=args.model)
    print(f"wrote {path}")


def convert(source: Path, output: Path, weights: str | None = None, model_name: str | None = None) -> Path:
    """vitlora file -> PEFT folder or PEFT folder -> vitlora file, through the base model both belong on."""
    from vitlora.adapter import apply_adapter, read_adapter, resave_metadata, save_adapter
    from vitlora.peft_format import export_peft, read_peft

    to_peft = source.suffix == ".safetensors"
    if to_peft == (output.suffix == ".safetensors"):
        raise SystemExit(f"convert {source} -> {output}: one must be a .safetensors file, the other a PEFT folder.")
    adapter = read_adapter(source) if to_peft else read_peft(source)
    if not (model_name or adapter.model_name):
        raise SystemExit(f"{source}: records no timm model name: pass --model NAME (and --weights BASE_FILE).")
    model = apply_adapter(base_model(adapter, weights, model_name), adapter)
    metadata = resave_metadata(adapter) | ({"model_name": model_name} if model_name else {})
    return export_peft(model, output, **metadata) if to_peft else save_adapter(model, output, **metadata)


if __name__ == "__main__":
    main()
