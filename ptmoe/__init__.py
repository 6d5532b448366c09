"""ptmoe: Mixture-of-Experts versions of Portuguese BERT and T5 models for Hugging Face transformers.

Importing ptmoe registers every config and model with transformers' Auto classes.
"""

from .auto import register_auto_classes
from .compress import PruningReport, prune_wanda, save_pruned
from .convert import convert_switch_transformers
from .lora import (
    MoeLayer,
    expert_lora_config,
    expert_token_counts,
    experts_for_coverage,
    merge_adapters,
    moe_layers,
    select_experts,
)
from .merging import merge_experts
from .models.configuration_moe_bert import MoeBertConfig
from .models.configuration_moe_t5 import MoeT5Config
from .models.modeling_moe_bert import (
    MoeBertForMaskedLM,
    MoeBertForQuestionAnswering,
    MoeBertForSequenceClassification,
    MoeBertForTokenClassification,
    MoeBertModel,
    MoeBertPreTrainedModel,
)
from .models.modeling_moe_t5 import (
    MoeT5EncoderModel,
    MoeT5ForConditionalGeneration,
    MoeT5Model,
    MoeT5PreTrainedModel,
)
from .models.moe import (
    ROUTER_TYPES,
    CheckpointMismatchError,
    RouterOutput,
    SparseMoeBlock,
    count_parameters,
    importance_loss,
    load_balancing_loss,
    router_domain_loss,
    router_z_loss,
)
from .quantization import (
    bnb_4bit_config,
    disable_cpu_weight_repacking,
    estimate_quantized_footprint,
    prepare_qlora_model,
    quantizable_linears,
    quantize_dynamic_int8,
)
from .sparsify import fit_routers
from .upcycling import SUPPORTED_ARCHITECTURES, UPCYCLING_METHODS, save_upcycled, upcycle
from .zoo import ZooEntry, create_model, get_model_info, list_models

__version__ = "0.1.0"

register_auto_classes()

# Router telemetry imports the Trainer stack (and with it peft and bitsandbytes, seconds of import time): it is
# loaded on first use, so `import ptmoe` stays light for inference.
_LAZY_EXPORTS = {
    "RouterTelemetryCallback": "telemetry",
    "add_router_telemetry": "telemetry",
    "routing_statistics": "telemetry",
    "plot_expert_load": "telemetry",
    "distill": "compress.distillation",
    "domain_routing_statistics": "domains",
    "plot_domain_load": "domains",
}


def __getattr__(name: str):
    if name in _LAZY_EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "MoeBertConfig",
    "MoeBertPreTrainedModel",
    "MoeBertModel",
    "MoeBertForMaskedLM",
    "MoeBertForSequenceClassification",
    "MoeBertForTokenClassification",
    "MoeBertForQuestionAnswering",
    "MoeT5Config",
    "MoeT5PreTrainedModel",
    "MoeT5Model",
    "MoeT5EncoderModel",
    "MoeT5ForConditionalGeneration",
    "convert_switch_transformers",
    "ROUTER_TYPES",
    "CheckpointMismatchError",
    "RouterOutput",
    "SparseMoeBlock",
    "count_parameters",
    "load_balancing_loss",
    "router_z_loss",
    "importance_loss",
    "router_domain_loss",
    "merge_experts",
    "MoeLayer",
    "moe_layers",
    "expert_lora_config",
    "expert_token_counts",
    "experts_for_coverage",
    "select_experts",
    "merge_adapters",
    "bnb_4bit_config",
    "disable_cpu_weight_repacking",
    "estimate_quantized_footprint",
    "prepare_qlora_model",
    "quantizable_linears",
    "quantize_dynamic_int8",
    "upcycle",
    "save_upcycled",
    "SUPPORTED_ARCHITECTURES",
    "UPCYCLING_METHODS",
    "fit_routers",
    "distill",
    "list_models",
    "create_model",
    "get_model_info",
    "ZooEntry",
    "RouterTelemetryCallback",
    "add_router_telemetry",
    "routing_statistics",
    "plot_expert_load",
    "prune_wanda",
    "save_pruned",
    "PruningReport",
    "domain_routing_statistics",
    "plot_domain_load",
]
