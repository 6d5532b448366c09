"""FFN neuron activations of a dense model on calibration text (for the co-activation and importance splits)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .data import batches


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
        arch (`ArchitectureMap`): its architecture map (where each stack's FFNs live).
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
        for batch in batches(texts, tokenizer, batch_size, max_length, device):
            state["mask"] = batch["attention_mask"].bool()
            if getattr(dense.config, "is_encoder_decoder", False):
                # T5: the decoder reads the same text shifted right (teacher forcing), so its FFNs see real text.
                batch["decoder_input_ids"] = dense._shift_right(batch["input_ids"])
            dense(**batch)
            seen += int(state["mask"].sum())
            if seen >= max_tokens:
                break
    finally:
        for handle in handles:
            handle.remove()
        dense.train(was_training)
    return {key: torch.cat(rows)[:max_tokens] for key, rows in records.items()}
