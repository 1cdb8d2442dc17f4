"""PEFT interoperability, checked against the installed ``peft`` package on tiny timm models."""

import json
import re
import shutil

import pytest
import torch
from conftest import images, randomize_lora, tiny_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vitlora import (
    AdapterError,
    LoRAConfig,
    PromptConfig,
    adapter_state_dict,
    add_prompt_tokens,
    convert_adapter,
    enable_bias_tuning,
    export_peft,
    import_peft,
    inject_lora,
    read_adapter,
    read_peft,
    save_adapter,
)
from vitlora.apply import apply_adapter
from vitlora.lora import lora_config, lora_modules
from vitlora.targets import classifier_names, route_fused_qkv_through_module

peft = pytest.importorskip("peft")

CLASSES = ["apple", "banana", "carrot", "dates", "eggplant"]
# PEFT's LoRA takes effect in these (EVA-02 with separate q/k/v and SwiGLU included); not on EVA's fused qkv.
PEFT_FAMILIES = (
    "vit_tiny_patch16_224",
    "deit_tiny_distilled_patch16_224",
    "vit_small_patch14_reg4_dinov2",
    "eva02_large_patch14_clip_224",
)
EVERY_SITE = r"blocks\.\d+\.(attn\.(qkv|[qkv]_proj|proj)|mlp\.(fc1|fc1_g|fc1_x|fc2))"
TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}  # PEFT adds B(Ax) in another order than vitlora's fused addmm


def trained(name, **config):
    """A vitlora model whose LoRA updates and head have moved away from their initial values."""
    model = tiny_model(name)
    inject_lora(model, LoRAConfig(rank=4, alpha=6.0, **config))
    randomize_lora(model)
    with torch.no_grad():
        model.head.weight.add_(0.3)
    return model


def peft_trained(name, directory, target_modules=EVERY_SITE, heads=True, **config):
    """A PEFT LoRA adapter trained (randomly initialised) on a tiny timm model, saved to ``directory``."""
    model = tiny_model(name)
    modules_to_save = list(classifier_names(model)) if heads else None
    lora = peft.LoraConfig(
        r=4,
        lora_alpha=6,
        target_modules=target_modules,
        modules_to_save=modules_to_save,
        init_lora_weights=False,  # non-zero B: the update matters
        **config,
    )
    peft_model = peft.get_peft_model(model, lora).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # DoRA's magnitude starts at ||W + dW||, where it changes nothing: move it
        for key, parameter in peft_model.named_parameters():
            if "lora_magnitude_vector" in key:
                parameter.mul_(1 + 0.2 * torch.randn(parameter.shape, generator=generator))
    peft_model.save_pretrained(directory)
    return peft_model


def from_pretrained(name, directory, route=False):
    model = tiny_model(name)
    if route:
        route_fused_qkv_through_module(model)
    return peft.PeftModel.from_pretrained(model, directory).eval()


def by_hand(name, directory):
    """The plain timm model with ``W + scaling * B @ A`` merged from the PEFT files, and their heads."""
    config = json.loads((directory / "adapter_config.json").read_text())
    root = 2 if config.get("use_rslora") else 1
    scaling = config["lora_alpha"] / config["r"] ** (1 / root)
    tensors = {
        k.removeprefix("base_model.model."): v for k, v in load_file(directory / "adapter_model.safetensors").items()
    }
    model = tiny_model(name, num_classes=tensors["head.weight"].shape[0])
    with torch.no_grad():
        for key, a in tensors.items():
            if key.endswith(".lora_A.weight"):
                module = key.removesuffix(".lora_A.weight")
                b = tensors[f"{module}.lora_B.weight"]
                model.get_submodule(module).weight.add_(scaling * b @ a)
        model.load_state_dict({k: v for k, v in tensors.items() if "lora_" not in k}, strict=False)
    return model


