"""MoE-T5: oracles against transformers' T5, losses, generation, save/load, Auto and trust_remote_code."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.nn import CrossEntropyLoss
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSeq2SeqLM,
    AutoModelForTextEncoding,
    T5Config,
    T5EncoderModel,
    T5ForConditionalGeneration,
    T5Model,
)

import ptmoe
from conftest import MOE_PARTS
from ptmoe import (
    MoeT5Config,
    MoeT5EncoderModel,
    MoeT5ForConditionalGeneration,
    MoeT5Model,
)
from ptmoe.models import modeling_moe_t5

TINY = dict(vocab_size=99, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)
MOE = dict(num_experts=4, num_experts_per_tok=2, encoder_moe_layers=[0, 1], decoder_moe_layers=[1])


def tiny_config(**overrides) -> MoeT5Config:
    return MoeT5Config(**{**TINY, **MOE, **overrides})


def inputs(batch: int = 2, length: int = 7, target: int = 5, seed: int = 0):
    """Encoder ids with right padding in the second row, decoder labels, and the encoder mask."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, 99, (batch, length), generator=generator)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1:
        attention_mask[1, length - 2 :] = 0
        input_ids[1, length - 2 :] = 0
    labels = torch.randint(2, 99, (batch, target), generator=generator)
    return input_ids, attention_mask, labels


def dense_copy(dense_model: torch.nn.Module, moe_model: torch.nn.Module) -> None:
    """Load a dense T5's weights into a MoE-T5 with every expert a copy of the dense FFN it replaces."""
    dense_state = dense_model.state_dict()
    state = {}
    for key in moe_model.state_dict():
        if ".moe.router." in key:
            continue  # random router: with identical experts any routing must give the same output
        source = key
        if ".moe.experts." in key:
            prefix, rest = key.split(".moe.experts.")
            source = f"{prefix}.DenseReluDense.{rest.split('.', 1)[1]}"
        state[key] = dense_state[source]
    missing, unexpected = moe_model.load_state_dict(state, strict=False)
    assert all(".moe.router." in k for k in missing) and not unexpected


# ----------------------------------------------------------------------------------------------------------------
# Oracles: MoE-T5 whose experts all equal the dense FFN reproduces transformers' T5
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "moe_class, t5_class",
    [
        (MoeT5ForConditionalGeneration, T5ForConditionalGeneration),
        (MoeT5Model, T5Model),
        (MoeT5EncoderModel, T5EncoderModel),
    ],
)
@pytest.mark.parametrize(
    "ffn", [dict(feed_forward_proj="relu"), dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)]
)
def test_identical_experts_reproduce_dense_t5(moe_class, t5_class, ffn):
    torch.manual_seed(0)
    dense = t5_class(T5Config(**TINY, **ffn)).eval()
    moe = moe_class(tiny_config(**ffn)).eval()
    dense_copy(dense, moe)
    input_ids, attention_mask, labels = inputs()
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask)
    if moe_class is not MoeT5EncoderModel:
        kwargs["decoder_input_ids"] = dense._shift_right(labels)
    with torch.no_grad():
        expected = dense(**kwargs, output_hidden_states=True)
        got = moe(**kwargs, output_hidden_states=True)
    if moe_class is MoeT5ForConditionalGeneration:
        torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=0)
    elif moe_class is MoeT5Model:
        torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, atol=1e-5, rtol=0)
    else:
        # Every hidden state of the real tokens (padding tokens skip the experts, so theirs differ from T5's).
        assert len(got.hidden_states) == len(expected.hidden_states) == 3
        real = attention_mask.bool()
        torch.testing.assert_close(
            got.last_hidden_state[real], expected.last_hidden_state[real], atol=1e-5, rtol=0
        )
        for ours, theirs in zip(got.hidden_states, expected.hidden_states, strict=True):
            torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_matches_dense_t5(num_beams):
    torch.manual_seed(0)
    dense = T5ForConditionalGeneration(T5Config(**TINY, feed_forward_proj="gated-gelu")).eval()
    moe = MoeT5ForConditionalGeneration(tiny_config(feed_forward_proj="gated-gelu")).eval()
    dense_copy(dense, moe)
    input_ids, attention_mask, _ = inputs(batch=3)
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=6, num_beams=num_beams, do_sample=False)
    expected = dense.generate(input_ids, **kwargs)
    got = moe.generate(input_ids, **kwargs)
    assert torch.equal(got, expected)


