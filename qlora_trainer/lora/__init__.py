"""LoRA adapters: the layer, injection, PEFT-format save/load, merging, several adapters on one base.

- ``layer.py``: ``LoRALinear`` (module replacement around ``nn.Linear`` / NF4 ``Linear4bit``)
- ``dora.py``: DoRA's weight norm and forward
- ``base.py``: the frozen base layer's dense weight (via ``kernels.base_weight``), frozen ``nn.Linear`` builder
- ``inject.py``: ``inject_lora``, ``trainable_parameters``, ``lora_param_groups`` (LoRA+)
- ``peft_format.py``: ``save_adapter`` / ``load_adapter`` (PEFT's directory format)
- ``merge.py``: ``merge_lora`` (dense 16-bit model for deployment)
- ``multi.py``: switch / disable / merge / unmerge / delete / hot-swap adapters
- ``weights.py``: an adapter's tensors apart from a model (``AdapterWeights``)
- ``combine.py``: several adapters -> one (PEFT's ``add_weighted_adapter`` methods)
- ``loading.py``: base + tokenizer + adapters from adapter directories (``generate``, ``merge``)
"""

from qlora_trainer.lora.inject import inject_lora, lora_param_groups, trainable_parameters
from qlora_trainer.lora.layer import AdapterSpec, LoRALinear
from qlora_trainer.lora.loading import LoadedModel, load_with_adapters
from qlora_trainer.lora.merge import merge_lora
from qlora_trainer.lora.multi import (active_adapter, adapter_names, delete_adapter, disable_adapters,
                                      hotswap_adapter, lora_layers, merge_adapter, prepare_hotswap,
                                      set_active_adapter, unmerge_adapter)
from qlora_trainer.lora.peft_format import load_adapter, read_adapter, read_adapter_config, save_adapter

__all__ = [
    "AdapterSpec", "LoadedModel", "LoRALinear", "active_adapter", "adapter_names", "delete_adapter",
    "disable_adapters", "hotswap_adapter", "inject_lora", "load_adapter", "load_with_adapters", "lora_layers",
    "lora_param_groups", "merge_adapter", "merge_lora", "prepare_hotswap", "read_adapter", "read_adapter_config",
    "save_adapter", "set_active_adapter",
    "trainable_parameters", "unmerge_adapter",
]
