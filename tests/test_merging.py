"""merge_experts (Branch-Train-MiX): exactness, expert provenance, averaging, names, bad input, CLI."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForMaskedLM,
    BertConfig,
    BertForMaskedLM,
    BertModel,
    T5Config,
    T5ForConditionalGeneration,
)

import ptmoe
from ptmoe.cli import main as cli_main

pytestmark = pytest.mark.usefixtures("one_thread")

DENSE_BERT = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
)
DENSE_T5 = dict(
    vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, decoder_start_token_id=0
)


def dense_bert(seed: int, cls=BertForMaskedLM, **overrides):
    torch.manual_seed(seed)
    return cls(BertConfig(**{**DENSE_BERT, **overrides})).eval()


def dense_t5(seed: int):
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(T5Config(**DENSE_T5)).eval()


def ids(batch=2, length=9, seed=0):
    return torch.randint(3, 99, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("router_type", ["topk", "noisy_topk", "hash"])
def test_copies_of_one_model_reproduce_it(router_type):
    dense = dense_bert(0)
    k = 1 if router_type == "hash" else 2
    merged = ptmoe.merge_experts(
        {"a": dense, "b": dense, "c": dense}, num_experts_per_tok=k, router_type=router_type
    )
    x = ids()
    torch.testing.assert_close(merged(x).logits, dense(x).logits, atol=2e-5, rtol=1e-5)


def test_copies_of_t5_reproduce_it():
    dense = dense_t5(0)
    merged = ptmoe.merge_experts({"a": dense, "b": dense})
    x, y = ids(), ids(length=5, seed=1)
    torch.testing.assert_close(
        merged(input_ids=x, decoder_input_ids=y).logits,
        dense(input_ids=x, decoder_input_ids=y).logits,
        atol=2e-5,
        rtol=1e-5,
    )


def test_each_expert_is_its_source_ffn_and_the_rest_is_the_mean():
    sources = {"juridico": dense_bert(1), "noticias": dense_bert(2), "saude": dense_bert(3)}
    merged = ptmoe.merge_experts(sources, moe_layers=[1])
    assert merged.config.expert_names == ["juridico", "noticias", "saude"]
    moe = merged.bert.encoder.layer[1].moe
    for e, source in enumerate(sources.values()):
        layer = source.bert.encoder.layer[1]
        torch.testing.assert_close(moe.experts[e].wi.weight, layer.intermediate.dense.weight, atol=0, rtol=0)
        torch.testing.assert_close(moe.experts[e].wo.bias, layer.output.dense.bias, atol=0, rtol=0)
    mean = lambda get: torch.stack([get(s) for s in sources.values()]).mean(0)  # noqa: E731
    torch.testing.assert_close(
        merged.bert.embeddings.word_embeddings.weight,
        mean(lambda s: s.bert.embeddings.word_embeddings.weight),
    )
    torch.testing.assert_close(
        merged.bert.encoder.layer[1].attention.self.query.weight,
        mean(lambda s: s.bert.encoder.layer[1].attention.self.query.weight),
    )
    # layer 0 is not MoE: its dense FFN is the mean too
    torch.testing.assert_close(
        merged.bert.encoder.layer[0].intermediate.dense.weight,
        mean(lambda s: s.bert.encoder.layer[0].intermediate.dense.weight),
    )
    # the tied MLM decoder stays tied to the (averaged) embeddings
    assert (
        merged.cls.predictions.decoder.weight.data_ptr()
        == merged.bert.embeddings.word_embeddings.weight.data_ptr()
    )


def test_base_takes_non_expert_weights_from_one_source():
    a, b = dense_bert(1), dense_bert(2)
    merged = ptmoe.merge_experts({"a": a, "b": b}, base="b")
    torch.testing.assert_close(
        merged.bert.encoder.layer[0].attention.self.key.weight,
        b.bert.encoder.layer[0].attention.self.key.weight,
    )
    torch.testing.assert_close(
        merged.bert.encoder.layer[0].moe.experts[0].wi.weight,
        a.bert.encoder.layer[0].intermediate.dense.weight,
    )


def test_several_experts_per_domain_from_an_upcycled_source():
    a, b = dense_bert(1), dense_bert(2)
    a_moe = ptmoe.upcycle(
        a, num_experts=2, num_experts_per_tok=1, moe_layers=1, method="drop", progress=False
    )
    merged = ptmoe.merge_experts({"juridico": a_moe, "geral": b}, moe_layers=1)
    assert merged.config.expert_names == ["juridico", "juridico", "geral"]
    torch.testing.assert_close(
        merged.bert.encoder.layer[0].moe.experts[1].wi.weight,
        a_moe.bert.encoder.layer[0].moe.experts[1].wi.weight,
    )
    # a list of models gives one expert per model
    listed = ptmoe.merge_experts({"juridico": [a, a], "geral": b})
    assert listed.config.expert_names == ["juridico", "juridico", "geral"]


def test_expert_names_survive_save_reload_auto_and_remote_code(tmp_path):
    from conftest import run_without_ptmoe

    merged = ptmoe.merge_experts({"juridico": dense_bert(1), "saude": dense_bert(2)})
    merged.save_pretrained(tmp_path / "m")
    reloaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "m")
    assert reloaded.config.expert_names == ["juridico", "saude"]
    x = ids()
    torch.testing.assert_close(reloaded(x).logits, merged(x).logits)
    run_without_ptmoe(
        f"""
        from transformers import AutoModelForMaskedLM
        import torch
        m = AutoModelForMaskedLM.from_pretrained({str(tmp_path / "m")!r}, trust_remote_code=True).eval()
        assert m.config.expert_names == ["juridico", "saude"], m.config.expert_names
        out = m(torch.randint(3, 99, (1, 6)), output_router_logits=True)
        m.route_to("saude")
        out = m(torch.randint(3, 99, (1, 6)), output_router_logits=True)
        assert (out.expert_index[0][..., 0] == 1).all()
        """,
        tmp_path,
    )


def test_route_to_sends_every_token_to_the_named_experts():
    merged = ptmoe.merge_experts(
        {"a": dense_bert(1), "b": dense_bert(2), "c": dense_bert(3)}, num_experts_per_tok=2
    )
    x = ids(batch=3, length=11)
    merged.route_to("b")
    out = merged(x, output_router_logits=True)
    for index in out.expert_index:  # one expert allowed, k=2: the second slot is not dispatched
        assert (index[..., 0] == 1).all() and (index[..., 1] == -1).all()
    with merged.route_to("a", "c"):
        out = merged(x, output_router_logits=True)
        for index in out.expert_index:
            assert set(index.unique().tolist()) <= {0, 2}
    out = merged(x, output_router_logits=True)  # back to "b" after the block
    assert all((index[..., 0] == 1).all() for index in out.expert_index)
    merged.route_to(None)
    out = merged(x, output_router_logits=True)
    assert len(torch.cat([i.flatten() for i in out.expert_index]).unique()) > 1
    with pytest.raises(ValueError, match="no expert is named"):
        merged.route_to("esportes")


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------
def test_fewer_than_two_sources():
    with pytest.raises(ValueError, match="at least 2 source models"):
        ptmoe.merge_experts({"a": dense_bert(1)})


def test_different_shapes():
    with pytest.raises(ValueError, match="intermediate_size"):
        ptmoe.merge_experts({"a": dense_bert(1), "b": dense_bert(2, intermediate_size=40)})


def test_different_vocabularies():
    with pytest.raises(ValueError, match="vocab_size"):
        ptmoe.merge_experts({"a": dense_bert(1), "b": dense_bert(2, vocab_size=120)})


def test_different_architectures():
    with pytest.raises(ValueError, match="one architecture"):
        ptmoe.merge_experts({"a": dense_bert(1), "b": dense_bert(2, cls=BertModel)})
    with pytest.raises(ValueError, match="one architecture"):
        ptmoe.merge_experts({"a": dense_bert(1), "b": dense_t5(2)})


def test_unknown_base():
    with pytest.raises(ValueError, match="`base` must be one of"):
        ptmoe.merge_experts({"a": dense_bert(1), "b": dense_bert(2)}, base="c")


def test_different_tokenizers(tmp_path):
    from transformers import BertTokenizer

    paths = {}
    for name, words in (("a", ["casa", "carro", "rua"]), ("b", ["lei", "juiz", "réu"])):
        tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
        tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(tokens)})
        dense_bert(1).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
        paths[name] = str(tmp_path / name)
    with pytest.raises(ValueError, match="different tokenizer vocabularies"):
        ptmoe.merge_experts(paths)


def test_cli_merges_and_refuses_bad_input(tmp_path, capsys):
    for name, seed in (("juridico", 1), ("noticias", 2)):
        dense_bert(seed).save_pretrained(tmp_path / name)
    out = tmp_path / "merged"
    code = cli_main(
        [
            "merge-experts",
            f"juridico={tmp_path / 'juridico'}",
            f"noticias={tmp_path / 'noticias'}",
            "--out",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert AutoModelForMaskedLM.from_pretrained(out).config.expert_names == ["juridico", "noticias"]
    code = cli_main(
        [
            "merge-experts",
            f"a={tmp_path / 'juridico'}",
            f"b={tmp_path / 'nada'}",
            "--out",
            str(tmp_path / "y"),
        ]
    )
    assert code == 2 and "source 'b': no such folder" in capsys.readouterr().err
    code = cli_main(["merge-experts", f"juridico={tmp_path / 'juridico'}", "--out", str(tmp_path / "x")])
    assert code == 2 and "at least 2 source models" in capsys.readouterr().err
    code = cli_main(
        ["merge-experts", f"a={tmp_path / 'juridico'}", f"b={tmp_path / 'noticias'}", "--out", str(out)]
    )
    assert code == 2 and "not empty" in capsys.readouterr().err


def test_sources_as_paths_mixing_dense_and_moe(tmp_path):
    a, b = dense_bert(1), dense_bert(2)
    a.save_pretrained(tmp_path / "a")
    moe_b = ptmoe.upcycle(
        b, num_experts=2, num_experts_per_tok=1, moe_layers=1, method="noise", progress=False
    )
    moe_b.save_pretrained(tmp_path / "b")
    merged = ptmoe.merge_experts({"a": str(tmp_path / "a"), "b": str(tmp_path / "b")})
    assert merged.config.expert_names == ["a", "b", "b"]
    torch.testing.assert_close(
        merged.bert.encoder.layer[1].moe.experts[2].wo.weight,
        moe_b.bert.encoder.layer[1].moe.experts[1].wo.weight,
    )
    with pytest.raises(ValueError, match="same MoE layers"):
        ptmoe.merge_experts({"a": str(tmp_path / "a"), "b": str(tmp_path / "b")}, moe_layers=2)
