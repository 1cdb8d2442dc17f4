import json

import pytest
import torch
from conftest import IMG_SIZE, TINY, images, randomize_lora, tiny_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vitlora import (
    AdapterError,
    LoRAConfig,
    PromptConfig,
    add_prompt_tokens,
    base_fingerprint,
    build_model_with_adapter,
    enable_bias_tuning,
    freeze_base,
    inject_lora,
    load_adapter,
    merge_lora,
    prompt_config,
    read_adapter,
    save_adapter,
)
from vitlora.lora import lora_modules
from vitlora.trainable import bias_tuning_enabled
from vitlora.validation import with_payload_digest

CLASSES = ["apple", "banana", "carrot", "dates", "eggplant"]


def trained_adapter(tmp_path, name="vit_tiny_patch16_224", **config):
    """A LoRA model with non-zero updates and a changed head, saved to ``adapter.safetensors``."""
    model = tiny_model(name)
    inject_lora(model, LoRAConfig(rank=4, **config))
    randomize_lora(model)
    with torch.no_grad():
        model.head.weight.add_(0.3)
    path = save_adapter(model, tmp_path / "adapter.safetensors", class_names=CLASSES, run="test")
    return model, path


class ModelState:
    """Everything load_adapter could change, to assert a failed load changed nothing."""

    def __init__(self, model):
        self.state = {k: v.clone() for k, v in model.state_dict().items()}
        self.types = [(n, type(m)) for n, m in model.named_modules()]
        self.modules = [(n, id(m), m.training) for n, m in model.named_modules()]
        self.grad = {n: p.requires_grad for n, p in model.named_parameters()}
        self.num_classes = model.num_classes
        self.prefix_tokens = getattr(model, "num_prefix_tokens", None)
        self.hooks = [len(m._forward_pre_hooks) for m in model.modules()]
        self.bias_tuning = bias_tuning_enabled(model)
        self.output = model(images())

    def assert_unchanged(self, model):
        assert [(n, type(m)) for n, m in model.named_modules()] == self.types
        assert [(n, id(m), m.training) for n, m in model.named_modules()] == self.modules  # the same objects
        assert model.state_dict().keys() == self.state.keys()
        assert all(torch.equal(v, self.state[k]) for k, v in model.state_dict().items())
        assert {n: p.requires_grad for n, p in model.named_parameters()} == self.grad
        assert model.num_classes == self.num_classes
        assert getattr(model, "num_prefix_tokens", None) == self.prefix_tokens
        assert [len(m._forward_pre_hooks) for m in model.modules()] == self.hooks
        assert bias_tuning_enabled(model) == self.bias_tuning
        assert torch.equal(model(images()), self.output)


@pytest.mark.parametrize("targets", [("q", "v"), ("qkv", "proj", "fc1", "fc2")])
def test_round_trip_gives_identical_logits(tmp_path, model_name, targets):
    model = tiny_model(model_name)
    inject_lora(model, LoRAConfig(rank=4, targets=targets))
    randomize_lora(model)
    path = save_adapter(model, tmp_path / "a.safetensors")
    plain = tiny_model(model_name, num_classes=1000)
    loaded = load_adapter(plain, path)
    assert loaded is plain and loaded.num_classes == 5
    assert torch.equal(loaded(images()), model(images()))
    assert [n for n, _ in lora_modules(loaded)] == [n for n, _ in lora_modules(model)]


def test_file_opens_with_safetensors_alone_and_holds_only_adapter_tensors(tmp_path):
    model, path = trained_adapter(tmp_path)
    tensors = load_file(path)
    assert set(tensors) == {f"blocks.{i}.attn.qkv.lora_{m}" for i in range(2) for m in "AB"} | {
        "head.weight",
        "head.bias",
    }
    assert torch.equal(tensors["head.weight"], model.head.weight)
    with safe_open(path, "pt") as handle:
        meta = handle.metadata()
    assert meta["format"] == "vitlora.adapter"
    assert json.loads(meta["lora_config"])["rank"] == 4
    assert meta["model_name"] == "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    assert meta["num_classes"] == "5" and json.loads(meta["class_names"]) == CLASSES
    assert meta["base_fingerprint"] == base_fingerprint(tiny_model())
    assert {"vitlora_version", "timm_version", "torch_version"} <= meta.keys()
    adapter = read_adapter(path)
    assert adapter.class_names == CLASSES and adapter.metadata["run"] == "test"
    assert adapter.config == LoRAConfig(rank=4)


