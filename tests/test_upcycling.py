"""Sparse upcycling (ptmoe.upcycle): the dense transformers model is the oracle for every exactness claim.

Dense checkpoints are built locally from tiny configs (hidden 32, 2 layers, 4 heads, vocab 99, intermediate 36 so that
4 experts can partition it); nothing is downloaded. Outputs are compared on real tokens only: MoE layers send padding
tokens to no expert, so the hidden states *of padding tokens* differ by design.
"""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
import transformers
from transformers import (
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    BertConfig,
    BertTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    RobertaConfig,
    T5Config,
)

import ptmoe
from ptmoe.cli import main as cli_main
from ptmoe.upcycling import balanced_kmeans, partition_groups, upcycle_state_dict

NUM_EXPERTS = 4
INTERMEDIATE = 36  # divisible by NUM_EXPERTS (partition)
BERT_CLASSES = [
    "BertModel",
    "BertForMaskedLM",
    "BertForSequenceClassification",
    "BertForTokenClassification",
    "BertForQuestionAnswering",
]
T5_CLASSES = ["T5Model", "T5ForConditionalGeneration", "T5EncoderModel"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + (
    "o a de que e do da em um para é com não uma os no se na por mais as dos como mas foi ao ele das tem à seu "
    "sua ou ser quando muito há nos já está eu também só pelo pela até isso ela entre era depois sem mesmo aos ter "
    "seus quem nas me esse eles estão você tinha foram essa num nem suas meu às minha têm numa pelos elas havia "
    "seja qual será nós tenho lhe deles essas esses pelas este fosse dele"
).split()


def bert_fields(**overrides) -> dict:
    fields = dict(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=INTERMEDIATE,
        max_position_embeddings=64,
    )
    return {**fields, **overrides}


def bert_config(**overrides) -> BertConfig:
    return BertConfig(**bert_fields(**overrides))


def t5_config(feed_forward_proj: str = "relu", **overrides) -> T5Config:
    fields = dict(
        vocab_size=99,
        d_model=32,
        d_kv=8,
        d_ff=INTERMEDIATE,
        num_layers=2,
        num_heads=4,
        feed_forward_proj=feed_forward_proj,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    return T5Config(**{**fields, **overrides})


def dense_model(class_name: str, config, seed: int = 0):
    """A randomly initialised dense model; BERT's zero-initialised biases are randomised so that they count."""
    torch.manual_seed(seed)
    model = getattr(transformers, class_name)(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0.0, 0.02)
    return model


def batch(seed: int = 0, pad_id: int = 0, low: int = 5):
    """Two sequences of 9 tokens, the second right-padded after 6 (token ids avoid the special ones)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(low, 99, (2, 9), generator=generator)
    attention_mask = torch.ones(2, 9, dtype=torch.long)
    attention_mask[1, 6:] = 0
    input_ids[1, 6:] = pad_id
    return input_ids, attention_mask


def real_tokens(tensor: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-token outputs restricted to real tokens; per-sequence outputs unchanged."""
    return tensor[attention_mask.bool()] if tensor.dim() == 3 else tensor


def main_outputs(model, input_ids, attention_mask, decoder_input_ids=None) -> list[torch.Tensor]:
    """The outputs that matter for each architecture, restricted to real tokens."""
    kwargs = {"attention_mask": attention_mask}
    if decoder_input_ids is not None:
        kwargs["decoder_input_ids"] = decoder_input_ids
    with torch.no_grad():
        out = model(input_ids, **kwargs)
    if getattr(out, "start_logits", None) is not None:
        return [out.start_logits[attention_mask.bool()], out.end_logits[attention_mask.bool()]]
    # BertForPreTraining calls its MLM logits `prediction_logits`.
    for name in ("prediction_logits", "logits", "last_hidden_state"):
        value = getattr(out, name, None)
        if value is not None:
            if decoder_input_ids is not None:
                return [value]  # decoder outputs: every decoder position is real
            return [real_tokens(value, attention_mask)]
    raise AssertionError(f"no output in {type(out).__name__}")


def assert_same_outputs(dense, moe, decoder: bool = False, atol: float = 1e-5) -> None:
    input_ids, attention_mask = batch()
    decoder_input_ids = (
        torch.randint(1, 99, (2, 5), generator=torch.Generator().manual_seed(1)) if decoder else None
    )
    for expected, actual in zip(
        main_outputs(dense, input_ids, attention_mask, decoder_input_ids),
        main_outputs(moe, input_ids, attention_mask, decoder_input_ids),
        strict=True,
    ):
        torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def max_difference(dense, moe, decoder: bool = False) -> float:
    input_ids, attention_mask = batch()
    decoder_input_ids = (
        torch.randint(1, 99, (2, 5), generator=torch.Generator().manual_seed(1)) if decoder else None
    )
    pairs = zip(
        main_outputs(dense, input_ids, attention_mask, decoder_input_ids),
        main_outputs(moe, input_ids, attention_mask, decoder_input_ids),
        strict=True,
    )
    return max((a - b).abs().max().item() for a, b in pairs)


def expert_tensors(model, key: str = "wi.weight") -> list[torch.Tensor]:
    """`key` of every expert of the first MoE layer."""
    block = next(m for m in model.modules() if isinstance(m, ptmoe.SparseMoeBlock))
    return [expert.get_parameter(key).detach() for expert in block.experts]


def upcycle(dense, **kwargs):
    kwargs = {"num_experts": NUM_EXPERTS, "moe_layers": 1, "progress": False, **kwargs}
    return ptmoe.upcycle(dense, **kwargs)


def write_tokenizer(path) -> BertTokenizer:
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(VOCAB)}, do_lower_case=False)
    tokenizer.save_pretrained(path)
    return tokenizer