@pytest.mark.parametrize("name", PEFT_FAMILIES)
@pytest.mark.parametrize(
    "config",
    [
        {"targets": ("q", "v")},
        {"targets": ("q", "v", "proj", "fc1", "fc2"), "use_rslora": True},
        {"targets": ("qkv", "fc2"), "blocks": [-1]},
    ],
    ids=["q-v", "q-v-proj-fc1-fc2-rslora", "qkv-fc2-last-block"],
)
def test_export_loads_in_peft_with_the_same_logits(tmp_path, name, config):
    model = trained(name, **config)
    export_peft(model, tmp_path / "peft", class_names=CLASSES)
    assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert written["target_modules"] == [name for name, _ in lora_modules(model)]  # full paths, no patch_embed
    assert written["modules_to_save"] == list(classifier_names(model))
    peft_model = from_pretrained(name, tmp_path / "peft")
    torch.testing.assert_close(peft_model(images()), model(images()), **TOLERANCE)
    lora_off = tiny_model(name)
    lora_off.load_state_dict({k: v for k, v in adapter_state_dict(model).items() if "lora_" not in k}, strict=False)
    assert (peft_model(images()) - lora_off(images())).abs().max() > 1e-2  # PEFT really applied the LoRA


def test_q_v_on_a_fused_qkv_becomes_a_block_structured_lora_of_rank_2r_and_nothing_is_padded(tmp_path):
    model = trained("vit_tiny_patch16_224", targets=("q", "v", "fc2"))
    export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert config["r"] == 8 and config["lora_alpha"] == 12.0 and not config["use_rslora"]  # 12 / 8 == 6 / 4
    assert config["rank_pattern"] == {r"blocks\.0\.mlp\.fc2": 4, r"blocks\.1\.mlp\.fc2": 4}
    assert config["alpha_pattern"] == {r"blocks\.0\.mlp\.fc2": 6.0, r"blocks\.1\.mlp\.fc2": 6.0}
    b = tensors["base_model.model.blocks.0.attn.qkv.lora_B.weight"]
    assert b.shape == (192, 8)
    assert not b[64:128].any()  # k untouched
    assert not b[:64, 4:].any() and not b[128:, :4].any()  # q and v each use their own rank-4 block
    assert tensors["base_model.model.blocks.0.mlp.fc2.lora_A.weight"].shape == (4, 256)  # its own rank, no zeros
    for name, layer in lora_modules(model):
        pattern = re.escape(name)
        rank, alpha = config["rank_pattern"].get(pattern, 8), config["alpha_pattern"].get(pattern, 12.0)
        a, b = (tensors[f"base_model.model.{name}.lora_{m}.weight"] for m in "AB")
        torch.testing.assert_close(alpha / rank * b @ a, layer.delta_weight(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", PEFT_FAMILIES)
@pytest.mark.parametrize(
    ("target_modules", "config"),
    [(EVERY_SITE, {"use_rslora": True}), (r"blocks\.1\.attn\.(qkv|[qkv]_proj)", {"lora_dropout": 0.1})],
    ids=["every-site-rslora", "attention-of-block-1"],
)
def test_import_gives_the_logits_peft_gives(tmp_path, name, target_modules, config):
    peft_model = peft_trained(name, tmp_path, target_modules, **config)
    model = import_peft(tiny_model(name, num_classes=1000), tmp_path).eval()
    torch.testing.assert_close(model(images()), peft_model(images()), **TOLERANCE)
    imported = lora_config(model)
    assert (imported.rank, imported.alpha, imported.use_rslora) == (4, 6, config.get("use_rslora", False))
    assert imported.dropout == config.get("lora_dropout", 0.0)
    assert imported.blocks == ((0, 1) if target_modules == EVERY_SITE else (1,))
    peft_sites = {n.removesuffix(".base_layer") for n, _ in peft_model.named_modules() if n.endswith("base_layer")}
    assert {f"base_model.model.{n}" for n, _ in lora_modules(model)} == peft_sites


def test_import_then_export_writes_peft_tensors_back_unchanged(tmp_path):
    peft_trained("deit_tiny_distilled_patch16_224", tmp_path / "peft")
    model = import_peft(tiny_model("deit_tiny_distilled_patch16_224"), tmp_path / "peft")
    export_peft(model, tmp_path / "again")
    original, again = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("peft", "again"))
    assert original.keys() == again.keys()
    assert all(torch.equal(original[key], again[key]) for key in original)
    configs = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("peft", "again")]
    assert [(c["r"], c["lora_alpha"]) for c in configs] == [(4, 6), (4, 6.0)]


