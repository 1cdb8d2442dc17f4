"""Bytes autograd keeps for backward: full fine-tuning vs LoRA, with and without the memory options.

    python benchmarks/bench_saved.py                                   # ViT-Ti, 224 px, batch 8, CPU bf16
    python benchmarks/bench_saved.py --model vit_base_patch16_224 --batch 128 --device cuda

Exact (unique non-parameter storages seen by ``saved_tensors_hooks`` in one training forward
pass), so it does not depend on timing noise or on the device.
"""

from __future__ import annotations

import argparse

import timm
import torch

from vitlora import LoRAConfig, activation_bytes, inject_lora, saved_for_backward

SETTINGS = {"every block trains": (False, None), "gradient checkpointing": (True, None), "last 4 blocks": (False, 4)}


def build(model_name: str, method: str, checkpointing: bool, last_blocks: int | None, device: str) -> torch.nn.Module:
    model = timm.create_model(model_name, num_classes=81).to(device)
    if method == "lora":
        inject_lora(model, LoRAConfig(blocks=None if last_blocks is None else list(range(-last_blocks, 0))))
    elif last_blocks is not None:  # full fine-tuning of the last blocks, the final norm and the head
        model.requires_grad_(False)
        for module in [*model.blocks[-last_blocks:], model.norm, model.head]:
            module.requires_grad_(True)
    model.set_grad_checkpointing(checkpointing)
    return model.train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    images = torch.randn(args.batch, 3, 224, 224, device=args.device)
    print("| setting | full fine-tuning (MB) | LoRA q,v (MB) | LoRA / full |\n|---|---|---|---|")
    for label, (checkpointing, last_blocks) in SETTINGS.items():
        saved = {}
        for method in ("full", "lora"):
            model = build(args.model, method, checkpointing, last_blocks, args.device)
            with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16):
                saved[method] = activation_bytes(saved_for_backward(model, images)) / 1e6
        print(f"| {label} | {saved['full']:.1f} | {saved['lora']:.1f} | {saved['lora'] / saved['full']:.2f} |")


if __name__ == "__main__":
    main()
