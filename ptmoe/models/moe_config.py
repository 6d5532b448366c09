"""MoE configuration helpers shared by every ptmoe config class.

The router and combine-weight names (`ROUTER_TYPES`, `COMBINE_WEIGHTS`), the MoE layer specification
(`resolve_moe_layers`), the validation of the MoE config fields (`check_finite_fields`, `validate_moe_fields`,
`validate_routing_extensions`, `validate_decoder_router`) and `MoeConfigMixin` (the Switch preset). Part of the
model code that travels inside Hub checkpoints: it imports only torch and transformers, never ``ptmoe``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

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


# The documentation of the MoE fields `MoeConfigMixin` declares, written once and placed in the docstring of every MoE
# config class (`MoeBertConfig`, `MoeT5Config`) where it says `MOE_FIELDS`.
MOE_FIELDS_DOCSTRING = """        num_experts (`int`, defaults to 8): routed experts per MoE layer.
        num_experts_per_tok (`int`, defaults to 2): experts each token uses (k). Must be 1 for `"switch"`.
        router_type (`str`, defaults to `"topk"`): `"topk"`, `"switch"` (top-1 with capacity), `"noisy_topk"`
            (Shazeer et al. 2017), `"hash"` (fixed routing by token id, Roller et al. 2021), `"expert_choice"`
            (experts pick tokens, Zhou et al. 2022; encoders only) or `"hierarchical"` (a group gate, then an expert
            gate within the chosen groups; Jordan & Jacobs 1994).
        capacity_factor (`float`, defaults to 1.25) / eval_capacity_factor (`float`, defaults to 2.0): Switch
            expert capacity in training / eval, as a multiple of the even share of the tokens of a sequence.
        expert_capacity (`int`, *optional*): absolute per-sequence capacity overriding the factors (the format of
            transformers' Switch Transformers checkpoints).
        expert_capacity_factor (`float`, *optional*): `"expert_choice"`: each expert takes
            ceil(expert_capacity_factor · real tokens / num_experts) tokens of a sequence, so a token uses
            expert_capacity_factor experts on average; defaults to `num_experts_per_tok` (the compute of top-k).
        router_groups (`int`, defaults to 1) / num_groups_per_tok (`int`, defaults to 1): `"hierarchical"`: the
            experts form `router_groups` groups of num_experts / router_groups consecutive experts; each token picks
            `num_groups_per_tok` groups, then num_experts_per_tok / num_groups_per_tok experts inside each.
        expert_dropout (`float`, *optional*): dropout inside every expert, between its projections (Switch
            Transformer fine-tuning: 0.4 in experts, 0.1 elsewhere). Defaults to what the dense FFN does there: 0.0
            for BERT (its FFN has no dropout between its projections; `hidden_dropout_prob` still acts on the MoE
            output), `dropout_rate` for T5.
        router_jitter_noise (`float`, defaults to 0.0): multiplicative router input noise in training.
        router_aux_loss_coef (`float`, defaults to 0.01): load-balancing loss coefficient.
        router_z_loss_coef (`float`, defaults to 0.001): router z-loss coefficient.
        router_importance_loss_coef (`float`, defaults to 0.0): importance (CV²) loss coefficient.
        router_domain_loss_coef (`float`, defaults to 0.0): domain routing loss coefficient (`router_domain_loss`;
            used by the training scripts with `--domain_column`).
        norm_topk_prob (`bool`, defaults to `True`): renormalise the k chosen weights to sum to 1 (`"topk"`).
        num_shared_experts (`int`, defaults to 0): always-active experts added to the routed ones.
        expert_intermediate_size (`int`, *optional*): expert FFN width (default: the dense FFN width,
            `intermediate_size` for BERT, `d_ff` for T5; smaller for partitioned upcycling).
        shared_expert_intermediate_size (`int`, *optional*): width of the shared experts (default: the routed
            experts' width; the importance split of `ptmoe.upcycle` keeps its top neurons in one shared expert).
        combine_weights (`str`, defaults to `"router"`): `"router"` combines the chosen experts with the
            router's top-k probabilities; `"ones"` sums them (weight 1 each: the router only selects, as in
            MoEfication; used by `ptmoe.sparsify`). `"topk"` and `"noisy_topk"` routers only.
        router_top_p (`float`, *optional*): dynamic compute: each token uses the fewest experts whose router
            probability mass reaches `router_top_p`, at most `num_experts_per_tok` (`"topk"`/`"noisy_topk"`).
        router_init (`str`, defaults to `"normal"`): `"normal"` (N(0, initializer_range)) or `"zeros"`.
        output_router_logits (`bool`, defaults to `False`): return per-layer `router_logits` and `expert_index`.
        upcycled_from / upcycling_method / upcycling_seed: provenance written by `ptmoe.upcycle`.
        expert_names (`list[str]`, *optional*): one domain name per expert (repeated for several experts of a
            domain), written by `ptmoe.merge_experts`; `model.route_to(name)` and domain telemetry use them.
"""


@dataclass(repr=False, kw_only=True)
class MoeConfigMixin:
    """The MoE fields (with their defaults) and behaviour shared by the MoE config classes.

    A dataclass, so that transformers' config dataclasses (`MoeBertConfig(MoeConfigMixin, BertConfig)`) inherit the
    fields: declared, defaulted, validated (`validate_moe_fields`) and serialised (`to_dict` / `from_dict`) the same
    way in every MoE config. The fields are documented once, in `MOE_FIELDS_DOCSTRING`.
    """

    num_experts: int = 8
    num_experts_per_tok: int = 2
    router_type: str = "topk"
    capacity_factor: float | int = 1.25
    eval_capacity_factor: float | int = 2.0
    expert_capacity: int | None = None
    router_jitter_noise: float | int = 0.0
    router_aux_loss_coef: float | int = 0.01
    router_z_loss_coef: float | int = 0.001
    router_importance_loss_coef: float | int = 0.0
    router_domain_loss_coef: float | int = 0.0
    norm_topk_prob: bool = True
    num_shared_experts: int = 0
    expert_intermediate_size: int | None = None
    shared_expert_intermediate_size: int | None = None
    combine_weights: str = "router"
    router_top_p: float | None = None
    router_init: str = "normal"
    output_router_logits: bool = False
    expert_capacity_factor: float | int | None = None
    router_groups: int = 1
    num_groups_per_tok: int = 1
    expert_dropout: float | int | None = None
    upcycled_from: str | None = None
    upcycling_method: str | None = None
    upcycling_seed: int | None = None
    expert_names: list[str] | None = None

    @classmethod
    def switch(cls, **kwargs):
        """A config with the Switch Transformer recipe (`SWITCH_PRESET`); `kwargs` override any field.

        Example: ``MoeBertConfig.switch(num_experts=8)`` or ``MoeT5Config.switch(num_experts=8)``.
        """
        return cls(**{**SWITCH_PRESET, **kwargs})
