"""Switch Transformers → MoE-T5 converter: oracles against transformers' SwitchTransformers, key map, CLI, errors."""

from __future__ import annotations

import os

import pytest
import torch
from torch.nn import CrossEntropyLoss
from transformers import (
    AutoModelForSeq2SeqLM,
    BertConfig,
    BertModel,
    SwitchTransformersConfig,
    SwitchTransformersEncoderModel,
    SwitchTransformersForConditionalGeneration,
    SwitchTransformersModel,
    T5Config,
    T5ForConditionalGeneration,
)

from ptmoe import MoeT5EncoderModel, MoeT5ForConditionalGeneration, MoeT5Model, convert_switch_transformers
from ptmoe.cli import main
from ptmoe.convert import convert_switch_state_dict, moe_t5_config_from_switch, switch_sparse_layers

TINY = dict(vocab_size=99, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)
SWITCH = dict(
    **TINY,
    num_decoder_layers=2,
    num_experts=4,
    num_sparse_encoder_layers=1,
    num_sparse_decoder_layers=1,
    expert_capacity=3,  # 9 tokens over 4 experts: the capacity binds, tokens are dropped
    router_aux_loss_coef=0.5,
    router_z_loss_coef=0.25,
)


def switch_model(model_class=SwitchTransformersForConditionalGeneration, seed: int = 0, **overrides):
    """A tiny random Switch model with weights scaled so that greedy/beam search produce varied tokens."""
    torch.manual_seed(seed)
    model = model_class(SwitchTransformersConfig(**{**SWITCH, **overrides})).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.2)
        if not model.config.tie_word_embeddings:  # untied: the stacks still read the shared table
            for stack in ("encoder", "decoder"):
                if hasattr(model, stack):
                    getattr(model, stack).embed_tokens.weight.copy_(model.shared.weight)
    return model


def batch(size: int = 3, length: int = 9, target: int = 6, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, 99, (size, length), generator=generator)
    labels = torch.randint(2, 99, (size, target), generator=generator)
    return input_ids, labels


# ----------------------------------------------------------------------------------------------------------------
# Oracles: the converted model computes what transformers' Switch computes
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tie_word_embeddings", [True, False])
def test_converted_logits_match_switch(tie_word_embeddings):
    source = switch_model(tie_word_embeddings=tie_word_embeddings)
    model = convert_switch_transformers(source)
    assert isinstance(model, MoeT5ForConditionalGeneration) and not model.training
    input_ids, labels = batch()
    with torch.no_grad():
        expected = source(input_ids=input_ids, labels=labels).logits
        out = model(input_ids=input_ids, labels=labels, output_router_logits=True)
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=0)  # SDPA attention (the default)
    # The capacity really dropped tokens in the encoder, and both models agree on the routing.
    assert (out.encoder_expert_index[0] == -1).any()
    with torch.no_grad():
        switch_out = source(input_ids=input_ids, labels=labels, output_router_logits=True)
    torch.testing.assert_close(
        out.encoder_router_logits[0], switch_out.encoder_router_logits[0], atol=1e-5, rtol=0
    )
    # With transformers' Switch's own (eager) attention the two compute the same operations, up to the rounding of
    # the matrix products: experts that receive 2-3 tokens run padded to 4 rows in fp32 on CPU (`_expert_forward`).
    model.set_attn_implementation("eager")
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=input_ids, labels=labels).logits, expected, atol=1e-5, rtol=0
        )


@pytest.mark.parametrize(
    "target, model_class, source_class",
    [
        ("model", MoeT5Model, SwitchTransformersModel),
        ("encoder", MoeT5EncoderModel, SwitchTransformersEncoderModel),
    ],
)
def test_converted_base_and_encoder_match_switch(target, model_class, source_class):
    source = switch_model(source_class)
    model = convert_switch_transformers(source, target=target)
    assert type(model) is model_class
    input_ids, labels = batch()
    kwargs = dict(input_ids=input_ids)
    if target == "model":
        kwargs["decoder_input_ids"] = source._shift_right(labels)
    with torch.no_grad():
        torch.testing.assert_close(
            model(**kwargs).last_hidden_state, source(**kwargs).last_hidden_state, atol=1e-5, rtol=0
        )