def test_adapter_is_tiny_next_to_the_model(tmp_path):
    model = tiny_model(embed_dim=192, num_heads=3, depth=4)
    inject_lora(model, LoRAConfig(rank=4))
    path = save_adapter(model, tmp_path / "a.safetensors")
    full = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert path.stat().st_size < full / 10


def test_class_names_must_match_num_classes(tmp_path):
    model = inject_lora(tiny_model(), LoRAConfig())
    with pytest.raises(ValueError, match="3 class names for a model with 5 classes"):
        save_adapter(model, tmp_path / "a.safetensors", class_names=["a", "b", "c"])
    assert not list(tmp_path.iterdir())


def test_saving_a_model_that_trains_weights_outside_the_adapter_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"no part of an adapter.*inject_lora.*freeze_base"):
        save_adapter(tiny_model(), tmp_path / "a.safetensors")  # every weight trainable: a full fine-tune
    merged = merge_lora(inject_lora(tiny_model(), LoRAConfig()))
    with pytest.raises(ValueError, match=r"30 trainable parameters \(cls_token, pos_embed, .*\) are no part"):
        save_adapter(merged, tmp_path / "a.safetensors")
    assert not list(tmp_path.iterdir())


def test_fingerprint_ignores_dtype_lora_and_head_but_not_other_weights():
    model = tiny_model()
    fingerprint = base_fingerprint(model)
    assert base_fingerprint(tiny_model(num_classes=9)) == fingerprint
    assert base_fingerprint(tiny_model().to(torch.bfloat16)) == fingerprint
    assert base_fingerprint(inject_lora(tiny_model(), LoRAConfig())) == fingerprint
    assert base_fingerprint(add_prompt_tokens(tiny_model(), PromptConfig(2, deep=True))) == fingerprint
    assert base_fingerprint(tiny_model(seed=1)) != fingerprint
    nudged = tiny_model()
    with torch.no_grad():
        nudged.blocks[1].mlp.fc2.weight[0, 0] += 0.01
    assert base_fingerprint(nudged) != fingerprint
    with pytest.raises(ValueError, match="float16"):
        base_fingerprint(tiny_model().half())


def test_adapter_files_are_shareable_not_private(tmp_path):
    import os
    import stat

    _, path = trained_adapter(tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_foreign_metadata_strings_are_kept_and_bad_class_names_refused(tmp_path):
    _, path = trained_adapter(tmp_path)
    with safe_open(path, "pt") as handle:
        meta = handle.metadata()
    rewrite(path, metadata={**meta, "note": "written by another tool"})
    assert read_adapter(path).metadata["note"] == "written by another tool"
    rewrite(path, metadata={**meta, "class_names": json.dumps(["a", "b"])})
    with pytest.raises(AdapterError, match="not a list of 5 names"):
        read_adapter(path)


def test_a_config_that_does_not_fit_the_model_is_an_adapter_error(tmp_path):
    model = tiny_model(depth=3)
    inject_lora(model, LoRAConfig(blocks=[2]))
    path = save_adapter(model, tmp_path / "deep.safetensors")
    shallow = tiny_model()
    before = ModelState(shallow)
    with pytest.raises(AdapterError, match="not the base the adapter was trained on: depth 3 != 2"):
        load_adapter(shallow, path, check_base=False)
    with safe_open(path, "pt") as handle:
        meta = handle.metadata()
    del meta["base_config"]  # as in files older than base configs: the LoRA config is checked on its own
    rewrite(path, metadata=meta)
    with pytest.raises(AdapterError, match="does not fit this model"):
        load_adapter(shallow, path, check_base=False)
    before.assert_unchanged(shallow)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "eva02_large_patch14_clip_224"])
