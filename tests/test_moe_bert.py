"""MoE-BERT: oracle against transformers' BertModel, save/load/Auto/remote-code round trips, losses, bad input."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BertConfig,
    BertModel,
)

import ptmoe
from conftest import MOE_PARTS, TINY_BERT, run_without_ptmoe

CLASSES = [
    (ptmoe.MoeBertModel, AutoModel),
    (ptmoe.MoeBertForMaskedLM, AutoModelForMaskedLM),
    (ptmoe.MoeBertForSequenceClassification, AutoModelForSequenceClassification),
    (ptmoe.MoeBertForTokenClassification, AutoModelForTokenClassification),
    (ptmoe.MoeBertForQuestionAnswering, AutoModelForQuestionAnswering),
]


def _batch(seed=0, batch=2, seq=9):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, 99, (batch, seq), generator=g)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    attention_mask[1, 6:] = 0
    input_ids[1, 6:] = 0
    return input_ids, attention_mask


def _main_output(out):
    return (
        out.last_hidden_state
        if hasattr(out, "last_hidden_state") and out.last_hidden_state is not None
        else (out.logits if getattr(out, "logits", None) is not None else out.start_logits)
    )


def _dense_to_moe(dense: BertModel, moe: ptmoe.MoeBertModel) -> None:
    """Test-local key map: every expert of every MoE layer gets the dense FFN of that layer."""
    dense_sd = dense.state_dict()
    moe_sd = {}
    for key in moe.state_dict():
        if ".moe.experts." in key:
            layer = key.split(".")[2]
            proj, param = key.split(".")[-2:]
            source = "intermediate.dense" if proj == "wi" else "output.dense"
            moe_sd[key] = dense_sd[f"encoder.layer.{layer}.{source}.{param}"]
        elif ".moe.router." in key:
            moe_sd[key] = moe.state_dict()[key]
        else:
            moe_sd[key] = dense_sd[key]
    moe.load_state_dict(moe_sd, strict=True)


# ---------------------------------------------------------------------------------------------------- oracle


@pytest.mark.parametrize("num_experts, k", [(4, 2), (4, 4), (1, 1)])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_experts_equal_to_dense_ffn_reproduce_bert(num_experts, k, attn):
    dense_kwargs = {k_: v for k_, v in TINY_BERT.items() if not k_.startswith(("num_experts", "moe_layers"))}
    dense = BertModel(BertConfig(**dense_kwargs, attn_implementation=attn)).eval()
    moe = ptmoe.MoeBertModel(
        ptmoe.MoeBertConfig(
            **{**TINY_BERT, "num_experts": num_experts, "num_experts_per_tok": k, "moe_layers": [0, 1]},
            attn_implementation=attn,
        )
    ).eval()
    _dense_to_moe(dense, moe)
    input_ids, attention_mask = _batch()
    with torch.no_grad():
        expected = dense(input_ids, attention_mask=attention_mask)
        got = moe(input_ids, attention_mask=attention_mask)
    real = attention_mask.bool()  # padding positions skip the experts; their states are not used downstream
    torch.testing.assert_close(
        got.last_hidden_state[real], expected.last_hidden_state[real], atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, atol=1e-5, rtol=1e-5)


def test_sdpa_and_eager_agree(tiny_bert_config):
    torch.manual_seed(0)
    eager = ptmoe.MoeBertModel(tiny_bert_config(attn_implementation="eager")).eval()
    sdpa = ptmoe.MoeBertModel(tiny_bert_config(attn_implementation="sdpa")).eval()
    sdpa.load_state_dict(eager.state_dict())
    assert sdpa.config._attn_implementation == "sdpa"
    input_ids, attention_mask = _batch()
    real = attention_mask.bool()
    torch.testing.assert_close(
        sdpa(input_ids, attention_mask=attention_mask).last_hidden_state[real],
        eager(input_ids, attention_mask=attention_mask).last_hidden_state[real],
        atol=1e-5,
        rtol=1e-5,
    )


def test_default_attention_is_sdpa(tiny_bert_config):
    assert ptmoe.MoeBertModel(tiny_bert_config()).config._attn_implementation == "sdpa"


# ---------------------------------------------------------------------------------------------------- outputs


def test_outputs_carry_router_logits_hidden_states_and_attentions(tiny_bert_config):
    model = ptmoe.MoeBertModel(tiny_bert_config(moe_layers=[1], attn_implementation="eager")).eval()
    input_ids, attention_mask = _batch()
    out = model(
        input_ids,
        attention_mask=attention_mask,
        output_router_logits=True,
        output_hidden_states=True,
        output_attentions=True,
    )
    assert len(out.router_logits) == len(out.expert_index) == 1
    assert out.router_logits[0].shape == (2, 9, 4) and out.router_logits[0].dtype == torch.float32
    assert out.expert_index[0].shape == (2, 9, 2)
    assert (out.expert_index[0][1, 6:] == -1).all()  # padding is not dispatched
    assert len(out.hidden_states) == 3 and len(out.attentions) == 2
    assert out.aux_loss.ndim == 0 and out.z_loss.ndim == 0
    assert model(input_ids).router_logits is None  # only on request


def test_return_dict_false_gives_tuple(tiny_bert_config):
    model = ptmoe.MoeBertForSequenceClassification(tiny_bert_config()).eval()
    input_ids, attention_mask = _batch()
    as_tuple = model(input_ids, attention_mask=attention_mask, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], model(input_ids, attention_mask=attention_mask).logits)


def test_bf16_model_keeps_router_math_in_fp32(tiny_bert_config):
    model = ptmoe.MoeBertModel(tiny_bert_config()).to(torch.bfloat16).eval()
    out = model(_batch()[0], output_router_logits=True)
    assert out.last_hidden_state.dtype == torch.bfloat16
    assert out.router_logits[0].dtype == torch.float32


# ---------------------------------------------------------------------------------------------------- losses


def _labels_for(model_class, input_ids):
    if model_class is ptmoe.MoeBertForMaskedLM:
        return {"labels": input_ids.masked_fill(input_ids == 0, -100)}
    if model_class is ptmoe.MoeBertForSequenceClassification:
        return {"labels": torch.tensor([0, 1])}
    if model_class is ptmoe.MoeBertForTokenClassification:
        return {"labels": input_ids.remainder(2)}
    return {"start_positions": torch.tensor([1, 2]), "end_positions": torch.tensor([3, 4])}


@pytest.mark.parametrize("model_class", [c for c, _ in CLASSES[1:]])
def test_loss_is_task_loss_plus_weighted_router_losses(model_class, tiny_bert_config):
    config = tiny_bert_config(
        router_aux_loss_coef=0.3, router_z_loss_coef=0.2, router_importance_loss_coef=0.1
    )
    model = model_class(config).eval()
    input_ids, attention_mask = _batch()
    labels = _labels_for(model_class, input_ids)
    out = model(input_ids, attention_mask=attention_mask, **labels)
    no_router = model_class(
        tiny_bert_config(router_aux_loss_coef=0.0, router_z_loss_coef=0.0, router_importance_loss_coef=0.0)
    ).eval()
    no_router.load_state_dict(model.state_dict())
    task_loss = no_router(input_ids, attention_mask=attention_mask, **labels).loss
    expected = task_loss + 0.3 * out.aux_loss + 0.2 * out.z_loss + 0.1 * out.importance_loss
    torch.testing.assert_close(out.loss, expected)
    assert out.aux_loss > 0 and out.z_loss > 0
    out.loss.backward()
    router_grads = [p.grad for n, p in model.named_parameters() if n.endswith("moe.router.weight")]
    assert router_grads and all(g is not None and g.abs().sum() > 0 for g in router_grads)


@pytest.mark.parametrize("model_class", [c for c, _ in CLASSES])
def test_router_losses_only_when_needed(model_class, tiny_bert_config):
    """Computed in training, with labels or on request; plain inference skips them (they are None)."""
    torch.manual_seed(0)
    model = model_class(tiny_bert_config()).eval()
    input_ids, attention_mask = _batch()
    plain = model(input_ids, attention_mask=attention_mask)
    assert plain.aux_loss is None and plain.z_loss is None and plain.importance_loss is None
    asked = model(input_ids, attention_mask=attention_mask, output_router_losses=True)
    assert asked.aux_loss.ndim == 0 and asked.z_loss > 0
    torch.testing.assert_close(asked[0], plain[0])  # first output: hidden states or logits, unchanged
    assert model(input_ids, attention_mask=attention_mask, output_router_logits=True).aux_loss is not None
    assert model.train()(input_ids, attention_mask=attention_mask).aux_loss is not None
    if model_class is not ptmoe.MoeBertModel:
        labels = _labels_for(model_class, input_ids)
        with_labels = model.eval()(input_ids, attention_mask=attention_mask, **labels)
        torch.testing.assert_close(with_labels.aux_loss, asked.aux_loss)
        with pytest.raises(ValueError, match="output_router_losses=False"):
            model(input_ids, attention_mask=attention_mask, output_router_losses=False, **labels)


@pytest.mark.parametrize("router_type", ["topk", "switch", "noisy_topk", "hash"])
def test_training_step_updates_every_router_type(router_type, tiny_bert_config):
    k = 1 if router_type in ("switch", "hash") else 2
    model = ptmoe.MoeBertForMaskedLM(tiny_bert_config(router_type=router_type, num_experts_per_tok=k)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    input_ids, attention_mask = _batch()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = model(input_ids, attention_mask=attention_mask, labels=input_ids).loss
    loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    routers = {n for n in before if ".moe.router." in n}
    assert routers <= changed  # hash routers have no parameters: the set is empty
    assert any(".moe.experts." in n for n in changed)


def test_gradient_checkpointing_gives_same_gradients(tiny_bert_config):
    torch.manual_seed(0)
    model = ptmoe.MoeBertForMaskedLM(
        tiny_bert_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    )
    model.train()
    input_ids, attention_mask = _batch()
    model(input_ids, attention_mask=attention_mask, labels=input_ids).loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.activation_checkpointing_enable()
    model(input_ids, attention_mask=attention_mask, labels=input_ids).loss.backward()
    for name, grad in reference.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-6, rtol=1e-5)


def test_switch_preset_in_one_line():
    config = ptmoe.MoeBertConfig.switch(**{k: v for k, v in TINY_BERT.items() if k != "num_experts_per_tok"})
    assert (config.router_type, config.num_experts_per_tok) == ("switch", 1)
    assert (config.router_aux_loss_coef, config.router_z_loss_coef) == (0.01, 0.001)
    model = ptmoe.MoeBertForMaskedLM(config)
    input_ids, attention_mask = _batch()
    assert torch.isfinite(model(input_ids, attention_mask=attention_mask, labels=input_ids).loss)


# ---------------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("model_class, auto_class", CLASSES)
def test_save_load_and_auto_round_trip(model_class, auto_class, tiny_bert_config, tmp_path):
    model = model_class(tiny_bert_config(num_shared_experts=1)).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin"))
    input_ids, attention_mask = _batch()
    expected = _main_output(model(input_ids, attention_mask=attention_mask))
    for loader in (model_class, auto_class):
        reloaded = loader.from_pretrained(tmp_path).eval()
        assert type(reloaded) is model_class
        torch.testing.assert_close(
            _main_output(reloaded(input_ids, attention_mask=attention_mask)), expected, atol=1e-5, rtol=1e-5
        )
    assert isinstance(AutoConfig.from_pretrained(tmp_path), ptmoe.MoeBertConfig)


def test_trust_remote_code_loads_every_class_without_ptmoe(tiny_bert_config, tmp_path):
    from safetensors.torch import save_file

    checkpoints = tmp_path / "checkpoints"
    input_ids, attention_mask = _batch()
    expected = {}
    for model_class, _ in CLASSES:
        model = model_class(tiny_bert_config(router_type="switch", num_experts_per_tok=1)).eval()
        model.save_pretrained(checkpoints / model_class.__name__)
        expected[model_class.__name__] = _main_output(
            model(input_ids, attention_mask=attention_mask)
        ).contiguous()
    save_file(
        {"input_ids": input_ids, "attention_mask": attention_mask}, str(tmp_path / "inputs.safetensors")
    )
    pairs = [(m.__name__, a.__name__) for m, a in CLASSES]
    run_without_ptmoe(
        f"""
        import torch, transformers
        from safetensors.torch import load_file, save_file
        inputs = load_file("inputs.safetensors")
        outputs = {{}}
        for name, auto_name in {pairs!r}:
            model = getattr(transformers, auto_name).from_pretrained(
                "checkpoints/" + name, trust_remote_code=True
            ).eval()
            assert type(model).__name__ == name, type(model)
            assert "ptmoe" not in type(model).__module__
            out = model(**inputs)
            main = out.last_hidden_state if hasattr(out, "last_hidden_state") else (
                out.logits if getattr(out, "logits", None) is not None else out.start_logits)
            outputs[name] = main.contiguous()
        save_file(outputs, "outputs.safetensors")
        """,
        tmp_path,
    )
    from safetensors.torch import load_file

    got = load_file(str(tmp_path / "outputs.safetensors"))
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, atol=1e-5, rtol=1e-5)


def test_saved_folder_is_self_contained(tiny_bert_config, tmp_path):
    import json

    ptmoe.MoeBertForMaskedLM(tiny_bert_config()).save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {
        "AutoConfig",
        "AutoModel",
        "AutoModelForMaskedLM",
        "AutoModelForSequenceClassification",
        "AutoModelForTokenClassification",
        "AutoModelForQuestionAnswering",
    }
    for target in auto_map.values():
        assert (tmp_path / (target.split(".")[0] + ".py")).exists()
    assert (tmp_path / "moe.py").exists()
    # moe.py -> its parts (a second level of relative imports): every part is copied, and the list is complete
    saved = {p.name for p in tmp_path.glob("*.py")}
    assert set(MOE_PARTS) <= saved, set(MOE_PARTS) - saved
    moe_imports = re.findall(r"^from \.(\w+) import", (tmp_path / "moe.py").read_text(), flags=re.MULTILINE)
    assert {f"{name}.py" for name in moe_imports} == set(MOE_PARTS)
    for source in tmp_path.glob("*.py"):
        assert not re.search(r"^\s*(import|from) ptmoe", source.read_text(), flags=re.MULTILINE), source


# ---------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"num_experts_per_tok": 5}, "num_experts_per_tok"),
        ({"num_experts": 0}, "num_experts"),
        ({"capacity_factor": 0.0}, "capacity_factor"),
        ({"eval_capacity_factor": -1.0}, "eval_capacity_factor"),
        ({"moe_layers": [2]}, "moe_layers"),
        ({"moe_layers": 0}, "moe_layers"),
        ({"router_type": "sinkhorn"}, "router_type"),
        ({"router_type": "switch", "num_experts_per_tok": 2}, "router_type"),
        ({"router_jitter_noise": -0.1}, "router_jitter_noise"),
        ({"num_shared_experts": -1}, "num_shared_experts"),
        ({"router_init": "xavier"}, "router_init"),
        ({"expert_capacity": 0}, "expert_capacity"),
    ],
)
def test_invalid_config_values_raise_value_error_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        ptmoe.MoeBertConfig(**{**TINY_BERT, **overrides})


def test_decoder_bert_is_refused():
    with pytest.raises(ValueError, match="is_decoder"):
        ptmoe.MoeBertConfig(**TINY_BERT, is_decoder=True)


@pytest.mark.parametrize("num_experts", [2, 6])
def test_loading_with_a_different_num_experts_fails_clearly(num_experts, tiny_bert_config, tmp_path):
    ptmoe.MoeBertForMaskedLM(tiny_bert_config()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="num_experts=" + str(num_experts)):
        ptmoe.MoeBertForMaskedLM.from_pretrained(tmp_path, num_experts=num_experts)


def test_loading_a_dense_bert_checkpoint_points_to_upcycling(tmp_path):
    dense_kwargs = {k: v for k, v in TINY_BERT.items() if not k.startswith(("num_experts", "moe_layers"))}
    BertModel(BertConfig(**dense_kwargs)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="upcycle"):
        ptmoe.MoeBertModel.from_pretrained(
            tmp_path, **{k: TINY_BERT[k] for k in ("num_experts", "moe_layers")}
        )


def test_hash_routing_needs_input_ids(tiny_bert_config):
    model = ptmoe.MoeBertModel(tiny_bert_config(router_type="hash", num_experts_per_tok=1))
    embeds = torch.randn(1, 4, 32)
    with pytest.raises(ValueError, match="input_ids"):
        model(inputs_embeds=embeds)