# --------------------------------------------------------------------------------------------------------------
# copy: exact reproduction
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("router_type", ["topk", "noisy_topk", "hash"])
@pytest.mark.parametrize("class_name", ["BertModel", "BertForMaskedLM"])
def test_copy_reproduces_dense_bert(class_name, router_type):
    dense = dense_model(class_name, bert_config())
    moe = upcycle(dense, router_type=router_type)
    assert type(moe).__name__ == "Moe" + class_name
    assert_same_outputs(dense, moe)


@pytest.mark.parametrize(
    "class_name", ["BertForSequenceClassification", "BertForTokenClassification", "BertForQuestionAnswering"]
)
def test_copy_reproduces_dense_bert_task_heads(class_name):
    num_labels = 2 if class_name == "BertForQuestionAnswering" else 3  # QA needs start/end logits
    dense = dense_model(class_name, bert_config(num_labels=num_labels))
    moe = upcycle(dense, moe_layers=[0, 1])
    assert type(moe).__name__ == "Moe" + class_name
    assert_same_outputs(dense, moe)


def test_bert_for_pretraining_becomes_masked_lm_without_nsp_head(caplog):
    dense = dense_model("BertForPreTraining", bert_config())
    with caplog.at_level(logging.WARNING, logger="ptmoe.upcycling"):
        moe = upcycle(dense)
    assert isinstance(moe, ptmoe.MoeBertForMaskedLM)
    assert "cls.seq_relationship.weight" in caplog.text and "next-sentence" in caplog.text
    assert_same_outputs(dense, moe)  # MoE logits == BertForPreTraining.prediction_logits


@pytest.mark.parametrize("feed_forward_proj", ["relu", "gated-gelu"])
@pytest.mark.parametrize("class_name", T5_CLASSES)
def test_copy_reproduces_dense_t5(class_name, feed_forward_proj):
    dense = dense_model(class_name, t5_config(feed_forward_proj))
    moe = upcycle(dense)
    assert type(moe).__name__ == "Moe" + class_name
    assert_same_outputs(dense, moe, decoder=class_name != "T5EncoderModel")