def test_dora_adapter_round_trips_with_its_magnitudes(tmp_path, name):
    config = dict(targets=("q", "v", "fc1"), use_dora=True, use_rslora=True, dropout=0.1)
    model, path = trained_adapter(tmp_path, name, **config)
    magnitudes = {key for key in load_file(path) if key.endswith(".lora_magnitude")}
    assert magnitudes == {f"{layer}.lora_magnitude" for layer, _ in lora_modules(model)}
    assert read_adapter(path).config == LoRAConfig(rank=4, **config)
    loaded = load_adapter(tiny_model(name, num_classes=1000), path)
    assert torch.equal(loaded(images()), model(images()))


def test_an_adapter_written_before_dora_loads_as_plain_lora(tmp_path):
    model, path = trained_adapter(tmp_path)
    with safe_open(path, "pt") as handle:
        meta = handle.metadata()
    config = json.loads(meta["lora_config"])
    del config["use_dora"]
    rewrite(path, metadata={**meta, "lora_config": json.dumps(config)})
    assert read_adapter(path).config.use_dora is False
    loaded = load_adapter(tiny_model(num_classes=1000), path)
    assert torch.equal(loaded(images()), model(images()))


# --- bad input: a clear error, and the model exactly as it was ------------------------------


def rewrite(path, tensors=None, metadata=None):
    """Saves changed tensors or metadata with a matching digest, so the checks behind the digest are reached."""
    with safe_open(path, "pt") as handle:
        meta = handle.metadata()
    tensors = tensors if tensors is not None else load_file(path)
    save_file(tensors, path, metadata=with_payload_digest(tensors, metadata or meta))


def corrupt_missing(path):
    tensors = load_file(path)
    del tensors["blocks.1.attn.qkv.lora_B"]
    rewrite(path, tensors)


def corrupt_misshapen(path):
    tensors = load_file(path)
    tensors["blocks.0.attn.qkv.lora_A"] = torch.zeros(3, 64)
    rewrite(path, tensors)


def corrupt_unexpected(path):
    rewrite(path, {**load_file(path), "blocks.0.attn.proj.lora_A": torch.zeros(4, 64)})


def corrupt_truncated(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])


def corrupt_not_safetensors(path):
    path.write_text("this is not an adapter\n")


def corrupt_foreign_safetensors(path):
    save_file({"w": torch.zeros(2)}, path)


def corrupt_version_1_without_lora(path):
    with safe_open(path, "pt") as handle:
        meta = handle.metadata()
    del meta["lora_config"]
    rewrite(path, metadata=meta)


def corrupt_config(path):
    with safe_open(path, "pt") as handle:
        meta = handle.metadata()
    rewrite(path, metadata={**meta, "lora_config": json.dumps({"rank": -1})})


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (corrupt_missing, r"blocks\.1\.attn\.qkv: LoRA tensors \['lora_A'\] are not \['lora_A', 'lora_B'\]"),
        (corrupt_misshapen, r"blocks\.0\.attn\.qkv: LoRA tensors A \(3, 64\), B \(128, 4\) do not fit 2 update"),
        (corrupt_unexpected, r"blocks\.0\.attn\.proj: LoRA tensors \['lora_A'\] are not"),
        (corrupt_truncated, "not a readable safetensors file"),
        (corrupt_not_safetensors, "not a readable safetensors file"),
        (corrupt_foreign_safetensors, "not a vitlora adapter"),
        (corrupt_config, "invalid metadata.*rank"),
        (corrupt_version_1_without_lora, r"metadata is missing \['lora_config'\]"),
    ],
)
def test_bad_files_raise_a_clear_error_and_leave_the_model_unchanged(tmp_path, corrupt, message):
    _, path = trained_adapter(tmp_path)
    corrupt(path)
    model = tiny_model(num_classes=1000)
    before = ModelState(model)
    with pytest.raises(AdapterError, match=message) as error:
        load_adapter(model, path)
    assert str(path) in str(error.value)
    before.assert_unchanged(model)


def test_other_base_weights_are_refused_unless_overridden(tmp_path):
    _, path = trained_adapter(tmp_path)
    other = tiny_model(seed=7)
    before = ModelState(other)
    with pytest.raises(AdapterError, match="base weights differ"):
        load_adapter(other, path)
    before.assert_unchanged(other)
    load_adapter(other, path, check_base=False)
    assert lora_modules(other)