def test_loss_matches_switch_for_one_sequence():
    # One sequence and one MoE layer per stack: transformers' per-sequence aux loss equals ours, so the whole loss
    # (CE + aux_coef·(enc + dec aux) + z_coef·(enc + dec z)) must match.
    source = switch_model()
    model = convert_switch_transformers(source)
    input_ids, labels = batch(size=1)
    with torch.no_grad():
        expected = source(input_ids=input_ids, labels=labels, output_router_logits=True)
        got = model(input_ids=input_ids, labels=labels)
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-5, rtol=1e-6)
    for name in ("encoder_z_loss", "decoder_z_loss", "encoder_aux_loss", "decoder_aux_loss"):
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), atol=1e-5, rtol=1e-6)


def test_loss_is_switch_cross_entropy_plus_router_terms():
    source = switch_model()
    model = convert_switch_transformers(source)
    input_ids, labels = batch(size=3)
    labels[0, -2:] = -100
    with torch.no_grad():
        cross_entropy = source(input_ids=input_ids, labels=labels).loss  # without router logits: CE only
        switch_z = source(input_ids=input_ids, labels=labels, output_router_logits=True)
        got = model(input_ids=input_ids, labels=labels)
    torch.testing.assert_close(
        got.z_loss, switch_z.encoder_z_loss + switch_z.decoder_z_loss, atol=1e-4, rtol=1e-6
    )
    torch.testing.assert_close(
        got.loss, cross_entropy + 0.5 * got.aux_loss + 0.25 * got.z_loss, atol=1e-5, rtol=0
    )
    own_cross_entropy = CrossEntropyLoss()(got.logits.view(-1, 99), labels.view(-1))
    torch.testing.assert_close(own_cross_entropy, cross_entropy, atol=1e-5, rtol=0)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_matches_switch(num_beams):
    source = switch_model()
    model = convert_switch_transformers(source)
    input_ids, _ = batch(size=3)
    kwargs = dict(max_new_tokens=8, num_beams=num_beams, do_sample=False)
    expected = source.generate(input_ids, **kwargs)
    assert len(set(expected[:, 1:].flatten().tolist())) > 3  # a meaningful comparison: varied tokens
    assert torch.equal(model.generate(input_ids, **kwargs), expected)


