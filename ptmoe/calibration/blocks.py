"""Finding the MoE blocks of a model: one rule for every tool that hooks, fits, prunes or counts them."""

from __future__ import annotations

from torch import nn


def is_moe_block(module: nn.Module) -> bool:
    """Whether `module` is a sparse MoE block (a `router` and an `nn.ModuleList` of `experts`).

    Duck-typed rather than `isinstance(module, SparseMoeBlock)`, so that blocks of classes loaded with
    `trust_remote_code=True` (the same code, other class objects) are recognised too.
    """
    return hasattr(module, "router") and isinstance(getattr(module, "experts", None), nn.ModuleList)


def moe_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """`{module name: MoE block}` of `model` in module order (wrapped models included: PEFT, DDP, `torch.compile`).

    Args:
        model (`nn.Module`): a ptmoe model, possibly wrapped.
    """
    return {name: module for name, module in model.named_modules() if is_moe_block(module)}


def expert_owners(model: nn.Module) -> dict[str, tuple[str, int]]:
    """`{linear name: (MoE block name, expert id)}` for every `nn.Linear` of every routed expert."""
    owners = {}
    for block_name, block in moe_blocks(model).items():
        for expert_id, expert in enumerate(block.experts):
            for sub_name, sub in expert.named_modules():
                if isinstance(sub, nn.Linear):
                    owners[f"{block_name}.experts.{expert_id}.{sub_name}"] = (block_name, expert_id)
    return owners


__all__ = ["expert_owners", "is_moe_block", "moe_blocks"]
