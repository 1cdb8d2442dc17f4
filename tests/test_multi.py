import pytest
import torch
import torch.nn.functional as F
from conftest import images, randomize_lora, tiny_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from vitlora import (
    AdapterError,
    LoRAConfig,
    MixedLogits,
    MultiAdapter,
    PromptConfig,
    add_prompt_tokens,
    enable_bias_tuning,
    freeze_base,
    inject_lora,
    load_adapter,
    save_adapter,
)
from vitlora.multi import RoutedLoRALinear
from vitlora.targets import classifier_names
from vitlora.validation import with_payload_digest

# Three tenants that overlap on some layers and not on others, with their own heads and classes.
TENANTS = {
    "fruit": (LoRAConfig(rank=4, targets=("q", "v")), ["apple", "banana", "cherry"]),
    "tools": (
        LoRAConfig(
            rank=2,
            alpha=8,
            targets=("qkv", "proj", "fc1", "fc2"),
            blocks=[-1],
            rank_pattern={"fc2": 3},
            alpha_pattern={"qkv": 5},
        ),  # per-layer rank and alpha
        list("wxyz"),
    ),
    "shoes": (LoRAConfig(rank=8, targets=("k", "fc2"), blocks=[0], use_rslora=True), [f"s{i}" for i in range(6)]),
}
ROUTES = ["fruit", "tools", None, "shoes", "fruit", "tools", "shoes"]  # one tenant per image


def save_tenant(folder, name, model_name="vit_tiny_patch16_224", seed=0):
    """An adapter with non-zero LoRA updates and its own random head(s), as training would leave it."""
    config, classes = TENANTS[name]
    model = inject_lora(tiny_model(model_name, num_classes=len(classes), seed=seed), config)
    offset = list(TENANTS).index(name)
    randomize_lora(model, seed=10 + offset)
    generator = torch.Generator().manual_seed(20 + offset)
    with torch.no_grad():
        for head in classifier_names(model):
            for parameter in getattr(model, head).parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return save_adapter(model, folder / f"{name}.safetensors", class_names=classes)


def multi_with_tenants(folder, model_name="vit_tiny_patch16_224"):
    paths = {name: save_tenant(folder, name, model_name) for name in TENANTS}
    multi = MultiAdapter(tiny_model(model_name))
    for name, path in paths.items():
        multi.add(name, path)
    return multi, paths


def separate_model(model_name, path):
    """The reference: the adapter alone, loaded by load_adapter onto a fresh copy of the base."""
    return tiny_model(model_name) if path is None else load_adapter(tiny_model(model_name), path)


def rows_of(name, routes=ROUTES):
    return [i for i, route in enumerate(routes) if route == name]


def parameter_bytes(module):
    return sum(p.numel() * p.element_size() for p in module.parameters())


def structure(multi):
    return [(name, type(module)) for name, module in multi.named_modules()]


# --- mixed batches ---------------------------------------------------------------------------


def test_mixed_batch_equals_separate_single_adapter_runs(tmp_path, model_name):
    multi, paths = multi_with_tenants(tmp_path, model_name)
    x = images(len(ROUTES))
    mixed = multi(x, ROUTES)
    assert isinstance(mixed, MixedLogits) and mixed.adapters == ROUTES
    assert mixed.num_classes == [3, 4, 5, 6, 3, 4, 6]  # None is the base with its own 5-class head
    assert mixed.logits.shape == (7, 6)
    assert torch.isneginf(mixed.logits[0, 3:]).all() and torch.isfinite(mixed.logits[3]).all()
    per_sample = mixed.per_sample()
    for name in [*TENANTS, None]:
        rows = rows_of(name)
        expected = separate_model(model_name, paths.get(name))(x[rows])
        torch.testing.assert_close(torch.stack([per_sample[i] for i in rows]), expected, rtol=1e-5, atol=1e-5)


def test_a_batch_of_one_adapter_and_the_active_adapter_match_the_separate_run(tmp_path):
    multi, paths = multi_with_tenants(tmp_path)
    x = images(3)
    for name in TENANTS:
        expected = separate_model("vit_tiny_patch16_224", paths[name])(x)
        multi.set_active(name)
        assert multi.active == name
        torch.testing.assert_close(multi(x), expected, rtol=0, atol=0)  # the same ops as LoRALinear
        torch.testing.assert_close(multi(x, [name] * 3).logits, expected, rtol=0, atol=0)
    multi.set_active(None)
    torch.testing.assert_close(multi(x), tiny_model()(x), rtol=1e-5, atol=1e-5)


def test_base_weights_are_shared_never_copied_and_memory_grows_by_the_adapter_tensors(tmp_path):
    paths = {name: save_tenant(tmp_path, name) for name in TENANTS}
    base = tiny_model()
    base_parameters = dict(base.named_parameters())
    pointers = {name: p.data_ptr() for name, p in base_parameters.items()}
    multi = MultiAdapter(base)
    size = parameter_bytes(multi)
    assert size == parameter_bytes(tiny_model())
    for name, path in paths.items():
        multi.add(name, path)
        file_bytes = sum(t.numel() * t.element_size() for t in load_file(path).values())
        assert parameter_bytes(multi) - size == file_bytes
        size += file_bytes
        multi.set_active(name)
        multi(images())
    now = dict(multi.model.named_parameters())
    assert all(now[name] is p and p.data_ptr() == pointers[name] for name, p in base_parameters.items())
    assert not any(p.requires_grad for p in base_parameters.values())


