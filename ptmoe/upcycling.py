"""Sparse upcycling: turn a dense BERT / RoBERTa / T5 checkpoint into a ptmoe Mixture-of-Experts checkpoint.

Upcycling (Komatsuzaki et al., ICLR 2023) starts an MoE from a dense model the user already trusts: every weight
outside the feed-forward networks (FFNs) is carried over unchanged, and the FFN of every MoE layer becomes
`num_experts` experts initialised from it. The path through this file::

    dense model / path / Hub id ──► ArchitectureMap (chosen from the dense *class*, never from key names)
        ──► MoE config (dense config + MoE fields + provenance)           validated before any weight is read
        ──► upcycle_state_dict: explicit key map + expert init method   pure function, shape-checked
        ──► MoE model built on the meta device, tensors assigned         no second copy of the weights
        ──► routers / non-persistent buffers initialised by the MoE model itself (seeded)

Initialisation methods (`method=`):

- ``"copy"``: every expert is a copy of the dense FFN (Komatsuzaki et al. 2023). Exact at initialisation when the
  combine weights of a token sum to 1: `router_type="topk"` with `norm_topk_prob=True` (any `router_init`),
  `"noisy_topk"` in eval mode, and `"hash"` (weight 1). Not exact for `"switch"`: its combine weight is the
  router probability of the chosen expert (< 1, so the FFN output is scaled down) and tokens over the expert
  capacity are dropped.
- ``"noise"``: copy, plus Gaussian noise with standard deviation ``noise_std · std(W)`` for every expert tensor
  ``W`` (its own statistics), drawn independently per expert from a seeded generator, to break the symmetry.
- ``"drop"``: Drop-Upcycling (Nakamura et al., ICLR 2025): per expert, a random subset of ``drop_ratio`` of the
  intermediate neurons (a different subset per expert) is re-initialised: their rows of `wi` (or `wi_0`/`wi_1`),
  their `wi` bias entries and their columns of `wo` are drawn from N(mean, std) of the corresponding dense
  matrix; the other neurons stay copies of the dense FFN.
- ``"partition"``: MoEfication (Zhang et al., 2022) / LLaMA-MoE (Zhu et al., 2024): the intermediate neurons are
  split into `num_experts` disjoint groups (`partition="random"`: a seeded permutation; `"clustered"`: balanced
  spherical k-means on the rows of `wi` (or `[wi_0 | wi_1]`), so an expert holds neurons that detect similar
  directions),
  and expert e holds its group's rows of `wi` and columns of `wo`, with ``expert_intermediate_size =
  intermediate_size / num_experts``. Each expert's `wo.weight` is multiplied by `num_experts` and keeps the full
  `wo.bias` (BERT). With `router_init="zeros"` (the default for this method) every router probability is 1/E,
  so with all experts active (`num_experts_per_tok == num_experts`, renormalised top-k) the MoE output is
  ``Σ_e (1/E)·(E·W_e·h_e + b) = W·h + b``: exactly the dense FFN. With k < E and the uniform weights 1/k of a
  zero router the output is ``(E/k)·Σ_{chosen} W_e·h_e + b``, whose expectation over a uniformly random choice of
  k experts is again the dense FFN, while the active compute shrinks to k/E of it.

"Exact" means on real tokens: MoE layers send padding tokens to no expert, so padding positions' own hidden states
differ from the dense model's (they are masked out of attention and of every loss).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, PreTrainedModel

from .models.moe import ROUTER_TYPES, check_local_checkpoint, count_parameters
from .outputs import check_output_dir, staged_output_dir

logger = logging.getLogger(__name__)

UPCYCLING_METHODS = ("copy", "noise", "drop", "partition")
PARTITION_STRATEGIES = ("random", "clustered", "coactivation")
# Splits that need the FFN activations of the dense model on calibration text.
CALIBRATED_STRATEGIES = ("coactivation",)
_KMEANS_ITERATIONS = 25


# --------------------------------------------------------------------------------------------------------------
# Explicit per-architecture maps
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FfnStack:
    """Where the feed-forward networks of one layer stack live, in MoE key space (after `renames`).

    Attributes:
        name (`str`): "encoder" or "decoder" (used for seeding and messages).
        layer_prefix (`str`): key prefix of layer `{layer}`, e.g. ``"bert.encoder.layer.{layer}."``.
        layers_attr (`str`): the MoE config property listing this stack's MoE layers.
        num_layers_attr (`str`): the config field with the stack's number of layers.
        dense_ffn (`dict`): expert projection → dense module path under the layer prefix, e.g.
            ``{"wi": "intermediate.dense", "wo": "output.dense"}``.
        moe_block (`str`): the MoE block's path under the layer prefix.
    """

    name: str
    layer_prefix: str
    layers_attr: str
    num_layers_attr: str
    dense_ffn: Mapping[str, str]
    moe_block: str = "moe."


@dataclass(frozen=True)
class ArchitectureMap:
    """How one dense transformers architecture becomes a ptmoe MoE architecture.

    Attributes:
        dense_class (`str`): the transformers class name of the dense model, e.g. ``"BertForMaskedLM"``.
        moe_class (`str`): the ptmoe class it becomes, e.g. ``"MoeBertForMaskedLM"``.
        family (`str`): key of `FAMILIES` ("bert", "roberta", "xlm-roberta", "t5").
        stacks (`tuple[FfnStack, ...]`): the FFN stacks of this architecture.
        renames (`tuple[tuple[str, str], ...]`): dense key prefix → MoE key prefix, first match wins; keys
            matching none keep their name.
        dropped (`tuple[str, ...]`): dense key prefixes without an MoE counterpart (dropped with a message).
        note (`str`, *optional*): what the conversion does beyond a 1:1 carry-over (logged).
    """

    dense_class: str
    moe_class: str
    family: str
    stacks: tuple[FfnStack, ...]
    renames: tuple[tuple[str, str], ...] = ()
    dropped: tuple[str, ...] = ()
    note: str | None = None


@dataclass(frozen=True)
class Family:
    """A dense model family: its `model_type`s, the MoE config class and the dense class for each task.

    Attributes:
        positions_from_padding_idx (`bool`): the dense embeddings number positions from ``pad_token_id + 1``
            (RoBERTa); the first ``pad_token_id + 1`` rows of the position table are dropped (see
            `_roberta_config_fields`).
    """

    model_types: tuple[str, ...]
    config_module: str
    config_class: str
    modeling_module: str
    intermediate_attr: str
    tasks: Mapping[str, str]
    default_task: str
    positions_from_padding_idx: bool = False


def _bert_stack(prefix: str) -> FfnStack:
    return FfnStack(
        name="encoder",
        layer_prefix=prefix + "encoder.layer.{layer}.",
        layers_attr="moe_layer_indices",
        num_layers_attr="num_hidden_layers",
        dense_ffn={"wi": "intermediate.dense", "wo": "output.dense"},
    )


_T5_ENCODER = FfnStack(
    name="encoder",
    layer_prefix="encoder.block.{layer}.layer.1.",
    layers_attr="encoder_moe_layer_indices",
    num_layers_attr="num_layers",
    dense_ffn={
        "wi": "DenseReluDense.wi",
        "wi_0": "DenseReluDense.wi_0",
        "wi_1": "DenseReluDense.wi_1",
        "wo": "DenseReluDense.wo",
    },
)
_T5_DECODER = FfnStack(
    name="decoder",
    layer_prefix="decoder.block.{layer}.layer.2.",  # layer.0 self-attention, layer.1 cross-attention
    layers_attr="decoder_moe_layer_indices",
    num_layers_attr="num_decoder_layers",
    dense_ffn=_T5_ENCODER.dense_ffn,
)

_BERT_TASKS = {
    "base": "Model",
    "masked-lm": "ForMaskedLM",
    "sequence-classification": "ForSequenceClassification",
    "token-classification": "ForTokenClassification",
    "question-answering": "ForQuestionAnswering",
}


def _bert_like_family(model_type: str, class_prefix: str, positions_from_padding_idx: bool = False) -> Family:
    """BERT and its RoBERTa variants all become MoE-BERT; only the dense class names and positions differ."""
    return Family(
        model_types=(model_type,),
        config_module="ptmoe.models.configuration_moe_bert",
        config_class="MoeBertConfig",
        modeling_module="ptmoe.models.modeling_moe_bert",
        intermediate_attr="intermediate_size",
        tasks={task: f"{class_prefix}{suffix}" for task, suffix in _BERT_TASKS.items()},
        default_task="masked-lm",
        positions_from_padding_idx=positions_from_padding_idx,
    )


FAMILIES: dict[str, Family] = {
    "bert": _bert_like_family("bert", "Bert"),
    "roberta": _bert_like_family("roberta", "Roberta", positions_from_padding_idx=True),
    "xlm-roberta": _bert_like_family("xlm-roberta", "XLMRoberta", positions_from_padding_idx=True),
    "t5": Family(
        model_types=("t5",),
        config_module="ptmoe.models.configuration_moe_t5",
        config_class="MoeT5Config",
        modeling_module="ptmoe.models.modeling_moe_t5",
        intermediate_attr="d_ff",
        tasks={
            "base": "T5Model",
            "seq2seq-lm": "T5ForConditionalGeneration",
            "text-encoding": "T5EncoderModel",
        },
        default_task="seq2seq-lm",
    ),
}


def _bert_maps() -> list[ArchitectureMap]:
    maps = [
        ArchitectureMap("BertModel", "MoeBertModel", "bert", (_bert_stack(""),)),
        ArchitectureMap(
            "BertForPreTraining",
            "MoeBertForMaskedLM",
            "bert",
            (_bert_stack("bert."),),
            dropped=("cls.seq_relationship.", "bert.pooler."),
            note=(
                "BertForPreTraining → MoeBertForMaskedLM: the masked-LM head is kept; the next-sentence-prediction "
                "head (cls.seq_relationship) and the pooler (trained only through it) are dropped. To keep the "
                "pooler, upcycle the checkpoint path with task='sequence-classification'."
            ),
        ),
    ]
    for suffix in (
        "ForMaskedLM",
        "ForSequenceClassification",
        "ForTokenClassification",
        "ForQuestionAnswering",
    ):
        maps.append(ArchitectureMap(f"Bert{suffix}", f"MoeBert{suffix}", "bert", (_bert_stack("bert."),)))
    return maps


def _roberta_maps(family: str, class_prefix: str) -> list[ArchitectureMap]:
    """RoBERTa-style encoders → MoE-BERT (see `_roberta_config_fields` for the position-embedding offset)."""
    base = ("roberta.", "bert.")
    lm_head = (
        ("lm_head.dense.", "cls.predictions.transform.dense."),
        ("lm_head.layer_norm.", "cls.predictions.transform.LayerNorm."),
        ("lm_head.decoder.", "cls.predictions.decoder."),
        ("lm_head.bias", "cls.predictions.bias"),
    )
    # RoBERTa's classification head is dropout → dense → tanh → dropout → out_proj on the <s> token; MoE-BERT's is
    # pooler (dense → tanh on the first token) → dropout → classifier: the same function in eval mode.
    classifier = (("classifier.dense.", "bert.pooler.dense."), ("classifier.out_proj.", "classifier."))
    return [
        ArchitectureMap(f"{class_prefix}Model", "MoeBertModel", family, (_bert_stack(""),)),
        ArchitectureMap(
            f"{class_prefix}ForMaskedLM",
            "MoeBertForMaskedLM",
            family,
            (_bert_stack("bert."),),
            (base, *lm_head),
        ),
        ArchitectureMap(
            f"{class_prefix}ForSequenceClassification",
            "MoeBertForSequenceClassification",
            family,
            (_bert_stack("bert."),),
            (*classifier, base),
            note=(
                f"{class_prefix}ForSequenceClassification → MoeBertForSequenceClassification: the classification "
                "head's dense layer becomes the pooler and out_proj the classifier (identical in eval mode; "
                "in training MoE-BERT applies one dropout fewer, after the pooler only)."
            ),
        ),
        ArchitectureMap(
            f"{class_prefix}ForTokenClassification",
            "MoeBertForTokenClassification",
            family,
            (_bert_stack("bert."),),
            (base,),
        ),
        ArchitectureMap(
            f"{class_prefix}ForQuestionAnswering",
            "MoeBertForQuestionAnswering",
            family,
            (_bert_stack("bert."),),
            (base,),
        ),
    ]


def _t5_maps() -> list[ArchitectureMap]:
    return [
        ArchitectureMap("T5Model", "MoeT5Model", "t5", (_T5_ENCODER, _T5_DECODER)),
        ArchitectureMap(
            "T5ForConditionalGeneration", "MoeT5ForConditionalGeneration", "t5", (_T5_ENCODER, _T5_DECODER)
        ),
        ArchitectureMap("T5EncoderModel", "MoeT5EncoderModel", "t5", (_T5_ENCODER,)),
    ]


SUPPORTED_ARCHITECTURES: dict[str, ArchitectureMap] = {
    m.dense_class: m
    for m in (
        *_bert_maps(),
        *_roberta_maps("roberta", "Roberta"),
        *_roberta_maps("xlm-roberta", "XLMRoberta"),
        *_t5_maps(),
    )
}


def _supported_list() -> str:
    return ", ".join(f"{name} → {m.moe_class}" for name, m in SUPPORTED_ARCHITECTURES.items())


def _unsupported(what: str, hint: str = "") -> ValueError:
    return ValueError(f"Cannot upcycle {what}. Supported dense architectures: {_supported_list()}.{hint}")


def _family_of_model_type(model_type: str | None) -> str | None:
    for name, family in FAMILIES.items():
        if model_type in family.model_types:
            return name
    return None


def architecture_for_model(dense: PreTrainedModel) -> ArchitectureMap:
    """The `ArchitectureMap` of a dense model instance, from its class and `config.model_type`.

    Args:
        dense (`PreTrainedModel`): a transformers model, e.g. a `BertForMaskedLM`.

    Raises:
        `ValueError` listing the supported architectures when the class (or its model type) is not supported.
    """
    name = type(dense).__name__
    arch = SUPPORTED_ARCHITECTURES.get(name)
    model_type = getattr(dense.config, "model_type", None)
    if arch is None or model_type not in FAMILIES[arch.family].model_types:
        raise _unsupported(f"a {name} (model_type {model_type!r})")
    return arch


# Names that older checkpoints still carry in `config.architectures` (PTT5's config says "T5WithLMHeadModel").
_LEGACY_ARCHITECTURES = {"T5WithLMHeadModel": "T5ForConditionalGeneration"}


def architecture_for_checkpoint(dense_config, task: str | None = None) -> ArchitectureMap:
    """The `ArchitectureMap` to use for a checkpoint, from its config's `model_type` and `architectures` or `task`.

    Args:
        dense_config: the checkpoint's transformers config.
        task (`str`, *optional*): which dense class to load: "base", "masked-lm", "sequence-classification",
            "token-classification", "question-answering" (BERT/RoBERTa) or "base", "seq2seq-lm", "text-encoding"
            (T5). Defaults to the checkpoint's own architecture (`config.architectures[0]`); a
            `BertForPreTraining` checkpoint (BERTimbau's format) and a checkpoint without `architectures` default
            to "masked-lm" (BERT/RoBERTa) or "seq2seq-lm" (T5).
    """
    model_type = getattr(dense_config, "model_type", None)
    family_name = _family_of_model_type(model_type)
    architectures = list(getattr(dense_config, "architectures", None) or [])
    if family_name is None:
        raise _unsupported(f"a checkpoint of model_type {model_type!r} (architectures {architectures})")
    family = FAMILIES[family_name]
    if task is None:
        declared = architectures[0] if architectures else None
        declared = _LEGACY_ARCHITECTURES.get(declared, declared)
        if declared in family.tasks.values():
            return SUPPORTED_ARCHITECTURES[declared]
        if declared is not None and declared not in SUPPORTED_ARCHITECTURES:
            raise _unsupported(
                f"a checkpoint whose architecture is {declared}",
                f" Or pass `task=` (one of {sorted(family.tasks)}) to load one of its supported heads.",
            )
        if declared == "BertForPreTraining":
            logger.warning(SUPPORTED_ARCHITECTURES[declared].note)
        task = family.default_task
    if task not in family.tasks:
        raise ValueError(
            f"`task` must be one of {sorted(family.tasks)} for a {model_type} checkpoint, got {task!r}"
        )
    return SUPPORTED_ARCHITECTURES[family.tasks[task]]


def _import(module: str, name: str):
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:  # e.g. a family whose modeling file is not installed
        raise ImportError(f"{module}.{name} is not available in this ptmoe installation: {error}") from error


def moe_class_for(arch: ArchitectureMap) -> type[PreTrainedModel]:
    """The ptmoe model class an architecture upcycles into."""
    return _import(FAMILIES[arch.family].modeling_module, arch.moe_class)


# --------------------------------------------------------------------------------------------------------------
# MoE config
# --------------------------------------------------------------------------------------------------------------
_CONFIG_BOOKKEEPING = ("model_type", "transformers_version", "architectures", "auto_map", "_name_or_path")
_PROVENANCE = ("upcycled_from", "upcycling_method", "upcycling_seed")


def _roberta_config_fields(fields: dict, arch: ArchitectureMap) -> dict:
    """RoBERTa numbers positions from ``padding_idx + 1``; MoE-BERT (BERT's embeddings) from 0.

    Dropping the first ``padding_idx + 1`` rows of the position table makes MoE-BERT position j use RoBERTa's
    position ``padding_idx + 1 + j``: identical outputs for unpadded and right-padded inputs (RoBERTa gives padding
    tokens the padding position, MoE-BERT counts on, but padding tokens are masked out of attention, so only their
    own, ignored, hidden states differ). Left-padded batches would shift RoBERTa's positions and are not equivalent.
    """
    offset = fields["pad_token_id"] + 1
    fields["max_position_embeddings"] = fields["max_position_embeddings"] - offset
    if arch.moe_class == "MoeBertForMaskedLM" and fields.get("hidden_act") != "gelu":
        # RobertaLMHead always applies exact GELU; BERT's MLM head applies `hidden_act`.
        raise ValueError(
            f"Cannot upcycle {arch.dense_class} with hidden_act={fields.get('hidden_act')!r} exactly: its MLM head "
            "always uses 'gelu' while MoE-BERT's uses `hidden_act`. Upcycle the base model (task='base') instead."
        )
    return fields


def build_moe_config(
    dense_config,
    arch: ArchitectureMap,
    *,
    num_experts: int,
    num_experts_per_tok: int,
    moe_layers: int | Sequence[int] | None,
    encoder_moe_layers: int | Sequence[int] | None,
    decoder_moe_layers: int | Sequence[int] | None,
    router_type: str,
    router_init: str,
    method: str,
    seed: int,
    source: str,
    overrides: Mapping,
    num_shared_neurons: int = 0,
):
    """The MoE config of an upcycled model: every dense config field, the MoE fields and the provenance.

    The MoE config class validates every MoE field (a `ValueError` naming it) before any weight is read.
    """
    family = FAMILIES[arch.family]
    config_class = _import(family.config_module, family.config_class)
    fields = {k: v for k, v in dense_config.to_dict().items() if k not in _CONFIG_BOOKKEEPING}
    if family.positions_from_padding_idx:
        fields = _roberta_config_fields(fields, arch)
    for name in _PROVENANCE:
        if name in overrides:
            raise ValueError(f"`{name}` is written by upcycle itself and cannot be overridden")
    if overrides.get("num_shared_experts", 0):
        raise ValueError(
            "`num_shared_experts` > 0 is not supported by upcycle: shared experts would add a second copy of the "
            "dense FFN to every token's output, so no initialisation reproduces the dense model. For a shared expert "
            "of the most important neurons use method='partition' with `num_shared_neurons`"
        )
    intermediate_size = fields[family.intermediate_attr]
    expert_intermediate_size = overrides.get("expert_intermediate_size")
    shared_fields = {}
    if num_shared_neurons and method != "partition":
        raise ValueError(f"`num_shared_neurons` is for method='partition', got method={method!r}")
    if method == "partition":
        if num_shared_neurons >= intermediate_size:
            raise ValueError(
                f"`num_shared_neurons` ({num_shared_neurons}) must be smaller than the {intermediate_size} intermediate "
                f"neurons ({family.intermediate_attr}): the rest are split between the routed experts"
            )
        routed_size = intermediate_size - num_shared_neurons
        if routed_size % num_experts != 0:
            raise ValueError(
                f"method='partition' splits the {routed_size} intermediate neurons ({family.intermediate_attr}"
                f"{f' minus {num_shared_neurons} shared neurons' if num_shared_neurons else ''}) into "
                f"num_experts={num_experts} equal experts, but {routed_size} is not divisible by {num_experts}; "
                "choose a num_experts (or num_shared_neurons) that makes it divisible"
            )
        if expert_intermediate_size not in (None, routed_size // num_experts):
            raise ValueError(
                f"method='partition' sets expert_intermediate_size = {routed_size} / {num_experts} = "
                f"{routed_size // num_experts}; got expert_intermediate_size={expert_intermediate_size}"
            )
        expert_intermediate_size = routed_size // num_experts
        if num_shared_neurons:
            shared_fields = {"num_shared_experts": 1, "shared_expert_intermediate_size": num_shared_neurons}
    elif expert_intermediate_size not in (None, intermediate_size):
        raise ValueError(
            f"method={method!r} copies the dense FFN, so expert_intermediate_size must be {intermediate_size} "
            f"({family.intermediate_attr}); got {expert_intermediate_size}. Use method='partition' for smaller experts."
        )

    stack_names = {stack.name for stack in arch.stacks}
    if "decoder" not in stack_names and decoder_moe_layers:
        raise ValueError(f"{arch.dense_class} has no decoder: `decoder_moe_layers` must be None or []")
    if arch.family == "t5":
        layers = {
            "encoder_moe_layers": moe_layers if encoder_moe_layers is None else encoder_moe_layers,
            # An encoder-only model has no decoder FFN to upcycle.
            "decoder_moe_layers": (moe_layers if decoder_moe_layers is None else decoder_moe_layers)
            if "decoder" in stack_names
            else [],
        }
    else:
        if encoder_moe_layers is not None or decoder_moe_layers is not None:
            raise ValueError(
                "`encoder_moe_layers` / `decoder_moe_layers` are for T5; use `moe_layers` for an encoder"
            )
        layers = {"moe_layers": moe_layers}
    moe_fields = {
        "num_experts": num_experts,
        "num_experts_per_tok": num_experts_per_tok,
        "router_type": router_type,
        "router_init": router_init,
        "expert_intermediate_size": expert_intermediate_size,
        "upcycled_from": source,
        "upcycling_method": method,
        "upcycling_seed": seed,
        **layers,
        **shared_fields,
    }
    overrides = {k: v for k, v in overrides.items() if k != "expert_intermediate_size"}
    return config_class(**{**fields, **moe_fields, **overrides})


# --------------------------------------------------------------------------------------------------------------
# Expert initialisation (pure functions of the dense FFN of one layer)
# --------------------------------------------------------------------------------------------------------------
def _derived_seed(seed: int, *parts) -> int:
    """A seed for one (stack, layer, purpose), independent of the order in which layers are processed."""
    digest = hashlib.sha256(":".join(str(p) for p in (seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def _generator(seed: int, *parts) -> torch.Generator:
    return torch.Generator().manual_seed(_derived_seed(seed, *parts))


def _input_roles(ffn: Mapping[str, torch.Tensor]) -> list[str]:
    """The projections whose *rows* are intermediate neurons (`wi`, or `wi_0` and `wi_1`)."""
    return sorted({key.split(".")[0] for key in ffn if key.startswith("wi")})


def _stats(tensor: torch.Tensor) -> tuple[float, float]:
    values = tensor.float()
    return values.mean().item(), (values.std().item() if values.numel() > 1 else 0.0)


def _normal(shape, mean: float, std: float, like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # Drawn in fp32 on the CPU generator, then cast, so that a seed gives the same experts for every dtype/device.
    values = torch.empty(shape, dtype=torch.float32).normal_(mean, std, generator=generator)
    return values.to(dtype=like.dtype, device=like.device)


def _copy_experts(ffn, num_experts: int, clone: bool) -> list[dict[str, torch.Tensor]]:
    # Without `clone` (the dense model is ours and discarded afterwards) expert 0 reuses the dense tensors.
    return [
        {key: tensor if (expert == 0 and not clone) else tensor.clone() for key, tensor in ffn.items()}
        for expert in range(num_experts)
    ]


def _noise_experts(ffn, num_experts: int, noise_std: float, generator) -> list[dict[str, torch.Tensor]]:
    scales = {key: noise_std * _stats(tensor)[1] for key, tensor in ffn.items()}
    experts = []
    for _ in range(num_experts):
        expert = {}
        for key, tensor in ffn.items():
            noise = _normal(tensor.shape, 0.0, scales[key], tensor, generator) if scales[key] > 0 else None
            expert[key] = tensor.clone() if noise is None else noise.add_(tensor)
        experts.append(expert)
    return experts


def _drop_experts(ffn, num_experts: int, drop_ratio: float, generator) -> list[dict[str, torch.Tensor]]:
    intermediate_size = ffn["wo.weight"].shape[1]
    num_dropped = max(1, int(drop_ratio * intermediate_size))  # ⌊r·d_ff⌋ as in the paper, at least one neuron
    # Statistics of the *dense* matrices (Nakamura et al. 2025, §3.2), one (mean, std) per tensor.
    neuron_tensors = [key for key in ffn if key.startswith("wi")] + ["wo.weight"]
    stats = {key: _stats(ffn[key]) for key in neuron_tensors}
    experts = []
    for _ in range(num_experts):
        dropped = torch.randperm(intermediate_size, generator=generator)[:num_dropped]
        expert = {key: tensor.clone() for key, tensor in ffn.items()}
        for key in neuron_tensors:
            mean, std = stats[key]
            tensor = expert[key]
            if key == "wo.weight":  # (hidden, intermediate): neurons are columns
                tensor[:, dropped] = _normal((tensor.shape[0], num_dropped), mean, std, tensor, generator)
            else:  # wi / wi_0 / wi_1 weight (intermediate, hidden) rows, or their bias entries
                tensor[dropped] = _normal((num_dropped, *tensor.shape[1:]), mean, std, tensor, generator)
        experts.append(expert)
    return experts


def _balanced_assignment(similarity: torch.Tensor, size: int) -> torch.Tensor:
    """Assign every row to a cluster, `size` rows per cluster, preferring each row's most similar open cluster.

    Rounds of proposals: every unassigned row proposes to its most similar cluster that still has room, and each
    cluster accepts its most similar proposers up to its remaining room. Every round fills a cluster or assigns all
    proposers, so there are at most `num_clusters` rounds (vectorised; no Python loop over rows).

    Args:
        similarity (`torch.Tensor` of shape `(N, C)`): row-to-centroid similarity.
        size (`int`): rows per cluster (`N = C · size`).

    Returns:
        `(N,)` `LongTensor` of cluster ids.
    """
    num_items, num_clusters = similarity.shape
    assignment = torch.full((num_items,), -1, dtype=torch.long)
    remaining = torch.full((num_clusters,), size, dtype=torch.long)
    while True:
        unassigned = (assignment < 0).nonzero().squeeze(-1)
        if unassigned.numel() == 0:
            return assignment
        scores = similarity[unassigned].masked_fill(remaining.eq(0), float("-inf"))  # (U, C)
        best_score, choice = scores.max(dim=1)
        for cluster in choice.unique().tolist():
            proposing = choice.eq(cluster)
            order = torch.argsort(best_score[proposing], descending=True, stable=True)
            accepted = unassigned[proposing][order[: int(remaining[cluster])]]
            assignment[accepted] = cluster
            remaining[cluster] -= accepted.numel()


def balanced_kmeans(
    features: torch.Tensor, num_clusters: int, generator: torch.Generator
) -> list[torch.Tensor]:
    """Split the rows of `features` into `num_clusters` equal-size clusters by balanced spherical k-means.

    Rows are compared by cosine similarity (rows and centroids are L2-normalised), so a cluster gathers rows that
    point in similar directions whatever their norm.

    Args:
        features (`torch.Tensor` of shape `(N, D)`): one row per item; `N` must be divisible by `num_clusters`.
        num_clusters (`int`): number of clusters.
        generator (`torch.Generator`): seeds the initial centroids (distinct random rows).

    Returns:
        `num_clusters` sorted `LongTensor`s of `N / num_clusters` row indices each, disjoint and covering all rows.
    """
    num_items = features.shape[0]
    if num_items % num_clusters != 0:
        raise ValueError(f"cannot split {num_items} rows into {num_clusters} equal clusters")
    size = num_items // num_clusters
    features = torch.nn.functional.normalize(features.float(), dim=1)
    centroids = features[torch.randperm(num_items, generator=generator)[:num_clusters]]
    assignment = None
    for _ in range(_KMEANS_ITERATIONS):
        new_assignment = _balanced_assignment(features @ centroids.T, size)  # similarity (N, C)
        if assignment is not None and torch.equal(new_assignment, assignment):
            break
        assignment = new_assignment
        members = torch.nn.functional.one_hot(assignment, num_clusters).T.to(features.dtype)  # (C, N)
        centroids = torch.nn.functional.normalize(
            members @ features, dim=1
        )  # a matmul beats index_add_ on CPU
    return [(assignment == c).nonzero().squeeze(-1) for c in range(num_clusters)]


def partition_groups(
    ffn: Mapping[str, torch.Tensor],
    num_experts: int,
    strategy: str,
    generator: torch.Generator,
    activations: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Disjoint groups of intermediate neurons, one per expert (sorted indices, equal sizes).

    Args:
        ffn (`dict`): the dense FFN of one layer (`wi.weight`, …, `wo.weight`).
        num_experts (`int`): number of groups; must divide the intermediate size.
        strategy (`str`): "random" (a seeded permutation), "clustered" (balanced spherical k-means on the rows of
            the input projection(s), `wi` or `[wi_0 | wi_1]`) or "coactivation" (balanced spherical k-means on the
            neurons' positive activations over calibration tokens: neurons that fire on the same tokens share an
            expert, MoEfication's co-activation split with k-means in place of graph partitioning).
        generator (`torch.Generator`): the layer's seeded generator.
        activations (`torch.Tensor` of shape `(T, I)`, *optional*): the layer's activations on calibration tokens
            (needed by "coactivation").
    """
    intermediate_size = ffn["wo.weight"].shape[1]
    if intermediate_size % num_experts != 0:
        raise ValueError(
            f"method='partition' cannot split {intermediate_size} intermediate neurons into {num_experts} experts"
        )
    if strategy == "random":
        groups = torch.randperm(intermediate_size, generator=generator).view(num_experts, -1)
        return [group.sort().values for group in groups]
    if strategy == "coactivation":
        if activations is None:
            raise ValueError("partition='coactivation' needs calibration text (`calibration=`)")
        # (I, T): a neuron's firing pattern; cosine similarity of two patterns = their normalised co-activation.
        features = activations.float().clamp(min=0).T
        # A neuron that never fires on the calibration text has a zero pattern: a tiny random direction keeps
        # k-means defined for it (it joins an arbitrary group).
        features = features + 1e-6 * torch.rand(features.shape, generator=generator)
        return balanced_kmeans(features, num_experts, generator)
    rows = torch.cat([ffn[f"{role}.weight"] for role in _input_roles(ffn)], dim=1)  # (I, H) or (I, 2H)
    return balanced_kmeans(rows, num_experts, generator)


def neuron_importance(ffn: Mapping[str, torch.Tensor], activations: torch.Tensor) -> torch.Tensor:
    """`(I,)` importance of each intermediate neuron: its mean contribution to the FFN output on calibration tokens.

    ``importance_i = mean_t |a_ti| · ‖wo[:, i]‖₂`` — the expected norm of what neuron i adds to the output. MoEBERT
    (Zuo et al. 2022) ranks neurons by a gradient sensitivity on task data; this label-free proxy needs only
    unlabeled text and ranks the same way when the loss is locally linear in the FFN output.
    """
    return activations.float().abs().mean(dim=0) * ffn["wo.weight"].float().norm(dim=0)


def split_ffn(
    ffn: Mapping[str, torch.Tensor],
    num_experts: int,
    strategy: str,
    generator: torch.Generator,
    *,
    num_shared_neurons: int = 0,
    activations: torch.Tensor | None = None,
    combine_weights: str = "router",
    num_experts_per_tok: int | None = None,
) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor] | None]:
    """Split one dense FFN into `num_experts` routed experts (+ one shared expert of the top neurons).

    With `num_shared_neurons = S > 0`, the S most important neurons (`neuron_importance`) form an always-active
    shared expert holding the full output bias; the other ``I - S`` neurons are split by `strategy`. The layout is
    exact with all experts active:

    - `combine_weights="router"` (uniform router, renormalised weights 1/E): routed `wo` weights are scaled by E;
      without shared neurons each routed expert keeps the full bias (Σ 1/E · b = b).
    - `combine_weights="ones"` (chosen experts summed, MoEfication): routed `wo` weights unscaled; without shared
      neurons each routed expert holds ``b / k``, so the k chosen experts add the bias once.

    Returns:
        `(experts, shared)`: one dict per routed expert and the shared expert's dict (or None when S = 0).
    """
    intermediate_size = ffn["wo.weight"].shape[1]
    neurons = torch.arange(intermediate_size)
    shared_neurons = None
    if num_shared_neurons:
        if activations is None:
            raise ValueError(
                "`num_shared_neurons` > 0 ranks neurons on calibration text: pass `calibration=`"
            )
        ranked = torch.argsort(neuron_importance(ffn, activations), descending=True, stable=True)
        shared_neurons = ranked[:num_shared_neurons].sort().values
        neurons = ranked[num_shared_neurons:].sort().values
    routed_ffn = {
        key: (tensor.index_select(1, neurons) if key == "wo.weight" else tensor.index_select(0, neurons))
        if key != "wo.bias"
        else tensor
        for key, tensor in ffn.items()
    }
    routed_activations = activations.index_select(1, neurons) if activations is not None else None
    groups = [
        neurons[g] for g in partition_groups(routed_ffn, num_experts, strategy, generator, routed_activations)
    ]
    scale = num_experts if combine_weights == "router" else 1
    k = num_experts_per_tok or num_experts
    experts = []
    for group in groups:
        expert = {}
        for key, tensor in ffn.items():
            if key == "wo.weight":
                expert[key] = tensor.index_select(1, group).mul_(scale)
            elif key == "wo.bias":
                if shared_neurons is not None:
                    expert[key] = torch.zeros_like(tensor)  # the shared expert adds the bias
                else:
                    expert[key] = tensor.clone() if combine_weights == "router" else tensor / k
            else:
                expert[key] = tensor.index_select(0, group)
        experts.append(expert)
    shared = None
    if shared_neurons is not None:
        shared = {
            key: tensor.index_select(1, shared_neurons)
            if key == "wo.weight"
            else (tensor.clone() if key == "wo.bias" else tensor.index_select(0, shared_neurons))
            for key, tensor in ffn.items()
        }
    return experts, shared


