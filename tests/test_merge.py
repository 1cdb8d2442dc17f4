"""Merged deployment files: strict timm state dicts and self-verifying ONNX, never a partial file."""

import hashlib
import json

import pytest
import timm
import torch
from conftest import IMG_SIZE, TINY, images, randomize_lora, tiny_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vitlora import (
    AdapterError,
    ExportError,
    LoRAConfig,
    PromptConfig,
    add_prompt_tokens,
    enable_bias_tuning,
    export_onnx,
    inject_lora,
    merge_adapter,
    save_adapter,
)
from vitlora import merge as merge_module

TINY_VIT = {"img_size": IMG_SIZE, **TINY}
CLASSES = ["apple", "banana", "cherry", "dates", "eggplant"]


def adapter_with_base(folder, name="vit_tiny_patch16_224", targets=("q", "v")):
    """A LoRA model with non-zero updates, its adapter file, and its base weights file (1000-class head)."""
    save_file(tiny_model(name, num_classes=1000).state_dict(), folder / "base.safetensors")
    model = tiny_model(name)
    inject_lora(model, LoRAConfig(rank=4, targets=targets))
    randomize_lora(model)
    path = save_adapter(
        model, folder / "adapter.safetensors", class_names=CLASSES, model_name=name, model_kwargs=TINY_VIT
    )
    return model, path


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    """(LoRA model, adapter file, base weights file) for a tiny ViT, shared: tests write elsewhere."""
    folder = tmp_path_factory.mktemp("vit")
    model, path = adapter_with_base(folder)
    return model, path, folder / "base.safetensors"


def fresh_timm_model(path):
    """Exactly what a deployment script does with a merged file: timm plus the recorded metadata."""
    with safe_open(path, "pt") as handle:
        meta = handle.metadata()
    model = timm.create_model(
        meta["model_name"], num_classes=int(meta["num_classes"]), **json.loads(meta["model_kwargs"])
    )
    model.load_state_dict(load_file(path), strict=True)
    return model.eval(), meta


@pytest.mark.parametrize(
    ("name", "targets"),
    [
        ("vit_tiny_patch16_224", ("q", "v")),
        ("deit_tiny_distilled_patch16_224", ("qkv", "proj", "fc1", "fc2")),
        ("eva02_tiny_patch14_224", ("q", "v", "fc1")),  # fused qkv with q/v biases, SwiGLU
    ],
)
def test_merged_file_loads_strictly_into_timm_and_reproduces_the_adapter(tmp_path, name, targets):
    model, adapter_path = adapter_with_base(tmp_path, name, targets)
    out = merge_adapter(adapter_path, tmp_path / "model.safetensors", weights=tmp_path / "base.safetensors")
    deployed, meta = fresh_timm_model(out)
    torch.testing.assert_close(deployed(images(3)), model(images(3)), atol=1e-5, rtol=0)
    assert not any("lora_" in key for key in load_file(out))
    assert json.loads(meta["class_names"]) == CLASSES and meta["format"] == "vitlora.merged"
    assert meta["adapter_sha256"] == hashlib.sha256(adapter_path.read_bytes()).hexdigest()
    with safe_open(adapter_path, "pt") as handle:
        assert meta["base_fingerprint"] == handle.metadata()["base_fingerprint"]


def test_onnx_export_matches_torch_on_other_batch_sizes_and_keeps_metadata(tmp_path, vit):
    onnxruntime = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    model, adapter_path, base = vit
    out = merge_adapter(adapter_path, tmp_path / "model.onnx", weights=base, format="onnx")
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert isinstance(session.get_inputs()[0].shape[0], str)  # a symbolic, dynamic batch axis
    for batch in (1, 5):
        x = images(batch, seed=7)
        (logits,) = session.run(["logits"], {"images": x.numpy()})
        torch.testing.assert_close(torch.from_numpy(logits), model(x), atol=merge_module.ONNX_TOLERANCE, rtol=0)
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(props["class_names"]) == CLASSES and props["model_name"] == "vit_tiny_patch16_224"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no external data, no temporary