def test_training_on_a_mixed_batch_gives_each_adapter_the_gradients_of_its_separate_run(tmp_path):
    model_name = "deit_tiny_distilled_patch16_224"  # two heads per adapter
    multi, paths = multi_with_tenants(tmp_path, model_name)
    multi.train()
    x, targets = images(len(ROUTES)), torch.tensor([2, 3, 4, 5, 0, 1, 0])
    F.cross_entropy(multi(x, ROUTES).logits, targets, reduction="sum").backward()
    for name, path in paths.items():
        rows = rows_of(name)
        separate = separate_model(model_name, path).train()
        F.cross_entropy(separate(x[rows]), targets[rows], reduction="sum").backward()
        expected = dict(separate.named_parameters())
        trained = multi.adapter_parameters(name)
        assert trained.keys() == load_file(path).keys()
        for key, parameter in trained.items():
            torch.testing.assert_close(parameter.grad, expected[key].grad, rtol=1e-4, atol=1e-5, msg=key)
    assert all(p.grad is None for p in multi.model.parameters() if not p.requires_grad)


def test_gradients_reach_an_adapter_only_from_its_own_samples(tmp_path):
    multi, _ = multi_with_tenants(tmp_path)
    multi.train()
    mixed = multi(images(len(ROUTES)), ROUTES)
    mixed.logits[rows_of("fruit")].logsumexp(-1).sum().backward()
    assert all(p.grad.abs().sum() > 0 for p in multi.adapter_parameters("fruit").values())
    for name in ("tools", "shoes"):
        assert all(p.grad is None or not p.grad.any() for p in multi.adapter_parameters(name).values())


# --- loading, removing, bad input ------------------------------------------------------------


def test_an_adapter_trained_on_other_base_weights_is_refused_and_nothing_changes(tmp_path):
    multi, _ = multi_with_tenants(tmp_path)
    before, x = structure(multi), images(len(ROUTES))
    output = multi(x, ROUTES).logits
    (tmp_path / "other").mkdir()
    foreign = save_tenant(tmp_path / "other", "fruit", seed=7)
    with pytest.raises(AdapterError, match=r"fruit\.safetensors: the model's base weights differ"):
        multi.add("fruit2", foreign)
    assert structure(multi) == before and list(multi.adapters) == list(TENANTS)
    torch.testing.assert_close(multi(x, ROUTES).logits, output, rtol=0, atol=0)
    multi.add("fruit2", foreign, check_base=False)
    assert "fruit2" in multi.adapters


