"""One rollback for every all-or-nothing model change: the same objects, flags and values come back."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from vitlora.rollback import rollback_on_error


def state_of(model: torch.nn.Module) -> tuple:
    return (
        [(name, id(module), module.training) for name, module in model.named_modules()],
        [(name, id(p), p.requires_grad) for name, p in model.named_parameters()],
        {key: value.clone() for key, value in model.state_dict().items()},
        model.num_classes,
    )


def assert_same_state(before: tuple, after: tuple) -> None:
    assert before[0] == after[0] and before[1] == after[1] and before[3] == after[3]
    assert before[2].keys() == after[2].keys()
    for key, value in before[2].items():
        assert torch.equal(value, after[2][key]), key


def test_a_failed_block_restores_modules_heads_flags_trainable_set_and_named_values():
    model = tiny_model()
    before = state_of(model)
    with pytest.raises(RuntimeError, match="boom"), rollback_on_error(model, values=["blocks.0.norm1.bias"]):
        model.reset_classifier(7)
        model.set_submodule("blocks.0.attn.qkv", torch.nn.Linear(64, 192))
        model.blocks[1].train()
        model.requires_grad_(False)
        model.extra_flag = True
        with torch.no_grad():
            model.blocks[0].norm1.bias.add_(1.0)
        raise RuntimeError("boom")
    assert_same_state(before, state_of(model))
    assert not hasattr(model, "extra_flag")


def test_keyboard_interrupt_rolls_back_too_and_success_keeps_the_change():
    model = tiny_model()
    before = state_of(model)
    with pytest.raises(KeyboardInterrupt), rollback_on_error(model):
        model.reset_classifier(3)
        raise KeyboardInterrupt
    assert_same_state(before, state_of(model))
    with rollback_on_error(model):
        model.reset_classifier(3)
    assert model.num_classes == 3