def test_copy_carries_every_non_ffn_weight_and_copies_ffn_into_every_expert():
    dense = dense_model("BertForMaskedLM", bert_config())
    moe = upcycle(dense, moe_layers=[1])
    dense_sd, moe_sd = dense.state_dict(), moe.state_dict()
    for key, tensor in dense_sd.items():
        if key.startswith("bert.encoder.layer.1.intermediate.") or key.startswith(
            "bert.encoder.layer.1.output.dense"
        ):
            continue
        assert torch.equal(moe_sd[key], tensor), key
    for expert in range(NUM_EXPERTS):
        prefix = f"bert.encoder.layer.1.moe.experts.{expert}."
        assert torch.equal(
            moe_sd[prefix + "wi.weight"], dense_sd["bert.encoder.layer.1.intermediate.dense.weight"]
        )
        assert torch.equal(moe_sd[prefix + "wo.bias"], dense_sd["bert.encoder.layer.1.output.dense.bias"])
    # Copies, not views: training the MoE must not change the dense model the user passed in.
    assert (
        moe_sd["bert.embeddings.word_embeddings.weight"].data_ptr()
        != dense_sd["bert.embeddings.word_embeddings.weight"].data_ptr()
    )
    assert moe.cls.predictions.decoder.weight is moe.bert.embeddings.word_embeddings.weight  # still tied


def test_layer_choice_every_nth_or_list():
    dense = dense_model("BertModel", bert_config(num_hidden_layers=4))
    assert upcycle(dense, moe_layers=2).config.moe_layer_indices == [1, 3]
    moe = upcycle(dense, moe_layers=[0, 2])
    assert [layer.is_moe for layer in moe.encoder.layer] == [True, False, True, False]
    t5 = upcycle(dense_model("T5Model", t5_config()), encoder_moe_layers=[0], decoder_moe_layers=[])
    assert t5.config.encoder_moe_layer_indices == [0] and t5.config.decoder_moe_layer_indices == []
    assert not any(".moe." in key for key in t5.state_dict() if key.startswith("decoder."))


def test_copy_with_switch_router_warns_it_is_not_exact(caplog):
    dense = dense_model("BertModel", bert_config())
    with caplog.at_level(logging.WARNING, logger="ptmoe.upcycling"):
        moe = upcycle(dense, router_type="switch")
    assert moe.config.num_experts_per_tok == 1
    assert "combine weights sum to 1" in caplog.text
    assert max_difference(dense, moe) > 1e-3  # FFN output scaled by the chosen expert's probability


# --------------------------------------------------------------------------------------------------------------
# partition: exact with all experts active
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("partition", ["random", "clustered"])
@pytest.mark.parametrize("class_name", ["BertModel", "BertForMaskedLM"])
def test_partition_with_all_experts_active_reproduces_dense_bert(class_name, partition):
    dense = dense_model(class_name, bert_config())
    moe = upcycle(dense, method="partition", partition=partition, num_experts_per_tok=NUM_EXPERTS)
    assert moe.config.expert_intermediate_size == INTERMEDIATE // NUM_EXPERTS
    assert moe.config.router_init == "zeros"
    assert_same_outputs(dense, moe)


@pytest.mark.parametrize("feed_forward_proj", ["relu", "gated-gelu"])
def test_partition_with_all_experts_active_reproduces_dense_t5(feed_forward_proj):
    dense = dense_model("T5ForConditionalGeneration", t5_config(feed_forward_proj))
    moe = upcycle(dense, method="partition", partition="clustered", num_experts_per_tok=NUM_EXPERTS)
    assert_same_outputs(dense, moe, decoder=True)


