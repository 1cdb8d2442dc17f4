"""Where a base model's weights come from: a local file, recorded with its hash, or the hub, refused at once offline."""

import time

import pytest
from conftest import TINY, make_workspace

import vitlora.backbone as backbone
from vitlora.backbone import (
    WeightsUnavailable,
    create_backbone,
    hub_unreachable,
    recorded_weights,
    weights_source,
)
from vitlora.files import file_sha256


def test_a_local_source_records_its_absolute_path_name_and_hash(tmp_path, monkeypatch):
    make_workspace(tmp_path)
    monkeypatch.chdir(tmp_path)
    source = weights_source("base.safetensors", "vit_tiny_patch16_224")
    assert source["path"] == str(tmp_path / "base.safetensors") and source["file"] == "base.safetensors"
    assert source["sha256"] == file_sha256(tmp_path / "base.safetensors") and len(source["sha256"]) == 64
    assert recorded_weights(source, "a.safetensors") == tmp_path / "base.safetensors"
    assert weights_source(None, "vit_tiny_patch16_224") == {"hub": "vit_tiny_patch16_224"}
    assert recorded_weights({"hub": "vit_tiny_patch16_224"}, "a.safetensors") is None


def test_a_moved_local_source_fails_naming_the_file_and_the_way_out(tmp_path):
    make_workspace(tmp_path)
    source = weights_source(tmp_path / "base.safetensors", "vit_tiny_patch16_224")
    (tmp_path / "base.safetensors").rename(tmp_path / "moved.safetensors")
    with pytest.raises(
        WeightsUnavailable, match=r"a\.safetensors: trained on the local base weights base\.safetensors "
    ):
        recorded_weights(source, "a.safetensors")
    with pytest.raises(WeightsUnavailable, match=r"pass --weights path/to/base\.safetensors"):
        recorded_weights(source, "a.safetensors")


def test_offline_hub_fails_at_once_with_the_weights_hint(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(backbone, "hub_cached_file", lambda name: None)
    assert hub_unreachable("vit_tiny_patch16_224.augreg_in21k_ft_in1k") == "HF_HUB_OFFLINE is set"
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailable, match=r"HF_HUB_OFFLINE is set.*--model\.weights"):
        create_backbone("vit_tiny_patch16_224.augreg_in21k_ft_in1k", 3, img_size=32, **TINY)
    assert time.perf_counter() - start < 5  # no retries


def test_weights_in_the_hub_cache_load_without_the_network(tmp_path, monkeypatch):
    make_workspace(tmp_path)
    monkeypatch.setattr(backbone, "hub_cached_file", lambda name: tmp_path / "base.safetensors")
    monkeypatch.setattr(backbone, "hub_unreachable", lambda name: pytest.fail("asked the network"))
    model = create_backbone("vit_tiny_patch16_224", 3, img_size=32, **TINY)
    assert model.num_classes == 3
