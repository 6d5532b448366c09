"""Mixture-of-Experts building blocks shared by every ptmoe model family.

The data path of one MoE feed-forward layer::

    hidden_states ──► router ──► RouterOutput(router_logits, router_probs, topk_index, topk_weights, dispatch_mask)
                                      │
                                      └─► experts.{i} (only the tokens routed to i) ──► weighted sum ──► output

This file travels inside Hub checkpoints next to the modeling files (``trust_remote_code``), so it imports
only torch and transformers — never ``ptmoe``.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.distributed.parallel_utils import replace_layer_number_by_wildcard

ROUTER_TYPES = ("topk", "switch", "noisy_topk", "hash", "expert_choice", "hierarchical")
COMBINE_WEIGHTS = ("router", "ones")
HASH_ROUTER_SEED = 1234  # fixed: the token → expert table must not depend on the global RNG


# --------------------------------------------------------------------------------------------------------------
# Configuration helpers (used by every MoE config class)
# --------------------------------------------------------------------------------------------------------------
def resolve_moe_layers(
    spec: int | Sequence[int] | None, num_layers: int, field: str = "moe_layers"
) -> list[int]:
    """Turn a MoE layer specification into a sorted list of layer indices.

    Args:
        spec (`int`, `list[int]` or `None`):
            An explicit list of 0-based layer indices, or an integer step ``n`` meaning "every n-th layer"
            (layers ``n-1, 2n-1, …``: with ``n=2`` the 2nd, 4th, … layers, as in Switch Transformer and
            GShard; with ``n=1`` every layer). ``None`` or ``[]`` means no MoE layer.
        num_layers (`int`): number of layers in the stack.
        field (`str`): the config field name, used in error messages.
    """
    if spec is None:
        return []
    if isinstance(spec, bool):
        raise ValueError(f"`{field}` must be a list of layer indices or an integer step, got {spec!r}")
    if isinstance(spec, int):
        if spec < 1:
            raise ValueError(
                f"`{field}` as an integer is a step (every n-th layer) and must be >= 1, got {spec}"
            )
        return [i for i in range(num_layers) if i % spec == spec - 1]
    layers = list(spec)
    for index in layers:
        if isinstance(index, bool) or not isinstance(index, int):
            raise ValueError(f"`{field}` must contain integer layer indices, got {index!r}")
        if not 0 <= index < num_layers:
            raise ValueError(
                f"`{field}` contains layer index {index}, but the stack has {num_layers} layers "
                f"(valid indices are 0..{num_layers - 1})"
            )
    if len(set(layers)) != len(layers):
        raise ValueError(f"`{field}` contains duplicate layer indices: {layers}")
    return sorted(layers)


def check_finite_fields(config) -> None:
    """Refuse nan/inf in every float field of `config` (and in lists of floats), naming the field.

    One check over all fields, so float fields added later (and BERT's/T5's own, such as dropout rates) are
    covered too: a nan or inf coefficient would silently turn every training loss into nan/inf.
    """
    for name, value in vars(config).items():
        values = value if isinstance(value, (list, tuple)) else (value,)
        for item in values:
            if isinstance(item, float) and not math.isfinite(item):
                raise ValueError(f"`{name}` must be a finite number, got {value!r}")


def validate_moe_fields(config) -> None:
    """Raise a `ValueError` naming the field for every invalid MoE value of `config` (checked at construction)."""
    check_finite_fields(config)
    if not isinstance(config.num_experts, int) or config.num_experts < 1:
        raise ValueError(f"`num_experts` must be an integer >= 1, got {config.num_experts!r}")
    k = config.num_experts_per_tok
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"`num_experts_per_tok` must be an integer >= 1, got {k!r}")
    if k > config.num_experts:
        raise ValueError(
            f"`num_experts_per_tok` ({k}) cannot be larger than `num_experts` ({config.num_experts})"
        )
    if config.router_type not in ROUTER_TYPES:
        raise ValueError(f"`router_type` must be one of {ROUTER_TYPES}, got {config.router_type!r}")
    if config.router_type == "switch" and k != 1:
        raise ValueError(
            f"`router_type='switch'` routes every token to one expert: set `num_experts_per_tok=1`, got {k}"
        )
    for name in ("capacity_factor", "eval_capacity_factor"):
        value = getattr(config, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"`{name}` must be a number > 0, got {value!r}")
    if config.expert_capacity is not None and (
        isinstance(config.expert_capacity, bool)
        or not isinstance(config.expert_capacity, int)
        or config.expert_capacity < 1
    ):
        raise ValueError(f"`expert_capacity` must be None or an integer >= 1, got {config.expert_capacity!r}")
    for name in (
        "router_jitter_noise",
        "router_aux_loss_coef",
        "router_z_loss_coef",
        "router_importance_loss_coef",
        "router_domain_loss_coef",
    ):
        value = getattr(config, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise ValueError(f"`{name}` must be a number >= 0, got {value!r}")
    names = config.expert_names
    if names is not None:
        if (
            not isinstance(names, (list, tuple))
            or len(names) != config.num_experts
            or not all(isinstance(n, str) and n.strip() for n in names)
        ):
            raise ValueError(
                f"`expert_names` must be None or a list of {config.num_experts} non-empty strings (one domain name "
                f"per expert, repeated for several experts of one domain), got {names!r}"
            )
    if not isinstance(config.num_shared_experts, int) or config.num_shared_experts < 0:
        raise ValueError(f"`num_shared_experts` must be an integer >= 0, got {config.num_shared_experts!r}")
    shared_size = getattr(config, "shared_expert_intermediate_size", None)
    if shared_size is not None and (
        isinstance(shared_size, bool) or not isinstance(shared_size, int) or shared_size < 1
    ):
        raise ValueError(
            f"`shared_expert_intermediate_size` must be None or an integer >= 1, got {shared_size!r}"
        )
    combine = getattr(config, "combine_weights", "router")
    if combine not in COMBINE_WEIGHTS:
        raise ValueError(f"`combine_weights` must be one of {COMBINE_WEIGHTS}, got {combine!r}")
    if combine == "ones" and config.router_type not in ("topk", "noisy_topk"):
        raise ValueError(
            f"`combine_weights='ones'` is for the 'topk' and 'noisy_topk' routers, got router_type={config.router_type!r}"
        )
    top_p = getattr(config, "router_top_p", None)
    if top_p is not None:
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise ValueError(f"`router_top_p` must be None or a number in (0, 1], got {top_p!r}")
        if config.router_type not in ("topk", "noisy_topk"):
            raise ValueError(
                f"`router_top_p` is for the 'topk' and 'noisy_topk' routers, got router_type={config.router_type!r}"
            )
    if config.router_init not in ("normal", "zeros"):
        raise ValueError(f"`router_init` must be 'normal' or 'zeros', got {config.router_init!r}")
    if config.expert_intermediate_size is not None and (
        not isinstance(config.expert_intermediate_size, int) or config.expert_intermediate_size < 1
    ):
        raise ValueError(
            f"`expert_intermediate_size` must be None or an integer >= 1, got {config.expert_intermediate_size!r}"
        )
    validate_routing_extensions(config)


EXPERT_CHOICE_DECODER_ERROR = (
    "`router_type='expert_choice'` needs every token of a sequence before routing (each expert picks its "
    "top tokens), so it only works in encoders: a decoder (and every `generate()` step) sees one token at a time "
    "and would leak future tokens. For MoE-T5 set `decoder_router_type` (e.g. 'topk', as Sparse Upcycling does) or "
    "`decoder_moe_layers=[]`."
)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_routing_extensions(config) -> None:
    """Check the fields of expert-choice routing, hierarchical routing and expert dropout (`ValueError` naming them).

    Configs saved before these fields existed load with their defaults (`getattr`).
    """
    capacity = getattr(config, "expert_capacity_factor", None)
    if capacity is not None and (not _is_number(capacity) or capacity <= 0):
        raise ValueError(f"`expert_capacity_factor` must be None or a number > 0, got {capacity!r}")
    router_types = (config.router_type, getattr(config, "decoder_router_type", None))
    if capacity is not None and "expert_choice" not in router_types:
        raise ValueError(
            f"`expert_capacity_factor` applies to `router_type='expert_choice'` only (got router_type="
            f"{config.router_type!r}); the Switch router's capacity is `capacity_factor`"
        )
    dropout = getattr(config, "expert_dropout", None)
    if dropout is not None and (not _is_number(dropout) or not 0 <= dropout < 1):
        raise ValueError(f"`expert_dropout` must be None or a number in [0, 1), got {dropout!r}")
    groups = getattr(config, "router_groups", 1)
    groups_per_tok = getattr(config, "num_groups_per_tok", 1)
    for name, value in (("router_groups", groups), ("num_groups_per_tok", groups_per_tok)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}")
    if "hierarchical" not in router_types:
        if groups != 1 or groups_per_tok != 1:
            raise ValueError(
                f"`router_groups` / `num_groups_per_tok` apply to `router_type='hierarchical'` only; got "
                f"router_groups={groups}, num_groups_per_tok={groups_per_tok} with router_type={config.router_type!r}"
            )
    elif router_type_of(config) == "hierarchical":
        num_experts, k = config.num_experts, config.num_experts_per_tok
        if num_experts % groups != 0:
            raise ValueError(
                f"`router_groups` ({groups}) must divide `num_experts` ({num_experts}) into equal groups: choose "
                f"router_groups among {[g for g in range(1, num_experts + 1) if num_experts % g == 0]}"
            )
        if groups_per_tok > groups:
            raise ValueError(
                f"`num_groups_per_tok` ({groups_per_tok}) cannot be larger than `router_groups` ({groups})"
            )
        if k % groups_per_tok != 0:
            raise ValueError(
                f"`num_experts_per_tok` ({k}) is the total number of experts per token and must split evenly over "
                f"the `num_groups_per_tok` ({groups_per_tok}) chosen groups"
            )
        if k // groups_per_tok > num_experts // groups:
            raise ValueError(
                f"hierarchical routing picks num_experts_per_tok / num_groups_per_tok = {k // groups_per_tok} "
                f"experts in each chosen group, but a group has only num_experts / router_groups = "
                f"{num_experts // groups}: lower `num_experts_per_tok`, raise `num_groups_per_tok` or use fewer groups"
            )
    if router_type_of(config) == "expert_choice" and getattr(config, "is_decoder", False):
        raise ValueError(EXPERT_CHOICE_DECODER_ERROR)


def router_type_of(config) -> str:
    """The router of the stack `config` describes: `decoder_router_type` in a decoder stack when set, else `router_type`."""
    if getattr(config, "is_decoder", False) and getattr(config, "decoder_router_type", None) is not None:
        return config.decoder_router_type
    return config.router_type


def validate_decoder_router(config, has_decoder_moe: bool) -> None:
    """Check the decoder's router of an encoder-decoder config (`decoder_router_type`, or `router_type` if unset).

    Args:
        config: a MoE encoder-decoder config (MoE-T5).
        has_decoder_moe (`bool`): whether the decoder has MoE layers (expert choice is fine without them).
    """
    decoder_type = config.decoder_router_type
    if decoder_type is not None:
        if decoder_type not in ROUTER_TYPES:
            raise ValueError(
                f"`decoder_router_type` must be None or one of {ROUTER_TYPES}, got {decoder_type!r}"
            )
        if decoder_type == "switch" and config.num_experts_per_tok != 1:
            raise ValueError(
                "`decoder_router_type='switch'` routes every token to one expert: set `num_experts_per_tok=1`, "
                f"got {config.num_experts_per_tok}"
            )
        if decoder_type == "hierarchical" and config.router_type != "hierarchical":
            # the group fields were checked against the encoder's router: check them for the decoder's
            view = copy.copy(config)
            view.__dict__["is_decoder"] = True
            validate_routing_extensions(view)
    if has_decoder_moe and (decoder_type or config.router_type) == "expert_choice":
        raise ValueError(EXPERT_CHOICE_DECODER_ERROR)


# Switch Transformer recipe (Fedus et al. 2021; z-loss from ST-MoE, Zoph et al. 2022): top-1 routing with an
# expert capacity, token dropping, jitter, aux loss 1e-2 and z-loss 1e-3.
SWITCH_PRESET = {
    "router_type": "switch",
    "num_experts_per_tok": 1,
    "capacity_factor": 1.25,
    "eval_capacity_factor": 2.0,
    "router_jitter_noise": 0.01,
    "router_aux_loss_coef": 0.01,
    "router_z_loss_coef": 0.001,
}


class MoeConfigMixin:
    """Behaviour shared by the MoE config classes (the fields themselves are declared on each config)."""

    @classmethod
    def switch(cls, **kwargs):
        """A config with the Switch Transformer recipe (`SWITCH_PRESET`); `kwargs` override any field.

        Example: ``MoeBertConfig.switch(num_experts=8)`` or ``MoeT5Config.switch(num_experts=8)``.
        """
        return cls(**{**SWITCH_PRESET, **kwargs})


# --------------------------------------------------------------------------------------------------------------
# Input checks at the top of the forwards: shapes only (no tensor values, so no host sync in the hot path)
# --------------------------------------------------------------------------------------------------------------
def check_input_shapes(
    input_shape: Sequence[int],
    attention_mask: torch.Tensor | None = None,
    *,
    ids_name: str = "input_ids",
    mask_name: str = "attention_mask",
    max_positions: int | None = None,
    past_length: int = 0,
    **same_shape: torch.Tensor | None,
) -> None:
    """Refuse inputs whose shapes do not fit, with a `ValueError` naming the argument, before any tensor code runs.

    Without this a wrong mask or an over-long sequence ends in a broadcasting `RuntimeError` inside a router or an
    `IndexError` in the position embeddings.

    Args:
        input_shape (`Sequence[int]`): `(batch_size, sequence_length)` of `input_ids` (or of `inputs_embeds` without
            its hidden dimension).
        attention_mask (`torch.Tensor`, *optional*): a 2-D padding mask must be `(batch_size, past_length +
            sequence_length)`; 4-D masks are taken as they are.
        ids_name (`str`), mask_name (`str`): the argument names used in messages.
        max_positions (`int`, *optional*): learned absolute positions (`max_position_embeddings`); `past_length +
            sequence_length` must not exceed it.
        past_length (`int`, defaults to 0): tokens already in the cache (decoders).
        **same_shape: other `(batch_size, sequence_length)` inputs by argument name (e.g. `token_type_ids`).
    """
    if len(input_shape) != 2:
        raise ValueError(
            f"`{ids_name}` must have shape (batch_size, sequence_length), got {tuple(input_shape)}: add the batch "
            "dimension (e.g. `input_ids.unsqueeze(0)`, or `return_tensors='pt'` in the tokenizer)."
        )
    batch_size, seq_length = input_shape
    if seq_length == 0:
        raise ValueError(f"`{ids_name}` is empty (sequence length 0): pass at least one token per sequence.")
    total = past_length + seq_length
    if max_positions is not None and total > max_positions:
        raise ValueError(
            f"`{ids_name}` has {total} tokens per sequence but the model has {max_positions} positions "
            f"(`max_position_embeddings`): truncate the input (e.g. `truncation=True, max_length={max_positions}` "
            "in the tokenizer)."
        )
    if attention_mask is not None and attention_mask.dim() != 4:
        if tuple(attention_mask.shape) != (batch_size, total):
            expected = f"({batch_size}, {total})" + (
                f" = past {past_length} + {seq_length} new" if past_length else ""
            )
            raise ValueError(
                f"`{mask_name}` has shape {tuple(attention_mask.shape)} but `{ids_name}` needs {expected} "
                "(batch_size, sequence_length): build both with the same tokenizer call, with the same padding."
            )
    for name, tensor in same_shape.items():
        if tensor is not None and tuple(tensor.shape) != (batch_size, seq_length):
            raise ValueError(
                f"`{name}` has shape {tuple(tensor.shape)} but `{ids_name}` has ({batch_size}, {seq_length}): they "
                "must have the same shape."
            )


# --------------------------------------------------------------------------------------------------------------
# Routers
# --------------------------------------------------------------------------------------------------------------
@dataclass
class RouterOutput:
    """What a router decided for one batch. Shapes use B = batch, S = sequence, E = experts, k = experts per token.

    Attributes:
        router_logits (`torch.FloatTensor` of shape `(B, S, E)`): pre-softmax scores, always fp32.
        router_probs (`torch.FloatTensor` of shape `(B, S, E)`): softmax of `router_logits`.
        topk_index (`torch.LongTensor` of shape `(B, S, k)`): chosen experts, before any capacity drop; -1 marks a
            slot that holds no expert (expert choice: slot e holds expert e when e picked the token, else -1).
        topk_weights (`torch.FloatTensor` of shape `(B, S, k)`): weights that combine the chosen experts' outputs.
        dispatch_mask (`torch.BoolTensor` of shape `(B, S, k)`): True where the token really goes to that expert;
            False for padding tokens and for tokens dropped by the expert capacity (their expert output is zero).
        token_mask (`torch.BoolTensor` of shape `(B, S)`): True for real (non-padding) tokens.
        learned (`bool`): False for routers without trainable parameters (hash): their losses are not computed.
        expert_choice (`bool`): True when experts chose the tokens (`ExpertChoiceRouter`): the layer is balanced by
            construction, so the load-balancing and importance losses are not computed for it.
        group_routing (`RouterOutput`, *optional*): hierarchical routing only: the first level's decision over the
            G expert groups (`router_logits` / `router_probs` of shape `(B, S, G)`, `topk_index` / `topk_weights` of
            shape `(B, S, groups per token)`).
        expert_logits (`torch.FloatTensor` of shape `(B, S, E)`, *optional*): hierarchical routing only: the raw
            expert-gate logits, whose softmax runs within each group (`router_logits` then holds log(router_probs)).
    """

    router_logits: torch.Tensor
    router_probs: torch.Tensor
    topk_index: torch.Tensor
    topk_weights: torch.Tensor
    dispatch_mask: torch.Tensor
    token_mask: torch.Tensor
    learned: bool = True
    expert_choice: bool = False
    group_routing: RouterOutput | None = None
    expert_logits: torch.Tensor | None = None

    @property
    def expert_index(self) -> torch.Tensor:
        """`(B, S, k)` expert ids actually used, with -1 where the token was not dispatched (padding or dropped)."""
        return self.topk_index.masked_fill(~self.dispatch_mask, -1)


class TopKRouter(nn.Module):
    """Softmax top-k token-choice router (Shazeer et al. 2017; Mixtral / Qwen-MoE style).

    Logits are computed in fp32 from fp32 copies of the input and weight, whatever the model dtype ("selective
    precision", Switch Transformer §2.4). The weight is a bare `nn.Parameter` (no `nn.Linear`), so weight
    quantization (bitsandbytes) can never touch a router. Forward never changes module state.
    """

    learned = True
    expert_choice = False
    # Expert ids this router may choose (forced routing, set by `force_experts` / `model.route_to`); None = all.
    forced_experts: tuple[int, ...] | None = None
    # Routers whose `forward` applies `allowed_mask`; the others refuse forced routing instead of ignoring it.
    supports_forced_routing = True

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        num_experts_per_tok: int,
        norm_topk_prob: bool = True,
        jitter_noise: float = 0.0,
        combine_weights: str = "router",
        top_p: float | None = None,
    ):
        super().__init__()
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.norm_topk_prob = norm_topk_prob
        self.jitter_noise = jitter_noise
        self.combine_weights = combine_weights
        self.top_p = top_p
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))

    def force_experts(self, experts: Sequence[int] | None) -> None:
        """Route every token only to `experts` (expert ids) from now on; `None` restores learned routing.

        An explicit method, never called from `forward` (routers do not change their state while computing).
        """
        if experts is None:
            self.forced_experts = None
            return
        if not self.supports_forced_routing:
            raise ValueError(
                f"forced routing is not supported by {type(self).__name__}: use router_type 'topk', 'switch', "
                "'noisy_topk' or 'hash' for models whose experts are routed to by name"
            )
        experts = tuple(sorted({int(e) for e in experts}))
        if not experts or not all(0 <= e < self.num_experts for e in experts):
            raise ValueError(f"forced experts must be ids in 0..{self.num_experts - 1}, got {list(experts)}")
        self.forced_experts = experts

    def allowed_mask(self, device: torch.device) -> torch.Tensor | None:
        """`(E,)` bool mask of the experts this router may choose, or None when routing is not forced."""
        if self.forced_experts is None:
            return None
        allowed = torch.zeros(self.num_experts, dtype=torch.bool, device=device)
        allowed[list(self.forced_experts)] = True
        return allowed

    def router_input(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The fp32 router input, with Switch Transformer's multiplicative uniform jitter in training."""
        hidden_states = hidden_states.float()
        if self.training and self.jitter_noise > 0:
            noise = torch.empty_like(hidden_states).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
            hidden_states = hidden_states * noise
        return hidden_states

    def compute_logits(self, hidden_states: torch.Tensor, input_ids: torch.Tensor | None) -> torch.Tensor:
        return F.linear(self.router_input(hidden_states), self.weight.float())  # (B, S, E)

    def select(self, router_probs: torch.Tensor, token_mask: torch.Tensor):
        topk_weights, topk_index = torch.topk(router_probs, self.num_experts_per_tok, dim=-1)  # (B, S, k)
        dispatch_mask = token_mask.unsqueeze(-1).expand_as(topk_index)
        top_p = getattr(self, "top_p", None)
        if top_p is not None:
            # Dynamic compute (top-p): a slot is used while the mass of the better slots is still below p, so each
            # token gets the fewest experts whose probability mass reaches p (at least 1, at most k).
            mass_before = topk_weights.cumsum(dim=-1) - topk_weights  # (B, S, k)
            used = mass_before < top_p
            dispatch_mask = dispatch_mask & used
            topk_weights = topk_weights * used
        if getattr(self, "combine_weights", "router") == "ones":
            # MoEfication: the router only selects; the chosen experts' outputs are summed.
            topk_weights = torch.ones_like(topk_weights)
        elif self.norm_topk_prob:
            topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
        return topk_weights, topk_index, dispatch_mask

    def forward(
        self, hidden_states: torch.Tensor, token_mask: torch.Tensor, input_ids: torch.Tensor | None = None
    ) -> RouterOutput:
        """
        Args:
            hidden_states (`torch.Tensor` of shape `(B, S, H)`): router input.
            token_mask (`torch.BoolTensor` of shape `(B, S)`): True for real tokens, False for padding.
            input_ids (`torch.LongTensor` of shape `(B, S)`, *optional*): token ids (used by the hash router).
        """
        router_logits = self.compute_logits(hidden_states, input_ids)
        allowed = self.allowed_mask(router_logits.device)
        if allowed is None:
            router_probs = router_logits.softmax(dim=-1)
        else:  # forced routing: the softmax (and so top-k) runs over the allowed experts only
            router_probs = router_logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        topk_weights, topk_index, dispatch_mask = self.select(router_probs, token_mask)
        if allowed is not None:
            # Slots that top-k filled with a probability-0 expert (fewer allowed experts than k) are not dispatched.
            dispatch_mask = dispatch_mask & allowed[topk_index]
        return RouterOutput(
            router_logits=router_logits,
            router_probs=router_probs,
            topk_index=topk_index,
            topk_weights=topk_weights,
            dispatch_mask=dispatch_mask,
            token_mask=token_mask,
            learned=self.learned,
            expert_choice=self.expert_choice,
        )


class SwitchRouter(TopKRouter):
    """Switch Transformer top-1 router (Fedus et al. 2021) with an expert capacity.

    Each sequence is a routing group. An expert accepts at most ``capacity`` tokens per group, where
    ``capacity = ceil(capacity_factor · real_tokens_in_group / num_experts)`` (``eval_capacity_factor`` in eval
    mode), or the absolute ``expert_capacity`` when it is set (the format of transformers' Switch Transformers
    checkpoints). Tokens are served in sequence order; overflow tokens are dropped: their expert output is zero
    and the residual connection carries them. Padding tokens neither use capacity nor reach an expert. The
    combine weight is the router probability of the chosen expert (never renormalised, so the router learns).
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        capacity_factor: float = 1.25,
        eval_capacity_factor: float = 2.0,
        expert_capacity: int | None = None,
        jitter_noise: float = 0.0,
    ):
        super().__init__(hidden_size, num_experts, 1, norm_topk_prob=False, jitter_noise=jitter_noise)
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.expert_capacity = expert_capacity

    def capacity(self, token_mask: torch.Tensor) -> torch.Tensor:
        """`(B, 1)` number of tokens each expert accepts in each sequence."""
        if self.expert_capacity is not None:
            return torch.full((token_mask.shape[0], 1), self.expert_capacity, device=token_mask.device)
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        real_tokens = token_mask.sum(dim=-1, keepdim=True).float()
        return torch.ceil(real_tokens * factor / self.num_experts).long()

    def cannot_overflow(self, seq_len: int) -> bool:
        """True when no expert can receive more tokens of a sequence than its capacity (e.g. one decoding step)."""
        if self.expert_capacity is not None:
            return self.expert_capacity >= seq_len
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        # capacity = ceil(factor · real / E) >= real for every real <= seq_len when seq_len == 1 or factor >= E.
        return seq_len == 1 or factor >= self.num_experts

    def select(self, router_probs: torch.Tensor, token_mask: torch.Tensor):
        topk_weights, topk_index = router_probs.max(dim=-1, keepdim=True)  # (B, S, 1)
        if self.cannot_overflow(router_probs.shape[1]):
            return topk_weights, topk_index, token_mask.unsqueeze(-1)
        routed = F.one_hot(topk_index.squeeze(-1), self.num_experts) * token_mask.unsqueeze(-1)  # (B, S, E)
        # (B, S): each token's 1-based position in its expert's queue
        priority = (routed.cumsum(dim=1) * routed).sum(dim=-1)
        within_capacity = priority <= self.capacity(token_mask)
        dispatch_mask = (token_mask & within_capacity).unsqueeze(-1)  # (B, S, 1)
        return topk_weights, topk_index, dispatch_mask


class NoisyTopKRouter(TopKRouter):
    """Noisy top-k gating (Shazeer et al. 2017, eq. 3-5).

    In training, ``H(x) = x·W_g + ε · softplus(x·W_noise)`` with ``ε ~ N(0, 1)``; in eval the noise is off.
    Gates are the softmax over the top-k of ``H(x)``, which equals the renormalised top-k of the full softmax.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        num_experts_per_tok: int,
        jitter_noise: float = 0.0,
        combine_weights: str = "router",
        top_p: float | None = None,
    ):
        super().__init__(
            hidden_size,
            num_experts,
            num_experts_per_tok,
            norm_topk_prob=True,
            jitter_noise=jitter_noise,
            combine_weights=combine_weights,
            top_p=top_p,
        )
        self.noise_weight = nn.Parameter(torch.empty(num_experts, hidden_size))

    def compute_logits(self, hidden_states: torch.Tensor, input_ids: torch.Tensor | None) -> torch.Tensor:
        clean_logits = super().compute_logits(hidden_states, input_ids)
        if not self.training:
            return clean_logits
        noise_scale = F.softplus(F.linear(hidden_states.float(), self.noise_weight.float()))
        return clean_logits + torch.randn_like(clean_logits) * noise_scale


