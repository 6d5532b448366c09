"""MoE-T5 configuration: every `T5Config` field plus the MoE fields, with separate encoder/decoder MoE layers."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers.activations import ACT2FN
from transformers.models.t5.configuration_t5 import T5Config

from .moe import MoeConfigMixin, resolve_moe_layers, validate_decoder_router, validate_moe_fields

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
        num_experts (`int`, defaults to 8): routed experts per MoE layer.
        num_experts_per_tok (`int`, defaults to 2): experts each token uses (k). Must be 1 for `"switch"`.
        encoder_moe_layers (`list[int]` or `int`, defaults to 2): 0-based indices of the encoder MoE layers, or a
            step n meaning every n-th layer (layers n-1, 2n-1, …). `None`/`[]`: dense encoder.
        decoder_moe_layers (`list[int]` or `int`, defaults to 2): the same for the `num_decoder_layers` decoder
            layers.
        router_type (`str`, defaults to `"topk"`): `"topk"`, `"switch"` (top-1 with capacity), `"noisy_topk"`
            (Shazeer et al. 2017), `"hash"` (fixed routing by token id, Roller et al. 2021), `"expert_choice"`
            (experts pick tokens, Zhou et al. 2022; encoders only) or `"hierarchical"` (a group gate, then an expert
            gate within the chosen groups; Jordan & Jacobs 1994).
        decoder_router_type (`str`, *optional*): the decoder's router when it differs from `router_type`; needed
            with `router_type="expert_choice"` when the decoder has MoE layers (Sparse Upcycling pairs an
            expert-choice encoder with a top-k decoder).
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
            Transformer fine-tuning: 0.4 in experts, 0.1 elsewhere). Defaults to `dropout_rate`, as T5's dense FFN.
        router_jitter_noise (`float`, defaults to 0.0): multiplicative router input noise in training.
        router_aux_loss_coef (`float`, defaults to 0.01): load-balancing loss coefficient.
        router_z_loss_coef (`float`, defaults to 0.001): router z-loss coefficient.
        router_importance_loss_coef (`float`, defaults to 0.0): importance (CV²) loss coefficient.
        router_domain_loss_coef (`float`, defaults to 0.0): domain routing loss coefficient (`router_domain_loss`;
            used by the training scripts with `--domain_column`).
        norm_topk_prob (`bool`, defaults to `True`): renormalise the k chosen weights to sum to 1 (`"topk"`).
        num_shared_experts (`int`, defaults to 0): always-active experts added to the routed ones.
        expert_intermediate_size (`int`, *optional*): expert FFN width (default `d_ff`).
        shared_expert_intermediate_size (`int`, *optional*): width of the shared experts (default: the routed
            experts' width; the importance split of `ptmoe.upcycle` keeps its top neurons in one shared expert).
        combine_weights (`str`, defaults to `"router"`): `"router"` combines the chosen experts with the
            router's top-k probabilities; `"ones"` sums them (weight 1 each: the router only selects, as in
            MoEfication; used by `ptmoe.sparsify`). `"topk"` and `"noisy_topk"` routers only.
        router_top_p (`float`, *optional*): dynamic compute: each token uses the fewest experts whose router
            probability mass reaches `router_top_p`, at most `num_experts_per_tok` (`"topk"`/`"noisy_topk"`).
        router_init (`str`, defaults to `"normal"`): `"normal"` or `"zeros"`.
        output_router_logits (`bool`, defaults to `False`): return per-layer `router_logits` and `expert_index`.
        upcycled_from / upcycling_method / upcycling_seed: provenance written by `ptmoe.upcycle`.
        expert_names (`list[str]`, *optional*): one domain name per expert (repeated for several experts of a
            domain), written by `ptmoe.merge_experts`; `model.route_to(name)` and domain telemetry use them.

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

    num_experts: int = 8
    num_experts_per_tok: int = 2
    encoder_moe_layers: list[int] | int | None = 2
    decoder_moe_layers: list[int] | int | None = 2
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
    decoder_router_type: str | None = None
    upcycled_from: str | None = None
    upcycling_method: str | None = None
    upcycling_seed: int | None = None
    expert_names: list[str] | None = None

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


__all__ = ["MoeT5Config"]
