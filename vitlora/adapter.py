"""The adapter file format: one safetensors file with what an adapter trains (LoRA, prompt tokens,
tuned biases, the head) and what it belongs to.

The file records how the model was adapted (LoRA config, prompt config, bias tuning), the timm
model, the classes and a fingerprint of the frozen base weights, so an adapter is only ever
loaded onto the base it was trained on (putting it on a model is :mod:`vitlora.apply`'s job). Format version 1 is pure LoRA (what vitlora 0.1
reads); files with prompt tokens, tuned biases or no LoRA are version 2, so older readers
refuse them instead of silently dropping their prompts or biases.
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

from vitlora._version import __version__
from vitlora.files import atomic_write
from vitlora.lora import LoRAConfig, lora_config, lora_modules
from vitlora.prompts import PromptConfig, prompt_config
from vitlora.targets import unwrap
from vitlora.trainable import (
    adapter_state_dict,
    bias_tuning_enabled,
    is_adapter_key,
    is_bias_name,
)

FORMAT = "vitlora.adapter"
LORA_ONLY_VERSION, FORMAT_VERSION = "1", "2"
_RESERVED = {
    "format", "format_version", "lora_config", "prompt_config", "bias_tuning", "architecture", "num_classes",
    "base_fingerprint", "vitlora_version", "timm_version", "torch_version",
}  # fmt: skip


class AdapterError(ValueError):
    """An adapter file that cannot be used: unreadable, foreign or mismatched."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)


@dataclass
class Adapter:
    """The decoded contents of an adapter file. ``config`` is the LoRA config, None without LoRA."""

    path: Path
    config: LoRAConfig | None
    tensors: dict[str, torch.Tensor]
    num_classes: int
    architecture: str | None
    model_name: str | None
    class_names: list[str] | None
    base_fingerprint: str | None  # None where another tool's adapter records none
    prompt: PromptConfig | None = None
    bias_tuning: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        """The class names, or the class indices as strings for an adapter that records none."""
        return class_labels(self.class_names, self.num_classes)

    @property
    def model_kwargs(self) -> dict[str, Any]:
        """Extra ``timm.create_model`` arguments the adapter was trained with (``img_size``...)."""
        kwargs = self.metadata.get("model_kwargs") or {}
        if not isinstance(kwargs, dict):
            raise AdapterError(self.path, f"metadata 'model_kwargs' is not a mapping: {kwargs!r}.")
        return dict(kwargs)


def class_labels(class_names: list[str] | None, num_classes: int) -> list[str]:
    """``class_names``, or ``"0" ... "n-1"`` where a model or file names no classes."""
    return list(class_names) if class_names else [str(i) for i in range(num_classes)]


def architecture_of(model: nn.Module) -> str | None:
    return (getattr(model, "pretrained_cfg", None) or {}).get("architecture")


def default_model_name(model: nn.Module) -> str | None:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name, tag = cfg.get("architecture"), cfg.get("tag")
    return f"{name}.{tag}" if name and tag else name