@pytest.mark.filterwarnings("ignore:.*reads qkv.weight directly")
@pytest.mark.parametrize(
    "config",
    [
        {"targets": ("q", "v")},
        {"targets": ("qkv", "proj", "fc1", "fc2")},
        {
            "targets": ("q", "v", "fc2", "patch_embed"),
            "rank_pattern": {"fc2": 2},
            "alpha_pattern": {"patch_embed.proj": 3},
        },
    ],
    ids=["q-v", "whole-layers", "patch-embed-and-per-layer-rank"],
)
def test_vitlora_to_peft_to_vitlora_is_exact(tmp_path, model_name, config):
    model = trained(model_name, blocks=[0, 1], **config)
    export_peft(model, tmp_path, class_names=CLASSES, model_name="my-base", model_kwargs={"img_size": 32})
    adapter = read_peft(tmp_path)
    assert adapter.config == lora_config(model)
    assert (adapter.class_names, adapter.model_name, adapter.metadata["model_kwargs"]) == (
        CLASSES,
        "my-base",
        {"img_size": 32},
    )
    back = import_peft(tiny_model(model_name, num_classes=1000), tmp_path)
    assert torch.equal(back(images()), model(images()))
    original = adapter_state_dict(model)
    assert all(torch.equal(tensor, original[key]) for key, tensor in adapter_state_dict(back).items())


def test_an_export_peft_has_trained_further_comes_back_in_its_peft_form(tmp_path):
    """Once k's zero rows hold values, the q/v layout is gone: import keeps PEFT's rank-2r LoRA on qkv."""
    export_peft(trained("vit_tiny_patch16_224"), tmp_path, class_names=CLASSES)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(weights)
    with safe_open(weights, "pt") as handle:
        metadata = handle.metadata()
    tensors["base_model.model.blocks.0.attn.qkv.lora_B.weight"][64:128] = 0.1
    del metadata["payload_sha256"]  # a tool that keeps vitlora's header but not its digest of the old tensors
    save_file(tensors, weights, metadata=metadata)
    adapter = read_peft(tmp_path)
    assert (adapter.config.targets, adapter.config.rank, adapter.config.alpha) == (("qkv",), 8, 12.0)
    assert adapter.class_names == CLASSES
    model = import_peft(tiny_model("vit_tiny_patch16_224"), tmp_path)
    torch.testing.assert_close(
        model(images()), from_pretrained("vit_tiny_patch16_224", tmp_path)(images()), **TOLERANCE
    )


def test_eva_fused_qkv_import_applies_the_update_peft_computes_but_never_reaches(tmp_path):
    """timm's EVA attention reads qkv.weight directly, so PEFT's own LoRA on it changes nothing;
    vitlora applies W + scaling * B @ A, as PEFT does once the attention is routed through the module."""
    name = "eva02_tiny_patch14_224"
    peft_trained(name, tmp_path, use_rslora=True)
    expected = by_hand(name, tmp_path)(images())
    model = import_peft(tiny_model(name), tmp_path).eval()
    torch.testing.assert_close(model(images()), expected, **TOLERANCE)
    torch.testing.assert_close(from_pretrained(name, tmp_path, route=True)(images()), expected, **TOLERANCE)


def test_eva_fused_qkv_export_warns_and_holds_the_exact_update(tmp_path):
    name = "eva02_tiny_patch14_224"
    model = trained(name, targets=("q", "v", "fc1"))
    with pytest.warns(UserWarning, match=r"blocks\.0\.attn\.qkv and 1 more .* reads qkv\.weight directly"):
        export_peft(model, tmp_path)
    torch.testing.assert_close(by_hand(name, tmp_path)(images()), model(images()), **TOLERANCE)
    torch.testing.assert_close(from_pretrained(name, tmp_path, route=True)(images()), model(images()), **TOLERANCE)


def test_eva_export_without_qkv_updates_does_not_warn(tmp_path, recwarn):
    export_peft(trained("eva02_tiny_patch14_224", targets=("proj",)), tmp_path)
    assert not [w for w in recwarn if "qkv.weight" in str(w.message)]


def test_the_base_fingerprint_of_an_export_is_checked(tmp_path):
    export_peft(trained("vit_tiny_patch16_224"), tmp_path)
    with pytest.raises(AdapterError, match="base weights differ"):
        import_peft(tiny_model("vit_tiny_patch16_224", seed=1), tmp_path)
    assert lora_modules(import_peft(tiny_model("vit_tiny_patch16_224", seed=1), tmp_path, check_base=False))


