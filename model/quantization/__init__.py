"""Quantized checkpoints: detection from the config files (config.py) and the FP8 linear layer (fp8.py).

Only the language model's linear layers are ever quantized; the vision encoder, the projector, the
embeddings and the Mamba convolution stay in the serving dtype whatever the exclude list says, as vLLM
builds them. `replace_linears` swaps each quantized `nn.Linear` for an `Fp8Linear` before the weights are
loaded, so the forward pass (model/forward.py) calls the same attributes and needs no change.
"""

from __future__ import annotations

from torch import nn

from model.quantization.config import QuantConfig, UnsupportedQuantization, read_quant_config
from model.quantization.fp8 import Fp8Linear, fp8_layers, prepare_fp8_layers
from model.weights import official_module_name

__all__ = ["QuantConfig", "UnsupportedQuantization", "read_quant_config", "Fp8Linear", "fp8_layers",
           "prepare_fp8_layers", "replace_linears", "quantized_linear_names"]


def quantized_linear_names(model: nn.Module, config: QuantConfig) -> list[str]:
    """Native names of the language model's linears that the checkpoint quantizes (not excluded)."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.startswith("language_model."):
            if not config.is_excluded(official_module_name(name)):
                names.append(name)
    return names


def replace_linears(model: nn.Module, config: QuantConfig, make) -> list[str]:
    """Replace each quantized linear by `make(name, linear)` (an Fp8Linear); returns their native names."""
    names = quantized_linear_names(model, config)
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, make(name, getattr(parent, attr)))
    return names
