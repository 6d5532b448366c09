"""MoE-T5 configuration: every `T5Config` field plus the MoE fields, with separate encoder/decoder MoE layers."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers.activations import ACT2FN
from transformers.models.t5.configuration_t5 import T5Config

from .moe import (
    MOE_FIELDS_DOCSTRING,
    MoeConfigMixin,
    resolve_moe_layers,
    validate_decoder_router,
    validate_moe_fields,
)

# Written into every saved config.json, so a Hub folder loads every class with `trust_remote_code=True` on a
# machine without ptmoe (transformers would otherwise record only the class that was saved).
AUTO_MAP = {
    "AutoConfig": "configuration_moe_t5.MoeT5Config",
    "AutoModel": "modeling_moe_t5.MoeT5Model",
    "AutoModelForSeq2SeqLM": "modeling_moe_t5.MoeT5ForConditionalGeneration",
    "AutoModelForTextEncoding": "modeling_moe_t5.MoeT5EncoderModel",
}


def _check_feed_forward_proj(feed_forward_proj: str) -> None:
    """Refuse a `feed_forward_proj` that is not `"{act}"` or `"gated-{act}"` with `act` a transformers activation.

    T5Config only checks the format, so an unknown activation such as `"gated-foo"` would otherwise fail later,
    with a bare `KeyError`, while the model is being built.
    """
    parts = feed_forward_proj.split("-") if isinstance(feed_forward_proj, str) else []
    valid_format = len(parts) == 1 or (len(parts) == 2 and parts[0] == "gated")
    if not valid_format or not parts[-1]:
        raise ValueError(
            f"`feed_forward_proj` must be '<activation>' or 'gated-<activation>' (e.g. 'relu' for T5 v1.0 / PTT5, "
            f"'gated-gelu' for T5 v1.1 / PTT5-v2), got {feed_forward_proj!r}"
        )
    activation = "gelu_new" if feed_forward_proj == "gated-gelu" else parts[-1]  # T5Config's historic alias
    if activation not in ACT2FN:
        raise ValueError(
            f"`feed_forward_proj` {feed_forward_proj!r} names an unknown activation {activation!r}; known "
            f"activations include 'relu', 'gelu', 'gelu_new', 'silu' (see transformers.activations.ACT2FN)"
        )


def _t5_tensor_parallel_plan() -> dict[str, str]:
    """The tensor-parallel plan of MoE-T5, named from the encoder-decoder (`encoder.block.*…`, `decoder.block.*…`).

    Every attention is split by heads (q/k/v by output columns, o by input rows); the relative position bias table
    is split by heads too and looked up locally, so each rank adds the bias of its own heads. Every FFN (dense
    `DenseReluDense`, each routed and shared expert; `wi` or gated `wi_0`/`wi_1`) is split by its hidden units.
    Routers and layer norms stay replicated. (transformers matches every list index as `*`, so the sub-layers
    `layer.0/1/2` of a block are told apart by their module names.)
    """
    plan = {"shared": "embedding_rowwise"}
    for stack in ("encoder", "decoder"):
        plan[f"{stack}.embed_tokens"] = "embedding_rowwise"
        for attention in ("SelfAttention", "EncDecAttention") if stack == "decoder" else ("SelfAttention",):
            prefix = f"{stack}.block.*.layer.*.{attention}"
            plan.update({f"{prefix}.q": "colwise", f"{prefix}.k": "colwise", f"{prefix}.v": "colwise"})
            plan[f"{prefix}.o"] = "rowwise"
        bias = f"{stack}.block.*.layer.*.SelfAttention.relative_attention_bias"
        plan.update({f"{bias}.weight": "embedding_colwise", bias: "local_params"})
        for ffn in ("DenseReluDense", "moe.experts.*", "moe.shared_experts.*"):
            prefix = f"{stack}.block.*.layer.*.{ffn}"
            plan.update({f"{prefix}.{name}": "colwise" for name in ("wi", "wi_0", "wi_1")})
            plan[f"{prefix}.wo"] = "rowwise"
    return plan


@strict
class MoeT5Config(MoeConfigMixin, T5Config):
    r"""
        Configuration of a MoE-T5 encoder-decoder: a T5 whose feed-forward networks in `encoder_moe_layers` (encoder)
        and `decoder_moe_layers` (decoder) are sparse Mixture-of-Experts blocks (`router` + `experts.{i}.wi` /
        `experts.{i}.wo`, or `wi_0` / `wi_1` / `wo` for gated activations).

        Every [`T5Config`] argument is accepted, including both FFN styles: `feed_forward_proj="relu"` (T5 v1.0, PTT5)
        and `"gated-gelu"` (T5 v1.1, PTT5-v2). As in transformers' T5, `tie_word_embeddings=False` (the v1.1 format)
        switches off the `d_model**-0.5` rescaling of the decoder output before the LM head. MoE arguments:

        Args:
            encoder_moe_layers (`list[int]` or `int`, defaults to 2): 0-based indices of the encoder MoE layers, or a
                step n meaning every n-th layer (layers n-1, 2n-1, …). `None`/`[]`: dense encoder.
            decoder_moe_layers (`list[int]` or `int`, defaults to 2): the same for the `num_decoder_layers` decoder
                layers.
            decoder_router_type (`str`, *optional*): the decoder's router when it differs from `router_type`; needed
                with `router_type="expert_choice"` when the decoder has MoE layers (Sparse Upcycling pairs an
                expert-choice encoder with a top-k decoder).
    MOE_FIELDS
        Example:

        ```python
        >>> import ptmoe
        >>> config = ptmoe.MoeT5Config(feed_forward_proj="gated-gelu", num_experts=8, encoder_moe_layers=[1, 3])
        >>> model = ptmoe.MoeT5ForConditionalGeneration(config)
        >>> switch = ptmoe.MoeT5Config.switch(num_experts=8)  # Switch Transformer recipe in one line
        ```
    """

    model_type = "moe_t5"
    # transformers' distributed engine (`from_pretrained(..., distributed_config=DistributedConfig(tp_size=…,
    # fsdp_size=…))`) reads these plans. Rules naming modules a model does not have (the decoder of
    # `MoeT5EncoderModel`, dense FFNs of an all-MoE stack, gated or plain projections) are dropped when the model is
    # built. Expert parallelism (`ep_size`) is not declared: see docs/distributed.md.
    base_model_tp_plan = _t5_tensor_parallel_plan()
    # FSDP2: one unit per block (router and all its experts together, never one per expert: pytorch#126616); the
    # shared embedding and the LM head tied to it stay in the root unit.
    base_model_fsdp_plan = {"encoder.block.*": "free_full_weight", "decoder.block.*": "free_full_weight"}

    encoder_moe_layers: list[int] | int | None = 2
    decoder_moe_layers: list[int] | int | None = 2
    decoder_router_type: str | None = None

    def __post_init__(self, **kwargs):
        # `MoeT5Config(**t5_config.to_dict())` carries `model_type="t5"`, which would make the saved config a T5.
        kwargs.pop("model_type", None)
        validate_moe_fields(self)
        _check_feed_forward_proj(self.feed_forward_proj)
        num_decoder_layers = (
            self.num_decoder_layers if self.num_decoder_layers is not None else self.num_layers
        )
        resolve_moe_layers(self.encoder_moe_layers, self.num_layers, "encoder_moe_layers")
        resolve_moe_layers(self.decoder_moe_layers, num_decoder_layers, "decoder_moe_layers")
        validate_decoder_router(self, has_decoder_moe=bool(self.decoder_moe_layers))
        super().__post_init__(**kwargs)
        self.auto_map = {**AUTO_MAP, **(getattr(self, "auto_map", None) or {})}

    @property
    def encoder_moe_layer_indices(self) -> list[int]:
        """The encoder MoE layer indices as a sorted list (resolving an every-n-th step)."""
        return resolve_moe_layers(self.encoder_moe_layers, self.num_layers, "encoder_moe_layers")

    @property
    def decoder_moe_layer_indices(self) -> list[int]:
        """The decoder MoE layer indices as a sorted list (resolving an every-n-th step)."""
        return resolve_moe_layers(self.decoder_moe_layers, self.num_decoder_layers, "decoder_moe_layers")


# The MoE fields are documented once, beside their declaration in `MoeConfigMixin`.
MoeT5Config.__doc__ = MoeT5Config.__doc__.replace("MOE_FIELDS\n", MOE_FIELDS_DOCSTRING)

__all__ = ["MoeT5Config"]
