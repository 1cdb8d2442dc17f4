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
from vitlora.compare import (
    Budget,
    MethodResult,
    MethodSpec,
    compare_methods,
    comparison_reading,
    load_compare_config,
    methods_from_recipes,
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

__all__ = [
    "Adapter",
    "AdapterError",
    "Budget",
    "LoRAConfig",
    "LoRALinear",
    "MethodResult",
    "MethodSpec",
    "ParameterCount",
    "__version__",
    "adapter_state_dict",
    "base_fingerprint",
    "compare_methods",
    "comparison_reading",
    "count_parameters",
    "inject_lora",
    "load_adapter",
    "load_compare_config",
    "lora_config",
    "merge_lora",
    "methods_from_recipes",
    "read_adapter",
    "remove_lora",
    "save_adapter",
]
