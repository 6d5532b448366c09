"""Wanda pruning (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models") for ptmoe
and dense BERT/T5 models, with expert-aware calibration statistics.

    calibration texts ──► one forward per layer group ──► ‖X_j‖₂ per input feature of every linear
                                                              │   (experts: only the tokens routed to them)
    weights W ──► score S_ij = |W_ij| · ‖X_j‖₂ ──► zero the lowest scores of each output row ──► save / 4-bit / LoRA

Wanda compares weights *within one output row* (paper §3, "comparison group"), needs no retraining and no weight
update. Unstructured pruning removes ``floor(sparsity · in_features)`` weights per row; ``N:M`` keeps the N largest
scores of every M consecutive input weights of a row (NVIDIA's 2:4 pattern is ``"2:4"``; Wanda's code names the
same 2:4 pattern ``prune_n=2, prune_m=4`` by the number *pruned*, which coincides only for N = M/2).

Mixture-of-Experts twist: an expert only ever sees the tokens its router sends it, so its input norms must come
from those tokens, not from every token of the layer. Forward hooks on an expert's linears see exactly the routed
rows (the sparse MoE block gathers them per expert); the few zero rows the block may pad in CPU fp32 inference are
cut off using the router's own token counts. An expert that received no calibration token has no statistics: it
is left unpruned and listed in the report (never pruned on weight magnitude alone).

Layers are pruned in order (a "layer group" is one `layer.N` / `block.N` of a stack; anything outside the stacks,
e.g. a pooler, comes last), and the statistics of each group are gathered with the groups before it already
pruned, as in the Wanda reference implementation: this costs one calibration forward per group.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

EXPERT_SPARSITY_MODES = ("uniform", "by_load")
MAX_EXPERT_SPARSITY = (
    0.95  # `by_load` never removes (almost) a whole expert: the router still sends it tokens
)
_LAYER_GROUP = re.compile(r"^(.*?\.(?:layer|block)\.\d+)\.")
_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


# --------------------------------------------------------------------------------------------------------------
# Scores and masks (pure functions, the part the paper defines)
# --------------------------------------------------------------------------------------------------------------
def wanda_scores(weight: torch.Tensor, input_sq_norm: torch.Tensor) -> torch.Tensor:
    """Wanda importance ``S_ij = |W_ij| · ‖X_j‖₂`` (Sun et al. 2023, eq. 1), in fp32.

    Args:
        weight (`torch.Tensor` of shape `(out_features, in_features)`): a linear layer's weight.
        input_sq_norm (`torch.Tensor` of shape `(in_features,)`): ``Σ_rows X_j²`` over the calibration rows that
            reached the layer (its square root is the feature's L2 norm).
    """
    if input_sq_norm.shape != (weight.shape[1],):
        raise ValueError(
            f"input_sq_norm has shape {tuple(input_sq_norm.shape)}, expected ({weight.shape[1]},) "
            "(one value per input feature)"
        )
    return weight.detach().float().abs() * input_sq_norm.float().clamp_min(0).sqrt().unsqueeze(0)


def wanda_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Unstructured Wanda mask: per output row, the ``floor(sparsity · in_features)`` lowest scores.

    Args:
        scores (`torch.Tensor` of shape `(out_features, in_features)`): from `wanda_scores`.
        sparsity (`float`): fraction of each row to remove, in [0, 1).

    Returns:
        `torch.BoolTensor` of shape `(out_features, in_features)`, True where the weight is pruned. Ties are
        broken by position (stable sort), so the mask is deterministic.
    """
    _check_sparsity(sparsity)
    num_pruned = int(scores.shape[1] * sparsity)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if num_pruned == 0:
        return mask
    lowest = torch.sort(scores, dim=1, stable=True).indices[:, :num_pruned]  # (out, num_pruned)
    return mask.scatter_(1, lowest, True)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M semi-structured mask: in every group of M consecutive input weights of a row, keep the N best scores.

    Args:
        scores (`torch.Tensor` of shape `(out_features, in_features)`): from `wanda_scores`.
        n (`int`), m (`int`): keep `n` of every `m` (``0 < n < m``); `m` must divide `in_features`.

    Returns:
        `torch.BoolTensor` of shape `(out_features, in_features)`, True where the weight is pruned.
    """
    if not 0 < n < m:
        raise ValueError(f"N:M structure needs 0 < N < M, got {n}:{m}")
    out_features, in_features = scores.shape
    if in_features % m:
        raise ValueError(
            f"structure '{n}:{m}' needs the input width to be a multiple of {m}, but a layer has {in_features} "
            f"inputs; use structure='unstructured', another M, or skip that layer (skip=[...])"
        )
    groups = scores.reshape(out_features, in_features // m, m)  # (out, groups, m)
    lowest = torch.sort(groups, dim=-1, stable=True).indices[..., : m - n]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, lowest, True)
    return mask.reshape(out_features, in_features)


def parse_structure(structure: str) -> tuple[int, int] | None:
    """``"unstructured"`` → None; ``"2:4"`` → ``(2, 4)`` (keep 2 of every 4)."""
    if structure == "unstructured":
        return None
    match = _NM.match(structure) if isinstance(structure, str) else None
    if match is None:
        raise ValueError(f"structure must be 'unstructured' or 'N:M' such as '2:4', got {structure!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(f"structure 'N:M' needs 0 < N < M (keep N of every M weights), got {structure!r}")
    return n, m


def _check_sparsity(sparsity: float, name: str = "sparsity") -> None:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ValueError(
            f"`{name}` must be a number in [0, 1) (the fraction of each row's weights removed), got {sparsity!r}"
        )


# --------------------------------------------------------------------------------------------------------------
# Which linears are pruned
# --------------------------------------------------------------------------------------------------------------
def _is_moe_block(module: nn.Module) -> bool:
    # Duck-typed like `ptmoe.lora`, so classes loaded with `trust_remote_code` are recognised too.
    return hasattr(module, "router") and isinstance(getattr(module, "experts", None), nn.ModuleList)


# Task heads of transformers' BERT/T5-style models (name suffixes), for models without `_modules_to_not_quantize`.
DEFAULT_HEADS = ("classifier", "qa_outputs", "pooler.dense", "cls.predictions.transform.dense", "lm_head", "score")


def _head_patterns(model: nn.Module) -> list[str]:
    heads = list(DEFAULT_HEADS) + list(getattr(model, "_modules_to_not_quantize", None) or [])
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output_embeddings is not None:
        heads += [name for name, m in model.named_modules() if m is output_embeddings and name]
    return heads


def prunable_linears(
    model: nn.Module, skip: Sequence[str] | None = None, include_heads: bool = False
) -> list[str]:
    """Names of the `nn.Linear` layers `prune_wanda` prunes: attention, dense FFNs, experts and shared experts.

    Never routers (bare parameters in ptmoe, and any linear under a `router` module is excluded too) or embeddings
    (not linear layers). Task heads and output embeddings (`_modules_to_not_quantize`, `lm_head`, the MLM decoder)
    are kept unless `include_heads` (`DEFAULT_HEADS` cover dense transformers models).

    Args:
        model (`nn.Module`): a full-precision model.
        skip (`list[str]`, *optional*): extra module name patterns to keep dense, with transformers' quantization
            skip rules (a prefix up to a module boundary, a regex, or a suffix such as `"attention.output.dense"`).
        include_heads (`bool`, defaults to `False`): prune the task heads too.
    """
    from transformers.quantizers.quantizers_utils import should_convert_module

    patterns = list(skip or []) + ([] if include_heads else _head_patterns(model))
    return [
        name
        for name, module in model.named_modules()
        if type(module) is nn.Linear
        and "router" not in name.split(".")
        and should_convert_module(name, patterns or None)
    ]


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


def _layer_groups(names: Sequence[str]) -> list[list[str]]:
    """Names grouped by stack layer (`...layer.N` / `...block.N`) in model order; names outside a stack last."""
    groups: dict[str, list[str]] = {}
    outside = []
    for name in names:
        match = _LAYER_GROUP.match(name)
        if match is None:
            outside.append(name)
        else:
            groups.setdefault(match.group(1), []).append(name)
    return list(groups.values()) + ([outside] if outside else [])


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
    names = list(names) if names is not None else prunable_linears(model)
    sequences = calibration_sequences(model, calibration_data, tokenizer, max_length, text_column)
    return _collect(model, _batches(sequences, batch_size), names, expert_statistics)


# --------------------------------------------------------------------------------------------------------------
# Pruning
# --------------------------------------------------------------------------------------------------------------
@dataclass
class PruningReport:
    """What `prune_wanda` did.

    Attributes:
        structure (`str`): "unstructured" or "N:M".
        sparsity (`float`): the target fraction removed per row (1 − N/M for N:M).
        calibration_sequences (`int`), calibration_tokens (`int`): the calibration set used.
        layer_sparsity (`dict[str, float]`): pruned linear → fraction of its weights now zero.
        expert_tokens (`dict[str, list[int]]`): MoE block → calibration tokens routed to each expert.
        expert_sparsity (`dict[str, float]`): routed expert (`<block>.experts.<i>`) → target sparsity it got.
        unpruned_experts (`list[str]`): experts left dense because no calibration token reached them.
        skipped (`list[str]`): linears not pruned (heads, `skip` patterns) — routers are not linears.
    """

    structure: str
    sparsity: float
    calibration_sequences: int
    calibration_tokens: int
    layer_sparsity: dict[str, float] = field(default_factory=dict)
    expert_tokens: dict[str, list[int]] = field(default_factory=dict)
    expert_sparsity: dict[str, float] = field(default_factory=dict)
    unpruned_experts: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    pruned_weights: int = 0
    total_weights: int = 0

    @property
    def overall_sparsity(self) -> float:
        """Zeros / weights over the pruned linears' weights."""
        return self.pruned_weights / self.total_weights if self.total_weights else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "overall_sparsity": self.overall_sparsity}

    def config_record(self) -> dict[str, Any]:
        """The short provenance saved as `config.pruning` (the full report would bloat config.json)."""
        return {
            "method": "wanda",
            "structure": self.structure,
            "sparsity": self.sparsity,
            "overall_sparsity": round(self.overall_sparsity, 6),
            "calibration_sequences": self.calibration_sequences,
            "calibration_tokens": self.calibration_tokens,
            "unpruned_experts": list(self.unpruned_experts),
        }