def test_partition_top_k_shrinks_active_parameters():
    dense = dense_model("BertModel", bert_config())
    moe = upcycle(dense, method="partition", num_experts_per_tok=1)
    counts = ptmoe.count_parameters(moe)
    # Two MoE layers, each with 3 of 4 experts (a quarter of the dense wi/wo weights, plus biases) inactive.
    per_expert = 2 * 32 * (INTERMEDIATE // NUM_EXPERTS) + INTERMEDIATE // NUM_EXPERTS + 32
    assert counts["total"] - counts["active"] == 2 * 3 * per_expert
    assert max_difference(dense, moe) > 1e-3  # k < E: not the dense function any more


@pytest.mark.parametrize("strategy", ["random", "clustered"])
def test_partition_groups_are_disjoint_equal_and_cover_all_neurons(strategy):
    generator = torch.Generator().manual_seed(0)
    ffn = {
        "wi.weight": torch.randn(INTERMEDIATE, 32, generator=generator),
        "wo.weight": torch.randn(32, INTERMEDIATE),
    }
    groups = partition_groups(ffn, NUM_EXPERTS, strategy, torch.Generator().manual_seed(0))
    assert [len(g) for g in groups] == [INTERMEDIATE // NUM_EXPERTS] * NUM_EXPERTS
    assert sorted(torch.cat(groups).tolist()) == list(range(INTERMEDIATE))


def test_balanced_kmeans_recovers_planted_clusters():
    generator = torch.Generator().manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(4, 16, generator=generator), dim=1) * 10
    labels = torch.arange(4).repeat_interleave(9)[torch.randperm(36, generator=generator)]
    points = centers[labels] + 0.1 * torch.randn(36, 16, generator=generator)
    groups = balanced_kmeans(points, 4, torch.Generator().manual_seed(3))
    assert sorted(tuple(sorted(labels[g].tolist())) for g in groups) == [(c,) * 9 for c in range(4)]


# --------------------------------------------------------------------------------------------------------------
# noise and drop: not exact, different per expert, reproducible
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["noise", "drop"])
def test_noise_and_drop_do_not_reproduce_dense(method):
    dense = dense_model("BertForMaskedLM", bert_config())
    assert max_difference(dense, upcycle(dense, method=method)) > 1e-5


@pytest.mark.parametrize("feed_forward_proj", ["relu", "gated-gelu"])
@pytest.mark.parametrize("method", ["noise", "drop"])
def test_noise_and_drop_do_not_reproduce_dense_t5(method, feed_forward_proj):
    dense = dense_model("T5ForConditionalGeneration", t5_config(feed_forward_proj))
    assert max_difference(dense, upcycle(dense, method=method), decoder=True) > 1e-5


@pytest.mark.parametrize("method", ["noise", "drop"])
def test_noise_and_drop_experts_differ_from_each_other(method):
    experts = expert_tensors(upcycle(dense_model("BertModel", bert_config()), method=method))
    for i in range(NUM_EXPERTS):
        for j in range(i + 1, NUM_EXPERTS):
            assert not torch.equal(experts[i], experts[j]), (i, j)


@pytest.mark.parametrize("method", ["noise", "drop", "partition"])
def test_random_methods_are_reproducible_for_a_seed(method):
    dense = dense_model("BertModel", bert_config())
    first, again = (upcycle(dense, method=method, seed=7).state_dict() for _ in range(2))
    other = upcycle(dense, method=method, seed=8).state_dict()
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)  # experts *and* routers
    expert_key = "encoder.layer.1.moe.experts.0.wi.weight"
    assert not torch.equal(first[expert_key], other[expert_key])
    if method != "partition":  # partition's routers start at zero whatever the seed
        router_key = "encoder.layer.1.moe.router.weight"
        assert not torch.equal(first[router_key], other[router_key])


def test_drop_reinitialises_the_requested_fraction_of_neurons_per_expert():
    dense = dense_model("BertModel", bert_config())
    moe = upcycle(dense, method="drop", drop_ratio=0.25)
    dense_wi = dense.encoder.layer[1].intermediate.dense.weight
    dense_wo = dense.encoder.layer[1].output.dense.weight
    dropped_sets = []
    for expert in moe.encoder.layer[1].moe.experts:
        changed_rows = (expert.wi.weight != dense_wi).any(dim=1)
        changed_columns = (expert.wo.weight != dense_wo).any(dim=0)
        assert changed_rows.sum().item() == int(0.25 * INTERMEDIATE)
        assert torch.equal(changed_rows, changed_columns)  # a neuron is re-drawn in wi and wo together
        assert torch.equal(changed_rows, expert.wi.bias != dense.encoder.layer[1].intermediate.dense.bias)
        assert torch.equal(expert.wo.bias, dense.encoder.layer[1].output.dense.bias)  # not per neuron
        dropped_sets.append(tuple(changed_rows.nonzero().squeeze(-1).tolist()))
    assert len(set(dropped_sets)) == NUM_EXPERTS  # a different subset per expert
    # Re-drawn from the dense matrix's statistics: similar scale, not zeros and not copies.
    new_values = moe.encoder.layer[1].moe.experts[0].wi.weight[list(dropped_sets[0])]
    assert 0.5 < new_values.std().item() / dense_wi.std().item() < 2.0


