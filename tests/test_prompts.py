import copy

import pytest
import timm
import torch
from conftest import MODEL_NAMES, images, randomize_lora, tiny_model

from vitlora import (
    LoRAConfig,
    PromptConfig,
    add_prompt_tokens,
    count_parameters,
    inject_lora,
    merge_lora,
    prompt_config,
    remove_prompt_tokens,
)
from vitlora.lora import lora_modules
from vitlora.prompts import prompts_disabled

PROMPTABLE = [name for name in MODEL_NAMES if not name.startswith("eva")]  # token, distilled, registers, map pool
VARIANTS = [(name, {}) for name in PROMPTABLE] + [("vit_tiny_patch16_224", {"global_pool": "avg", "fc_norm": True})]
IDS = [name for name, _ in VARIANTS[:-1]] + ["vit_avg_pool"]


def module_types(model):
    return [(name, type(module)) for name, module in model.named_modules()]


def spread_prompts(model, seed=3):
    """Prompt tokens far from their small initialisation, so that any misplacement shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("prompt.tokens"):
                parameter.copy_(3 * torch.randn(parameter.shape, generator=generator))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_tokens": 0}, "positive integer"),
        ({"num_tokens": -2}, "positive integer"),
        ({"num_tokens": 2.5}, "positive integer"),
        ({"num_tokens": True}, "positive integer"),
        ({"deep": "yes"}, "true or false"),
        ({"init_std": -0.1}, ">= 0"),
    ],
)
def test_invalid_config_values_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PromptConfig(**kwargs)


def test_config_defaults_and_json_round_trip():
    assert PromptConfig() == PromptConfig(num_tokens=8, deep=False, init_std=0.02)
    config = PromptConfig(num_tokens=3, deep=True, init_std=0.5)
    assert PromptConfig.from_json(config.to_json()) == config


@pytest.mark.parametrize(("name", "kwargs"), VARIANTS, ids=IDS)
@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
def test_features_equal_a_manual_pass_over_the_concatenated_tokens_and_pooling_skips_prompts(name, kwargs, deep):
    """The prompted model against the plain one run by hand: tokens spliced in after the prefix
    (replaced before each later block when deep), then the plain model's own head applied to the
    sequence with the prompt outputs cut out."""
    prompted, plain = tiny_model(name, **kwargs), tiny_model(name, **kwargs)
    prefix, n = plain.num_prefix_tokens, 3
    add_prompt_tokens(prompted, PromptConfig(num_tokens=n, deep=deep))
    spread_prompts(prompted)
    x = images()
    with torch.no_grad():
        tokens = plain.norm_pre(plain.patch_drop(plain._pos_embed(plain.patch_embed(x))))
        for index, block in enumerate(plain.blocks):
            prompt = prompted.blocks[index].prompt.tokens if deep or index == 0 else None
            if prompt is not None:
                after = prefix + n if index > 0 else prefix
                prompt = prompt.expand(len(x), -1, -1)
                tokens = torch.cat((tokens[:, :prefix], prompt, tokens[:, after:]), dim=1)
            tokens = block(tokens)
        manual = plain.norm(tokens)
        features = prompted.forward_features(x)
        torch.testing.assert_close(features, manual, atol=1e-6, rtol=1e-6)
        assert features.shape[1] == manual.shape[1] == prefix + n + plain.patch_embed.num_patches
        without_prompts = torch.cat((manual[:, :prefix], manual[:, prefix + n :]), dim=1)
        expected = plain.forward_head(without_prompts)
        torch.testing.assert_close(prompted.forward_head(features), expected, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(prompted(x), expected, atol=1e-6, rtol=1e-6)
        assert (features[:, prefix + n :] - plain.forward_features(x)[:, prefix:]).abs().max() > 1e-3  # they steer


@pytest.mark.parametrize("name", PROMPTABLE)
def test_add_then_remove_gives_back_the_plain_model_exactly(name):
    model = tiny_model(name)
    x = images()
    expected, types, keys = model(x), module_types(model), list(model.state_dict())
    prefix = model.num_prefix_tokens
    add_prompt_tokens(model, PromptConfig(num_tokens=2, deep=True))
    assert model.num_prefix_tokens == prefix + 2 and not torch.equal(model(x), expected)
    remove_prompt_tokens(model)
    assert torch.equal(model(x), expected)
    assert module_types(model) == types and list(model.state_dict()) == keys
    assert model.num_prefix_tokens == prefix and prompt_config(model) is None
    assert not any(block._forward_pre_hooks for block in model.blocks)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
def test_parameter_counts_and_keys_shallow_vs_deep(deep):
    model = tiny_model(depth=3)
    add_prompt_tokens(model, PromptConfig(num_tokens=5, deep=deep))
    blocks = range(3) if deep else range(1)
    assert [n for n, _ in model.named_parameters() if "prompt" in n] == [f"blocks.{i}.prompt.tokens" for i in blocks]
    count = count_parameters(model)
    assert count.by_group["prompt"] == len(blocks) * 5 * 64
    assert count.trainable == count.by_group["prompt"] + count.by_group["head"]
    assert prompt_config(model) == PromptConfig(num_tokens=5, deep=deep)


@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
def test_prompts_get_gradients_and_the_frozen_base_none(deep):
    model = tiny_model("vit_small_patch14_reg4_dinov2").train()
    add_prompt_tokens(model, PromptConfig(num_tokens=2, deep=deep))
    model(images()).logsumexp(-1).sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in model.named_parameters() if "prompt" in n or n.startswith("head.")}
    assert len([n for n in with_grad if "prompt" in n]) == (2 if deep else 1)
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in with_grad)


def test_init_std_scales_the_tokens():
    torch.manual_seed(0)
    model = add_prompt_tokens(tiny_model(), PromptConfig(num_tokens=64, init_std=0.5))
    assert model.blocks[0].prompt.tokens.std().item() == pytest.approx(0.5, rel=0.05)
    zeros = add_prompt_tokens(tiny_model(), PromptConfig(num_tokens=2, init_std=0))
    assert torch.count_nonzero(zeros.blocks[0].prompt.tokens) == 0


def test_intermediates_count_prompts_as_prefix_tokens():
    model = tiny_model("deit_tiny_distilled_patch16_224")
    add_prompt_tokens(model, PromptConfig(num_tokens=3, deep=True))
    final, intermediates = model.forward_intermediates(images(), return_prefix_tokens=True)
    assert [tuple(t[0].shape) for t in intermediates] == [(2, 64, 4, 4)] * 2  # patches back on their grid
    assert [tuple(t[1].shape) for t in intermediates] == [(2, 2 + 3, 64)] * 2  # cls, dist and the prompts
    torch.testing.assert_close(final, model.forward_features(images()))


def test_gradient_checkpointing_runs_the_hooks():
    model = add_prompt_tokens(tiny_model(), PromptConfig(num_tokens=2, deep=True)).train()
    spread_prompts(model)
    expected = model(images())
    expected.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out = model(images())
    out.sum().backward()
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, atol=1e-6, rtol=1e-5)


def test_works_with_lora_in_either_order_and_merge_keeps_the_prompts():
    first_lora = tiny_model("vit_small_patch14_reg4_dinov2")
    inject_lora(first_lora, LoRAConfig(rank=2))
    add_prompt_tokens(first_lora, PromptConfig(num_tokens=2, deep=True))
    first_prompts = add_prompt_tokens(tiny_model("vit_small_patch14_reg4_dinov2"), PromptConfig(2, deep=True))
    inject_lora(first_prompts, LoRAConfig(rank=2))
    trainable = [{n for n, p in m.named_parameters() if p.requires_grad} for m in (first_lora, first_prompts)]
    assert trainable[0] == trainable[1] and {"blocks.1.prompt.tokens", "blocks.1.attn.qkv.lora_B"} <= trainable[0]

    randomize_lora(first_lora)
    spread_prompts(first_lora)
    x = images()
    unmerged = first_lora(x)
    merge_lora(first_lora)
    assert not lora_modules(first_lora) and prompt_config(first_lora) == PromptConfig(2, deep=True)
    torch.testing.assert_close(first_lora(x), unmerged, atol=1e-5, rtol=0)
    remove_prompt_tokens(first_lora)
    assert list(first_lora.state_dict()) == list(tiny_model("vit_small_patch14_reg4_dinov2").state_dict())


def test_a_deep_copy_is_independent():
    model = add_prompt_tokens(tiny_model(), PromptConfig(num_tokens=2, deep=True))
    spread_prompts(model)
    twin = copy.deepcopy(model)
    assert torch.equal(twin(images()), model(images()))
    remove_prompt_tokens(twin)
    assert prompt_config(model) is not None and model.blocks[1]._forward_pre_hooks
    assert torch.equal(twin(images()), tiny_model()(images()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_forward_and_backward(dtype):
    model = add_prompt_tokens(tiny_model(num_classes=3), PromptConfig(num_tokens=2, deep=True))
    spread_prompts(model)
    reference = model(images())
    with torch.autocast("cpu", dtype=dtype):
        out = model(images())
    out.float().logsumexp(-1).mean().backward()
    torch.testing.assert_close(out.float(), reference, atol=0.1, rtol=0.05)
    grads = [p.grad for n, p in model.named_parameters() if "prompt" in n]
    assert all(g.dtype == torch.float32 and g.isfinite().all() and g.abs().sum() > 0 for g in grads)


def test_torch_compile_matches_eager():
    model = add_prompt_tokens(tiny_model(), PromptConfig(num_tokens=2, deep=True)).train()
    spread_prompts(model)
    eager = model(images())
    eager.square().mean().backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    out = torch.compile(model, fullgraph=True)(images())  # hooks trace: no graph break
    out.square().mean().backward()
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: tiny_model("eva02_tiny_patch14_224"), "Eva applies rotary position embeddings"),
        (lambda: tiny_model(dynamic_img_size=True), "dynamic_img_size"),
        (lambda: tiny_model(global_pool="avg", pool_include_prefix=True), "pool_include_prefix"),
        (lambda: timm.create_model("resnet10t", num_classes=3), "ResNet is not a timm VisionTransformer"),
        (lambda: add_prompt_tokens(tiny_model(), PromptConfig(2)), "already has prompt tokens"),
    ],
    ids=["eva_rope", "dynamic_img_size", "pool_include_prefix", "resnet", "twice"],
)
def test_unsupported_models_are_refused_with_the_reason_and_left_unchanged(make, message):
    model = make()
    types, grads = module_types(model), {n: p.requires_grad for n, p in model.named_parameters()}
    prefix = getattr(model, "num_prefix_tokens", None)
    with pytest.raises(ValueError, match=message):
        add_prompt_tokens(model, PromptConfig(num_tokens=2))
    assert module_types(model) == types and getattr(model, "num_prefix_tokens", None) == prefix
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads


def test_removing_from_a_plain_model_is_refused():
    with pytest.raises(ValueError, match="no prompt tokens to remove"):
        remove_prompt_tokens(tiny_model())


def test_prompts_disabled_gives_the_model_without_them_and_switches_back():

    plain = tiny_model()
    prompted = add_prompt_tokens(tiny_model(), PromptConfig(num_tokens=3, deep=True))
    x = images()
    with torch.no_grad():
        with_prompts = prompted(x)
        assert not torch.equal(with_prompts, plain(x))
        with prompts_disabled(prompted):
            assert torch.equal(prompted(x), plain(x))
        assert torch.equal(prompted(x), with_prompts) and prompted.num_prefix_tokens == plain.num_prefix_tokens + 3
