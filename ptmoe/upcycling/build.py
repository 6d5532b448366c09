"""Building the MoE model without a second copy of the weights.

The MoE model is created on the meta device; `assign_tensors` puts the converted tensors in as its parameters and
buffers (keeping tied weights tied), and `initialise_remaining` materialises and initialises what the conversion
does not provide (routers, non-persistent buffers) with transformers' own missing-key mechanism, seeded.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from transformers import PreTrainedModel

from .experts import _derived_seed


# --------------------------------------------------------------------------------------------------------------
# Building the MoE model without a second copy of the weights
# --------------------------------------------------------------------------------------------------------------
def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor, is_parameter: bool) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if is_parameter:
        module._parameters[attr] = tensor
    else:
        module._buffers[attr] = tensor


def assign_tensors(model: PreTrainedModel, tensors: Mapping[str, torch.Tensor]) -> None:
    """Put `tensors` into a meta-device `model` as its parameters/buffers, keeping the model's tied weights tied."""
    replaced: dict[int, nn.Parameter] = {}
    for name, old in model.named_parameters(remove_duplicate=False):
        if name not in tensors:
            continue
        if id(old) in replaced:  # a tied weight: the model shares one Parameter between two names
            new = replaced[id(old)]
            if tensors[name].data_ptr() != new.data_ptr() and not torch.equal(tensors[name], new.data):
                raise ValueError(
                    f"the MoE model ties {name!r} to another weight, but the dense weights differ"
                )
        else:
            new = nn.Parameter(tensors[name], requires_grad=old.requires_grad)
            replaced[id(old)] = new
        new._is_hf_initialized = True  # transformers' init functions skip flagged tensors
        _set_tensor(model, name, new, is_parameter=True)
    for name, _ in model.named_buffers(remove_duplicate=False):
        if name in tensors:
            buffer = tensors[name]
            buffer._is_hf_initialized = True
            _set_tensor(model, name, buffer, is_parameter=False)


@torch.no_grad()
def initialise_remaining(model: PreTrainedModel, device: torch.device, dtype: torch.dtype, seed: int) -> None:
    """Materialise what the conversion did not provide (routers, non-persistent buffers) and let the model init it.

    This is transformers' own mechanism for missing keys: loaded tensors carry `_is_hf_initialized`, so
    `initialize_weights()` only initialises the rest (the router per `router_init`, `position_ids`, …). The global
    RNG is forked and seeded so that the result depends only on `seed`.
    """
    for name, param in list(model.named_parameters()):
        if param.is_meta:
            target = dtype if param.is_floating_point() else param.dtype
            value = torch.empty_like(param, device=device, dtype=target)
            _set_tensor(
                model, name, nn.Parameter(value, requires_grad=param.requires_grad), is_parameter=True
            )
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta:
            target = dtype if buffer.is_floating_point() else buffer.dtype
            _set_tensor(
                model, name, torch.empty_like(buffer, device=device, dtype=target), is_parameter=False
            )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_derived_seed(seed, "routers"))
        model.initialize_weights()
    for tensor in (*model.parameters(), *model.buffers()):
        tensor.__dict__.pop("_is_hf_initialized", None)
    for module in model.modules():
        module.__dict__.pop("_is_hf_initialized", None)
