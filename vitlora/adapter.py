"""Adapter files: one safetensors file with the LoRA tensors, the head and what they belong to.

The file records the LoRA config, the timm model, the classes and a fingerprint of the
frozen base weights, so an adapter is only ever loaded onto the base it was trained on.
Loading validates everything first and rolls back on failure: a model is never left
half-injected.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors
import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import save as serialize
from torch import nn

from vitlora.files import atomic_write
from vitlora.lora import LoRAConfig, adapter_state_dict, inject_lora, lora_config, lora_modules
from vitlora.targets import LoRASite, classifier_names, find_lora_sites, restore_fused_qkv_routing

FORMAT = "vitlora.adapter"
FORMAT_VERSION = "1"
_RESERVED = {
    "format", "format_version", "lora_config", "architecture", "num_classes",
    "base_fingerprint", "vitlora_version", "timm_version", "torch_version",
}  # fmt: skip


class AdapterError(ValueError):
    """An adapter file that cannot be used: unreadable, foreign or mismatched."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)


@dataclass
class Adapter:
    """The decoded contents of an adapter file."""

    path: Path
    config: LoRAConfig
    tensors: dict[str, torch.Tensor]
    num_classes: int
    architecture: str | None
    model_name: str | None
    class_names: list[str] | None
    base_fingerprint: str | None  # None where another tool's adapter records none
    metadata: dict[str, Any] = field(default_factory=dict)


def architecture_of(model: nn.Module) -> str | None:
    return (getattr(model, "pretrained_cfg", None) or {}).get("architecture")


def default_model_name(model: nn.Module) -> str | None:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name, tag = cfg.get("architecture"), cfg.get("tag")
    return f"{name}.{tag}" if name and tag else name