# ----------------------------------------------------------------------------------------------------------------
# Behaviour of the MoE parts
# ----------------------------------------------------------------------------------------------------------------
def test_state_dict_layout_is_t5_with_moe_feed_forwards():
    model = MoeT5ForConditionalGeneration(tiny_config(encoder_moe_layers=[1], feed_forward_proj="gated-gelu"))
    keys = set(model.state_dict())
    dense_t5 = set(T5ForConditionalGeneration(T5Config(**TINY, feed_forward_proj="gated-gelu")).state_dict())
    moe_ff = {
        k
        for k in dense_t5
        if k.startswith(("encoder.block.1.layer.1.Dense", "decoder.block.1.layer.2.Dense"))
    }
    assert dense_t5 - moe_ff <= keys
    assert "encoder.block.1.layer.1.moe.router.weight" in keys
    assert "decoder.block.1.layer.2.moe.router.weight" in keys
    for proj in ("wi_0", "wi_1", "wo"):
        assert f"encoder.block.1.layer.1.moe.experts.3.{proj}.weight" in keys
        assert isinstance(getattr(model.encoder.block[1].layer[1].moe.experts[3], proj), torch.nn.Linear)
    assert model.encoder.block[1].layer[1].moe.experts[0].wo.bias is None
    assert isinstance(model.encoder.block[1].layer[1].moe.router.weight, torch.nn.Parameter)
    assert model.encoder.block[1].layer[1].moe.router.weight.shape == (4, 32)


def test_loss_is_cross_entropy_plus_weighted_router_losses():
    torch.manual_seed(0)
    config = tiny_config(router_aux_loss_coef=0.5, router_z_loss_coef=0.25, router_importance_loss_coef=0.125)
    model = MoeT5ForConditionalGeneration(config).eval()
    input_ids, attention_mask, labels = inputs()
    labels[0, -1] = -100
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    cross_entropy = CrossEntropyLoss()(out.logits.view(-1, 99), labels.view(-1))
    for name in ("aux_loss", "z_loss", "importance_loss"):
        total = getattr(out, f"encoder_{name}") + getattr(out, f"decoder_{name}")
        torch.testing.assert_close(getattr(out, name), total)
        assert getattr(out, f"encoder_{name}") > 0 and getattr(out, f"decoder_{name}") > 0
    expected = cross_entropy + 0.5 * out.aux_loss + 0.25 * out.z_loss + 0.125 * out.importance_loss
    torch.testing.assert_close(out.loss, expected)


def test_router_logits_only_on_request():
    model = MoeT5ForConditionalGeneration(tiny_config()).eval()
    input_ids, attention_mask, labels = inputs()
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert out.encoder_router_logits is None and out.decoder_expert_index is None
    assert out.aux_loss is not None
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, output_router_logits=True)
    assert len(out.encoder_router_logits) == 2 and len(out.decoder_router_logits) == 1
    assert (
        out.encoder_router_logits[0].shape == (2, 7, 4)
        and out.encoder_router_logits[0].dtype == torch.float32
    )
    assert out.decoder_expert_index[0].shape == (2, 5, 2)
    model.config.output_router_logits = True
    assert model(input_ids=input_ids, labels=labels).encoder_expert_index is not None


def test_router_losses_only_when_needed(monkeypatch):
    """Losses in training, with labels or on request; skipped in plain inference and in every generate() step."""
    torch.manual_seed(0)
    model = MoeT5ForConditionalGeneration(tiny_config()).eval()
    input_ids, attention_mask, labels = inputs()
    decoder_input_ids = model._shift_right(labels)
    plain = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids)
    assert plain.aux_loss is None and plain.encoder_z_loss is None and plain.decoder_importance_loss is None
    asked = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        decoder_input_ids=decoder_input_ids,
        output_router_losses=True,
    )
    with_labels = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    for name in ("aux_loss", "z_loss", "importance_loss", "encoder_aux_loss", "decoder_z_loss"):
        torch.testing.assert_close(getattr(asked, name), getattr(with_labels, name))
    torch.testing.assert_close(asked.logits, plain.logits)
    assert model.train()(input_ids=input_ids, decoder_input_ids=decoder_input_ids).aux_loss is not None
    model.eval()
    encoder_only = MoeT5EncoderModel(tiny_config()).eval()
    assert encoder_only(input_ids=input_ids).aux_loss is None
    assert encoder_only(input_ids=input_ids, output_router_logits=True).aux_loss is not None
    with pytest.raises(ValueError, match="output_router_losses=False"):
        model(input_ids=input_ids, labels=labels, output_router_losses=False)

    calls = []
    original = modeling_moe_t5.compute_router_losses
    monkeypatch.setattr(
        modeling_moe_t5, "compute_router_losses", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=4, do_sample=False)
    assert calls == []


