"""targets.py's path helpers agree with the sites find_lora_sites really picks in every family."""

import pytest
from conftest import tiny_model

from vitlora.targets import VALID_TARGETS, find_lora_sites, qkv_slices, site_target


def test_every_site_path_names_its_block_and_target(model_name):
    model = tiny_model(model_name)
    for target in VALID_TARGETS:
        for site in find_lora_sites(model, (target,)):
            block, found = site_target(site.path)
            assert site.path.startswith(f"blocks.{block}.")
            fused = site.path.endswith(".attn.qkv")
            assert found == ("qkv" if fused else site.parts[0])
            if fused and target != "qkv":
                assert site.slices == qkv_slices(site.linear.out_features, (target,))


@pytest.mark.parametrize("path", ["patch_embed.proj", "head", "blocks.0.attn", "blocks.0.attn.qkv.base", "attn_pool.q"])
def test_other_modules_are_not_sites(path):
    assert site_target(path) is None
