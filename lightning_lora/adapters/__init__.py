"""Everything LoRA and nothing model-specific: spec, injection, files and formats, merging, SVD extraction,
combination, and the utility API."""

from lightning_lora.adapters.api import (
    LoRAModelWrapper,
    apply_lora_to_model,
    get_lora_config,
    get_trainable_params,
    load_lora_weights,
    lora_state_dict,
    merge_lora_weights,
    print_trainable_parameters,
    save_lora_state_dict,
    save_lora_weights,
)
from lightning_lora.adapters.combine import combine_concat, combine_svd, merge_into
from lightning_lora.adapters.extract import extract_lora, validate_lora
from lightning_lora.adapters.factors import Factors
from lightning_lora.adapters.formats import LoraSet, read_lora, write_lora_file
from lightning_lora.adapters.inject import (
    ParamCount,
    check_targets,
    count_parameters,
    format_adapter_summary,
    inject_adapter,
    layer_names_summary,
    oversized_rank,
    spatial_conv_targets,
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
    save_whole_model_dir,
)
from lightning_lora.adapters.merge import merge_adapter, merge_and_unload, set_adapter_scale, unmerge_adapter
from lightning_lora.adapters.spec import AdapterSpec
from lightning_lora.adapters.svd import factorize

__all__ = [
    "AdapterSpec",
    "Factors",
    "LoRAModelWrapper",
    "LoraSet",
    "ParamCount",
    "adapter_state",
    "apply_lora_to_model",
    "check_targets",
    "combine_concat",
    "combine_svd",
    "count_parameters",
    "extract_lora",
    "factorize",
    "format_adapter_summary",
    "get_lora_config",
    "get_trainable_params",
    "inject_adapter",
    "layer_names_summary",
    "load_adapter_state",
    "load_lora_weights",
    "load_peft_dir",
    "lora_state_dict",
    "merge_adapter",
    "merge_and_unload",
    "merge_into",
    "merge_lora_weights",
    "oversized_rank",
    "print_trainable_parameters",
    "read_adapter_file",
    "read_adapters",
    "read_lora",
    "read_peft_dir",
    "read_tensor_file",
    "save_adapter_file",
    "save_lora_state_dict",
    "save_lora_weights",
    "save_peft_dir",
    "save_whole_model_dir",
    "set_adapter_scale",
    "spatial_conv_targets",
    "unmerge_adapter",
    "validate_lora",
    "write_lora_file",
]

