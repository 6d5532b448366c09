"""The state-dict conversion (pure): a dense state dict → the MoE model's state dict, except the routers.

`upcycle_state_dict` renames every carried-over key by the architecture map, turns the FFN of each MoE layer into
experts (`experts.py`) and checks every key and shape against the MoE model's; `router_keys` names the keys the
MoE model initialises itself.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from .experts import _generator, init_experts, split_ffn
from .families import FAMILIES, ArchitectureMap

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------
# The state-dict conversion (pure)
# --------------------------------------------------------------------------------------------------------------
def _rename(key: str, renames: Sequence[tuple[str, str]]) -> str:
    for old, new in renames:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def router_keys(expected_keys) -> set[str]:
    """The MoE keys owned by routers (initialised by the MoE model itself, not converted)."""
    return {key for key in expected_keys if ".moe.router." in f".{key}"}


@torch.no_grad()
def upcycle_state_dict(
    dense_state_dict: Mapping[str, torch.Tensor],
    arch: ArchitectureMap,
    moe_config,
    expected_shapes: Mapping[str, torch.Size],
    method: str = "copy",
    seed: int = 0,
    noise_std: float = 0.01,
    drop_ratio: float = 0.5,
    partition: str = "random",
    clone: bool = True,
    progress: bool = False,
    activations: Mapping[tuple[str, int], torch.Tensor] | None = None,
    num_shared_neurons: int = 0,
) -> dict[str, torch.Tensor]:
    """Convert a dense state dict into the state dict of the MoE model, except the routers.

    Every dense key is either renamed by `arch.renames` (or kept), consumed as the FFN of an MoE layer, or dropped by
    `arch.dropped`; anything else is an error, and so is an MoE key that receives nothing or a tensor of the wrong
    shape. Router weights are initialised by the MoE model itself (`router_init`).

    Args:
        dense_state_dict (`Mapping[str, torch.Tensor]`): the dense model's `state_dict()`.
        arch (`ArchitectureMap`): the architecture map of the dense model (see `architecture_for_model`).
        moe_config: the MoE config (its MoE layers and `expert_intermediate_size` decide the layout).
        expected_shapes (`Mapping[str, torch.Size]`): the MoE model's state-dict shapes (from a meta-device model).
        method, seed, noise_std, drop_ratio, partition: see `upcycle`.
        clone (`bool`): copy carried-over tensors (True when the dense model stays in use); when False, the result
            shares storage with `dense_state_dict`.
        progress (`bool`): show a progress bar over MoE layers.
        activations (`dict`, *optional*): `(stack, layer)` → `(T, I)` dense FFN activations on calibration text
            (from `ptmoe.calibration.collect_ffn_activations`), for the co-activation split and `num_shared_neurons`.
        num_shared_neurons (`int`): "partition": neurons kept in an always-active shared expert.

    Returns:
        `dict[str, torch.Tensor]` with every key of `expected_shapes` except the router keys.
    """
    family = FAMILIES[arch.family]
    renamed: dict[str, tuple[str, torch.Tensor]] = {}  # MoE-space key → (dense key, tensor)
    dropped = []
    for key, tensor in dense_state_dict.items():
        if any(key.startswith(prefix) for prefix in arch.dropped):
            dropped.append(key)
            continue
        renamed[_rename(key, arch.renames)] = (key, tensor)
    if dropped:
        logger.warning("%s Dropped dense weights: %s", arch.note or "", ", ".join(dropped))
    elif arch.note:
        logger.info(arch.note)

    output: dict[str, torch.Tensor] = {}

    def put(moe_key: str, tensor: torch.Tensor, source: str) -> None:
        if moe_key not in expected_shapes:
            raise ValueError(
                f"dense weight {source!r} maps to {moe_key!r}, which the MoE model does not have"
            )
        if tuple(tensor.shape) != tuple(expected_shapes[moe_key]):
            raise ValueError(
                f"shape mismatch for {moe_key!r} (from dense {source!r}): the MoE model expects "
                f"{tuple(expected_shapes[moe_key])}, the dense weight is {tuple(tensor.shape)}. Config overrides "
                "must not change the shapes of the dense model."
            )
        output[moe_key] = tensor

    # 1. MoE layers: the dense FFN of each becomes the experts.
    jobs = [(stack, layer) for stack in arch.stacks for layer in getattr(moe_config, stack.layers_attr)]
    for stack, layer in tqdm(jobs, desc=f"upcycling ({method})", unit="layer", disable=not progress):
        layer_prefix = stack.layer_prefix.format(layer=layer)
        block = layer_prefix + stack.moe_block
        expert_keys = sorted(
            key[len(block + "experts.0.") :]
            for key in expected_shapes
            if key.startswith(block + "experts.0.")
        )
        if not expert_keys:
            raise ValueError(f"the MoE model has no experts under {block!r}: is layer {layer} an MoE layer?")
        ffn, sources = {}, {}
        for expert_key in expert_keys:  # e.g. "wi.weight"
            role, param = expert_key.split(".")
            dense_key = f"{layer_prefix}{stack.dense_ffn[role]}.{param}"
            if dense_key not in renamed:
                raise ValueError(
                    f"the dense checkpoint has no {dense_key!r} for {block}experts.*.{expert_key} "
                    f"({stack.name} layer {layer}); is the config's FFN type the checkpoint's?"
                )
            sources[expert_key], ffn[expert_key] = renamed.pop(dense_key)
        generator = _generator(seed, method, stack.name, layer)
        shared = None
        if method == "partition":
            experts, shared = split_ffn(
                ffn,
                moe_config.num_experts,
                partition,
                generator,
                num_shared_neurons=num_shared_neurons,
                activations=(activations or {}).get((stack.name, layer)),
                combine_weights=getattr(moe_config, "combine_weights", "router"),
                num_experts_per_tok=moe_config.num_experts_per_tok,
            )
        else:
            experts = init_experts(
                ffn,
                moe_config.num_experts,
                method,
                generator,
                noise_std=noise_std,
                drop_ratio=drop_ratio,
                partition=partition,
                clone=clone,
            )
        for index, expert in enumerate(experts):
            for expert_key, tensor in expert.items():
                put(f"{block}experts.{index}.{expert_key}", tensor, sources[expert_key])
        for expert_key, tensor in (shared or {}).items():
            put(f"{block}shared_experts.0.{expert_key}", tensor, sources[expert_key])

    # 2. Everything else is carried over under its (renamed) key. Tied weights share storage: clone them once.
    clones: dict[tuple, torch.Tensor] = {}
    for moe_key, (dense_key, tensor) in renamed.items():
        if family.positions_from_padding_idx and moe_key.endswith("embeddings.position_embeddings.weight"):
            # RoBERTa positions start at padding_idx + 1 (see `_roberta_config_fields`).
            put(moe_key, tensor[moe_config.pad_token_id + 1 :].clone(), dense_key)
            continue
        if clone:
            identity = (tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
            if identity not in clones:
                clones[identity] = tensor.clone()
            tensor = clones[identity]
        put(moe_key, tensor, dense_key)

    missing = sorted(set(expected_shapes) - set(output) - router_keys(expected_shapes))
    if missing:
        raise ValueError(
            f"the dense {arch.dense_class} has no weights for these {arch.moe_class} keys: {missing[:8]}"
            f"{' …' if len(missing) > 8 else ''} (is it a {family.model_types[0]} checkpoint of the expected shape?)"
        )
    return output
