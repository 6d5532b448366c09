"""Explicit per-architecture key maps: which dense transformers class becomes which ptmoe MoE class, and where.

An `ArchitectureMap` names the dense class, the MoE class it becomes, its FFN stacks (`FfnStack`: where each
layer's feed-forward network lives, in MoE key space), the key renames and the dense keys without an MoE
counterpart; a `Family` (`FAMILIES`) holds the `model_type`s, the MoE config class and the dense class per task.
The map is chosen from the dense *class* (`architecture_for_model`) or the checkpoint's config
(`architecture_for_checkpoint`), never guessed from key names.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from transformers import PreTrainedModel

logger = logging.getLogger(__name__)


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


def import_class(module: str, name: str) -> type:
    """The class `name` of `module` (e.g. `("transformers", "BertForMaskedLM")`), or an `ImportError` naming both."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:  # e.g. a family whose modeling file is not installed
        raise ImportError(f"{module}.{name} is not available in this ptmoe installation: {error}") from error


def moe_class_for(arch: ArchitectureMap) -> type[PreTrainedModel]:
    """The ptmoe model class an architecture upcycles into."""
    return import_class(FAMILIES[arch.family].modeling_module, arch.moe_class)
