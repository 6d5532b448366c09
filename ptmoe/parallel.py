"""ptmoe models on more than one device: DeepSpeed ZeRO-3 leaf modules, FSDP wrapping units, accelerate recipes.

Tensor parallelism and FSDP2 through transformers' own engine need nothing from here: the plans live on the configs
(`MoeBertConfig.base_model_tp_plan`, `base_model_fsdp_plan`, and the MoE-T5 equivalents), so

    model = MoeBertForMaskedLM.from_pretrained(path, distributed_config=DistributedConfig(tp_size=2))

under `torchrun` shards attention, dense FFNs and every expert, and keeps routers replicated. This module serves the
other engines, which wrap a model after it is built:

- DeepSpeed ZeRO-3 partitions parameters per module and gathers them in a pre-forward hook. A MoE block calls only
  the experts that got tokens, so ranks would gather different experts and wait on each other forever; marking
  the whole block as a ZeRO-3 *leaf* makes DeepSpeed gather all its experts at once (`set_zero3_leaf_modules`, or
  accelerate's `deepspeed_moe_layer_cls_names: SparseMoeBlock`, `ACCELERATE_MOE_LAYER_CLS_NAMES`).
- FSDP (accelerate, or `torch.distributed.fsdp.fully_shard` by hand) must wrap whole layers (`fsdp_layer_class_names`),
  never single experts, and FSDP2 must reduce a zero gradient for experts a rank did not use
  (`reduce_unused_expert_gradients`, done automatically by `from_pretrained(distributed_config=...)`).

Ready accelerate config files: `examples/accelerate/` (docs/distributed.md).
"""

from __future__ import annotations

import torch
from torch import nn

from .models.moe import SparseMoeBlock, reduce_unused_expert_gradients

# The value of accelerate's `deepspeed_moe_layer_cls_names` (config file key under `deepspeed_config`, or
# `accelerate launch --deepspeed_moe_layer_cls_names`) for every ptmoe model.
ACCELERATE_MOE_LAYER_CLS_NAMES = SparseMoeBlock.__name__

# The layer classes FSDP wraps as one unit (router and all experts together), per model type.
FSDP_LAYER_CLASS_NAMES = {"moe_bert": "MoeBertLayer", "moe_t5": "MoeT5Block"}


def moe_leaf_module_classes(model: nn.Module) -> list[type[nn.Module]]:
    """The classes of `model`'s MoE blocks, in the order met: the modules DeepSpeed ZeRO-3 must treat as leaves.

    Args:
        model (`nn.Module`): a ptmoe model, possibly wrapped (PEFT, DDP).

    Raises:
        ValueError: when `model` has no `SparseMoeBlock` (a dense model needs no leaf modules).
    """
    classes: list[type[nn.Module]] = []
    for module in model.modules():
        if isinstance(module, SparseMoeBlock) and type(module) not in classes:
            classes.append(type(module))
    if not classes:
        raise ValueError(
            f"{type(model).__name__} has no SparseMoeBlock: there is no MoE block to mark as a ZeRO-3 leaf "
            "(a dense model runs under ZeRO-3 without leaf modules)."
        )
    return classes


def set_zero3_leaf_modules(model: nn.Module) -> list[type[nn.Module]]:
    """Mark every MoE block of `model` as a DeepSpeed ZeRO-3 leaf module (before `deepspeed.initialize` /
    `accelerator.prepare`); returns the classes marked.

    Args:
        model (`nn.Module`): a ptmoe model.

    Raises:
        ImportError: when DeepSpeed is not installed.
        ValueError: when `model` has no MoE block.
    """
    classes = moe_leaf_module_classes(model)
    try:
        from deepspeed.utils import set_z3_leaf_modules
    except ImportError as error:
        raise ImportError(
            "set_zero3_leaf_modules needs DeepSpeed: `pip install deepspeed` (or, with accelerate, set "
            f"`deepspeed_moe_layer_cls_names: {ACCELERATE_MOE_LAYER_CLS_NAMES}` and let accelerate do it)."
        ) from error
    set_z3_leaf_modules(model, classes)
    return classes


def fsdp_layer_class_names(model: nn.Module) -> list[str]:
    """The layer class names FSDP should wrap one unit each (accelerate's `fsdp_transformer_layer_cls_to_wrap`).

    Args:
        model (`nn.Module`): a ptmoe model (its `config.model_type` picks the family).

    Raises:
        ValueError: for a model that is not a ptmoe model.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FSDP_LAYER_CLASS_NAMES:
        raise ValueError(
            f"fsdp_layer_class_names knows the ptmoe model types {sorted(FSDP_LAYER_CLASS_NAMES)}, got "
            f"{model_type!r} ({type(model).__name__})"
        )
    return [FSDP_LAYER_CLASS_NAMES[model_type]]


def all_reduce_vectors(vectors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Sum each named vector over data-parallel ranks (a no-op without an initialised process group).

    Every rank must call this at the same event: it is a collective operation.
    """
    if not (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    ):
        return vectors
    names = list(vectors)
    sizes = [vectors[name].numel() for name in names]
    # gloo reduces CPU tensors, nccl CUDA tensors: `device` is the Trainer's device for this rank.
    flat = torch.cat([vectors[name] for name in names]).to(device)
    torch.distributed.all_reduce(flat)
    return dict(zip(names, flat.cpu().double().split(sizes), strict=True))


__all__ = [
    "ACCELERATE_MOE_LAYER_CLS_NAMES",
    "all_reduce_vectors",
    "FSDP_LAYER_CLASS_NAMES",
    "fsdp_layer_class_names",
    "moe_leaf_module_classes",
    "reduce_unused_expert_gradients",
    "set_zero3_leaf_modules",
]
