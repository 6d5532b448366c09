"""MoE-T5: T5 whose feed-forward networks in `encoder_moe_layers` / `decoder_moe_layers` are sparse MoE blocks.

Everything except the MoE feed-forward is transformers' own T5 code (relative-position attention with eager/SDPA,
cross-attention, RMS layer norm, dense FFNs, KV cache), so the state dict is T5's key for key, except that a MoE
layer's `DenseReluDense` becomes `moe`::

    encoder.block.{i}.layer.1.moe.router.weight                   (num_experts, d_model)   fp32 routing
    encoder.block.{i}.layer.1.moe.experts.{j}.wi / .wo            nn.Linear, as T5's DenseReluDense.wi / .wo
    encoder.block.{i}.layer.1.moe.experts.{j}.wi_0 / .wi_1 / .wo  gated activations (T5 v1.1 / PTT5-v2)
    encoder.block.{i}.layer.1.layer_norm.weight                   as in T5
    decoder.block.{i}.layer.2.moe....                             decoder FFs sit after the cross-attention

This file travels inside Hub checkpoints: it imports only torch, transformers and its sibling modules.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import CrossEntropyLoss
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import Seq2SeqMoEModelOutput, Seq2SeqMoEOutput
from transformers.models.t5.modeling_t5 import (
    T5LayerCrossAttention,
    T5LayerFF,
    T5LayerNorm,
    T5LayerSelfAttention,
    T5PreTrainedModel,
)
from transformers.utils import ModelOutput
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_moe_t5 import MoeT5Config
from .moe import (
    MoeExpert,
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
class MoeT5StackOutput(ModelOutput):
    r"""
    Output of one MoE-T5 stack (encoder or decoder).

    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, d_model)`)
    cache (`Cache`, *optional*): the decoder's KV cache.
    router_logits / expert_index (`tuple(torch.Tensor)`, *optional*, returned with `output_router_logits=True`):
        one `(batch_size, sequence_length, num_experts)` fp32 tensor / `(batch_size, sequence_length, k)` tensor
        (-1 = not sent to an expert: padding, or dropped by the expert capacity) per MoE layer.
    router_losses (`RouterLosses`, *optional*): aux, z and importance losses averaged over this stack's MoE layers
        (None when they were not computed: inference without labels or router logits). Kept in one
        object rather than as 0-d tensor fields because `generate()` repeats every tensor of the encoder output
        along the batch dimension for beam search, which a 0-d tensor does not have.
    """

    last_hidden_state: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    cross_attentions: tuple[torch.FloatTensor, ...] | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None
    expert_index: tuple[torch.LongTensor, ...] | None = None
    router_losses: RouterLosses | None = None


@dataclass
class MoeT5EncoderModelOutput(ModelOutput):
    r"""
    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, d_model)`)
    router_logits / expert_index (`tuple(torch.Tensor)`, *optional*, returned with `output_router_logits=True`):
        per MoE layer, as in [`MoeT5StackOutput`].
    aux_loss / z_loss / importance_loss (`torch.FloatTensor` scalars, *optional*): load-balancing, router z and
        importance losses averaged over the MoE layers (not yet multiplied by their coefficients); None when not
        computed (see `output_router_losses`).
    """

    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None
    expert_index: tuple[torch.LongTensor, ...] | None = None
    aux_loss: torch.FloatTensor | None = None
    z_loss: torch.FloatTensor | None = None
    importance_loss: torch.FloatTensor | None = None


@dataclass
class MoeT5Seq2SeqModelOutput(Seq2SeqMoEModelOutput):
    r"""
    transformers' `Seq2SeqMoEModelOutput` plus, separately for the encoder and the decoder, the expert choices and the
    router losses (each averaged over that stack's MoE layers, before coefficients), and their totals:

    encoder_expert_index / decoder_expert_index (`tuple(torch.LongTensor)`, *optional*, with `output_router_logits`)
    encoder_aux_loss / encoder_z_loss / encoder_importance_loss (`torch.FloatTensor` scalars)
    decoder_aux_loss / decoder_z_loss / decoder_importance_loss (`torch.FloatTensor` scalars)
    aux_loss / z_loss / importance_loss (`torch.FloatTensor` scalars): encoder + decoder.
    The losses are None when not computed (inference without `output_router_logits` / `output_router_losses`).
    """

    encoder_expert_index: tuple[torch.LongTensor, ...] | None = None
    decoder_expert_index: tuple[torch.LongTensor, ...] | None = None
    encoder_aux_loss: torch.FloatTensor | None = None
    encoder_z_loss: torch.FloatTensor | None = None
    encoder_importance_loss: torch.FloatTensor | None = None
    decoder_aux_loss: torch.FloatTensor | None = None
    decoder_z_loss: torch.FloatTensor | None = None
    decoder_importance_loss: torch.FloatTensor | None = None
    aux_loss: torch.FloatTensor | None = None
    z_loss: torch.FloatTensor | None = None
    importance_loss: torch.FloatTensor | None = None


@dataclass
class MoeT5Seq2SeqLMOutput(Seq2SeqMoEOutput):
    r"""
    transformers' `Seq2SeqMoEOutput` (`loss`, `logits`, router logits and aux/z losses per stack) plus the expert
    choices, the importance losses and the encoder + decoder totals. With `labels`,
    `loss = CE + router_aux_loss_coef · aux_loss + router_z_loss_coef · z_loss (+ importance term)`.

    encoder_expert_index / decoder_expert_index (`tuple(torch.LongTensor)`, *optional*, with `output_router_logits`)
    encoder_importance_loss / decoder_importance_loss (`torch.FloatTensor` scalars)
    aux_loss / z_loss / importance_loss (`torch.FloatTensor` scalars): encoder + decoder, before coefficients;
    None when not computed (inference without labels, `output_router_logits` or `output_router_losses`).
    """

    encoder_expert_index: tuple[torch.LongTensor, ...] | None = None
    decoder_expert_index: tuple[torch.LongTensor, ...] | None = None
    encoder_importance_loss: torch.FloatTensor | None = None
    decoder_importance_loss: torch.FloatTensor | None = None
    aux_loss: torch.FloatTensor | None = None
    z_loss: torch.FloatTensor | None = None
    importance_loss: torch.FloatTensor | None = None


def _as_stack_output(encoder_outputs) -> MoeT5StackOutput:
    """Accept `encoder_outputs` as our stack output, another `ModelOutput` or a tuple (as T5 does)."""
    if isinstance(encoder_outputs, MoeT5StackOutput):
        return encoder_outputs
    if isinstance(encoder_outputs, ModelOutput):
        losses = None
        if encoder_outputs.get("aux_loss") is not None:  # e.g. a `MoeT5EncoderModelOutput`
            losses = RouterLosses(
                encoder_outputs.aux_loss, encoder_outputs.z_loss, encoder_outputs.importance_loss
            )
        return MoeT5StackOutput(
            last_hidden_state=encoder_outputs[0],
            hidden_states=encoder_outputs.get("hidden_states"),
            attentions=encoder_outputs.get("attentions"),
            router_logits=encoder_outputs.get("router_logits"),
            expert_index=encoder_outputs.get("expert_index"),
            router_losses=losses,
        )
    return MoeT5StackOutput(
        last_hidden_state=encoder_outputs[0],
        hidden_states=encoder_outputs[1] if len(encoder_outputs) > 1 else None,
        attentions=encoder_outputs[2] if len(encoder_outputs) > 2 else None,
    )


def _router_fields(encoder_outputs: MoeT5StackOutput, decoder_outputs: MoeT5StackOutput) -> dict:
    """Per-stack router outputs and losses, and the encoder + decoder totals (None when no loss was computed)."""
    decoder_losses = decoder_outputs.router_losses
    encoder_losses = encoder_outputs.router_losses
    fields = {
        "encoder_router_logits": encoder_outputs.router_logits,
        "decoder_router_logits": decoder_outputs.router_logits,
        "encoder_expert_index": encoder_outputs.expert_index,
        "decoder_expert_index": decoder_outputs.expert_index,
    }
    if encoder_losses is None and decoder_losses is None:
        return fields
    # One stack without losses (encoder outputs computed elsewhere, in eval): its share counts as zero.
    present = decoder_losses if decoder_losses is not None else encoder_losses
    zero = torch.zeros_like(present.aux_loss)
    encoder_losses = encoder_losses if encoder_losses is not None else RouterLosses(zero, zero, zero)
    decoder_losses = decoder_losses if decoder_losses is not None else RouterLosses(zero, zero, zero)
    device = encoder_losses.aux_loss.device
    return {
        **fields,
        "encoder_aux_loss": encoder_losses.aux_loss,
        "encoder_z_loss": encoder_losses.z_loss,
        "encoder_importance_loss": encoder_losses.importance_loss,
        "decoder_aux_loss": decoder_losses.aux_loss,
        "decoder_z_loss": decoder_losses.z_loss,
        "decoder_importance_loss": decoder_losses.importance_loss,
        "aux_loss": encoder_losses.aux_loss + decoder_losses.aux_loss.to(device),
        "z_loss": encoder_losses.z_loss + decoder_losses.z_loss.to(device),
        "importance_loss": encoder_losses.importance_loss + decoder_losses.importance_loss.to(device),
    }


# --------------------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------------------
def _clamp_fp16(hidden_states: torch.Tensor) -> torch.Tensor:
    """Keep fp16 activations finite, as `T5Block` does after each sub-layer (T5 overflows in fp16 otherwise)."""
    if hidden_states.dtype == torch.float16:
        clamp_value = torch.where(
            torch.isinf(hidden_states).any(),
            torch.finfo(hidden_states.dtype).max - 1000,
            torch.finfo(hidden_states.dtype).max,
        )
        hidden_states = torch.clamp(hidden_states, min=-clamp_value, max=clamp_value)
    return hidden_states


class MoeT5LayerFF(nn.Module):
    """`T5LayerFF` with its `DenseReluDense` replaced by a `SparseMoeBlock` (`moe`): pre-norm, experts, residual.

    Every expert has the shape of T5's dense FFN: no biases, `config.dense_act_fn`, gated when `config.is_gated_act`
    (`wi_0`/`wi_1`), and `config.dropout_rate` dropout between its projections.
    """

    def __init__(self, config: MoeT5Config):
        super().__init__()
        self.moe = SparseMoeBlock(
            config,
            hidden_size=config.d_model,
            intermediate_size=config.expert_intermediate_size or config.d_ff,
            hidden_act=config.dense_act_fn,
            gated=config.is_gated_act,
            bias=False,
            dropout=config.dropout_rate,
        )
        self.layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(
        self,
        hidden_states: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, RouterOutput]:
        forwarded_states, routing = self.moe(self.layer_norm(hidden_states), token_mask, input_ids)
        return hidden_states + self.dropout(forwarded_states), routing


class MoeT5Block(GradientCheckpointingLayer):
    """A `T5Block` (self-attention, cross-attention in the decoder, feed-forward) whose feed-forward is T5's dense
    `T5LayerFF` or a `MoeT5LayerFF` (`is_moe`). Returns the router decision of a MoE layer as its 4th output."""

    def __init__(
        self,
        config: MoeT5Config,
        has_relative_attention_bias: bool = False,
        layer_idx: int | None = None,
        is_moe: bool = False,
    ):
        super().__init__()
        self.is_decoder = config.is_decoder
        self.is_moe = is_moe
        self.layer = nn.ModuleList()
        self.layer.append(
            T5LayerSelfAttention(
                config, has_relative_attention_bias=has_relative_attention_bias, layer_idx=layer_idx
            )
        )
        if self.is_decoder:
            self.layer.append(T5LayerCrossAttention(config, layer_idx=layer_idx))
        self.layer.append(MoeT5LayerFF(config) if is_moe else T5LayerFF(config))

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_bias: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        encoder_decoder_position_bias: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ):
        hidden_states, self_attn_position_bias, _ = self.layer[0](
            hidden_states,
            attention_mask=attention_mask,
            position_bias=position_bias,
            cache=cache,
            **kwargs,
        )
        hidden_states = _clamp_fp16(hidden_states)

        cross_attn_position_bias = None
        if self.is_decoder and encoder_hidden_states is not None:
            hidden_states, cross_attn_position_bias, _ = self.layer[1](
                hidden_states,
                key_value_states=encoder_hidden_states,
                attention_mask=encoder_attention_mask,
                position_bias=encoder_decoder_position_bias,
                cache=cache,
                **kwargs,
            )
            hidden_states = _clamp_fp16(hidden_states)

        routing = None
        if self.is_moe:
            hidden_states, routing = self.layer[-1](hidden_states, token_mask, input_ids)
        else:
            hidden_states = self.layer[-1](hidden_states)
        return _clamp_fp16(hidden_states), self_attn_position_bias, cross_attn_position_bias, routing


# --------------------------------------------------------------------------------------------------------------
# Pre-trained model base and stacks
# --------------------------------------------------------------------------------------------------------------
class MoeT5PreTrainedModel(MoePreTrainedMixin, T5PreTrainedModel):
    """T5's `PreTrainedModel` contract (fp32 `wo`, SDPA/flex attention, init factors, `_shift_right`) for MoE-T5."""

    config_class = MoeT5Config
    config: MoeT5Config
    base_model_prefix = "transformer"
    _no_split_modules = ["MoeT5Block"]
    # Expert dispatch has data-dependent shapes (tokens per expert), so no full-graph torch.compile (as Switch).
    _can_compile_fullgraph = False
    # Dense `wo` stays fp32 as in T5 (fp16 overflow), but not the experts' `wo`: transformers also uses this list
    # to skip quantization, and half of every expert would then stay unquantized in 4-bit loads.
    _keep_in_fp32_modules = ["DenseReluDense.wo"]
    _modules_to_not_quantize = ["lm_head"]
    _can_record_outputs = {
        "hidden_states": OutputRecorder(MoeT5Block, index=0),
        "attentions": OutputRecorder(T5LayerSelfAttention, index=-1),
        "cross_attentions": OutputRecorder(T5LayerCrossAttention, index=-1),
    }

    @torch.no_grad()
    def _init_weights(self, module):
        # T5's own rules cover the layer norms, attention and dense FFNs; the MoE parts follow the same factors.
        super()._init_weights(module)
        factor = self.config.initializer_factor
        d_model = self.config.d_model
        # Router: the fan-in rule T5 uses for `wi` (logits of order 1 at the start, no early expert collapse).
        if init_router(module, self.config, std=factor * d_model**-0.5):
            return
        if isinstance(module, MoeExpert):
            for name in ("wi", "wi_0", "wi_1"):
                if hasattr(module, name):
                    init.normal_(getattr(module, name).weight, mean=0.0, std=factor * d_model**-0.5)
            init.normal_(module.wo.weight, mean=0.0, std=factor * module.wo.in_features**-0.5)
        elif isinstance(module, (MoeT5Model, MoeT5ForConditionalGeneration, MoeT5EncoderModel)):
            init.normal_(module.shared.weight, mean=0.0, std=factor * 1.0)
            if hasattr(module, "lm_head") and not self.config.tie_word_embeddings:
                init.normal_(module.lm_head.weight, mean=0.0, std=factor * 1.0)


class MoeT5Stack(MoeT5PreTrainedModel):
    """The T5 encoder or decoder stack (`config.is_decoder`) with MoE feed-forwards in the configured layers."""

    def __init__(self, config: MoeT5Config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.is_decoder = config.is_decoder
        moe_layers = set(
            config.decoder_moe_layer_indices if self.is_decoder else config.encoder_moe_layer_indices
        )
        self.block = nn.ModuleList(
            [
                MoeT5Block(config, has_relative_attention_bias=i == 0, layer_idx=i, is_moe=i in moe_layers)
                for i in range(config.num_layers)
            ]
        )
        self.final_layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.post_init()
        self.gradient_checkpointing = False

    def set_input_embeddings(self, new_embeddings):
        self.embed_tokens = new_embeddings

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")  # transformers 5.24 renamed the cache
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        output_router_losses: bool | None = None,
        **kwargs,
    ) -> MoeT5StackOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): also routes a hash router.
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*): 1 for real tokens,
                0 for padding (in the decoder: over past + current tokens). Padding tokens skip the experts and are
                left out of the router losses.
            output_router_logits (`bool`, *optional*): return `router_logits` and `expert_index` per MoE layer
                (defaults to `config.output_router_logits`).
            output_router_losses (`bool`, *optional*): compute `router_losses`; by default in training or with
                `output_router_logits` (`MoeT5ForConditionalGeneration` also asks whenever labels are given).
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        prefix = "decoder_" if self.is_decoder else ""  # the argument names of the encoder-decoder models
        input_shape = input_ids.shape if input_ids is not None else inputs_embeds.shape[:-1]
        mask_2d = attention_mask is not None and attention_mask.dim() == 2
        # The past length is only needed to check a 2-D mask (some caches count it with a tensor reduction).
        past_length = cache.get_seq_length() if self.is_decoder and cache is not None and mask_2d else 0
        check_input_shapes(
            input_shape,
            attention_mask,
            ids_name=prefix + ("input_ids" if input_ids is not None else "inputs_embeds"),
            mask_name=prefix + "attention_mask",
            past_length=past_length,
        )
        if encoder_hidden_states is not None:
            check_input_shapes(
                encoder_hidden_states.shape[:-1], encoder_attention_mask, ids_name="encoder_hidden_states"
            )
            if encoder_hidden_states.shape[0] != input_shape[0]:
                raise ValueError(
                    f"`{prefix}input_ids` has batch size {input_shape[0]} but the encoder output has "
                    f"{encoder_hidden_states.shape[0]}: encoder and decoder inputs must hold the same sequences."
                )
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache is True and not self.is_decoder:
            raise ValueError(f"`use_cache` can only be set to `True` if {self} is used as a decoder")

        if self.is_decoder:
            if use_cache and cache is None:
                cache = EncoderDecoderCache(
                    DynamicCache(config=self.config), DynamicCache(config=self.config)
                )
        else:
            # The encoder never caches; a cache passed down would be updated in place with encoder states.
            cache = None

        # Which tokens are real, for routing and router losses (a 2-D padding mask covers past + current tokens).
        seq_length = inputs_embeds.shape[1]
        token_mask = (
            attention_mask[:, -seq_length:].bool()
            if attention_mask is not None and attention_mask.dim() == 2
            else None
        )

        if self.is_decoder:
            attention_mask = create_causal_mask(
                config=self.config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                cache=cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache,
            )
        else:
            attention_mask = create_bidirectional_mask(
                config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask
            )
        encoder_extended_attention_mask = None
        if self.is_decoder and encoder_hidden_states is not None:
            encoder_extended_attention_mask = create_bidirectional_mask(
                config=self.config,
                inputs_embeds=inputs_embeds,
                attention_mask=encoder_attention_mask,
                encoder_hidden_states=encoder_hidden_states,
            )

        position_bias = None
        encoder_decoder_position_bias = None
        if self.is_decoder and encoder_hidden_states is not None:
            # Cross-attention has no position bias. T5 builds a zero one with `n_heads` heads; one broadcast over
            # the heads adds the same zeros and also fits a tensor-parallel rank that holds only some of the heads.
            encoder_decoder_position_bias = inputs_embeds.new_zeros(
                1, 1, seq_length, encoder_hidden_states.shape[1]
            )
        routing: list[RouterOutput] = []
        hidden_states = self.dropout(inputs_embeds)
        for block in self.block:
            hidden_states, self_attn_position_bias, cross_attn_position_bias, layer_routing = block(
                hidden_states,
                attention_mask,
                position_bias,
                encoder_hidden_states,
                encoder_extended_attention_mask,
                encoder_decoder_position_bias,  # positional arguments, for gradient checkpointing
                token_mask,
                input_ids,
                cache=cache,
                **kwargs,
            )
            # The first block computes the relative position biases; the others reuse them (as in T5).
            position_bias = self_attn_position_bias
            if self.is_decoder and encoder_hidden_states is not None:
                encoder_decoder_position_bias = cross_attn_position_bias
            if layer_routing is not None:
                routing.append(layer_routing)

        hidden_states = self.dropout(self.final_layer_norm(hidden_states))
        return MoeT5StackOutput(
            last_hidden_state=hidden_states,
            cache=cache,
            router_logits=tuple(r.router_logits for r in routing) if output_router_logits else None,
            expert_index=tuple(r.expert_index for r in routing) if output_router_logits else None,
            router_losses=compute_router_losses(routing, hidden_states)
            if wants_router_losses(self, output_router_losses, output_router_logits)
            else None,
        )


