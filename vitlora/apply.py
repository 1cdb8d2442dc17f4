"""Putting an adapter on a model: validate first, adapt, copy tensors, and roll back on any failure.

A model is never left half-adapted: :func:`apply_adapter` either returns the adapted model or
raises :class:`~vitlora.adapter.AdapterError` with the model exactly as it was.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager

import timm
import torch
from torch import nn

from vitlora.adapter import (
    Adapter,
    AdapterError,
    architecture_of,
    base_config_differences,
    base_fingerprint,
    read_adapter,
)
from vitlora.backbone import create_backbone, recorded_weights
from vitlora.lora import inject_lora, lora_modules
from vitlora.prompts import add_prompt_tokens, check_promptable, prompt_config
from vitlora.rollback import rollback_on_error
from vitlora.targets import LoRASite, classifier_names, classifier_prefixes, find_lora_sites
from vitlora.trainable import (
    adapter_state_dict,
    bias_tuning_enabled,
    enable_bias_tuning,
    freeze_base,
    is_bias_name,
)

MAX_DEPTH = 1024  # blocks; timm's deepest ViT has 48
MAX_BASE_PARAMETERS = 10**10  # larger than any timm model; a model_kwargs above it is damage, not a model


def load_adapter(model: nn.Module, path: str | os.PathLike, *, check_base: bool = True) -> nn.Module:
    """Adapts a plain timm model as the file says (LoRA, prompt tokens, bias tuning) and loads its tensors.

    The classifier is resized to the adapter's classes when needed.

    Args:
        model: a plain timm model with the base weights the adapter was trained on.
        path: the adapter file.
        check_base: check the base-weight fingerprint (the architecture is always checked).

    Returns:
        ``model``, adapted in place.

    Raises:
        AdapterError: an unusable file, a foreign architecture, other base weights, or missing /
            unexpected / misshapen tensors; the model is then left exactly as it was.
    """
    return apply_adapter(model, read_adapter(path), check_base=check_base)


def build_model_with_adapter(
    source: str | os.PathLike | Adapter, weights: str | os.PathLike | None = None, *, model_name: str | None = None
) -> tuple[nn.Module, Adapter]:
    """The model an adapter describes, ready for inference (eval mode), and the adapter.

    The base is the timm model the adapter records (with its ``model_kwargs``) on its
    pretrained weights; the base-weight fingerprint is checked as in :func:`load_adapter`.

    Args:
        source: an adapter file, or an :class:`Adapter` already read (e.g. from a PEFT folder).
        weights: a local base weights file (offline machines); default: the local file the adapter
            records, if it is still where it was, else the timm hub.
        model_name: the timm model, for adapters that record none.

    Returns:
        ``(model, adapter)``, the model in eval mode.

    Raises:
        AdapterError: the adapter cannot be used or its metadata cannot build a base.
        WeightsUnavailable: the base weights cannot be found.
    """
    adapter = source if isinstance(source, Adapter) else read_adapter(source)
    return apply_adapter(build_base(adapter, weights, model_name=model_name), adapter).eval(), adapter


def build_base(
    adapter: Adapter, weights: str | os.PathLike | None = None, *, model_name: str | None = None
) -> nn.Module:
    """The plain timm model ``adapter`` belongs on, as :func:`build_model_with_adapter` describes it."""
    name = model_name or adapter.model_name
    if not name:
        raise AdapterError(adapter.path, "records no timm model name to build the base model from: name one.")
    if not isinstance(name, str) or len(name) > 200 or not timm.is_model(name):
        raise AdapterError(adapter.path, f"records timm model {name!r:.80}, unknown to timm {timm.__version__}.")
    check_buildable(adapter, name)
    if weights is None:  # the local file the adapter was trained on, when it is still where it was
        weights = recorded_weights(adapter.metadata.get("base_weights"), str(adapter.path))
    return create_backbone(name, adapter.num_classes, weights=weights, **adapter.model_kwargs)


def check_buildable(adapter: Adapter, name: str) -> None:
    """Builds the recorded base on the meta device first (no memory): timm must accept the adapter's
    ``model_kwargs``, the result must not exceed ``MAX_BASE_PARAMETERS`` and must be the base it records."""
    kwargs = adapter.model_kwargs
    recorded = adapter.base_config or {}
    clashes = [
        f"{key}={str(value)[:40]} but base_config {key}={recorded[key]}"
        for key, value in kwargs.items()
        if key in recorded and value != recorded[key] and [value] * 2 != recorded[key]  # img_size 32 is [32, 32]
    ]
    depth = kwargs.get("depth", 1)
    if clashes or not (isinstance(depth, int) and 0 < depth <= MAX_DEPTH):  # blocks cost time even on meta
        raise AdapterError(
            adapter.path, f"metadata 'model_kwargs' {str(kwargs)[:200]} disagree with the base it records: {clashes}."
        )
    try:
        with torch.device("meta"):
            skeleton = timm.create_model(name, pretrained=False, num_classes=adapter.num_classes, **kwargs)
    except Exception as error:  # timm's constructors raise TypeError, AssertionError, ValueError...: all mean this
        raise AdapterError(
            adapter.path,
            f"metadata 'model_kwargs' {str(kwargs)[:200]} do not build timm model {name!r} "
            f"({type(error).__name__}: {str(error)[:200]}).",
        ) from error
    size = sum(parameter.numel() for parameter in skeleton.parameters())
    if size > MAX_BASE_PARAMETERS:
        raise AdapterError(
            adapter.path, f"metadata 'model_kwargs' {str(kwargs)[:200]} make {name!r} a model of {size:,} parameters."
        )
    check_base_config(skeleton, adapter)


def check_base_config(model: nn.Module, adapter: Adapter) -> None:
    """Refuses a model whose forward pass differs from the adapter's base (heads, prefix tokens, pooling, norms)."""
    differences = base_config_differences(adapter.base_config, model) if adapter.base_config else []
    if differences:
        raise AdapterError(
            adapter.path,
            f"the model is not the base the adapter was trained on: {', '.join(differences[:4])} (adapter != model).",
        )