def _partition_experts(ffn, num_experts: int, strategy: str, generator) -> list[dict[str, torch.Tensor]]:
    return split_ffn(ffn, num_experts, strategy, generator)[0]


def init_experts(
    ffn: Mapping[str, torch.Tensor],
    num_experts: int,
    method: str = "copy",
    generator: torch.Generator | None = None,
    noise_std: float = 0.01,
    drop_ratio: float = 0.5,
    partition: str = "random",
    clone: bool = True,
) -> list[dict[str, torch.Tensor]]:
    """Initialise the experts of one MoE layer from the dense FFN of that layer.

    Args:
        ffn (`dict[str, torch.Tensor]`): the dense FFN in expert naming: `"wi.weight"` (intermediate, hidden),
            optional `"wi.bias"`, or `"wi_0.weight"` / `"wi_1.weight"` (gated); `"wo.weight"` (hidden,
            intermediate), optional `"wo.bias"`.
        num_experts (`int`): number of experts to build.
        method (`str`): "copy", "noise", "drop" or "partition" (see the module docstring).
        generator (`torch.Generator`, *optional*): source of randomness (a fresh seed-0 generator when omitted).
        noise_std (`float`): "noise": noise standard deviation relative to each tensor's standard deviation.
        drop_ratio (`float`): "drop": fraction of intermediate neurons re-initialised per expert, in (0, 1].
        partition (`str`): "partition": "random" or "clustered".
        clone (`bool`): "copy": when False expert 0 shares the dense tensors (for a dense model being discarded).

    Returns:
        One `dict` per expert with the keys of `ffn`.
    """
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    if method == "copy":
        return _copy_experts(ffn, num_experts, clone)
    if method == "noise":
        return _noise_experts(ffn, num_experts, noise_std, generator)
    if method == "drop":
        return _drop_experts(ffn, num_experts, drop_ratio, generator)
    if method == "partition":
        return _partition_experts(ffn, num_experts, partition, generator)
    raise ValueError(f"`method` must be one of {UPCYCLING_METHODS}, got {method!r}")


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
            (from `ptmoe.sparsify.collect_ffn_activations`), for the co-activation split and `num_shared_neurons`.
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


