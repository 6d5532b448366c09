"""The MoE config fields live once (`MoeConfigMixin`): both configs accept, default and serialise the same fields,
and their docstrings document each field once, from the same text."""

from __future__ import annotations

import dataclasses

import pytest

import ptmoe
from ptmoe.models.moe import MOE_FIELDS_DOCSTRING, MoeConfigMixin

MOE_FIELDS = {field.name: field.default for field in dataclasses.fields(MoeConfigMixin)}
CONFIGS = (ptmoe.MoeBertConfig, ptmoe.MoeT5Config)
# Non-default values every field accepts in both configs (with a router that uses them all).
VALUES = {
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "router_type": "hierarchical",
    "capacity_factor": 1.5,
    "eval_capacity_factor": 3.0,
    "expert_capacity": 7,
    "router_jitter_noise": 0.02,
    "router_aux_loss_coef": 0.02,
    "router_z_loss_coef": 0.002,
    "router_importance_loss_coef": 0.1,
    "router_domain_loss_coef": 0.3,
    "norm_topk_prob": False,
    "num_shared_experts": 1,
    "expert_intermediate_size": 16,
    "shared_expert_intermediate_size": 8,
    "combine_weights": "router",
    "router_top_p": None,
    "router_init": "zeros",
    "output_router_logits": True,
    "expert_capacity_factor": None,
    "router_groups": 2,
    "num_groups_per_tok": 1,
    "expert_dropout": 0.1,
    "upcycled_from": "neuralmind/bert-base-portuguese-cased",
    "upcycling_method": "drop",
    "upcycling_seed": 3,
    "expert_names": ["legal", "legal", "news", "news"],
}


def test_the_mixin_declares_every_moe_field_once():
    assert set(VALUES) == set(MOE_FIELDS)  # this test names every shared field
    for config_class in CONFIGS:
        own = set(config_class.__dict__.get("__annotations__", {}))
        assert not own & set(MOE_FIELDS), (
            f"{config_class.__name__} re-declares {sorted(own & set(MOE_FIELDS))}"
        )


@pytest.mark.parametrize("config_class", CONFIGS, ids=lambda c: c.__name__)
def test_both_configs_have_the_same_defaults(config_class):
    config = config_class()
    assert {name: getattr(config, name) for name in MOE_FIELDS} == MOE_FIELDS


@pytest.mark.parametrize("config_class", CONFIGS, ids=lambda c: c.__name__)
def test_both_configs_serialise_every_moe_field(config_class, tmp_path):
    config = config_class(**VALUES)
    as_dict = config.to_dict()
    assert {name: as_dict[name] for name in MOE_FIELDS} == VALUES
    again = config_class.from_dict(as_dict)
    assert {name: getattr(again, name) for name in MOE_FIELDS} == VALUES
    config.save_pretrained(tmp_path)
    loaded = config_class.from_pretrained(tmp_path)
    assert {name: getattr(loaded, name) for name in MOE_FIELDS} == VALUES


@pytest.mark.parametrize("config_class", CONFIGS, ids=lambda c: c.__name__)
def test_both_configs_validate_the_shared_fields_alike(config_class):
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        config_class(num_experts=2, num_experts_per_tok=3)


@pytest.mark.parametrize("config_class", CONFIGS, ids=lambda c: c.__name__)
def test_docstrings_document_each_field_once_from_the_shared_text(config_class):
    doc = config_class.__doc__
    assert MOE_FIELDS_DOCSTRING in doc and "MOE_FIELDS" not in doc.replace("MOE_FIELDS_DOCSTRING", "")
    for name in MOE_FIELDS:
        lines = [
            line
            for line in doc.splitlines()
            if line.lstrip().startswith(f"{name} (") or f"/ {name} (" in line
        ]
        lines += [line for line in doc.splitlines() if line.lstrip().startswith(f"{name} /")]
        lines += [line for line in doc.splitlines() if f"/ {name}:" in line or f"/ {name} /" in line]
        assert len(lines) == 1, f"{config_class.__name__} documents {name!r} {len(lines)} times"
