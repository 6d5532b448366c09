"""ptmoe: Mixture-of-Experts versions of Portuguese BERT and T5 models for Hugging Face transformers.

Importing ptmoe registers every config and model with transformers' Auto classes.
"""

from .auto import register_auto_classes
from .models.configuration_moe_bert import MoeBertConfig
from .models.modeling_moe_bert import (
    MoeBertForMaskedLM,
    MoeBertForQuestionAnswering,
    MoeBertForSequenceClassification,
    MoeBertForTokenClassification,
    MoeBertModel,
    MoeBertPreTrainedModel,
)
from .models.moe import (
    ROUTER_TYPES,
    RouterOutput,
    SparseMoeBlock,
    count_parameters,
    importance_loss,
    load_balancing_loss,
    router_z_loss,
)

__version__ = "0.1.0"

register_auto_classes()

__all__ = [
    "MoeBertConfig",
    "MoeBertPreTrainedModel",
    "MoeBertModel",
    "MoeBertForMaskedLM",
    "MoeBertForSequenceClassification",
    "MoeBertForTokenClassification",
    "MoeBertForQuestionAnswering",
    "ROUTER_TYPES",
    "RouterOutput",
    "SparseMoeBlock",
    "count_parameters",
    "load_balancing_loss",
    "router_z_loss",
    "importance_loss",
]
