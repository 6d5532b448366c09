"""LoRA per expert (ptmoe/lora.py): target selection, trainable parameters, expert selection, SVD merging.

Every test that is about "any ptmoe model" is parametrised over `ptmoe.auto.REGISTRY`, so new families are covered
as soon as they are registered (`tiny_model` holds one tiny config per family).
"""

from __future__ import annotations

import inspect
import re

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from torch import nn

import ptmoe
from ptmoe.auto import REGISTRY

# Tiny configs per family: hidden 64 so that bitsandbytes 4-bit blocks (64 weights) divide every weight matrix.
TINY = {
    "moe_bert": dict(
        vocab_size=99,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        num_experts=4,
        num_experts_per_tok=2,
        moe_layers=[1, 2],  # layer 0 stays dense
        num_labels=3,
    ),
    "moe_t5": dict(
        vocab_size=99,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_heads=4,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_start_token_id=0,
        pad_token_id=0,
    ),
}
CONFIG_OF = {model_class: config_class for config_class, models in REGISTRY for _, model_class in models}
ALL_CLASSES = list(CONFIG_OF)
EXPERT_LINEAR = re.compile(r".*\.experts\.\d+\.(?:wi|wi_0|wi_1|wo)")


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(model_class, seed: int = 0, **overrides) -> nn.Module:
    """A tiny `model_class` in eval mode, with pretrained-like linear weights.

    Linear weights are re-drawn from N(0, 0.02) (BERT's initializer range) whatever the family's random init,
    except output projections tied to the input embeddings, which keep the family's embedding init: the accuracy
    tests measure quantization error, which depends on the weight distribution.
    """
    config_class = CONFIG_OF[model_class]
    if config_class.model_type not in TINY:
        raise KeyError(
            f"Add a tiny config for model_type {config_class.model_type!r} to tests/test_lora.py:TINY"
        )
    kwargs = {**TINY[config_class.model_type], **overrides}
    if model_class.__name__.endswith("ForQuestionAnswering"):
        kwargs["num_labels"] = 2
    torch.manual_seed(seed)
    model = model_class(config_class(**kwargs))
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    with torch.no_grad():
        for module in model.modules():
            if type(module) is nn.Linear and id(module.weight) not in embeddings:
                module.weight.normal_(0.0, 0.02)
    return model.eval()


