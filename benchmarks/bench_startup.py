"""How long the `vitlora` command takes to answer: --help, a subcommand's --help, and `inspect`.

Each command runs in a fresh interpreter, interleaved round by round with `python -c "import torch"`
(the floor of any command that touches tensors), so a busy machine slows all of them alike.

    python benchmarks/bench_startup.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tiny_adapter(folder: Path) -> Path:
    """A LoRA adapter file of a 2-block ViT: what `inspect` reads."""
    import timm

    from vitlora import LoRAConfig, inject_lora, save_adapter

    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=3,
        img_size=32,
        patch_size=8,
        depth=2,
        embed_dim=64,
        num_heads=2,
    )
    inject_lora(model, LoRAConfig(rank=4))
    return save_adapter(
        model, folder / "tiny.safetensors", class_names=["a", "b", "c"], model_name="vit_tiny_patch16_224"
    )


def seconds(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        adapter = tiny_adapter(Path(tmp))
        cli = [sys.executable, "-m", "vitlora.cli"]
        commands = {
            "vitlora --help": [*cli, "--help"],
            "vitlora inspect --help": [*cli, "inspect", "--help"],
            "vitlora fit --help": [*cli, "fit", "--help"],
            "vitlora inspect ADAPTER": [*cli, "inspect", str(adapter)],
            'python -c "import torch"': [sys.executable, "-c", "import torch"],
            'python -c "import timm"': [sys.executable, "-c", "import timm"],
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        seconds(commands["vitlora inspect ADAPTER"])  # warm the file cache
        for _ in range(args.rounds):
            for name, command in commands.items():
                times[name].append(seconds(command))
    torch_s = statistics.median(times['python -c "import torch"'])
    print(f"| command | median s ({args.rounds} rounds) | vs import torch |\n|---|---|---|")
    for name, values in times.items():
        print(f"| `{name}` | {statistics.median(values):.2f} | {statistics.median(values) / torch_s:.2f} |")


if __name__ == "__main__":
    main()
