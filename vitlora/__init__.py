"""vitlora: LoRA, visual prompt tokens and bias tuning for timm Vision Transformers, with exact merges
and shareable adapter files.

This namespace is the torch-only library: adapt a model, train it in any loop, save, load, merge,
serve many adapters on one base, convert to and from PEFT. The applications built on it live in
their own subpackages: ``vitlora.training`` (Lightning), ``vitlora.compare`` and ``vitlora.cli``.
"""

from typing import TYPE_CHECKING

from vitlora._version import __version__

# Imported on first use (PEP 562): `import vitlora` and the `vitlora` command's --help stay free of torch and timm.
_EXPORTS = {
    "Adapter": "vitlora.adapter",
    "AdapterError": "vitlora.adapter",
    "base_fingerprint": "vitlora.adapter",
    "read_adapter": "vitlora.adapter",
    "save_adapter": "vitlora.adapter",
    "apply_adapter": "vitlora.apply",
    "build_model_with_adapter": "vitlora.apply",
    "load_adapter": "vitlora.apply",
    "create_backbone": "vitlora.backbone",
    "classify": "vitlora.inference",
    "AdapterSummary": "vitlora.inspection",
    "UpdateStats": "vitlora.inspection",
    "inspect_adapter": "vitlora.inspection",
    "write_update_heatmap": "vitlora.inspection",
    "LoRAConfig": "vitlora.lora",
    "LoRAConv2d": "vitlora.lora",
    "LoRALinear": "vitlora.lora",
    "inject_lora": "vitlora.lora",
    "lora_config": "vitlora.lora",
    "merge_lora": "vitlora.lora",
    "remove_lora": "vitlora.lora",
    "SavedTensor": "vitlora.memory",
    "activation_bytes": "vitlora.memory",
    "saved_for_backward": "vitlora.memory",
    "ExportError": "vitlora.merge",
    "export_onnx": "vitlora.merge",
    "merge_adapter": "vitlora.merge",
    "MixedLogits": "vitlora.multi",
    "MultiAdapter": "vitlora.multi",
    "convert_adapter": "vitlora.peft_format",
    "export_peft": "vitlora.peft_format",
    "import_peft": "vitlora.peft_format",
    "read_peft": "vitlora.peft_format",
    "PromptConfig": "vitlora.prompts",
    "add_prompt_tokens": "vitlora.prompts",
    "prompt_config": "vitlora.prompts",
    "remove_prompt_tokens": "vitlora.prompts",
    **dict.fromkeys(
        ["ParameterCount", "adapter_state_dict", "count_parameters", "enable_bias_tuning", "freeze_base"],
        "vitlora.trainable",
    ),
}

if TYPE_CHECKING:
    from vitlora.adapter import Adapter, AdapterError, base_fingerprint, read_adapter, save_adapter
    from vitlora.apply import apply_adapter, build_model_with_adapter, load_adapter
    from vitlora.backbone import create_backbone
    from vitlora.inference import classify
    from vitlora.inspection import AdapterSummary, UpdateStats, inspect_adapter, write_update_heatmap
    from vitlora.lora import LoRAConfig, LoRAConv2d, LoRALinear, inject_lora, lora_config, merge_lora, remove_lora
    from vitlora.memory import SavedTensor, activation_bytes, saved_for_backward
    from vitlora.merge import ExportError, export_onnx, merge_adapter
    from vitlora.multi import MixedLogits, MultiAdapter
    from vitlora.peft_format import convert_adapter, export_peft, import_peft, read_peft
    from vitlora.prompts import PromptConfig, add_prompt_tokens, prompt_config, remove_prompt_tokens
    from vitlora.trainable import (
        ParameterCount,
        adapter_state_dict,
        count_parameters,
        enable_bias_tuning,
        freeze_base,
    )


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vitlora' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "Adapter",
    "AdapterError",
    "AdapterSummary",
    "ExportError",
    "LoRAConfig",
    "LoRAConv2d",
    "LoRALinear",
    "MixedLogits",
    "MultiAdapter",
    "ParameterCount",
    "PromptConfig",
    "SavedTensor",
    "UpdateStats",
    "__version__",
    "activation_bytes",
    "adapter_state_dict",
    "add_prompt_tokens",
    "apply_adapter",
    "base_fingerprint",
    "build_model_with_adapter",
    "classify",
    "convert_adapter",
    "count_parameters",
    "create_backbone",
    "enable_bias_tuning",
    "export_onnx",
    "export_peft",
    "freeze_base",
    "import_peft",
    "inject_lora",
    "inspect_adapter",
    "load_adapter",
    "lora_config",
    "merge_adapter",
    "merge_lora",
    "prompt_config",
    "read_adapter",
    "read_peft",
    "remove_lora",
    "remove_prompt_tokens",
    "save_adapter",
    "saved_for_backward",
    "write_update_heatmap",
]
