"""LoRA adapters on a packed model: peft wraps QuantLinear like a Linear.

peft only wraps the layer types it knows; others are added per config with its custom-module API
(``LoraConfig._register_custom_module``, https://huggingface.co/docs/peft/developer_guides/custom_models).
peft's own LoRA ``Linear`` fits QuantLinear as it is: it calls the base layer's forward (differentiable in
its input, see qlinear.py) and adds ``B A x``. Merging an adapter into the packed codes is not possible
(re-quantize the merged model instead: quantize.py takes an adapter).
"""

from peft import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear

from lit_tacq.qlinear import QuantLinear


def with_packed_layers(config: LoraConfig) -> LoraConfig:
    """``config`` able to target QuantLinear layers (returned for chaining; the config is changed in place)."""
    config._register_custom_module({QuantLinear: LoraLinear})
    return config