def test_another_architecture_is_refused(tmp_path):
    _, path = trained_adapter(tmp_path)
    other = tiny_model("deit_tiny_distilled_patch16_224")
    before = ModelState(other)
    with pytest.raises(AdapterError, match=r"architecture 'vit_tiny_patch16_224'.*deit_tiny_distilled"):
        load_adapter(other, path)
    before.assert_unchanged(other)


def test_a_model_that_already_has_lora_is_refused(tmp_path):
    _, path = trained_adapter(tmp_path)
    model = inject_lora(tiny_model(), LoRAConfig(targets=("fc2",)))
    before = ModelState(model)
    with pytest.raises(AdapterError, match="already has LoRA"):
        load_adapter(model, path)
    before.assert_unchanged(model)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(AdapterError, match=r"nope\.safetensors: no such adapter file"):
        load_adapter(tiny_model(), tmp_path / "nope.safetensors")


class _Exploit:
    def __reduce__(self):
        return (exec, ("import builtins; builtins.VITLORA_PWNED = True",))


def test_a_pickled_file_is_never_unpickled(tmp_path):
    import builtins

    path = tmp_path / "evil.safetensors"
    torch.save({"payload": _Exploit()}, path)
    model = tiny_model()
    before = ModelState(model)
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        load_adapter(model, path)
    assert not hasattr(builtins, "VITLORA_PWNED")
    before.assert_unchanged(model)


def test_a_failed_save_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    model, path = trained_adapter(tmp_path)
    original = path.read_bytes()

    def crash_halfway(self, data):
        with open(self, "wb") as handle:
            handle.write(data[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr("pathlib.Path.write_bytes", crash_halfway)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, path)
    assert path.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors"]


def test_load_onto_a_model_on_another_dtype_keeps_that_dtype(tmp_path):
    model, path = trained_adapter(tmp_path)
    plain = tiny_model(num_classes=1000).to(torch.bfloat16)
    load_adapter(plain, path)
    assert plain.blocks[0].attn.qkv.lora_B.dtype == torch.bfloat16 and plain.head.weight.dtype == torch.bfloat16
    torch.testing.assert_close(plain(images().bfloat16()).float(), model(images()), atol=0.1, rtol=0.05)


def test_build_model_with_adapter_recreates_the_recorded_model_on_local_weights(tmp_path):
    tiny = {"img_size": IMG_SIZE, **TINY}
    save_file(tiny_model(num_classes=1000).state_dict(), tmp_path / "base.safetensors")
    model = tiny_model()
    inject_lora(model, LoRAConfig(rank=4))
    randomize_lora(model)
    path = save_adapter(model, tmp_path / "a.safetensors", model_name="vit_tiny_patch16_224", model_kwargs=tiny)
    built, adapter = build_model_with_adapter(path, weights=tmp_path / "base.safetensors")
    assert not built.training and adapter.model_kwargs == tiny and adapter.path == path
    assert torch.equal(built(images()), model(images()))


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"model_name": "vit_no_such_model"}, "records timm model 'vit_no_such_model', unknown to timm"),
        ({"model_kwargs": [32]}, r"invalid metadata: 'model_kwargs' is list of 1, not an object"),
        ({"model_kwargs": {"foo": 1}}, r"metadata 'model_kwargs' \{'foo': 1\} do not build timm model"),
        (
            {"model_kwargs": {**TINY, "img_size": IMG_SIZE, "num_heads": 4}},
            r"metadata 'model_kwargs' .* disagree with the base it records: \['num_heads=4 but base_config num_heads=2'\]",
        ),
    ],
)
def test_build_model_with_adapter_names_the_file_and_the_problem(tmp_path, metadata, message):
    model = tiny_model()
    inject_lora(model, LoRAConfig(rank=4))
    path = save_adapter(model, tmp_path / "a.safetensors", **metadata)
    with pytest.raises(AdapterError, match=rf"a\.safetensors: {message}"):
        build_model_with_adapter(path)


# --- prompt tokens, tuned biases, adapters without LoRA -----------------------------------------