def base_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the frozen base: every state-dict tensor except LoRA and classifier heads.

    Floating tensors are hashed as bfloat16, so the same weights held in float32 or bf16
    match, while any real change of the base (another checkpoint, size or resolution) does not.
    """
    model = getattr(model, "_orig_mod", model)
    state = model.state_dict()
    if any(t.dtype == torch.float16 for t in state.values()):
        raise ValueError(
            "Cannot fingerprint float16 weights (fp16 -> bf16 double rounding changes them): "
            "load the base in float32 or bfloat16, load the adapter, then call .half()."
        )
    adapter_keys = adapter_state_dict(model).keys()  # the base is everything an adapter does not ship
    digest = hashlib.sha256()
    for key, tensor in sorted(state.items()):
        if key in adapter_keys:
            continue
        tensor = tensor.detach()
        if tensor.is_floating_point():
            tensor = tensor.to(torch.bfloat16)
        data = tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        digest.update(f"{key}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(data)
    return digest.hexdigest()


def save_adapter(model: nn.Module, path: str | os.PathLike, **metadata: Any) -> Path:
    """Writes the model's LoRA tensors and head(s) to one safetensors file, atomically.

    Recognised metadata: ``class_names`` (list, one per class) and ``model_name`` (full timm
    name, defaulting to the model's pretrained config). Any other JSON-serialisable keyword
    is stored as well and comes back in ``Adapter.metadata``.
    """
    model = getattr(model, "_orig_mod", model)
    header = adapter_header(model, **metadata)
    tensors = {k: v.to("cpu").contiguous() for k, v in adapter_state_dict(model).items()}
    payload = serialize(tensors, metadata=header)
    with atomic_write(path) as tmp:
        tmp.write_bytes(payload)
    return Path(path)


def adapter_header(model: nn.Module, **metadata: Any) -> dict[str, str]:
    """What an adapter file records besides tensors (see :func:`save_adapter` for ``metadata``)."""
    model = getattr(model, "_orig_mod", model)
    config = lora_config(model)
    clash = _RESERVED & metadata.keys()
    if clash:
        raise ValueError(f"Metadata keys {sorted(clash)} are written by vitlora itself.")
    num_classes = int(getattr(model, "num_classes", 0))
    class_names = metadata.pop("class_names", None)
    if class_names is not None:
        class_names = [str(name) for name in class_names]
        if len(class_names) != num_classes:
            raise ValueError(f"Got {len(class_names)} class names for a model with {num_classes} classes.")
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "lora_config": config.to_json(),
        "architecture": architecture_of(model) or "",
        "model_name": metadata.pop("model_name", None) or default_model_name(model) or "",
        "num_classes": str(num_classes),
        "base_fingerprint": base_fingerprint(model),
        "vitlora_version": _vitlora_version(),
        "timm_version": timm.__version__,
        "torch_version": torch.__version__,
    }
    if class_names is not None:
        header["class_names"] = json.dumps(class_names)
    header.update({key: json.dumps(value) for key, value in metadata.items()})
    return header


def read_adapter(path: str | os.PathLike) -> Adapter:
    """Opens and validates an adapter file without touching any model."""
    path = Path(path)
    if not path.is_file():
        raise AdapterError(path, "no such adapter file.")
    try:
        with safetensors.safe_open(path, framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except SafetensorError as error:
        raise AdapterError(path, f"not a readable safetensors file ({error}).") from error
    return decode_adapter(path, header, tensors)


def decode_adapter(path: str | os.PathLike, header: dict[str, str], tensors: dict[str, torch.Tensor]) -> Adapter:
    """Validates an adapter header (as :func:`adapter_header` writes it); errors name ``path``."""
    path = Path(path)
    if header.get("format") != FORMAT:
        raise AdapterError(path, f"not a vitlora adapter (metadata 'format' is {header.get('format')!r}).")
    if header.get("format_version") != FORMAT_VERSION:
        raise AdapterError(path, f"adapter format version {header.get('format_version')!r} is not supported.")
    missing = {"lora_config", "num_classes", "base_fingerprint"} - header.keys()
    if missing:
        raise AdapterError(path, f"metadata is missing {sorted(missing)}.")
    try:
        config = LoRAConfig.from_json(header["lora_config"])
        num_classes = int(header["num_classes"])
        class_names = json.loads(header["class_names"]) if "class_names" in header else None
    except (ValueError, TypeError) as error:
        raise AdapterError(path, f"invalid metadata ({error}).") from error
    if class_names is not None and (
        not isinstance(class_names, list)
        or len(class_names) != num_classes
        or not all(isinstance(name, str) for name in class_names)
    ):
        raise AdapterError(path, f"metadata 'class_names' is not a list of {num_classes} names.")
    extra = {
        key: _decode(value) for key, value in header.items() if key not in _RESERVED | {"model_name", "class_names"}
    }
    extra.update({k: header[k] for k in ("vitlora_version", "timm_version", "torch_version") if k in header})
    return Adapter(
        path=path,
        config=config,
        tensors=tensors,
        num_classes=num_classes,
        architecture=header.get("architecture") or None,
        model_name=header.get("model_name") or None,
        class_names=class_names,
        base_fingerprint=header["base_fingerprint"],
        metadata=extra,
    )


def resave_metadata(adapter: Adapter) -> dict[str, Any]:
    """Keywords for :func:`save_adapter` that record ``adapter``'s classes, model and extra metadata again."""
    extra = {key: value for key, value in adapter.metadata.items() if key not in _RESERVED}
    return {**extra, "class_names": adapter.class_names, "model_name": adapter.model_name}


def _decode(value: str) -> Any:
    """Extra metadata is JSON when vitlora wrote it; other tools' plain strings stay strings."""
    try:
        return json.loads(value)
    except ValueError:
        return value


def load_adapter(model: nn.Module, path: str | os.PathLike, *, check_base: bool = True) -> nn.Module:
    """Injects LoRA into a plain timm model per the file's config and loads its tensors and head.

    The classifier is resized to the adapter's classes when needed. Raises
    :class:`AdapterError` for a foreign architecture, other base weights (by fingerprint;
    ``check_base=False`` skips that check), or missing / unexpected / misshapen tensors,
    and then leaves the model exactly as it was.
    """
    return apply_adapter(model, read_adapter(path), check_base=check_base)


def apply_adapter(model: nn.Module, adapter: Adapter, *, check_base: bool = True) -> nn.Module:
    """:func:`load_adapter` for an adapter already read (from a vitlora file or another tool's format)."""
    _check_compatible(model, adapter, check_base)
    try:
        sites = find_lora_sites(model, adapter.config.targets, adapter.config.blocks)
    except ValueError as error:
        raise AdapterError(adapter.path, f"its LoRA config does not fit this model: {error}") from error
    snapshot = _Snapshot(model, sites)
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices):  # injecting draws random A: keep the caller's RNG
            if getattr(model, "num_classes", None) != adapter.num_classes:
                _reset_classifier_like(model, adapter.num_classes)
            inject_lora(model, adapter.config)
        _copy_adapter_tensors(model, adapter)
    except BaseException:
        snapshot.restore(model)
        raise
    return model


