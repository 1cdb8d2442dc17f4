"""vitlora: LoRA for timm Vision Transformers, with exact merges and shareable adapter files."""

__version__ = "0.1.0"

from vitlora.adapter import (
    Adapter,
    AdapterError,
    base_fingerprint,
    build_model_with_adapter,
    load_adapter,
    read_adapter,
    save_adapter,
)
from vitlora.inspection import AdapterSummary, UpdateStats, inspect_adapter, write_update_heatmap
from vitlora.lora import (
    LoRAConfig,
    LoRALinear,
    ParameterCount,
    adapter_state_dict,
    count_parameters,
    inject_lora,
    lora_config,
    merge_lora,
    remove_lora,
)
from vitlora.merge import ExportError, export_onnx, merge_adapter
from vitlora.multi import MixedLogits, MultiAdapter

__all__ = [
    "Adapter",
    "AdapterError",
    "AdapterSummary",
    "ExportError",
    "LoRAConfig",
    "LoRALinear",
    "MixedLogits",
    "MultiAdapter",
    "ParameterCount",
    "UpdateStats",
    "__version__",
    "adapter_state_dict",
    "base_fingerprint",
    "build_model_with_adapter",
    "count_parameters",
    "export_onnx",
    "inject_lora",
    "inspect_adapter",
    "load_adapter",
    "lora_config",
    "merge_adapter",
    "merge_lora",
    "read_adapter",
    "remove_lora",
    "save_adapter",
    "write_update_heatmap",
]