# --------------------------------------------------------------------------------------------------------------
# Building the MoE model without a second copy of the weights
# --------------------------------------------------------------------------------------------------------------
def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor, is_parameter: bool) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if is_parameter:
        module._parameters[attr] = tensor
    else:
        module._buffers[attr] = tensor


def _assign(model: PreTrainedModel, tensors: Mapping[str, torch.Tensor]) -> None:
    """Put `tensors` into a meta-device `model` as its parameters/buffers, keeping the model's tied weights tied."""
    replaced: dict[int, nn.Parameter] = {}
    for name, old in model.named_parameters(remove_duplicate=False):
        if name not in tensors:
            continue
        if id(old) in replaced:  # a tied weight: the model shares one Parameter between two names
            new = replaced[id(old)]
            if tensors[name].data_ptr() != new.data_ptr() and not torch.equal(tensors[name], new.data):
                raise ValueError(
                    f"the MoE model ties {name!r} to another weight, but the dense weights differ"
                )
        else:
            new = nn.Parameter(tensors[name], requires_grad=old.requires_grad)
            replaced[id(old)] = new
        new._is_hf_initialized = True  # transformers' init functions skip flagged tensors
        _set_tensor(model, name, new, is_parameter=True)
    for name, _ in model.named_buffers(remove_duplicate=False):
        if name in tensors:
            buffer = tensors[name]
            buffer._is_hf_initialized = True
            _set_tensor(model, name, buffer, is_parameter=False)


