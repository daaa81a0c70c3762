"""LoRA on packed layers: peft wraps any layer that declares ``packed_linear`` (lit_common.layers) like a Linear.

peft only wraps the layer types it knows; others are added per config with its custom-module API
(``LoraConfig._register_custom_module``, https://huggingface.co/docs/peft/developer_guides/custom_models).
peft's own LoRA ``Linear`` fits a packed layer as it is: it calls the base layer's forward (differentiable in
its input) and adds ``B A x``; the packed codes never change (QLoRA-style). Merging an adapter into packed
codes is not possible: re-quantize the merged model instead (quantize.py takes an adapter).
"""

from peft import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from lit_common.layers import is_packed_linear


def with_packed_layers(config: LoraConfig, model: nn.Module) -> LoraConfig:
    """``config`` able to target the packed layer types of ``model`` (changed in place, returned for chaining)."""
    packed = {type(module) for module in model.modules() if is_packed_linear(module)}
    if packed:
        config._register_custom_module({kind: LoraLinear for kind in packed})
    return config
