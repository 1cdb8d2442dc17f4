"""Creating a timm backbone from the hub, from a local weights file, or randomly for tests."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import timm
from torch import nn

from vitlora.files import file_sha256, read_state_dict
from vitlora.targets import CLASSIFIER_NAMES


class WeightsUnavailable(RuntimeError):
    """Pretrained weights could not be fetched and no local file was given."""


def create_backbone(
    name: str,
    num_classes: int,
    *,
    weights: str | Path | None = None,
    pretrained: bool = True,
    **model_kwargs: Any,
) -> nn.Module:
    """A timm model with a fresh ``num_classes`` head on pretrained weights.

    Args:
        name: the timm model name with its pretrained tag (``vit_tiny_patch16_224.augreg_in21k_ft_in1k``).
        num_classes: classes of the new head.
        weights: a local ``.safetensors``/``.pth`` with timm keys, loaded strictly except the
            classifier (through timm's own filter, so positional embeddings are resized for another
            ``img_size``); machines without internet need it.
        pretrained: without ``weights``, fetch the pretrained weights from the timm hub (False: random).
        **model_kwargs: more ``timm.create_model`` arguments (``img_size``, ``drop_path_rate``...).

    Returns:
        The model, in training mode as timm makes it.

    Raises:
        ValueError: an unknown model name or an unusable weights file (naming it).
        WeightsUnavailable: the hub cannot be reached and no local weights were given.
    """
    if not timm.is_model(name):
        raise ValueError(f"Unknown timm model {name!r}; timm.list_models('vit_*') lists the ViTs.")
    if weights is not None:
        path = Path(weights)
        state = read_state_dict(path)  # validates the file and never unpickles
        head = state.get("head.weight")
        file_classes = int(head.shape[0]) if head is not None else 0
        overlay = {"file": str(path), "num_classes": file_classes}
        try:
            model = timm.create_model(
                name,
                pretrained=True,
                pretrained_cfg_overlay=overlay,
                num_classes=file_classes,
                **model_kwargs,
            )
        except RuntimeError as error:
            raise ValueError(f"{path}: does not match timm model {name!r}: {error}") from error
        model.reset_classifier(num_classes)
    elif pretrained:
        cached = hub_cached_file(name)
        if cached is not None:  # no network round trip for weights already on this machine
            return create_backbone(name, num_classes, weights=cached, **model_kwargs)
        offline = hub_unreachable(name)
        if offline:
            raise WeightsUnavailable(
                f"No pretrained weights for {name!r} on this machine and {offline}. Pass a local file with "
                f"timm's keys: --model.weights path/to/{name}.safetensors (or .pth) to fit, --weights to classify or merge."
            )
        try:
            model = timm.create_model(name, pretrained=True, num_classes=num_classes, **model_kwargs)
        except (
            OSError,
            RuntimeError,
        ) as error:  # network and hub errors (huggingface_hub's are OSErrors)
            raise WeightsUnavailable(
                f"Could not fetch pretrained weights for {name!r} ({type(error).__name__}: {error}). "
                "On a machine without internet pass a local file with timm's keys: "
                f"--model.weights path/to/{name}.safetensors (or .pth) to fit, --weights to classify or merge."
            ) from error
    else:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, **model_kwargs)
    zero_init_heads(model)
    return model


def zero_init_heads(model: nn.Module) -> None:
    """A new head starts at zero: uniform predictions, and no random pull on the backbone."""
    for name in CLASSIFIER_NAMES:
        head = getattr(model, name, None)
        if isinstance(head, nn.Linear):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)


def hub_cached_file(name: str) -> Path | None:
    """The timm weights of ``name`` in the local Hugging Face cache, if a download put them there."""
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id:
        return None
    from huggingface_hub import try_to_load_from_cache

    for filename in filter(None, (cfg.hf_hub_filename, "model.safetensors", "open_clip_model.safetensors")):
        found = try_to_load_from_cache(cfg.hf_hub_id, filename)
        if isinstance(found, str) and found.endswith(".safetensors"):
            return Path(found)
    return None


OFFLINE_VALUES = {"1", "on", "yes", "true"}


def hub_unreachable(name: str, timeout: float = 3.0) -> str | None:
    """Why the timm hub cannot serve ``name`` now, or None: said at once instead of after minutes of retries.

    Offline means ``HF_HUB_OFFLINE`` set, or no connection to huggingface.co within ``timeout``
    seconds (skipped behind an HTTPS proxy, which a direct connection does not test)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in OFFLINE_VALUES:
        return "HF_HUB_OFFLINE is set"
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id or any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy")):
        return None
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as error:
        return f"{host} is unreachable ({error})"
    return None


def weights_source(weights: str | Path | None, name: str) -> dict[str, str]:
    """What an adapter records about its base: the hub tag, or the local file's absolute path, name and SHA-256."""
    if weights is None:
        return {"hub": name}
    path = Path(weights).resolve()
    return {"file": path.name, "path": str(path), "sha256": file_sha256(path)}


def recorded_weights(source: dict[str, str] | None, owner: str) -> Path | None:
    """The local base file a :func:`weights_source` record names, if it is still there; None for a hub base.

    Raises:
        WeightsUnavailable: the recorded file is gone (or changed), naming it and the ``--weights`` way out.
    """
    if not isinstance(source, dict) or "path" not in source:
        return None
    path = Path(source["path"])
    if path.is_file() and path.stat().st_size > 0:
        return path
    raise WeightsUnavailable(
        f"{owner}: trained on the local base weights {source.get('file')} "
        f"(sha256 {str(source.get('sha256'))[:16]}...), no longer at {path}: pass --weights path/to/{source.get('file')}."
    )
