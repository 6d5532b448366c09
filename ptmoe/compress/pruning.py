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
cut off using the router's own token counts (`ptmoe.calibration.input_norm_statistics`). An expert that received no calibration token has
no statistics: it is left unpruned and listed in the report (never pruned on weight magnitude alone).

Layers are pruned in order (a "layer group" is one `layer.N` / `block.N` of a stack; anything outside the stacks,
e.g. a pooler, comes last), and the statistics of each group are gathered with the groups before it already
pruned, as in the Wanda reference implementation: this costs one calibration forward per group.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..calibration import calibration_sequences, expert_owners, input_norm_statistics, length_batches

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

DEFAULT_HEADS = (
    "classifier",
    "qa_outputs",
    "pooler.dense",
    "cls.predictions.transform.dense",
    "lm_head",
    "score",
)


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
    batches = length_batches(sequences, batch_size)
    report = PruningReport(
        structure=structure if n_m is None else f"{n_m[0]}:{n_m[1]}",
        sparsity=sparsity,
        calibration_sequences=len(sequences),
        calibration_tokens=tokens,
        skipped=[n for n, m in model.named_modules() if type(m) is nn.Linear and n not in set(names)],
    )
    owners = expert_owners(model)
    modules = dict(model.named_modules())
    groups = _layer_groups(names) if sequential else [names]
    progress = _progress(groups, show_progress)
    for group in progress:
        stats = input_norm_statistics(model, batches, group, expert_statistics)
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


__all__ = [
    "DEFAULT_HEADS",
    "EXPERT_SPARSITY_MODES",
    "PruningReport",
    "nm_mask",
    "parse_structure",
    "prunable_linears",
    "prune_wanda",
    "save_pruned",
    "wanda_mask",
    "wanda_scores",
]