def adapt(model, lora=None, prompt=None, bias_tuning=False):
    """Adapts ``model`` as asked (a linear probe when nothing is), with every adapter tensor moved off its init."""
    if lora is not None:
        inject_lora(model, lora)
        randomize_lora(model)
    if prompt is not None:
        add_prompt_tokens(model, prompt)
    if bias_tuning:
        enable_bias_tuning(model)
    freeze_base(model)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad and "lora_" not in name:
                parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator))
    return model


COMBINATIONS = {
    "lora+prompt": dict(lora=LoRAConfig(rank=2), prompt=PromptConfig(num_tokens=2)),
    "lora+deep_prompt+bias": dict(lora=LoRAConfig(rank=2), prompt=PromptConfig(3, deep=True), bias_tuning=True),
    "linear+prompt": dict(prompt=PromptConfig(num_tokens=2, deep=True)),
    "linear+bias": dict(bias_tuning=True),
    "lora+bias": dict(lora=LoRAConfig(rank=2, targets=("q", "v", "fc1")), bias_tuning=True),
    "linear": dict(),
}


@pytest.mark.parametrize("combination", COMBINATIONS)
@pytest.mark.parametrize(
    "name", ["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "vit_small_patch14_reg4_dinov2"]
)
def test_every_combination_round_trips_to_identical_logits(tmp_path, name, combination):
    config = COMBINATIONS[combination]
    model = adapt(tiny_model(name), **config)
    path = save_adapter(model, tmp_path / "a.safetensors", class_names=CLASSES)
    adapter = read_adapter(path)
    assert (adapter.config, adapter.prompt, adapter.bias_tuning) == (
        config.get("lora"),
        config.get("prompt"),
        config.get("bias_tuning", False),
    )
    plain = tiny_model(name, num_classes=1000)
    loaded = load_adapter(plain, path)
    assert torch.equal(loaded(images()), model(images()))
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == set(adapter.tensors)
    assert prompt_config(loaded) == config.get("prompt") and bias_tuning_enabled(loaded) == bool(
        config.get("bias_tuning")
    )


def test_eva_with_lora_and_tuned_q_v_biases_round_trips(tmp_path):
    model = adapt(tiny_model("eva02_tiny_patch14_224"), lora=LoRAConfig(rank=2), bias_tuning=True)
    path = save_adapter(model, tmp_path / "a.safetensors")
    assert {"blocks.0.attn.q_bias", "blocks.0.attn.v_bias"} <= set(read_adapter(path).tensors)
    loaded = load_adapter(tiny_model("eva02_tiny_patch14_224"), path)
    assert torch.equal(loaded(images()), model(images()))


def test_format_version_1_for_pure_lora_and_2_for_the_new_features(tmp_path):
    versions = {}
    for label, config in {"lora": dict(lora=LoRAConfig(rank=2)), **COMBINATIONS}.items():
        path = save_adapter(adapt(tiny_model(), **config), tmp_path / f"{label}.safetensors")
        with safe_open(path, "pt") as handle:
            meta = handle.metadata()
        versions[label] = meta["format_version"]
        assert ("lora_config" in meta) == ("lora" in config)
        if "prompt" in config:
            assert PromptConfig(**json.loads(meta["prompt_config"])) == config["prompt"]
        assert meta.get("bias_tuning") == ("true" if config.get("bias_tuning") else None)
    assert versions == {"lora": "1", **{label: "2" for label in COMBINATIONS}}


def test_a_newer_format_version_is_refused_by_name(tmp_path):
    _, path = trained_adapter(tmp_path)
    with safe_open(path, "pt") as handle:
        meta = handle.metadata()
    rewrite(path, metadata={**meta, "format_version": "3"})
    with pytest.raises(AdapterError, match=r"format version '3' is not supported.*versions 1 and 2"):
        read_adapter(path)


def test_bias_tuned_adapters_fingerprint_the_base_without_its_biases(tmp_path):
    model = adapt(tiny_model(), lora=LoRAConfig(rank=2), bias_tuning=True)
    path = save_adapter(model, tmp_path / "a.safetensors")
    plain = tiny_model()
    assert read_adapter(path).base_fingerprint == base_fingerprint(plain, exclude_biases=True)
    assert base_fingerprint(plain, exclude_biases=True) != base_fingerprint(plain)
    other_biases = tiny_model()  # biases are shipped: the base's own values do not matter
    with torch.no_grad():
        other_biases.blocks[0].attn.qkv.bias.add_(1.0)
    assert torch.equal(load_adapter(other_biases, path)(images()), model(images()))
    other_weights = tiny_model()
    with torch.no_grad():
        other_weights.blocks[0].attn.qkv.weight[0, 0] += 0.01
    with pytest.raises(AdapterError, match="base weights differ"):
        load_adapter(other_weights, path)


def corrupt_prompt_shape(path):
    rewrite(path, {**load_file(path), "blocks.1.prompt.tokens": torch.zeros(2, 64)})


def corrupt_missing_bias(path):
    tensors = load_file(path)
    del tensors["blocks.1.mlp.fc2.bias"]
    rewrite(path, tensors)


def corrupt_bias_flag(path):
    with safe_open(path, "pt") as handle:
        meta = handle.metadata()
    rewrite(path, metadata={**meta, "bias_tuning": '"yes"'})


def corrupt_prompt_config(path):
    with safe_open(path, "pt") as handle:
        meta = handle.metadata()
    rewrite(path, metadata={**meta, "prompt_config": json.dumps({"num_tokens": 0})})


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (corrupt_prompt_shape, r"tensor 'blocks\.1\.prompt\.tokens' has 2 tokens, metadata 'prompt_config' says 3"),
        (corrupt_missing_bias, r"missing: blocks\.1\.mlp\.fc2\.bias"),
        (corrupt_bias_flag, "'bias_tuning' is 'yes', not true or false"),
        (corrupt_prompt_config, "invalid metadata.*num_tokens"),
    ],
)
def test_bad_prompt_and_bias_files_leave_the_model_unchanged(tmp_path, corrupt, message):
    model = adapt(tiny_model(), **COMBINATIONS["lora+deep_prompt+bias"])
    path = save_adapter(model, tmp_path / "a.safetensors")
    corrupt(path)
    plain = tiny_model(num_classes=1000)
    before = ModelState(plain)
    with pytest.raises(AdapterError, match=message):
        load_adapter(plain, path)
    before.assert_unchanged(plain)


