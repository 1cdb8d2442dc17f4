import math

import pytest
import timm
import torch
from conftest import MODEL_NAMES, images, randomize_lora, tiny_model
from torch import nn

from vitlora import LoRAConfig, LoRALinear, count_parameters, inject_lora, merge_lora, remove_lora
from vitlora.lora import lora_disabled, lora_modules

ALL_TARGETS = ("q", "k", "v", "proj", "fc1", "fc2")


def module_types(model):
    return [(name, type(module)) for name, module in model.named_modules()]


# --- config -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, "rank"),
        ({"rank": 2.5}, "rank"),
        ({"alpha": 0}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"targets": ("q", "x")}, "'q', 'k', 'v', 'qkv', 'proj', 'fc1', 'fc2'"),
        ({"targets": ()}, "choose one or more"),
        ({"targets": ("q", "q")}, "distinct"),
        ({"targets": ("qkv", "v")}, "either 'qkv'"),
        ({"use_dora": "yes"}, "use_dora must be true or false"),
    ],
)
def test_invalid_config_values_are_rejected_with_the_valid_ones(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoRAConfig(**kwargs)


def test_config_round_trips_through_json_and_has_the_documented_defaults():
    config = LoRAConfig()
    assert (config.rank, config.alpha, config.dropout, config.targets) == (8, 16.0, 0.0, ("q", "v"))
    assert config.blocks is None and config.use_rslora is False and config.use_dora is False
    custom = LoRAConfig(rank=4, alpha=8, targets=["qkv", "fc2"], blocks=[0, -1], use_rslora=True, use_dora=True)
    assert LoRAConfig.from_json(custom.to_json()) == custom
    assert custom.scaling == pytest.approx(8 / math.sqrt(4))
    assert LoRAConfig(rank=4, alpha=8).scaling == 2.0


def test_rank_and_alpha_patterns_name_layers_as_peft_does():
    config = LoRAConfig(rank=4, alpha=8, rank_pattern={"fc2": 2, r"blocks\.1\..*": 6}, alpha_pattern={"qkv": 3})
    assert [config.rank_for(p) for p in ("blocks.0.mlp.fc2", "blocks.1.mlp.fc2", "blocks.1.attn.qkv")] == [2, 2, 6]
    assert config.rank_for("blocks.0.mlp.fc2x") == 4  # a suffix is a whole dotted name, not a substring
    assert (config.scaling_for("blocks.0.attn.qkv"), config.scaling_for("blocks.0.attn.proj")) == (0.75, 2.0)
    assert LoRAConfig.from_json(config.to_json()) == config
    assert "rank_pattern" not in LoRAConfig().to_json()  # plain files stay readable by vitlora 0.1
    for bad, message in [({"fc2": 0}, "positive integer"), ({"(": 2}, "not a regular expression")]:
        with pytest.raises(ValueError, match=message):
            LoRAConfig(rank_pattern=bad)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_per_layer_ranks_and_the_patch_embedding_merge_exactly(model_name, use_dora):
    config = LoRAConfig(
        rank=4, targets=("q", "v", "fc2", "patch_embed"), rank_pattern={"fc2": 2}, alpha_pattern={"proj": 3},
        use_dora=use_dora,
    )  # fmt: skip
    model = inject_lora(tiny_model(model_name), config)
    randomize_lora(model)
    layers = dict(lora_modules(model))
    assert type(layers["patch_embed.proj"]).__name__ == "LoRAConv2d"
    assert layers["patch_embed.proj"].lora_A.shape == (4, 3 * 8 * 8) and layers["patch_embed.proj"].scaling == 3 / 4
    assert layers["blocks.0.mlp.fc2"].lora_A.shape[0] == 2
    before = tiny_model(model_name)(images())
    adapted = model(images())
    assert (adapted - before).abs().max() > 1e-3
    torch.testing.assert_close(merge_lora(model)(images()), adapted, atol=1e-5, rtol=1e-5)


def test_patch_embedding_lora_is_the_lora_of_each_flattened_patch():
    conv = tiny_model().patch_embed.proj
    layer = inject_lora(tiny_model(), LoRAConfig(rank=3, targets=("patch_embed",))).patch_embed.proj
    torch.nn.init.normal_(layer.lora_B)
    x = images()
    patches = torch.nn.functional.unfold(x, kernel_size=8, stride=8).transpose(1, 2)  # N x patches x C*8*8
    dense = patches @ (conv.weight.flatten(1) + layer.delta_weight()).T + conv.bias
    torch.testing.assert_close(layer(x).flatten(2).transpose(1, 2), dense, atol=1e-5, rtol=1e-5)


def test_config_json_written_before_dora_reads_as_plain_lora():
    old = '{"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["q", "v"], "blocks": null, "use_rslora": false}'
    assert LoRAConfig.from_json(old) == LoRAConfig(rank=4, alpha=8.0, use_dora=False)


def test_out_of_range_blocks_name_the_valid_range():
    with pytest.raises(ValueError, match=r"has 2 blocks, valid indices are 0..1 or -2..-1"):
        inject_lora(tiny_model(), LoRAConfig(blocks=[2]))


def test_model_without_supported_attention_names_what_was_looked_for():
    model = timm.create_model("resnet10t", num_classes=3)
    with pytest.raises(ValueError, match=r"blocks\[i\]\.attn.*qkv.*q_proj"):
        inject_lora(model, LoRAConfig())
    assert all(p.requires_grad for p in model.parameters())


# --- the layer --------------------------------------------------------------------------


def test_initialisation_is_kaiming_uniform_a_and_zero_b():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(256, 768), LoRAConfig(rank=8), slices=[(0, 256), (512, 768)])
    assert layer.lora_A.shape == (16, 256) and layer.lora_B.shape == (512, 8)
    bound = 1 / math.sqrt(256)  # kaiming_uniform(a=sqrt(5)) bound for fan_in 256
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.9 * bound
    assert torch.count_nonzero(layer.lora_B) == 0


