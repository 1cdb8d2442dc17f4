"""Tiny randomly initialised timm models: every family vitlora supports, in milliseconds."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never ask the hub: no traffic leaves this machine

from pathlib import Path

import pytest
import timm
import torch

MODEL_NAMES = (
    "vit_tiny_patch16_224",
    "deit_tiny_distilled_patch16_224",
    "vit_small_patch14_reg4_dinov2",
    "eva02_tiny_patch14_224",
    "eva02_large_patch14_clip_224",
    "vit_base_patch16_clip_224",
    "vit_base_patch16_siglip_224",
)
IMG_SIZE = 32
TINY = {"patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}  # with img_size: a ViT in milliseconds
SHARED = Path(__file__).resolve().parents[2] / "shared"
REAL_WEIGHTS = SHARED / "weights" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors"


def tiny_model(name: str = "vit_tiny_patch16_224", num_classes: int = 5, seed: int = 0, **kwargs):
    """A 2-block, 64-wide version of a timm model, with layer scales large enough to matter."""
    torch.manual_seed(seed)
    config = {"img_size": IMG_SIZE, **TINY}
    config.update(kwargs)
    model = timm.create_model(name, pretrained=False, num_classes=5, **config)
    if num_classes != 5:  # timm's init order makes block weights depend on the head size
        model.reset_classifier(num_classes)
    torch.manual_seed(seed)  # the same base weights whatever the head size
    with torch.no_grad():  # DINOv2's layer scale starts at 1e-5, EVA's head near 0: wake them up
        for key, tensor in sorted(model.named_parameters(), key=lambda kv: kv[0].startswith("head")):
            if key.endswith(".gamma") or "bias" in key:
                tensor.normal_(0.0, 0.5)
            elif key.startswith("head") and key.endswith("weight"):
                tensor.normal_(0.0, 0.2)
    return model.eval()


def images(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, IMG_SIZE, IMG_SIZE, generator=torch.Generator().manual_seed(seed))


def randomize_lora(model, std: float = 0.2, seed: int = 2) -> None:
    """Gives every LoRA B a non-zero value so updates actually change outputs (and moves DoRA magnitudes)."""
    from vitlora.lora import lora_modules

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in lora_modules(model):
            module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=generator) * std)
            if module.config.use_dora:
                module.lora_magnitude.mul_(1 + torch.randn(module.lora_magnitude.shape, generator=generator) * std)


@pytest.fixture(params=MODEL_NAMES)
def model_name(request) -> str:
    return request.param


def make_image_folder(root: Path, classes=("apple", "banana", "cherry"), per_split=None) -> Path:
    """``root/{train,val,test}/<class>/*.png``: small noisy images, one colour per class."""
    from PIL import Image

    per_split = per_split or {"train": 8, "val": 3, "test": 3}
    generator = torch.Generator().manual_seed(0)
    for c, name in enumerate(classes):
        colour = torch.tensor([(c * 97) % 256, (c * 53 + 80) % 256, (c * 151 + 40) % 256])
        for split, count in per_split.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                noise = torch.randint(-40, 40, (40, 40, 3), generator=generator)
                pixels = (colour + noise).clamp(0, 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{name}_{i}.png")
    return root


GROCERY_CLASSES = (("Granny-Smith", "Apple"), ("Pink-Lady", "Apple"), ("Banana", "Banana"), ("Oat-Milk", "Milk"))


def make_grocery_folder(root: Path, classes=GROCERY_CLASSES, per_split=None) -> Path:
    """A Grocery-Store-layout folder of ``(fine, coarse)`` classes, by default 4 fine classes in 3
    coarse ones (two apples); the images are make_image_folder's."""
    per_split = per_split or {"train": 4, "val": 2, "test": 3}
    fine_names = [fine for fine, _ in classes]
    coarse_names = list(dict.fromkeys(coarse for _, coarse in classes))
    coarse_ids = [coarse_names.index(coarse) for _, coarse in classes]
    make_image_folder(root, classes=fine_names, per_split=per_split)
    rows = ["Class Name (str),Class ID (int),Coarse Class Name (str),Coarse Class ID (int),Iconic Image Path (str)"]
    rows += [f"{fine},{i},{coarse},{coarse_ids[i]},/iconic/{fine}.jpg" for i, (fine, coarse) in enumerate(classes)]
    (root / "classes.csv").write_text("\n".join(rows) + "\n")
    for split, count in per_split.items():
        lines = [
            f"{split}/{fine}/{fine}_{k}.png, {i}, {coarse_ids[i]}"
            for i, fine in enumerate(fine_names)
            for k in range(count)
        ]
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def make_workspace(root: Path) -> Path:
    """``root/data`` (make_image_folder) and ``root/base.safetensors``: a tiny random ViT as the "pretrained" file."""
    from safetensors.torch import save_file

    from vitlora.backbone import create_backbone

    make_image_folder(root / "data")
    torch.manual_seed(0)
    base = create_backbone("vit_tiny_patch16_224", 1000, pretrained=False, img_size=IMG_SIZE, **TINY)
    save_file(base.state_dict(), root / "base.safetensors")
    return root


def make_adapter(workspace: Path, path: Path, config, classes: list[str], seed: int) -> Path:
    """An adapter on make_workspace's base weights (a LoRAConfig), with non-zero LoRA updates and a random head."""
    from vitlora import inject_lora, save_adapter
    from vitlora.backbone import create_backbone
    from vitlora.targets import classifier_names

    model = create_backbone(
        "vit_tiny_patch16_224", len(classes), weights=workspace / "base.safetensors", img_size=IMG_SIZE, **TINY
    )
    model = inject_lora(model, config)
    randomize_lora(model, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in classifier_names(model):
            for parameter in getattr(model, head).parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return save_adapter(
        model, path, class_names=classes, model_name="vit_tiny_patch16_224", model_kwargs={"img_size": IMG_SIZE, **TINY}
    )
