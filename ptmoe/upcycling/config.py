"""The MoE config of an upcycled model: every dense config field, the MoE fields and the provenance.

`build_moe_config` validates the MoE fields (through the MoE config class) before any weight is read, checks the
layout a method needs (`method="partition"` splits the intermediate neurons evenly; the copy methods keep the
dense size) and maps RoBERTa's position numbering onto MoE-BERT's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .families import FAMILIES, ArchitectureMap, import_class

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
    config_class = import_class(family.config_module, family.config_class)
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