def test_fused_qkv_update_changes_only_the_targeted_slices():
    torch.manual_seed(0)
    base = nn.Linear(32, 96)
    x = torch.randn(4, 7, 32)
    for parts, slices in [(("q", "v"), [(0, 32), (64, 96)]), (("k",), [(32, 64)])]:
        layer = LoRALinear(base, LoRAConfig(rank=4), slices=slices, parts=parts)
        randomize_lora(layer)
        changed = (layer(x) - base(x)).abs().amax(dim=(0, 1))
        for start, stop in [(0, 32), (32, 64), (64, 96)]:
            if (start, stop) in slices:
                assert changed[start:stop].min() > 1e-4, f"{parts}: slice {start}:{stop} unchanged"
            else:
                assert torch.equal(changed[start:stop], torch.zeros(stop - start)), f"{parts}: leak"


def test_each_slice_gets_an_independent_rank_r_update():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(32, 96), LoRAConfig(rank=2, alpha=2), slices=[(0, 32), (64, 96)])
    randomize_lora(layer)
    delta = layer.delta_weight()
    b_q, b_v = layer.lora_B.split([32, 32])
    a_q, a_v = layer.lora_A.split([2, 2])
    torch.testing.assert_close(delta[:32], b_q @ a_q)
    torch.testing.assert_close(delta[64:], b_v @ a_v)
    assert torch.count_nonzero(delta[32:64]) == 0
    assert torch.linalg.matrix_rank(delta[:32]) == 2 and torch.linalg.matrix_rank(delta) == 4


def test_forward_matches_the_dense_formula():
    torch.manual_seed(0)
    base = nn.Linear(16, 48)
    layer = LoRALinear(base, LoRAConfig(rank=3, alpha=5), slices=[(16, 32), (32, 48)])
    randomize_lora(layer)
    x = torch.randn(5, 16)
    expected = x @ (base.weight + layer.delta_weight()).T + base.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_dropout_acts_on_the_lora_path_only():
    torch.manual_seed(0)
    base = nn.Linear(16, 16)
    layer = LoRALinear(base, LoRAConfig(rank=4, dropout=0.5)).train()
    x = torch.randn(8, 16)
    assert torch.equal(layer(x), base(x))  # B = 0: dropout must not touch the base path
    randomize_lora(layer)
    assert not torch.allclose(layer(x), layer(x))  # active on the LoRA path in training
    layer.eval()
    torch.testing.assert_close(layer(x), x @ (base.weight + layer.delta_weight()).T + base.bias)


