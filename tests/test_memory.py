"""What LoRA keeps for backward: nothing that undoes the memory a frozen base should save."""

import copy
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from conftest import images, randomize_lora, tiny_model

from vitlora import LoRAConfig, LoRALinear, activation_bytes, inject_lora, saved_for_backward
from vitlora.lora import expand_lora_B, lora_modules

PRECISIONS = {"fp32": nullcontext, "cpu-bf16-autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}


def lora_model(targets=("q", "v", "fc1")):
    model = tiny_model().train()
    inject_lora(model, LoRAConfig(rank=4, targets=targets))
    randomize_lora(model)
    return model


def input_sizes(model, x) -> dict[str, int]:
    """Elements of each LoRA layer's input in one forward pass."""
    sizes: dict[str, int] = {}
    names = {module: name for name, module in lora_modules(model)}
    handles = [m.register_forward_pre_hook(lambda m, args: sizes.update({names[m]: args[0].numel()})) for m in names]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return sizes


@pytest.mark.parametrize("precision", PRECISIONS)
def test_lora_layers_keep_their_frozen_weight_only_as_itself_and_their_input_once(precision):
    model = lora_model()
    x = images()
    with PRECISIONS[precision]():
        saved = saved_for_backward(model, x)
    sizes = input_sizes(model, x)
    assert sorted(sizes) == ["blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.1.attn.qkv", "blocks.1.mlp.fc1"]
    for name, layer in lora_modules(model):
        # (plain frozen nn.Linear layers, here proj and fc2, keep autocast's copy as in any PyTorch model)
        inside = [t for t in saved if t.module == name]
        weight_shapes = {tuple(layer.weight.shape), tuple(layer.weight.shape[::-1])}
        copies = [t for t in inside if t.shape in weight_shapes and t.parameter is None]
        assert not copies, f"{name}: a dense delta-W or a cast copy of the frozen weight is kept: {copies}"
        inputs = [t for t in inside if t.parameter is None and t.shape[-1] == layer.in_features]
        assert [t.shape for t in inputs] == [(sizes[name] // layer.in_features, layer.in_features)], name
        kept = {t.parameter for t in inside if t.parameter}  # nothing before the first qkv trains: no input grad
        assert (f"{name}.weight" in kept) == (name != "blocks.0.attn.qkv"), (name, kept)
        low_rank = len(layer.slices) * layer.config.rank
        others = [t for t in inside if t.parameter is None and t not in inputs]
        tokens = sizes[name] // layer.in_features
        assert sum(t.nbytes for t in others) <= 4 * low_rank * (tokens + layer.in_features + layer.out_features), name


@pytest.mark.parametrize("precision", PRECISIONS)
def test_lora_saves_fewer_bytes_than_full_fine_tuning(precision):
    x = images(batch=4)
    with PRECISIONS[precision]():
        full = activation_bytes(saved_for_backward(tiny_model().train(), x))
        lora = activation_bytes(saved_for_backward(lora_model(), x))
    assert 0 < lora < 0.9 * full, (lora, full)


def dense_forward(self: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """The textbook LoRA: ``x (W + s B A)^T + b`` through the dense update."""
    return F.linear(
        x,
        self.weight + self.scaling * expand_lora_B(self.lora_B, self.slices, self.out_features) @ self.lora_A,
        self.bias,
    )


def lora_gradients(model, x) -> dict[str, torch.Tensor]:
    model.zero_grad()
    F.cross_entropy(model(x).float(), torch.tensor([0, 3])).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_lora_gradients_equal_the_dense_reference(monkeypatch):
    model = lora_model()
    reference = copy.deepcopy(model)
    x = images()
    grads = lora_gradients(model, x)
    monkeypatch.setattr(LoRALinear, "forward", dense_forward)
    expected = lora_gradients(reference, x)
    assert grads.keys() == expected.keys() and any("blocks.0" in name for name in grads)
    for name, grad in grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grad, expected[name], atol=1e-6, rtol=1e-5, msg=name)


def test_autocast_gradients_equal_those_of_plain_linear_layers(monkeypatch):
    """The frozen path re-casts its weight in backward instead of keeping the cast: same numbers."""
    model = lora_model()
    reference = copy.deepcopy(model)
    x = images()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grads = lora_gradients(model, x)
        monkeypatch.setattr("vitlora.lora._FrozenLinear.apply", F.linear)
        expected = lora_gradients(reference, x)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], atol=0, rtol=0, msg=name)