def test_drop_ratio_one_redraws_every_neuron():
    dense = dense_model("BertModel", bert_config())
    expert = upcycle(dense, method="drop", drop_ratio=1.0).encoder.layer[1].moe.experts[0]
    assert (expert.wi.weight != dense.encoder.layer[1].intermediate.dense.weight).any(dim=1).all()


def test_noise_is_scaled_to_each_weights_std():
    dense = dense_model("BertModel", bert_config())
    expert = upcycle(dense, method="noise", noise_std=0.05).encoder.layer[1].moe.experts[0]
    dense_wi = dense.encoder.layer[1].intermediate.dense.weight
    ratio = (expert.wi.weight - dense_wi).std().item() / dense_wi.std().item()
    assert 0.04 < ratio < 0.06


# --------------------------------------------------------------------------------------------------------------
# RoBERTa-style checkpoints → MoE-BERT
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "class_name",
    [
        "RobertaModel",
        "RobertaForMaskedLM",
        "RobertaForSequenceClassification",
        "RobertaForTokenClassification",
        "RobertaForQuestionAnswering",
        "XLMRobertaForMaskedLM",
    ],
)
def test_roberta_upcycles_exactly_for_right_padded_inputs(class_name):
    config_class = transformers.XLMRobertaConfig if class_name.startswith("XLM") else RobertaConfig
    config = config_class(**{**bert_fields(), "max_position_embeddings": 66, "pad_token_id": 1})
    dense = dense_model(class_name, config)
    moe = upcycle(dense, moe_layers=[0, 1])
    assert moe.config.max_position_embeddings == 64  # RoBERTa's positions start at padding_idx + 1 = 2
    input_ids, attention_mask = batch(pad_id=1)
    for expected, actual in zip(
        main_outputs(dense, input_ids, attention_mask),
        main_outputs(moe, input_ids, attention_mask),
        strict=True,
    ):
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_roberta_mlm_with_non_gelu_activation_is_refused():
    config = RobertaConfig(**{**bert_fields(), "hidden_act": "relu", "max_position_embeddings": 66})
    with pytest.raises(ValueError, match="always uses 'gelu'"):
        upcycle(dense_model("RobertaForMaskedLM", config))


# --------------------------------------------------------------------------------------------------------------
# The model returned: provenance, mode, dtype, save → reload
# --------------------------------------------------------------------------------------------------------------
def test_provenance_eval_mode_and_dtype():
    dense = dense_model("BertForMaskedLM", bert_config()).to(torch.bfloat16).train()
    moe = upcycle(dense, method="noise", seed=3)
    assert moe.config.upcycled_from == "BertForMaskedLM"  # an in-memory model without a name_or_path
    assert (moe.config.upcycling_method, moe.config.upcycling_seed) == ("noise", 3)
    assert not moe.training
    assert {p.dtype for p in moe.parameters()} == {torch.bfloat16}
    assert not any(t.is_meta for t in moe.state_dict().values())


def test_save_reload_round_trip_through_auto_classes(tmp_path):
    dense = dense_model("BertForMaskedLM", bert_config())
    moe = upcycle(dense, method="drop")
    out = ptmoe.save_upcycled(moe, tmp_path / "moe", tokenizer=False)
    assert (out / "model.safetensors").exists() and not list(tmp_path.glob(".moe.*"))
    reloaded = AutoModelForMaskedLM.from_pretrained(out).eval()
    assert isinstance(reloaded, ptmoe.MoeBertForMaskedLM)
    assert (reloaded.config.upcycling_method, reloaded.config.upcycled_from) == ("drop", "BertForMaskedLM")
    input_ids, attention_mask = batch()
    torch.testing.assert_close(
        main_outputs(reloaded, input_ids, attention_mask), main_outputs(moe, input_ids, attention_mask)
    )