@pytest.fixture(scope="module")
def peft_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("peft")
    peft_trained("vit_tiny_patch16_224", folder)
    return folder


def edited(folder, tmp_path, **changes):
    copy = tmp_path / "edited"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "adapter_config.json").read_text())
    (copy / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return copy


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("bias", "some"),
        ("lora_bias", True),
        ("init_lora_weights", "pissa"),
        ("init_lora_weights", "olora"),
        ("layer_replication", [[0, 1]]),
        ("use_qalora", True),
        ("modules_to_save", ["head", "norm"]),
    ],
)
def test_unsupported_peft_options_are_refused_by_name_and_the_model_left_alone(peft_folder, tmp_path, option, value):
    model = tiny_model("vit_tiny_patch16_224")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterError, match=rf"adapter_config\.json: .*{option}.*not supported"):
        import_peft(model, edited(peft_folder, tmp_path, **{option: value}))
    assert model.state_dict().keys() == before.keys() and not lora_modules(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("option", "value"),
    [("init_lora_weights", "gaussian"), ("init_lora_weights", "eva"), ("loftq_config", {}), ("fan_in_fan_out", False)],
)
def test_init_only_peft_options_are_fine(peft_folder, tmp_path, option, value):
    model = import_peft(tiny_model("vit_tiny_patch16_224"), edited(peft_folder, tmp_path, **{option: value}))
    torch.testing.assert_close(model(images()), from_pretrained("vit_tiny_patch16_224", peft_folder)(images()))


@pytest.mark.parametrize(
    ("peft_options", "message"),
    [
        ({"target_modules": ["blocks.0.attn.qkv", "blocks.1.mlp.fc2"]}, r"targets differ between blocks"),
        ({"heads": False}, r"adapter_model\.safetensors: holds no classifier head"),
    ],
    ids=["per-block-targets", "no-head"],
)
def test_peft_adapters_vitlora_cannot_represent_are_refused_clearly(tmp_path, peft_options, message):
    peft_trained("vit_tiny_patch16_224", tmp_path, **peft_options)
    with pytest.raises(AdapterError, match=message):
        import_peft(tiny_model("vit_tiny_patch16_224"), tmp_path)


def test_unreadable_folders_name_the_file(peft_folder, tmp_path):
    with pytest.raises(AdapterError, match=r"adapter_config\.json: no such file"):
        read_peft(tmp_path)
    with pytest.raises(AdapterError, match=r"not a PEFT LoRA adapter \(peft_type is 'IA3'\)"):
        read_peft(edited(peft_folder, tmp_path, peft_type="IA3"))
    (tmp_path / "edited" / "adapter_config.json").write_text("{")
    with pytest.raises(AdapterError, match=r"adapter_config\.json: not valid JSON"):
        read_peft(tmp_path / "edited")
    shutil.copy(peft_folder / "adapter_config.json", tmp_path / "edited")
    (tmp_path / "edited" / "adapter_model.safetensors").rename(tmp_path / "edited" / "adapter_model.bin")
    with pytest.raises(AdapterError, match=r"adapter_model\.safetensors: no such file .*never unpickles"):
        read_peft(tmp_path / "edited")