def _encoder_config(config: MoeT5Config) -> MoeT5Config:
    encoder_config = copy.deepcopy(config)
    encoder_config.is_decoder = False
    encoder_config.use_cache = False
    return encoder_config


def _decoder_config(config: MoeT5Config) -> MoeT5Config:
    decoder_config = copy.deepcopy(config)
    decoder_config.is_decoder = True
    decoder_config.num_layers = config.num_decoder_layers
    return decoder_config


# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------
class MoeT5Model(MoeT5PreTrainedModel):
    """The bare MoE-T5 encoder-decoder, returning the decoder's last hidden state and both stacks' router outputs."""

    _keys_to_ignore_on_load_unexpected = [
        "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"
    ]
    _tied_weights_keys = {
        "encoder.embed_tokens.weight": "shared.weight",
        "decoder.embed_tokens.weight": "shared.weight",
    }

    def __init__(self, config: MoeT5Config):
        super().__init__(config)
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = MoeT5Stack(_encoder_config(config))
        self.decoder = MoeT5Stack(_decoder_config(config))
        self.post_init()

    def get_input_embeddings(self):
        return self.shared

    def set_input_embeddings(self, new_embeddings):
        self.shared = new_embeddings
        self.encoder.set_input_embeddings(new_embeddings)
        self.decoder.set_input_embeddings(new_embeddings)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: MoeT5StackOutput | tuple | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        output_router_losses: bool | None = None,
        **kwargs,
    ) -> MoeT5Seq2SeqModelOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): encoder input.
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*): encoder padding
                mask; padding tokens skip the experts and are left out of the router losses.
            decoder_input_ids (`torch.LongTensor` of shape `(batch_size, target_sequence_length)`): decoder input,
                starting with `config.decoder_start_token_id` (see `_shift_right`).
            decoder_attention_mask (`torch.Tensor` of shape `(batch_size, target_sequence_length)`, *optional*):
                decoder padding mask (also the decoder's token mask for routing); all ones when omitted.
            encoder_outputs (*optional*): precomputed encoder outputs (their router losses count when present).
            output_router_logits (`bool`, *optional*): return router logits and expert choices per MoE layer.
            output_router_losses (`bool`, *optional*): compute the router losses; by default in training or with
                `output_router_logits` (None otherwise, e.g. at every `generate()` step).
        """
        if output_router_logits is None:  # the stacks hold copies of the config: read the model's own
            output_router_logits = self.config.output_router_logits
        output_router_losses = wants_router_losses(self, output_router_losses, output_router_logits)
        if encoder_outputs is None:
            encoder_outputs = self.encoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                inputs_embeds=inputs_embeds,
                output_router_logits=output_router_logits,
                output_router_losses=output_router_losses,
                **kwargs,
            )
        else:
            encoder_outputs = _as_stack_output(encoder_outputs)

        decoder_outputs = self.decoder(
            input_ids=decoder_input_ids,
            attention_mask=decoder_attention_mask,
            inputs_embeds=decoder_inputs_embeds,
            cache=cache,
            encoder_hidden_states=encoder_outputs.last_hidden_state,
            encoder_attention_mask=attention_mask,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            output_router_losses=output_router_losses,
            **kwargs,
        )
        return MoeT5Seq2SeqModelOutput(
            last_hidden_state=decoder_outputs.last_hidden_state,
            cache=decoder_outputs.cache,
            decoder_hidden_states=decoder_outputs.hidden_states,
            decoder_attentions=decoder_outputs.attentions,
            cross_attentions=decoder_outputs.cross_attentions,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_attentions=encoder_outputs.attentions,
            **_router_fields(encoder_outputs, decoder_outputs),
        )


class MoeT5ForConditionalGeneration(MoeT5PreTrainedModel, GenerationMixin):
    """MoE-T5 with T5's language-modeling head (tied to `shared`, with T5's `d_model**-0.5` rescale when tied).

    `generate()` works as for T5 (greedy, sampling, beam search, with the encoder-decoder KV cache).
    """

    _keys_to_ignore_on_load_unexpected = [
        "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"
    ]
    _tied_weights_keys = {
        "encoder.embed_tokens.weight": "shared.weight",
        "decoder.embed_tokens.weight": "shared.weight",
        "lm_head.weight": "shared.weight",
    }
    # Split by vocabulary like the shared embedding it is tied to; logits are gathered on every rank.
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: MoeT5Config):
        super().__init__(config)
        self.model_dim = config.d_model
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = MoeT5Stack(_encoder_config(config))
        self.decoder = MoeT5Stack(_decoder_config(config))
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.shared

    def set_input_embeddings(self, new_embeddings):
        self.shared = new_embeddings
        self.encoder.set_input_embeddings(new_embeddings)
        self.decoder.set_input_embeddings(new_embeddings)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: MoeT5StackOutput | tuple | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        output_router_losses: bool | None = None,
        **kwargs,
    ) -> MoeT5Seq2SeqLMOutput:
        r"""
        Args:
            input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, encoder_outputs,
            output_router_logits, output_router_losses: as in [`MoeT5Model.forward`]; the router losses are also
                computed whenever `labels` are given.
            labels (`torch.LongTensor` of shape `(batch_size, target_sequence_length)`, *optional*): target ids,
                -100 = ignored. Without `decoder_input_ids` they are shifted right to make the decoder input. Then
                `loss = CE + router_aux_loss_coef · aux_loss + router_z_loss_coef · z_loss
                + router_importance_loss_coef · importance_loss`, the router losses summed over encoder and decoder.
        """
        if output_router_logits is None:  # the stacks hold copies of the config: read the model's own
            output_router_logits = self.config.output_router_logits
        output_router_losses = wants_router_losses(
            self, output_router_losses, output_router_logits, labels_given=labels is not None
        )
        if encoder_outputs is None:
            encoder_outputs = self.encoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                inputs_embeds=inputs_embeds,
                output_router_logits=output_router_logits,
                output_router_losses=output_router_losses,
                **kwargs,
            )
        else:
            encoder_outputs = _as_stack_output(encoder_outputs)

        if labels is not None and decoder_input_ids is None and decoder_inputs_embeds is None:
            decoder_input_ids = self._shift_right(labels)

        decoder_outputs = self.decoder(
            input_ids=decoder_input_ids,
            attention_mask=decoder_attention_mask,
            inputs_embeds=decoder_inputs_embeds,
            cache=cache,
            encoder_hidden_states=encoder_outputs.last_hidden_state,
            encoder_attention_mask=attention_mask,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            output_router_losses=output_router_losses,
            **kwargs,
        )

        sequence_output = decoder_outputs.last_hidden_state
        if self.config.scale_decoder_outputs:
            # Tied embeddings: rescale before projecting on the vocabulary (Mesh TensorFlow T5, as transformers).
            sequence_output = sequence_output * (self.model_dim**-0.5)
        lm_logits = self.lm_head(sequence_output)

        router_fields = _router_fields(encoder_outputs, decoder_outputs)
        task_loss = None
        if labels is not None:
            labels = labels.to(lm_logits.device)
            task_loss = CrossEntropyLoss(ignore_index=-100)(
                lm_logits.view(-1, lm_logits.size(-1)), labels.reshape(-1)
            )
        totals = RouterLosses(
            router_fields.get("aux_loss"), router_fields.get("z_loss"), router_fields.get("importance_loss")
        )

        return MoeT5Seq2SeqLMOutput(
            loss=total_loss(task_loss, totals, self.config),
            logits=lm_logits,
            cache=decoder_outputs.cache,
            decoder_hidden_states=decoder_outputs.hidden_states,
            decoder_attentions=decoder_outputs.attentions,
            cross_attentions=decoder_outputs.cross_attentions,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_attentions=encoder_outputs.attentions,
            **router_fields,
        )

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor):
        return self._shift_right(labels)


class MoeT5EncoderModel(MoeT5PreTrainedModel):
    """The MoE-T5 encoder alone (text encoding, embeddings); loads the encoder half of a seq2seq checkpoint."""

    _tied_weights_keys = {"encoder.embed_tokens.weight": "shared.weight"}
    # Loading the encoder of a seq2seq checkpoint: its decoder (and LM head) are not part of this model.
    _keys_to_ignore_on_load_unexpected = [r"^decoder\.", r"^lm_head\."]

    def __init__(self, config: MoeT5Config):
        super().__init__(config)
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        encoder_config = _encoder_config(config)
        encoder_config.is_encoder_decoder = False
        self.encoder = MoeT5Stack(encoder_config)
        self.post_init()

    def get_input_embeddings(self):
        return self.shared

    def set_input_embeddings(self, new_embeddings):
        self.shared = new_embeddings
        self.encoder.set_input_embeddings(new_embeddings)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_router_logits: bool | None = None,
        output_router_losses: bool | None = None,
        **kwargs,
    ) -> MoeT5EncoderModelOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`)
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*): padding mask.
            output_router_logits (`bool`, *optional*): return router logits and expert choices per MoE layer.
            output_router_losses (`bool`, *optional*): compute the router losses; by default in training or with
                `output_router_logits` (None otherwise, e.g. at every `generate()` step).
        """
        if output_router_logits is None:  # the stack holds a copy of the config: read the model's own
            output_router_logits = self.config.output_router_logits
        output_router_losses = wants_router_losses(self, output_router_losses, output_router_logits)
        outputs = self.encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            output_router_logits=output_router_logits,
            output_router_losses=output_router_losses,
            **kwargs,
        )
        return MoeT5EncoderModelOutput(
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
            expert_index=outputs.expert_index,
            **RouterLosses.output_fields(outputs.router_losses),
        )


__all__ = [
    "MoeT5PreTrainedModel",
    "MoeT5Model",
    "MoeT5EncoderModel",
    "MoeT5ForConditionalGeneration",
]
