"""The adapter file format: one safetensors file with what an adapter trains (LoRA, prompt tokens,
tuned biases, the head) and what it belongs to.

The file records how the model was adapted (LoRA config, prompt config, bias tuning), the timm
model, the classes and a fingerprint of the frozen base weights, so an adapter is only ever
loaded onto the base it was trained on (putting it on a model is :mod:`vitlora.apply`'s job). Format version 1 is pure LoRA (what vitlora 0.1
reads); files with prompt tokens, tuned biases or no LoRA are version 2, so older readers
refuse them instead of silently dropping their prompts or biases.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors
import torch
from safetensors import SafetensorError
from safetensors.torch import save as serialize
from torch import nn

from vitlora._version import __version__
from vitlora.files import atomic_write
from vitlora.lora import LoRAConfig, lora_config, lora_modules
from vitlora.prompts import PromptConfig, prompt_config
from vitlora.targets import CLASSIFIER_NAMES, unwrap, update_labels
from vitlora.trainable import (
    adapter_state_dict,
    bias_tuning_enabled,
    is_adapter_key,
    is_bias_name,
    is_lora_name,
    is_prompt_name,
)
from vitlora.validation import (
    ADAPTER_DTYPES,
    PAYLOAD_DIGEST_KEY,
    InvalidJSON,
    check_finite_tensors,
    check_int,
    check_json_type,
    check_number,
    check_tensor_dtypes,
    decode_json,
    verify_payload_digest,
    with_payload_digest,
)

FORMAT = "vitlora.adapter"
LORA_ONLY_VERSION, FORMAT_VERSION = "1", "2"
_RESERVED = {
    "format", "format_version", "lora_config", "prompt_config", "bias_tuning", "architecture", "num_classes",
    "base_fingerprint", "vitlora_version", "timm_version", "torch_version", "base_config", PAYLOAD_DIGEST_KEY,
}  # fmt: skip
# Bounds on sizes a header states, far above any real adapter; the tensors then pin the exact values.
MAX_CLASSES, MAX_RANK, MAX_PROMPT_TOKENS, MAX_BLOCKS = 10**6, 2**16, 10**4, 10**4
MAX_ALPHA = 1e6
# timm.create_model arguments that vitlora sets itself: an adapter's model_kwargs must not.
RESERVED_MODEL_KWARGS = {
    "num_classes", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "pretrained_strict",
    "features_only", "cache_dir", "scriptable", "exportable", "no_jit",
}  # fmt: skip
_SHA256 = re.compile(r"[0-9a-f]{64}")


class UndigestedFileWarning(UserWarning):
    """An adapter file older than payload digests: it loads, but damage to it cannot be detected."""


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
    base_config: dict[str, Any] | None = None  # base_model_config of the base; None in older files

    @property
    def labels(self) -> list[str]:
        """The class names, or the class indices as strings for an adapter that records none."""
        return class_labels(self.class_names, self.num_classes)

    @property
    def model_kwargs(self) -> dict[str, Any]:
        """Extra ``timm.create_model`` arguments the adapter was trained with (``img_size``...)."""
        return dict(self.metadata.get("model_kwargs") or {})


def class_labels(class_names: list[str] | None, num_classes: int) -> list[str]:
    """``class_names``, or ``"0" ... "n-1"`` where a model or file names no classes."""
    return list(class_names) if class_names else [str(i) for i in range(num_classes)]


def architecture_of(model: nn.Module) -> str | None:
    return (getattr(model, "pretrained_cfg", None) or {}).get("architecture")


def base_model_config(model: nn.Module) -> dict[str, Any]:
    """What shapes a base model's forward pass beyond its weight shapes, as JSON values.

    Two bases can hold weights of identical shapes (so the same fingerprint on the same
    values) and still compute differently: 2 or 4 heads of a 64-wide attention, a class token
    or average pooling, a final norm or an fc_norm. An adapter records this beside the
    fingerprint and is refused on a base that differs. Prompt tokens are not counted as prefix tokens.
    """
    model = unwrap(model)
    blocks = getattr(model, "blocks", None)
    first = blocks[0] if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks) else None
    attn, patch = getattr(first, "attn", None), getattr(model, "patch_embed", None)
    prompt = prompt_config(model)
    prefix = getattr(model, "num_prefix_tokens", None)
    config = {
        "class": type(model).__name__,
        "embed_dim": getattr(model, "embed_dim", None),
        "depth": len(blocks) if first is not None else None,
        "num_heads": getattr(attn, "num_heads", None),
        "num_prefix_tokens": prefix - prompt.num_tokens if prompt and isinstance(prefix, int) else prefix,
        "class_token": getattr(model, "cls_token", None) is not None,
        "num_reg_tokens": getattr(model, "num_reg_tokens", None),
        "dist_token": getattr(model, "dist_token", None) is not None,
        "global_pool": getattr(model, "global_pool", None),
        "patch_size": getattr(patch, "patch_size", None),
        "img_size": getattr(patch, "img_size", None),
        "dynamic_img_size": getattr(model, "dynamic_img_size", None),
        "no_embed_class": getattr(model, "no_embed_class", None),
        "pool_include_prefix": getattr(model, "pool_include_prefix", None),
        "modules": {
            name: type(module).__name__
            for name, module in (
                ("norm_pre", getattr(model, "norm_pre", None)),
                ("norm", getattr(model, "norm", None)),
                ("fc_norm", getattr(model, "fc_norm", None)),
                ("block", first),
                ("attn", attn),
                ("q_norm", getattr(attn, "q_norm", None)),
                ("mlp", getattr(first, "mlp", None)),
                ("ls1", getattr(first, "ls1", None)),
                ("norm1", getattr(first, "norm1", None)),
            )
            if isinstance(module, nn.Module)
        },
    }
    return json.loads(json.dumps(config, default=str))  # tuples as lists: as the file gives them back


def base_config_differences(recorded: dict[str, Any], model: nn.Module) -> list[str]:
    """``"num_heads 4 != 2"`` for each setting the adapter's base had (``recorded``) and ``model`` has otherwise."""
    recorded, actual = _flat(recorded), _flat(base_model_config(model))
    return [
        f"{key} {str(recorded[key])[:60]} != {actual[key]}"
        for key in sorted(recorded.keys() & actual.keys())
        if recorded[key] != actual[key]
    ]


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    """``{"modules": {"norm": ...}}`` as ``{"modules.norm": ...}``: differences name the very setting."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{inner}": item for inner, item in value.items()})
        else:
            flat[key] = value
    return flat


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

    Args:
        model: a plain or adapted timm model.
        exclude_biases: leave every bias out (for adapters with tuned biases).

    Returns:
        The hex digest.

    Raises:
        ValueError: float16 weights (their bf16 rounding is not the same as float32's).
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

    Args:
        model: an adapted model (LoRA, prompt tokens, tuned biases, or a head-only probe).
        path: the ``.safetensors`` file to write.
        **metadata: ``class_names``, ``model_name``, ``model_kwargs`` and any other JSON values.

    Returns:
        ``path``.

    Raises:
        ValueError: trainable weights outside the adapter, reserved or inconsistent metadata
            (class names that do not match the head), or tensors of a dtype vitlora does not write.
    """
    model = unwrap(model)
    header = adapter_header(model, **metadata)
    tensors = {k: v.to("cpu").contiguous() for k, v in adapter_state_dict(model).items()}
    try:
        check_tensor_dtypes(tensors, ADAPTER_DTYPES)  # never write a file that read_adapter refuses
    except ValueError as error:
        raise ValueError(f"{path}: cannot save {error} Convert the model with .float() or .bfloat16().") from error
    payload = serialize(tensors, metadata=with_payload_digest(tensors, header))
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
        "base_config": json.dumps(base_model_config(model)),
        "vitlora_version": __version__,
        "timm_version": importlib.metadata.version("timm"),
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
    """Opens and validates an adapter file without touching any model.

    Args:
        path: the adapter ``.safetensors`` file.

    Returns:
        The decoded :class:`Adapter`, its metadata and tensors checked against each other.

    Raises:
        AdapterError: for anything the path or file can hold that is not a valid adapter, naming both.
    """
    path = Path(path)
    if not is_file(path):
        raise AdapterError(path, "no such adapter file.")
    header, tensors = read_safetensors(path)
    if PAYLOAD_DIGEST_KEY not in header and "base_config" in header:  # written together since base configs exist
        raise AdapterError(path, f"corrupted: it records a base_config but no {PAYLOAD_DIGEST_KEY}.")
    adapter = decode_adapter(path, header, tensors)
    check_adapter_tensors(adapter)
    if PAYLOAD_DIGEST_KEY not in header:
        warnings.warn(
            f"{path}: records no payload digest (written before vitlora 0.2): damage to it cannot be detected; "
            "save it again to add one.",
            UndigestedFileWarning,
            stacklevel=2,
        )
    return adapter