def test_padding_tokens_skip_experts_and_losses():
    torch.manual_seed(0)
    model = MoeT5EncoderModel(tiny_config()).eval()
    input_ids, attention_mask, _ = inputs(batch=2)
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_router_logits=True)
    for expert_index in out.expert_index:
        assert (expert_index[1, -2:] == -1).all() and (expert_index[attention_mask.bool()] >= 0).all()
    # The padded second row gives the same losses as the row alone without its padding.
    alone = model(input_ids=input_ids[1:, :-2], output_router_losses=True)
    padded = model(input_ids=input_ids[1:], attention_mask=attention_mask[1:], output_router_losses=True)
    for name in ("aux_loss", "z_loss", "importance_loss"):
        assert getattr(alone, name) is not None
        torch.testing.assert_close(getattr(padded, name), getattr(alone, name))


def test_gradients_reach_routers_and_experts():
    torch.manual_seed(0)
    model = MoeT5ForConditionalGeneration(tiny_config()).train()
    input_ids, attention_mask, labels = inputs()
    model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
    for stack, sub in ((model.encoder, 1), (model.decoder, 2)):
        moe = stack.block[1].layer[sub].moe
        assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
        assert any(expert.wo.weight.grad is not None for expert in moe.experts)


def test_generation_with_cache_equals_without():
    torch.manual_seed(0)
    model = MoeT5ForConditionalGeneration(tiny_config()).eval()
    input_ids, attention_mask, _ = inputs(batch=3)
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(
        model.generate(input_ids, **kwargs), model.generate(input_ids, use_cache=False, **kwargs)
    )


@torch.no_grad()  # the cache is deep-copied: its tensors must not be part of a graph
def test_cache_is_returned_and_the_old_past_key_values_name_still_works():
    """transformers 5.24 renamed `past_key_values` to `cache`; the old keyword keeps working (as in T5)."""
    torch.manual_seed(0)
    model = MoeT5ForConditionalGeneration(tiny_config()).eval()
    input_ids, attention_mask, labels = inputs()
    first = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=labels[:, :3])
    assert first.cache is not None and first.cache.get_seq_length() == 3
    step = dict(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=labels[:, 3:4])
    with_new_name = model(**step, cache=copy.deepcopy(first.cache)).logits
    with_old_name = model(**step, past_key_values=copy.deepcopy(first.cache)).logits
    full = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=labels[:, :4]).logits
    torch.testing.assert_close(with_new_name, with_old_name, atol=0, rtol=0)
    torch.testing.assert_close(with_new_name, full[:, -1:], atol=1e-5, rtol=0)


def test_switch_preset_end_to_end():
    config = MoeT5Config.switch(**TINY, num_experts=4)
    assert config.router_type == "switch" and config.num_experts_per_tok == 1
    assert (config.router_aux_loss_coef, config.router_z_loss_coef) == (0.01, 0.001)
    torch.manual_seed(0)
    model = MoeT5ForConditionalGeneration(config).train()
    input_ids, attention_mask, labels = inputs()
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, output_router_logits=True)
    out.loss.backward()
    assert model.encoder.block[1].layer[1].moe.router.weight.grad.abs().sum() > 0
    assert out.encoder_expert_index[0].shape == (2, 7, 1)
    model.eval()
    generated = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=4, num_beams=2)
    assert generated.shape[0] == 2


def test_hash_router_routes_decoder_tokens_by_id():
    torch.manual_seed(0)
    model = MoeT5ForConditionalGeneration(tiny_config(router_type="hash", num_experts_per_tok=1)).eval()
    input_ids, attention_mask, labels = inputs()
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, output_router_logits=True)
    table = model.decoder.block[1].layer[2].moe.router.hash_table
    decoder_input_ids = model._shift_right(labels)
    assert torch.equal(out.decoder_expert_index[0][..., 0], table[decoder_input_ids])
    assert model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=3).shape == (2, 4)


