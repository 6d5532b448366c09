"""The ptmoe model zoo: named, documented MoE variants of Portuguese dense checkpoints (timm-style registry).

Every variant is one explicit `ZooEntry` below, with literal values: the dense checkpoint it is upcycled from
(and that checkpoint's license), the dense architecture's shape, the MoE settings and the upcycling recipe.
Nothing is discovered at import time (no directory scans, no parsing of names), so the table a user reads in
`ptmoe list` is exactly the data in this file.

```python
>>> import ptmoe
>>> ptmoe.list_models("moe-bertimbau-*")
>>> model = ptmoe.create_model("moe-bertimbau-base-top2-8e")                   # random weights, full size
>>> tiny = ptmoe.create_model("moe-ptt5-base-switch-8e", d_model=32, d_ff=64, num_layers=2, num_heads=4)
>>> model = ptmoe.create_model("moe-bertimbau-base-top2-8e", pretrained=True)  # upcycle the dense source (cached)
>>> model = ptmoe.create_model("moe-bertimbau-base-top2-8e", pretrained=True, source="path/to/dense")
```

`pretrained=True` loads the published MoE checkpoint (`hub_id`) when there is one. None is published yet, so
today it upcycles the dense source with `ptmoe.upcycle` and caches the result under
`$PTMOE_CACHE/<name>-<hash>` (default `~/.cache/ptmoe`), keyed by the source and every setting.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import hashlib
import importlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Where each model family's classes live. Classes are imported when a model is built, not at import time, so
# the registry is plain data and `import ptmoe.zoo` stays cheap.
_FAMILIES = {
    "moe_bert": ("ptmoe.models.configuration_moe_bert", "MoeBertConfig", "ptmoe.models.modeling_moe_bert"),
    "moe_t5": ("ptmoe.models.configuration_moe_t5", "MoeT5Config", "ptmoe.models.modeling_moe_t5"),
}

CACHE_ENV = "PTMOE_CACHE"
_PROVENANCE_FILE = "ptmoe_zoo.json"


class UnknownModelError(ValueError):
    """Raised for a model name that is not in the zoo; the message lists the closest registered names."""


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class ZooEntry:
    r"""
    One registered MoE variant. All values are literal: they describe the architecture without fetching anything.

    Args:
        name (`str`): registry name, e.g. `"moe-bertimbau-base-top2-8e"`.
        family (`str`): `"moe_bert"` or `"moe_t5"` (the ptmoe model type).
        architecture (`str`): ptmoe task class built by `create_model`, e.g. `"MoeBertForMaskedLM"`.
        pipeline_tag (`str`): Hub task of that class (`"fill-mask"`, `"text2text-generation"`).
        dense_source (`str`): Hub id of the dense checkpoint the experts are upcycled from.
        dense_architecture (`str`): transformers class of the dense checkpoint.
        dense_license (`str`): Hub license identifier of the dense checkpoint (the MoE model inherits it).
        dense_config (`Mapping[str, Any]`): the dense checkpoint's shape, as fields of its own config class
            (`BertConfig` / `T5Config` names), so `pretrained=False` builds the architecture offline.
        tokenizer (`str`): Hub id of the tokenizer (the dense source's: upcycling keeps the vocabulary).
        num_experts (`int`): routed experts per MoE layer.
        num_experts_per_tok (`int`): experts each token uses (k).
        router_type (`str`): one of `ptmoe.ROUTER_TYPES`.
        moe_layers (`Mapping[str, Any]`): the MoE layer fields of the config (`moe_layers`, or
            `encoder_moe_layers` + `decoder_moe_layers`); an integer n means every n-th layer.
        router_config (`Mapping[str, Any]`): the other router fields (capacity, jitter, loss coefficients).
        upcycling_method (`str`): `method` passed to `ptmoe.upcycle`.
        upcycling_seed (`int`): `seed` passed to `ptmoe.upcycle`.
        hub_id (`str`, *optional*): Hub id of the published MoE checkpoint; `None` while nothing is published.
        datasets (`tuple[str, ...]`): pretraining corpora of the dense source (the MoE weights start from them).
        description (`str`): one-line summary for tables and cards.
        notes (`str`): provenance caveats (license checks, uncertain facts).
    """

    name: str
    family: str
    architecture: str
    pipeline_tag: str
    dense_source: str
    dense_architecture: str
    dense_license: str
    dense_config: Mapping[str, Any]
    tokenizer: str
    num_experts: int
    num_experts_per_tok: int
    router_type: str
    moe_layers: Mapping[str, Any]
    router_config: Mapping[str, Any]
    upcycling_method: str
    upcycling_seed: int = 0
    hub_id: str | None = None
    datasets: tuple[str, ...] = ()
    description: str = ""
    notes: str = ""
    citations: tuple[str, ...] = field(default=())

    def __post_init__(self):
        if self.family not in _FAMILIES:
            raise ValueError(
                f"{self.name}: unknown family {self.family!r}; expected one of {sorted(_FAMILIES)}"
            )
        # Freeze the mappings: a registry entry must not be changed by the code that reads it.
        for name in ("dense_config", "moe_layers", "router_config"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))

    def moe_settings(self) -> dict[str, Any]:
        """The MoE config fields of this variant (experts, k, router, MoE layers, router options)."""
        return {
            "num_experts": self.num_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "router_type": self.router_type,
            **self.moe_layers,
            **self.router_config,
        }

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy of the entry."""
        return {
            "name": self.name,
            "family": self.family,
            "architecture": self.architecture,
            "pipeline_tag": self.pipeline_tag,
            "dense_source": self.dense_source,
            "dense_architecture": self.dense_architecture,
            "dense_license": self.dense_license,
            "dense_config": dict(self.dense_config),
            "tokenizer": self.tokenizer,
            **{k: v for k, v in self.moe_settings().items()},
            "upcycling_method": self.upcycling_method,
            "upcycling_seed": self.upcycling_seed,
            "hub_id": self.hub_id,
            "datasets": list(self.datasets),
            "description": self.description,
            "notes": self.notes,
        }


# --------------------------------------------------------------------------------------------------------------
# Dense shapes (literal copies of the dense checkpoints' config.json values)
# --------------------------------------------------------------------------------------------------------------
_BERTIMBAU_BASE = {
    "vocab_size": 29794,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
}
_BERTIMBAU_LARGE = {
    **_BERTIMBAU_BASE,
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
}
# T5 v1.0 base shape: ReLU FFN, d_ff 3072, LM head tied to the embeddings, 32,128 embedding rows.
_T5_V1_0_BASE = {
    "vocab_size": 32128,
    "d_model": 768,
    "d_kv": 64,
    "d_ff": 3072,
    "num_layers": 12,
    "num_decoder_layers": 12,
    "num_heads": 12,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "dropout_rate": 0.1,
    "layer_norm_epsilon": 1e-6,
    "initializer_factor": 1.0,
    "feed_forward_proj": "relu",
    "tie_word_embeddings": True,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}

# Router recipes. Top-2: softmax top-k with renormalised weights (an upcycled model then starts as the dense one,
# since identical experts mixed with weights summing to 1 give the dense output). Switch: Fedus et al. 2021 with
# the ST-MoE z-loss (Zoph et al. 2022): top-1, capacity factor 1.25 (2.0 at eval), jitter 1e-2.
_TOP2_ROUTER = {
    "norm_topk_prob": True,
    "router_jitter_noise": 0.0,
    "router_aux_loss_coef": 0.01,
    "router_z_loss_coef": 0.001,
}
_SWITCH_ROUTER = {
    "capacity_factor": 1.25,
    "eval_capacity_factor": 2.0,
    "router_jitter_noise": 0.01,
    "router_aux_loss_coef": 0.01,
    "router_z_loss_coef": 0.001,
}

# The fields of the dense configs that define the dense architecture (used to count the dense source).
DENSE_CONFIG_KEYS = {"moe_bert": tuple(_BERTIMBAU_BASE), "moe_t5": tuple(_T5_V1_0_BASE)}
ROUTER_CONFIG_KEYS = tuple(dict.fromkeys([*_TOP2_ROUTER, *_SWITCH_ROUTER]))

_UNPUBLISHED = (
    "No MoE checkpoint of this variant is published yet (hub_id is None): pretrained=True upcycles."
)
_LICENSE_CHECK = (
    "The license is the dense source's as shown on its Hub page when this entry was written; re-check it on the "
    "Hub page before publishing."
)
_PTT5_V2_SHAPE = (
    "Shape: the Hub card of unicamp-dl/ptt5-v2-base names google-t5/t5-base as base model ('continuing from "
    "Google's original checkpoints'), and its reported parameter count, 222,903,552, is exactly a T5 v1.0 base "
    "with a 32,128-row tied vocabulary, so the entry uses the T5 v1.0 shape (ReLU, d_ff 3072), not the T5 v1.1 "
    "gated-GELU one. Compare with the checkpoint's config.json before publishing."
)

_CITE_BERTIMBAU = "Souza, Nogueira and Lotufo (2020). BERTimbau: pretrained BERT models for Brazilian Portuguese. BRACIS 2020."
_CITE_PTT5 = (
    "Carmo, Piau, Campiotti, Nogueira and Lotufo (2020). PTT5: Pretraining and validating the T5 model on "
    "Brazilian Portuguese data. arXiv:2008.09144."
)
_CITE_PTT5_V2 = (
    "Piau, Lotufo and Nogueira (2024). ptt5-v2: A Closer Look at Continued Pretraining of T5 Models for the "
    "Portuguese Language. arXiv:2406.10806."
)
UPCYCLING_CITATION = _CITE_UPCYCLING = (
    "Komatsuzaki et al. (2023). Sparse Upcycling: Training Mixture-of-Experts from Dense Checkpoints. ICLR 2023 "
    "(arXiv:2212.05055)."
)
_CITE_SWITCH = (
    "Fedus, Zoph and Shazeer (2022). Switch Transformers: Scaling to Trillion Parameter Models with Simple and "
    "Efficient Sparsity. JMLR 23 (arXiv:2101.03961)."
)
_CITE_STMOE = (
    "Zoph et al. (2022). ST-MoE: Designing Stable and Transferable Sparse Expert Models. arXiv:2202.08906."
)

# --------------------------------------------------------------------------------------------------------------
# The registry: one explicit entry per variant
# --------------------------------------------------------------------------------------------------------------
_ENTRIES: tuple[ZooEntry, ...] = (
    # ---------------------------------------------------------------- MoE-BERTimbau base (110M dense)
    ZooEntry(
        name="moe-bertimbau-base-top2-8e",
        family="moe_bert",
        architecture="MoeBertForMaskedLM",
        pipeline_tag="fill-mask",
        dense_source="neuralmind/bert-base-portuguese-cased",
        dense_architecture="BertForMaskedLM",
        dense_license="mit",
        dense_config=_BERTIMBAU_BASE,
        tokenizer="neuralmind/bert-base-portuguese-cased",
        num_experts=8,
        num_experts_per_tok=2,
        router_type="topk",
        moe_layers={"moe_layers": 2},
        router_config=_TOP2_ROUTER,
        upcycling_method="copy",
        upcycling_seed=0,
        hub_id=None,
        datasets=("brWaC",),
        description="BERTimbau base with 8 experts in every other layer, top-2 routing.",
        notes=f"{_UNPUBLISHED} {_LICENSE_CHECK}",
        citations=(_CITE_BERTIMBAU, _CITE_UPCYCLING),
    ),
    ZooEntry(
        name="moe-bertimbau-base-switch-8e",
        family="moe_bert",
        architecture="MoeBertForMaskedLM",
        pipeline_tag="fill-mask",
        dense_source="neuralmind/bert-base-portuguese-cased",
        dense_architecture="BertForMaskedLM",
        dense_license="mit",
        dense_config=_BERTIMBAU_BASE,
        tokenizer="neuralmind/bert-base-portuguese-cased",
        num_experts=8,
        num_experts_per_tok=1,
        router_type="switch",
        moe_layers={"moe_layers": 2},
        router_config=_SWITCH_ROUTER,
        upcycling_method="copy",
        upcycling_seed=0,
        hub_id=None,
        datasets=("brWaC",),
        description="BERTimbau base with 8 experts in every other layer, Switch (top-1) routing.",
        notes=f"{_UNPUBLISHED} {_LICENSE_CHECK}",
        citations=(_CITE_BERTIMBAU, _CITE_UPCYCLING, _CITE_SWITCH, _CITE_STMOE),
    ),
    ZooEntry(
        name="moe-bertimbau-base-switch-16e",
        family="moe_bert",
        architecture="MoeBertForMaskedLM",
        pipeline_tag="fill-mask",
        dense_source="neuralmind/bert-base-portuguese-cased",
        dense_architecture="BertForMaskedLM",
        dense_license="mit",
        dense_config=_BERTIMBAU_BASE,
        tokenizer="neuralmind/bert-base-portuguese-cased",
        num_experts=16,
        num_experts_per_tok=1,
        router_type="switch",
        moe_layers={"moe_layers": 2},
        router_config=_SWITCH_ROUTER,
        upcycling_method="copy",
        upcycling_seed=0,
        hub_id=None,
        datasets=("brWaC",),
        description="BERTimbau base with 16 experts in every other layer, Switch (top-1) routing.",
        notes=f"{_UNPUBLISHED} {_LICENSE_CHECK}",
        citations=(_CITE_BERTIMBAU, _CITE_UPCYCLING, _CITE_SWITCH, _CITE_STMOE),
    ),
    # ---------------------------------------------------------------- MoE-BERTimbau large (335M dense)
    ZooEntry(
        name="moe-bertimbau-large-top2-8e",
        family="moe_bert",
        architecture="MoeBertForMaskedLM",
        pipeline_tag="fill-mask",
        dense_source="neuralmind/bert-large-portuguese-cased",
        dense_architecture="BertForMaskedLM",
        dense_license="mit",
        dense_config=_BERTIMBAU_LARGE,
        tokenizer="neuralmind/bert-large-portuguese-cased",
        num_experts=8,
        num_experts_per_tok=2,
        router_type="topk",
        moe_layers={"moe_layers": 2},
        router_config=_TOP2_ROUTER,
        upcycling_method="copy",
        upcycling_seed=0,
        hub_id=None,
        datasets=("brWaC",),
        description="BERTimbau large with 8 experts in every other layer, top-2 routing.",
        notes=f"{_UNPUBLISHED} {_LICENSE_CHECK}",
        citations=(_CITE_BERTIMBAU, _CITE_UPCYCLING),
    ),
    ZooEntry(
        name="moe-bertimbau-large-switch-8e",
        family="moe_bert",
        architecture="MoeBertForMaskedLM",
        pipeline_tag="fill-mask",
        dense_source="neuralmind/bert-large-portuguese-cased",
        dense_architecture="BertForMaskedLM",
        dense_license="mit",
        dense_config=_BERTIMBAU_LARGE,
        tokenizer="neuralmind/bert-large-portuguese-cased",
        num_experts=8,
        num_experts_per_tok=1,
        router_type="switch",
        moe_layers={"moe_layers": 2},
        router_config=_SWITCH_ROUTER,
        upcycling_method="copy",
        upcycling_seed=0,
        hub_id=None,
        datasets=("brWaC",),
        description="BERTimbau large with 8 experts in every other layer, Switch (top-1) routing.",
        notes=f"{_UNPUBLISHED} {_LICENSE_CHECK}",
        citations=(_CITE_BERTIMBAU, _CITE_UPCYCLING, _CITE_SWITCH, _CITE_STMOE),
    ),
    # ---------------------------------------------------------------- MoE-PTT5 base (T5 v1.0, 223M dense)
    ZooEntry(
        name="moe-ptt5-base-top2-8e",
        family="moe_t5",
        architecture="MoeT5ForConditionalGeneration",
        pipeline_tag="text2text-generation",
        dense_source="unicamp-dl/ptt5-base-portuguese-vocab",
        dense_architecture="T5ForConditionalGeneration",
        dense_license="mit",
        dense_config=_T5_V1_0_BASE,
        tokenizer="unicamp-dl/ptt5-base-portuguese-vocab",
        num_experts=8,
        num_experts_per_tok=2,
        router_type="topk",
        moe_layers={"encoder_moe_layers": 2, "decoder_moe_layers": 2},
        router_config=_TOP2_ROUTER,
        upcycling_method="copy",
        upcycling_seed=0,
        hub_id=None,
        datasets=("brWaC",),
        description="PTT5 base (T5 v1.0, Portuguese vocabulary), 8 experts in every other encoder and decoder "
        "layer, top-2 routing.",
        notes=f"{_UNPUBLISHED} {_LICENSE_CHECK}",
        citations=(_CITE_PTT5, _CITE_UPCYCLING),
    ),
    ZooEntry(
        name="moe-ptt5-base-switch-8e",
        family="moe_t5",
        architecture="MoeT5ForConditionalGeneration",
        pipeline_tag="text2text-generation",
        dense_source="unicamp-dl/ptt5-base-portuguese-vocab",
        dense_architecture="T5ForConditionalGeneration",
        dense_license="mit",
        dense_config=_T5_V1_0_BASE,
        tokenizer="unicamp-dl/ptt5-base-portuguese-vocab",
        num_experts=8,
        num_experts_per_tok=1,
        router_type="switch",
        moe_layers={"encoder_moe_layers": 2, "decoder_moe_layers": 2},
        router_config=_SWITCH_ROUTER,
        upcycling_method="copy",
        upcycling_seed=0,
        hub_id=None,
        datasets=("brWaC",),
        description="PTT5 base (T5 v1.0, Portuguese vocabulary), 8 experts in every other encoder and decoder "
        "layer, Switch (top-1) routing.",
        notes=f"{_UNPUBLISHED} {_LICENSE_CHECK}",
        citations=(_CITE_PTT5, _CITE_UPCYCLING, _CITE_SWITCH, _CITE_STMOE),
    ),
    ZooEntry(
        name="moe-ptt5-base-switch-16e",
        family="moe_t5",
        architecture="MoeT5ForConditionalGeneration",
        pipeline_tag="text2text-generation",
        dense_source="unicamp-dl/ptt5-base-portuguese-vocab",
        dense_architecture="T5ForConditionalGeneration",
        dense_license="mit",
        dense_config=_T5_V1_0_BASE,
        tokenizer="unicamp-dl/ptt5-base-portuguese-vocab",
        num_experts=16,
        num_experts_per_tok=1,
        router_type="switch",
        moe_layers={"encoder_moe_layers": 2, "decoder_moe_layers": 2},
        router_config=_SWITCH_ROUTER,
        upcycling_method="copy",
        upcycling_seed=0,
        hub_id=None,
        datasets=("brWaC",),
        description="PTT5 base (T5 v1.0, Portuguese vocabulary), 16 experts in every other encoder and decoder "
        "layer, Switch (top-1) routing.",
        notes=f"{_UNPUBLISHED} {_LICENSE_CHECK}",
        citations=(_CITE_PTT5, _CITE_UPCYCLING, _CITE_SWITCH, _CITE_STMOE),
    ),
    # ---------------------------------------------------------------- MoE-PTT5-v2 base
    ZooEntry(
        name="moe-ptt5-v2-base-top2-8e",
        family="moe_t5",
        architecture="MoeT5ForConditionalGeneration",
        pipeline_tag="text2text-generation",
        dense_source="unicamp-dl/ptt5-v2-base",
        dense_architecture="T5ForConditionalGeneration",
        dense_license="apache-2.0",
        dense_config=_T5_V1_0_BASE,
        tokenizer="unicamp-dl/ptt5-v2-base",
        num_experts=8,
        num_experts_per_tok=2,
        router_type="topk",
        moe_layers={"encoder_moe_layers": 2, "decoder_moe_layers": 2},
        router_config=_TOP2_ROUTER,
        upcycling_method="copy",
        upcycling_seed=0,
        hub_id=None,
        datasets=("allenai/c4", "legacy-datasets/mc4"),
        description="PTT5-v2 base, 8 experts in every other encoder and decoder layer, top-2 routing.",
        notes=f"{_UNPUBLISHED} {_LICENSE_CHECK} {_PTT5_V2_SHAPE}",
        citations=(_CITE_PTT5_V2, _CITE_UPCYCLING),
    ),
    ZooEntry(
        name="moe-ptt5-v2-base-switch-8e",
        family="moe_t5",
        architecture="MoeT5ForConditionalGeneration",
        pipeline_tag="text2text-generation",
        dense_source="unicamp-dl/ptt5-v2-base",
        dense_architecture="T5ForConditionalGeneration",
        dense_license="apache-2.0",
        dense_config=_T5_V1_0_BASE,
        tokenizer="unicamp-dl/ptt5-v2-base",
        num_experts=8,
        num_experts_per_tok=1,
        router_type="switch",
        moe_layers={"encoder_moe_layers": 2, "decoder_moe_layers": 2},
        router_config=_SWITCH_ROUTER,
        upcycling_method="copy",
        upcycling_seed=0,
        hub_id=None,
        datasets=("allenai/c4", "legacy-datasets/mc4"),
        description="PTT5-v2 base, 8 experts in every other encoder and decoder layer, Switch (top-1) routing.",
        notes=f"{_UNPUBLISHED} {_LICENSE_CHECK} {_PTT5_V2_SHAPE}",
        citations=(_CITE_PTT5_V2, _CITE_UPCYCLING, _CITE_SWITCH, _CITE_STMOE),
    ),
    ZooEntry(
        name="moe-ptt5-v2-base-switch-16e",
        family="moe_t5",
        architecture="MoeT5ForConditionalGeneration",
        pipeline_tag="text2text-generation",
        dense_source="unicamp-dl/ptt5-v2-base",
        dense_architecture="T5ForConditionalGeneration",
        dense_license="apache-2.0",
        dense_config=_T5_V1_0_BASE,
        tokenizer="unicamp-dl/ptt5-v2-base",
        num_experts=16,
        num_experts_per_tok=1,
        router_type="switch",
        moe_layers={"encoder_moe_layers": 2, "decoder_moe_layers": 2},
        router_config=_SWITCH_ROUTER,
        upcycling_method="copy",
        upcycling_seed=0,
        hub_id=None,
        datasets=("allenai/c4", "legacy-datasets/mc4"),
        description="PTT5-v2 base, 16 experts in every other encoder and decoder layer, Switch (top-1) routing.",
        notes=f"{_UNPUBLISHED} {_LICENSE_CHECK} {_PTT5_V2_SHAPE}",
        citations=(_CITE_PTT5_V2, _CITE_UPCYCLING, _CITE_SWITCH, _CITE_STMOE),
    ),
)


def _build_registry(entries: tuple[ZooEntry, ...]) -> Mapping[str, ZooEntry]:
    registry: dict[str, ZooEntry] = {}
    for entry in entries:
        if entry.name in registry:
            raise RuntimeError(f"duplicate zoo entry name {entry.name!r}")
        registry[entry.name] = entry
    return MappingProxyType(registry)


MODEL_REGISTRY: Mapping[str, ZooEntry] = _build_registry(_ENTRIES)


# --------------------------------------------------------------------------------------------------------------
# Lookup
# --------------------------------------------------------------------------------------------------------------
def list_models(pattern: str | None = None) -> list[str]:
    """Names of the registered variants, sorted, optionally filtered by a shell-style pattern.

    Args:
        pattern (`str`, *optional*): an `fnmatch` pattern such as `"moe-ptt5-*"` or `"*switch*"`
            (case-insensitive). `None` lists every variant.
    """
    names = sorted(MODEL_REGISTRY)
    if pattern is None:
        return names
    pattern = pattern.lower()
    return [name for name in names if fnmatch.fnmatchcase(name, pattern)]


def get_model_info(name: str | ZooEntry) -> ZooEntry:
    """The registry entry of `name` (an entry is returned as it is).

    Args:
        name (`str`): a name from `list_models()`.

    Raises:
        UnknownModelError: for an unregistered name; the message lists the closest registered names.
    """
    if isinstance(name, ZooEntry):
        return name
    entry = MODEL_REGISTRY.get(name)
    if entry is not None:
        return entry
    close = difflib.get_close_matches(str(name), list(MODEL_REGISTRY), n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UnknownModelError(
        f"Unknown ptmoe model {name!r}.{hint} `ptmoe.list_models()` (or `ptmoe list`) shows the "
        f"{len(MODEL_REGISTRY)} registered names."
    )


def _config_class(family: str):
    module_name, class_name, _ = _FAMILIES[family]
    return getattr(importlib.import_module(module_name), class_name)


def _model_class(entry: ZooEntry):
    _, _, module_name = _FAMILIES[entry.family]
    return getattr(importlib.import_module(module_name), entry.architecture)


def create_config(name: str, **config_overrides):
    """The MoE config of a registered variant at its full size, with `config_overrides` applied last.

    Args:
        name (`str`): a name from `list_models()`.
        config_overrides: any config field, e.g. tiny sizes for tests (`hidden_size=32, num_hidden_layers=2`).
    """
    entry = get_model_info(name)
    kwargs = {**entry.dense_config, **entry.moe_settings(), "architectures": [entry.architecture]}
    return _config_class(entry.family)(**{**kwargs, **config_overrides})


@functools.cache
def _registered_counts(name: str) -> tuple[tuple[str, int], ...]:
    # Full-size counts of a registered entry never change within a process: `ptmoe list` and `ptmoe cards` share them.
    return tuple(parameter_counts(name, config=create_config(name)).items())


def parameter_counts(name: str | ZooEntry, config=None, **config_overrides) -> dict[str, int]:
    """Total and per-token active parameters of a variant and of its dense source, without allocating weights.

    Both models are built on the `meta` device, so a full-size count costs no memory.

    Args:
        name (`str` or `ZooEntry`): a name from `list_models()` (or an entry).
        config (*optional*): the MoE config to count (default: `create_config(name, **config_overrides)`).
        config_overrides: as in `create_config`.

    Returns:
        `{"total": ..., "active": ..., "dense": ...}`.
    """
    import transformers

    from .models.moe import count_parameters

    entry = get_model_info(name)
    if config is None and not config_overrides and MODEL_REGISTRY.get(entry.name) == entry:
        return dict(_registered_counts(entry.name))
    if config is None:
        config = create_config(entry.name, **config_overrides)
    dense_class = getattr(transformers, entry.dense_architecture)
    dense_kwargs = {k: v for k, v in config.to_dict().items() if k in DENSE_CONFIG_KEYS[entry.family]}
    model_class = getattr(importlib.import_module(_FAMILIES[entry.family][2]), entry.architecture)
    with torch.device("meta"):
        model = model_class(config)
        dense = dense_class(dense_class.config_class(**dense_kwargs))
    counts = count_parameters(model)
    counts["dense"] = sum(p.numel() for p in dense.parameters())
    return counts


# --------------------------------------------------------------------------------------------------------------
# Building models
# --------------------------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """Where upcycled zoo models are cached: `$PTMOE_CACHE`, else `~/.cache/ptmoe`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ptmoe").expanduser()


def _source_fingerprint(source: str) -> dict[str, Any]:
    """What identifies a dense source: the Hub id, or for a local folder its config and its files' size/mtime.

    A local folder is fingerprinted by the content of `config.json` plus the name, size and modification time of
    every file: re-saving or editing the weights changes the key, without hashing gigabytes on every call.
    """
    path = Path(source)
    if not path.is_dir():
        return {"hub_id": source}
    files = sorted(p for p in path.rglob("*") if p.is_file())
    config = path / "config.json"
    return {
        "local_folder": str(path.resolve()),
        "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None,
        "files": [[str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns] for p in files],
    }


# The dense head `ptmoe.upcycle` loads for each task class (its `task=` argument), so the result is always the
# entry's architecture, whatever head the source checkpoint declares.
_UPCYCLING_TASKS = {"MoeBertForMaskedLM": "masked-lm", "MoeT5ForConditionalGeneration": "seq2seq-lm"}


def _upcycle_kwargs(entry: ZooEntry, config_overrides: Mapping[str, Any]) -> dict[str, Any]:
    return {
        **entry.moe_settings(),
        "method": entry.upcycling_method,
        "seed": entry.upcycling_seed,
        "task": _UPCYCLING_TASKS[entry.architecture],
        **config_overrides,
    }


def cache_key(name: str, source: str | None = None, **config_overrides) -> str:
    """The cache folder name of an upcycled variant: `<name>-<sha256 of source and settings, 16 hex digits>`.

    Args:
        name (`str`): a name from `list_models()`.
        source (`str`, *optional*): the dense source (default: the entry's `dense_source`).
        config_overrides: the overrides passed to `create_model`.
    """
    from . import __version__

    entry = get_model_info(name)
    payload = {
        "name": entry.name,
        "architecture": entry.architecture,
        "source": _source_fingerprint(source or entry.dense_source),
        "upcycle": _upcycle_kwargs(entry, config_overrides),
        # The upcycling code may change between releases: a new version never reuses an old cache entry.
        "ptmoe_version": __version__,
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
    return f"{entry.name}-{digest[:16]}"


def _check_source_shape(entry: ZooEntry, model) -> None:
    """Warn when a `source=` folder has another shape than the registered dense checkpoint."""
    config = model.config.to_dict()
    different = {
        key: (config[key], value)
        for key, value in entry.dense_config.items()
        if key in config and isinstance(value, int) and not isinstance(value, bool) and config[key] != value
    }
    if different:
        shown = ", ".join(
            f"{k}={got} (registered {want})" for k, (got, want) in sorted(different.items())[:4]
        )
        logger.warning(
            "%s: the dense source has another shape than the registered %s (%s); the result is not the "
            "registered variant.",
            entry.name,
            entry.dense_source,
            shown,
        )


def _save_to_cache(model, entry: ZooEntry, source: str, target: Path, config_overrides: Mapping[str, Any]):
    """Save `model` and the source's tokenizer to `target` (all or nothing), then the provenance file.

    The provenance file is written last and marks the entry as complete: a folder without it (a crash in
    between) is upcycled again.
    """
    from .upcycling import save_upcycled

    save_upcycled(model, target, overwrite=True)
    provenance = {
        "zoo_name": entry.name,
        "source": source,
        "dense_source": entry.dense_source,
        "upcycle": _upcycle_kwargs(entry, config_overrides),
    }
    staging = target / f".{_PROVENANCE_FILE}.partial"
    staging.write_text(json.dumps(provenance, indent=2, default=str) + "\n")
    os.replace(staging, target / _PROVENANCE_FILE)


def create_model(
    name: str, pretrained: bool = False, source: str | os.PathLike | None = None, **config_overrides
):
    r"""
    Build a registered MoE variant.

    Args:
        name (`str`):
            A name from `list_models()`, e.g. `"moe-bertimbau-base-top2-8e"`.
        pretrained (`bool`, defaults to `False`):
            `False`: the architecture with random weights, at the registered size (no download).
            `True`: the published MoE checkpoint (`hub_id`) when there is one; otherwise the dense source is
            upcycled with `ptmoe.upcycle` using the entry's recipe, and the result is cached under
            `cache_dir()/<cache_key>` so the next call only loads it.
        source (`str` or `os.PathLike`, *optional*):
            With `pretrained=True`, a local dense folder (or another Hub id) to upcycle instead of the entry's
            `dense_source`. This is how the zoo is used offline.
        config_overrides:
            Config fields applied last: sizes for tiny test models with `pretrained=False`, or MoE/router options
            (e.g. `router_jitter_noise`) with `pretrained=True`.

    Returns:
        A ptmoe model of class `entry.architecture` (e.g. `MoeBertForMaskedLM`).

    Example:

    ```python
    >>> tiny = ptmoe.create_model("moe-bertimbau-base-top2-8e", hidden_size=32, num_hidden_layers=2,
    ...                           num_attention_heads=4, intermediate_size=37, vocab_size=99)
    >>> model = ptmoe.create_model("moe-bertimbau-base-top2-8e", pretrained=True, source="./bertimbau-base")
    ```
    """
    entry = get_model_info(name)
    if not pretrained:
        if source is not None:
            raise ValueError(
                "`source=` names dense weights to upcycle and only applies with `pretrained=True`; "
                "`pretrained=False` builds random weights."
            )
        return _model_class(entry)(create_config(entry.name, **config_overrides))

    model_class = _model_class(entry)
    if entry.hub_id is not None and source is None:
        return model_class.from_pretrained(entry.hub_id, **config_overrides)

    source = os.fspath(source) if source is not None else entry.dense_source
    target = cache_dir() / cache_key(entry.name, source, **config_overrides)
    if (target / _PROVENANCE_FILE).is_file():
        logger.info("Loading %s from the cache %s", entry.name, target)
        return model_class.from_pretrained(target)

    from .upcycling import upcycle

    logger.info("Upcycling %s from %s (cached at %s)", entry.name, source, target)
    model = upcycle(source, **_upcycle_kwargs(entry, config_overrides))
    if type(model).__name__ != entry.architecture:
        raise TypeError(
            f"{entry.name}: upcycling {source} gave a {type(model).__name__}, but the entry is a "
            f"{entry.architecture}; the source must be a {entry.dense_architecture} checkpoint."
        )
    _check_source_shape(entry, model)
    _save_to_cache(model, entry, source, target, config_overrides)
    return model


# --------------------------------------------------------------------------------------------------------------
# The `ptmoe list` table
# --------------------------------------------------------------------------------------------------------------
def _millions(count: int) -> str:
    return f"{count / 1e6:,.0f}M"


def _layers_text(entry: ZooEntry) -> str:
    def one(spec) -> str:
        if not isinstance(spec, int):
            return ",".join(map(str, spec)) or "none"
        suffix = {1: "st", 2: "nd", 3: "rd"}.get(spec % 10 if spec % 100 not in (11, 12, 13) else 0, "th")
        return "every" if spec == 1 else f"every {spec}{suffix}"

    if "moe_layers" in entry.moe_layers:
        return one(entry.moe_layers["moe_layers"])
    return f"enc {one(entry.moe_layers['encoder_moe_layers'])} / dec {one(entry.moe_layers['decoder_moe_layers'])}"


def models_table(pattern: str | None = None, with_counts: bool = True) -> str:
    """The registry as a fixed-width text table (what `ptmoe list` prints).

    Args:
        pattern (`str`, *optional*): as in `list_models`.
        with_counts (`bool`, defaults to `True`): add total / active parameter columns (computed on `meta`).
    """
    header = ["name", "architecture", "dense source", "license", "router", "E", "k", "MoE layers"]
    if with_counts:
        header += ["total", "active"]
    header.append("published")
    rows = [header]
    for name in list_models(pattern):
        entry = MODEL_REGISTRY[name]
        row = [
            entry.name,
            entry.architecture,
            entry.dense_source,
            entry.dense_license,
            entry.router_type,
            str(entry.num_experts),
            str(entry.num_experts_per_tok),
            _layers_text(entry),
        ]
        if with_counts:
            counts = parameter_counts(name)
            row += [_millions(counts["total"]), _millions(counts["active"])]
        row.append(entry.hub_id or "no")
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


__all__ = [
    "MODEL_REGISTRY",
    "UnknownModelError",
    "ZooEntry",
    "cache_dir",
    "cache_key",
    "create_config",
    "create_model",
    "get_model_info",
    "list_models",
    "models_table",
    "parameter_counts",
]
