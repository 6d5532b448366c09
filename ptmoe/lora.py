"""LoRA per expert with PEFT: target selection, ESFT-style expert selection and SVD merging of adapters.

    model ──► moe_layers(model) ──► expert_lora_config(model, experts=…) ──► peft.get_peft_model ──► Trainer
                                            ▲
    task data ──► select_experts(model, dataloader, coverage=0.9) ──┘
    trained adapters ──► merge_adapters(peft_model, [...], weights, "merged", rank=r)   (PEFT's SVD merge)

PEFT is used as published: `expert_lora_config` only builds a `peft.LoraConfig` whose `target_modules` is an
explicit regular expression over the model's real module names (PEFT full-matches a string against every module
name), so each selected expert projection gets exactly one adapter and nothing else does.

Layer keys: for encoder-only models (MoE-BERT, MoE-T5 encoder) a MoE layer is named by its integer index in the
stack (`3`); for encoder-decoder models by its stack and index (`"encoder.3"`, `"decoder.1"`). `select_experts`
returns these keys and `expert_lora_config(experts=...)` accepts them.

peft is imported inside the functions: `import ptmoe` stays fast for users who never fine-tune.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .calibration import moe_blocks

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel

EXPERT_PROJECTIONS = ("wi", "wi_0", "wi_1", "wo")

# Attention projections: BERT (`attention.self.query|key|value`, `attention.output.dense`) and T5
# (`SelfAttention` / `EncDecAttention` `.q|.k|.v|.o`). Full-matched, so `.base_layer` children never match.
_ATTENTION_NAME = re.compile(
    r"(?:.*\.)?(?:attention\.self\.(?:query|key|value)|attention\.output\.dense"
    r"|(?:SelfAttention|EncDecAttention)\.[qkvo])"
)
_STACK_LAYER = re.compile(r"(?:^|\.)(encoder|decoder)\.(?:layer|block)\.(\d+)\.")
_DECODER_STACK = re.compile(r"(?:.*\.)?decoder\.(?:layer|block)\.\d+")

# (class-name suffix, PEFT task type, head modules a transformers user expects to train with the adapter)
_TASK_HEADS = (
    ("ForSequenceClassification", "SEQ_CLS", ("classifier",)),
    ("ForTokenClassification", "TOKEN_CLS", ("classifier",)),
    ("ForQuestionAnswering", "QUESTION_ANS", ("qa_outputs",)),
    ("ForConditionalGeneration", "SEQ_2_SEQ_LM", ()),
)


@dataclass(frozen=True)
class MoeLayer:
    """One MoE layer of a model, as the LoRA helpers see it.

    Attributes:
        key (`int` or `str`): the user-facing layer key (`3`, or `"encoder.3"` / `"decoder.1"`).
        name (`str`): name of the sparse MoE block relative to the transformers model (PEFT's key space),
            e.g. `"bert.encoder.layer.3.moe"`.
        num_experts (`int`): routed experts of the layer.
        num_shared_experts (`int`): always-active experts of the layer.
        projections (`tuple[str, ...]`): the expert linears (`("wi", "wo")` or `("wi_0", "wi_1", "wo")`).
    """

    key: int | str
    name: str
    num_experts: int
    num_shared_experts: int
    projections: tuple[str, ...]


def _transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a `PeftModel` (PEFT matches module names relative to it)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def moe_layers(model: nn.Module) -> list[MoeLayer]:
    """The MoE layers of a ptmoe model (or of a `PeftModel` wrapping one), in module order.

    Args:
        model (`nn.Module`): a ptmoe model, possibly wrapped by PEFT.
    """
    model = _transformers_model(model)
    seq2seq = any(_DECODER_STACK.fullmatch(name) for name, _ in model.named_modules())
    layers = []
    for name, module in moe_blocks(model).items():
        match = _STACK_LAYER.search(f"{name}.")
        if match is None:
            raise ValueError(f"Cannot tell the stack and layer index of the MoE block {name!r}")
        stack, index = match.group(1), int(match.group(2))
        shared = getattr(module, "shared_experts", None)
        layers.append(
            MoeLayer(
                key=f"{stack}.{index}" if seq2seq else index,
                name=name,
                num_experts=len(module.experts),
                num_shared_experts=len(shared) if shared is not None else 0,
                projections=tuple(p for p in EXPERT_PROJECTIONS if hasattr(module.experts[0], p)),
            )
        )
    return layers


def _layer_for_key(layers: Sequence[MoeLayer], key: Any) -> MoeLayer:
    by_key = {layer.key: layer for layer in layers}
    lookup = key
    if isinstance(key, str) and key.isdigit() and all(isinstance(k, int) for k in by_key):
        lookup = int(key)  # JSON round trips turn integer keys into strings
    if isinstance(lookup, bool) or lookup not in by_key:
        raise ValueError(
            f"Layer {key!r} is not an MoE layer of this model; its MoE layers are {list(by_key)}"
            + (
                " (encoder-decoder models name layers 'encoder.N' / 'decoder.N')"
                if _has_str_keys(by_key)
                else ""
            )
        )
    return by_key[lookup]


def _has_str_keys(keys: Iterable) -> bool:
    return any(isinstance(k, str) for k in keys)


def _expert_ids(value: Any, layer: MoeLayer) -> list[int]:
    if isinstance(value, str):
        if value != "all":
            raise ValueError(f"Experts of layer {layer.key!r} must be 'all' or a list of ids, got {value!r}")
        return list(range(layer.num_experts))
    ids = sorted(set(value))
    for expert in ids:
        if isinstance(expert, bool) or not isinstance(expert, int):
            raise ValueError(f"Expert ids must be integers, got {expert!r} for layer {layer.key!r}")
        if not 0 <= expert < layer.num_experts:
            raise ValueError(
                f"Expert {expert} of layer {layer.key!r} is out of range: the layer has {layer.num_experts} "
                f"experts (ids 0..{layer.num_experts - 1})"
            )
    return ids


def _resolve_selection(layers: Sequence[MoeLayer], experts: Any) -> dict[int | str, list[int]]:
    """`experts` ("all" or {layer key: ids | "all"}) → {layer key: sorted expert ids}, validated."""
    if isinstance(experts, str):
        if experts != "all":
            raise ValueError(f"`experts` must be 'all' or a dict {{layer: [expert ids]}}, got {experts!r}")
        return {layer.key: list(range(layer.num_experts)) for layer in layers}
    if not isinstance(experts, Mapping):
        raise TypeError(
            f"`experts` must be 'all' or a dict {{layer: [expert ids]}}, got {type(experts).__name__}"
        )
    selection = {}
    for key, value in experts.items():
        layer = _layer_for_key(layers, key)
        selection[layer.key] = _expert_ids(value, layer)
    return selection


def _alternation(items: Iterable) -> str:
    return "(?:" + "|".join(re.escape(str(item)) for item in items) + ")"


def _per_layer_patterns(names: Sequence[str]) -> list[str]:
    """Exact patterns for `names`, merging names that differ only in their layer index (keeps the regex short)."""
    groups: dict[tuple[str, str], list[str]] = {}
    for name in names:
        match = re.fullmatch(r"(.*?\.(?:layer|block)\.)(\d+)(\..*)", name)
        prefix, index, suffix = match.groups() if match else (name, "", "")
        groups.setdefault((prefix, suffix), []).append(index)
    return [
        re.escape(prefix) + (_alternation(indices) if indices != [""] else "") + re.escape(suffix)
        for (prefix, suffix), indices in groups.items()
    ]


def _task_heads(model: nn.Module) -> tuple[str | None, list[str]]:
    """PEFT task type and trainable heads of a model, from its class name (`...ForSequenceClassification`)."""
    class_name = type(model).__name__
    for suffix, task_type, heads in _TASK_HEADS:
        if class_name.endswith(suffix):
            return task_type, [head for head in heads if isinstance(getattr(model, head, None), nn.Module)]
    return None, []


def expert_lora_config(
    model: nn.Module,
    r: int = 8,
    alpha: int = 16,
    experts: str | Mapping[int | str, Sequence[int] | str] = "all",
    projections: Sequence[str] | None = None,
    include_attention: bool = False,
    train_router: bool = False,
    include_shared_experts: bool = False,
    rank_pattern: Mapping[tuple[int | str, int] | str, int] | None = None,
    dropout: float = 0.0,
    **lora_kwargs: Any,
) -> LoraConfig:
    """A `peft.LoraConfig` that puts one LoRA adapter on each selected expert projection of a ptmoe model.

    Pass the result to `peft.get_peft_model(model, config)` (or `ptmoe.prepare_qlora_model` for a 4-bit model).

    Args:
        model (`nn.Module`): the ptmoe model the adapter is for (or a `PeftModel` wrapping it, to add an adapter).
        r (`int`, defaults to 8): LoRA rank.
        alpha (`int`, defaults to 16): LoRA alpha (the update is scaled by `alpha / r`).
        experts (`"all"` or `dict`, defaults to `"all"`): the experts to adapt: every expert of every MoE layer, or
            `{layer key: [expert ids] | "all"}` (keys as returned by `select_experts`: `3`, or `"encoder.3"`).
        projections (`list[str]`, *optional*): expert linears to adapt; default all of them
            (`wi`, `wo`, or `wi_0`, `wi_1`, `wo` for gated experts).
        include_attention (`bool`, defaults to `False`): also adapt the attention projections of every layer
            (BERT `query`/`key`/`value`/`attention.output.dense`; T5 `q`/`k`/`v`/`o`).
        train_router (`bool`, defaults to `False`): train the routers of the selected layers fully (PEFT
            `modules_to_save`: a trainable copy saved with the adapter). Otherwise routers stay frozen.
        include_shared_experts (`bool`, defaults to `False`): also adapt the shared experts of the selected layers.
        rank_pattern (`dict`, *optional*): a rank per expert, `{(layer key, expert id): rank}`; PEFT-style string
            keys (regexes over module names) are passed through after checking they match a targeted module.
        dropout (`float`, defaults to 0.0): LoRA dropout.
        **lora_kwargs: any other `LoraConfig` argument (`init_lora_weights`, `use_rslora`, `alpha_pattern`,
            `modules_to_save`, `task_type`, …). `target_modules` is built here and cannot be passed.

    Task models get the `task_type` PEFT expects and their head in `modules_to_save`, as a transformers user
    would expect: `classifier` for sequence/token classification, `qa_outputs` for question answering. Masked-LM
    heads (tied to the embeddings) and base models get no head.

    Raises:
        ValueError: a rank below 1 or a dropout outside [0, 1), a layer that is not an MoE layer, an expert id out
            of range, an unknown projection, a `rank_pattern` entry outside the selection, or a selection that matches
            no module.
    """
    from peft import LoraConfig

    if "target_modules" in lora_kwargs:
        raise TypeError(
            "`target_modules` is built by expert_lora_config; select modules with `experts=` instead"
        )
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"`r` (the LoRA rank) must be an integer >= 1, got {r!r}")
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"`dropout` must be in [0, 1), got {dropout!r}")
    model = _transformers_model(model)
    layers = moe_layers(model)
    selection = _resolve_selection(layers, experts)
    layer_by_key = {layer.key: layer for layer in layers}

    available = sorted({p for layer in layers for p in layer.projections}, key=EXPERT_PROJECTIONS.index)
    if projections is None:
        chosen_projections = None
    else:
        chosen_projections = list(dict.fromkeys(projections))
        unknown = [p for p in chosen_projections if p not in available]
        if unknown or not chosen_projections:
            raise ValueError(
                f"Unknown expert projections {unknown or projections}: the experts have {available}"
            )

    parts: list[str] = []
    target_names: list[str] = []
    routers: list[str] = []
    for key, ids in selection.items():
        if not ids:
            continue
        layer = layer_by_key[key]
        projs = [p for p in (chosen_projections or layer.projections) if p in layer.projections]
        parts.append(rf"{re.escape(layer.name)}\.experts\.{_alternation(ids)}\.{_alternation(projs)}")
        target_names += [f"{layer.name}.experts.{i}.{p}" for i in ids for p in projs]
        if include_shared_experts and layer.num_shared_experts:
            shared_ids = range(layer.num_shared_experts)
            parts.append(
                rf"{re.escape(layer.name)}\.shared_experts\.{_alternation(shared_ids)}\.{_alternation(projs)}"
            )
            target_names += [f"{layer.name}.shared_experts.{j}.{p}" for j in shared_ids for p in projs]
        if train_router:
            router = model.get_submodule(f"{layer.name}.router")
            if not any(True for _ in router.parameters()):
                raise ValueError(f"The router of layer {key!r} has no parameters to train (hash routing)")
            routers.append(f"{layer.name}.router")
    if include_attention:
        attention = [name for name, _ in model.named_modules() if _ATTENTION_NAME.fullmatch(name)]
        parts += _per_layer_patterns(attention)
        target_names += attention
    if not target_names:
        raise ValueError(
            "The LoRA target selection matches no module: "
            f"experts={experts!r}, include_attention={include_attention} (the model's MoE layers are "
            f"{[layer.key for layer in layers]})"
        )
    target_modules = "(?:" + "|".join(parts) + ")"
    matched = {name for name, _ in model.named_modules() if re.fullmatch(target_modules, name)}
    if matched != set(target_names):  # guards the regex construction itself
        raise RuntimeError(f"LoRA target regex mismatch: {sorted(matched ^ set(target_names))[:6]}")

    task_type, heads = _task_heads(model)
    task_type = lora_kwargs.pop("task_type", task_type)
    modules_to_save = list(
        dict.fromkeys([*heads, *routers, *(lora_kwargs.pop("modules_to_save", None) or [])])
    )

    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        modules_to_save=modules_to_save or None,
        rank_pattern=_peft_rank_pattern(rank_pattern, layers, selection, chosen_projections, target_names),
        task_type=task_type,
        **lora_kwargs,
    )


def _peft_rank_pattern(
    rank_pattern: Mapping | None,
    layers: Sequence[MoeLayer],
    selection: Mapping[int | str, list[int]],
    projections: Sequence[str] | None,
    target_names: Sequence[str],
) -> dict[str, int]:
    """{(layer key, expert): rank} → PEFT's {name regex: rank} (PEFT matches `(.*\\.)?(<key>)$`)."""
    if not rank_pattern:
        return {}
    peft_pattern = {}
    for key, rank in rank_pattern.items():
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank_pattern ranks must be integers >= 1, got {rank!r} for {key!r}")
        if isinstance(key, tuple) and len(key) == 2:
            layer = _layer_for_key(layers, key[0])
            expert = key[1]
            if expert not in selection.get(layer.key, []):
                raise ValueError(
                    f"rank_pattern names expert {expert!r} of layer {key[0]!r}, which is not in the LoRA selection "
                    f"{dict(selection)}"
                )
            projs = [p for p in (projections or layer.projections) if p in layer.projections]
            peft_pattern[rf"{re.escape(layer.name)}\.experts\.{expert}\.{_alternation(projs)}"] = rank
        elif isinstance(key, str):
            if not any(re.match(rf"(.*\.)?({key})$", name) for name in target_names):
                raise ValueError(f"rank_pattern key {key!r} matches none of the targeted modules")
            peft_pattern[key] = rank
        else:
            raise TypeError(
                f"rank_pattern keys must be (layer, expert id) tuples or regex strings, got {key!r}"
            )
    return peft_pattern


# --------------------------------------------------------------------------------------------------------------
# Expert selection from routing statistics (ESFT: Wang et al. 2024, "Let the Expert Stick to His Last")
# --------------------------------------------------------------------------------------------------------------
def _call_model(model: nn.Module, batch: Any, device: torch.device) -> None:
    def move(value):
        return value.to(device) if isinstance(value, torch.Tensor) else value

    if isinstance(batch, Mapping):
        model(**{key: move(value) for key, value in batch.items()})
    elif isinstance(batch, (tuple, list)):
        model(*[move(value) for value in batch])
    else:
        model(move(batch))


@torch.no_grad()
def expert_token_counts(
    model: nn.Module, dataloader: Iterable, max_batches: int | None = None
) -> dict[int | str, torch.Tensor]:
    """Per MoE layer, how many (token, slot) assignments each expert received on `dataloader`.

    Counted with forward hooks on the routers, in eval mode (no jitter or routing noise; Switch routers use their
    eval capacity). Only dispatched slots count: padding and capacity-dropped tokens (`expert_index == -1`) do not.

    Args:
        model (`nn.Module`): a ptmoe model (or a `PeftModel` wrapping one).
        dataloader (iterable): batches as dicts of model inputs (as from a `DataCollator`), tuples, or tensors.
            Encoder-decoder models need decoder inputs (e.g. `labels`) for the decoder layers to be counted.
        max_batches (`int`, *optional*): stop after this many batches.

    Returns:
        `dict[layer key, torch.LongTensor of shape (num_experts,)]`.
    """
    base = _transformers_model(model)
    layers = moe_layers(base)
    if not layers:
        raise ValueError("The model has no MoE layer")
    counts = {layer.key: torch.zeros(layer.num_experts, dtype=torch.long) for layer in layers}

    def make_hook(key, num_experts):
        def hook(module, args, routing):
            index = routing.expert_index  # (B, S, k), -1 = not dispatched
            counts[key] += torch.bincount(index[index >= 0].flatten().cpu(), minlength=num_experts)

        return hook

    handles = [
        base.get_submodule(f"{layer.name}.router").register_forward_hook(
            make_hook(layer.key, layer.num_experts)
        )
        for layer in layers
    ]
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        for step, batch in enumerate(dataloader):
            if max_batches is not None and step >= max_batches:
                break
            _call_model(model, batch, device)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return counts


def experts_for_coverage(
    counts: Mapping[int | str, torch.Tensor | Sequence[int]], coverage: float = 0.9
) -> dict[int | str, list[int]]:
    """Per layer, the smallest set of experts whose share of the assignments reaches `coverage`.

    Experts are taken by decreasing count (ties: lower id first), so the set is unique and deterministic.

    Args:
        counts (`dict`): `{layer key: counts per expert}`, as from `expert_token_counts`.
        coverage (`float`, defaults to 0.9): the share of assignments to cover, in (0, 1].
    """
    if not 0 < coverage <= 1:
        raise ValueError(f"`coverage` must be in (0, 1], got {coverage}")
    selected = {}
    for key, layer_counts in counts.items():
        values = [int(c) for c in layer_counts]
        total = sum(values)
        if total == 0:
            raise ValueError(f"No token reached MoE layer {key!r}: is the dataloader empty?")
        chosen, covered = [], 0
        for expert in sorted(range(len(values)), key=lambda e: (-values[e], e)):
            chosen.append(expert)
            covered += values[expert]
            if covered / total >= coverage - 1e-12:
                break
        selected[key] = sorted(chosen)
    return selected


def select_experts(
    model: nn.Module, dataloader: Iterable, coverage: float = 0.9, max_batches: int | None = None
) -> dict[int | str, list[int]]:
    """ESFT-style expert selection: per MoE layer, the fewest experts that receive `coverage` of the task's tokens.

    Pass the result as `expert_lora_config(model, experts=...)` to fine-tune only the experts the task uses.

    Args:
        model (`nn.Module`): a ptmoe model (or a `PeftModel` wrapping one).
        dataloader (iterable): task batches (see `expert_token_counts`).
        coverage (`float`, defaults to 0.9): share of (non-padding, dispatched) token-slot assignments to cover.
        max_batches (`int`, *optional*): measure on at most this many batches.

    Returns:
        `dict[layer key, list[int]]`: sorted expert ids per MoE layer.
    """
    return experts_for_coverage(expert_token_counts(model, dataloader, max_batches), coverage)


# --------------------------------------------------------------------------------------------------------------
# Combining adapters (PEFT's own SVD merge)
# --------------------------------------------------------------------------------------------------------------
def _max_rank(config) -> int:
    return max([config.r, *(config.rank_pattern or {}).values()])


def merge_adapters(
    peft_model: PeftModel,
    adapter_names: Sequence[str],
    weights: Sequence[float],
    new_name: str,
    rank: int | None = None,
) -> None:
    """Add adapter `new_name` = rank-`rank` SVD of the weighted sum of the LoRA updates of `adapter_names`.

    Uses PEFT's `add_weighted_adapter(..., combination_type="svd")`. For each adapted module it computes
    `ΔW = Σ_i w_i · ΔW_i` (a module adapted by only some adapters gets only their terms — adapters on different
    experts combine into one adapter covering the union) and keeps the best rank-`rank` approximation of `ΔW`
    (Eckart–Young): exact when `rank ≥ rank(ΔW)` (at most `Σ r_i`), otherwise the Frobenius error is
    `sqrt(Σ_{j > rank} σ_j²)` over the discarded singular values. The new adapter has a uniform rank (`rank`,
    default the largest rank of the inputs) and `lora_alpha = rank` (scaling 1). With a single adapter PEFT
    rescales it exactly (`w · ΔW`) instead, keeping its rank. Fully trained modules (`modules_to_save`: heads,
    routers) cannot be averaged and are refused. The new adapter is not activated: `peft_model.set_adapter(new_name)`.

    Args:
        peft_model (`PeftModel`): a model holding LoRA adapters `adapter_names`.
        adapter_names (`list[str]`): adapters to combine.
        weights (`list[float]`): one weight per adapter (negative weights subtract).
        new_name (`str`): name of the new adapter (must not exist).
        rank (`int`, *optional*): rank of the new adapter.
    """
    from peft.utils import ModulesToSaveWrapper

    configs = peft_model.peft_config
    adapter_names, weights = list(adapter_names), [float(w) for w in weights]
    if not adapter_names or len(adapter_names) != len(weights):
        raise ValueError(
            f"Give one weight per adapter: {len(adapter_names)} adapters, {len(weights)} weights"
        )
    missing = [name for name in adapter_names if name not in configs]
    if missing:
        raise ValueError(f"Unknown adapters {missing}; the model has {list(configs)}")
    if new_name in configs:
        raise ValueError(
            f"An adapter named {new_name!r} already exists"
        )  # PEFT would silently keep the old one
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"`rank` must be an integer >= 1, got {rank!r}")
    if len(adapter_names) == 1 and rank is not None and rank != _max_rank(configs[adapter_names[0]]):
        raise ValueError(
            "PEFT rescales a single adapter without SVD, keeping its rank "
            f"{_max_rank(configs[adapter_names[0]])}; `rank={rank}` cannot be applied"
        )
    for name, module in peft_model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            owners = [a for a in adapter_names if a in module.modules_to_save]
            if owners:
                raise ValueError(
                    f"Adapters {owners} fully train {name!r} (modules_to_save), which an SVD merge cannot combine: "
                    "merge adapters trained without heads/routers in modules_to_save"
                )
    peft_model.add_weighted_adapter(
        adapters=adapter_names,
        weights=weights,
        adapter_name=new_name,
        combination_type="svd",
        svd_rank=rank,
        svd_full_matrices=False,  # the truncated SVD is the same; the full one is much slower for big experts
    )


__all__ = [
    "EXPERT_PROJECTIONS",
    "MoeLayer",
    "moe_layers",
    "expert_lora_config",
    "expert_token_counts",
    "experts_for_coverage",
    "select_experts",
    "merge_adapters",
]