def apply_adapter(model: nn.Module, adapter: Adapter, *, check_base: bool = True) -> nn.Module:
    """:func:`load_adapter` for an adapter already read (from a vitlora file or another tool's format).

    Args:
        model: a plain timm model.
        adapter: what :func:`~vitlora.read_adapter` or :func:`~vitlora.read_peft` returned.
        check_base: check the base-weight fingerprint.

    Returns:
        ``model``, adapted in place.

    Raises:
        AdapterError: as :func:`load_adapter`; the model is then left exactly as it was.
    """
    check_compatible(model, adapter, check_base)
    lora_sites_for(model, adapter)  # its LoRA config must fit before anything changes
    if adapter.prompt is not None:
        try:
            check_promptable(model)
        except ValueError as error:
            raise AdapterError(adapter.path, f"its prompt tokens do not fit this model: {error}") from error
    heads = classifier_prefixes(model)
    tuned_biases = [n for n, _ in model.named_parameters() if is_bias_name(n) and not n.startswith(heads)]
    with rollback_on_error(model, values=tuned_biases if adapter.bias_tuning else ()):
        with callers_rng_kept(model):  # injecting draws random A and tokens
            if getattr(model, "num_classes", None) != adapter.num_classes:
                reset_classifier_like(model, adapter.num_classes)
            if adapter.config is not None:
                inject_lora(model, adapter.config)
            if adapter.prompt is not None:
                add_prompt_tokens(model, adapter.prompt)
            if adapter.bias_tuning:
                enable_bias_tuning(model)
            freeze_base(model)  # a head-only adapter is a linear probe
        copy_adapter_tensors(adapter_state_dict(model), adapter)
    return model


def lora_sites_for(model: nn.Module, adapter: Adapter) -> list[LoRASite]:
    """The layers the adapter's LoRA config targets on this model (none without LoRA), or an AdapterError."""
    if adapter.config is None:
        return []
    try:
        return find_lora_sites(model, adapter.config.targets, adapter.config.blocks)
    except ValueError as error:
        raise AdapterError(adapter.path, f"its LoRA config does not fit this model: {error}") from error


def callers_rng_kept(model: nn.Module) -> AbstractContextManager:
    """Random initialisation that the adapter's tensors overwrite must not shift the caller's RNG streams."""
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    return torch.random.fork_rng(devices=devices)


def reset_classifier_like(model: nn.Module, num_classes: int) -> None:
    """timm's reset_classifier, keeping the old head's device and dtype (older timm makes fp32 CPU heads)."""
    old = {name: getattr(model, name) for name in classifier_names(model)}
    like = next((p for head in old.values() for p in head.parameters()), None)
    if like is None:
        like = next(model.parameters())
    model.reset_classifier(num_classes)
    for name in old:
        getattr(model, name).to(device=like.device, dtype=like.dtype)


def check_compatible(model: nn.Module, adapter: Adapter, check_base: bool) -> None:
    """Refuses an already adapted model, another architecture or (with ``check_base``) other base weights."""
    adapted = [
        label
        for label, present in (
            ("LoRA layers", lora_modules(model)),
            ("prompt tokens", prompt_config(model)),
            ("bias tuning", bias_tuning_enabled(model)),
        )
        if present
    ]
    if adapted:
        raise AdapterError(
            adapter.path, f"the model already has {' and '.join(adapted)}; load onto a plain timm model."
        )
    architecture = architecture_of(model)
    if adapter.architecture and architecture and adapter.architecture != architecture:
        raise AdapterError(
            adapter.path,
            f"adapter is for architecture {adapter.architecture!r}, the model is {architecture!r}.",
        )
    check_base_config(model, adapter)
    if check_base and adapter.base_fingerprint is not None:
        fingerprint = base_fingerprint(model, exclude_biases=adapter.bias_tuning)
        if fingerprint != adapter.base_fingerprint:
            raise AdapterError(
                adapter.path,
                "the model's base weights differ from those the adapter was trained on "
                f"(fingerprint {fingerprint[:12]}, adapter expects {adapter.base_fingerprint[:12]}). "
                "Load the same pretrained weights, or pass check_base=False to override.",
            )


def copy_adapter_tensors(expected: dict[str, torch.Tensor], adapter: Adapter) -> None:
    """Copies the file's tensors into ``expected`` (key -> tensor to fill) after checking keys and shapes."""
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