def _expert_targets(counts: Sequence[int], sparsity: float, mode: str) -> list[float]:
    """Per-expert target sparsity of one MoE layer.

    `uniform`: every expert gets `sparsity`. `by_load`: ``s_e = s · (2 − E · p_e)`` clipped to
    ``[0, MAX_EXPERT_SPARSITY]``, with ``p_e`` the expert's share of the layer's routed (token, slot) pairs:
    an expert at the average load gets `s`, an idle one up to 2s, one with twice the average load 0; before
    clipping the experts' mean is exactly `s`.
    """
    if mode == "uniform":
        return [sparsity] * len(counts)
    total = sum(counts)
    num_experts = len(counts)
    return [
        min(MAX_EXPERT_SPARSITY, max(0.0, sparsity * (2 - num_experts * count / total)))
        if total
        else sparsity
        for count in counts
    ]


@torch.no_grad()
def prune_wanda(
    model: nn.Module,
    calibration_data: Any,
    sparsity: float | None = None,
    structure: str = "unstructured",
    skip: Sequence[str] | None = None,
    tokenizer=None,
    *,
    include_heads: bool = False,
    expert_sparsity: str = "uniform",
    max_length: int = 128,
    batch_size: int = 8,
    min_tokens: int = 64,
    text_column: str = "text",
    sequential: bool = True,
    show_progress: bool = True,
    expert_statistics: str = "routed",
) -> PruningReport:
    """Prune `model` in place with Wanda; returns a `PruningReport` (also recorded as `model.config.pruning`).

    Prune the full-precision model (fp32, bf16 or fp16), then save it (`save_pruned`) and load it in 4-bit or add
    LoRA as usual: the zeros are ordinary weights (bitsandbytes and merged LoRA adapters do not keep them zero).

    Args:
        model (`nn.Module`): a ptmoe model or a dense BERT/T5 (not quantized, not wrapped by PEFT).
        calibration_data: a list of texts (tokenized with `tokenizer` or the tokenizer of the model's folder), a
            `datasets.Dataset` (`input_ids` or `text_column`), or tokenized batches (see `calibration_sequences`).
        sparsity (`float`, *optional*): fraction of each output row's weights removed, in [0, 1); default 0.5.
            With `structure="N:M"` it is fixed to 1 − N/M (passing another value is an error).
        structure (`str`, defaults to `"unstructured"`): or `"N:M"` — keep N of every M consecutive input weights
            (`"2:4"` is the pattern of sparse tensor cores); M must divide the input width of every pruned layer.
        skip (`list[str]`, *optional*): module name patterns to keep dense (see `prunable_linears`).
        tokenizer (*optional*): for text calibration data.
        include_heads (`bool`, defaults to `False`): prune task heads / output embeddings too.
        expert_sparsity (`str`, defaults to `"uniform"`): `"by_load"` prunes less-used experts harder
            (see `_expert_targets`; unstructured only).
        max_length (`int`, defaults to 128): truncation of calibration texts.
        batch_size (`int`, defaults to 8): calibration sequences per forward (sequences of equal length only).
        min_tokens (`int`, defaults to 64): refuse calibration sets with fewer real tokens than this.
        text_column (`str`, defaults to `"text"`): the text column of a calibration `Dataset`.
        sequential (`bool`, defaults to `True`): gather each layer group's statistics after pruning the groups
            before it (Wanda's reference implementation); False uses one pass over the dense model.
        show_progress (`bool`, defaults to `True`): a tqdm bar over layer groups.
        expert_statistics (`str`, defaults to `"routed"`): `"all_tokens"` is an ablation: each expert's norms come
            from every token of its layer (as a dense model's FFN would see them), not from its routed tokens.

    Raises:
        ValueError: bad `sparsity`/`structure`/`expert_sparsity`, empty or too-short calibration data, an N:M
            width mismatch, a quantized model.
    """
    n_m = parse_structure(structure)
    if n_m is None:
        sparsity = 0.5 if sparsity is None else sparsity
        _check_sparsity(sparsity)
    else:
        implied = 1 - n_m[0] / n_m[1]
        if sparsity is not None:
            _check_sparsity(sparsity)
            if not math.isclose(sparsity, implied):
                raise ValueError(
                    f"structure {structure!r} removes {implied:.4g} of the weights; sparsity={sparsity} contradicts "
                    "it (leave sparsity unset with an N:M structure)"
                )
        sparsity = implied
    if expert_statistics not in ("routed", "all_tokens"):
        raise ValueError(f"`expert_statistics` must be 'routed' or 'all_tokens', got {expert_statistics!r}")
    if expert_sparsity not in EXPERT_SPARSITY_MODES:
        raise ValueError(f"`expert_sparsity` must be one of {EXPERT_SPARSITY_MODES}, got {expert_sparsity!r}")
    if expert_sparsity == "by_load" and n_m is not None:
        raise ValueError("expert_sparsity='by_load' needs structure='unstructured' (N:M fixes the sparsity)")
    if batch_size < 1 or max_length < 1:
        raise ValueError(f"batch_size and max_length must be >= 1, got {batch_size} and {max_length}")
    if (
        getattr(model, "is_loaded_in_4bit", False)
        or getattr(model, "is_loaded_in_8bit", False)
        or hasattr(model, "peft_config")
    ):
        raise ValueError(
            "prune_wanda needs a plain full-precision model: prune before 4-bit/8-bit loading and before adding "
            "LoRA adapters (load the fp32/bf16 checkpoint, prune, save, then quantize)"
        )
    names = prunable_linears(model, skip, include_heads)
    if not names:
        raise ValueError("the model has no nn.Linear layer to prune (all skipped, or already quantized?)")
    if n_m is not None:
        modules = dict(model.named_modules())
        for name in names:
            if modules[name].in_features % n_m[1]:
                raise ValueError(
                    f"structure {structure!r} needs input widths divisible by {n_m[1]}, but {name} has "
                    f"{modules[name].in_features} inputs; use structure='unstructured', another M, or "
                    f"skip=[{name!r}]"
                )

    sequences = calibration_sequences(model, calibration_data, tokenizer, max_length, text_column)
    tokens = sum(s["input_ids"].numel() for s in sequences)
    if tokens < min_tokens:
        raise ValueError(
            f"calibration_data is too short: {tokens} tokens in {len(sequences)} sequences, fewer than "
            f"min_tokens={min_tokens}. Give more text (Wanda uses 128 sequences) or lower min_tokens."
        )
    batches = _batches(sequences, batch_size)
    report = PruningReport(
        structure=structure if n_m is None else f"{n_m[0]}:{n_m[1]}",
        sparsity=sparsity,
        calibration_sequences=len(sequences),
        calibration_tokens=tokens,
        skipped=[n for n, m in model.named_modules() if type(m) is nn.Linear and n not in set(names)],
    )
    owners = _expert_owners(model)
    modules = dict(model.named_modules())
    groups = _layer_groups(names) if sequential else [names]
    progress = _progress(groups, show_progress)
    for group in progress:
        stats = _collect(model, batches, group, expert_statistics)
        for block_name, counts in stats.expert_tokens.items():
            report.expert_tokens[block_name] = counts
        for name in group:
            target = sparsity
            owner = owners.get(name)
            if owner is not None:
                block_name, expert_id = owner
                expert_name = f"{block_name}.experts.{expert_id}"
                counts = stats.expert_tokens.get(block_name)
                if counts is not None and counts[expert_id] == 0 and expert_statistics == "routed":
                    if expert_name not in report.unpruned_experts:
                        report.unpruned_experts.append(expert_name)
                    continue
                if counts is not None:
                    target = _expert_targets(counts, sparsity, expert_sparsity)[expert_id]
                report.expert_sparsity[expert_name] = target
            elif stats.rows[name] == 0:
                logger.warning("%s received no calibration token: left unpruned", name)
                continue
            weight = modules[name].weight
            scores = wanda_scores(weight, stats.sq_norms[name])  # (out, in)
            mask = wanda_mask(scores, target) if n_m is None else nm_mask(scores, *n_m)
            weight.masked_fill_(mask.to(weight.device), 0)
            zeros = int((weight == 0).sum())
            report.layer_sparsity[name] = zeros / weight.numel()
            report.pruned_weights += zeros
            report.total_weights += weight.numel()
    if report.unpruned_experts:
        logger.warning(
            "%d expert(s) received no calibration token and were left unpruned: %s. Use more or more varied "
            "calibration text to prune them.",
            len(report.unpruned_experts),
            ", ".join(report.unpruned_experts),
        )
    if hasattr(model, "config"):
        model.config.pruning = report.config_record()
    return report