def base_fingerprint(model: nn.Module, *, exclude_biases: bool = False) -> str:
    """SHA-256 of the frozen base: every state-dict tensor the adapter does not ship.

    ``exclude_biases`` leaves the biases out as well, to check a plain model against an adapter
    with tuned biases. Floating tensors are hashed as bfloat16, so the same weights held in
    float32 or bf16 match, while any real change of the base (another checkpoint, size or
    resolution) does not.
    """
    model = unwrap(model)
    state = model.state_dict()
    if any(t.dtype == torch.float16 for t in state.values()):
        raise ValueError(
            "Cannot fingerprint float16 weights (fp16 -> bf16 double rounding changes them): "
            "load the base in float32 or bfloat16, load the adapter, then call .half()."
        )
    digest = hashlib.sha256()
    for key, tensor in sorted(state.items()):
        if is_adapter_key(model, key) or (exclude_biases and is_bias_name(key)):
            continue
        tensor = tensor.detach()
        if tensor.is_floating_point():
            tensor = tensor.to(torch.bfloat16)
        data = tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        digest.update(f"{key}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(data)
    return digest.hexdigest()


def save_adapter(model: nn.Module, path: str | os.PathLike, **metadata: Any) -> Path:
    """Writes the model's adapter (LoRA, prompt tokens, tuned biases, head) to one safetensors file, atomically.

    Refuses a model that trains parameters an adapter would not ship (a fully fine-tuned or merged
    model). Recognised metadata: ``class_names`` (list, one per class) and ``model_name`` (full
    timm name, defaulting to the model's pretrained config). Any other JSON-serialisable keyword
    is stored as well and comes back in ``Adapter.metadata``.
    """
    model = unwrap(model)
    header = adapter_header(model, **metadata)
    tensors = {k: v.to("cpu").contiguous() for k, v in adapter_state_dict(model).items()}
    payload = serialize(tensors, metadata=header)
    with atomic_write(path) as tmp:
        tmp.write_bytes(payload)
    return Path(path)


def adapter_header(model: nn.Module, **metadata: Any) -> dict[str, str]:
    """What an adapter file records besides tensors (see :func:`save_adapter` for ``metadata``)."""
    model = unwrap(model)
    unshipped = [name for name, p in model.named_parameters() if p.requires_grad and not is_adapter_key(model, name)]
    if unshipped:
        examples = ", ".join(unshipped[:3]) + (", ..." if len(unshipped) > 3 else "")
        raise ValueError(
            f"{len(unshipped)} trainable parameters ({examples}) are no part of an adapter, "
            "which ships LoRA, prompt tokens, tuned biases and the head(s): adapt the model with inject_lora, "
            "add_prompt_tokens or enable_bias_tuning (or call freeze_base for a linear probe) before training."
        )
    config = lora_config(model) if lora_modules(model) else None
    prompt, bias_tuning = prompt_config(model), bias_tuning_enabled(model)
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
        "format_version": LORA_ONLY_VERSION
        if config is not None and prompt is None and not bias_tuning
        else FORMAT_VERSION,
        "architecture": architecture_of(model) or "",
        "model_name": metadata.pop("model_name", None) or default_model_name(model) or "",
        "num_classes": str(num_classes),
        "base_fingerprint": base_fingerprint(model),
        "vitlora_version": __version__,
        "timm_version": timm.__version__,
        "torch_version": torch.__version__,
    }
    if config is not None:
        header["lora_config"] = config.to_json()
    if prompt is not None:
        header["prompt_config"] = prompt.to_json()
    if bias_tuning:
        header["bias_tuning"] = "true"
    if class_names is not None:
        header["class_names"] = json.dumps(class_names)
    header.update({key: json.dumps(value) for key, value in metadata.items()})
    return header


def read_adapter(path: str | os.PathLike) -> Adapter:
    """Opens and validates an adapter file without touching any model."""
    path = Path(path)
    if not path.is_file():
        raise AdapterError(path, "no such adapter file.")
    header, tensors = read_safetensors(path)
    return decode_adapter(path, header, tensors)


def read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """A safetensors file's metadata and tensors; an unreadable file is an AdapterError naming it."""
    try:
        with safetensors.safe_open(path, framework="pt") as handle:
            return handle.metadata() or {}, {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except SafetensorError as error:
        raise AdapterError(path, f"not a readable safetensors file ({error}).") from error


def decode_adapter(path: str | os.PathLike, header: dict[str, str], tensors: dict[str, torch.Tensor]) -> Adapter:
    """Validates an adapter header (as :func:`adapter_header` writes it); errors name ``path``."""
    path = Path(path)
    if header.get("format") != FORMAT:
        raise AdapterError(path, f"not a vitlora adapter (metadata 'format' is {header.get('format')!r}).")
    version = header.get("format_version")
    if version not in (LORA_ONLY_VERSION, FORMAT_VERSION):
        raise AdapterError(
            path,
            f"adapter format version {version!r} is not supported (this vitlora reads versions "
            f"{LORA_ONLY_VERSION} and {FORMAT_VERSION}).",
        )
    required = {"num_classes", "base_fingerprint"} | ({"lora_config"} if version == LORA_ONLY_VERSION else set())
    missing = required - header.keys()
    if missing:
        raise AdapterError(path, f"metadata is missing {sorted(missing)}.")
    try:
        config = LoRAConfig.from_json(header["lora_config"]) if "lora_config" in header else None
        prompt = PromptConfig.from_json(header["prompt_config"]) if "prompt_config" in header else None
        bias_tuning = json.loads(header.get("bias_tuning", "false"))
        num_classes = int(header["num_classes"])
        class_names = json.loads(header["class_names"]) if "class_names" in header else None
    except (ValueError, TypeError) as error:
        raise AdapterError(path, f"invalid metadata ({error}).") from error
    if not isinstance(bias_tuning, bool):
        raise AdapterError(path, f"metadata 'bias_tuning' is {header['bias_tuning']!r}, not true or false.")
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
        prompt=prompt,
        bias_tuning=bias_tuning,
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
