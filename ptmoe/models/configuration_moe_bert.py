"""MoE-BERT configuration: every `BertConfig` field plus the MoE fields."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers.models.bert.configuration_bert import BertConfig

from .moe import MoeConfigMixin, resolve_moe_layers, validate_moe_fields

# Written into every saved config.json, so a Hub folder loads every class with `trust_remote_code=True` on a
# machine without ptmoe (transformers would otherwise record only the class that was saved).
AUTO_MAP = {
    "AutoConfig": "configuration_moe_bert.MoeBertConfig",
    "AutoModel": "modeling_moe_bert.MoeBertModel",
    "AutoModelForMaskedLM": "modeling_moe_bert.MoeBertForMaskedLM",
    "AutoModelForSequenceClassification": "modeling_moe_bert.MoeBertForSequenceClassification",
    "AutoModelForTokenClassification": "modeling_moe_bert.MoeBertForTokenClassification",
    "AutoModelForQuestionAnswering": "modeling_moe_bert.MoeBertForQuestionAnswering",
}


@strict
class MoeBertConfig(MoeConfigMixin, BertConfig):
    r"""
    Configuration of a MoE-BERT model: a BERT encoder whose feed-forward networks in `moe_layers` are replaced
    by a sparse Mixture-of-Experts block (`router` + `experts.{i}.wi` / `experts.{i}.wo`).

    Every [`BertConfig`] argument is accepted. MoE arguments:

    Args:
        num_experts (`int`, defaults to 8): routed experts per MoE layer.
        num_experts_per_tok (`int`, defaults to 2): experts each token uses (k). Must be 1 for `"switch"`.
        moe_layers (`list[int]` or `int`, defaults to 2): 0-based indices of the MoE layers, or a step n
            meaning every n-th layer (layers n-1, 2n-1, …). `None`/`[]`: a dense BERT.
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
            Transformer fine-tuning: 0.4 in experts, 0.1 elsewhere). Defaults to 0.0, as BERT's FFN has no dropout
            between its projections (`hidden_dropout_prob` still acts on the MoE output, outside the experts).
        router_jitter_noise (`float`, defaults to 0.0): multiplicative router input noise in training.
        router_aux_loss_coef (`float`, defaults to 0.01): load-balancing loss coefficient.
        router_z_loss_coef (`float`, defaults to 0.001): router z-loss coefficient.
        router_importance_loss_coef (`float`, defaults to 0.0): importance (CV²) loss coefficient.
        router_domain_loss_coef (`float`, defaults to 0.0): domain routing loss coefficient (`router_domain_loss`;
            used by the training scripts with `--domain_column`).
        norm_topk_prob (`bool`, defaults to `True`): renormalise the k chosen weights to sum to 1 (`"topk"`).
        num_shared_experts (`int`, defaults to 0): always-active experts added to the routed ones.
        expert_intermediate_size (`int`, *optional*): expert FFN width (default `intermediate_size`; smaller
            for partitioned upcycling).
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

    Example:

    ```python
    >>> import ptmoe
    >>> config = ptmoe.MoeBertConfig(num_experts=8, num_experts_per_tok=1, router_type="switch", moe_layers=2)
    >>> model = ptmoe.MoeBertForMaskedLM(config)
    >>> switch = ptmoe.MoeBertConfig.switch(num_experts=8)  # Switch Transformer recipe in one line
    ```
    """

    model_type = "moe_bert"
    # transformers' distributed engine (`from_pretrained(..., distributed_config=DistributedConfig(tp_size=…,
    # fsdp_size=…))`) reads these plans; names are relative to `MoeBertModel`. Attention and every FFN (dense, each
    # routed and shared expert) are split Megatron-style: the first projection by output columns, the second by
    # input rows, so each layer costs one all-reduce per projection pair. Routers, LayerNorms, the pooler and the
    # classification heads stay replicated: routers must see every hidden feature and decide the same on every rank.
    # The word embeddings (and the MLM decoder tied to them, `MoeBertForMaskedLM._tp_plan`) are split by vocabulary.
    # Rules naming modules a model does not have (dense layers of an all-MoE model, shared experts) are dropped when
    # the model is built. Expert parallelism (`ep_size`) is not declared: see docs/distributed.md.
    base_model_tp_plan = {
        "embeddings.word_embeddings": "embedding_rowwise",
        "encoder.layer.*.attention.self.query": "colwise",
        "encoder.layer.*.attention.self.key": "colwise",
        "encoder.layer.*.attention.self.value": "colwise",
        "encoder.layer.*.attention.output.dense": "rowwise",
        "encoder.layer.*.intermediate.dense": "colwise",
        "encoder.layer.*.output.dense": "rowwise",
        "encoder.layer.*.moe.experts.*.wi": "colwise",
        "encoder.layer.*.moe.experts.*.wo": "rowwise",
        "encoder.layer.*.moe.shared_experts.*.wi": "colwise",
        "encoder.layer.*.moe.shared_experts.*.wo": "rowwise",
    }
    # FSDP2: one unit per layer (router and all its experts together), never one per expert: a rank whose tokens
    # skip an expert would skip that unit's all-gather and hang the others (pytorch#126616). Embeddings, pooler and
    # heads stay in the root unit, so the MLM decoder tied to the word embeddings is sharded once.
    base_model_fsdp_plan = {"encoder.layer.*": "free_full_weight"}

    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_layers: list[int] | int | None = 2
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

    def __post_init__(self, **kwargs):
        validate_moe_fields(self)
        if self.is_decoder or self.add_cross_attention:
            raise ValueError("MoE-BERT is an encoder: `is_decoder` and `add_cross_attention` must be False")
        resolve_moe_layers(self.moe_layers, self.num_hidden_layers, "moe_layers")
        super().__post_init__(**kwargs)
        self.auto_map = {**AUTO_MAP, **(getattr(self, "auto_map", None) or {})}

    @property
    def moe_layer_indices(self) -> list[int]:
        """The MoE layer indices as a sorted list (resolving an every-n-th step)."""
        return resolve_moe_layers(self.moe_layers, self.num_hidden_layers, "moe_layers")


__all__ = ["MoeBertConfig"]