def _progress(groups: list, show: bool):
    if not show or len(groups) < 2:
        return groups
    from tqdm.auto import tqdm

    return tqdm(groups, desc="Wanda: layer groups", unit="group")


def save_pruned(model: nn.Module, out_dir: str | Path, tokenizer=None, overwrite: bool = False) -> Path:
    """Save a pruned model (safetensors, config with its `pruning` record, modeling code) and tokenizer atomically.

    The same all-or-nothing writer as `ptmoe.save_upcycled`: a temporary folder next to `out_dir`, renamed into
    place; a non-empty `out_dir` is refused unless `overwrite`.
    """
    from ..upcycling import save_upcycled

    return save_upcycled(
        model, out_dir, tokenizer=tokenizer if tokenizer is not None else False, overwrite=overwrite
    )


# --------------------------------------------------------------------------------------------------------------
# `ptmoe prune`
# --------------------------------------------------------------------------------------------------------------
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_for_pruning(model_name_or_path: str, dtype: str = "float32") -> nn.Module:
    """Load a checkpoint with the class named in its config (`architectures[0]`): ptmoe or transformers models."""
    import transformers
    from transformers import AutoConfig

    from .. import auto  # noqa: F401  (registers the ptmoe configs and models)
    from ..models import modeling_moe_bert, modeling_moe_t5

    if dtype not in _DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    config = AutoConfig.from_pretrained(model_name_or_path)
    architecture = (getattr(config, "architectures", None) or [None])[0]
    model_class = None
    for namespace in (modeling_moe_bert, modeling_moe_t5, transformers):
        model_class = model_class or getattr(namespace, architecture or "", None)
    if model_class is None:
        raise ValueError(
            f"{model_name_or_path}: its config names no loadable architecture ({architecture!r}); save the model "
            "with save_pretrained (which records `architectures`) or prune it in Python with ptmoe.prune_wanda"
        )
    return model_class.from_pretrained(model_name_or_path, dtype=_DTYPES[dtype]).eval()


