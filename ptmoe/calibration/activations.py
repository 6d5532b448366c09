"""What a model computes on calibration text, gathered with forward hooks.

* `collect_ffn_activations`: a dense model's FFN neuron activations (the co-activation and importance splits of
  partitioned upcycling);
* `collect_input_norms` / `input_norm_statistics`: ``Σ x_j²`` per input feature of chosen linears (Wanda pruning).
  Every row a linear sees is a real token: padding is removed before the forward passes (`calibration_sequences`),
  and a routed expert's linears count only the tokens its router dispatched to it (`CalibrationStats.expert_tokens`
  holds the counts).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .batches import batches as padded_batches
from .batches import calibration_sequences, length_batches, model_inputs
from .blocks import expert_owners


def _dense_name(moe_key: str, renames: Sequence[tuple[str, str]]) -> str:
    """The dense module path of an MoE-space key (the inverse of the architecture map's renames)."""
    for dense_prefix, moe_prefix in renames:
        if moe_key.startswith(moe_prefix):
            return dense_prefix + moe_key[len(moe_prefix) :]
    return moe_key


@torch.no_grad()
def collect_ffn_activations(
    dense: torch.nn.Module,
    arch,
    layers: Mapping[str, Sequence[int]],
    texts: Sequence[str],
    tokenizer,
    max_tokens: int = 2048,
    batch_size: int = 16,
    max_length: int = 128,
) -> dict[tuple[str, int], torch.Tensor]:
    """The intermediate activations (the input of the FFN's output projection) of the first `max_tokens` real tokens.

    Args:
        dense: the dense transformers model (eval mode is set for the duration).
        arch (`ArchitectureMap`): its architecture map (where each stack's FFNs live: `stacks`, `renames`).
        layers (`dict[str, list[int]]`): stack name ("encoder"/"decoder") → the MoE layer indices to record.
        texts, tokenizer: calibration text and its tokenizer.
        max_tokens (`int`): real tokens recorded per layer.

    Returns:
        `{(stack, layer): (T, I) float32 tensor}` with `T <= max_tokens` real (non-padding) tokens.
    """
    records: dict[tuple[str, int], list[torch.Tensor]] = {}
    state = {"mask": None}
    handles = []
    modules = dict(dense.named_modules())
    for stack in arch.stacks:
        for layer in layers.get(stack.name, ()):
            name = _dense_name(stack.layer_prefix.format(layer=layer) + stack.dense_ffn["wo"], arch.renames)
            if name not in modules:
                raise ValueError(f"the dense {type(dense).__name__} has no FFN output projection {name!r}")
            key = (stack.name, layer)
            records[key] = []

            def hook(module, args, key=key):
                activations = args[0]  # (B, S, I): act(wi(x)) in eval mode
                rows = activations[state["mask"]] if state["mask"] is not None else activations.flatten(0, -2)
                records[key].append(rows.float().cpu())

            handles.append(modules[name].register_forward_pre_hook(hook))
    was_training = dense.training
    dense.eval()
    device = next(dense.parameters()).device
    seen = 0
    try:
        for batch in padded_batches(texts, tokenizer, batch_size, max_length, device):
            state["mask"] = batch["attention_mask"].bool()
            dense(**model_inputs(dense, batch))
            seen += int(state["mask"].sum())
            if seen >= max_tokens:
                break
    finally:
        for handle in handles:
            handle.remove()
        dense.train(was_training)
    return {key: torch.cat(rows)[:max_tokens] for key, rows in records.items()}


# --------------------------------------------------------------------------------------------------------------
# Input norms of linears
# --------------------------------------------------------------------------------------------------------------
@dataclass
class CalibrationStats:
    """Input statistics of linear layers over calibration tokens.

    Attributes:
        sq_norms (`dict[str, torch.Tensor]`): linear name → `(in_features,)` fp32 ``Σ_rows x_j²``.
        rows (`dict[str, int]`): linear name → rows (tokens) that reached it.
        expert_tokens (`dict[str, list[int]]`): MoE block name → tokens routed to each expert (per slot).
    """

    sq_norms: dict[str, torch.Tensor] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    expert_tokens: dict[str, list[int]] = field(default_factory=dict)


@torch.no_grad()
def input_norm_statistics(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    names: Sequence[str],
    expert_statistics: str = "routed",
) -> CalibrationStats:
    """One pass over unpadded `batches` (`length_batches`): ``Σ x_j²`` per input feature of each linear in `names`.

    Args:
        model (`nn.Module`): the model (eval mode is set for the duration).
        batches (`Sequence[dict[str, torch.Tensor]]`): batches without padding (every row a real token).
        names (`Sequence[str]`): the `nn.Linear` modules to measure.
        expert_statistics (`str`, defaults to `"routed"`): `"routed"` counts an expert's linears over the tokens
            its router dispatched to it; `"all_tokens"` (an ablation) replays every token of the layer through each
            measured expert.
    """
    stats = CalibrationStats()
    owners = expert_owners(model)
    wanted = set(names)
    modules = dict(model.named_modules())
    current_counts: dict[str, list[int]] = {}
    handles = []
    all_tokens = expert_statistics == "all_tokens"
    replaying = [False]  # all_tokens: expert linears count only while their expert replays every token

    def replay_hook(block_name: str):
        def hook(module, args):
            hidden = args[0].detach()
            hidden = hidden.reshape(
                -1, hidden.shape[-1]
            )  # (tokens, H): calibration sequences have no padding
            replaying[0] = True
            try:
                for expert_id, expert in enumerate(module.experts):
                    if any(owners.get(n) == (block_name, expert_id) for n in wanted):
                        expert(hidden)
            finally:
                replaying[0] = False

        return hook

    def router_hook(block_name: str, num_experts: int):
        def hook(module, args, output):
            expert_index = getattr(output, "expert_index", None)  # (B, S, k), -1 = not dispatched
            if expert_index is None:
                return
            chosen = expert_index[expert_index >= 0].reshape(-1)
            counts = torch.bincount(chosen, minlength=num_experts).tolist()
            current_counts[block_name] = counts
            total = stats.expert_tokens.setdefault(block_name, [0] * num_experts)
            for i, count in enumerate(counts):
                total[i] += count

        return hook

    def linear_hook(name: str):
        owner = owners.get(name)

        def hook(module, args):
            if owner is not None and all_tokens and not replaying[0]:
                return  # the ablation counts the replay over every token, not the routed rows
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1])  # (rows, in_features)
            if owner is not None and not all_tokens and owner[0] in current_counts:
                # Rows beyond the router's count are the block's CPU padding (zeros before `wi`, act(bias) after).
                x = x[: current_counts[owner[0]][owner[1]]]
            square_sum = x.float().pow(2).sum(dim=0)  # (in_features,)
            if name in stats.sq_norms:
                stats.sq_norms[name] += square_sum
            else:
                stats.sq_norms[name] = square_sum
            stats.rows[name] = stats.rows.get(name, 0) + x.shape[0]

        return hook

    blocks = {owner[0] for name, owner in owners.items() if name in wanted}
    for block_name in blocks:
        block = modules[block_name]
        handles.append(block.router.register_forward_hook(router_hook(block_name, len(block.experts))))
        if all_tokens:
            handles.append(block.register_forward_pre_hook(replay_hook(block_name)))
    for name in names:
        handles.append(modules[name].register_forward_pre_hook(linear_hook(name)))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for batch in batches:
            model(**model_inputs(model, batch, device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    for name in names:  # a linear never reached (e.g. an expert with no token) still gets an entry
        if name not in stats.sq_norms:
            in_features = modules[name].in_features
            stats.sq_norms[name] = torch.zeros(in_features)
            stats.rows[name] = 0
    return stats


def collect_input_norms(
    model: nn.Module,
    calibration_data: Any,
    names: Sequence[str],
    tokenizer=None,
    max_length: int = 128,
    batch_size: int = 8,
    text_column: str = "text",
    expert_statistics: str = "routed",
) -> CalibrationStats:
    """One calibration pass: ``Σ x_j²`` per input feature of each linear in `names` (e.g. `prunable_linears`).

    Each routed expert's statistics come only from the tokens its router dispatched to it; padding never counts.
    See `calibration_sequences` for the accepted `calibration_data` and `input_norm_statistics` for the rest.
    """
    sequences = calibration_sequences(model, calibration_data, tokenizer, max_length, text_column)
    return input_norm_statistics(model, length_batches(sequences, batch_size), list(names), expert_statistics)


__all__ = ["CalibrationStats", "collect_ffn_activations", "collect_input_norms", "input_norm_statistics"]