def _reset_classifier_like(model: nn.Module, num_classes: int) -> None:
    """timm's reset_classifier, keeping the old head's device and dtype (older timm makes fp32 CPU heads)."""
    old = {name: getattr(model, name) for name in classifier_names(model)}
    like = next((p for head in old.values() for p in head.parameters()), None)
    if like is None:
        like = next(model.parameters())
    model.reset_classifier(num_classes)
    for name in old:
        getattr(model, name).to(device=like.device, dtype=like.dtype)


def _check_compatible(model: nn.Module, adapter: Adapter, check_base: bool) -> None:
    if lora_modules(model):
        raise AdapterError(adapter.path, "the model already has LoRA layers; load onto a plain timm model.")
    architecture = architecture_of(model)
    if adapter.architecture and architecture and adapter.architecture != architecture:
        raise AdapterError(
            adapter.path,
            f"adapter is for architecture {adapter.architecture!r}, the model is {architecture!r}.",
        )
    if check_base and adapter.base_fingerprint is not None:
        fingerprint = base_fingerprint(model)
        if fingerprint != adapter.base_fingerprint:
            raise AdapterError(
                adapter.path,
                "the model's base weights differ from those the adapter was trained on "
                f"(fingerprint {fingerprint[:12]}, adapter expects {adapter.base_fingerprint[:12]}). "
                "Load the same pretrained weights, or pass check_base=False to override.",
            )


def _copy_adapter_tensors(model: nn.Module, adapter: Adapter) -> None:
    expected = adapter_state_dict(model)
    missing = sorted(expected.keys() - adapter.tensors.keys())
    unexpected = sorted(adapter.tensors.keys() - expected.keys())
    misshapen = [
        f"{key} {tuple(adapter.tensors[key].shape)} != {tuple(tensor.shape)}"
        for key, tensor in expected.items()
        if key in adapter.tensors and adapter.tensors[key].shape != tensor.shape
    ]
    problems = [
        f"{label}: {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}"
        for label, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("misshapen", misshapen),
        )
        if items
    ]
    if problems:
        raise AdapterError(adapter.path, "tensors do not match the model; " + "; ".join(problems))
    with torch.no_grad():
        for key, tensor in expected.items():
            tensor.copy_(adapter.tensors[key])


class _Snapshot:
    """What load_adapter may change: the wrapped modules, heads, num_classes, modes, requires_grad."""

    def __init__(self, model: nn.Module, sites: list[LoRASite]) -> None:
        self.linears = {site.path: site.linear for site in sites}
        self.heads = {name: getattr(model, name) for name in classifier_names(model)}
        self.num_classes = getattr(model, "num_classes", None)
        self.requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        self.training = {module: module.training for module in model.modules()}

    def restore(self, model: nn.Module) -> None:
        for path, linear in self.linears.items():
            model.set_submodule(path, linear)
        restore_fused_qkv_routing(model)
        for name, head in self.heads.items():
            setattr(model, name, head)
        if self.num_classes is not None:
            model.num_classes = self.num_classes
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(self.requires_grad[name])
        for module, training in self.training.items():
            module.training = training


def _vitlora_version() -> str:
    from vitlora import __version__

    return __version__