def test_gradient_checkpointing_trains():
    torch.manual_seed(0)
    model = MoeT5ForConditionalGeneration(tiny_config()).train()
    model.activation_checkpointing_enable()
    input_ids, attention_mask, labels = inputs()
    model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
    assert model.decoder.block[1].layer[2].moe.router.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value, message",
    [
        ("encoder_moe_layers", [2], "`encoder_moe_layers` contains layer index 2"),
        ("decoder_moe_layers", [0, 5], "`decoder_moe_layers` contains layer index 5"),
        ("encoder_moe_layers", 0, "`encoder_moe_layers` as an integer is a step"),
        ("decoder_moe_layers", [1, 1], "`decoder_moe_layers` contains duplicate"),
    ],
)
def test_invalid_moe_layers_raise(field, value, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**{field: value})


def test_decoder_layers_are_checked_against_num_decoder_layers():
    config = tiny_config(num_decoder_layers=4, decoder_moe_layers=[3])
    assert config.decoder_moe_layer_indices == [3] and config.encoder_moe_layer_indices == [0, 1]
    with pytest.raises(ValueError, match="`decoder_moe_layers` contains layer index 3, but the stack has 2"):
        tiny_config(num_decoder_layers=2, decoder_moe_layers=[3])


def test_config_from_dense_t5_dict_stays_moe_t5():
    dense = T5Config(**TINY, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    config = MoeT5Config(**dense.to_dict(), num_experts=4)
    assert config.model_type == "moe_t5" and config.to_dict()["model_type"] == "moe_t5"
    assert (config.dense_act_fn, config.is_gated_act, config.scale_decoder_outputs) == (
        "gelu_new",
        True,
        False,
    )


@pytest.mark.parametrize("value", ["gated-foo", "swish-gelu", "gated-relu-gelu", ""])
def test_unknown_feed_forward_proj_raises(value):
    with pytest.raises(ValueError, match="`feed_forward_proj`"):
        tiny_config(feed_forward_proj=value)


def test_checkpoint_with_other_num_experts_is_refused(tmp_path):
    MoeT5ForConditionalGeneration(tiny_config()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"MoE layers do not match.*encoder \[0, 1\], decoder \[1\]"):
        MoeT5ForConditionalGeneration.from_pretrained(tmp_path, num_experts=2)


def test_half_precision_load_keeps_dense_wo_in_fp32_and_experts_in_fp16(tmp_path):
    # Dense `DenseReluDense.wo` stays fp32 as in T5; expert `wo` follows the load dtype, so that bitsandbytes
    # (which reuses `_keep_in_fp32_modules` as its skip list) quantizes whole experts.
    MoeT5ForConditionalGeneration(tiny_config(num_shared_experts=1)).save_pretrained(tmp_path)
    model = MoeT5ForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float16).eval()
    moe = model.encoder.block[1].layer[1].moe
    assert moe.experts[0].wo.weight.dtype == torch.float16 and moe.experts[0].wi.weight.dtype == torch.float16
    assert model.decoder.block[0].layer[2].DenseReluDense.wo.weight.dtype == torch.float32
    input_ids, attention_mask, labels = inputs()
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert out.logits.dtype == torch.float16 and torch.isfinite(out.loss)


# ----------------------------------------------------------------------------------------------------------------
# Save / load, Auto classes, trust_remote_code
# ----------------------------------------------------------------------------------------------------------------
CLASSES = [
    (MoeT5ForConditionalGeneration, AutoModelForSeq2SeqLM),
    (MoeT5Model, AutoModel),
    (MoeT5EncoderModel, AutoModelForTextEncoding),
]


def _outputs(model, input_ids, attention_mask, labels):
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask)
    if not isinstance(model, MoeT5EncoderModel):
        kwargs["decoder_input_ids"] = model._shift_right(labels)
    with torch.no_grad():
        out = model(**kwargs)
    return out.logits if isinstance(model, MoeT5ForConditionalGeneration) else out.last_hidden_state


@pytest.mark.parametrize("model_class, auto_class", CLASSES)
def test_save_load_and_auto_round_trip(tmp_path, model_class, auto_class):
    torch.manual_seed(0)
    model = model_class(tiny_config(feed_forward_proj="gated-gelu")).eval()
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    assert {"modeling_moe_t5.py", "configuration_moe_t5.py", "moe.py", *MOE_PARTS} <= files
    saved_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert saved_map["AutoModelForSeq2SeqLM"] == "modeling_moe_t5.MoeT5ForConditionalGeneration"
    assert saved_map["AutoModelForTextEncoding"] == "modeling_moe_t5.MoeT5EncoderModel"
    assert isinstance(AutoConfig.from_pretrained(tmp_path), MoeT5Config)
    batch = inputs()
    expected = _outputs(model, *batch)
    for loader in (model_class, auto_class):
        reloaded = loader.from_pretrained(tmp_path)
        assert type(reloaded) is model_class
        torch.testing.assert_close(_outputs(reloaded, *batch), expected, atol=0, rtol=0)