@torch.no_grad()
def _initialise_remaining(
    model: PreTrainedModel, device: torch.device, dtype: torch.dtype, seed: int
) -> None:
    """Materialise what the conversion did not provide (routers, non-persistent buffers) and let the model init it.

    This is transformers' own mechanism for missing keys: loaded tensors carry `_is_hf_initialized`, so
    `initialize_weights()` only initialises the rest (the router per `router_init`, `position_ids`, …). The global
    RNG is forked and seeded so that the result depends only on `seed`.
    """
    for name, param in list(model.named_parameters()):
        if param.is_meta:
            target = dtype if param.is_floating_point() else param.dtype
            value = torch.empty_like(param, device=device, dtype=target)
            _set_tensor(
                model, name, nn.Parameter(value, requires_grad=param.requires_grad), is_parameter=True
            )
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta:
            target = dtype if buffer.is_floating_point() else buffer.dtype
            _set_tensor(
                model, name, torch.empty_like(buffer, device=device, dtype=target), is_parameter=False
            )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_derived_seed(seed, "routers"))
        model.initialize_weights()
    for tensor in (*model.parameters(), *model.buffers()):
        tensor.__dict__.pop("_is_hf_initialized", None)
    for module in model.modules():
        module.__dict__.pop("_is_hf_initialized", None)