def is_file(path: Path) -> bool:
    """``path.is_file()``, False for a path the system refuses (too long, a NUL byte)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def read_safetensors(
    path: Path, dtypes: tuple[torch.dtype, ...] = ADAPTER_DTYPES
) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """A safetensors file's metadata and tensors, checked: the payload digest where one is recorded, then
    only ``dtypes`` and only finite values. Anything else is an AdapterError naming the file."""
    try:
        with safetensors.safe_open(path, framework="pt") as handle:
            metadata, tensors = handle.metadata() or {}, {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except SafetensorError as error:
        raise AdapterError(path, f"not a readable safetensors file ({error}).") from error
    except (OSError, ValueError, TypeError, RuntimeError) as error:  # odd files: /proc, FIFOs, unsupported dtypes
        raise AdapterError(path, f"not a readable safetensors file ({type(error).__name__}: {error}).") from error
    try:
        verify_payload_digest(tensors, metadata)
        check_tensor_dtypes(tensors, dtypes)
        check_finite_tensors(tensors)
    except ValueError as error:
        raise AdapterError(path, str(error)) from error
    return metadata, tensors


def decode_adapter(path: str | os.PathLike, header: Any, tensors: dict[str, torch.Tensor]) -> Adapter:
    """Validates an adapter header (as :func:`adapter_header` writes it); errors name ``path``.

    Every value is checked for its JSON type and size before use, so no header can make a
    reader recurse, allocate or compute with what it states; :func:`check_adapter_tensors`
    then checks the stated sizes against the tensors.
    """
    path = Path(path)
    if not isinstance(header, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in header.items()):
        wrong = (
            next((k for k, v in header.items() if not isinstance(v, str)), None) if isinstance(header, dict) else None
        )
        raise AdapterError(path, f"not a vitlora adapter header (metadata {wrong!r} is not a string).")
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
        fields = _decode_fields(header)
    except ValueError as error:
        raise AdapterError(path, f"invalid metadata: {error}") from error
    return Adapter(path=path, tensors=tensors, **fields)


def _decode_fields(header: dict[str, str]) -> dict[str, Any]:
    """The :class:`Adapter` fields a header states, each of its JSON type and within bounds, else ValueError."""
    num_classes = header["num_classes"]
    if not (
        num_classes.isascii() and num_classes.isdigit() and len(num_classes) < 9 and int(num_classes) <= MAX_CLASSES
    ):
        raise ValueError(f"'num_classes' is {num_classes[:20]!r}, not a whole number up to {MAX_CLASSES:,}.")
    num_classes = int(num_classes)
    class_names = decode_json(header["class_names"], "'class_names'") if "class_names" in header else None
    if class_names is not None and (
        not isinstance(class_names, list)
        or len(class_names) != num_classes
        or not all(isinstance(name, str) for name in class_names)
    ):
        raise ValueError(f"'class_names' is not a list of {num_classes} names.")
    fingerprint = header["base_fingerprint"]
    if not _SHA256.fullmatch(fingerprint):
        raise ValueError(f"'base_fingerprint' is {fingerprint[:70]!r}, not a SHA-256 hex digest.")
    extra = {
        key: _decode_extra(key, value)
        for key, value in header.items()
        if key not in _RESERVED | {"model_name", "class_names"}
    }
    kwargs = check_json_type(extra.get("model_kwargs", {}), "'model_kwargs'", dict)
    reserved = sorted(RESERVED_MODEL_KWARGS & kwargs.keys())
    if reserved:
        raise ValueError(f"'model_kwargs' sets {reserved}, which vitlora sets itself.")
    extra.update({k: header[k] for k in ("vitlora_version", "timm_version", "torch_version") if k in header})
    return {
        "config": _lora_config(header["lora_config"]) if "lora_config" in header else None,
        "prompt": _prompt_config(header["prompt_config"]) if "prompt_config" in header else None,
        "bias_tuning": decode_json(header.get("bias_tuning", "false"), "'bias_tuning'", bool),
        "num_classes": num_classes,
        "architecture": header.get("architecture") or None,
        "model_name": header.get("model_name") or None,
        "class_names": class_names,
        "base_fingerprint": fingerprint,
        "metadata": extra,
        "base_config": decode_json(header["base_config"], "'base_config'", dict) if "base_config" in header else None,
    }


def _lora_config(text: str) -> LoRAConfig:
    """A LoRA config from its JSON, every field of its type: ``"use_rslora": "no"`` is refused, not true."""
    raw = decode_json(text, "'lora_config'", dict)
    _check_known_fields(raw, LoRAConfig, "'lora_config'")
    what = "'lora_config'"
    check_int(raw.get("rank", 8), f"{what} rank", 1, MAX_RANK)
    alpha = check_number(raw.get("alpha", 16.0), f"{what} alpha", 0.0, MAX_ALPHA)
    check_number(raw.get("dropout", 0.0), f"{what} dropout", 0.0, 1.0)
    for flag in ("use_rslora", "use_dora"):
        check_json_type(raw.get(flag, False), f"{what} {flag}", bool)
    targets = check_json_type(raw.get("targets", ["q", "v"]), f"{what} targets", (list, str))
    for target in targets if isinstance(targets, list) else [targets]:
        check_json_type(target, f"{what} target", str)
    blocks = raw.get("blocks")
    if blocks is not None:
        for block in check_json_type(blocks, f"{what} blocks", list):
            check_int(block, f"{what} block", -MAX_BLOCKS, MAX_BLOCKS)
    if alpha <= 0:
        raise ValueError(f"{what} alpha is {alpha!r}, not positive.")
    try:
        return LoRAConfig(**raw)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{what}: {error}") from error


def _prompt_config(text: str) -> PromptConfig:
    raw = decode_json(text, "'prompt_config'", dict)
    what = "'prompt_config'"
    _check_known_fields(raw, PromptConfig, what)
    check_int(raw.get("num_tokens", 8), f"{what} num_tokens", 1, MAX_PROMPT_TOKENS)
    check_json_type(raw.get("deep", False), f"{what} deep", bool)
    check_number(raw.get("init_std", 0.02), f"{what} init_std", 0.0, 1e3)
    return PromptConfig(**raw)


def _check_known_fields(raw: dict[str, Any], kind: type, what: str) -> None:
    unknown = sorted(raw.keys() - {f.name for f in dataclasses.fields(kind)})
    if unknown:
        raise ValueError(f"{what} has unknown keys {[key[:40] for key in unknown[:5]]}.")


def check_adapter_tensors(adapter: Adapter) -> None:
    """Checks the sizes the header states against the tensors, so nothing is built from a size alone.

    Every LoRA layer has a 2-D ``lora_A`` of ``parts x rank`` rows and a 2-D ``lora_B`` of
    ``rank`` columns (DoRA: a 1-D magnitude per row of B); prompt tokens are ``num_tokens``
    rows; the head has ``num_classes`` rows. A model built from the header then allocates
    nothing larger than the file's own tensors.

    Raises:
        AdapterError: naming the file and the first tensor that disagrees.
    """
    problem = _tensor_problem(adapter)
    if problem:
        raise AdapterError(adapter.path, problem)


def _tensor_problem(adapter: Adapter) -> str | None:
    tensors, config = adapter.tensors, adapter.config
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in sorted(tensors.items()):
        layer, _, leaf = key.rpartition(".")
        if is_lora_name(key):
            layers.setdefault(layer, {})[leaf] = tensor
        elif is_prompt_name(key) and (adapter.prompt is None or tensor.ndim != 2):
            return f"tensor {key!r} {tuple(tensor.shape)} is not the prompt tokens its metadata describes."
        elif is_prompt_name(key) and tensor.shape[0] != adapter.prompt.num_tokens:
            return f"tensor {key!r} has {tensor.shape[0]} tokens, metadata 'prompt_config' says {adapter.prompt.num_tokens}."
        elif layer in CLASSIFIER_NAMES and leaf in ("weight", "bias"):
            wanted = (adapter.num_classes, *tensor.shape[1:2]) if leaf == "weight" else (adapter.num_classes,)
            if tensor.ndim != (2 if leaf == "weight" else 1) or tuple(tensor.shape) != wanted:
                return (
                    f"tensor {key!r} {tuple(tensor.shape)} is no head for metadata 'num_classes' {adapter.num_classes}."
                )
        elif adapter.bias_tuning and is_bias_name(key) and tensor.ndim != 1:
            return f"tensor {key!r} {tuple(tensor.shape)} is not a bias vector."
    if adapter.num_classes and "head.weight" not in tensors:
        return f"metadata 'num_classes' is {adapter.num_classes} but the file holds no head.weight."
    if adapter.prompt is not None and not any(is_prompt_name(key) for key in tensors):
        return "metadata 'prompt_config' is set but the file holds no prompt tokens."
    if config is None:
        return f"tensor {next(iter(layers))}.lora_* but no metadata 'lora_config'." if layers else None
    if not layers:
        return "metadata 'lora_config' is set but the file holds no LoRA tensors."
    for layer, parts in layers.items():
        problem = _lora_layer_problem(layer, parts, config)
        if problem:
            return f"{layer}: {problem}"
    return None


def _lora_layer_problem(layer: str, tensors: dict[str, torch.Tensor], config: LoRAConfig) -> str | None:
    """What is wrong with one layer's ``lora_A``/``lora_B``(/``lora_magnitude``) for ``config``, or None."""
    leaves = {"lora_A", "lora_B"} | ({"lora_magnitude"} if config.use_dora else set())
    if tensors.keys() != leaves:
        return f"LoRA tensors {sorted(tensors)} are not {sorted(leaves)} (metadata 'lora_config' use_dora {config.use_dora})."
    a, b = tensors["lora_A"], tensors["lora_B"]
    parts = len(update_labels(layer, config.targets)) or 1
    rank = expected_rank(config, layer)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != parts * rank or b.shape[1] != rank or b.shape[0] % parts:
        return (
            f"LoRA tensors A {tuple(a.shape)}, B {tuple(b.shape)} do not fit {parts} update(s) of rank {rank} "
            "(metadata 'lora_config')."
        )
    magnitude = tensors.get("lora_magnitude")
    if magnitude is not None and tuple(magnitude.shape) != (b.shape[0],):
        return f"DoRA magnitude {tuple(magnitude.shape)} is not one value per row of B ({b.shape[0]})."
    return None


def expected_rank(config: LoRAConfig, layer: str) -> int:
    """The rank of ``layer``'s update under ``config`` (``rank_pattern`` by module path, else ``rank``)."""
    return config.rank_for(layer)


def resave_metadata(adapter: Adapter) -> dict[str, Any]:
    """Keywords for :func:`save_adapter` that record ``adapter``'s classes, model and extra metadata again."""
    extra = {key: value for key, value in adapter.metadata.items() if key not in _RESERVED}
    return {**extra, "class_names": adapter.class_names, "model_name": adapter.model_name}


def _decode_extra(key: str, value: str) -> Any:
    """Extra metadata is JSON when vitlora wrote it; other tools' plain strings stay strings.

    Bounded like every other value: text too long or nested too deep is refused, not decoded."""
    try:
        return decode_json(value, repr(key[:40]))
    except InvalidJSON:
        return value
