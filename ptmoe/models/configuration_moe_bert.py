"""MoE-BERT configuration: every `BertConfig` field plus the MoE fields."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers.models.bert.configuration_bert import BertConfig

from .moe import MOE_FIELDS_DOCSTRING, MoeConfigMixin, resolve_moe_layers, validate_moe_fields

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
            moe_layers (`list[int]` or `int`, defaults to 2): 0-based indices of the MoE layers, or a step n
                meaning every n-th layer (layers n-1, 2n-1, …). `None`/`[]`: a dense BERT.
    MOE_FIELDS
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

    moe_layers: list[int] | int | None = 2

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


# The MoE fields are documented once, beside their declaration in `MoeConfigMixin`.
MoeBertConfig.__doc__ = MoeBertConfig.__doc__.replace("MOE_FIELDS\n", MOE_FIELDS_DOCSTRING)

__all__ = ["MoeBertConfig"]