class HashRouter(TopKRouter):
    """Hash routing (Roller et al. 2021): each token id goes to a fixed expert; nothing is learned.

    The token → expert table is a balanced random assignment (a seeded permutation of the vocabulary, modulo the
    number of experts) stored as a persistent buffer, so it is saved with the checkpoint. Combine weight is 1.
    """

    learned = False

    def __init__(self, num_experts: int, vocab_size: int):
        nn.Module.__init__(self)
        self.num_experts = num_experts
        self.num_experts_per_tok = 1
        self.jitter_noise = 0.0
        self.register_buffer("hash_table", self.build_table(vocab_size, num_experts), persistent=True)

    @staticmethod
    def build_table(vocab_size: int, num_experts: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(HASH_ROUTER_SEED)
        return torch.randperm(vocab_size, generator=generator) % num_experts  # (vocab_size,)

    def compute_logits(self, hidden_states: torch.Tensor, input_ids: torch.Tensor | None) -> torch.Tensor:
        if input_ids is None:
            raise ValueError(
                "`router_type='hash'` routes by token id: pass `input_ids` (not `inputs_embeds`)."
            )
        expert = self.hash_table[input_ids]  # (B, S)
        # One-hot logits: probabilities put all mass on the hashed expert, for telemetry.
        return F.one_hot(expert, self.num_experts).float() * 1e4

    def select(self, router_probs: torch.Tensor, token_mask: torch.Tensor):
        topk_index = router_probs.argmax(dim=-1, keepdim=True)
        topk_weights = torch.ones_like(topk_index, dtype=router_probs.dtype)
        return topk_weights, topk_index, token_mask.unsqueeze(-1)


class ExpertChoiceRouter(TopKRouter):
    """Expert-choice routing (Zhou et al., NeurIPS 2022): each expert picks its top tokens, not tokens their experts.

    Per sequence with ``n`` real tokens, every expert takes the ``c = min(n, ceil(capacity_factor · n / E))`` real
    tokens with the highest router probability ``S = softmax(x·W)`` (softmax over experts, as in the paper's eq. 1)
    and scales its output for a token by that token's score ``S[t, e]``. Every expert therefore does exactly the
    same work (perfect balance by construction, no load-balancing loss), a token may be taken by 0 to E experts
    (``capacity_factor`` of them on average: the compute of top-k with k = capacity_factor), and padding is never
    picked. Ties go to the earlier token (stable sort), so a sequence is routed the same in any batch.

    Encoder only: the choice depends on every token of the sequence, which a decoder (and `generate()`) does not
    have. The decision is expressed as a `RouterOutput` with E slots: slot e holds expert e when e picked the token
    and -1 otherwise (up to E experts per token: the paper's uncapped variant), so `SparseMoeBlock` dispatches it
    like any other router.
    """

    supports_forced_routing = False  # its own forward: experts choose tokens / two-level gates

    expert_choice = True

    def __init__(self, hidden_size: int, num_experts: int, capacity_factor: float, jitter_noise: float = 0.0):
        super().__init__(
            hidden_size, num_experts, num_experts, norm_topk_prob=False, jitter_noise=jitter_noise
        )
        self.capacity_factor = capacity_factor

    def capacity(self, token_mask: torch.Tensor) -> torch.Tensor:
        """`(B,)` tokens each expert takes in each sequence: ``min(n, ceil(capacity_factor · n / E))``."""
        real_tokens = token_mask.sum(dim=-1)  # (B,)
        # float64: the same rounding as a Python `math.ceil(capacity_factor * n / E)`
        capacity = torch.ceil(real_tokens.double() * self.capacity_factor / self.num_experts).long()
        return torch.minimum(capacity, real_tokens)

    def select(self, router_probs: torch.Tensor, token_mask: torch.Tensor):
        seq_len, num_experts = router_probs.shape[1:]
        # Probabilities are >= 0, so -1 puts padding after every real token of the sequence.
        scores = router_probs.masked_fill(~token_mask.unsqueeze(-1), -1.0).transpose(1, 2)  # (B, E, S)
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices  # (B, E, S)
        positions = torch.arange(seq_len, device=order.device).expand_as(order)
        rank = torch.empty_like(order).scatter_(-1, order, positions)  # (B, E, S): token's place in e's queue
        chosen = (rank < self.capacity(token_mask).view(-1, 1, 1)).transpose(1, 2)  # (B, S, E)
        experts = torch.arange(num_experts, device=router_probs.device).expand_as(chosen)
        topk_index = experts.masked_fill(~chosen, -1)  # (B, S, E): slot e = expert e or -1
        topk_weights = router_probs * chosen
        return topk_weights, topk_index, chosen


class HierarchicalRouter(TopKRouter):
    """Two-level (hierarchical) mixture-of-experts gating (Jordan & Jacobs 1994; Bishop, PRML §14.5.3).

    The E experts form G groups of E/G consecutive experts. A group gate ``softmax(x·W_group)`` picks the
    `num_groups_per_tok` best groups; inside each chosen group an expert gate (a softmax over that group's E/G
    logits of ``x·W``) picks ``num_experts_per_tok / num_groups_per_tok`` experts. A token's combine weight for an
    expert is the product of its group gate and its expert gate, each renormalised over the chosen ones when
    `norm_topk_prob`. `router_probs` is the full two-level distribution ``P(g) · P(e | g)`` over the E experts
    (`router_logits` its log). With one group this is exactly flat top-k routing.
    """

    supports_forced_routing = False  # its own forward: experts choose tokens / two-level gates

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        num_experts_per_tok: int,
        num_groups: int,
        num_groups_per_tok: int = 1,
        norm_topk_prob: bool = True,
        jitter_noise: float = 0.0,
    ):
        super().__init__(hidden_size, num_experts, num_experts_per_tok, norm_topk_prob, jitter_noise)
        self.num_groups = num_groups
        self.num_groups_per_tok = num_groups_per_tok
        self.group_weight = nn.Parameter(torch.empty(num_groups, hidden_size))

    def _top(self, probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        weights, index = torch.topk(probs, k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, index

    def forward(
        self, hidden_states: torch.Tensor, token_mask: torch.Tensor, input_ids: torch.Tensor | None = None
    ) -> RouterOutput:
        groups, group_size = self.num_groups, self.num_experts // self.num_groups
        groups_per_tok = self.num_groups_per_tok
        experts_per_group = self.num_experts_per_tok // groups_per_tok
        router_input = self.router_input(hidden_states)  # one (jittered) input for both levels
        group_logits = F.linear(router_input, self.group_weight.float())  # (B, S, G)
        expert_logits = F.linear(router_input, self.weight.float())  # (B, S, E)
        group_probs = group_logits.softmax(dim=-1)
        group_weights, group_index = self._top(group_probs, groups_per_tok)  # (B, S, g)
        in_group_probs = expert_logits.unflatten(-1, (groups, group_size)).softmax(dim=-1)  # (B, S, G, E/G)
        chosen_groups = in_group_probs.gather(
            2, group_index.unsqueeze(-1).expand(-1, -1, -1, group_size)
        )  # (B, S, g, E/G)
        expert_weights, expert_in_group = self._top(chosen_groups, experts_per_group)  # (B, S, g, k/g)
        topk_index = (group_index.unsqueeze(-1) * group_size + expert_in_group).flatten(2)  # (B, S, k)
        topk_weights = (group_weights.unsqueeze(-1) * expert_weights).flatten(2)  # (B, S, k)
        router_probs = (group_probs.unsqueeze(-1) * in_group_probs).flatten(2)  # (B, S, E)
        router_logits = (
            group_logits.log_softmax(dim=-1).unsqueeze(-1)
            + expert_logits.unflatten(-1, (groups, group_size)).log_softmax(dim=-1)
        ).flatten(2)  # (B, S, E): log P(g) + log P(e | g), so softmax(router_logits) == router_probs
        group_routing = RouterOutput(
            router_logits=group_logits,
            router_probs=group_probs,
            topk_index=group_index,
            topk_weights=group_weights,
            dispatch_mask=token_mask.unsqueeze(-1).expand_as(group_index),
            token_mask=token_mask,
        )
        return RouterOutput(
            router_logits=router_logits,
            router_probs=router_probs,
            topk_index=topk_index,
            topk_weights=topk_weights,
            dispatch_mask=token_mask.unsqueeze(-1).expand_as(topk_index),
            token_mask=token_mask,
            group_routing=group_routing,
            expert_logits=expert_logits,
        )


def build_router(config, hidden_size: int) -> TopKRouter:
    """Build the router named by ``config.router_type`` (``decoder_router_type`` in a decoder stack, when set)."""
    router_type = router_type_of(config)
    if router_type == "topk":
        return TopKRouter(
            hidden_size,
            config.num_experts,
            config.num_experts_per_tok,
            config.norm_topk_prob,
            config.router_jitter_noise,
            getattr(config, "combine_weights", "router"),
            getattr(config, "router_top_p", None),
        )
    if router_type == "switch":
        return SwitchRouter(
            hidden_size,
            config.num_experts,
            capacity_factor=config.capacity_factor,
            eval_capacity_factor=config.eval_capacity_factor,
            expert_capacity=config.expert_capacity,
            jitter_noise=config.router_jitter_noise,
        )
    if router_type == "noisy_topk":
        return NoisyTopKRouter(
            hidden_size,
            config.num_experts,
            config.num_experts_per_tok,
            config.router_jitter_noise,
            getattr(config, "combine_weights", "router"),
            getattr(config, "router_top_p", None),
        )
    if router_type == "hash":
        return HashRouter(config.num_experts, config.vocab_size)
    if router_type == "expert_choice":
        if getattr(config, "is_decoder", False):
            raise ValueError(EXPERT_CHOICE_DECODER_ERROR)
        capacity_factor = getattr(config, "expert_capacity_factor", None)
        return ExpertChoiceRouter(
            hidden_size,
            config.num_experts,
            capacity_factor if capacity_factor is not None else config.num_experts_per_tok,
            config.router_jitter_noise,
        )
    if router_type == "hierarchical":
        return HierarchicalRouter(
            hidden_size,
            config.num_experts,
            config.num_experts_per_tok,
            num_groups=config.router_groups,
            num_groups_per_tok=config.num_groups_per_tok,
            norm_topk_prob=config.norm_topk_prob,
            jitter_noise=config.router_jitter_noise,
        )
    raise ValueError(f"`router_type` must be one of {ROUTER_TYPES}, got {config.router_type!r}")


# --------------------------------------------------------------------------------------------------------------
# Experts and the sparse MoE block
# --------------------------------------------------------------------------------------------------------------
class MoeExpert(nn.Module):
    """One feed-forward expert made of plain `nn.Linear` layers.

    Plain FFN (BERT, T5 v1.0): ``wo(dropout(act(wi(x))))``. Gated FFN (T5 v1.1): ``wo(dropout(act(wi_0(x)) * wi_1(x)))``.
    The names ``wi``/``wi_0``/``wi_1``/``wo`` are a user-facing contract (PEFT regexes, bitsandbytes, upcycling).
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        hidden_act: str,
        gated: bool = False,
        bias: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.gated = gated
        if gated:
            self.wi_0 = nn.Linear(hidden_size, intermediate_size, bias=bias)
            self.wi_1 = nn.Linear(hidden_size, intermediate_size, bias=bias)
        else:
            self.wi = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.wo = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act = ACT2FN[hidden_act]
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def has_plain_fp32_weights(self) -> bool:
        """True when every projection holds an fp32 weight tensor (not bitsandbytes or torch.ao quantized; PEFT LoRA
        layers expose their base layer's weight)."""
        projections = (self.wi_0, self.wi_1, self.wo) if self.gated else (self.wi, self.wo)
        weights = [getattr(projection, "weight", None) for projection in projections]
        return all(isinstance(w, torch.Tensor) and w.dtype == torch.float32 for w in weights)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.gated:
            hidden_states = self.act(self.wi_0(hidden_states)) * self.wi_1(hidden_states)
        else:
            hidden_states = self.act(self.wi(hidden_states))
        hidden_states = self.dropout(hidden_states)
        # `getattr`: quantized linears may expose no weight tensor (torch.ao dynamic INT8: `weight()` is a method).
        wo_dtype = getattr(self.wo.weight, "dtype", None)
        if wo_dtype is not None and wo_dtype.is_floating_point and hidden_states.dtype != wo_dtype:
            hidden_states = hidden_states.to(wo_dtype)  # e.g. T5 keeps `wo` in fp32 under fp16
        return self.wo(hidden_states)


class SparseMoeBlock(nn.Module):
    """Router + `experts.{i}` (+ always-active `shared_experts.{j}`), replacing a dense feed-forward network.

    Args:
        config: a ptmoe MoE config (router fields, `num_experts`, `num_shared_experts`, `vocab_size`).
        hidden_size (`int`), intermediate_size (`int`), hidden_act (`str`), gated (`bool`), bias (`bool`),
        dropout (`float`): the shape of every expert, as in the dense FFN it replaces. `dropout` is the dropout the
            dense FFN applies between its projections (T5: `dropout_rate`; BERT: none); `config.expert_dropout`,
            when set, replaces it inside the experts only (Switch Transformer's expert dropout).
    """

    def __init__(
        self,
        config,
        hidden_size: int,
        intermediate_size: int,
        hidden_act: str,
        gated: bool = False,
        bias: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.num_experts = config.num_experts
        self.router = build_router(config, hidden_size)
        if getattr(config, "expert_dropout", None) is not None:
            dropout = config.expert_dropout
        expert_args = (hidden_size, intermediate_size, hidden_act, gated, bias, dropout)
        self.experts = nn.ModuleList([MoeExpert(*expert_args) for _ in range(config.num_experts)])
        # The shared experts may be wider than the routed ones (the importance split keeps its top neurons there).
        shared_size = getattr(config, "shared_expert_intermediate_size", None) or intermediate_size
        shared_args = (hidden_size, shared_size, hidden_act, gated, bias, dropout)
        self.shared_experts = (
            nn.ModuleList([MoeExpert(*shared_args) for _ in range(config.num_shared_experts)])
            if config.num_shared_experts > 0
            else None
        )

    def _expert_forward(self, expert: MoeExpert, expert_input: torch.Tensor) -> torch.Tensor:
        """`expert(expert_input)`, with 2 or 3 rows padded to 4 in CPU fp32 inference (the padding is dropped).

        The fp32 matrix product torch uses on x86 CPUs (MKL) is slower for 2 or 3 rows than for 4: an expert of
        T5-base shape (768 → 3072 → 768, weights not in cache) took 2.14 / 2.69 ms for 2 / 3 rows against
        2.00 ms for 4 (1.29 ms for 1 row, a matrix-vector product), and inside `generate()` 2.5 / 3.0 ms against
        2.0 ms for 8 rows; the same step shows at 1024 → 4096 and on one thread. Decoding sends a handful of
        tokens to each expert, so such calls are common there. Each row is computed on its own, so real rows change
        only by float rounding. Only experts with plain fp32 weights are padded (quantized layers use other kernels,
        and torch.ao's dynamic INT8 scales activations over all rows); bf16/fp16 kernels show no such step, and
        training is left as it is.
        """
        rows = expert_input.shape[0]
        if (
            1 < rows < 4
            and not self.training
            and expert_input.dtype == torch.float32
            and expert_input.device.type == "cpu"
            and expert.has_plain_fp32_weights()
        ):
            return expert(F.pad(expert_input, (0, 0, 0, 4 - rows)))[:rows]
        return expert(expert_input)

    def forward(
        self,
        hidden_states: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, RouterOutput]:
        """
        Args:
            hidden_states (`torch.Tensor` of shape `(B, S, H)`)
            token_mask (`torch.BoolTensor` of shape `(B, S)`, *optional*): False for padding tokens.
            input_ids (`torch.LongTensor` of shape `(B, S)`, *optional*): needed by the hash router only.

        Returns:
            `(output, router_output)` with `output` of shape `(B, S, H)`.
        """
        batch_size, seq_len, hidden_size = hidden_states.shape
        if token_mask is None:
            token_mask = torch.ones(batch_size, seq_len, dtype=torch.bool, device=hidden_states.device)
        routing = self.router(hidden_states, token_mask, input_ids)

        flat_states = hidden_states.reshape(-1, hidden_size)  # (N, H)
        k = routing.topk_index.shape[-1]
        # Group the (token, slot) pairs by expert with one sort. Pairs that are not dispatched (padding, capacity
        # overflow) get the id `num_experts`, so they sort last and are never computed.
        slot_expert = routing.topk_index.reshape(-1).masked_fill(
            ~routing.dispatch_mask.reshape(-1), self.num_experts
        )  # (N*k,)
        order = torch.argsort(slot_expert, stable=True)
        counts = torch.bincount(slot_expert, minlength=self.num_experts + 1).tolist()  # the one host sync
        dispatched = len(order) - counts[-1]
        order = order[:dispatched]
        tokens = order // k if k > 1 else order  # (D,) token row of each dispatched pair, grouped by expert
        weights = routing.topk_weights.reshape(-1)[order].unsqueeze(-1)  # (D, 1)
        # Per expert: gather its own rows, run it, scatter-add its weighted output. Gathering per expert (not all
        # N*k rows into one buffer, then `cat` + one scatter) keeps each expert's rows in cache: for many small
        # experts (E=64, k=16, BERT-base FFN, 2048 tokens) the one-buffer version moved k copies of the hidden
        # states through memory three times and took 472 ms per layer against 140 ms per expert (dense FFN:
        # 338 ms); grouped/batched matmuls over stacked weights (`torch.nn.functional.grouped_mm`, padded `bmm`)
        # took 680 / 490 ms there and need one stacked weight tensor, which LoRA per expert and 4-bit cannot give.
        output = torch.zeros_like(flat_states)
        split = counts[:-1]
        for expert, expert_tokens, expert_weights in zip(
            self.experts, tokens.split(split), weights.split(split), strict=True
        ):
            if expert_tokens.shape[0] == 0:
                continue
            expert_output = self._expert_forward(expert, flat_states.index_select(0, expert_tokens))
            # `.to`: an fp32 `wo` (T5's `_keep_in_fp32_modules` under fp16 loads) returns fp32 expert outputs.
            weighted = expert_output * expert_weights.to(expert_output.dtype)
            output.index_add_(0, expert_tokens, weighted.to(output.dtype))

        output = output.view(batch_size, seq_len, hidden_size)
        if self.shared_experts is not None:
            for shared_expert in self.shared_experts:
                output = output + shared_expert(hidden_states)
        return output, routing


# --------------------------------------------------------------------------------------------------------------
# Losses: pure functions over router outputs. `token_mask` (True = real token) keeps padding out of every loss.
# --------------------------------------------------------------------------------------------------------------
def _masked_rows(tensor: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Flatten `(…, X)` to `(T, X)` keeping only the rows of real tokens."""
    rows = tensor.reshape(-1, tensor.shape[-1])
    if token_mask is None:
        return rows
    return rows[token_mask.reshape(-1)]


def load_balancing_loss(
    router_probs: torch.Tensor, topk_index: torch.Tensor, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch Transformer load-balancing loss (Fedus et al. 2021, eq. 4-6), generalised to top-k.

    ``loss = E · Σ_e f_e · P_e`` where ``f_e`` is the fraction of (token, slot) assignments that chose expert
    ``e`` (before capacity drops) and ``P_e`` the mean router probability of ``e``, both over the real tokens
    of the batch. It is 1 when routing is perfectly balanced, for any k. Multiply by ``router_aux_loss_coef``.

    Args:
        router_probs (`torch.Tensor` of shape `(…, E)`), topk_index (`torch.LongTensor` of shape `(…, k)`),
        token_mask (`torch.BoolTensor` of shape `(…)`, *optional*).
    """
    num_experts = router_probs.shape[-1]
    probs = _masked_rows(router_probs, token_mask)  # (T, E)
    index = _masked_rows(topk_index, token_mask)  # (T, k)
    if probs.shape[0] == 0:
        return router_probs.sum() * 0.0
    counts = F.one_hot(index, num_experts).sum(dim=(0, 1)).to(probs.dtype)  # (E,)
    fraction_routed = counts / index.numel()
    mean_prob = probs.mean(dim=0)
    return num_experts * torch.sum(fraction_routed * mean_prob)


def router_z_loss(router_logits: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Router z-loss (Zoph et al. 2022, ST-MoE eq. 5): mean over real tokens of ``logsumexp(logits)²``."""
    logits = _masked_rows(router_logits, token_mask)
    if logits.shape[0] == 0:
        return router_logits.sum() * 0.0
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


def importance_loss(
    topk_weights: torch.Tensor,
    topk_index: torch.Tensor,
    num_experts: int,
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Importance loss (Shazeer et al. 2017, eq. 6): ``CV(Importance)²`` with ``Importance_e = Σ_x G_e(x)``.

    ``G(x)`` are the sparse gates (the top-k combine weights scattered over the experts). CV² uses the
    population variance over experts divided by the squared mean (plus 1e-10, as in the original code).
    """
    weights = _masked_rows(topk_weights, token_mask)  # (T, k)
    index = _masked_rows(topk_index, token_mask)
    gates = torch.zeros(weights.shape[0], num_experts, dtype=weights.dtype, device=weights.device)
    gates = gates.scatter_add(1, index, weights)
    importance = gates.sum(dim=0)  # (E,)
    mean = importance.mean()
    return ((importance - mean).pow(2).mean()) / (mean.pow(2) + 1e-10)


def router_domain_loss(
    router_logits: torch.Tensor,
    domain_labels: torch.Tensor,
    expert_domains: torch.Tensor,
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Domain supervision of a router: ``-log Σ_{e ∈ experts(d)} p_e(x)`` averaged over the tokens of labelled texts.

    DEMix layers (Gururangan et al., "DEMix Layers: Disentangling Domains for Modular Language Modeling", NAACL 2022)
    send every training token of domain d to the expert of d (deterministic routing by the domain label). This loss
    is a soft version of that rule for a learned router (our formulation; the paper has no router to train): it
    maximises the router probability mass on the experts named d, i.e. the log-likelihood of the domain under the
    router, computed stably as ``logsumexp(logits) - logsumexp(logits of d's experts)``, so that the router routes by
    domain at inference without a label. Multiply by ``router_domain_loss_coef``.

    Args:
        router_logits (`torch.Tensor` of shape `(B, S, E)`): pre-softmax router scores.
        domain_labels (`torch.LongTensor` of shape `(B,)`): domain id of each sequence; -100 = no domain (ignored).
        expert_domains (`torch.LongTensor` of shape `(E,)`): domain id of each expert (-1 = an expert of no domain).
        token_mask (`torch.BoolTensor` of shape `(B, S)`, *optional*): True for real tokens.

    Returns:
        A scalar; 0 (with a gradient path) when no token has a domain.
    """
    logits = router_logits.float()  # (B, S, E)
    labels = domain_labels.to(logits.device).long()  # (B,)
    rows = labels.ne(-100).unsqueeze(-1).expand(logits.shape[:2])  # (B, S)
    if token_mask is not None:
        rows = rows & token_mask.to(rows.device).bool()
    in_domain = expert_domains.to(logits.device).unsqueeze(0) == labels.clamp(min=0).unsqueeze(-1)  # (B, E)
    if not bool(in_domain[labels.ne(-100)].any(dim=-1).all()):
        raise ValueError(
            "router_domain_loss: a domain label has no expert (every labelled domain needs >= 1 expert)"
        )
    domain_logits = logits.masked_fill(~in_domain.unsqueeze(1), float("-inf"))  # (B, S, E)
    nll = torch.logsumexp(logits, dim=-1) - torch.logsumexp(domain_logits, dim=-1)  # (B, S)
    if not bool(rows.any()):
        return logits.sum() * 0.0
    return nll[rows].mean()


def domain_names(expert_names: Sequence[str]) -> list[str]:
    """The distinct domains of `expert_names`, in order of first appearance (their index is the domain id)."""
    return list(dict.fromkeys(expert_names))


def expert_domain_ids(expert_names: Sequence[str]) -> torch.Tensor:
    """`(E,)` domain id of each expert (the index of its name in `domain_names(expert_names)`)."""
    names = domain_names(expert_names)
    return torch.tensor([names.index(name) for name in expert_names], dtype=torch.long)


@dataclass
class RouterLosses:
    """Router losses averaged over the MoE layers that have a learned router (0 when there is none)."""

    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    importance_loss: torch.Tensor

    @staticmethod
    def output_fields(losses: RouterLosses | None) -> dict[str, torch.Tensor | None]:
        """`aux_loss` / `z_loss` / `importance_loss` for a model output: all None when the losses were not computed."""
        if losses is None:
            return {"aux_loss": None, "z_loss": None, "importance_loss": None}
        return {
            "aux_loss": losses.aux_loss,
            "z_loss": losses.z_loss,
            "importance_loss": losses.importance_loss,
        }


def wants_router_losses(
    module: nn.Module,
    output_router_losses: bool | None,
    output_router_logits: bool,
    labels_given: bool = False,
) -> bool:
    """Whether a forward computes the router losses.

    An explicit `output_router_losses` wins; otherwise they are computed in training, when labels are given, or
    with `output_router_logits` (as transformers' MoE models do). Plain inference and every step of `generate()`
    skip them: a few dozen small ops per MoE layer whose results nobody reads.
    """
    if output_router_losses is not None:
        return output_router_losses
    return module.training or labels_given or bool(output_router_logits)


def total_loss(task_loss: torch.Tensor | None, outputs, config) -> torch.Tensor | None:
    """``task_loss + coef_aux · aux_loss + coef_z · z_loss + coef_importance · importance_loss`` (None without labels).

    `outputs` is any object with `aux_loss`, `z_loss` and `importance_loss` (a model output or `RouterLosses`).
    """
    if task_loss is None:
        return None
    if outputs.aux_loss is None:
        raise ValueError(
            "Labels were given but the router losses were not computed (`output_router_losses=False`): the "
            "training loss needs them. Leave `output_router_losses` unset (or True) when passing labels."
        )
    return (
        task_loss
        + config.router_aux_loss_coef * outputs.aux_loss
        + config.router_z_loss_coef * outputs.z_loss
        + config.router_importance_loss_coef * outputs.importance_loss
    )


def layer_router_losses(routing: RouterOutput) -> RouterLosses:
    """Load-balancing, z and importance losses of one MoE layer's routing decision.

    - Token choice (top-k, Switch, noisy top-k): the three losses above, on `router_probs` / `router_logits`.
    - Expert choice (Zhou et al. 2022): every expert takes the same number of tokens by construction, so the
      load-balancing and importance losses (which push towards that balance) are 0, as in the paper, which uses no
      auxiliary loss. The router z-loss is kept: it only keeps the logits small (ST-MoE's stability argument holds
      for any softmax router).
    - Hierarchical: the mean of the two levels' losses. Group level: the three losses over the G groups
      (`group_routing`). Expert level: load balance and importance over all E experts (probabilities
      ``P(g)·P(e|g)``, combine weights), and the z-loss of the expert gate's logits within each group
      (`expert_logits`), the softmax they enter. With one group, the group level is skipped (a single group is
      always balanced), so G = 1 gives exactly the losses of flat top-k routing.
    """
    token_mask = routing.token_mask
    if routing.expert_logits is not None:  # hierarchical: z-loss of the within-group softmaxes
        groups = routing.group_routing.router_probs.shape[-1]
        grouped = routing.expert_logits.unflatten(-1, (groups, -1))  # (B, S, G, E/G)
        z = router_z_loss(grouped, token_mask.unsqueeze(-1).expand(grouped.shape[:-1]))
    else:
        z = router_z_loss(routing.router_logits, token_mask)
    if routing.expert_choice:
        zero = z * 0.0
        return RouterLosses(zero, z, zero)
    num_experts = routing.router_probs.shape[-1]
    losses = RouterLosses(
        load_balancing_loss(routing.router_probs, routing.topk_index, token_mask),
        z,
        importance_loss(routing.topk_weights, routing.topk_index, num_experts, token_mask),
    )
    group = routing.group_routing
    if group is None or group.router_probs.shape[-1] == 1:
        return losses
    group_losses = layer_router_losses(group)
    return RouterLosses(
        (losses.aux_loss + group_losses.aux_loss) / 2,
        (losses.z_loss + group_losses.z_loss) / 2,
        (losses.importance_loss + group_losses.importance_loss) / 2,
    )


def compute_router_losses(router_outputs: Sequence[RouterOutput], reference: torch.Tensor) -> RouterLosses:
    """Per MoE layer load-balancing, z and importance losses (`layer_router_losses`), then averaged over layers.

    Args:
        router_outputs: one `RouterOutput` per MoE layer.
        reference (`torch.Tensor`): any tensor of the model, for the device of the zero losses.
    """
    learned = [layer_router_losses(r) for r in router_outputs if r.learned]
    if not learned:
        zero = torch.zeros((), device=reference.device)
        return RouterLosses(zero, zero, zero)
    aux = torch.stack([losses.aux_loss for losses in learned])
    z = torch.stack([losses.z_loss for losses in learned])
    imp = torch.stack([losses.importance_loss for losses in learned])
    return RouterLosses(aux.mean(), z.mean(), imp.mean())


# --------------------------------------------------------------------------------------------------------------
# Weight initialisation shared by the families' `_init_weights`
# --------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def init_router(module: nn.Module, config, std: float) -> bool:
    """Initialise a router in place (skipping tensors already loaded); returns True when `module` is a router.

    `router_init="normal"`: N(0, std) weights; `"zeros"`: all-zero weights (uniform routing at the start, as
    used by some upcycling recipes). The hash table is rebuilt deterministically.
    """
    if isinstance(module, HashRouter):
        init.copy_(module.hash_table, HashRouter.build_table(module.hash_table.numel(), module.num_experts))
        return True
    if isinstance(module, TopKRouter):
        if config.router_init == "zeros":
            init.zeros_(module.weight)
        else:
            init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, NoisyTopKRouter):
            init.zeros_(
                module.noise_weight
            )  # softplus(0) ≈ 0.69: unit-scale noise at the start, learned after
        if isinstance(module, HierarchicalRouter):  # the group gate starts like the expert gate
            if config.router_init == "zeros":
                init.zeros_(module.group_weight)
            else:
                init.normal_(module.group_weight, mean=0.0, std=std)
        return True
    return False


def count_parameters(model: nn.Module, num_experts_per_tok: int | None = None) -> dict[str, int]:
    """Total parameters and parameters active per token (one token uses k of the E routed experts).

    In an expert-choice layer k is the mean number of experts per token, its capacity factor (rounded).

    Args:
        model (`nn.Module`): a ptmoe model.
        num_experts_per_tok (`int`, *optional*): defaults to `model.config.num_experts_per_tok`.
    """
    k = num_experts_per_tok if num_experts_per_tok is not None else model.config.num_experts_per_tok
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for module in model.modules():
        if isinstance(module, SparseMoeBlock):
            per_expert = sum(p.numel() for p in module.experts[0].parameters())
            layer_k = k
            if num_experts_per_tok is None and isinstance(module.router, ExpertChoiceRouter):
                layer_k = round(module.router.capacity_factor)
            inactive += per_expert * (len(module.experts) - layer_k)
    return {"total": total, "active": total - inactive}


def _moe_layer_fields(config) -> str:
    """The config's MoE layer fields for messages: `moe_layers` (MoE-BERT) or encoder/decoder lists (MoE-T5)."""
    if hasattr(config, "encoder_moe_layers"):
        return f"encoder {config.encoder_moe_layers}, decoder {config.decoder_moe_layers}"
    return str(getattr(config, "moe_layers", None))


def check_expert_keys(loading_info: dict, config) -> None:
    """Refuse a checkpoint whose experts/routers do not match the model (no silently random experts).

    Args:
        loading_info (`dict`): the `output_loading_info` of `from_pretrained` (`missing_keys`, `unexpected_keys`).
        config: the model's config.
    """

    def moe_keys(keys):
        return sorted(k for k in keys if ".moe." in f".{k}" or ".experts." in k or ".router." in k)

    missing = moe_keys(loading_info.get("missing_keys", []))
    unexpected = moe_keys(loading_info.get("unexpected_keys", []))
    mismatched = [k for k, *_ in loading_info.get("mismatched_keys", []) if ".moe." in f".{k}"]
    if missing or unexpected or mismatched:
        shown = ", ".join((missing + unexpected + mismatched)[:6])
        raise ValueError(
            "The checkpoint's MoE layers do not match the model config "
            f"(num_experts={config.num_experts}, num_shared_experts={config.num_shared_experts}, "
            f"router_type={config.router_type!r}, MoE layers {_moe_layer_fields(config)}): "
            f"{len(missing)} missing, {len(unexpected)} unexpected and {len(mismatched)} mismatched expert/router "
            f"weights (e.g. {shown}). Load it with the config saved beside it (do not override `num_experts` or "
            "the MoE layers), or build a new MoE model from a dense checkpoint with `ptmoe.upcycle`."
        )


def disable_bnb_cpu_weight_repacking(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights in place on CPUs with avx512_bf16; returns the modules changed.

    bitsandbytes >= 0.49 converts a `Linear4bit` weight to a CPU-specific packed layout on its first no-grad eval
    forward (`Linear4bit.support_avx512bf16_for_cpu`, True on CPUs with avx512_bf16). Afterwards a layer whose
    output size is not a multiple of 32 fails, `save_pretrained` can write corrupt weights and a QLoRA
    train → eval → train sequence breaks. Turning the flag off keeps the standard layout on every CPU (the flag is
    an attribute, so no bitsandbytes import is needed here).
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def keep_modules_unquantized(quantization_config, modules: Sequence[str] | None):
    """A copy of a bitsandbytes `quantization_config` whose `llm_int8_skip_modules` also lists `modules`.

    transformers' automatic skip list (`get_keys_to_not_convert`) misses a head whose last parameter is a bias (it
    strips only `.weight` from the name), e.g. `classifier`; `_keep_in_fp32_modules` would force the heads to fp32
    in fp16 loads, where their fp16 inputs then fail. Listing the heads in the skip list keeps them unquantized, in
    the load dtype.
    Configs of other quantization methods are returned unchanged.

    Args:
        quantization_config (`BitsAndBytesConfig`, `dict` or `None`): what the user passed to `from_pretrained`.
        modules (`list[str]`): module name patterns (suffixes) to keep in full precision.
    """
    if quantization_config is None or not modules:
        return quantization_config
    if isinstance(quantization_config, dict):
        is_bnb = quantization_config.get("quant_method") == "bitsandbytes" or any(
            quantization_config.get(key) for key in ("load_in_4bit", "load_in_8bit")
        )
        if not is_bnb:
            return quantization_config
        skip = quantization_config.get("llm_int8_skip_modules") or []
        return {**quantization_config, "llm_int8_skip_modules": sorted(set(skip) | set(modules))}
    if not hasattr(quantization_config, "llm_int8_skip_modules"):
        return quantization_config
    config = copy.deepcopy(quantization_config)
    config.llm_int8_skip_modules = sorted(set(config.llm_int8_skip_modules or []) | set(modules))
    return config


def reduce_unused_expert_gradients(model: nn.Module) -> bool:
    """Make an FSDP2-sharded model reduce a zero gradient for experts that got no token on a rank; True if it is one.

    Under FSDP each rank routes its own batch, so an expert can receive tokens on one rank and none on another. The
    rank without tokens then has no gradient for that expert, and FSDP2 by default leaves such parameters out of its
    reduce-scatter: the ranks send buffers of different sizes and fail or hang. `from_pretrained(...,
    distributed_config=DistributedConfig(fsdp_size=…))` calls this for ptmoe models; call it yourself after
    `torch.distributed.fsdp.fully_shard(model)` (accelerate's FSDP2 included).

    Args:
        model (`nn.Module`): the model, sharded with FSDP2 (`fully_shard`) or not (then nothing changes).
    """
    if not callable(getattr(model, "set_reduce_scatter_unused_params", None)):
        return False
    model.set_reduce_scatter_unused_params(True)
    return True


def check_local_checkpoint(
    name_or_path: str | os.PathLike, argument: str = "pretrained_model_name_or_path"
) -> None:
    """Refuse a local checkpoint path that does not exist, naming `argument` (transformers would call it a repo id).

    A value counts as a local path when it is a `PathLike`, is absolute, starts with `.` or `~`, contains a
    backslash or more than one `/` (Hub ids have at most one), or when its first component is an existing folder
    (``outputs/moe`` while ``outputs/`` exists). Anything else may be a Hub id and is left to transformers.

    Args:
        name_or_path (`str` or `os.PathLike`): a folder or a Hub id.
        argument (`str`): how the caller names it in messages, e.g. ``"--base"``.

    Raises:
        `FileNotFoundError`: the local folder does not exist. `NotADirectoryError`: it is a file.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        return
    text = os.fspath(name_or_path)
    path = os.path.expanduser(text)
    if os.path.isdir(path):
        return
    if os.path.exists(path):
        raise NotADirectoryError(f"{argument} {text!r} is a file: pass the folder that holds config.json")
    first = text.replace("\\", "/").split("/")[0]
    local = (
        not isinstance(name_or_path, str)
        or os.path.isabs(path)
        or text.startswith((".", "~"))
        or "\\" in text
        or text.count("/") > 1
        or (text.count("/") == 1 and bool(first) and os.path.isdir(first))
    )
    if local:
        raise FileNotFoundError(
            f"{argument} {text!r}: no such folder (current directory {os.getcwd()!r}). Check the path; a Hub id "
            "has the form 'name' or 'org/name'."
        )


_CONVERSION_FAILED = "issues during automatic conversion of the weights"
_EXCEPTION_LINE = re.compile(r"^\s*(\w+(?:Error|Exception)): (.+)$")


class _WarningCapture(logging.Handler):
    """Keeps the messages of one logger while loading (transformers logs conversion failures, then raises)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _conversion_errors_surfaced(name_or_path):
    """Turn transformers' "issues during automatic conversion of the weights" into a `ValueError` with the cause.

    transformers (5.x) catches the exception of a failed weight conversion (e.g. a bitsandbytes setting it
    rejects), writes its traceback into the loading report it logs, and raises a `RuntimeError` that only points
    at the log. The cause is the last "SomeError: message" line of that report.
    """
    logger = logging.getLogger("transformers")  # the report goes to a child logger (modeling_utils)
    capture = _WarningCapture()
    logger.addHandler(capture)
    try:
        yield
    except RuntimeError as error:
        if _CONVERSION_FAILED not in str(error):
            raise
        causes = [
            match.group(1, 2)
            for message in capture.messages
            for match in map(_EXCEPTION_LINE.match, message.splitlines())
            if match
        ]
        cause = f"{causes[-1][0]}: {causes[-1][1]}" if causes else "see the CONVERSION entries logged above"
        raise ValueError(
            f"Loading {os.fspath(name_or_path)!r} failed while converting its weights: {cause}. Check the "
            "`quantization_config` (e.g. `bnb_4bit_quant_type` must be 'nf4' or 'fp4'; `ptmoe.bnb_4bit_config()` "
            "validates its settings) and that the checkpoint matches the model class."
        ) from error
    finally:
        logger.removeHandler(capture)


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _refuse_pickle_only_folder(name_or_path) -> None:
    """A local folder with pickled weights and no safetensors gets a message that says so (not "file not found")."""
    if not isinstance(name_or_path, (str, os.PathLike)) or not os.path.isdir(name_or_path):
        return
    names = os.listdir(name_or_path)
    pickles = sorted(n for n in names if n.endswith(_PICKLE_SUFFIXES) and n != "training_args.bin")
    if pickles and not any(n.endswith(".safetensors") for n in names):
        raise ValueError(
            f"{os.fspath(name_or_path)!r} holds only pickled weights ({', '.join(pickles[:3])}) and no .safetensors "
            "file. ptmoe loads safetensors only, because unpickling can run arbitrary code: in an environment you "
            "trust, load it with transformers and `save_pretrained` it again (safetensors is the default)."
        )


def _refuse_dense_checkpoint(model: nn.Module, loading_info: dict, name_or_path) -> None:
    """A checkpoint without any expert or router weight is a dense one: say so and point at upcycling."""
    moe_keys = [k for k in model.state_dict() if ".moe." in f".{k}"]
    missing = set(loading_info.get("missing_keys", []))
    if moe_keys and all(k in missing for k in moe_keys):
        raise ValueError(
            f"{os.fspath(name_or_path)!r} has no expert or router weights: it is a dense checkpoint. Turn it into a "
            "MoE checkpoint first with `ptmoe.upcycle(...)` / `ptmoe upcycle --base ... --out ...`, then load that."
        )


def load_checked(from_pretrained, *args, **kwargs):
    """Run a `from_pretrained` and refuse the result when experts/routers do not match (see `check_expert_keys`).

    Size mismatches are collected instead of raised by transformers, so that a wrong `num_experts` gets the
    message above; other mismatches still fail unless the caller passed `ignore_mismatched_sizes=True`.
    With a bitsandbytes `quantization_config`, the model class's `_modules_to_not_quantize` (task heads) stay in
    full precision, and 4-bit weights are never repacked for avx512_bf16 CPUs (see
    `disable_bnb_cpu_weight_repacking`).
    """
    output_loading_info = kwargs.pop("output_loading_info", False)
    ignore_mismatched_sizes = kwargs.pop("ignore_mismatched_sizes", False)
    # `from_pretrained` is the bound classmethod of the class being loaded: its `__self__` is that class.
    model_class = getattr(from_pretrained, "__self__", None)
    if kwargs.get("quantization_config") is not None:
        kwargs["quantization_config"] = keep_modules_unquantized(
            kwargs["quantization_config"], getattr(model_class, "_modules_to_not_quantize", None)
        )
    name_or_path = args[0] if args else kwargs.get("pretrained_model_name_or_path")
    check_local_checkpoint(name_or_path)
    _refuse_pickle_only_folder(name_or_path)
    # Pickled weights (`pytorch_model.bin`) can run code when loaded: ptmoe reads safetensors only.
    kwargs.setdefault("use_safetensors", True)
    with _conversion_errors_surfaced(name_or_path):
        try:
            model, loading_info = from_pretrained(
                *args, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
            )
        except Exception as error:
            if type(error).__name__ != "SafetensorError":  # safetensors' own error type, not imported here
                raise
            raise OSError(
                f"A safetensors file of {os.fspath(name_or_path)!r} is damaged or incomplete ({error}): save or "
                "download the checkpoint again."
            ) from error
    disable_bnb_cpu_weight_repacking(model)
    reduce_unused_expert_gradients(model)
    _refuse_dense_checkpoint(model, loading_info, name_or_path)
    check_expert_keys(loading_info, model.config)
    mismatched = loading_info.get("mismatched_keys", [])
    if mismatched and not ignore_mismatched_sizes:
        raise ValueError(
            f"Checkpoint weights have other shapes than the model: {[k for k, *_ in mismatched][:6]}. Pass "
            "`ignore_mismatched_sizes=True` to re-initialise them (e.g. a new classification head)."
        )
    return (model, loading_info) if output_loading_info else model


class MoePreTrainedMixin:
    """`PreTrainedModel` behaviour shared by the MoE families (put it first in the bases)."""

    # `loss` already averages over tokens and adds the router losses: the Trainer must still divide it by the
    # gradient-accumulation steps and must not rescale it by the number of processes.
    accepts_loss_kwargs = False

    def init_parallel_plans(self) -> None:
        """transformers' plan collection, keeping only the rules that name a module or parameter of this model.

        The config families declare one plan for all their models (`base_model_tp_plan`, `base_model_fsdp_plan`):
        rules for dense FFNs, shared experts, gated projections or the decoder name nothing in a model without them,
        and transformers would warn about each of those rules at every distributed load.
        """
        super().init_parallel_plans()
        names = {
            replace_layer_number_by_wildcard(name)
            for name, _ in itertools.chain(self.named_modules(), self.named_parameters())
        }
        for plan in ("_tp_plan", "_ep_plan", "_pp_plan", "_fsdp_plan"):
            rules = getattr(self, plan, None) or {}
            setattr(
                self,
                plan,
                {key: style for key, style in rules.items() if not isinstance(key, str) or key in names},
            )

    def _initialize_weights(self, module, is_custom_code: bool = False):
        # Registered classes count as "custom code", and transformers then skips modules without direct
        # parameters (attention blocks, experts), so their `_init_weights` rules never ran. Every init here goes
        # through `transformers.initialization`, which already leaves loaded tensors alone.
        super()._initialize_weights(module, is_custom_code=False)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, refusing checkpoints whose experts or routers do not match."""
        return load_checked(super().from_pretrained, *args, **kwargs)

    def experts_named(self, *domains: str) -> list[int]:
        """The expert ids whose `config.expert_names` entry is one of `domains` (a `ValueError` naming unknowns)."""
        names = self.config.expert_names
        if not names:
            raise ValueError(
                "this model has no `expert_names` in its config: name the experts (ptmoe.merge_experts does, or set "
                "config.expert_names to one domain name per expert) or pass expert ids to `route_to`"
            )
        unknown = [d for d in domains if d not in names]
        if unknown:
            raise ValueError(f"no expert is named {unknown}; the experts are named {domain_names(names)}")
        return [e for e, name in enumerate(names) if name in domains]

    def route_to(self, *domains: str | int | None) -> ForcedRouting:
        """Force every MoE layer to route tokens only to the experts named `domains` (or to expert ids).

        The router still weighs the allowed experts (top-k over them, renormalised as usual); with fewer allowed
        experts than `num_experts_per_tok`, the extra slots are not dispatched. `model.route_to(None)` restores
        learned routing; used as a context manager, the previous routing comes back on exit::

            model.route_to("juridico")            # from now on
            with model.route_to("saude", "informal"):
                ...                                # only inside the block

        Set by this explicit call (not inside `forward`); the setting is not saved with the model. A hash router
        sends a token whose hashed expert is not allowed to the first allowed expert.
        """
        routers = [m for m in self.modules() if isinstance(m, TopKRouter)]
        previous = [router.forced_experts for router in routers]
        if domains == (None,) or not domains:
            experts = None
        elif all(isinstance(d, int) and not isinstance(d, bool) for d in domains):
            experts = list(domains)
        elif all(isinstance(d, str) for d in domains):
            experts = self.experts_named(*domains)
        else:
            raise ValueError(
                f"`route_to` takes domain names or expert ids (not both), or None; got {domains!r}"
            )
        for router in routers:
            router.force_experts(experts)
        return ForcedRouting(routers, previous)


class ForcedRouting:
    """Returned by `route_to`: a context manager that restores the routing in force before the call."""

    def __init__(self, routers: list[TopKRouter], previous: list[tuple[int, ...] | None]):
        self._routers, self._previous = routers, previous

    def __enter__(self) -> ForcedRouting:
        return self

    def __exit__(self, *exc_info) -> None:
        for router, experts in zip(self._routers, self._previous, strict=True):
            router.force_experts(experts)