def test_encoder_loads_from_seq2seq_checkpoint(tmp_path):
    torch.manual_seed(0)
    full = MoeT5ForConditionalGeneration(tiny_config()).eval()
    full.save_pretrained(tmp_path)
    encoder = MoeT5EncoderModel.from_pretrained(tmp_path)
    input_ids, attention_mask, _ = inputs()
    with torch.no_grad():
        expected = full.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        got = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


REMOTE_CODE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["ptmoe"] = None  # ptmoe must not be importable: only the files in the folders may be used
    import torch
    from transformers import AutoModel, AutoModelForSeq2SeqLM, AutoModelForTextEncoding

    root = sys.argv[1]
    batch = torch.load(root + "/batch.pt")
    input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    decoder_input_ids = batch["decoder_input_ids"]
    results = {}
    for name, auto_class in (
        ("seq2seq", AutoModelForSeq2SeqLM), ("model", AutoModel), ("encoder", AutoModelForTextEncoding)
    ):
        model = auto_class.from_pretrained(f"{root}/{name}", trust_remote_code=True).eval()
        assert not type(model).__module__.startswith("ptmoe"), type(model).__module__
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask)
        with torch.no_grad():
            if name == "seq2seq":
                results["logits"] = model(**kwargs, labels=labels).logits
                results["greedy"] = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=5)
                results["beam"] = model.generate(
                    input_ids, attention_mask=attention_mask, max_new_tokens=5, num_beams=3
                )
            elif name == "model":
                results["model"] = model(**kwargs, decoder_input_ids=decoder_input_ids).last_hidden_state
            else:
                results["encoder"] = model(**kwargs).last_hidden_state
        results[name + "_class"] = type(model).__name__
    torch.save(results, root + "/results.pt")
    """
)


def test_trust_remote_code_round_trip_without_ptmoe(tmp_path):
    torch.manual_seed(0)
    config = tiny_config(feed_forward_proj="gated-gelu")
    models = {
        "seq2seq": MoeT5ForConditionalGeneration(config).eval(),
        "model": MoeT5Model(config).eval(),
        "encoder": MoeT5EncoderModel(config).eval(),
    }
    for name, model in models.items():
        model.save_pretrained(tmp_path / name)
    input_ids, attention_mask, labels = inputs(batch=3)
    decoder_input_ids = models["model"]._shift_right(labels)
    torch.save(
        dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels,
            decoder_input_ids=decoder_input_ids,
        ),
        tmp_path / "batch.pt",
    )
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_MODULES_CACHE": str(tmp_path / "m"),
    }
    env.pop("PYTHONPATH", None)
    subprocess.run(
        [sys.executable, "-c", REMOTE_CODE_SCRIPT, str(tmp_path)],
        cwd=workdir,
        env=env,
        check=True,
        timeout=300,
    )
    results = torch.load(tmp_path / "results.pt")
    assert results["seq2seq_class"] == "MoeT5ForConditionalGeneration"
    assert results["model_class"] == "MoeT5Model" and results["encoder_class"] == "MoeT5EncoderModel"
    seq2seq, kwargs = models["seq2seq"], dict(attention_mask=attention_mask, max_new_tokens=5)
    with torch.no_grad():
        logits = seq2seq(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits
        hidden = models["model"](
            input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids
        ).last_hidden_state
        encoded = models["encoder"](input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    torch.testing.assert_close(results["logits"], logits, atol=0, rtol=0)
    torch.testing.assert_close(results["model"], hidden, atol=0, rtol=0)
    torch.testing.assert_close(results["encoder"], encoded, atol=0, rtol=0)
    assert torch.equal(results["greedy"], seq2seq.generate(input_ids, **kwargs))
    assert torch.equal(results["beam"], seq2seq.generate(input_ids, num_beams=3, **kwargs))


def test_exported_from_ptmoe():
    for name in (
        "MoeT5Config",
        "MoeT5PreTrainedModel",
        "MoeT5Model",
        "MoeT5EncoderModel",
        "MoeT5ForConditionalGeneration",
        "convert_switch_transformers",
    ):
        assert name in ptmoe.__all__ and hasattr(ptmoe, name)
