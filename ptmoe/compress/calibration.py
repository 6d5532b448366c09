"""Calibration for pruning: texts / datasets / token batches → unpadded sequences → input statistics per linear.

Every row a linear layer sees in calibration is a real token: padding is removed before the forward passes, and a
routed expert's linears count only the tokens its router dispatched to it (`CalibrationStats.expert_tokens` holds
the counts). Used by `ptmoe.compress.pruning.prune_wanda`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


def _is_moe_block(module: nn.Module) -> bool:
    # Duck-typed like `ptmoe.lora`, so classes loaded with `trust_remote_code` are recognised too.
    return hasattr(module, "router") and isinstance(getattr(module, "experts", None), nn.ModuleList)


# Task heads of transformers' BERT/T5-style models (name suffixes), for models without `_modules_to_not_quantize`.


def _expert_owners(model: nn.Module) -> dict[str, tuple[str, int]]:
    """`{linear name: (MoE block name, expert id)}` for every routed expert's linear."""
    owners = {}
    for block_name, block in model.named_modules():
        if not _is_moe_block(block):
            continue
        for expert_id, expert in enumerate(block.experts):
            for sub_name, sub in expert.named_modules():
                if isinstance(sub, nn.Linear):
                    owners[f"{block_name}.experts.{expert_id}.{sub_name}"] = (block_name, expert_id)
    return owners


# --------------------------------------------------------------------------------------------------------------
# Calibration data → unpadded sequences → length-bucketed batches
# --------------------------------------------------------------------------------------------------------------
def _resolve_tokenizer(model: nn.Module, tokenizer):
    if tokenizer is not None:
        return tokenizer
    source = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    if source:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError, TypeError, KeyError):
            pass
    raise ValueError(
        "calibration_data is a list of texts but no tokenizer was found in the model's folder "
        f"({source!r}): pass `tokenizer=` (e.g. AutoTokenizer.from_pretrained(...)) or tokenized batches"
    )


def _rows_of_batch(batch: Mapping[str, Any]) -> list[dict[str, torch.Tensor]]:
    """One tokenized batch → its sequences without padding (`attention_mask == 0` positions removed)."""
    if "input_ids" not in batch:
        raise ValueError(f"a tokenized calibration batch needs `input_ids`, got keys {sorted(batch)}")
    input_ids = torch.as_tensor(batch["input_ids"])
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    mask = batch.get("attention_mask")
    mask = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else torch.as_tensor(mask).bool()
    mask = mask.reshape(input_ids.shape)
    extra = {}
    for key in ("token_type_ids",):
        if batch.get(key) is not None:
            extra[key] = torch.as_tensor(batch[key]).reshape(input_ids.shape)
    rows = []
    for i in range(input_ids.shape[0]):
        keep = mask[i]
        row = {"input_ids": input_ids[i][keep]}
        row.update({key: value[i][keep] for key, value in extra.items()})
        if row["input_ids"].numel():
            rows.append(row)
    return rows


