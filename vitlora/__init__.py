"""vitlora: LoRA, visual prompt tokens and bias tuning for timm Vision Transformers, with exact merges
and shareable adapter files."""

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
from vitlora.compare import (
    Budget,
    MethodResult,
    MethodSpec,
    compare_methods,
    comparison_reading,
    load_compare_config,
    methods_from_recipes,
)
from vitlora.inspection import AdapterSummary, UpdateStats, inspect_adapter, write_update_heatmap
from vitlora.lora import (
    LoRAConfig,
    LoRALinear,
    inject_lora,
    lora_config,
    merge_lora,
    remove_lora,
)
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

__all__ = [
    "Adapter",
    "AdapterError",
    "AdapterSummary",
    "Budget",
    "ExportError",
    "LoRAConfig",
    "LoRALinear",
    "MethodResult",
    "MethodSpec",
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
    "base_fingerprint",
    "build_model_with_adapter",
    "compare_methods",
    "comparison_reading",
    "convert_adapter",
    "count_parameters",
    "enable_bias_tuning",
    "export_onnx",
    "export_peft",
    "freeze_base",
    "import_peft",
    "inject_lora",
    "inspect_adapter",
    "load_adapter",
    "load_compare_config",
    "lora_config",
    "merge_adapter",
    "merge_lora",
    "methods_from_recipes",
    "prompt_config",
    "read_adapter",
    "read_peft",
    "remove_lora",
    "remove_prompt_tokens",
    "save_adapter",
    "saved_for_backward",
    "write_update_heatmap",
]