def read_calibration_file(path: str, text_column: str = "text", max_samples: int | None = None):
    """Calibration texts from a .txt (one per line), .jsonl/.json or .csv file, as a `datasets.Dataset`."""
    import datasets

    from ..training import _data_builder

    builder = _data_builder(path, "--calibration")
    dataset = datasets.load_dataset(builder, data_files=path, split="train")
    if text_column not in dataset.column_names:
        raise ValueError(
            f"--calibration {path!r} has no column {text_column!r} (columns: {dataset.column_names}); "
            "set --text-column"
        )
    dataset = dataset.filter(lambda row: bool(row[text_column] and row[text_column].strip()))
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    return dataset


def add_prune_arguments(parser) -> None:
    """The arguments of `ptmoe prune`."""
    parser.add_argument("model", help="folder or Hub id of a full-precision checkpoint (ptmoe MoE or dense)")
    parser.add_argument("out", help="output folder (must be empty unless --overwrite)")
    parser.add_argument(
        "--calibration", required=True, help="calibration texts: .txt (one per line), .jsonl/.json or .csv"
    )
    parser.add_argument("--text-column", default="text", help="text column of a .jsonl/.csv file")
    parser.add_argument("--max-samples", type=int, default=128, help="calibration texts used (default 128)")
    parser.add_argument(
        "--max-length", type=int, default=128, help="tokens per calibration text (default 128)"
    )
    parser.add_argument("--sparsity", type=float, help="fraction removed per row, in [0, 1) (default 0.5)")
    parser.add_argument(
        "--structure", default="unstructured", help="'unstructured' (default) or N:M, e.g. 2:4"
    )
    parser.add_argument(
        "--expert-sparsity",
        choices=EXPERT_SPARSITY_MODES,
        default="uniform",
        help="by_load: prune idle experts harder",
    )
    parser.add_argument("--skip", nargs="*", default=[], help="module name patterns to keep dense")
    parser.add_argument(
        "--include-heads", action="store_true", help="also prune task heads / output embeddings"
    )
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="load (and save) dtype")
    parser.add_argument("--min-tokens", type=int, default=64, help="refuse less calibration text than this")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")


