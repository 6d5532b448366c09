"""MoE-BERT: BERT whose feed-forward networks in `config.moe_layers` are sparse Mixture-of-Experts blocks.

Everything except the MoE feed-forward is transformers' own BERT code (embeddings, attention with eager/SDPA,
pooler, heads), so a MoE-BERT layer without experts is a `BertLayer` and the state-dict keys outside the MoE
blocks are BERT's. A MoE layer holds::

    encoder.layer.{l}.moe.router.weight                      (num_experts, hidden)      fp32 routing
    encoder.layer.{l}.moe.experts.{i}.wi / .wo               nn.Linear, as BERT's intermediate.dense / output.dense
    encoder.layer.{l}.output.LayerNorm                       as in BERT

This file travels inside Hub checkpoints: it imports only torch, transformers and its sibling modules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss
from transformers import initialization as init
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import PreTrainedModel
from transformers.models.bert.modeling_bert import (
    BertAttention,
    BertEmbeddings,
    BertIntermediate,
    BertLMPredictionHead,
    BertOnlyMLMHead,
    BertOutput,
    BertPooler,
    BertSelfAttention,
)
from transformers.utils import ModelOutput
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import capture_outputs

from .configuration_moe_bert import MoeBertConfig
from .moe import (
    MoePreTrainedMixin,
    RouterLosses,
    RouterOutput,
    SparseMoeBlock,
    check_input_shapes,
    compute_router_losses,
    init_router,
    total_loss,
    wants_router_losses,
)


# --------------------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------------------
@dataclass
class MoeBertModelOutput(ModelOutput):
    r"""
    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`)
    pooler_output (`torch.FloatTensor` of shape `(batch_size, hidden_size)`, *optional*)
    router_logits (`tuple(torch.FloatTensor)`, *optional*, returned with `output_router_logits=True`):
        one `(batch_size, sequence_length, num_experts)` fp32 tensor per MoE layer.
    expert_index (`tuple(torch.LongTensor)`, *optional*, returned with `output_router_logits=True`):
        one `(batch_size, sequence_length, num_experts_per_tok)` tensor per MoE layer; -1 where a token was not
        sent to an expert (padding, or dropped by the expert capacity).
    aux_loss / z_loss / importance_loss (`torch.FloatTensor` scalars, *optional*):
        load-balancing, router z and importance losses averaged over MoE layers (not yet multiplied by their
        coefficients); computed in training, with labels, with `output_router_logits` or `output_router_losses`,
        None otherwise.
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None
    expert_index: tuple[torch.LongTensor, ...] | None = None
    aux_loss: torch.FloatTensor | None = None
    z_loss: torch.FloatTensor | None = None
    importance_loss: torch.FloatTensor | None = None


@dataclass
class MoeBertMaskedLMOutput(ModelOutput):
    r"""`loss` = masked-LM loss + coef·aux_loss + coef·z_loss + coef·importance_loss (when `labels` are given)."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None
    expert_index: tuple[torch.LongTensor, ...] | None = None
    aux_loss: torch.FloatTensor | None = None
    z_loss: torch.FloatTensor | None = None
    importance_loss: torch.FloatTensor | None = None


@dataclass
class MoeBertSequenceClassifierOutput(MoeBertMaskedLMOutput):
    r"""`logits` of shape `(batch_size, num_labels)`; `loss` = task loss + weighted router losses."""


@dataclass
class MoeBertTokenClassifierOutput(MoeBertMaskedLMOutput):
    r"""`logits` of shape `(batch_size, sequence_length, num_labels)`; `loss` = task loss + weighted router losses."""


@dataclass
class MoeBertQuestionAnsweringOutput(ModelOutput):
    r"""`loss` = span loss + weighted router losses (when `start_positions` and `end_positions` are given)."""

    loss: torch.FloatTensor | None = None
    start_logits: torch.FloatTensor | None = None
    end_logits: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None
    expert_index: tuple[torch.LongTensor, ...] | None = None
    aux_loss: torch.FloatTensor | None = None
    z_loss: torch.FloatTensor | None = None
    importance_loss: torch.FloatTensor | None = None


def _router_fields(outputs: MoeBertModelOutput) -> dict:
    return {
        "hidden_states": outputs.hidden_states,
        "attentions": outputs.attentions,
        "router_logits": outputs.router_logits,
        "expert_index": outputs.expert_index,
        "aux_loss": outputs.aux_loss,
        "z_loss": outputs.z_loss,
        "importance_loss": outputs.importance_loss,
    }


# --------------------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------------------
class MoeBertOutput(nn.Module):
    """`BertOutput` without its dense projection (the experts hold it): dropout, residual, LayerNorm."""

    def __init__(self, config: MoeBertConfig):
        super().__init__()
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(hidden_states) + input_tensor)


class MoeBertLayer(GradientCheckpointingLayer):
    """A BERT layer whose feed-forward is either BERT's dense FFN or a `SparseMoeBlock` (`is_moe`)."""

    def __init__(self, config: MoeBertConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.attention = BertAttention(config, is_causal=False, layer_idx=layer_idx)
        self.is_moe = layer_idx in config.moe_layer_indices
        if self.is_moe:
            self.moe = SparseMoeBlock(
                config,
                hidden_size=config.hidden_size,
                intermediate_size=config.expert_intermediate_size or config.intermediate_size,
                hidden_act=config.hidden_act,
            )
            self.output = MoeBertOutput(config)
        else:
            self.intermediate = BertIntermediate(config)
            self.output = BertOutput(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, RouterOutput | None]:
        attention_output, _ = self.attention(hidden_states, attention_mask, **kwargs)
        if not self.is_moe:
            return self.output(self.intermediate(attention_output), attention_output), None
        moe_output, routing = self.moe(attention_output, token_mask, input_ids)
        return self.output(moe_output, attention_output), routing


class MoeBertEncoder(nn.Module):
    def __init__(self, config: MoeBertConfig):
        super().__init__()
        self.config = config
        self.layer = nn.ModuleList(
            [MoeBertLayer(config, layer_idx=i) for i in range(config.num_hidden_layers)]
        )

    def forward(self, hidden_states, attention_mask, token_mask, input_ids, **kwargs):
        routing = []
        for layer in self.layer:
            hidden_states, layer_routing = layer(
                hidden_states, attention_mask, token_mask, input_ids, **kwargs
            )
            if layer_routing is not None:
                routing.append(layer_routing)
        return hidden_states, routing


# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------
class MoeBertPreTrainedModel(MoePreTrainedMixin, PreTrainedModel):
    config_class = MoeBertConfig
    config: MoeBertConfig
    base_model_prefix = "bert"
    supports_gradient_checkpointing = True
    _no_split_modules = ["BertEmbeddings", "MoeBertLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_record_outputs = {"hidden_states": MoeBertLayer, "attentions": BertSelfAttention}
    # Task heads that bitsandbytes must never quantize (name suffixes; `load_checked` adds them to the skip list).
    # Routers need no entry: they are bare Parameters, which bitsandbytes never touches.
    _modules_to_not_quantize = [
        "classifier",
        "qa_outputs",
        "cls.predictions.transform.dense",
        "cls.predictions.decoder",
        "pooler.dense",
    ]

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if init_router(module, self.config, self.config.initializer_range):
            return
        if isinstance(module, BertLMPredictionHead):
            init.zeros_(module.bias)
        elif isinstance(module, BertEmbeddings):
            init.copy_(module.position_ids, torch.arange(module.position_ids.shape[-1]).expand((1, -1)))
            init.zeros_(module.token_type_ids)


class MoeBertModel(MoeBertPreTrainedModel):
    """The bare MoE-BERT encoder (embeddings → layers with dense or MoE FFNs → optional pooler)."""

    def __init__(self, config: MoeBertConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.config = config
        self.gradient_checkpointing = False
        self.embeddings = BertEmbeddings(config)
        self.encoder = MoeBertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    @capture_outputs
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_router_logits: bool | None = None,
        output_router_losses: bool | None = None,
        **kwargs,
    ) -> MoeBertModelOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`)
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*): 1 for real
                tokens, 0 for padding. Padding tokens skip the experts and are left out of the router losses.
            output_router_logits (`bool`, *optional*): return `router_logits` and `expert_index` per MoE layer
                (defaults to `config.output_router_logits`).
            output_router_losses (`bool`, *optional*): compute `aux_loss` / `z_loss` / `importance_loss`; by
                default in training or with `output_router_logits` (the task models also whenever labels are given).
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        check_input_shapes(
            input_ids.shape if input_ids is not None else inputs_embeds.shape[:-1],
            attention_mask,
            ids_name="input_ids" if input_ids is not None else "inputs_embeds",
            # explicit `position_ids` may hold any positions: their values are the embeddings' business
            max_positions=self.config.max_position_embeddings if position_ids is None else None,
            token_type_ids=token_type_ids,
        )
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits

        embedding_output = self.embeddings(
            input_ids=input_ids,
            position_ids=position_ids,
            token_type_ids=token_type_ids,
            inputs_embeds=inputs_embeds,
        )
        token_mask = (
            attention_mask.bool()
            if attention_mask is not None and attention_mask.dim() == 2
            else torch.ones(embedding_output.shape[:2], dtype=torch.bool, device=embedding_output.device)
        )
        extended_mask = create_bidirectional_mask(
            config=self.config, inputs_embeds=embedding_output, attention_mask=attention_mask
        )
        sequence_output, routing = self.encoder(
            embedding_output, extended_mask, token_mask, input_ids, position_ids=position_ids, **kwargs
        )
        pooled_output = self.pooler(sequence_output) if self.pooler is not None else None
        losses = (
            compute_router_losses(routing, sequence_output)
            if wants_router_losses(self, output_router_losses, output_router_logits)
            else None
        )
        return MoeBertModelOutput(
            last_hidden_state=sequence_output,
            pooler_output=pooled_output,
            router_logits=tuple(r.router_logits for r in routing) if output_router_logits else None,
            expert_index=tuple(r.expert_index for r in routing) if output_router_logits else None,
            **RouterLosses.output_fields(losses),
        )


