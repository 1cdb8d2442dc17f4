"""The adaptation policy outside Lightning: what each method trains."""

from __future__ import annotations

import pytest
from conftest import tiny_model

from vitlora import LoRAConfig, PromptConfig, count_parameters
from vitlora.adapt import adapt_backbone


def trainable(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_lora_trains_lora_and_head_only():
    model = adapt_backbone(tiny_model(), "lora", LoRAConfig(rank=2, targets=("q", "v")))
    assert trainable(model) == {n for n in trainable(model) if "lora_" in n or n.startswith("head.")}
    assert {"head.weight", "blocks.0.attn.qkv.lora_A", "blocks.1.attn.qkv.lora_B"} <= trainable(model)


def test_linear_trains_the_head_and_joins_prompts_and_biases():
    model = adapt_backbone(tiny_model(), "linear", prompt=PromptConfig(num_tokens=2), bias_tuning=True)
    names = trainable(model)
    assert "head.weight" in names and "blocks.0.prompt.tokens" in names and "blocks.0.mlp.fc1.bias" in names
    assert "blocks.0.mlp.fc1.weight" not in names


def test_full_with_last_blocks_trains_them_the_final_norm_and_the_head():
    model = adapt_backbone(tiny_model(), "full", train_last_blocks=1)
    names = trainable(model)
    assert all(n.startswith(("blocks.1.", "norm.", "fc_norm.", "head.")) for n in names)
    assert "blocks.1.attn.qkv.weight" in names and "blocks.0.attn.qkv.weight" not in names


def test_lora_on_the_last_block_only():
    model = adapt_backbone(tiny_model(), "lora", LoRAConfig(rank=2), train_last_blocks=1)
    assert not [n for n in trainable(model) if n.startswith("blocks.0.")]
    assert count_parameters(model).trainable < count_parameters(adapt_backbone(tiny_model(), "lora")).trainable


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "partial"}, "method must be one of lora, full, linear"),
        ({"method": "linear", "train_last_blocks": 1}, "train_last_blocks is for the lora and full"),
        ({"method": "full", "bias_tuning": True}, "already trains every weight"),
        ({"method": "lora", "lora": LoRAConfig(blocks=(0,)), "train_last_blocks": 1}, "either train_last_blocks"),
    ],
)
def test_meaningless_combinations_are_refused_before_anything_changes(kwargs, message):
    model = tiny_model()
    before = trainable(model)
    with pytest.raises(ValueError, match=message):
        adapt_backbone(model, **kwargs)
    assert trainable(model) == before