def test_export_never_replaces_an_unrelated_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"holds \['notes.txt'\]"):
        export_peft(trained("vit_tiny_patch16_224"), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize(
    ("adapt", "message"),
    [
        (lambda m: add_prompt_tokens(inject_lora(m, LoRAConfig(rank=2)), PromptConfig(num_tokens=2)), "prompt tokens"),
        (lambda m: enable_bias_tuning(inject_lora(m, LoRAConfig(rank=2))), "tuned biases"),
    ],
    ids=["prompts", "bitfit"],
)
def test_export_refuses_what_peft_cannot_hold_and_writes_nothing(tmp_path, adapt, message):
    with pytest.raises(ValueError, match=f"out: PEFT export of adapters with {message} is not supported yet"):
        export_peft(adapt(tiny_model()), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- DoRA: PEFT's use_dora ----------------------------------------------------------------

DORA_CONFIGS = [
    {"targets": ("q", "v")},
    {"targets": ("qkv", "proj", "fc1", "fc2"), "use_rslora": True},
    {"targets": ("q", "v", "fc2"), "blocks": [-1]},
]
DORA_IDS = ["q-v", "whole-layers-rslora", "q-v-and-rank-padded-fc2"]


@pytest.mark.parametrize("name", PEFT_FAMILIES)
@pytest.mark.parametrize("config", DORA_CONFIGS, ids=DORA_IDS)
def test_dora_export_loads_in_peft_with_the_same_logits(tmp_path, name, config):
    """On a fused qkv PEFT scales k too: the base's own k-row norms as magnitudes make that scale 1."""
    model = trained(name, use_dora=True, **config)
    export_peft(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True
    peft_model = from_pretrained(name, tmp_path)
    assert len([n for n, _ in peft_model.named_parameters() if "lora_magnitude_vector" in n]) == len(
        lora_modules(model)
    )
    torch.testing.assert_close(peft_model(images()), model(images()), **TOLERANCE)


def test_dora_magnitude_on_a_fused_qkv_keeps_q_and_v_and_fills_k_with_the_base_norms(tmp_path):
    model = trained("vit_tiny_patch16_224", targets=("q", "v", "fc2"), use_dora=True)
    export_peft(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    layer = model.get_submodule("blocks.0.attn.qkv")
    magnitude = tensors["base_model.model.blocks.0.attn.qkv.lora_magnitude_vector"]
    assert magnitude.shape == (192,)
    assert torch.equal(magnitude[:64], layer.lora_magnitude[:64])  # q
    assert torch.equal(magnitude[128:], layer.lora_magnitude[64:])  # v
    peft_norms = torch.linalg.norm(layer.weight + layer.delta_weight(), dim=1)  # PEFT's ||W + dW||, dW_k = 0
    assert torch.equal(magnitude[64:128], peft_norms[64:128])  # so PEFT's k scale m / ||W_k + 0|| is exactly 1
    fc2 = model.get_submodule("blocks.0.mlp.fc2")
    assert torch.equal(tensors["base_model.model.blocks.0.mlp.fc2.lora_magnitude_vector"], fc2.lora_magnitude)


@pytest.mark.parametrize("name", PEFT_FAMILIES)
def test_dora_import_gives_the_logits_peft_gives(tmp_path, name):
    peft_model = peft_trained(name, tmp_path, use_dora=True)
    model = import_peft(tiny_model(name, num_classes=1000), tmp_path).eval()
    assert lora_config(model).use_dora
    torch.testing.assert_close(model(images()), peft_model(images()), **TOLERANCE)
    for path, layer in lora_modules(model):
        peft_layer = peft_model.base_model.model.get_submodule(path)
        assert torch.equal(layer.lora_magnitude, peft_layer.lora_magnitude_vector["default"].weight)


@pytest.mark.filterwarnings("ignore:.*reads qkv.weight directly")
@pytest.mark.parametrize("config", DORA_CONFIGS, ids=DORA_IDS)
def test_dora_vitlora_to_peft_to_vitlora_is_exact(tmp_path, model_name, config):
    model = trained(model_name, use_dora=True, **config)
    export_peft(model, tmp_path, class_names=CLASSES)
    assert read_peft(tmp_path, base=tiny_model(model_name)).config == lora_config(model)
    back = import_peft(tiny_model(model_name, num_classes=1000), tmp_path)
    assert torch.equal(back(images()), model(images()))
    original = adapter_state_dict(model)
    assert original.keys() == adapter_state_dict(back).keys()
    assert all(torch.equal(tensor, original[key]) for key, tensor in adapter_state_dict(back).items())


def test_dora_q_v_read_without_a_base_keeps_peft_whole_layer_form_and_its_logits(tmp_path):
    """The k-row magnitudes cannot be checked without the base, so they stay: the same logits either way."""
    model = trained("vit_tiny_patch16_224", targets=("q", "v"), use_dora=True)
    export_peft(model, tmp_path, class_names=CLASSES)
    adapter = read_peft(tmp_path)
    assert (adapter.config.targets, adapter.config.rank, adapter.config.use_dora) == (("qkv",), 8, True)
    assert adapter.class_names == CLASSES
    assert adapter.tensors["blocks.0.attn.qkv.lora_magnitude"].shape == (192,)
    whole_layer = apply_adapter(tiny_model(), adapter)
    torch.testing.assert_close(whole_layer(images()), model(images()), **TOLERANCE)


def scaled_k_magnitudes(folder):
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(weights)
    with safe_open(weights, "pt") as handle:
        metadata = handle.metadata()
    for key, tensor in tensors.items():
        if key.endswith("attn.qkv.lora_magnitude_vector"):
            tensor[64:128] *= 1.5
    del metadata["payload_sha256"]  # a tool that keeps vitlora's header but not its digest of the old tensors
    save_file(tensors, weights, metadata=metadata)


@pytest.mark.parametrize(
    ("change", "base_seed"),
    [(scaled_k_magnitudes, 0), (lambda folder: None, 1)],
    ids=["k-magnitudes-edited", "another-base"],
)
def test_dora_k_magnitudes_that_are_not_the_base_norms_come_back_in_peft_form(tmp_path, change, base_seed):
    """Dropping them would change k's outputs, so import keeps PEFT's whole-layer DoRA on qkv and its logits."""
    name = "vit_tiny_patch16_224"
    model = trained(name, targets=("q", "v"), use_dora=True)
    export_peft(model, tmp_path / "peft")
    change(tmp_path / "peft")
    imported = import_peft(tiny_model(name, seed=base_seed), tmp_path / "peft", check_base=False)
    assert (lora_config(imported).targets, lora_config(imported).rank) == (("qkv",), 8)
    peft_model = peft.PeftModel.from_pretrained(tiny_model(name, seed=base_seed), tmp_path / "peft").eval()
    torch.testing.assert_close(imported(images()), peft_model(images()), **TOLERANCE)
    qkv = imported.get_submodule("blocks.0.attn.qkv")
    k_scale = qkv.lora_magnitude[64:128] / torch.linalg.vector_norm(qkv.weight[64:128], dim=1)
    assert (k_scale - 1).abs().max() > 1e-2  # PEFT scales k: vitlora's q/v layout (k scale 1) would be wrong


def test_dora_convert_to_peft_and_back_is_exact(tmp_path):
    """convert checks the k-row magnitudes against the base it builds from --weights."""
    name, kwargs = (
        "vit_tiny_patch16_224",
        {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2},
    )
    save_file(tiny_model(name).state_dict(), tmp_path / "base.safetensors")
    model = trained(name, targets=("q", "v", "fc2"), use_dora=True)
    save_adapter(model, tmp_path / "dora.safetensors", class_names=CLASSES, model_name=name, model_kwargs=kwargs)
    convert_adapter(tmp_path / "dora.safetensors", tmp_path / "peft", weights=tmp_path / "base.safetensors")
    convert_adapter(tmp_path / "peft", tmp_path / "back.safetensors", weights=tmp_path / "base.safetensors")
    original, back = read_adapter(tmp_path / "dora.safetensors"), read_adapter(tmp_path / "back.safetensors")
    assert (back.config, back.class_names) == (original.config, original.class_names)
    assert back.tensors.keys() == original.tensors.keys()
    assert all(torch.equal(back.tensors[key], tensor) for key, tensor in original.tensors.items())


def test_dora_tensors_and_config_that_disagree_are_refused_by_file(tmp_path):
    peft_trained("vit_tiny_patch16_224", tmp_path / "plain")
    with pytest.raises(
        AdapterError, match=r"adapter_model\.safetensors: use_dora is set but LoRA on .* no lora_magnitude"
    ):
        read_peft(edited(tmp_path / "plain", tmp_path, use_dora=True))
    with pytest.raises(AdapterError, match=r"adapter_config\.json: PEFT option use_dora='yes' is not true or false"):
        read_peft(edited(tmp_path / "plain", tmp_path / "yes", use_dora="yes"))
    peft_trained("vit_tiny_patch16_224", tmp_path / "dora", use_dora=True)
    with pytest.raises(AdapterError, match=r"adapter_model\.safetensors: unexpected tensors .*lora_magnitude_vector"):
        read_peft(edited(tmp_path / "dora", tmp_path / "off", use_dora=False))


# --- The common PEFT recipes: Conv2d patch embedding, target_modules forms, patterns, bias ------------------


@pytest.mark.parametrize("name", PEFT_FAMILIES)
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_the_usual_timm_recipe_with_a_conv_lora_on_the_patch_embedding_imports(tmp_path, name, use_dora):
    """target_modules=["qkv", "proj", "fc1", "fc2"] also puts a Conv2d LoRA on patch_embed.proj."""
    peft_model = peft_trained(name, tmp_path, ["qkv", "proj", "fc1", "fc2"], use_dora=use_dora)
    assert "base_model.model.patch_embed.proj.lora_A.weight" in load_file(tmp_path / "adapter_model.safetensors")
    model = import_peft(tiny_model(name), tmp_path).eval()
    assert "patch_embed" in lora_config(model).targets
    torch.testing.assert_close(model(images()), peft_model(images()), **TOLERANCE)


def test_head_dist_that_peft_did_not_save_stays_the_bases(tmp_path):
    name = "deit_tiny_distilled_patch16_224"
    model = tiny_model(name)
    lora = peft.LoraConfig(r=4, lora_alpha=6, target_modules=["qkv"], modules_to_save=["head"], init_lora_weights=False)
    peft_model = peft.get_peft_model(model, lora).eval()
    peft_model.save_pretrained(tmp_path)
    imported = import_peft(tiny_model(name), tmp_path).eval()
    torch.testing.assert_close(imported(images()), peft_model(images()), **TOLERANCE)


TARGET_FORMS = {
    "list": {"target_modules": ["qkv", "q_proj", "v_proj", "fc2"]},
    "regex": {"target_modules": r".*\.(qkv|[qkv]_proj|fc1|fc1_g|fc1_x)", "use_rslora": True},
    "all-linear-patterns": {
        "target_modules": "all-linear",
        "rank_pattern": {"fc2": 2, r"blocks\.1\.attn\.(qkv|q_proj)": 6},
        "alpha_pattern": {"proj": 3, "blocks.0.mlp.fc1": 9},
    },
    "layers-to-transform": {
        "target_modules": ["qkv", "q_proj", "proj"],
        "layers_to_transform": [1],
        "layers_pattern": "blocks",
    },
}


@pytest.mark.parametrize("name", PEFT_FAMILIES)
@pytest.mark.parametrize("options", TARGET_FORMS.values(), ids=TARGET_FORMS.keys())
def test_any_target_modules_form_with_rank_and_alpha_patterns_imports(tmp_path, name, options):
    peft_model = peft_trained(name, tmp_path, **options)
    model = import_peft(tiny_model(name), tmp_path).eval()
    torch.testing.assert_close(model(images()), peft_model(images()), **TOLERANCE)
    for path, layer in lora_modules(model):
        peft_layer = peft_model.base_model.model.get_submodule(path)
        assert (layer.rank, layer.scaling) == (peft_layer.r["default"], peft_layer.scaling["default"])
    export_peft(model, tmp_path / "again")  # and back to PEFT, per-layer ranks without padding
    torch.testing.assert_close(from_pretrained(name, tmp_path / "again")(images()), model(images()), **TOLERANCE)


def test_lora_on_a_map_pooling_head_is_refused_by_module(tmp_path):
    peft_trained("vit_base_patch16_siglip_224", tmp_path, "all-linear")
    with pytest.raises(AdapterError, match=r"LoRA on \['attn_pool\.kv', .*cannot be imported"):
        import_peft(tiny_model("vit_base_patch16_siglip_224"), tmp_path)


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_peft_bias_training_becomes_vitlora_bias_tuning(tmp_path, bias):
    name = "vit_tiny_patch16_224"
    peft_model = peft_trained(name, tmp_path, ["qkv", "fc2"], bias=bias)
    with torch.no_grad():  # move the trained biases, then save again
        for key, parameter in peft_model.named_parameters():
            if key.endswith("bias") and parameter.requires_grad:
                parameter.add_(0.3)
    peft_model.save_pretrained(tmp_path)
    model = import_peft(tiny_model(name), tmp_path).eval()
    torch.testing.assert_close(model(images()), peft_model(images()), **TOLERANCE)
    assert model.blocks[0].attn.qkv.bias.requires_grad and model.blocks[0].norm1.bias.requires_grad
    with pytest.raises(AdapterError, match=rf"bias='{bias}' maps onto vitlora's bias tuning only on the base model"):
        read_peft(tmp_path)


def test_a_rank_pattern_that_disagrees_with_the_tensors_is_refused(peft_folder, tmp_path):
    with pytest.raises(
        AdapterError, match=r"rank_pattern give blocks\.0\.attn\.qkv rank 8, but its tensors have rank 4"
    ):
        read_peft(edited(peft_folder, tmp_path, rank_pattern={"blocks.0.attn.qkv": 8}))
