"""vitlora.explain: maps on every family, a planted signal found, faithful curves, the sheet and the CLI."""

from __future__ import annotations

import copy
import csv
import json

import pytest
import timm
import torch
from conftest import IMG_SIZE, TINY, images, make_workspace, randomize_lora, tiny_model
from PIL import Image

from vitlora import LoRAConfig, PromptConfig, add_prompt_tokens, enable_bias_tuning, inject_lora, save_adapter
from vitlora.backbone import create_backbone
from vitlora.cli import main
from vitlora.explain import (
    METHODS,
    attribute_patches,
    explain_image_png,
    explain_pixels,
    most_attributed_first,
    perturbation_curves,
    random_order,
    summarize_map,
    update_disabled,
    with_heads_of,
)

CORNERS = ((0, 0), (0, 3), (3, 0), (3, 3))  # class c: a bright square fills the patch at CORNERS[c]


def planted_images(count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise with one bright 8x8 square; which corner patch it fills is the class."""
    labels = torch.randint(0, len(CORNERS), (count,), generator=generator)
    pixels = torch.randn(count, 3, IMG_SIZE, IMG_SIZE, generator=generator) * 0.5
    for i, label in enumerate(labels.tolist()):
        row, col = CORNERS[label]
        pixels[i, :, row * 8 : (row + 1) * 8, col * 8 : (col + 1) * 8] = 2.0
    return pixels, labels


@pytest.fixture(scope="module")
def planted_model():
    """A tiny ViT (4x4 patches) trained until it reads the square's corner: 100% on fresh images."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=4, img_size=IMG_SIZE, **TINY)
    with torch.no_grad():
        model.pos_embed.normal_(0.0, 1.0)  # strong positions: the corner is learnt in a few dozen steps
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(80):
        pixels, labels = planted_images(32, generator)
        loss = torch.nn.functional.cross_entropy(model(pixels), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    pixels, labels = planted_images(12, torch.Generator().manual_seed(1))
    assert torch.equal(model(pixels).argmax(-1), labels)
    return model, pixels, labels


@pytest.mark.parametrize("method", METHODS)
def test_attribution_lands_on_the_planted_region(planted_model, method):
    model, pixels, labels = planted_model
    maps = attribute_patches(model, pixels, labels, method)
    assert maps.shape == (12, 4, 4)
    for patch_map, label in zip(maps, labels.tolist(), strict=True):
        positive = patch_map.clamp(min=0)
        row, col = CORNERS[label]
        assert positive[row, col] / positive.sum() > 0.5
        assert summarize_map(patch_map).peak == (row, col)


@pytest.mark.parametrize("method", METHODS)
def test_deleting_attributed_patches_first_beats_random_order(planted_model, method):
    model, pixels, labels = planted_model
    maps = attribute_patches(model, pixels, labels, method)
    ranked, chance = [], []
    for i, (patch_map, label) in enumerate(zip(maps, labels.tolist(), strict=True)):
        ranked.append(perturbation_curves(model, pixels[i], label, most_attributed_first(patch_map), steps=8))
        order = random_order(16, torch.Generator().manual_seed(i))
        chance.append(perturbation_curves(model, pixels[i], label, order, steps=8))
    deletion = sum(c.deletion_auc for c in ranked) / len(ranked)
    insertion = sum(c.insertion_auc for c in ranked) / len(ranked)
    assert deletion < 0.5 * sum(c.deletion_auc for c in chance) / len(chance)
    assert insertion > sum(c.insertion_auc for c in chance) / len(chance) + 0.1


def test_perturbation_curves_start_and_end_at_the_image_and_the_reference(planted_model):
    model, pixels, labels = planted_model
    curves = perturbation_curves(model, pixels[0], int(labels[0]), torch.arange(16), steps=4)
    probability = model(pixels[:1]).softmax(-1)[0, labels[0]]
    reference = model(torch.zeros_like(pixels[:1])).softmax(-1)[0, labels[0]]
    assert curves.fractions.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    torch.testing.assert_close(curves.deletion[[0, -1]], torch.stack([probability, reference]).detach())
    torch.testing.assert_close(curves.insertion[[0, -1]], torch.stack([reference, probability]).detach())
    with pytest.raises(ValueError, match="each of the 16 patches once"):
        perturbation_curves(model, pixels[0], 0, torch.arange(15))


@pytest.mark.parametrize("method", METHODS)
def test_every_family_gives_finite_maps_on_its_patch_grid(model_name, method):
    model = tiny_model(model_name, num_classes=3)
    inject_lora(model, LoRAConfig(rank=2, targets=("q", "v")))
    randomize_lora(model)
    pixels = images(2)
    explanations = explain_pixels(
        model, pixels, names=["a", "b"], class_names=["x", "y", "z"], mean=(0.5,) * 3, std=(0.5,) * 3,
        methods=[method], steps=4,
    )  # fmt: skip
    patch = model.patch_embed.patch_size[0]
    for explanation in explanations:
        assert explanation.adapted_map.shape == explanation.base_map.shape == (IMG_SIZE // patch,) * 2
        assert torch.isfinite(explanation.adapted_map).all() and torch.isfinite(explanation.base_map).all()
        assert explanation.adapted_map.abs().sum() > 0 and not torch.equal(
            explanation.adapted_map, explanation.base_map
        )
        assert explanation.image.shape == (IMG_SIZE, IMG_SIZE, 3)
    predicted = model(pixels).argmax(-1).tolist()
    assert [e.target for e in explanations] == predicted


def test_update_disabled_is_the_base_with_the_adapter_head_exactly():
    base = tiny_model(num_classes=3)
    adapted = copy.deepcopy(base)
    inject_lora(adapted, LoRAConfig(rank=2, targets=("q", "v", "fc2"), use_dora=True))
    add_prompt_tokens(adapted, PromptConfig(num_tokens=2, deep=True))
    randomize_lora(adapted)
    with torch.no_grad():
        adapted.head.weight.mul_(2)
        base.head.weight.copy_(adapted.head.weight)
    pixels = images(2)
    assert not torch.equal(adapted(pixels), base(pixels))
    with update_disabled(adapted) as frozen:
        assert torch.equal(frozen(pixels), base(pixels))
    assert not torch.equal(adapted(pixels), base(pixels))  # switched back on


def test_a_bias_tuned_model_needs_a_separately_built_base():
    base = tiny_model(num_classes=3)
    adapted = enable_bias_tuning(copy.deepcopy(base))
    with torch.no_grad():
        adapted.blocks[0].mlp.fc1.bias.add_(1.0)
        adapted.head.weight.mul_(3)
    with pytest.raises(ValueError, match="biases are tuned"), update_disabled(adapted):
        pass
    fresh = tiny_model(num_classes=5)
    frozen = with_heads_of(fresh, adapted)
    pixels = images(2)
    with torch.no_grad():
        base.head.weight.copy_(adapted.head.weight)
    assert torch.equal(frozen(pixels), base(pixels))


# --- files and the CLI -------------------------------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny LoRA adapter on a tiny base file, and a few images."""
    root = make_workspace(tmp_path_factory.mktemp("explain"))
    model = create_backbone("vit_tiny_patch16_224", 3, weights=root / "base.safetensors", img_size=IMG_SIZE, **TINY)
    inject_lora(model, LoRAConfig(rank=2, targets=("q", "v")))
    randomize_lora(model)
    save_adapter(
        model, root / "fruit.safetensors", class_names=["apple", "banana", "cherry"],
        model_name="vit_tiny_patch16_224", model_kwargs={"img_size": IMG_SIZE, **TINY},
    )  # fmt: skip
    return root


def test_explain_cli_writes_a_sheet_per_image_and_the_tables(workspace, capsys):
    photos = sorted((workspace / "data" / "val" / "apple").glob("*.png"))[:2]
    output = workspace / "explained"
    main([
        "explain", str(workspace / "fruit.safetensors"), *map(str, photos), "--output", str(output),
        "--weights", str(workspace / "base.safetensors"), "--method", *METHODS, "--target-class", "banana",
        "--steps", "4",
    ])  # fmt: skip
    assert "wrote 2 sheets" in capsys.readouterr().out
    for photo in photos:
        with Image.open(output / f"{photo.stem}.png") as sheet:
            assert sheet.width > 800 and sheet.height > 400
    records = json.loads((output / "explanations.json").read_text())
    assert len(records) == 2 * len(METHODS)
    assert {r["target_class"] for r in records} == {"banana"} and {r["target_source"] for r in records} == {"named"}
    assert all(len(r["adapted_map"]) == 4 and 0 <= r["adapted_top10_share"] <= 1 for r in records)
    with open(output / "explanations.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["method"] for row in rows] == list(METHODS) * 2
    assert float(rows[0]["adapted_probability"]) == pytest.approx(records[0]["adapted_probability"])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["missing.jpg"], "missing.jpg: no such file"),
        (["data/val/apple/apple_0.png", "--target-class", "durian"], "unknown target class 'durian'"),
    ],
)
def test_explain_cli_bad_input_is_one_line(workspace, extra, message):
    words = [str(workspace / w) if not w.startswith("-") and w != "durian" else w for w in extra]
    with pytest.raises(SystemExit) as error:
        main(["explain", str(workspace / "fruit.safetensors"), *words, "--output", str(workspace / "bad"),
              "--weights", str(workspace / "base.safetensors")])  # fmt: skip
    assert str(error.value).startswith("vitlora explain: ") and message in str(error.value)
    assert "\n" not in str(error.value)


def test_explain_image_png_serves_one_sheet(workspace):
    from vitlora.apply import build_model_with_adapter

    model, adapter = build_model_with_adapter(workspace / "fruit.safetensors", workspace / "base.safetensors")
    image = Image.open(workspace / "data" / "val" / "cherry" / "cherry_0.png").convert("RGB")
    png = explain_image_png(model, adapter, image, methods=["occlusion"])
    assert png.startswith(b"\x89PNG")


def test_bias_tuned_adapter_is_explained_against_a_rebuilt_base(workspace, tmp_path):
    model = create_backbone(
        "vit_tiny_patch16_224", 3, weights=workspace / "base.safetensors", img_size=IMG_SIZE, **TINY
    )
    enable_bias_tuning(model)
    with torch.no_grad():
        model.norm.bias.add_(1.0)
        model.head.weight.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(0))
    save_adapter(model, tmp_path / "bitfit.safetensors", model_name="vit_tiny_patch16_224",
                 model_kwargs={"img_size": IMG_SIZE, **TINY})  # fmt: skip
    main(["explain", str(tmp_path / "bitfit.safetensors"), str(workspace / "data" / "val" / "apple"),
          "--output", str(tmp_path / "out"), "--weights", str(workspace / "base.safetensors"), "--steps", "2"])  # fmt: skip
    records = json.loads((tmp_path / "out" / "explanations.json").read_text())
    assert len(records) == 3 and all(r["adapted_probability"] != r["base_probability"] for r in records)