def model_inputs(model: nn.Module, batch: int = 2, seq: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs for any ptmoe class (decoder inputs for seq2seq models); the 2nd sequence ends with padding."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, 99, (batch, seq), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -3:] = 0
    input_ids[1, -3:] = 0
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    if "decoder_input_ids" in inspect.signature(type(base).forward).parameters:
        inputs["decoder_input_ids"] = torch.randint(1, 99, (batch, 5), generator=g)
    return inputs


def main_output(outputs) -> torch.Tensor:
    """The first floating tensor of rank >= 2 (last_hidden_state, logits or start_logits)."""
    return next(
        v for v in outputs.values() if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() >= 2
    )


def expert_linear_names(model: nn.Module) -> set[str]:
    """Names of the expert projections, read from the model itself (the reference for the selection tests)."""
    return {name for name, module in model.named_modules() if EXPERT_LINEAR.fullmatch(name)}


def lora_layers(peft_model: PeftModel) -> dict[str, LoraLayer]:
    """LoRA-wrapped modules by name relative to the transformers model."""
    return {name: m for name, m in peft_model.get_base_model().named_modules() if isinstance(m, LoraLayer)}


def class_id(model_class) -> str:
    return model_class.__name__


# ---------------------------------------------------------------------------------------------------- targets


@pytest.mark.parametrize("model_class", ALL_CLASSES, ids=class_id)
def test_one_adapter_on_every_expert_projection_and_nothing_else(model_class):
    model = tiny_model(model_class)
    expected = expert_linear_names(model)
    peft_model = get_peft_model(model, ptmoe.expert_lora_config(model))
    layers = lora_layers(peft_model)
    assert set(layers) == expected
    assert all(list(layer.lora_A) == ["default"] for layer in layers.values())


def test_selected_experts_and_projections_only():
    model = tiny_model(ptmoe.MoeBertModel)
    config = ptmoe.expert_lora_config(model, experts={1: [0, 2], 2: [3]}, projections=["wo"])
    peft_model = get_peft_model(model, config)
    assert set(lora_layers(peft_model)) == {
        "encoder.layer.1.moe.experts.0.wo",
        "encoder.layer.1.moe.experts.2.wo",
        "encoder.layer.2.moe.experts.3.wo",
    }


def test_seq2seq_layer_keys_select_encoder_and_decoder_experts():
    model_class = next((c for c in ALL_CLASSES if c.__name__ == "MoeT5ForConditionalGeneration"), None)
    if model_class is None:
        pytest.skip("MoE-T5 is not registered")
    model = tiny_model(model_class)
    keys = [layer.key for layer in ptmoe.moe_layers(model)]
    assert keys and all(re.fullmatch(r"(?:encoder|decoder)\.\d+", k) for k in keys)
    selection = {keys[0]: [1], keys[-1]: [2]}
    peft_model = get_peft_model(model, ptmoe.expert_lora_config(model, experts=selection))
    by_layer = {layer.key: layer.name for layer in ptmoe.moe_layers(model)}
    assert set(lora_layers(peft_model)) == {
        f"{by_layer[key]}.experts.{expert}.{proj}"
        for key, experts in selection.items()
        for expert in experts
        for proj in ("wi", "wo")
    }


def test_attention_projections_on_request():
    model = tiny_model(ptmoe.MoeBertModel)
    peft_model = get_peft_model(
        model, ptmoe.expert_lora_config(model, experts={1: [0]}, include_attention=True)
    )
    attention = {
        f"encoder.layer.{layer}.attention.{proj}"
        for layer in range(3)
        for proj in ("self.query", "self.key", "self.value", "output.dense")
    }
    experts = {"encoder.layer.1.moe.experts.0.wi", "encoder.layer.1.moe.experts.0.wo"}
    assert set(lora_layers(peft_model)) == attention | experts


def test_shared_experts_on_request():
    model = tiny_model(ptmoe.MoeBertModel, num_shared_experts=1)
    peft_model = get_peft_model(
        model, ptmoe.expert_lora_config(model, experts={2: [1]}, include_shared_experts=True)
    )
    assert set(lora_layers(peft_model)) == {
        "encoder.layer.2.moe.experts.1.wi",
        "encoder.layer.2.moe.experts.1.wo",
        "encoder.layer.2.moe.shared_experts.0.wi",
        "encoder.layer.2.moe.shared_experts.0.wo",
    }


def test_rank_pattern_gives_an_expert_its_own_rank():
    model = tiny_model(ptmoe.MoeBertModel)
    config = ptmoe.expert_lora_config(model, r=8, experts={1: [0, 1]}, rank_pattern={(1, 1): 2})
    layers = lora_layers(get_peft_model(model, config))
    ranks = {name: layer.r["default"] for name, layer in layers.items()}
    assert ranks == {
        "encoder.layer.1.moe.experts.0.wi": 8,
        "encoder.layer.1.moe.experts.0.wo": 8,
        "encoder.layer.1.moe.experts.1.wi": 2,
        "encoder.layer.1.moe.experts.1.wo": 2,
    }


def test_peft_style_rank_pattern_is_passed_through():
    model = tiny_model(ptmoe.MoeBertModel)
    config = ptmoe.expert_lora_config(model, experts={1: [0]}, rank_pattern={r"experts\.0\.wo": 4})
    layers = lora_layers(get_peft_model(model, config))
    assert layers["encoder.layer.1.moe.experts.0.wo"].r["default"] == 4
    assert layers["encoder.layer.1.moe.experts.0.wi"].r["default"] == 8


# ---------------------------------------------------------------------------------------------------- trainable


def _head_names(peft_model: PeftModel) -> set[str]:
    return {name for name, m in peft_model.named_modules() if isinstance(m, ModulesToSaveWrapper)}


@pytest.mark.parametrize("model_class", ALL_CLASSES, ids=class_id)
def test_only_lora_and_head_parameters_require_grad(model_class):
    model = tiny_model(model_class)
    peft_model = get_peft_model(model, ptmoe.expert_lora_config(model))
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable
    for name in trainable:
        assert ".lora_A." in name or ".lora_B." in name or ".modules_to_save.default." in name, name
    # Only task heads are fully trained by default, never a router.
    assert not any("router" in name for name in _head_names(peft_model))


@pytest.mark.parametrize(
    "class_name, task_type, heads",
    [
        ("MoeBertModel", None, set()),
        ("MoeBertForMaskedLM", None, set()),  # the MLM decoder is tied to the embeddings: not trained
        ("MoeBertForSequenceClassification", "SEQ_CLS", {"classifier"}),
        ("MoeBertForTokenClassification", "TOKEN_CLS", {"classifier"}),
        ("MoeBertForQuestionAnswering", "QUESTION_ANS", {"qa_outputs"}),
        ("MoeT5ForConditionalGeneration", "SEQ_2_SEQ_LM", set()),
    ],
)
def test_task_models_get_their_task_type_and_trainable_head(class_name, task_type, heads):
    model_class = next((c for c in ALL_CLASSES if c.__name__ == class_name), None)
    if model_class is None:
        pytest.skip(f"{class_name} is not registered")
    model = tiny_model(model_class)
    config = ptmoe.expert_lora_config(model)
    assert config.task_type == task_type
    peft_model = get_peft_model(model, config)
    wrapped = {name.removeprefix("base_model.model.") for name in _head_names(peft_model)}
    assert wrapped == heads


def test_train_router_makes_selected_routers_trainable():
    model = tiny_model(ptmoe.MoeBertModel)
    peft_model = get_peft_model(model, ptmoe.expert_lora_config(model, experts={2: "all"}, train_router=True))
    trainable_routers = {
        name for name, p in peft_model.named_parameters() if p.requires_grad and ".router." in name
    }
    assert trainable_routers == {"base_model.model.encoder.layer.2.moe.router.modules_to_save.default.weight"}


@pytest.mark.parametrize("model_class", ALL_CLASSES, ids=class_id)
@pytest.mark.parametrize("train_router", [False, True], ids=["frozen-router", "trained-router"])
def test_training_step_changes_only_trainable_parameters(model_class, train_router):
    model = tiny_model(model_class)
    config = ptmoe.expert_lora_config(model, train_router=train_router, init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    peft_model.train()
    before = {name: p.detach().clone() for name, p in peft_model.named_parameters()}
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    outputs = peft_model(**model_inputs(peft_model))
    # Every ptmoe output has the total `aux_loss`; the routers also get gradients through the combine weights.
    loss = main_output(outputs).pow(2).mean() + outputs.aux_loss
    loss.backward()
    optimizer.step()
    changed = {name for name, p in peft_model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and changed <= trainable
    assert any(".lora_" in name for name in changed)
    assert any(".router." in name for name in changed) == train_router


# ---------------------------------------------------------------------------------------------------- bad input


def test_selection_matching_no_module_raises():
    model = tiny_model(ptmoe.MoeBertModel)
    with pytest.raises(ValueError, match="matches no module"):
        ptmoe.expert_lora_config(model, experts={1: []})


def test_expert_id_out_of_range_raises():
    model = tiny_model(ptmoe.MoeBertModel)
    with pytest.raises(ValueError, match=r"Expert 4 of layer 1 is out of range: the layer has 4 experts"):
        ptmoe.expert_lora_config(model, experts={1: [0, 4]})


def test_layer_that_is_not_moe_raises():
    model = tiny_model(ptmoe.MoeBertModel)
    with pytest.raises(
        ValueError, match=r"Layer 0 is not an MoE layer of this model; its MoE layers are \[1, 2\]"
    ):
        ptmoe.expert_lora_config(model, experts={0: [0]})


def test_unknown_projection_raises():
    model = tiny_model(ptmoe.MoeBertModel)
    with pytest.raises(
        ValueError, match=r"Unknown expert projections \['wi_0'\]: the experts have \['wi', 'wo'\]"
    ):
        ptmoe.expert_lora_config(model, projections=["wi_0"])


def test_rank_pattern_outside_selection_raises():
    model = tiny_model(ptmoe.MoeBertModel)
    with pytest.raises(ValueError, match="not in the LoRA selection"):
        ptmoe.expert_lora_config(model, experts={1: [0]}, rank_pattern={(1, 3): 4})


def test_target_modules_cannot_be_overridden():
    model = tiny_model(ptmoe.MoeBertModel)
    with pytest.raises(TypeError, match="target_modules"):
        ptmoe.expert_lora_config(model, target_modules=["query"])


# ---------------------------------------------------------------------------------------------------- selection


def test_experts_for_coverage_takes_the_fewest_busiest_experts():
    counts = {1: torch.tensor([5, 50, 15, 30]), "decoder.0": [10, 10, 10, 10]}
    assert ptmoe.experts_for_coverage(counts, 0.8) == {1: [1, 3], "decoder.0": [0, 1, 2, 3]}
    assert ptmoe.experts_for_coverage(counts, 0.9) == {1: [1, 2, 3], "decoder.0": [0, 1, 2, 3]}
    assert ptmoe.experts_for_coverage(counts, 0.5) == {1: [1], "decoder.0": [0, 1]}  # ties: lower id first


def test_expert_token_counts_equal_the_models_expert_index():
    model = tiny_model(ptmoe.MoeBertModel)
    batches = [model_inputs(model, batch=3, seq=10, seed=seed) for seed in range(3)]
    counts = ptmoe.expert_token_counts(model, batches)
    expected = {1: torch.zeros(4, dtype=torch.long), 2: torch.zeros(4, dtype=torch.long)}
    with torch.no_grad():
        for batch in batches:
            outputs = model(**batch, output_router_logits=True)
            for key, index in zip((1, 2), outputs.expert_index, strict=True):
                expected[key] += torch.bincount(index[index >= 0], minlength=4)
    assert {k: v.tolist() for k, v in counts.items()} == {k: v.tolist() for k, v in expected.items()}
    real_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    assert all(
        int(c.sum()) == 2 * real_tokens for c in counts.values()
    )  # k=2 slots per real token, no padding


def test_select_experts_finds_the_hashed_experts():
    model = tiny_model(ptmoe.MoeBertModel, router_type="hash", num_experts_per_tok=1)
    table = model.encoder.layer[1].moe.router.hash_table
    tokens = [t for t in range(1, 99) if table[t] == 2][:6]
    input_ids = torch.tensor([tokens, tokens[:3] + [0, 0, 0]])  # padding (id 0) must not count
    attention_mask = (input_ids != 0).long()
    batches = [{"input_ids": input_ids, "attention_mask": attention_mask}]
    assert ptmoe.select_experts(model, batches, coverage=1.0) == {1: [2], 2: [2]}


@pytest.mark.parametrize("model_class", ALL_CLASSES, ids=class_id)
def test_selected_experts_feed_expert_lora_config(model_class):
    model = tiny_model(model_class)
    batches = [model_inputs(model, seed=seed) for seed in range(2)]
    selection = ptmoe.select_experts(model, batches, coverage=0.6)
    assert set(selection) == {layer.key for layer in ptmoe.moe_layers(model)}
    peft_model = get_peft_model(model, ptmoe.expert_lora_config(model, experts=selection))
    names = {layer.key: layer.name for layer in ptmoe.moe_layers(model)}
    assert set(lora_layers(peft_model)) == {
        f"{names[key]}.experts.{expert}.{proj}"
        for key, experts in selection.items()
        for expert in experts
        for proj in ("wi", "wo")
    }
    assert model.training is False  # the measuring pass restored the mode


def test_select_experts_sees_through_a_peft_model():
    model = tiny_model(ptmoe.MoeBertModel)
    batches = [model_inputs(model, seed=seed) for seed in range(2)]
    expected = ptmoe.select_experts(model, batches, coverage=0.7)
    peft_model = get_peft_model(model, ptmoe.expert_lora_config(model))  # LoRA B = 0: routing is unchanged
    assert ptmoe.select_experts(peft_model, batches, coverage=0.7) == expected


def test_coverage_out_of_range_raises():
    with pytest.raises(ValueError, match=r"`coverage` must be in \(0, 1\]"):
        ptmoe.experts_for_coverage({1: [1, 2]}, 1.5)


# ---------------------------------------------------------------------------------------------------- merging


def _two_adapter_model(experts_news=None, experts_legal=None, r_news=4, r_legal=4):
    """MoeBertModel with random (non-zero) LoRA adapters "news" and "legal"."""
    model = tiny_model(ptmoe.MoeBertModel)
    config_news = ptmoe.expert_lora_config(
        model, r=r_news, experts=experts_news or {1: [0, 1]}, init_lora_weights=False
    )
    peft_model = get_peft_model(model, config_news, adapter_name="news")
    torch.manual_seed(1)
    config_legal = ptmoe.expert_lora_config(
        model, r=r_legal, experts=experts_legal or {1: [0, 1]}, init_lora_weights=False
    )
    peft_model.add_adapter("legal", config_legal)
    return peft_model


def _delta(layer: LoraLayer, adapter: str) -> torch.Tensor:
    return layer.get_delta_weight(adapter).detach()


def test_merging_one_adapter_reproduces_it():
    peft_model = _two_adapter_model()
    ptmoe.merge_adapters(peft_model, ["news"], [1.0], "news_copy")
    for layer in lora_layers(peft_model).values():
        torch.testing.assert_close(_delta(layer, "news_copy"), _delta(layer, "news"), rtol=1e-5, atol=1e-7)
    inputs = model_inputs(peft_model)
    with torch.no_grad():
        peft_model.set_adapter("news")
        expected = peft_model(**inputs).last_hidden_state
        peft_model.set_adapter("news_copy")
        torch.testing.assert_close(peft_model(**inputs).last_hidden_state, expected, rtol=1e-5, atol=1e-6)


def test_merging_two_adapters_at_full_rank_is_the_weighted_sum():
    peft_model = _two_adapter_model(r_news=4, r_legal=3)
    ptmoe.merge_adapters(
        peft_model, ["news", "legal"], [0.7, -0.3], "mix", rank=7
    )  # rank(ΔW_news + ΔW_legal) <= 4 + 3
    for layer in lora_layers(peft_model).values():
        expected = 0.7 * _delta(layer, "news") - 0.3 * _delta(layer, "legal")
        torch.testing.assert_close(_delta(layer, "mix"), expected, rtol=1e-4, atol=1e-6)


def test_merge_truncation_error_is_the_discarded_singular_values():
    peft_model = _two_adapter_model(r_news=4, r_legal=4)
    ptmoe.merge_adapters(peft_model, ["news", "legal"], [0.5, 0.5], "mix3", rank=3)
    for layer in lora_layers(peft_model).values():
        target = 0.5 * _delta(layer, "news") + 0.5 * _delta(layer, "legal")
        singular_values = torch.linalg.svdvals(target)
        bound = singular_values[3:].pow(2).sum().sqrt()  # Eckart–Young: the best rank-3 error
        error = torch.linalg.matrix_norm(_delta(layer, "mix3") - target)
        assert layer.r["mix3"] == 3
        torch.testing.assert_close(error, bound, rtol=1e-3, atol=1e-7)


def test_merging_adapters_on_different_experts_covers_their_union():
    peft_model = _two_adapter_model(experts_news={1: [0]}, experts_legal={1: [1], 2: [3]})
    ptmoe.merge_adapters(peft_model, ["news", "legal"], [1.0, 2.0], "mix")
    layers = lora_layers(peft_model)
    merged = {name for name, layer in layers.items() if "mix" in layer.lora_A}
    assert merged == {
        f"encoder.layer.{layer}.moe.experts.{expert}.{proj}"
        for layer, expert in ((1, 0), (1, 1), (2, 3))
        for proj in ("wi", "wo")
    }
    for name in merged:
        layer = layers[name]
        expected = sum(w * _delta(layer, a) for a, w in (("news", 1.0), ("legal", 2.0)) if a in layer.lora_A)
        torch.testing.assert_close(_delta(layer, "mix"), expected, rtol=1e-4, atol=1e-6)


def test_merging_adapters_with_trained_heads_raises():
    model = tiny_model(ptmoe.MoeBertForSequenceClassification)
    peft_model = get_peft_model(model, ptmoe.expert_lora_config(model), adapter_name="news")
    peft_model.add_adapter("legal", ptmoe.expert_lora_config(model))
    with pytest.raises(ValueError, match=r"fully train 'base_model\.model\.classifier' \(modules_to_save\)"):
        ptmoe.merge_adapters(peft_model, ["news", "legal"], [0.5, 0.5], "mix")


def test_merging_into_an_existing_name_raises():
    peft_model = _two_adapter_model()
    with pytest.raises(ValueError, match="An adapter named 'legal' already exists"):
        ptmoe.merge_adapters(peft_model, ["news"], [1.0], "legal")
