"""Putting adapters on models: files and checkpoints written by vitlora 0.1.0 still load to the same outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from vitlora import load_adapter, read_adapter
from vitlora.adapter import UndigestedFileWarning
from vitlora.apply import build_model_with_adapter
from vitlora.training.module import ImageClassifier

RELEASE = Path(__file__).parent / "fixtures" / "release_0_1_0"  # written by make_fixtures.py at commit 6a0ba59
pytestmark = pytest.mark.filterwarnings("ignore::vitlora.adapter.UndigestedFileWarning")  # asserted once below
KW = {"img_size": 16, "patch_size": 8, "depth": 1, "embed_dim": 16, "num_heads": 2}


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return load_file(RELEASE / "expected.safetensors")


def release_base() -> torch.nn.Module:
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, **KW).eval()
    model.load_state_dict(load_file(RELEASE / "base.safetensors"))
    return model


@pytest.mark.parametrize("name", ["lora", "dora_prompt_bias"])
def test_adapter_files_of_release_0_1_0_load_to_the_same_logits(name, expected):
    model = load_adapter(release_base(), RELEASE / f"{name}.safetensors")
    torch.testing.assert_close(model(expected["images"]), expected[f"logits.{name}"], rtol=0, atol=1e-6)


def test_release_adapter_builds_from_its_recorded_model_and_a_local_weights_file(expected):
    model, adapter = build_model_with_adapter(RELEASE / "lora.safetensors", RELEASE / "base.safetensors")
    assert adapter.labels == ["a", "b", "c"]
    torch.testing.assert_close(model(expected["images"]), expected["logits.lora"], rtol=0, atol=1e-6)


def test_checkpoint_of_release_0_1_0_loads_with_the_moved_module(expected):
    module = ImageClassifier.load_from_checkpoint(
        RELEASE / "lora.ckpt", map_location="cpu", weights_only=True, weights=str(RELEASE / "base.safetensors")
    ).eval()
    torch.testing.assert_close(module(expected["images"]), expected["logits.ckpt"], rtol=0, atol=1e-6)


def test_labels_fall_back_to_class_indices():
    adapter = read_adapter(RELEASE / "dora_prompt_bias.safetensors")
    assert adapter.class_names is None
    assert adapter.labels == ["0", "1", "2"]


@pytest.mark.filterwarnings("error::vitlora.adapter.UndigestedFileWarning")
def test_release_files_without_a_payload_digest_load_with_one_warning():
    with pytest.warns(UndigestedFileWarning, match=r"lora\.safetensors: records no payload digest") as warned:
        adapter = read_adapter(RELEASE / "lora.safetensors")
    assert len(warned) == 1 and adapter.base_config is None