# --- DoRA -------------------------------------------------------------------------------


def dora_layer(dtype=torch.float64, slices=((0, 16), (32, 48)), **config):
    """A fused q/k/v-like layer (48 = 3 x 16) with DoRA on q and v, B and magnitudes moved."""
    torch.manual_seed(0)
    base = nn.Linear(16, 48).to(dtype)
    layer = LoRALinear(base, LoRAConfig(rank=3, alpha=5, use_dora=True, **config), slices=slices)
    randomize_lora(layer)
    return layer


def papers_dora_weight(layer, detach_norm=True):
    """``m * (W + dW) / ||W + dW||`` row by row on each slice, ``W`` elsewhere, written out from A, B and m."""
    weight = layer.weight.clone()
    parts = zip(
        layer.slices,
        layer.lora_B.split(layer.slice_widths),
        layer.lora_A.split(layer.config.rank),
        layer.lora_magnitude.split(layer.slice_widths),
        strict=True,
    )
    for (start, stop), b, a, magnitude in parts:
        direction = layer.weight[start:stop] + layer.scaling * b @ a
        norm = direction.norm(dim=1, keepdim=True)
        weight[start:stop] = magnitude[:, None] * direction / (norm.detach() if detach_norm else norm)
    return weight


def test_dora_magnitude_starts_at_the_row_norms_of_the_updated_rows_only():
    layer = LoRALinear(nn.Linear(32, 96), LoRAConfig(use_dora=True), slices=[(0, 32), (64, 96)], parts=("q", "v"))
    expected = torch.cat([layer.weight[:32].norm(dim=1), layer.weight[64:].norm(dim=1)])
    torch.testing.assert_close(layer.lora_magnitude, expected, atol=0, rtol=0)
    assert "lora_magnitude" in dict(layer.named_parameters()) and "dora" in repr(layer)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_dora_forward_and_merge_are_the_papers_formula_with_untouched_rows_exact(use_rslora):
    layer = dora_layer(use_rslora=use_rslora).eval()
    x = torch.randn(5, 7, 16, dtype=torch.float64)
    expected = nn.functional.linear(x, papers_dora_weight(layer), layer.bias)
    plain = nn.functional.linear(x, layer.weight, layer.bias)
    out = layer(x)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    assert (out[..., :16] - plain[..., :16]).abs().min() > 1e-6  # q and v really change
    assert torch.equal(out[..., 16:32], plain[..., 16:32])  # k: bit for bit the base
    merged = layer.to_linear(merge=True)
    torch.testing.assert_close(merged(x), out, atol=1e-12, rtol=0)
    assert torch.equal(merged.weight[16:32], layer.weight[16:32]) and merged.bias is layer.bias


def test_dora_gradients_treat_the_norm_as_a_constant():
    """DoRA section 4.3, as HF PEFT does: ||W + dW|| gets no gradient, which changes A's and B's."""
    layer = dora_layer()
    x = torch.randn(6, 16, dtype=torch.float64)
    trainable = (layer.lora_A, layer.lora_B, layer.lora_magnitude)
    layer(x).square().sum().backward()
    ours = [p.grad for p in trainable]
    for detach_norm in (True, False):
        loss = nn.functional.linear(x, papers_dora_weight(layer, detach_norm), layer.bias).square().sum()
        reference = torch.autograd.grad(loss, trainable)
        for name, got, want in zip(("A", "B", "magnitude"), ours, reference, strict=True):
            if detach_norm:
                torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10, msg=name)
            elif name != "magnitude":  # the norm does not depend on m
                assert not torch.allclose(got, want, atol=1e-6), name


