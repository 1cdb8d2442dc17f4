"""From a training checkpoint to an adapter file: what ``vitlora export`` does."""

from __future__ import annotations

import os
from pathlib import Path

from vitlora.adapter import AdapterError, save_adapter
from vitlora.backbone import weights_source
from vitlora.training.module import ImageClassifier


def export_adapter(ckpt_path: str | os.PathLike, output: str | os.PathLike, weights: str | None = None) -> Path:
    """Writes the adapter a LoRA, linear or prompt/bias run trained, as one safetensors file.

    Args:
        ckpt_path: a ``vitlora fit`` checkpoint (``last.ckpt`` or a best one).
        output: the adapter file to write (atomically).
        weights: a local base weights file, when the checkpoint's recorded source moved.

    Returns:
        The path written.

    Raises:
        AdapterError: no such checkpoint, its base cannot be rebuilt, or a full fine-tuning run
            (which has no adapter to export).
    """
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise AdapterError(ckpt_path, "no such checkpoint.")
    overrides = {"weights": weights} if weights else {}
    try:
        module = ImageClassifier.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True, **overrides)
    except FileNotFoundError as error:
        raise AdapterError(
            ckpt_path, f"{error} The checkpoint rebuilds its frozen base from it: pass --weights BASE_FILE."
        ) from error
    hp = module.hparams
    if hp.method == "full":
        raise AdapterError(ckpt_path, "a 'full' run trains every weight; it has no adapter to export.")
    model_kwargs = dict(hp.model_kwargs or {})
    if hp.img_size:
        model_kwargs["img_size"] = hp.img_size
    return save_adapter(
        module.model,
        output,
        class_names=module.class_names,
        model_name=hp.backbone,
        model_kwargs=model_kwargs,
        base_weights=weights_source(hp.weights, hp.backbone),
    )