def test_a_failure_after_the_biases_were_copied_restores_their_values(tmp_path, monkeypatch):
    import vitlora.apply

    path = save_adapter(adapt(tiny_model(), **COMBINATIONS["lora+deep_prompt+bias"]), tmp_path / "a.safetensors")
    copy_then_fail = vitlora.apply.copy_adapter_tensors

    def interrupted(expected, adapter):
        copy_then_fail(expected, adapter)
        raise KeyboardInterrupt

    monkeypatch.setattr(vitlora.apply, "copy_adapter_tensors", interrupted)
    plain = tiny_model(num_classes=1000)
    before = ModelState(plain)
    with pytest.raises(KeyboardInterrupt):
        load_adapter(plain, path)
    before.assert_unchanged(plain)


def test_prompt_tokens_onto_a_rotary_model_are_an_adapter_error(tmp_path):
    path = save_adapter(adapt(tiny_model(), prompt=PromptConfig(2)), tmp_path / "a.safetensors")
    with safe_open(path, "pt") as handle:
        meta = handle.metadata()
    del meta["base_config"]  # past the architecture checks, to the prompt check
    rewrite(path, metadata={**meta, "architecture": ""})
    eva = tiny_model("eva02_tiny_patch14_224")
    before = ModelState(eva)
    with pytest.raises(AdapterError, match="prompt tokens do not fit this model: Eva applies rotary"):
        load_adapter(eva, path, check_base=False)
    before.assert_unchanged(eva)


@pytest.mark.parametrize(
    ("adapted", "message"),
    [
        (lambda m: add_prompt_tokens(m, PromptConfig(2)), "already has prompt tokens"),
        (enable_bias_tuning, "already has bias tuning"),
    ],
    ids=["prompts", "bias_tuning"],
)
def test_an_adapted_model_is_refused(tmp_path, adapted, message):
    path = save_adapter(adapt(tiny_model(), prompt=PromptConfig(2)), tmp_path / "a.safetensors")
    model = adapted(tiny_model())
    before = ModelState(model)
    with pytest.raises(AdapterError, match=message):
        load_adapter(model, path, check_base=False)
    before.assert_unchanged(model)
