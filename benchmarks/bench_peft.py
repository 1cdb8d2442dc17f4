"""vitlora vs Hugging Face PEFT on the same adapters: file size, load time, unmerged and merged latency.

    python benchmarks/bench_peft.py   # ViT-Ti, CPU, batch 8, 224 px
    python benchmarks/bench_peft.py --weights ../shared/weights/vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors

Two cases, each at equal trainable LoRA parameters: vitlora's q,v slices of the fused qkv
(rank 8) vs PEFT on the whole ``qkv`` (rank 8 too: 8 * (192 + 576) = 2 * 8 * (192 + 192)), and
every linear layer of the blocks (qkv, proj, fc1, fc2, rank 8) in both. Both adapters carry the
81-class head. Latencies are timed round by round in one run, so that the shared CPU's noise
hits every model alike. Then the PEFT round trip on every family of tests/conftest.py (tiny
random models): vitlora -> export_peft -> PeftModel.from_pretrained logits, and -> import_peft
back, which must be bit-exact.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import peft
import torch
from torch import nn

from vitlora import (
    LoRAConfig,
    adapter_state_dict,
    count_parameters,
    create_backbone,
    export_peft,
    import_peft,
    inject_lora,
    load_adapter,
    merge_lora,
    save_adapter,
)
from vitlora.compare.measure import device_name, inference_latency
from vitlora.lora import lora_modules
from vitlora.targets import rerouted_attention, route_fused_qkv_through_module

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import MODEL_NAMES, REAL_WEIGHTS, images, tiny_model

MODEL = "vit_tiny_patch16_224"
NUM_CLASSES = 81
BLOCK_LINEARS = r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"  # a bare "proj" would match patch_embed.proj
CASES = {  # label: (vitlora targets, PEFT target_modules, PEFT rank)
    "q,v (PEFT: whole qkv)": (("q", "v"), r"blocks\.\d+\.attn\.qkv", 8),
    "all linear (qkv,proj,fc1,fc2)": (("qkv", "proj", "fc1", "fc2"), BLOCK_LINEARS, 8),
}


def base_model(weights: Path | None) -> nn.Module:
    """ViT-Ti with an 81-class head, on ``weights`` (timm keys) or random ones."""
    torch.manual_seed(0)
    model = create_backbone(MODEL, NUM_CLASSES, weights=weights, pretrained=False)
    with torch.no_grad():
        model.head.weight.normal_(0.0, 0.02)
    return model.eval()


def randomize_updates(model: nn.Module, std: float = 0.02, seed: int = 1) -> None:
    """Moves every LoRA B off zero (from either library), so the updates really change the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


def vitlora_model(base: nn.Module, targets: tuple[str, ...]) -> nn.Module:
    model = inject_lora(copy.deepcopy(base), LoRAConfig(rank=8, alpha=16.0, targets=targets))
    randomize_updates(model)
    return model.eval()


def peft_model(base: nn.Module, target_modules: str, rank: int) -> peft.PeftModel:
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=target_modules, modules_to_save=["head"])
    model = peft.get_peft_model(copy.deepcopy(base), config)
    randomize_updates(model)
    return model.eval()


def peft_lora_count(model: nn.Module) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if "lora_" in name and p.requires_grad)


def median_seconds(load: Callable[[nn.Module], object], base: nn.Module, repeats: int) -> float:
    """Median time of ``load`` onto a fresh copy of ``base`` (the copy is not timed)."""
    times = []
    for _ in range(repeats):
        fresh = copy.deepcopy(base)
        start = time.perf_counter()
        load(fresh)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compare_case(label: str, base: nn.Module, folder: Path, loads: int) -> tuple[dict, dict[str, nn.Module]]:
    """Sizes, parameter counts and load times of one case; the models to time, keyed by role."""
    targets, peft_targets, peft_rank = CASES[label]
    ours, theirs = vitlora_model(base, targets), peft_model(base, peft_targets, peft_rank)
    ours_file = save_adapter(ours, folder / "vitlora.safetensors", model_name=MODEL)
    theirs.save_pretrained(folder / "peft")
    export_peft(ours, folder / "exported", model_name=MODEL)
    row = {
        "lora params": (count_parameters(ours).by_group["lora"], peft_lora_count(theirs)),
        "file KB": (
            ours_file.stat().st_size / 1e3,
            (folder / "peft" / "adapter_model.safetensors").stat().st_size / 1e3,
        ),
        "vitlora export_peft KB": (folder / "exported" / "adapter_model.safetensors").stat().st_size / 1e3,
        "load ms": (
            1e3 * median_seconds(lambda m: load_adapter(m, ours_file), base, loads),
            1e3 * median_seconds(lambda m: peft.PeftModel.from_pretrained(m, folder / "peft"), base, loads),
        ),
    }
    models = {
        "vitlora unmerged": ours,
        "vitlora merged": merge_lora(copy.deepcopy(ours)),
        "PEFT unmerged": theirs,
        "PEFT merged": copy.deepcopy(theirs).merge_and_unload().eval(),
    }
    return row, models


