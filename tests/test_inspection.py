"""Adapter inspection: update norms and effective ranks from the file alone, checked in closed form."""

import math

import pytest
import torch
from conftest import randomize_lora, tiny_model
from PIL import Image, ImageChops
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vitlora import (
    AdapterError,
    LoRAConfig,
    PromptConfig,
    add_prompt_tokens,
    enable_bias_tuning,
    inject_lora,
    inspect_adapter,
    save_adapter,
    write_update_heatmap,
)
from vitlora.charts import heatmap_image
from vitlora.lora import lora_modules
from vitlora.validation import with_payload_digest

CLASSES = ["apple", "banana", "cherry", "dates", "eggplant", "fig", "grape"]
# singular values of scale * B A per (block, target), scale = alpha / rank = 2
KNOWN = {
    (0, "q"): (6.0, 0.0),  # rank 1
    (0, "v"): (3.0, 1.0),
    (0, "fc2"): (0.0, 0.0),  # no update
    (1, "q"): (2.0, 2.0),  # two equal directions
    (1, "v"): (4.0, 0.0),
    (1, "fc2"): (1.0, 0.5),
}


def orthonormal(rows, columns, seed):
    return torch.linalg.qr(torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed))).Q


@pytest.fixture
def known_adapter(tmp_path):
    """Each update is scale * V diag(c) U^T with orthonormal U, V: its singular values are scale * c exactly."""
    model = tiny_model(num_classes=len(CLASSES))
    inject_lora(model, LoRAConfig(rank=2, alpha=4.0, targets=("q", "v", "fc2")))
    with torch.no_grad():
        for (block, target), values in KNOWN.items():
            layer = model.blocks[block].attn.qkv if target != "fc2" else model.blocks[block].mlp.fc2
            part = layer.parts.index(target) if target != "fc2" else 0
            width = layer.slice_widths[part]
            down = orthonormal(layer.in_features, 2, seed=block * 10 + part).T  # U^T
            up = orthonormal(width, 2, seed=block * 10 + part + 5) * torch.tensor(values) / layer.scaling  # V diag(c)
            layer.lora_A[2 * part : 2 * part + 2] = down
            layer.lora_B[part * width : (part + 1) * width] = up
    return save_adapter(model, tmp_path / "known.safetensors", class_names=CLASSES, model_name="vit_tiny_patch16_224")


def test_known_updates_give_closed_form_norms_and_effective_ranks(known_adapter):
    summary = inspect_adapter(known_adapter)
    assert [(u.block, u.target) for u in summary.updates] == list(KNOWN)
    for update in summary.updates:
        values = KNOWN[update.block, update.target]
        torch.testing.assert_close(update.singular_values, values, atol=1e-6, rtol=1e-6)
        assert update.frobenius_norm == pytest.approx(math.hypot(*values), abs=1e-6)
    ranks = {(u.block, u.target): u.effective_rank for u in summary.updates}
    assert ranks[0, "q"] == pytest.approx(1.0) and ranks[1, "q"] == pytest.approx(2.0)
    assert ranks[0, "fc2"] == 0.0
    assert ranks[0, "v"] == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))), rel=1e-6)
    per_block = 2 * 2 * 64 + 128 * 2 + 2 * 256 + 64 * 2  # fused q/v A and B, fc2 A and B
    assert summary.parameters == {"lora": 2 * per_block, "prompt": 0, "bias": 0, "head": 7 * 64 + 7}


def test_summary_prints_model_config_classes_counts_and_the_table(known_adapter):
    text = str(inspect_adapter(known_adapter))
    assert "base model vit_tiny_patch16_224 (architecture vit_tiny_patch16_224)" in text
    assert "rank 2, alpha 4, scaling 2, targets q,v,fc2, blocks all" in text
    assert "classes    7: apple, banana, cherry, dates, eggplant, ..." in text
    assert f"trainable  {2 * 1152:,} lora + 455 head = {2 * 1152 + 455:,}" in text
    assert "KB)" in text and str(known_adapter) in text
    rows = [line.split() for line in text.splitlines() if line[:5].strip().isdigit()]
    assert rows[0] == ["0", "q", "2", "6", "6", "1.00"]
    assert rows[1] == ["0", "v", "2", "3.162", "3", "1.75"]  # sqrt(10); exp(H(3/4, 1/4))
    assert rows[2] == ["0", "fc2", "2", "0", "0", "0.00"]


