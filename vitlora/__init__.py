"""vitlora: LoRA for timm Vision Transformers, with exact merges and shareable adapter files."""

__version__ = "0.1.0"

from vitlora.adapter import (
    Adapter,
    AdapterError,
    base_fingerprint,
    load_adapter,
    read_adapter,
    save_adapter,
)
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
from vitlora.memory import SavedTensor, activation_bytes, saved_for_backward

__all__ = [
    "Adapter",
    "AdapterError",
    "LoRAConfig",
    "LoRALinear",
    "ParameterCount",
    "SavedTensor",
    "__version__",
    "activation_bytes",
    "adapter_state_dict",
    "base_fingerprint",
    "count_parameters",
    "inject_lora",
    "load_adapter",
    "lora_config",
    "merge_lora",
    "read_adapter",
    "remove_lora",
    "save_adapter",
    "saved_for_backward",
]