def test_vitlora_test_explains_the_worst_images_in_inference_mode(tmp_path):
    from vitlora.training.module import ImageClassifier, worst_images

    module = ImageClassifier(
        backbone="vit_tiny_patch16_224", pretrained=False, class_names=["a", "b", "c"],
        model_kwargs={"img_size": IMG_SIZE, **TINY}, lora=LoRAConfig(rank=2), explain_worst=2,
    ).eval()  # fmt: skip
    randomize_lora(module.model)
    with torch.inference_mode():  # as Lightning's test loop runs
        pixels, targets = images(4), torch.tensor([0, 1, 2, 0])
        logits = module(pixels)
        module._worst = worst_images([], pixels[:2], targets[:2], logits[:2], 2)
        module._worst = worst_images(module._worst, pixels[2:], targets[2:], logits[2:], 2)
        module.explain_worst_images(tmp_path / "explanations")
    true_class = logits.softmax(-1).gather(1, targets[:, None])[:, 0]
    assert [p for p, _, _ in module._worst] == sorted(true_class.tolist())[:2]
    records = json.loads((tmp_path / "explanations" / "explanations.json").read_text())
    assert len(records) == 4 and all(r["target_source"] == "named" for r in records)
    assert len(list((tmp_path / "explanations").glob("worst-*.png"))) == 2