# --------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------
def _check_arguments(
    num_experts, num_experts_per_tok, method, seed, noise_std, drop_ratio, partition, router_init
) -> None:
    """Fail fast, before any checkpoint is read, on arguments that do not depend on the checkpoint."""
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"`num_experts` must be an integer >= 1, got {num_experts!r}")
    if (
        isinstance(num_experts_per_tok, bool)
        or not isinstance(num_experts_per_tok, int)
        or num_experts_per_tok < 1
    ):
        raise ValueError(f"`num_experts_per_tok` must be an integer >= 1, got {num_experts_per_tok!r}")
    if num_experts_per_tok > num_experts:
        raise ValueError(
            f"`num_experts_per_tok` ({num_experts_per_tok}) cannot be larger than `num_experts` ({num_experts})"
        )
    if method not in UPCYCLING_METHODS:
        raise ValueError(f"`method` must be one of {UPCYCLING_METHODS}, got {method!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"`seed` must be an integer, got {seed!r}")
    if not isinstance(noise_std, (int, float)) or isinstance(noise_std, bool) or noise_std <= 0:
        raise ValueError(f"`noise_std` must be a number > 0, got {noise_std!r}")
    if not isinstance(drop_ratio, (int, float)) or isinstance(drop_ratio, bool) or not 0 < drop_ratio <= 1:
        raise ValueError(f"`drop_ratio` must be in (0, 1], got {drop_ratio!r}")
    if partition not in PARTITION_STRATEGIES:
        raise ValueError(f"`partition` must be one of {PARTITION_STRATEGIES}, got {partition!r}")
    if router_init not in ("normal", "zeros"):
        raise ValueError(f"`router_init` must be 'normal' or 'zeros', got {router_init!r}")


def _warn_if_not_exact(config, method: str) -> None:
    if method == "copy" and (
        config.router_type in ("switch", "expert_choice")
        or (config.router_type in ("topk", "hierarchical") and not config.norm_topk_prob)
    ):
        logger.warning(
            "method='copy' reproduces the dense model only when each token's combine weights sum to 1 "
            "(router_type 'topk' or 'hierarchical' with norm_topk_prob=True, 'noisy_topk', 'hash'); with "
            "router_type=%r and norm_topk_prob=%s the upcycled FFN outputs are scaled by the router probabilities.",
            config.router_type,
            config.norm_topk_prob,
        )
    if method == "partition" and (
        config.num_experts_per_tok != config.num_experts or config.router_init != "zeros"
    ):
        logger.info(
            "method='partition' reproduces the dense FFN exactly only with all experts active and "
            "router_init='zeros'; with num_experts_per_tok=%d of %d the active compute is k/E of the dense FFN.",
            config.num_experts_per_tok,
            config.num_experts,
        )


_CONFIG_LOAD_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "subfolder", "trust_remote_code")