def test_onnx_that_disagrees_with_torch_raises_and_leaves_no_file(tmp_path, monkeypatch):
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    run = onnxruntime.InferenceSession.run

    def off_by_a_little(self, *args, **kwargs):
        return [output + 10 * merge_module.ONNX_TOLERANCE for output in run(self, *args, **kwargs)]

    monkeypatch.setattr(onnxruntime.InferenceSession, "run", off_by_a_little)
    with pytest.raises(ExportError, match=r"model\.onnx: onnxruntime's logits differ from torch's by up to 0\.001"):
        export_onnx(tiny_model(), tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []


def test_a_merge_failing_while_writing_leaves_no_file(tmp_path, monkeypatch, vit):
    _, adapter_path, base = vit

    def crash_half_way(tensors, filename, metadata=None):
        save_file(dict(list(tensors.items())[:3]), filename, metadata)
        raise OSError("disk full")

    monkeypatch.setattr(merge_module, "save_file", crash_half_way)
    with pytest.raises(OSError, match="disk full"):
        merge_adapter(adapter_path, tmp_path / "model.safetensors", weights=base)
    assert list(tmp_path.iterdir()) == []


def test_other_base_weights_are_refused_before_writing(tmp_path, vit):
    _, adapter_path, _ = vit
    save_file(tiny_model(num_classes=1000, seed=9).state_dict(), tmp_path / "other.safetensors")
    with pytest.raises(AdapterError, match=r"adapter\.safetensors: the model's base weights differ"):
        merge_adapter(adapter_path, tmp_path / "model.safetensors", weights=tmp_path / "other.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["other.safetensors"]


@pytest.mark.parametrize(
    ("adapter", "output", "options", "error", "message"),
    [
        ("missing.safetensors", "m.safetensors", {}, AdapterError, r"missing\.safetensors: no such adapter file"),
        ("base.safetensors", "m.safetensors", {}, AdapterError, r"base\.safetensors: not a vitlora adapter"),
        ("adapter.safetensors", "m.onnx", {"format": "tflite"}, ValueError, r"m\.onnx: unknown format 'tflite'"),
        ("adapter.safetensors", "m.onnx", {}, ValueError, r"m\.onnx: the output must end in \.safetensors"),
        ("adapter.safetensors", "no/m.safetensors", {}, FileNotFoundError, r"output folder .*no does not exist"),
    ],
)
def test_bad_input_names_the_file_and_the_problem(tmp_path, vit, adapter, output, options, error, message):
    _, _, base = vit
    with pytest.raises(error, match=message):
        merge_adapter(base.parent / adapter, tmp_path / output, weights=base, **options)
    assert list(tmp_path.iterdir()) == []


def test_onnx_export_refuses_what_it_cannot_write_or_check(tmp_path, monkeypatch):
    monkeypatch.setattr(merge_module, "ONNX_MAX_BYTES", 1000)
    with pytest.raises(ExportError, match=r"model\.onnx: the model's .* GiB of weights exceed"):
        export_onnx(tiny_model(), tmp_path / "model.onnx")
    with pytest.raises(ExportError, match="in eval mode"):
        export_onnx(tiny_model().train(), tmp_path / "model.onnx")
    find_spec = merge_module.importlib.util.find_spec
    monkeypatch.setattr(
        merge_module.importlib.util, "find_spec", lambda name: None if name == "onnxruntime" else find_spec(name)
    )
    with pytest.raises(ExportError, match=r"model\.onnx: ONNX export needs onnxruntime: pip install 'vitlora\[onnx\]'"):
        export_onnx(tiny_model(), tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []


def test_a_dora_and_bias_tuned_adapter_merges_into_a_plain_timm_model(tmp_path):
    save_file(tiny_model(num_classes=1000).state_dict(), tmp_path / "base.safetensors")
    model = enable_bias_tuning(inject_lora(tiny_model(), LoRAConfig(rank=4, use_dora=True)))
    randomize_lora(model)
    with torch.no_grad():
        model.blocks[0].mlp.fc1.bias.add_(0.5)
    path = save_adapter(model, tmp_path / "a.safetensors", model_name="vit_tiny_patch16_224", model_kwargs=TINY_VIT)
    out = merge_adapter(path, tmp_path / "model.safetensors", weights=tmp_path / "base.safetensors")
    deployed, meta = fresh_timm_model(out)
    torch.testing.assert_close(deployed(images(3)), model(images(3)), atol=1e-5, rtol=0)
    assert meta["bias_tuning"] == "true"


def test_prompt_tokens_cannot_become_a_plain_timm_model_and_nothing_is_written(tmp_path):
    model = add_prompt_tokens(tiny_model(), PromptConfig(num_tokens=2))
    path = save_adapter(model, tmp_path / "vpt.safetensors", model_name="vit_tiny_patch16_224", model_kwargs=TINY_VIT)
    with pytest.raises(AdapterError, match=r"vpt\.safetensors: its prompt tokens have no place in a plain timm"):
        merge_adapter(path, tmp_path / "model.safetensors")
    assert not (tmp_path / "model.safetensors").exists()
