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
from vitlora.peft_format import export_peft, import_peft, read_peft

__all__ = [
    "Adapter",
    "AdapterError",
    "LoRAConfig",
    "LoRALinear",
    "ParameterCount",
    "__version__",
    "adapter_state_dict",
    "base_fingerprint",
    "count_parameters",
    "export_peft",
    "import_peft",
    "inject_lora",
    "load_adapter",
    "lora_config",
    "merge_lora",
    "read_adapter",
    "read_peft",
    "remove_lora",
    "save_adapter",
]
