"""lorakit: LoRA for PyTorch. Inject, train, save/load (PEFT format), swap, merge, batch adapters."""

from .arithmetic import CombineReport, combine_adapters
from .adapters import active_adapters, delete_adapter, disable_adapters, get_config, list_adapters, set_adapter
from .bank import AdapterBank, per_row
from .config import LoraConfig
from .errors import AdapterChangedError, AdapterFileError, LoraError, TargetError
from .hotswap import hotswap_adapter, prepare_for_compile
from .inject import ParamSummary, adapter_parameters, find_targets, inject, param_summary
from .io import AdapterFiles, adapter_state_dict, load_adapter, read_adapter, read_adapter_files, save_adapter
from .kinds import Kind, register
from .layer import LoraLayer, ModulesToSave, set_compute_dtype
from .merge import MergeReport, merge, merged, merged_state_dict, unload, unmerge
from .optim import lora_plus_groups, lora_plus_optimizer
from .quant import load_quantized  # also registers the quantized layer kinds (imports neither library)

__version__ = "0.1.0"

__all__ = [
    "AdapterBank", "AdapterChangedError", "AdapterFileError", "AdapterFiles", "CombineReport", "Kind", "LoraConfig", "LoraError", "LoraLayer", "MergeReport", "ModulesToSave",
    "ParamSummary", "TargetError", "active_adapters", "adapter_parameters", "adapter_state_dict",
    "combine_adapters", "delete_adapter", "disable_adapters", "find_targets", "get_config", "hotswap_adapter", "inject", "list_adapters",
    "load_adapter", "load_quantized", "lora_plus_groups", "lora_plus_optimizer", "merge", "merged", "merged_state_dict", "param_summary", "per_row", "prepare_for_compile", "read_adapter", "read_adapter_files",
    "register", "save_adapter", "set_adapter", "set_compute_dtype", "unload", "unmerge", "__version__",
]