def upcycle(
    dense: PreTrainedModel | str | os.PathLike,
    num_experts: int = 8,
    num_experts_per_tok: int | None = None,
    moe_layers: int | Sequence[int] | None = 2,
    *,
    encoder_moe_layers: int | Sequence[int] | None = None,
    decoder_moe_layers: int | Sequence[int] | None = None,
    method: str = "copy",
    router_type: str = "topk",
    seed: int = 0,
    router_init: str | None = None,
    noise_std: float = 0.01,
    drop_ratio: float = 0.5,
    partition: str = "random",
    task: str | None = None,
    load_kwargs: Mapping | None = None,
    progress: bool = True,
    num_shared_neurons: int = 0,
    calibration=None,
    tokenizer=None,
    calibration_tokens: int = 2048,
    **moe_config_overrides,
) -> PreTrainedModel:
    """Upcycle a dense BERT / RoBERTa / T5 model into the matching ptmoe MoE model.

    The dense architecture is read from the model's class (`BertModel` → `MoeBertModel`, `BertForMaskedLM` →
    `MoeBertForMaskedLM`, … `T5ForConditionalGeneration` → `MoeT5ForConditionalGeneration`; see
    `SUPPORTED_ARCHITECTURES`). Every weight outside the MoE layers' FFNs is carried over; see the module docstring
    for what each `method` does and when it reproduces the dense model exactly.

    Args:
        dense (`PreTrainedModel`, `str` or `os.PathLike`): a dense model, or a local path / Hub id (e.g.
            ``"neuralmind/bert-base-portuguese-cased"``) loaded with `from_pretrained`.
        num_experts (`int`, defaults to 8): experts per MoE layer.
        num_experts_per_tok (`int`, *optional*): experts per token (k); defaults to 2, or 1 for the `"switch"` and
            `"hash"` routers.
        moe_layers (`int` or `list[int]`, defaults to 2): MoE layers (every n-th layer, or a list of 0-based
            indices). For T5 it is the default of both `encoder_moe_layers` and `decoder_moe_layers`.
        encoder_moe_layers / decoder_moe_layers (`int` or `list[int]`, *optional*): T5 only; `[]` for none.
        method (`str`, defaults to `"copy"`): "copy", "noise", "drop" or "partition".
        router_type (`str`, defaults to `"topk"`): one of `ptmoe.ROUTER_TYPES` ("topk", "switch", "noisy_topk",
            "hash", "expert_choice", "hierarchical"); their fields (`router_groups`, `expert_capacity_factor`,
            `decoder_router_type`, …) go in `moe_config_overrides`.
        seed (`int`, defaults to 0): seeds every random choice (noise, dropped neurons, partition, routers).
        router_init (`str`, *optional*): "normal" (N(0, initializer_range), lets the router pick different
            experts from the start) or "zeros" (uniform routing). Defaults to "zeros" for "partition" (needed for
            its exactness) and "normal" otherwise.
        noise_std (`float`, defaults to 0.01): "noise": noise std relative to each weight tensor's std.
        drop_ratio (`float`, defaults to 0.5): "drop": fraction of intermediate neurons re-initialised, in (0, 1].
        partition (`str`, defaults to `"random"`): "partition": "random", "clustered" (balanced k-means on the
            weights) or "coactivation" (balanced k-means on the neurons' firing patterns over `calibration` text).
            Which to use: "coactivation" when calibration text is at hand and the experts will be routed sparsely
            (`ptmoe.sparsify`): a fitted router then finds experts whose neurons fire together; "clustered"
            without text; "random" as a baseline.
        task (`str`, *optional*): only for a path / Hub id: which dense head to load (see
            `architecture_for_checkpoint`); defaults to the checkpoint's architecture, or masked-LM for a
            `BertForPreTraining` checkpoint such as BERTimbau.
        load_kwargs (`dict`, *optional*): extra `from_pretrained` arguments for a path / Hub id (`dtype`,
            `revision`, `token`, `num_labels`, …).
        progress (`bool`, defaults to `True`): show a progress bar over MoE layers.
        num_shared_neurons (`int`, defaults to 0): "partition": the S most important neurons (mean contribution
            to the FFN output on `calibration` text, see `neuron_importance`) become one always-active shared expert
            (MoEBERT's importance-guided split); the other neurons are split by `partition`.
        calibration (*optional*): text for "coactivation" and `num_shared_neurons`: a list of texts, a
            `datasets.Dataset` (column "text") or a text file.
        tokenizer (*optional*): tokenizer for `calibration` (default: the dense checkpoint's).
        calibration_tokens (`int`, defaults to 2048): real tokens of `calibration` recorded per MoE layer.
        moe_config_overrides: any other MoE config field (`router_aux_loss_coef`, `capacity_factor`, …).

    Returns:
        The MoE model (`eval()` mode, the dense model's dtype and device). Its config records `upcycled_from` (the
        path / Hub id, or the dense model's `name_or_path` or class name), `upcycling_method` and `upcycling_seed`.

    Example:

    ```python
    >>> import ptmoe
    >>> moe = ptmoe.upcycle("neuralmind/bert-base-portuguese-cased", num_experts=8, method="drop")
    >>> ptmoe.save_upcycled(moe, "bertimbau-moe-8x")  # weights, config and the BERTimbau tokenizer
    ```
    """
    if num_experts_per_tok is None:
        num_experts_per_tok = 1 if router_type in ("switch", "hash") else 2
    if router_init is None:
        router_init = "zeros" if method == "partition" else "normal"
    _check_arguments(
        num_experts, num_experts_per_tok, method, seed, noise_std, drop_ratio, partition, router_init
    )
    if (
        isinstance(num_shared_neurons, bool)
        or not isinstance(num_shared_neurons, int)
        or num_shared_neurons < 0
    ):
        raise ValueError(f"`num_shared_neurons` must be an integer >= 0, got {num_shared_neurons!r}")
    needs_calibration = method == "partition" and (
        partition in CALIBRATED_STRATEGIES or num_shared_neurons > 0
    )
    calibration_texts = None
    if needs_calibration:
        from .sparsify.data import load_texts

        if calibration is None:
            raise ValueError(
                f"partition={partition!r} with num_shared_neurons={num_shared_neurons} reads the dense FFN's "
                "activations on text: pass `calibration=` (a list of texts, a datasets.Dataset or a text file)"
            )
        calibration_texts = load_texts(calibration, what="calibration")
    load_kwargs = dict(load_kwargs or {})

    if isinstance(dense, (str, os.PathLike)):
        source = os.fspath(dense)
        check_local_checkpoint(source, "dense")
        config_kwargs = {k: v for k, v in load_kwargs.items() if k in _CONFIG_LOAD_KWARGS}
        dense_config = AutoConfig.from_pretrained(source, **config_kwargs)
        arch = architecture_for_checkpoint(dense_config, task)
        owned = True  # the dense model is loaded here and discarded: its tensors can be reused, not copied
    elif isinstance(dense, PreTrainedModel):
        if task is not None or load_kwargs:
            raise ValueError("`task` and `load_kwargs` only apply when `dense` is a path or Hub id")
        arch = architecture_for_model(dense)
        dense_config = dense.config
        source = getattr(dense.config, "_name_or_path", "") or type(dense).__name__
        owned = False
    else:
        raise TypeError(
            f"`dense` must be a transformers model or a path / Hub id, got {type(dense).__name__}"
        )

    # The config is built (and validated) before any weight is read or copied.
    config_arguments = dict(
        num_experts=num_experts,
        num_experts_per_tok=num_experts_per_tok,
        moe_layers=moe_layers,
        encoder_moe_layers=encoder_moe_layers,
        decoder_moe_layers=decoder_moe_layers,
        router_type=router_type,
        router_init=router_init,
        method=method,
        seed=seed,
        source=source,
        overrides=moe_config_overrides,
        num_shared_neurons=num_shared_neurons,
    )
    moe_config = build_moe_config(dense_config, arch, **config_arguments)
    moe_class = moe_class_for(arch)
    _warn_if_not_exact(moe_config, method)

    if owned:
        dense = _import("transformers", arch.dense_class).from_pretrained(source, **load_kwargs)
        if type(dense).__name__ != arch.dense_class:
            raise ValueError(f"loading {source!r} gave a {type(dense).__name__}, expected {arch.dense_class}")
        # Again from the loaded config: `load_kwargs` such as `num_labels` change it.
        moe_config = build_moe_config(dense.config, arch, **config_arguments)
    activations = None
    if calibration_texts is not None:
        from .sparsify.calibration import collect_ffn_activations
        from .sparsify.data import resolve_tokenizer

        layers = {stack.name: getattr(moe_config, stack.layers_attr) for stack in arch.stacks}
        activations = collect_ffn_activations(
            dense, arch, layers, calibration_texts, resolve_tokenizer(dense, tokenizer), calibration_tokens
        )
    dtype = dense.dtype
    device = next(dense.parameters()).device
    dense_state_dict = dense.state_dict()
    del dense  # when loaded here, only the tensors reused by the MoE model stay alive

    with torch.device("meta"):
        model = moe_class(moe_config)
    expected_shapes = {key: tensor.shape for key, tensor in model.state_dict().items()}
    tensors = upcycle_state_dict(
        dense_state_dict,
        arch,
        moe_config,
        expected_shapes,
        method=method,
        seed=seed,
        noise_std=noise_std,
        drop_ratio=drop_ratio,
        partition=partition,
        clone=not owned,
        progress=progress,
        activations=activations,
        num_shared_neurons=num_shared_neurons,
    )
    del dense_state_dict
    _assign(model, tensors)
    _initialise_remaining(model, device, dtype, seed)
    leftover = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if leftover:  # would be a bug in the key map: never hand out a model with uninitialised weights
        raise RuntimeError(f"upcycle left tensors on the meta device: {leftover[:8]}")
    return model.eval()


