"""Router weight initialisation and parameter counts of MoE models.

`init_router` initialises a router for the families' `_init_weights`; `count_parameters` gives the total and the
per-token active parameters. Part of the model code that travels inside Hub checkpoints: it imports only torch,
transformers and its sibling modules, never ``ptmoe``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import initialization as init

from .moe_block import SparseMoeBlock
from .routers import ExpertChoiceRouter, HashRouter, HierarchicalRouter, NoisyTopKRouter, TopKRouter


# --------------------------------------------------------------------------------------------------------------
# Weight initialisation shared by the families' `_init_weights`
# --------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def init_router(module: nn.Module, config, std: float) -> bool:
    """Initialise a router in place (skipping tensors already loaded); returns True when `module` is a router.

    `router_init="normal"`: N(0, std) weights; `"zeros"`: all-zero weights (uniform routing at the start, as
    used by some upcycling recipes). The hash table is rebuilt deterministically.
    """
    if isinstance(module, HashRouter):
        init.copy_(module.hash_table, HashRouter.build_table(module.hash_table.numel(), module.num_experts))
        return True
    if isinstance(module, TopKRouter):
        if config.router_init == "zeros":
            init.zeros_(module.weight)
        else:
            init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, NoisyTopKRouter):
            init.zeros_(
                module.noise_weight
            )  # softplus(0) ≈ 0.69: unit-scale noise at the start, learned after
        if isinstance(module, HierarchicalRouter):  # the group gate starts like the expert gate
            if config.router_init == "zeros":
                init.zeros_(module.group_weight)
            else:
                init.normal_(module.group_weight, mean=0.0, std=std)
        return True
    return False


def count_parameters(model: nn.Module, num_experts_per_tok: int | None = None) -> dict[str, int]:
    """Total parameters and parameters active per token (one token uses k of the E routed experts).

    In an expert-choice layer k is the mean number of experts per token, its capacity factor (rounded).

    Args:
        model (`nn.Module`): a ptmoe model.
        num_experts_per_tok (`int`, *optional*): defaults to `model.config.num_experts_per_tok`.
    """
    k = num_experts_per_tok if num_experts_per_tok is not None else model.config.num_experts_per_tok
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for module in model.modules():
        if isinstance(module, SparseMoeBlock):
            per_expert = sum(p.numel() for p in module.experts[0].parameters())
            layer_k = k
            if num_experts_per_tok is None and isinstance(module.router, ExpertChoiceRouter):
                layer_k = round(module.router.capacity_factor)
            inactive += per_expert * (len(module.experts) - layer_k)
    return {"total": total, "active": total - inactive}