def test_save_reload_round_trip_t5(tmp_path):
    moe = upcycle(dense_model("T5ForConditionalGeneration", t5_config("gated-gelu")), method="noise")
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(
        ptmoe.save_upcycled(moe, tmp_path / "t5", tokenizer=False)
    )
    assert isinstance(reloaded, ptmoe.MoeT5ForConditionalGeneration)
    saved, loaded = moe.state_dict(), reloaded.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[key], loaded[key]) for key in saved)  # bit-identical weights
    # Outputs within float rounding, not bit-equal: with transformers 5.24 the reloaded tensors sit at other memory
    # alignments than the originals, and the CPU matmul kernels then round differently (~5e-7, decoder only).
    assert max_difference(moe, reloaded.eval(), decoder=True) <= 1e-6


def test_upcycle_from_path_loads_masked_lm_and_saves_tokenizer(tmp_path):
    """The Hub-id code path, offline: a BertForPreTraining folder (BERTimbau's format) with its tokenizer."""
    source = tmp_path / "dense"
    dense = dense_model("BertForPreTraining", bert_config())
    dense.save_pretrained(source)
    tokenizer = write_tokenizer(source)
    moe = upcycle(str(source))
    assert isinstance(moe, ptmoe.MoeBertForMaskedLM)
    assert moe.config.upcycled_from == str(source)
    assert_same_outputs(dense, moe)
    out = ptmoe.save_upcycled(moe, tmp_path / "moe")
    reloaded_tokenizer = AutoTokenizer.from_pretrained(out)
    assert reloaded_tokenizer("o que é isso")["input_ids"] == tokenizer("o que é isso")["input_ids"]


def test_task_argument_chooses_the_dense_head(tmp_path):
    source = tmp_path / "dense"
    dense = dense_model("BertForPreTraining", bert_config())
    dense.save_pretrained(source)
    moe = upcycle(source, task="sequence-classification", load_kwargs={"num_labels": 3})
    assert isinstance(moe, ptmoe.MoeBertForSequenceClassification) and moe.config.num_labels == 3
    # The pooler (trained by next-sentence prediction) is kept for classification.
    assert torch.equal(moe.bert.pooler.dense.weight, dense.bert.pooler.dense.weight)
    with pytest.raises(ValueError, match="`task` must be one of"):
        upcycle(source, task="seq2seq-lm")


def test_upcycle_ptt5_style_folder_with_legacy_architecture_name(tmp_path):
    """PTT5's config.json still says `T5WithLMHeadModel`: it upcycles as T5ForConditionalGeneration."""
    source = tmp_path / "ptt5"
    dense = dense_model("T5ForConditionalGeneration", t5_config())
    dense.save_pretrained(source)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "architectures": ["T5WithLMHeadModel"]}))
    moe = upcycle(source, decoder_moe_layers=[1])
    assert isinstance(moe, ptmoe.MoeT5ForConditionalGeneration)
    assert moe.config.decoder_moe_layer_indices == [1] and moe.config.encoder_moe_layer_indices == [0, 1]
    assert_same_outputs(dense, moe, decoder=True)


def test_checkpoint_with_unsupported_head_suggests_task(tmp_path):
    source = tmp_path / "bert-lm-head"
    dense_model("BertLMHeadModel", bert_config(is_decoder=True)).save_pretrained(source)
    with pytest.raises(ValueError, match=r"BertLMHeadModel\. Supported .* pass `task=`"):
        upcycle(source)


def test_source_without_tokenizer_saves_weights_and_says_so(tmp_path, caplog):
    source = tmp_path / "dense"
    dense_model("BertModel", bert_config()).save_pretrained(source)
    moe = upcycle(source)
    with caplog.at_level(logging.WARNING, logger="ptmoe.upcycling"):
        out = ptmoe.save_upcycled(moe, tmp_path / "moe")
    assert "No tokenizer could be loaded" in caplog.text
    assert (out / "model.safetensors").exists() and not (out / "tokenizer_config.json").exists()


