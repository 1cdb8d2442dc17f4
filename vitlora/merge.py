"""Deployment: an adapter folded into its base as one plain timm model, saved as safetensors or ONNX.

The merged model has no LoRA modules and no extra latency; it loads strictly into
``timm.create_model(model_name, num_classes=C, **model_kwargs)`` with the values its
metadata records. ONNX files are checked against torch with onnxruntime before they are
kept, so a file on disk is always one that reproduces the model.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import save_file
from torch import nn

from vitlora.adapter import Adapter, AdapterError, read_adapter
from vitlora.apply import build_model_with_adapter
from vitlora.files import atomic_write, check_output_path, file_sha256
from vitlora.lora import lora_modules, merge_lora
from vitlora.targets import input_shape
from vitlora.validation import with_payload_digest

FORMATS = ("safetensors", "onnx")
MERGED_FORMAT = "vitlora.merged"
ONNX_TOLERANCE = 1e-4  # max |onnx - torch| over float32 logits; the real ViT-Ti measured 1.1e-5 to 1.7e-5
ONNX_MAX_BYTES = 1536 * 2**20  # above this torch's exporter writes external data files; we write one file
ONNX_CHECK_BATCHES = (2, 3)  # two batch sizes: the batch axis must really be dynamic


class ExportError(RuntimeError):
    """A deployment file that could not be written, or an ONNX model that disagrees with torch."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)


def merge_adapter(
    adapter_path: str | os.PathLike,
    output: str | os.PathLike,
    *,
    weights: str | os.PathLike | None = None,
    format: str = "safetensors",
    tolerance: float = ONNX_TOLERANCE,
) -> Path:
    """Writes base + adapter as one plain model: a timm state dict (``.safetensors``) or ``.onnx``.

    The base is built as :func:`~vitlora.adapter.build_model_with_adapter` does (``weights``:
    a local base weights file). Metadata keeps the class names, the timm model name and
    kwargs, and where the weights came from (base fingerprint, adapter file and SHA-256).
    Nothing is written unless every check passes.

    Args:
        adapter_path: the adapter file.
        output: ``.safetensors`` or ``.onnx`` (with ``format``).
        weights: a local base weights file (offline machines).
        format: ``safetensors`` or ``onnx``.
        tolerance: the largest |onnx - torch| logit an ONNX export may show.

    Returns:
        ``output``.

    Raises:
        AdapterError: an unusable adapter, or one with prompt tokens (a plain model cannot hold them).
        ExportError: an ONNX export that fails its check.
    """
    if format not in FORMATS:
        raise ValueError(f"{output}: unknown format {format!r}; choose one of {', '.join(FORMATS)}.")
    output = check_output_path(output, (f".{format}",))
    if format == "onnx":
        _require_onnx_tools(output)  # before minutes of building and merging
    adapter = read_adapter(adapter_path)
    if adapter.prompt is not None:
        raise AdapterError(
            adapter.path,
            "its prompt tokens have no place in a plain timm model; keep them with load_adapter + merge_lora in torch.",
        )
    model, _ = build_model_with_adapter(adapter, weights)
    if lora_modules(model):  # a linear probe or bias-tuned adapter has nothing to fold
        merge_lora(model)
    metadata = merged_metadata(adapter)
    if format == "onnx":
        return export_onnx(model, output, metadata=metadata, tolerance=tolerance)
    tensors = {key: tensor.detach().cpu().contiguous() for key, tensor in model.state_dict().items()}
    with atomic_write(output) as tmp:
        save_file(tensors, tmp, metadata=with_payload_digest(tensors, metadata))
    return output


def merged_metadata(adapter: Adapter) -> dict[str, str]:
    """What a merged file records, as strings (both safetensors and ONNX metadata are string maps)."""
    metadata: dict[str, Any] = {
        "format": MERGED_FORMAT,
        "model_name": adapter.model_name,
        "model_kwargs": json.dumps(adapter.model_kwargs),
        "num_classes": str(adapter.num_classes),
        "class_names": json.dumps(adapter.labels),
        "lora_config": adapter.config.to_json() if adapter.config else "",
        "bias_tuning": json.dumps(adapter.bias_tuning),
        "base_fingerprint": adapter.base_fingerprint,
        "adapter_file": adapter.path.name,
        "adapter_sha256": file_sha256(adapter.path),
        "timm_version": timm.__version__,
        "torch_version": torch.__version__,
    }
    return {key: str(value) for key, value in metadata.items()}


def export_onnx(
    model: nn.Module,
    output: str | os.PathLike,
    *,
    metadata: dict[str, str] | None = None,
    tolerance: float = ONNX_TOLERANCE,
) -> Path:
    """Writes a plain (merged) eval-mode timm model as ONNX with a dynamic batch axis, verified.

    Uses torch's dynamo exporter (``torch.onnx.export(..., dynamo=True)``, which needs
    onnxscript; the TorchScript exporter fails on EVA's attention). Input ``images``: float32
    ``(batch, C, H, W)``, normalised as for the torch model; output ``logits``. Before the file
    is kept, onnxruntime runs random batches of 2 and 3 and every logit must be within
    ``tolerance`` of torch's.

    Args:
        model: a plain float32 CPU model in eval mode.
        output: the ``.onnx`` file.
        metadata: strings for the ONNX ``metadata_props``.
        tolerance: the largest |onnx - torch| logit accepted.

    Returns:
        ``output``.

    Raises:
        ExportError: a model that cannot be exported, or a failed check (no file is left).
    """
    output = check_output_path(output, (".onnx",))
    if model.training or any(p.device.type != "cpu" or p.dtype != torch.float32 for p in model.parameters()):
        raise ExportError(output, "export a float32 CPU model in eval mode: model.float().cpu().eval().")
    _require_onnx_tools(output)
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if size > ONNX_MAX_BYTES:
        raise ExportError(
            output, f"the model's {size / 2**30:.1f} GiB of weights exceed the 1.5 GiB of a single-file ONNX export."
        )
    shape = input_shape(model)
    if shape is None:
        raise ExportError(output, f"cannot tell the input size of {type(model).__name__} (no patch_embed.img_size).")
    example = _random_images(ONNX_CHECK_BATCHES[0], shape)
    try:
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            verbose=False,
        )
    except Exception as error:  # the exporter raises many types; all mean the same to the caller
        raise ExportError(output, f"torch.onnx.export failed: {error}") from error
    program.model.metadata_props.update(metadata or {})
    with atomic_write(output) as tmp:
        program.save(tmp, external_data=False)
        difference = _onnx_difference(tmp, model, shape)
        if not difference <= tolerance:
            raise ExportError(
                output,
                f"onnxruntime's logits differ from torch's by up to {difference:.3g} (tolerance {tolerance:g}); "
                "no file written.",
            )
    return output


def _require_onnx_tools(output: Path) -> None:
    missing = [name for name in ("onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(output, f"ONNX export needs {' and '.join(missing)}: pip install 'vitlora[onnx]'.")


def _onnx_difference(path: Path, model: nn.Module, shape: tuple[int, int, int]) -> float:
    """The largest |onnxruntime - torch| logit over random batches of every checked size."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for seed, batch in enumerate(ONNX_CHECK_BATCHES, start=1):
        images = _random_images(batch, shape, seed)
        with torch.inference_mode():
            expected = model(images).float()
        (logits,) = session.run(["logits"], {"images": images.numpy()})
        if tuple(logits.shape) != tuple(expected.shape):
            return float("inf")
        worst = max(worst, (torch.from_numpy(logits) - expected).abs().max().item())
    return worst


def _random_images(batch: int, shape: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))