class _MoeBertHeadModel(MoeBertPreTrainedModel):
    """Shared plumbing of the task models: run the encoder, add the weighted router losses to a task loss."""

    def _encode(
        self, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, labels_given, **kwargs
    ):
        if labels_given:  # the training loss needs the router losses
            kwargs.setdefault("output_router_losses", True)
        return self.bert(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            return_dict=True,
            **kwargs,
        )


class MoeBertForMaskedLM(_MoeBertHeadModel):
    _tied_weights_keys = {
        "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.bias": "cls.predictions.bias",
    }
    # Split by vocabulary like the word embeddings it is tied to; logits are gathered on every rank. The decoder's
    # bias is tied to `cls.predictions.bias`, which must be split the same way.
    _tp_plan = {"cls.predictions.decoder": "colwise_gather_output", "cls.predictions.bias": "colwise"}

    def __init__(self, config: MoeBertConfig):
        super().__init__(config)
        self.bert = MoeBertModel(config, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(config)
        self.post_init()

    def get_output_embeddings(self):
        return self.cls.predictions.decoder

    def set_output_embeddings(self, new_embeddings):
        self.cls.predictions.decoder = new_embeddings
        self.cls.predictions.bias = new_embeddings.bias

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> MoeBertMaskedLMOutput:
        r"""labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*): -100 = ignored."""
        outputs = self._encode(
            input_ids,
            attention_mask,
            token_type_ids,
            position_ids,
            inputs_embeds,
            labels is not None,
            **kwargs,
        )
        logits = self.cls(outputs.last_hidden_state)
        task_loss = None
        if labels is not None:
            task_loss = CrossEntropyLoss()(
                logits.view(-1, self.config.vocab_size), labels.to(logits.device).view(-1)
            )
        return MoeBertMaskedLMOutput(
            loss=total_loss(task_loss, outputs, self.config), logits=logits, **_router_fields(outputs)
        )


class MoeBertForSequenceClassification(_MoeBertHeadModel):
    def __init__(self, config: MoeBertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = MoeBertModel(config)
        dropout = (
            config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        )
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> MoeBertSequenceClassifierOutput:
        r"""labels (`torch.Tensor` of shape `(batch_size,)`, *optional*): class ids, or floats for regression."""
        outputs = self._encode(
            input_ids,
            attention_mask,
            token_type_ids,
            position_ids,
            inputs_embeds,
            labels is not None,
            **kwargs,
        )
        logits = self.classifier(self.dropout(outputs.pooler_output))
        task_loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            if self.config.problem_type is None:
                if self.num_labels == 1:
                    self.config.problem_type = "regression"
                elif labels.dtype in (torch.long, torch.int):
                    self.config.problem_type = "single_label_classification"
                else:
                    self.config.problem_type = "multi_label_classification"
            if self.config.problem_type == "regression":
                task_loss = (
                    MSELoss()(logits.squeeze(-1), labels.float())
                    if self.num_labels == 1
                    else MSELoss()(logits, labels)
                )
            elif self.config.problem_type == "single_label_classification":
                task_loss = CrossEntropyLoss()(logits.view(-1, self.num_labels), labels.view(-1))
            else:
                task_loss = BCEWithLogitsLoss()(logits, labels.float())
        return MoeBertSequenceClassifierOutput(
            loss=total_loss(task_loss, outputs, self.config), logits=logits, **_router_fields(outputs)
        )


class MoeBertForTokenClassification(_MoeBertHeadModel):
    def __init__(self, config: MoeBertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = MoeBertModel(config, add_pooling_layer=False)
        dropout = (
            config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        )
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> MoeBertTokenClassifierOutput:
        r"""labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*): -100 = ignored."""
        outputs = self._encode(
            input_ids,
            attention_mask,
            token_type_ids,
            position_ids,
            inputs_embeds,
            labels is not None,
            **kwargs,
        )
        logits = self.classifier(self.dropout(outputs.last_hidden_state))
        task_loss = None
        if labels is not None:
            task_loss = CrossEntropyLoss()(
                logits.view(-1, self.num_labels), labels.to(logits.device).view(-1)
            )
        return MoeBertTokenClassifierOutput(
            loss=total_loss(task_loss, outputs, self.config), logits=logits, **_router_fields(outputs)
        )


class MoeBertForQuestionAnswering(_MoeBertHeadModel):
    def __init__(self, config: MoeBertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = MoeBertModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None,
        **kwargs,
    ) -> MoeBertQuestionAnsweringOutput:
        r"""start_positions / end_positions (`torch.LongTensor` of shape `(batch_size,)`, *optional*)."""
        labels_given = start_positions is not None and end_positions is not None
        outputs = self._encode(
            input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, labels_given, **kwargs
        )
        start_logits, end_logits = self.qa_outputs(outputs.last_hidden_state).split(1, dim=-1)
        start_logits = start_logits.squeeze(-1).contiguous()
        end_logits = end_logits.squeeze(-1).contiguous()
        task_loss = None
        if start_positions is not None and end_positions is not None:
            # Positions outside the input are ignored, as in BertForQuestionAnswering.
            ignored_index = start_logits.size(1)
            start_positions = start_positions.reshape(-1).clamp(0, ignored_index).to(start_logits.device)
            end_positions = end_positions.reshape(-1).clamp(0, ignored_index).to(end_logits.device)
            loss_fct = CrossEntropyLoss(ignore_index=ignored_index)
            task_loss = (loss_fct(start_logits, start_positions) + loss_fct(end_logits, end_positions)) / 2
        return MoeBertQuestionAnsweringOutput(
            loss=total_loss(task_loss, outputs, self.config),
            start_logits=start_logits,
            end_logits=end_logits,
            **_router_fields(outputs),
        )


__all__ = [
    "MoeBertPreTrainedModel",
    "MoeBertModel",
    "MoeBertForMaskedLM",
    "MoeBertForSequenceClassification",
    "MoeBertForTokenClassification",
    "MoeBertForQuestionAnswering",
]