# --------------------------------------------------------------------------------------------------------------
# Continued training
# --------------------------------------------------------------------------------------------------------------
def test_continued_mlm_training_lowers_loss_and_moves_experts_apart():
    dense = dense_model(
        "BertForMaskedLM", bert_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    )
    moe = upcycle(dense, moe_layers=[0, 1])  # copy: all experts identical at the start
    assert all(torch.equal(e, expert_tensors(moe)[0]) for e in expert_tensors(moe))
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, 99, (8, 16), generator=generator)
    labels = input_ids.clone()
    masked = torch.rand(input_ids.shape, generator=generator) < 0.3
    input_ids = input_ids.masked_fill(masked, VOCAB.index("[MASK]"))
    labels = labels.masked_fill(~masked, -100)
    moe.train()
    optimizer = torch.optim.AdamW(moe.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss = moe(input_ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    experts = expert_tensors(moe)
    # The router sends different tokens to different experts, so their gradients (and weights) diverge.
    assert min((experts[i] - experts[j]).abs().max().item() for i in range(4) for j in range(i + 1, 4)) > 1e-4


# --------------------------------------------------------------------------------------------------------------
# BERTimbau's exact shape (random weights; only the key mapping, shapes and a short forward)
# --------------------------------------------------------------------------------------------------------------
def test_bertimbau_shaped_checkpoint_maps_every_key():
    config = BertConfig(
        vocab_size=29794,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
    )
    dense = dense_model("BertForMaskedLM", config)
    moe = ptmoe.upcycle(dense, num_experts=2, moe_layers=2, progress=False)
    state = moe.state_dict()
    assert moe.config.moe_layer_indices == [1, 3, 5, 7, 9, 11]
    for layer in range(12):
        prefix = f"bert.encoder.layer.{layer}."
        if layer % 2 == 1:
            assert state[prefix + "moe.router.weight"].shape == (2, 768)
            assert state[prefix + "moe.experts.1.wi.weight"].shape == (3072, 768)
            assert state[prefix + "moe.experts.1.wo.weight"].shape == (768, 3072)
            assert prefix + "intermediate.dense.weight" not in state
        else:
            assert state[prefix + "intermediate.dense.weight"].shape == (3072, 768)
    dense_keys = {
        k for k in dense.state_dict() if not any(f"layer.{i}.intermediate" in k for i in (1, 3, 5, 7, 9, 11))
    }
    dense_keys -= {k for k in dense_keys if any(f"layer.{i}.output.dense" in k for i in (1, 3, 5, 7, 9, 11))}
    assert dense_keys <= set(state)
    input_ids = torch.randint(5, 29794, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(moe(input_ids).logits, dense(input_ids).logits, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------------------
def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    with pytest.raises(ValueError, match="GPT2LMHeadModel") as error:
        upcycle(gpt2)
    for name in ("BertForMaskedLM → MoeBertForMaskedLM", "RobertaModel", "T5ForConditionalGeneration"):
        assert name in str(error.value)
    gpt2.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="Supported dense architectures: BertModel"):
        upcycle(tmp_path / "gpt2")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"num_experts_per_tok": 5},
            r"`num_experts_per_tok` \(5\) cannot be larger than `num_experts` \(4\)",
        ),
        ({"method": "drop", "drop_ratio": 0.0}, r"`drop_ratio` must be in \(0, 1\]"),
        ({"method": "drop", "drop_ratio": 1.5}, r"`drop_ratio` must be in \(0, 1\]"),
        ({"method": "drop", "drop_ratio": -0.1}, r"`drop_ratio` must be in \(0, 1\]"),
        ({"method": "partition", "num_experts": 5}, "36 is not divisible by 5"),
        ({"method": "partition", "expert_intermediate_size": 4}, "expert_intermediate_size = 36 / 4 = 9"),
        ({"method": "upscale"}, "`method` must be one of"),
        ({"partition": "kmeans"}, "`partition` must be one of"),
        ({"router_type": "switch", "num_experts_per_tok": 2}, "set `num_experts_per_tok=1`"),
        ({"num_shared_experts": 1}, "`num_shared_experts`"),
        ({"upcycled_from": "x"}, "cannot be overridden"),
        ({"encoder_moe_layers": [0]}, "for T5"),
        ({"moe_layers": [5]}, "valid indices are 0..1"),
        ({"hidden_size": 64}, "shape mismatch for"),
        ({"task": "masked-lm"}, "only apply when `dense` is a path"),
    ],
)
def test_bad_arguments_give_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        upcycle(dense_model("BertModel", bert_config()), **kwargs)


