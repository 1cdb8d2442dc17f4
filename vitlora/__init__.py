"""vitlora: LoRA, visual prompt tokens and bias tuning for timm Vision Transformers, with exact merges
and shareable adapter files."""

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
    inject_lora,
    lora_config,
    merge_lora,
    remove_lora,
)
from vitlora.prompts import PromptConfig, add_prompt_tokens, prompt_config, remove_prompt_tokens
from vitlora.trainable import (
    ParameterCount,
    adapter_state_dict,
    count_parameters,
    enable_bias_tuning,
    freeze_base,
)

__all__ = [
    "Adapter",
    "AdapterError",
    "LoRAConfig",
    "LoRALinear",
    "ParameterCount",
    "PromptConfig",
    "__version__",
    "adapter_state_dict",
    "add_prompt_tokens",
    "base_fingerprint",
    "count_parameters",
    "enable_bias_tuning",
    "freeze_base",
    "inject_lora",
    "load_adapter",
    "lora_config",
    "merge_lora",
    "prompt_config",
    "read_adapter",
    "remove_lora",
    "remove_prompt_tokens",
    "save_adapter",
]
