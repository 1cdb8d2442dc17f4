"""LoRA on a pretrained ViT in one page: inject, train, save, reload, merge, and check each step.

python examples/quickstart.py                       # pretrained weights from the timm hub
python examples/quickstart.py --weights FILE        # offline: a local .safetensors / .pth
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import timm
import torch

from vitlora import (
    LoRAConfig,
    count_parameters,
    inject_lora,
    load_adapter,
    merge_lora,
    save_adapter,
)
from vitlora.files import read_state_dict


def create_backbone(name: str, weights: Path | None) -> torch.nn.Module:
    if weights is None:
        return timm.create_model(name, pretrained=True)
    model = timm.create_model(name, pretrained=False)
    model.load_state_dict(read_state_dict(weights), strict=True)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_tiny_patch16_224.augreg_in21k_ft_in1k")
    parser.add_argument("--weights", type=Path, help="local weights file with timm keys (offline)")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)

    model = create_backbone(args.model, args.weights)
    model.reset_classifier(args.num_classes)
    inject_lora(model, LoRAConfig(rank=8, alpha=16, targets=("q", "v")))
    print(count_parameters(model), "\n")

    # A toy task: recognise which of N fixed colour patterns an image is, through the frozen ViT.
    patterns = torch.randn(args.num_classes, 3, 224, 224)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    start = time.perf_counter()
    for step in range(args.steps):
        labels = torch.randint(args.num_classes, (16,))
        images = patterns[labels] + 0.5 * torch.randn(16, 3, 224, 224)
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.3f}")
    print(f"{args.steps} steps in {time.perf_counter() - start:.1f}s\n")

    model.eval()
    x = patterns[:4]
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        logits = model(x)
        path = save_adapter(
            model,
            Path(tmp) / "toy.safetensors",
            class_names=[f"pattern{i}" for i in range(args.num_classes)],
        )
        print(
            f"adapter: {path.stat().st_size / 1e6:.2f} MB (the model is {sum(p.numel() for p in model.parameters()) * 4 / 1e6:.1f} MB)"
        )

        fresh = create_backbone(args.model, args.weights).eval()
        reloaded = load_adapter(fresh, path)
        print("reloaded adapter, max |logit diff|:", (reloaded(x) - logits).abs().max().item())
        merged = merge_lora(model)
        print("merged into the base, max |logit diff|:", (merged(x) - logits).abs().max().item())
        print(
            "accuracy on the patterns:",
            (merged(x).argmax(-1) == torch.arange(4)).float().mean().item(),
        )


if __name__ == "__main__":
    main()
