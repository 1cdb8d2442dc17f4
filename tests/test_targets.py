"""targets.py's path helpers agree with the sites find_lora_sites really picks in every family."""

import pytest
from conftest import tiny_model
from torch import nn

from vitlora.targets import VALID_TARGETS, find_lora_sites, patch_embedding_site, qkv_slices, site_target


def test_every_site_path_names_its_block_and_target(model_name):
    model = tiny_model(model_name)
    for target in VALID_TARGETS:
        for site in find_lora_sites(model, (target,)):
            block, found = site_target(site.path)
            assert site.path.startswith(f"blocks.{block}.") if block is not None else site.path == "patch_embed.proj"
            fused = site.path.endswith(".attn.qkv")
            assert found == ("qkv" if fused else site.parts[0])
            if fused and target != "qkv":
                assert site.slices == qkv_slices(site.linear.out_features, (target,))


def test_patch_embed_is_the_patch_convolution_before_the_blocks(model_name):
    model = tiny_model(model_name)
    sites = find_lora_sites(model, ("patch_embed", "fc2"), blocks=[1])
    assert [site.path for site in sites] == ["patch_embed.proj", "blocks.1.mlp.fc2"]  # blocks do not limit it
    conv = sites[0].linear
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == conv.stride
    assert site_target("patch_embed.proj") == (None, "patch_embed")


def test_a_hybrid_cnn_stem_is_refused_as_a_patch_embedding():
    import timm

    hybrid = timm.create_model("vit_tiny_r_s16_p8_224", pretrained=False, img_size=32, depth=1)
    with pytest.raises(ValueError, match=r"patch_embed is a CNN stem \(\w+\).*not a patch embedding"):
        patch_embedding_site(hybrid)


def test_a_convolution_that_is_not_a_patch_embedding_is_refused():
    model = tiny_model()
    model.patch_embed.proj = nn.Conv2d(3, 64, kernel_size=8, stride=4)
    with pytest.raises(ValueError, match=r"not a patch embedding \(kernel \(8, 8\), stride \(4, 4\)"):
        patch_embedding_site(model)


@pytest.mark.parametrize(
    "path", ["patch_embed.proj.base", "head", "blocks.0.attn", "blocks.0.attn.qkv.base", "attn_pool.q"]
)
def test_other_modules_are_not_sites(path):
    assert site_target(path) is None
