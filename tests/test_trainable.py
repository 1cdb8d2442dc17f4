import pytest
import torch
from conftest import images, randomize_lora, tiny_model

from vitlora import (
    LoRAConfig,
    PromptConfig,
    adapter_state_dict,
    add_prompt_tokens,
    count_parameters,
    enable_bias_tuning,
    freeze_base,
    inject_lora,
    merge_lora,
)
from vitlora.trainable import bias_tuning_enabled, disable_bias_tuning

ALL_TARGETS = ("q", "k", "v", "proj", "fc1", "fc2")


def trainable(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


def biases(model):
    """Every bias of the backbone, read from the module tree rather than from the naming rule under test."""
    found = set()
    for prefix, module in model.named_modules():
        for name, parameter in module.named_parameters(recurse=False):
            if parameter.ndim == 1 and name.endswith("bias") and not prefix.startswith(("head", "head_dist")):
                found.add(f"{prefix}.{name}")
    return found


def nudge_biases(model, seed=4):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in biases(model):
            parameter = model.get_parameter(name)
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))


def test_freeze_base_on_a_plain_model_is_a_linear_probe():
    model = freeze_base(tiny_model("deit_tiny_distilled_patch16_224"))
    assert trainable(model) == {"head.weight", "head.bias", "head_dist.weight", "head_dist.bias"}


def test_bias_tuning_trains_every_bias_and_the_head_and_changes_no_output(model_name):
    model = tiny_model(model_name)
    expected = model(images())
    enable_bias_tuning(model)
    assert torch.equal(model(images()), expected)
    heads = {n for n, _ in model.named_parameters() if n.startswith(("head.", "head_dist."))}
    assert trainable(model) == biases(model) | heads
    assert {"blocks.0.norm1.bias", "blocks.1.mlp.fc2.bias"} <= trainable(model)  # norms too, as in BitFit
    if model.patch_embed.proj.bias is not None:  # CLIP's patch embedding has none
        assert "patch_embed.proj.bias" in trainable(model)
    if model_name == "eva02_tiny_patch14_224":  # q/v biases beside a bias-free fused qkv
        assert {"blocks.0.attn.q_bias", "blocks.0.attn.v_bias"} <= trainable(model)
    model.train()
    model(images()).logsumexp(-1).sum().backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trainable(model)
    assert count_parameters(model).by_group["bias"] == sum(model.get_parameter(n).numel() for n in biases(model))


def test_adapter_state_dict_ships_exactly_lora_prompts_biases_and_heads():
    model = tiny_model()
    inject_lora(model, LoRAConfig(rank=2, targets=("q",)))
    add_prompt_tokens(model, PromptConfig(num_tokens=2, deep=True))
    assert set(adapter_state_dict(model)) == trainable(model)
    enable_bias_tuning(model)
    shipped = set(adapter_state_dict(model))
    assert shipped == trainable(model)
    assert shipped == (
        {f"blocks.{i}.attn.qkv.lora_{m}" for i in range(2) for m in "AB"}
        | {f"blocks.{i}.prompt.tokens" for i in range(2)}
        | biases(model)
        | {"head.weight", "head.bias"}
    )
    count = count_parameters(model)
    assert set(count.by_group) == {"lora", "prompt", "bias", "head", "frozen"}
    assert count.trainable == sum(t.numel() for t in adapter_state_dict(model).values())
    assert "bias" in str(count) and "prompt" in str(count)


def test_methods_combine_in_any_order():
    orders = [
        lambda m: enable_bias_tuning(add_prompt_tokens(inject_lora(m, LoRAConfig(rank=2)), PromptConfig(2))),
        lambda m: inject_lora(add_prompt_tokens(enable_bias_tuning(m), PromptConfig(2)), LoRAConfig(rank=2)),
        lambda m: add_prompt_tokens(inject_lora(enable_bias_tuning(m), LoRAConfig(rank=2)), PromptConfig(2)),
    ]
    sets = [trainable(adapt(tiny_model())) for adapt in orders]
    assert sets[0] == sets[1] == sets[2]


def test_merge_carries_the_tuned_biases_into_the_plain_model():
    model = tiny_model()
    inject_lora(model, LoRAConfig(rank=4, targets=ALL_TARGETS))
    enable_bias_tuning(model)
    randomize_lora(model)
    nudge_biases(model)
    tuned = {n: model.get_parameter(n).detach().clone() for n in biases(model)}
    x = images(batch=3)
    unmerged = model(x)
    merged = merge_lora(model)
    torch.testing.assert_close(merged(x), unmerged, atol=1e-5, rtol=0)
    assert all(torch.equal(merged.get_parameter(n), value) for n, value in tuned.items())
    assert (merged(x) - tiny_model()(x)).abs().max() > 1e-2


def test_disabling_returns_the_biases_to_the_frozen_base_keeping_their_values():
    model = enable_bias_tuning(tiny_model())
    nudge_biases(model)
    value = model.blocks[0].attn.qkv.bias.detach().clone()
    disable_bias_tuning(model)
    assert not bias_tuning_enabled(model) and trainable(model) == {"head.weight", "head.bias"}
    assert torch.equal(model.blocks[0].attn.qkv.bias, value)


@pytest.mark.parametrize("compiled", [False, True])
def test_a_compiled_model_is_read_through_to_the_original(compiled):
    model = tiny_model()
    wrapped = torch.compile(model) if compiled else model
    enable_bias_tuning(wrapped)
    assert bias_tuning_enabled(model) and bias_tuning_enabled(wrapped)
    assert set(adapter_state_dict(wrapped)) == biases(model) | {"head.weight", "head.bias"}
