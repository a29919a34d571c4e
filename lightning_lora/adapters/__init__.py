"""Everything LoRA and nothing model-specific: spec, injection, files, merging, and the utility API."""

from lightning_lora.adapters.api import (
    LoRAModelWrapper,
    apply_lora_to_model,
    get_lora_config,
    load_lora_weights,
    merge_lora_weights,
    print_trainable_parameters,
    save_lora_weights,
)
from lightning_lora.adapters.inject import (
    ParamCount,
    check_targets,
    count_parameters,
    format_adapter_summary,
    inject_adapter,
    layer_names_summary,
)
from lightning_lora.adapters.io import (
    adapter_state,
    load_adapter_state,
    load_peft_dir,
    read_adapter_file,
    read_adapters,
    read_peft_dir,
    read_tensor_file,
    save_adapter_file,
    save_peft_dir,
)
from lightning_lora.adapters.merge import merge_adapter, merge_and_unload, set_adapter_scale, unmerge_adapter
from lightning_lora.adapters.spec import AdapterSpec

__all__ = [
    "AdapterSpec",
    "LoRAModelWrapper",
    "ParamCount",
    "adapter_state",
    "apply_lora_to_model",
    "check_targets",
    "count_parameters",
    "format_adapter_summary",
    "get_lora_config",
    "inject_adapter",
    "layer_names_summary",
    "load_adapter_state",
    "load_lora_weights",
    "load_peft_dir",
    "merge_adapter",
    "merge_and_unload",
    "merge_lora_weights",
    "print_trainable_parameters",
    "read_adapter_file",
    "read_adapters",
    "read_peft_dir",
    "read_tensor_file",
    "save_adapter_file",
    "save_lora_weights",
    "save_peft_dir",
    "set_adapter_scale",
    "unmerge_adapter",
]