# --------------------------------------------------------------------------------------------------------------
# Saving: all or nothing
# --------------------------------------------------------------------------------------------------------------
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)


def _source_tokenizer(source: str | None):
    """The tokenizer of the dense checkpoint the model was upcycled from, or None (with a warning)."""
    if not source or source in SUPPORTED_ARCHITECTURES:  # built from an in-memory model without a path
        return None
    from transformers import AutoTokenizer

    if os.path.isdir(source) and not any(os.path.exists(os.path.join(source, f)) for f in _TOKENIZER_FILES):
        reason = f"the folder has none of {', '.join(_TOKENIZER_FILES)}"
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError, TypeError, KeyError) as error:
            reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        else:
            # transformers 5 builds a tokenizer holding only the special tokens from a config.json alone.
            if len(tokenizer) > len(set(tokenizer.all_special_tokens)):
                return tokenizer
            reason = "it has no vocabulary beyond the special tokens"
    logger.warning(
        "No tokenizer could be loaded from %r (%s); the checkpoint is saved without one. Pass `tokenizer=` to "
        "save one beside the weights.",
        source,
        reason,
    )
    return None


def save_upcycled(
    model: PreTrainedModel,
    out_dir: str | os.PathLike,
    tokenizer=None,
    overwrite: bool = False,
) -> Path:
    """Save an upcycled model (safetensors + config, with its modeling code) and its tokenizer, all or nothing.

    Everything is written to a temporary folder next to `out_dir` and then renamed into place, so a failure leaves
    neither a half-written `out_dir` nor temporary files behind (and, with `overwrite`, keeps the old folder).

    Args:
        model (`PreTrainedModel`): the model returned by `upcycle`.
        out_dir (`str` or `os.PathLike`): destination folder; must not exist or be empty unless `overwrite`.
        tokenizer (*optional*): the tokenizer to save. By default the tokenizer of `model.config.upcycled_from` is
            loaded (`AutoTokenizer.from_pretrained`) when it names a path or Hub id; a warning says so when that
            source has none. Pass `False` to save no tokenizer.
        overwrite (`bool`, defaults to `False`): replace a non-empty `out_dir`.

    Returns:
        The output folder as a `Path`.
    """
    out = check_output_dir(out_dir, overwrite)
    if tokenizer is None:
        tokenizer = _source_tokenizer(getattr(model.config, "upcycled_from", None))
    with staged_output_dir(out, overwrite) as staging:
        model.save_pretrained(staging)
        if tokenizer:
            tokenizer.save_pretrained(staging)
    return out