def test_right_padding_keeps_real_token_outputs():
    # transformers counts padding against the capacity, MoE-T5 does not: with right padding (pads after the real
    # tokens) the real tokens' routing and the decoder's logits are the same.
    source = switch_model()
    model = convert_switch_transformers(source)
    input_ids, labels = batch(size=2)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -3:] = 0
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    with torch.no_grad():
        torch.testing.assert_close(model(**kwargs).logits, source(**kwargs).logits, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# Config and key map
# ----------------------------------------------------------------------------------------------------------------
def test_config_mapping():
    source = SwitchTransformersConfig(
        **{**SWITCH, "num_layers": 6, "num_decoder_layers": 4, "num_sparse_encoder_layers": 2},
        router_jitter_noise=0.05,
    )
    config = moe_t5_config_from_switch(source)
    # transformers makes layer i sparse when i % step == 1: encoder step 3 → [1, 4], decoder step 4 → [1].
    assert config.encoder_moe_layer_indices == [1, 4] and config.decoder_moe_layer_indices == [1]
    assert (config.router_type, config.num_experts_per_tok, config.expert_capacity) == ("switch", 1, 3)
    assert (config.router_jitter_noise, config.router_aux_loss_coef, config.router_z_loss_coef) == (
        0.05,
        0.5,
        0.25,
    )
    assert config.feed_forward_proj == "relu" and config.num_experts == 4
    assert switch_sparse_layers(4, 1) == [0, 1, 2, 3] and switch_sparse_layers(4, 2) == [1, 3]


def test_key_map_renames_router_experts_and_dense_layers():
    source = switch_model()
    converted = convert_switch_state_dict(source.state_dict())
    assert "encoder.block.1.layer.1.moe.router.weight" in converted
    assert "decoder.block.1.layer.2.moe.experts.3.wo.weight" in converted
    assert "encoder.block.0.layer.1.DenseReluDense.wi.weight" in converted
    assert not any(".mlp." in key for key in converted)
    torch.testing.assert_close(
        converted["decoder.block.1.layer.2.moe.experts.3.wi.weight"],
        source.state_dict()["decoder.block.1.layer.2.mlp.experts.expert_3.wi.weight"],
    )


def test_converted_weights_are_copies():
    source = switch_model()
    model = convert_switch_transformers(source)
    before = source.encoder.block[1].layer[1].mlp.router.classifier.weight.clone()
    with torch.no_grad():
        model.encoder.block[1].layer[1].moe.router.weight.add_(1.0)
    assert torch.equal(source.encoder.block[1].layer[1].mlp.router.classifier.weight, before)
    assert model.lm_head.weight is model.shared.weight is model.encoder.embed_tokens.weight


def test_converted_model_trains():
    model = convert_switch_transformers(switch_model()).train()
    input_ids, labels = batch()
    model(input_ids=input_ids, labels=labels).loss.backward()
    assert model.encoder.block[1].layer[1].moe.router.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------------
# Paths and the CLI
# ----------------------------------------------------------------------------------------------------------------
def test_convert_from_local_folder(tmp_path):
    source = switch_model()
    source.save_pretrained(tmp_path)
    input_ids, labels = batch()
    with torch.no_grad():
        expected = source(input_ids=input_ids, labels=labels)
    model = convert_switch_transformers(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=input_ids, labels=labels).logits, expected.logits, atol=1e-5, rtol=0
        )
    encoder = convert_switch_transformers(str(tmp_path), target="encoder")
    with torch.no_grad():
        torch.testing.assert_close(
            encoder(input_ids=input_ids).last_hidden_state,
            expected.encoder_last_hidden_state,
            atol=1e-5,
            rtol=0,
        )


def test_cli_convert_switch(tmp_path, capsys):
    source = switch_model()
    source.save_pretrained(tmp_path / "switch")
    out = tmp_path / "moe"
    assert main(["convert-switch", str(tmp_path / "switch"), str(out)]) == 0
    files = set(os.listdir(out))
    assert "model.safetensors" in files and "modeling_moe_t5.py" in files
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(out)
    assert type(reloaded) is MoeT5ForConditionalGeneration
    input_ids, _ = batch()
    assert torch.equal(
        reloaded.generate(input_ids, max_new_tokens=5), source.generate(input_ids, max_new_tokens=5)
    )
    # A non-empty output folder is refused unless --overwrite.
    assert main(["convert-switch", str(tmp_path / "switch"), str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (
        main(["convert-switch", str(tmp_path / "switch"), str(out), "--overwrite", "--target", "encoder"])
        == 0
    )


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------
def test_non_switch_models_are_refused(tmp_path):
    t5 = T5ForConditionalGeneration(T5Config(**TINY))
    bert = BertModel(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4))
    for model in (t5, bert):
        with pytest.raises(ValueError, match="expected a SwitchTransformers checkpoint, got a"):
            convert_switch_transformers(model)
    t5.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="expected a SwitchTransformers checkpoint, got model_type='t5'"):
        convert_switch_transformers(tmp_path)


def test_router_bias_is_refused():
    with pytest.raises(ValueError, match="router_bias=True"):
        convert_switch_transformers(switch_model(router_bias=True))


def test_bad_target_is_refused():
    with pytest.raises(ValueError, match="`target` must be one of"):
        convert_switch_transformers(switch_model(), target="classifier")
    with pytest.raises(ValueError, match="target='conditional_generation' needs one of"):
        convert_switch_transformers(switch_model(SwitchTransformersEncoderModel))


def test_unknown_source_key_is_refused():
    state = switch_model().state_dict()
    state["encoder.block.1.layer.1.mlp.router.classifier.bias"] = torch.zeros(4)
    with pytest.raises(ValueError, match="No key-map rule .*router.classifier.bias"):
        convert_switch_state_dict(state)