def test_dora_dropout_acts_on_the_low_rank_path_only():
    layer = dora_layer(torch.float32, dropout=0.5, slices=None)
    x = torch.randn(8, 16)
    with torch.no_grad():
        layer.lora_B.zero_()
        layer.lora_magnitude.copy_(layer.weight.norm(dim=1))
    layer.train()
    assert torch.equal(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
    randomize_lora(layer)
    torch.manual_seed(3)
    out = layer(x)
    torch.manual_seed(3)
    dropped = nn.functional.dropout(x, 0.5, training=True)  # the same mask
    scale = layer.lora_magnitude / (layer.weight + layer.delta_weight()).norm(dim=1)
    expected = scale * (x @ layer.weight.T + dropped @ layer.delta_weight().T) + layer.bias
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    layer.eval()
    torch.testing.assert_close(layer(x), x @ papers_dora_weight(layer).T + layer.bias, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_dora_matches_hf_peft_outputs_and_gradients(use_rslora):
    """Whole-layer targets map one to one onto PEFT's ``lora_A``/``lora_B``/``lora_magnitude_vector``."""
    import copy

    peft = pytest.importorskip("peft")
    ours = tiny_model().double()
    theirs = copy.deepcopy(ours)
    config = LoRAConfig(rank=4, alpha=8, targets=("qkv", "proj", "fc1", "fc2"), use_dora=True, use_rslora=use_rslora)
    inject_lora(ours, config)
    paths = [name for name, _ in lora_modules(ours)]
    peft_config = peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, use_rslora=use_rslora, target_modules=paths)
    peft.inject_adapter_in_model(peft_config, theirs)
    peft_layers = {path: theirs.get_submodule(path) for path in paths}
    for path, layer in lora_modules(ours):  # the same starting magnitude ||W||
        torch.testing.assert_close(layer.lora_magnitude, peft_layers[path].lora_magnitude_vector["default"].weight)
    randomize_lora(ours)
    with torch.no_grad():
        for path, layer in lora_modules(ours):
            peft_layers[path].lora_A["default"].weight.copy_(layer.lora_A)
            peft_layers[path].lora_B["default"].weight.copy_(layer.lora_B)
            peft_layers[path].lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude)
    x = images().double()
    out, peft_out = ours(x), theirs(x)
    assert (out - tiny_model().double()(x)).abs().max() > 1e-2
    torch.testing.assert_close(out, peft_out, atol=1e-12, rtol=0)
    out.square().sum().backward()
    peft_out.square().sum().backward()
    for path, layer in lora_modules(ours):
        peft_layer = peft_layers[path]
        for got, want in [
            (layer.lora_A, peft_layer.lora_A["default"].weight),
            (layer.lora_B, peft_layer.lora_B["default"].weight),
            (layer.lora_magnitude, peft_layer.lora_magnitude_vector["default"].weight),
        ]:
            torch.testing.assert_close(got.grad, want.grad, atol=1e-10, rtol=1e-10)


# --- injection over the model matrix --------------------------------------------------


@pytest.mark.parametrize("use_dora", [False, True])
def test_zero_init_leaves_outputs_unchanged(model_name, use_dora):
    model = tiny_model(model_name)
    x = images()
    expected = model(x)
    inject_lora(model, LoRAConfig(targets=ALL_TARGETS, use_dora=use_dora))
    assert torch.equal(model(x), expected)


@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_takes_effect_in_every_family(model_name, use_dora):
    """The worst bug is a LoRA that silently does nothing (PEFT on EVA-02's fused qkv)."""
    model = tiny_model(model_name)
    x = images()
    expected = model(x)
    inject_lora(model, LoRAConfig(targets=("q", "v"), use_dora=use_dora))
    randomize_lora(model)
    assert (model(x) - expected).abs().max() > 1e-3
    for name, layer in lora_modules(model):  # each wrapper, called alone, returns its update
        inputs = torch.randn(3, layer.in_features)
        assert not torch.allclose(layer(inputs), nn.functional.linear(inputs, layer.weight, layer.bias)), name


def test_eva_fused_qkv_with_q_v_biases_is_routed_through_the_lora_module():
    model = tiny_model("eva02_tiny_patch14_224")
    attn = model.blocks[0].attn
    assert attn.q_bias is not None and attn.qkv_bias_separate is False
    inject_lora(model, LoRAConfig(targets=("q",), blocks=[0]))
    assert attn.qkv_bias_separate is True
    merge_lora(model)
    assert attn.qkv_bias_separate is False