# --------------------------------------------------------------------------------------------------------------
# Command line: `ptmoe upcycle` (wired in ptmoe/cli.py)
# --------------------------------------------------------------------------------------------------------------
def _layers_argument(text: str) -> int | list[int]:
    """ "2" → every 2nd layer; "1,3,5" → those layers; "none" → no MoE layer."""
    text = text.strip()
    if text.lower() in ("none", ""):
        return []
    try:
        return [int(part) for part in text.split(",")] if "," in text else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a step (e.g. 2), a comma-separated list of layer indices (e.g. 1,3,5) or 'none', got {text!r}"
        ) from None


def add_upcycle_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `ptmoe upcycle`."""
    parser.add_argument("--base", required=True, help="dense checkpoint: local path or Hub id")
    parser.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    parser.add_argument("--experts", type=int, default=8, help="experts per MoE layer (default 8)")
    parser.add_argument(
        "--top-k", type=int, default=None, help="experts per token (default 2; 1 for switch/hash)"
    )
    parser.add_argument("--method", choices=UPCYCLING_METHODS, default="copy")
    parser.add_argument(
        "--moe-layers", type=_layers_argument, default=2, help="every n-th layer (2) or a list (1,3,5)"
    )
    parser.add_argument("--encoder-moe-layers", type=_layers_argument, default=None, help="T5 only")
    parser.add_argument("--decoder-moe-layers", type=_layers_argument, default=None, help="T5 only")
    parser.add_argument("--router", choices=ROUTER_TYPES, default="topk")
    parser.add_argument(
        "--router-groups",
        type=int,
        default=None,
        help="hierarchical router: expert groups (must divide --experts)",
    )
    parser.add_argument(
        "--groups-per-token", type=int, default=None, help="hierarchical router: groups per token"
    )
    parser.add_argument(
        "--expert-capacity-factor",
        type=float,
        default=None,
        help="expert-choice router: mean experts per token",
    )
    parser.add_argument(
        "--decoder-router", choices=ROUTER_TYPES, default=None, help="T5: the decoder's router (e.g. topk)"
    )
    parser.add_argument("--expert-dropout", type=float, default=None, help="dropout inside the experts only")
    parser.add_argument("--router-init", choices=("normal", "zeros"), default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise-std", type=float, default=0.01, help="method noise: relative noise std")
    parser.add_argument(
        "--drop-ratio", type=float, default=0.5, help="method drop: fraction of neurons re-drawn"
    )
    parser.add_argument(
        "--partition", choices=PARTITION_STRATEGIES, default="random", help="method partition"
    )
    parser.add_argument(
        "--task", default=None, help="dense head to load (e.g. masked-lm, sequence-classification)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


_ROUTING_OPTIONS = {
    "router_groups": "router_groups",
    "groups_per_token": "num_groups_per_tok",
    "expert_capacity_factor": "expert_capacity_factor",
    "decoder_router": "decoder_router_type",
    "expert_dropout": "expert_dropout",
}


def _routing_overrides(args: argparse.Namespace) -> dict:
    """The MoE config fields given on the command line (unset options keep the config defaults)."""
    return {
        field: getattr(args, option)
        for option, field in _ROUTING_OPTIONS.items()
        if getattr(args, option) is not None
    }


def run_upcycle_command(args: argparse.Namespace) -> int:
    """`ptmoe upcycle`: upcycle `--base`, save to `--out`, print total vs active parameter counts.

    Bad input (an existing `--out`, a missing `--base` folder, an unsupported architecture, invalid MoE values)
    raises; `ptmoe.cli.main` prints it as one error line with exit code 2 (see `ptmoe.errors`).
    """
    check_output_dir(args.out, args.overwrite)  # fail before the (long) upcycling, not after
    check_local_checkpoint(args.base, "--base")
    model = upcycle(
        args.base,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        moe_layers=args.moe_layers,
        encoder_moe_layers=args.encoder_moe_layers,
        decoder_moe_layers=args.decoder_moe_layers,
        method=args.method,
        router_type=args.router,
        seed=args.seed,
        router_init=args.router_init,
        noise_std=args.noise_std,
        drop_ratio=args.drop_ratio,
        partition=args.partition,
        task=args.task,
        progress=not args.no_progress,
        **_routing_overrides(args),
    )
    out = save_upcycled(model, args.out, overwrite=args.overwrite)
    counts = count_parameters(model)
    config = model.config
    print(
        f"{type(model).__name__} ({config.upcycling_method}, {config.num_experts} experts, "
        f"top-{config.num_experts_per_tok}, router {config.router_type}) saved to {out}"
    )
    print(f"total parameters:  {counts['total']:>14,}")
    print(f"active per token:  {counts['active']:>14,}  ({counts['active'] / counts['total']:.1%} of total)")
    return 0


__all__ = [
    "UPCYCLING_METHODS",
    "PARTITION_STRATEGIES",
    "SUPPORTED_ARCHITECTURES",
    "ArchitectureMap",
    "FfnStack",
    "architecture_for_model",
    "architecture_for_checkpoint",
    "build_moe_config",
    "init_experts",
    "partition_groups",
    "split_ffn",
    "neuron_importance",
    "balanced_kmeans",
    "upcycle_state_dict",
    "upcycle",
    "save_upcycled",
    "check_output_dir",
]
