"""Every transformers Auto-class registration of ptmoe, in one place (run on `import ptmoe`).

`AutoConfig.register` / `AutoModel*.register` make `AutoModel*.from_pretrained` find the ptmoe classes in this
process; `register_for_auto_class` makes `save_pretrained` copy the modeling files (and their sibling imports)
into the checkpoint, so the folder also loads with `trust_remote_code=True` where ptmoe is not installed.
"""

from __future__ import annotations

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTextEncoding,
    AutoModelForTokenClassification,
)

from .models.configuration_moe_bert import MoeBertConfig
from .models.configuration_moe_t5 import MoeT5Config
from .models.modeling_moe_bert import (
    MoeBertForMaskedLM,
    MoeBertForQuestionAnswering,
    MoeBertForSequenceClassification,
    MoeBertForTokenClassification,
    MoeBertModel,
)
from .models.modeling_moe_t5 import MoeT5EncoderModel, MoeT5ForConditionalGeneration, MoeT5Model

# (config class, [(auto class, model class), ...]) per model family.
REGISTRY = [
    (
        MoeBertConfig,
        [
            (AutoModel, MoeBertModel),
            (AutoModelForMaskedLM, MoeBertForMaskedLM),
            (AutoModelForSequenceClassification, MoeBertForSequenceClassification),
            (AutoModelForTokenClassification, MoeBertForTokenClassification),
            (AutoModelForQuestionAnswering, MoeBertForQuestionAnswering),
        ],
    ),
    (
        MoeT5Config,
        [
            (AutoModel, MoeT5Model),
            (AutoModelForSeq2SeqLM, MoeT5ForConditionalGeneration),
            (AutoModelForTextEncoding, MoeT5EncoderModel),
        ],
    ),
]


def register_auto_classes() -> None:
    """Register every ptmoe config and model with transformers' Auto classes (idempotent)."""
    for config_class, models in REGISTRY:
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        config_class.register_for_auto_class()
        for auto_class, model_class in models:
            auto_class.register(config_class, model_class, exist_ok=True)
            model_class.register_for_auto_class(auto_class.__name__)