def calibration_sequences(
    model: nn.Module,
    calibration_data: Any,
    tokenizer=None,
    max_length: int = 128,
    text_column: str = "text",
) -> list[dict[str, torch.Tensor]]:
    """Normalise calibration data to a list of unpadded sequences (`{"input_ids": (L,), ...}`).

    Accepts a list of texts (tokenized with `tokenizer`, or the tokenizer of the model's folder), a
    `datasets.Dataset` (with an `input_ids` column, or a `text_column`), a tokenized batch (a mapping with
    `input_ids` and optionally `attention_mask` / `token_type_ids`) or a list/iterable of such batches. Padding
    is removed here, so that every row a layer sees in calibration is a real token.
    """
    if isinstance(calibration_data, str):
        raise ValueError(
            "calibration_data must be a list of texts, a datasets.Dataset or tokenized batches, not one string"
        )
    if calibration_data is None:
        raise ValueError(
            "calibration_data is empty: give some texts (about 128 sequences is Wanda's default)"
        )
    try:
        import datasets

        is_dataset = isinstance(calibration_data, datasets.Dataset)
    except ImportError:  # pragma: no cover - datasets is a dependency
        is_dataset = False
    if is_dataset:
        if "input_ids" in calibration_data.column_names:
            columns = [
                c
                for c in ("input_ids", "attention_mask", "token_type_ids")
                if c in calibration_data.column_names
            ]
            items = [{c: row[c] for c in columns} for row in calibration_data]
        elif text_column in calibration_data.column_names:
            items = list(calibration_data[text_column])
        else:
            raise ValueError(
                f"the calibration Dataset has neither `input_ids` nor the text column {text_column!r} "
                f"(columns: {calibration_data.column_names}); pass text_column="
            )
    elif isinstance(calibration_data, Mapping):
        items = [calibration_data]
    elif isinstance(calibration_data, Iterable):
        items = list(calibration_data)
    else:
        raise ValueError(
            f"calibration_data must be a list of texts, a datasets.Dataset or tokenized batches, got "
            f"{type(calibration_data).__name__}"
        )
    if not items:
        raise ValueError(
            "calibration_data is empty: give some texts (about 128 sequences is Wanda's default)"
        )
    if all(isinstance(item, str) for item in items):
        texts = [text for text in items if text.strip()]
        if not texts:
            raise ValueError("calibration_data holds only empty texts")
        tokenizer = _resolve_tokenizer(model, tokenizer)
        encoded = tokenizer(texts, truncation=True, max_length=max_length)
        keys = [key for key in ("input_ids", "token_type_ids") if key in encoded]
        return [{key: torch.tensor(encoded[key][i]) for key in keys} for i in range(len(texts))]
    if all(isinstance(item, Mapping) for item in items):
        sequences = []
        for item in items:
            if (
                isinstance(item.get("input_ids"), (list, tuple))
                and item["input_ids"]
                and not isinstance(item["input_ids"][0], (list, tuple, torch.Tensor))
            ):
                item = {k: [v] for k, v in item.items() if v is not None}  # one unbatched example
            sequences.extend(_rows_of_batch(item))
        return sequences
    raise ValueError(
        "calibration_data must hold only texts or only tokenized batches (mappings with `input_ids`), got "
        f"{sorted({type(item).__name__ for item in items})}"
    )


def _batches(sequences: Sequence[dict[str, torch.Tensor]], batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Stack sequences of equal length (no padding needed), at most `batch_size` per batch."""
    by_length: dict[int, list[dict[str, torch.Tensor]]] = {}
    for sequence in sequences:
        by_length.setdefault(sequence["input_ids"].numel(), []).append(sequence)
    batches = []
    for length in sorted(by_length):
        same = by_length[length]
        for start in range(0, len(same), batch_size):
            chunk = same[start : start + batch_size]
            batches.append({key: torch.stack([s[key] for s in chunk]) for key in chunk[0]})
    return batches


# --------------------------------------------------------------------------------------------------------------
# Statistics
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


def _model_inputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    inputs = {key: value.to(device) for key, value in batch.items()}
    if getattr(model.config, "is_encoder_decoder", False) and hasattr(model, "_shift_right"):
        # Encoder-decoders: the decoder reads the same text, shifted right (teacher forcing on the calibration set).
        inputs["decoder_input_ids"] = model._shift_right(inputs["input_ids"])
    if "token_type_ids" in inputs and "token_type_ids" not in _forward_arguments(model):
        del inputs["token_type_ids"]  # T5 tokenizers do not make them, BERT ones do
    return inputs


def _forward_arguments(model: nn.Module) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)


@torch.no_grad()
def _collect(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    names: Sequence[str],
    expert_statistics: str = "routed",
) -> CalibrationStats:
    stats = CalibrationStats()
    owners = _expert_owners(model)
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
    try:
        for batch in batches:
            model(**_model_inputs(model, batch))
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
    names: Sequence[str] | None = None,
    tokenizer=None,
    max_length: int = 128,
    batch_size: int = 8,
    text_column: str = "text",
    expert_statistics: str = "routed",
) -> CalibrationStats:
    """One calibration pass: ``Σ x_j²`` per input feature of each linear in `names` (default: `prunable_linears`).

    Each routed expert's statistics come only from the tokens its router dispatched to it; padding never counts.
    See `calibration_sequences` for the accepted `calibration_data`.
    """
    if names is None:
        from .pruning import prunable_linears  # pruning imports this module

        names = prunable_linears(model)
    names = list(names)
    sequences = calibration_sequences(model, calibration_data, tokenizer, max_length, text_column)
    return _collect(model, _batches(sequences, batch_size), names, expert_statistics)


__all__ = ["CalibrationStats", "calibration_sequences", "collect_input_norms"]