def test_an_attention_that_bypasses_its_module_is_refused_and_the_model_restored(monkeypatch):
    model = tiny_model("eva02_tiny_patch14_224")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = module_types(model)
    monkeypatch.setattr(
        "vitlora.lora.route_fused_qkv_through_module", lambda model: None
    )  # simulate a timm release whose attention reads qkv.weight directly
    with pytest.raises(RuntimeError, match=r"blocks\.0\.attn\.qkv"):
        inject_lora(model, LoRAConfig())
    assert module_types(model) == types
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("use_dora", [False, True])
def test_only_lora_and_heads_are_trainable_and_counts_match_the_formula(model_name, use_dora):
    model = tiny_model(model_name)
    rank = 4
    inject_lora(model, LoRAConfig(rank=rank, targets=ALL_TARGETS, use_dora=use_dora))
    heads = ("head.", "head_dist.")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if "lora_" in n or n.startswith(heads)}
    if model_name == "deit_tiny_distilled_patch16_224":
        assert {"head_dist.weight", "head.weight"} <= trainable
    if model_name == "vit_base_patch16_siglip_224":
        assert not any(n.startswith("attn_pool") for n in trainable)

    expected_lora = 0
    for block in model.blocks:
        attn, mlp = block.attn, block.mlp
        qkv = getattr(attn, "qkv", None)
        projections = (
            [(qkv.in_features, qkv.out_features // 3)] * 3
            if qkv is not None
            else [(p.in_features, p.out_features) for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
        )
        fc1 = [mlp.fc1] if hasattr(mlp, "fc1") else [mlp.fc1_g, mlp.fc1_x]
        projections += [(m.in_features, m.out_features) for m in (attn.proj, *fc1, mlp.fc2)]
        expected_lora += sum(rank * (i + o) + (o if use_dora else 0) for i, o in projections)  # DoRA: m per row
    head_count = sum(p.numel() for n, p in model.named_parameters() if n.startswith(heads))
    count = count_parameters(model)
    assert count.by_group["lora"] == expected_lora
    assert count.trainable == expected_lora + head_count
    assert count.total == sum(p.numel() for p in model.parameters())

    model(images()).sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in with_grad if "lora_A" not in n)


def test_separate_projections_and_swiglu_are_wrapped_where_they_are():
    model = tiny_model("eva02_large_patch14_clip_224")
    inject_lora(model, LoRAConfig(targets=("q", "v", "fc1"), blocks=[-1]))
    assert sorted(name for name, _ in lora_modules(model)) == [
        "blocks.1.attn.q_proj", "blocks.1.attn.v_proj",
        "blocks.1.mlp.fc1_g", "blocks.1.mlp.fc1_x",
    ]  # fmt: skip
    remove_lora(model)
    inject_lora(model, LoRAConfig(targets=("qkv",), blocks=[0]))
    assert sorted(n for n, _ in lora_modules(model)) == [f"blocks.0.attn.{t}_proj" for t in "kqv"]


def test_fused_qkv_keeps_one_wrapper_per_layer_and_the_attribute_path():
    model = tiny_model()
    inject_lora(model, LoRAConfig(rank=2, targets=("q", "k", "v")))
    layer = model.blocks[0].attn.qkv
    assert isinstance(layer, LoRALinear) and layer.parts == ("q", "k", "v")
    assert layer.lora_A.shape == (6, 64) and layer.lora_B.shape == (192, 2)
    assert [n for n, _ in lora_modules(model)] == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    assert "blocks.0.attn.qkv.weight" in model.state_dict()


def test_injection_keeps_the_model_mode_so_eval_has_no_lora_dropout():
    model = tiny_model().eval()
    inject_lora(model, LoRAConfig(dropout=0.5), verify=False)
    assert not any(m.training for m in model.modules())
    randomize_lora(model)
    assert torch.equal(model(images()), model(images()))
    model.train()
    inject_check = [m for _, m in lora_modules(model)]
    assert all(m.training for m in inject_check)


def test_hybrid_vit_with_a_cnn_stem_is_supported():
    model = timm.create_model("vit_tiny_r_s16_p8_224", img_size=64, depth=2, num_classes=3).eval()
    x = torch.randn(1, 3, 64, 64)
    expected = model(x)
    inject_lora(model, LoRAConfig())
    assert torch.equal(model(x), expected) and len(lora_modules(model)) == 2


def test_injecting_twice_is_refused():
    model = inject_lora(tiny_model(), LoRAConfig())
    with pytest.raises(ValueError, match="already has LoRA"):
        inject_lora(model, LoRAConfig())


# --- merging ----------------------------------------------------------------------------


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_equals_unmerged_and_is_a_plain_timm_model(model_name, use_dora):
    model = tiny_model(model_name)
    fresh = tiny_model(model_name)
    inject_lora(model, LoRAConfig(rank=4, targets=ALL_TARGETS, use_dora=use_dora))
    randomize_lora(model)
    x = images(batch=3)
    unmerged = model(x)
    merged_model = merge_lora(model)
    torch.testing.assert_close(merged_model(x), unmerged, atol=1e-5, rtol=0)
    assert module_types(merged_model) == module_types(fresh)
    assert list(merged_model.state_dict()) == list(fresh.state_dict())
    assert all(p.requires_grad for p in merged_model.parameters())
    assert (merged_model(x) - fresh(x)).abs().max() > 1e-3  # the update really is in there


def test_remove_lora_gives_back_the_base_model():
    model = tiny_model("eva02_tiny_patch14_224")
    x = images()
    expected = model(x)
    inject_lora(model, LoRAConfig(targets=ALL_TARGETS))
    randomize_lora(model)
    model.eval()
    remove_lora(model)
    assert torch.equal(model(x), expected)
    assert not lora_modules(model) and not any(m.training for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


# --- precision and compilation --------------------------------------------------------------


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_forward_and_backward(dtype, use_dora):
    model = tiny_model(num_classes=3)
    inject_lora(model, LoRAConfig(targets=("q", "v", "fc1"), use_dora=use_dora))
    randomize_lora(model)
    x = images()
    reference = model(x)
    with torch.autocast("cpu", dtype=dtype):
        out = model(x)
        loss = out.float().logsumexp(-1).mean()
    loss.backward()
    torch.testing.assert_close(out.float(), reference, atol=0.1, rtol=0.05)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 and g.isfinite().all() for g in grads)


@pytest.mark.parametrize("use_dora", [False, True])
def test_torch_compile_matches_eager_on_an_injected_model(use_dora):
    model = tiny_model().train()
    inject_lora(model, LoRAConfig(targets=("q", "v"), use_dora=use_dora))
    randomize_lora(model)
    x = images()
    eager = model(x)
    eager.square().mean().backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    compiled = torch.compile(model)
    out = compiled(x)
    out.square().mean().backward()
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, atol=1e-5, rtol=1e-4)


def test_parameter_summary_prints_groups():
    model = inject_lora(tiny_model(), LoRAConfig(rank=2))
    text = str(count_parameters(model))
    for word in ("lora", "head", "frozen", "trainable", "total"):
        assert word in text
    assert f"{count_parameters(model).total:,}" in text


@pytest.mark.parametrize("name", MODEL_NAMES[:1])
def test_selected_blocks_only(name):
    model = tiny_model(name, depth=3)
    inject_lora(model, LoRAConfig(blocks=[0, -1]))
    assert [n for n, _ in lora_modules(model)] == ["blocks.0.attn.qkv", "blocks.2.attn.qkv"]


def test_lora_disabled_gives_the_base_exactly_and_switches_back():

    base = tiny_model()
    adapted = inject_lora(tiny_model(), LoRAConfig(rank=2, targets=("q", "v", "fc1"), use_dora=True))
    randomize_lora(adapted)
    x = images()
    with torch.no_grad():
        updated = adapted(x)
        with lora_disabled(adapted), lora_disabled(adapted):
            assert torch.equal(adapted(x), base(x))
        assert torch.equal(adapted(x), updated)
