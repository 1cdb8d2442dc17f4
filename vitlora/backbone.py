"""Creating a timm backbone from the hub, from a local weights file, or randomly for tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
from torch import nn

from vitlora.files import read_state_dict
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

    ``weights``: a local ``.safetensors``/``.pth`` with timm keys, loaded strictly except the
    classifier (through timm's own filter, so positional embeddings are resized for another
    ``img_size``). Otherwise ``pretrained=True`` fetches from the timm hub as usual.
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