def without_tensor(path, key):
    with safe_open(path, "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(path)
    del tensors[key]
    save_file(tensors, path, metadata=with_payload_digest(tensors, metadata))
    return path


def test_a_broken_file_is_rolled_back_whether_first_or_later(tmp_path):
    broken = without_tensor(save_tenant(tmp_path, "tools"), "blocks.1.mlp.fc2.lora_B")
    multi = MultiAdapter(tiny_model())
    plain = structure(multi)
    with pytest.raises(
        AdapterError, match=r"tools\.safetensors: blocks\.1\.mlp\.fc2: LoRA tensors \['lora_A'\] are not"
    ):
        multi.add("tools", broken)
    assert structure(multi) == plain and not multi.adapters and not list(multi.heads)
    multi.add("fruit", save_tenant(tmp_path, "fruit"))
    before = structure(multi)
    with pytest.raises(AdapterError, match="are not"):
        multi.add("tools", broken)
    assert structure(multi) == before and list(multi.adapters) == ["fruit"]


def test_a_config_that_does_not_fit_the_model_is_an_adapter_error(tmp_path):
    deep = inject_lora(tiny_model(depth=3), LoRAConfig(blocks=[2]))
    path = save_adapter(deep, tmp_path / "deep.safetensors")
    multi = MultiAdapter(tiny_model())
    with pytest.raises(AdapterError, match=r"deep\.safetensors: the model is not the base .*: depth 3 != 2"):
        multi.add("deep", path, check_base=False)
    assert not multi.adapters


def test_removing_adapters_keeps_the_others_and_finally_gives_the_plain_base_back(tmp_path):
    multi, paths = multi_with_tenants(tmp_path)
    plain = tiny_model()
    linears = {name: module for name, module in multi.model.named_modules() if type(module) is nn.Linear}
    x = images(len(ROUTES))
    multi.set_active("tools")
    multi.remove("tools")
    assert multi.active is None and list(multi.adapters) == ["fruit", "shoes"]
    assert type(multi.model.blocks[1].mlp.fc1) is nn.Linear  # only tools adapted it
    assert isinstance(multi.model.blocks[1].attn.qkv, RoutedLoRALinear)  # fruit still does
    routes = [r if r != "tools" else "fruit" for r in ROUTES]
    mixed = multi(x, routes).per_sample()
    for name in ("fruit", "shoes"):
        rows = rows_of(name, routes)
        expected = separate_model("vit_tiny_patch16_224", paths[name])(x[rows])
        torch.testing.assert_close(torch.stack([mixed[i] for i in rows]), expected, rtol=1e-5, atol=1e-5)
    multi.remove("fruit")
    multi.remove("shoes")
    assert [(n, type(m)) for n, m in multi.model.named_modules()] == [(n, type(m)) for n, m in plain.named_modules()]
    assert all(multi.model.get_submodule(name) is module for name, module in linears.items())
    assert multi.model.state_dict().keys() == plain.state_dict().keys()
    torch.testing.assert_close(multi(x), plain(x), rtol=0, atol=0)


def test_unknown_and_invalid_names_are_clear_errors(tmp_path):
    multi, paths = multi_with_tenants(tmp_path)
    with pytest.raises(KeyError, match=r"Unknown adapter 'hats': loaded are \['fruit', 'shoes', 'tools'\]"):
        multi(images(2), ["fruit", "hats"])
    for call in (multi.set_active, multi.remove, multi.adapter_parameters):
        with pytest.raises(KeyError, match="'hats'"):
            call("hats")
    with pytest.raises(KeyError, match="None"):
        multi.remove(None)
    with pytest.raises(ValueError, match="3 adapter names for a batch of 2 images"):
        multi(images(2), ["fruit"] * 3)
    with pytest.raises(ValueError, match="already loaded"):
        multi.add("fruit", paths["fruit"])
    with pytest.raises(ValueError, match="letters, digits"):
        multi.add("a.b", paths["fruit"])
    with pytest.raises(ValueError, match="already has LoRA"):
        MultiAdapter(inject_lora(tiny_model(), LoRAConfig()))


def test_predict_gives_top_k_labels_from_each_adapters_classes(tmp_path):
    multi, _ = multi_with_tenants(tmp_path)
    x = images(len(ROUTES))
    predictions = multi.predict(x, ROUTES, k=4)
    per_sample = multi(x, ROUTES).per_sample()
    for route, logits, top in zip(ROUTES, per_sample, predictions, strict=True):
        classes = TENANTS[route][1] if route else [str(i) for i in range(5)]
        assert len(top) == min(4, len(classes))
        expected = logits.softmax(-1).topk(len(top))
        assert [label for label, _ in top] == [classes[i] for i in expected.indices]
        torch.testing.assert_close(torch.tensor([p for _, p in top]), expected.values, rtol=1e-5, atol=1e-6)
    multi.set_active("fruit")
    assert multi.predict(x[:2], k=1) == [p[:1] for p in multi.predict(x[:2], ["fruit", "fruit"], k=1)]


def test_gradient_checkpointing_is_refused_rather_than_silently_dropping_the_routing(tmp_path):
    multi, _ = multi_with_tenants(tmp_path)
    multi.model.set_grad_checkpointing(True)
    with pytest.raises(RuntimeError, match="gradient checkpointing"):
        multi(images(len(ROUTES)), ROUTES)
    with torch.no_grad():  # nothing is recomputed without a backward pass
        assert multi(images(len(ROUTES)), ROUTES).logits.shape == (7, 6)


@pytest.mark.parametrize(
    ("adapt", "message"),
    [
        (lambda m: inject_lora(m, LoRAConfig(rank=2, use_dora=True)), "DoRA magnitudes"),
        (lambda m: add_prompt_tokens(m, PromptConfig(num_tokens=2)), "prompt tokens"),
        (lambda m: enable_bias_tuning(inject_lora(m, LoRAConfig(rank=2))), "tuned biases"),
        (lambda m: inject_lora(m, LoRAConfig(rank=2, targets=("patch_embed",))), "LoRA on the patch embedding"),
    ],
    ids=["dora", "prompts", "bitfit", "patch-embed"],
)
def test_adapters_that_change_the_shared_trunk_are_refused_with_the_file_named(tmp_path, adapt, message):
    path = save_adapter(adapt(tiny_model()), tmp_path / "other.safetensors")
    multi = MultiAdapter(tiny_model())
    with pytest.raises(AdapterError, match=rf"other\.safetensors: adapters with {message} cannot be routed"):
        multi.add("other", path)
    assert not multi.adapters


def test_a_linear_probe_adapter_is_just_a_routed_head(tmp_path):
    probe = freeze_base(tiny_model(num_classes=3, seed=0))
    with torch.no_grad():
        probe.head.weight.normal_(0.0, 0.3)
    path = save_adapter(probe, tmp_path / "probe.safetensors")
    multi, _ = multi_with_tenants(tmp_path)
    multi.add("probe", path)
    routes = ["probe", "fruit", "probe", None]
    mixed = multi.eval()(images(4), adapters=routes).per_sample()
    torch.testing.assert_close(torch.stack([mixed[0], mixed[2]]), probe(images(4))[[0, 2]])