def test_state_dict_with_unknown_weight_is_refused():
    dense = dense_model("BertModel", bert_config())
    moe = upcycle(dense)
    state = {**dense.state_dict(), "encoder.layer.0.adapter.weight": torch.zeros(2)}
    shapes = {k: v.shape for k, v in moe.state_dict().items()}
    arch = ptmoe.SUPPORTED_ARCHITECTURES["BertModel"]
    with pytest.raises(ValueError, match="encoder.layer.0.adapter.weight"):
        upcycle_state_dict(state, arch, moe.config, shapes)


def test_save_refuses_a_non_empty_output_unless_overwrite(tmp_path):
    moe = upcycle(dense_model("BertModel", bert_config()))
    out = tmp_path / "moe"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        ptmoe.save_upcycled(moe, out, tokenizer=False)
    assert os.listdir(out) == ["notes.txt"]
    ptmoe.save_upcycled(moe, out, tokenizer=False, overwrite=True)
    assert (out / "model.safetensors").exists() and not (out / "notes.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe"]  # no staging or backup folder left


def test_failed_save_leaves_nothing_half_written(tmp_path, monkeypatch):
    moe = upcycle(dense_model("BertModel", bert_config()))

    def failing_save(directory, **kwargs):
        (directory / "config.json").write_text("{}")  # something is written, then the disk "fills up"
        raise OSError("No space left on device")

    monkeypatch.setattr(moe, "save_pretrained", failing_save)
    with pytest.raises(OSError, match="No space left"):
        ptmoe.save_upcycled(moe, tmp_path / "moe", tokenizer=False)
    assert list(tmp_path.iterdir()) == []
    old = tmp_path / "old"
    old.mkdir()
    (old / "model.safetensors").write_text("previous checkpoint")
    with pytest.raises(OSError):
        ptmoe.save_upcycled(moe, old, tokenizer=False, overwrite=True)
    assert (old / "model.safetensors").read_text() == "previous checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------
def test_cli_upcycles_saves_and_prints_parameter_counts(tmp_path, capsys):
    source = tmp_path / "dense"
    dense_model("BertForMaskedLM", bert_config()).save_pretrained(source)
    write_tokenizer(source)
    out = tmp_path / "moe"
    argv = ["upcycle", "--base", str(source), "--experts", "4", "--top-k", "1", "--method", "partition"]
    assert cli_main([*argv, "--moe-layers", "1,0", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    model = AutoModelForMaskedLM.from_pretrained(out)
    counts = ptmoe.count_parameters(model)
    assert f"{counts['total']:,}" in printed and f"{counts['active']:,}" in printed
    assert model.config.moe_layer_indices == [0, 1] and model.config.upcycling_method == "partition"
    assert (out / "tokenizer_config.json").exists()


def test_cli_refuses_existing_output(tmp_path, capsys):
    out = tmp_path / "moe"
    out.mkdir()
    (out / "config.json").write_text("{}")
    assert cli_main(["upcycle", "--base", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert os.listdir(out) == ["config.json"]


def test_cli_failed_upcycle_writes_nothing(tmp_path, capsys):
    source = tmp_path / "gpt2"
    GPT2LMHeadModel(
        GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    ).save_pretrained(source)
    out = tmp_path / "moe"
    assert cli_main(["upcycle", "--base", str(source), "--out", str(out), "--no-progress"]) == 2
    assert "Supported dense architectures" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2"]