def run_prune_command(args) -> int:
    """`ptmoe prune MODEL OUT --calibration FILE`: Wanda-prune, save atomically, print the report's summary."""
    import sys

    from ..upcycling import check_output_dir

    try:
        check_output_dir(args.out, args.overwrite)  # before the (long) calibration, not after
        if args.max_samples is not None and args.max_samples < 1:
            raise ValueError(f"--max-samples must be >= 1, got {args.max_samples}")
        parse_structure(args.structure)
        if args.sparsity is not None:
            _check_sparsity(args.sparsity)
        texts = read_calibration_file(args.calibration, args.text_column, args.max_samples)
        model = load_for_pruning(args.model, args.dtype)
        tokenizer = _resolve_tokenizer(model, None)
        report = prune_wanda(
            model,
            texts,
            sparsity=args.sparsity,
            structure=args.structure,
            skip=args.skip,
            tokenizer=tokenizer,
            include_heads=args.include_heads,
            expert_sparsity=args.expert_sparsity,
            max_length=args.max_length,
            min_tokens=args.min_tokens,
        )
        out = save_pruned(model, args.out, tokenizer=tokenizer, overwrite=args.overwrite)
    except (FileExistsError, FileNotFoundError, ValueError) as error:
        print(f"ptmoe prune: error: {error}", file=sys.stderr)
        return 2
    print(
        f"Wanda {report.structure} pruning: {report.overall_sparsity:.1%} of {report.total_weights:,} weights in "
        f"{len(report.layer_sparsity)} linears set to zero ({report.calibration_tokens:,} calibration tokens); "
        f"saved to {out}"
    )
    if report.unpruned_experts:
        print(f"left dense (no calibration token routed to them): {', '.join(report.unpruned_experts)}")
    return 0


__all__ = [
    "add_prune_arguments",
    "load_for_pruning",
    "read_calibration_file",
    "run_prune_command",
    "CalibrationStats",
    "EXPERT_SPARSITY_MODES",
    "PruningReport",
    "calibration_sequences",
    "collect_input_norms",
    "nm_mask",
    "parse_structure",
    "prunable_linears",
    "prune_wanda",
    "save_pruned",
    "wanda_mask",
    "wanda_scores",
]