def round_trip(name: str, targets: tuple[str, ...], folder: Path) -> tuple[float, float, bool]:
    """Max |logits change| of the update, max |logits difference| vitlora vs PEFT on vitlora's export, and
    whether import_peft gives it back exactly."""
    model = inject_lora(tiny_model(name), LoRAConfig(rank=4, alpha=6.0, targets=targets))
    randomize_updates(model, std=0.2)
    with warnings.catch_warnings():  # EVA's fused qkv: PEFT needs the routing, applied below
        warnings.simplefilter("ignore")
        export_peft(model, folder, model_name=name)
    plain = tiny_model(name)
    if rerouted_attention(model):
        route_fused_qkv_through_module(plain)
    with torch.no_grad():
        effect = (plain(images()) - model(images())).abs().max().item()
        theirs = peft.PeftModel.from_pretrained(plain, folder).eval()
        difference = (theirs(images()) - model(images())).abs().max().item()
        back = import_peft(tiny_model(name, num_classes=1000), folder)
        original = adapter_state_dict(model)
        exact = torch.equal(back(images()), model(images())) and all(
            torch.equal(tensor, original[key]) for key, tensor in adapter_state_dict(back).items()
        )
    return effect, difference, exact and len(lora_modules(back)) == len(lora_modules(model))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=8, help="timed latency rounds (after 2 warm-up rounds)")
    parser.add_argument("--loads", type=int, default=5, help="adapter loads timed per library (median)")
    parser.add_argument("--weights", type=Path, default=REAL_WEIGHTS, help="ViT-Ti weights; random ones when absent")
    args = parser.parse_args()
    weights = args.weights if args.weights.exists() else None
    base = base_model(weights)
    print(f"{MODEL} on {weights or 'random weights'}, {device_name(torch.device('cpu'))}")
    print(f"torch {torch.__version__}, peft {peft.__version__}, batch {args.batch} at 224 px\n")
    rows, models = {}, {"base": base}
    with tempfile.TemporaryDirectory() as tmp:
        for index, label in enumerate(CASES):
            folder = Path(tmp) / str(index)
            folder.mkdir()
            rows[label], case_models = compare_case(label, base, folder, args.loads)
            models.update({f"{label}: {role}": model for role, model in case_models.items()})
    latency = inference_latency(models, torch.randn(args.batch, 3, 224, 224), rounds=args.rounds)
    print(f"base latency: {1e3 * latency['base']:.0f} ms per batch\n")
    print("| adapter | library | LoRA params | file (KB) | load (ms) | unmerged vs base | merged vs base |")
    print("|---|---|---|---|---|---|---|")
    for label, row in rows.items():
        for side, library in enumerate(("vitlora", "PEFT")):
            unmerged, merged = (
                latency[f"{label}: {library} {kind}"] / latency["base"] for kind in ("unmerged", "merged")
            )
            print(
                f"| {label} | {library} | {row['lora params'][side]:,} | {row['file KB'][side]:.0f} | "
                f"{row['load ms'][side]:.1f} | {unmerged:.2f}x | {merged:.2f}x |"
            )
        print(f"| {label} | vitlora export_peft | | {row['vitlora export_peft KB']:.0f} | | | |")
    print("\n| family | targets | max abs LoRA effect | max abs diff vitlora vs PEFT | import_peft round trip exact |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODEL_NAMES:
            for targets in (("q", "v"), ("qkv", "proj", "fc1", "fc2")):
                effect, difference, exact = round_trip(name, targets, Path(tmp) / f"{name}-{len(targets)}")
                print(
                    f"| {name} | {','.join(targets)} | {effect:.2g} | {difference:.1e} | {'yes' if exact else 'NO'} |"
                )


if __name__ == "__main__":
    main()