@pytest.mark.parametrize(
    ("name", "targets"),
    [
        ("deit_tiny_distilled_patch16_224", ("q", "k", "v", "proj")),
        ("eva02_large_patch14_clip_224", ("qkv", "fc1", "fc2")),  # separate q/k/v projections, SwiGLU
    ],
)
def test_singular_values_match_the_dense_update_of_every_layer(tmp_path, name, targets):
    model = tiny_model(name)
    inject_lora(model, LoRAConfig(rank=3, alpha=5.0, targets=targets))
    randomize_lora(model)
    updates = inspect_adapter(save_adapter(model, tmp_path / "a.safetensors")).updates
    expected = {}
    for layer_name, layer in lora_modules(model):
        labels = layer.parts if layer.parts[0] in ("q", "k", "v", "qkv") else (layer_name.split(".")[-1],)
        for label, (start, stop) in zip(labels, layer.slices, strict=True):
            expected[layer_name, label] = torch.linalg.svdvals(layer.delta_weight()[start:stop].double())[:3]
    assert {(u.layer, u.target) for u in updates} == expected.keys()
    for update in updates:
        want = expected[update.layer, update.target]
        torch.testing.assert_close(
            torch.tensor(update.singular_values, dtype=torch.float64), want, rtol=1e-5, atol=1e-7
        )


def test_heatmap_shades_each_block_and_target_by_its_norm(known_adapter, tmp_path):
    summary = inspect_adapter(known_adapter)
    path = write_update_heatmap(summary, tmp_path / "updates.png")
    norms = torch.tensor([[math.hypot(*KNOWN[b, t]) for t in ("q", "v", "fc2")] for b in (0, 1)])
    title = "LoRA update size per block and target (known.safetensors)"
    scale = "||ΔW||_F (Frobenius norm)"
    expected = heatmap_image(norms, title, ["block 0", "block 1"], ["q", "v", "fc2"], scale_label=scale)
    difference = ImageChops.difference(Image.open(path).convert("RGB"), expected)
    assert max(high for _, high in difference.getextrema()) <= 1  # float32 norms may round a shade either way
    assert sorted(p.name for p in tmp_path.iterdir()) == ["known.safetensors", "updates.png"]


def test_bad_files_name_the_file_and_the_problem(known_adapter, tmp_path):
    with pytest.raises(AdapterError, match=r"missing\.safetensors: no such adapter file"):
        inspect_adapter(tmp_path / "missing.safetensors")
    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(AdapterError, match=r"plain\.safetensors: not a vitlora adapter"):
        inspect_adapter(tmp_path / "plain.safetensors")
    tensors = load_file(known_adapter)
    with safe_open(known_adapter, "pt") as handle:
        metadata = handle.metadata()
    del tensors["blocks.1.mlp.fc2.lora_B"]
    save_file(tensors, tmp_path / "broken.safetensors", with_payload_digest(tensors, metadata))
    with pytest.raises(
        AdapterError, match=r"broken\.safetensors: blocks\.1\.mlp\.fc2: LoRA tensors \['lora_A'\] are not"
    ):
        inspect_adapter(tmp_path / "broken.safetensors")
    with pytest.raises(FileNotFoundError, match=r"output folder .*nowhere does not exist"):
        write_update_heatmap(inspect_adapter(known_adapter), tmp_path / "nowhere" / "updates.png")


def test_an_adapter_without_lora_reports_its_prompts_biases_and_head(tmp_path):
    model = enable_bias_tuning(add_prompt_tokens(tiny_model(num_classes=3), PromptConfig(num_tokens=2, deep=True)))
    summary = inspect_adapter(save_adapter(model, tmp_path / "vpt.safetensors"))
    biases = sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias") and not n.startswith("head"))
    assert summary.parameters == {"lora": 0, "prompt": 2 * 2 * 64, "bias": biases, "head": 3 * 64 + 3}
    assert summary.updates == []
    text = str(summary)
    assert "lora       none" in text and "deep=True" in text and "bias tuning True" in text


def test_a_patch_embedding_update_is_inspected_and_drawn_before_the_blocks(tmp_path):
    from vitlora import LoRAConfig, inject_lora, save_adapter

    model = inject_lora(tiny_model(), LoRAConfig(rank=2, targets=("patch_embed", "q")))
    randomize_lora(model)
    path = save_adapter(model, tmp_path / "pe.safetensors", model_name="vit_tiny_patch16_224")
    summary = inspect_adapter(path)
    first = summary.updates[0]
    assert (first.block, first.target, first.layer) == (-1, "patch_embed", "patch_embed.proj")
    dense = model.patch_embed.proj.delta_weight().double()
    assert first.frobenius_norm == pytest.approx(float(torch.linalg.matrix_norm(dense)), rel=1e-6)
    assert "    -  patch_embed " in str(summary)
    assert write_update_heatmap(summary, tmp_path / "pe.png").is_file()
