"""Wanda pruning (ptmoe/compress/pruning.py): the paper's score and masks against brute-force oracles, routed-token
statistics for experts, save/reload (Auto classes, trust_remote_code, 4-bit, LoRA per expert) and bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ptmoe
from conftest import TINY_BERT, run_without_ptmoe
from ptmoe.calibration import collect_input_norms
from ptmoe.compress import nm_mask, prune_wanda, save_pruned, wanda_mask, wanda_scores
from ptmoe.models.moe import HashRouter

pytestmark = pytest.mark.usefixtures("one_thread")

# intermediate 40 (not the usual 37) so that every pruned width is a multiple of 4 and 2:4 applies everywhere.
TINY = {**TINY_BERT, "intermediate_size": 40}


def tiny(model_class=ptmoe.MoeBertForMaskedLM, seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    return model_class(ptmoe.MoeBertConfig(**{**TINY, **overrides})).eval()


def calibration(
    seed: int = 0, batch: int = 6, seq: int = 12, padded: bool = True
) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, 99, (batch, seq), generator=g)
    attention_mask = torch.ones_like(input_ids)
    if padded:
        attention_mask[0, -4:] = 0
        input_ids[0, -4:] = 0
    return [{"input_ids": input_ids, "attention_mask": attention_mask}]


def recorded_inputs(model: nn.Module, batches, names) -> dict[str, list[torch.Tensor]]:
    """Brute force: every input a module receives in a plain forward, and each MoE block's routing."""
    seen: dict[str, list] = {name: [] for name in names}
    modules = dict(model.named_modules())
    handles = [
        modules[name].register_forward_hook(lambda m, a, o, name=name: seen[name].append((a[0].detach(), o)))
        for name in names
    ]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for handle in handles:
        handle.remove()
    return seen


# --------------------------------------------------------------------------------------------------------------
# The score and the masks
# --------------------------------------------------------------------------------------------------------------
def test_wanda_mask_on_known_inputs():
    weight = torch.tensor([[1.0, -2.0, 3.0, -4.0], [4.0, 3.0, -2.0, 1.0]])
    inputs = torch.tensor([[4.0, 0.0, 0.0, 1.0], [0.0, 3.0, 1.0, 0.0]])  # ‖X_j‖ = (4, 3, 1, 1)
    scores = wanda_scores(weight, inputs.pow(2).sum(0))
    torch.testing.assert_close(scores, torch.tensor([[4.0, 6.0, 3.0, 4.0], [16.0, 9.0, 2.0, 1.0]]))
    # Per row, the 2 lowest |W|·‖X‖ (magnitude alone would prune columns 0,1 of row 0 instead).
    expected = torch.tensor([[True, False, True, False], [False, False, True, True]])
    assert torch.equal(wanda_mask(scores, 0.5), expected)
    assert not wanda_mask(scores, 0.0).any()
    # N:M keeps the N best of each group of M: 1:2 → the better of columns (0, 1) and of (2, 3), per row.
    assert torch.equal(
        nm_mask(scores, 1, 2), torch.tensor([[True, False, True, False], [False, True, False, True]])
    )


def test_pruned_layer_equals_the_ranking_of_its_real_inputs():
    """A whole model: attention and expert linears of the first layer lose exactly their per-row lowest scores,
    computed by brute force from the inputs a plain forward gives them (real tokens only, routed rows for experts)."""
    model = tiny()
    batches = calibration()
    query, expert_wi = "bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.moe.experts.1.wi"
    block = "bert.encoder.layer.0.moe"
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in (query, expert_wi)}
    seen = recorded_inputs(model, batches, [query, block])
    real = batches[0]["attention_mask"].bool()  # (B, S)
    x_query = seen[query][0][0][real]  # (real tokens, H)
    block_input, (_, routing) = seen[block][0][0], seen[block][0][1]
    routed = (routing.expert_index == 1).any(-1)  # (B, S): tokens dispatched to expert 1
    x_expert = block_input[routed]

    prune_wanda(model, batches, sparsity=0.5, show_progress=False, min_tokens=1)
    for name, x in ((query, x_query), (expert_wi, x_expert)):
        weight = weights[name]
        scores = weight.abs() * x.pow(2).sum(0).sqrt()  # (out, in)
        num_pruned = weight.shape[1] // 2
        expected = torch.zeros_like(weight, dtype=torch.bool)
        for row in range(weight.shape[0]):
            expected[row, scores[row].argsort()[:num_pruned]] = True
        assert torch.equal(model.get_submodule(name).weight == 0, expected), name


def test_nm_masks_are_valid_and_keep_the_best_scores():
    model = tiny()
    report = prune_wanda(model, calibration(), structure="2:4", show_progress=False, min_tokens=1)
    assert report.sparsity == 0.5 and report.structure == "2:4"
    for name in report.layer_sparsity:
        groups = model.get_submodule(name).weight.reshape(-1, 4)
        assert ((groups == 0).sum(-1) >= 2).all(), name  # at most 2 non-zeros per group of 4
    assert report.overall_sparsity == pytest.approx(0.5, abs=1e-3)


def test_routed_token_statistics_differ_from_all_tokens_and_are_used():
    model = tiny(num_experts_per_tok=1)
    batches = calibration(padded=False)
    block = "bert.encoder.layer.0.moe"
    names = [f"{block}.experts.{e}.{p}" for e in range(4) for p in ("wi", "wo")]
    stats = collect_input_norms(model, batches, names=names)
    ((block_input, (_, routing)),) = recorded_inputs(model, batches, [block])[block]
    flat = block_input.reshape(-1, block_input.shape[-1])
    all_tokens = flat.pow(2).sum(0)
    counts = torch.bincount(routing.expert_index.reshape(-1), minlength=4)
    assert stats.expert_tokens[block] == counts.tolist()
    for e in range(4):
        routed = flat[routing.expert_index.reshape(-1) == e]
        torch.testing.assert_close(stats.sq_norms[f"{block}.experts.{e}.wi"], routed.pow(2).sum(0))
        assert stats.rows[f"{block}.experts.{e}.wi"] == routed.shape[0]
        assert not torch.allclose(stats.sq_norms[f"{block}.experts.{e}.wi"], all_tokens)
        # `wo` sees act(wi(x)) of the routed tokens only — never the block's CPU padding rows (act(bias) ≠ 0).
        expert = model.get_submodule(f"{block}.experts.{e}")
        hidden = expert.act(expert.wi(routed))
        torch.testing.assert_close(stats.sq_norms[f"{block}.experts.{e}.wo"], hidden.pow(2).sum(0))


def test_all_tokens_ablation_uses_every_token_of_the_layer():
    model = tiny(num_experts_per_tok=1)
    batches = calibration(padded=False)
    block = "bert.encoder.layer.0.moe"
    names = [f"{block}.experts.{e}.{p}" for e in range(4) for p in ("wi", "wo")]
    stats = collect_input_norms(model, batches, names=names, expert_statistics="all_tokens")
    ((block_input, _),) = recorded_inputs(model, batches, [block])[block]
    flat = block_input.reshape(-1, block_input.shape[-1])
    for e in range(4):
        expert = model.get_submodule(f"{block}.experts.{e}")
        torch.testing.assert_close(stats.sq_norms[f"{block}.experts.{e}.wi"], flat.pow(2).sum(0))
        torch.testing.assert_close(
            stats.sq_norms[f"{block}.experts.{e}.wo"], expert.act(expert.wi(flat)).pow(2).sum(0)
        )
        assert stats.rows[f"{block}.experts.{e}.wo"] == flat.shape[0]
    with pytest.raises(ValueError, match="expert_statistics"):
        prune_wanda(tiny(), batches, expert_statistics="everything")


def test_padding_rows_of_small_experts_are_not_counted():
    """3 tokens, top-1: experts get 1-3 tokens, and CPU fp32 inference pads 2-3 rows to 4 inside the block."""
    model = tiny(num_experts_per_tok=1)
    batches = [{"input_ids": torch.tensor([[7, 8, 9]])}]
    block = "bert.encoder.layer.0.moe"
    names = [f"{block}.experts.{e}.wo" for e in range(4)]
    stats = collect_input_norms(model, batches, names=names)
    assert sum(stats.rows[n] for n in names) == 3
    assert sum(stats.expert_tokens[block]) == 3


def test_expert_without_calibration_tokens_is_reported_not_pruned():
    model = tiny(router_type="hash", num_experts_per_tok=1)
    table = HashRouter.build_table(99, 4)
    ids = [i for i in range(5, 99) if table[i] != 3]
    batches = [{"input_ids": torch.tensor([ids[:40]])}]
    before = model.get_submodule("bert.encoder.layer.0.moe.experts.3.wi").weight.clone()
    report = prune_wanda(model, batches, show_progress=False, min_tokens=1)
    assert report.unpruned_experts == [
        "bert.encoder.layer.0.moe.experts.3",
        "bert.encoder.layer.1.moe.experts.3",
    ]
    assert torch.equal(model.get_submodule("bert.encoder.layer.0.moe.experts.3.wi").weight, before)
    assert report.expert_tokens["bert.encoder.layer.0.moe"][3] == 0
    assert model.config.pruning["unpruned_experts"] == report.unpruned_experts


def test_by_load_prunes_less_used_experts_harder():
    model = tiny()
    report = prune_wanda(model, calibration(), sparsity=0.4, expert_sparsity="by_load", show_progress=False)
    block = "bert.encoder.layer.0.moe"
    counts = report.expert_tokens[block]
    targets = [report.expert_sparsity[f"{block}.experts.{e}"] for e in range(4)]
    assert targets == [pytest.approx(0.4 * (2 - 4 * c / sum(counts))) for c in counts]
    assert targets[counts.index(min(counts))] == max(targets)
    assert sum(targets) / 4 == pytest.approx(0.4)
    wi = report.layer_sparsity[f"{block}.experts.{counts.index(min(counts))}.wi"]
    assert wi == pytest.approx(int(32 * max(targets)) / 32)


def test_heads_routers_and_embeddings_are_kept():
    model = tiny()
    router = model.bert.encoder.layer[0].moe.router.weight.clone()
    embeddings = model.bert.embeddings.word_embeddings.weight.clone()
    report = prune_wanda(model, calibration(), show_progress=False)
    assert torch.equal(model.bert.encoder.layer[0].moe.router.weight, router)
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, embeddings)
    assert "cls.predictions.transform.dense" in report.skipped
    assert not any("router" in name for name in report.layer_sparsity)
    report = prune_wanda(tiny(), calibration(), skip=[r".*\.attention"], show_progress=False)
    assert not any("attention" in name for name in report.layer_sparsity)


def test_texts_and_dataset_calibration_with_the_folder_tokenizer(tmp_path):
    import datasets
    from test_training import make_bert_tokenizer

    tokenizer = make_bert_tokenizer()
    tiny(vocab_size=len(tokenizer)).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    texts = ["O gato dorme no sofá da sala.", "Chove muito em Belém no verão.", "A feira abre cedo."] * 4
    model = ptmoe.MoeBertForMaskedLM.from_pretrained(tmp_path / "m")
    report = prune_wanda(model, texts, show_progress=False)  # tokenizer from the model's folder
    model2 = ptmoe.MoeBertForMaskedLM.from_pretrained(tmp_path / "m")
    report2 = prune_wanda(model2, datasets.Dataset.from_dict({"text": texts}), show_progress=False)
    assert report.calibration_tokens == report2.calibration_tokens > 64
    assert torch.equal(
        model.bert.encoder.layer[1].moe.experts[0].wo.weight,
        model2.bert.encoder.layer[1].moe.experts[0].wo.weight,
    )


def test_bf16_model_stays_bf16():
    model = tiny().to(torch.bfloat16)
    report = prune_wanda(model, calibration(), show_progress=False)
    weight = model.get_submodule("bert.encoder.layer.1.moe.experts.2.wo").weight
    assert weight.dtype == torch.bfloat16 and report.overall_sparsity == pytest.approx(0.5, abs=0.01)


def test_moe_t5_prunes_encoder_and_decoder():
    torch.manual_seed(0)
    config = ptmoe.MoeT5Config(
        vocab_size=99, d_model=32, d_kv=8, d_ff=40, num_layers=2, num_heads=4, num_experts=4,
        num_experts_per_tok=2, encoder_moe_layers=[1], decoder_moe_layers=[1], decoder_start_token_id=0,
    )  # fmt: skip
    model = ptmoe.MoeT5ForConditionalGeneration(config).eval()
    report = prune_wanda(model, calibration(padded=False), show_progress=False)
    assert set(report.expert_tokens) == {"encoder.block.1.layer.1.moe", "decoder.block.1.layer.2.moe"}
    assert "lm_head" in report.skipped
    assert any(n.startswith("decoder.") and "EncDecAttention" in n for n in report.layer_sparsity)


# --------------------------------------------------------------------------------------------------------------
# The pruned checkpoint: Auto classes, trust_remote_code, 4-bit, LoRA per expert
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory):
    model = tiny(ptmoe.MoeBertForSequenceClassification, num_labels=2)
    prune_wanda(model, calibration(), structure="2:4", show_progress=False, min_tokens=1)
    path = tmp_path_factory.mktemp("pruned") / "moe"
    save_pruned(model, path)
    return path, model


def test_pruned_checkpoint_reloads_through_auto_classes(pruned_dir):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path, model = pruned_dir
    assert sorted(p.name for p in path.iterdir() if p.suffix in (".safetensors", ".bin")) == [
        "model.safetensors"
    ]
    reloaded = AutoModelForSequenceClassification.from_pretrained(path).eval()
    batch = calibration(1)[0]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits)
    assert AutoConfig.from_pretrained(path).pruning["structure"] == "2:4"
    with pytest.raises(FileExistsError, match="not empty"):
        save_pruned(model, path)


def test_pruned_checkpoint_loads_with_trust_remote_code(pruned_dir, tmp_path):
    path, model = pruned_dir
    result = run_without_ptmoe(
        f"""
        import transformers
        model = transformers.AutoModelForSequenceClassification.from_pretrained({str(path)!r}, trust_remote_code=True)
        assert "ptmoe" not in type(model).__module__
        w = model.bert.encoder.layer[0].moe.experts[0].wi.weight
        print((w == 0).float().mean().item())
        """,
        tmp_path,
    )
    assert float(result.stdout.strip().splitlines()[-1]) == pytest.approx(0.5)


def test_pruned_checkpoint_takes_4bit_loading_and_expert_lora(pruned_dir):
    from peft import get_peft_model

    path, model = pruned_dir
    quantized = ptmoe.MoeBertForSequenceClassification.from_pretrained(
        path, quantization_config=ptmoe.bnb_4bit_config(compute_dtype=torch.float32)
    ).eval()
    batch = calibration(1)[0]
    with torch.no_grad():
        reference, out = model(**batch).logits, quantized(**batch).logits
    assert ((out - reference).norm() / reference.norm()).item() < 0.05
    peft_model = get_peft_model(
        ptmoe.MoeBertForSequenceClassification.from_pretrained(path),
        ptmoe.expert_lora_config(model, r=2, experts={0: [0, 1]}),
    )
    lora_names = [n for n, _ in peft_model.named_modules() if n.endswith("lora_A")]
    assert len(lora_names) == 4  # wi and wo of experts 0 and 1 of layer 0
    peft_model(**batch, labels=torch.tensor([0] * 6)).loss.backward()


# --------------------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, True, "0.5"])
def test_sparsity_outside_the_unit_interval(sparsity):
    with pytest.raises(ValueError, match=r"`sparsity` must be a number in \[0, 1\)"):
        prune_wanda(tiny(), calibration(), sparsity=sparsity)


@pytest.mark.parametrize(
    "structure, message",
    [
        ("2:3", "divisible by 3, but .*query has 32 inputs"),
        ("4:2", "0 < N < M"),
        ("2-4", "'unstructured' or 'N:M'"),
        ("0:4", "0 < N < M"),
    ],
)
def test_bad_structures(structure, message):
    model = tiny(intermediate_size=37) if structure == "2:3" else tiny()
    with pytest.raises(ValueError, match=message):
        prune_wanda(model, calibration(), structure=structure)


def test_nm_not_dividing_a_width_names_the_layer():
    with pytest.raises(ValueError, match=r"experts\.0\.wo has 37 inputs"):
        prune_wanda(tiny(intermediate_size=37), calibration(), structure="2:4")


def test_contradicting_sparsity_and_by_load_with_nm():
    with pytest.raises(ValueError, match="contradicts"):
        prune_wanda(tiny(), calibration(), sparsity=0.7, structure="2:4")
    with pytest.raises(ValueError, match="by_load"):
        prune_wanda(tiny(), calibration(), structure="2:4", expert_sparsity="by_load")


@pytest.mark.parametrize("data", [[], None, ["", "  "], "um texto só"])
def test_empty_calibration_data(data):
    with pytest.raises(ValueError, match="calibration_data"):
        prune_wanda(tiny(), data)


def test_too_short_calibration_data():
    with pytest.raises(ValueError, match="too short: 5 tokens"):
        prune_wanda(tiny(), [{"input_ids": torch.tensor([[5, 6, 7, 8, 9]])}])


def test_texts_without_tokenizer():
    with pytest.raises(ValueError, match="pass `tokenizer=`"):
        prune_wanda(tiny(), ["Um texto sem tokenizador."])


def test_quantized_or_peft_model_is_refused():
    from peft import get_peft_model

    model = tiny()
    peft_model = get_peft_model(model, ptmoe.expert_lora_config(model, r=2))
    with pytest.raises(ValueError, match="prune before 4-bit"):
        prune_wanda(peft_model, calibration())


# --------------------------------------------------------------------------------------------------------------
# `ptmoe prune`
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from test_training import make_bert_tokenizer

    tokenizer = make_bert_tokenizer()
    path = tmp_path_factory.mktemp("cli") / "moe"
    tiny(vocab_size=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_cli_prune_writes_a_pruned_folder(model_dir, tmp_path, capsys):
    from pathlib import Path

    from ptmoe.cli import main

    corpus = Path(ptmoe.__file__).parent / "data" / "corpus.txt"
    out = tmp_path / "pruned"
    args = [
        str(model_dir),
        str(out),
        "--calibration",
        str(corpus),
        "--max-samples",
        "16",
        "--structure",
        "2:4",
    ]
    assert main(["prune", *args]) == 0
    assert "50.0% of" in capsys.readouterr().out
    model = ptmoe.MoeBertForMaskedLM.from_pretrained(out)
    assert model.config.pruning["structure"] == "2:4" and (out / "tokenizer.json").exists()
    assert main(["prune", *args]) == 2  # refuses the non-empty output
    assert "not empty" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--sparsity", "1.2"], "must be a number in [0, 1)"),
        (["--structure", "3:4:5"], "'unstructured' or 'N:M'"),
        (["--calibration", "missing.txt"], "does not exist"),
        (["--max-samples", "1", "--min-tokens", "500"], "too short"),
    ],
)
def test_cli_prune_bad_input(model_dir, tmp_path, capsys, extra, message):
    from pathlib import Path

    from ptmoe.cli import main

    corpus = Path(ptmoe.__file__).parent / "data" / "corpus.txt"
    args = ["prune", str(model_dir), str(tmp_path / "out"), "--calibration", str(corpus), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "ptmoe prune: error:" in err and message in err and not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------------------
# scripts/bench_prune.py
# --------------------------------------------------------------------------------------------------------------
def test_bench_prune_quick(tmp_path, capsys):
    import json

    from test_scripts import load_script

    load_script("bench_prune").main(
        ["--quick", "--threads", "1", "--output", str(tmp_path / "r.json"), "--report_to", "codecarbon",
         "--energy_country_iso_code", "BRA"]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "wanda 2:4" in printed and "magnitude 50%" in printed and "semi-structured" in printed
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["variants"]["wanda 50%"][0]["overall_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert set(results["speed"]) == {"model", "linear", "semi_structured_2_4"}
    assert results["summary"]["dense"]["kl_to_dense_median"] == 0.0
    assert results["summary"]["wanda 70%"]["kl_to_dense_median"] > 0
    assert results["energy"]["energy_kwh"] > 0 and results["energy"]["country_iso_code"] == "BRA"


def test_bench_masks_at_least_one_real_token_per_line():
    from test_scripts import load_script
    from test_training import make_bert_tokenizer

    bench = load_script("bench_prune")
    tokenizer = make_bert_tokenizer()
    (batch,) = bench.masked_batches(tokenizer, ["Bom dia.", "A casa amarela fica perto do rio."], seed=0)
    masked = batch["labels"] != -100
    assert masked.sum(1).min() >= 1
    assert (batch["input_ids"][masked] == tokenizer.mask_token_id).all()
    assert not masked[batch["attention_mask"] == 0].any()


def test_dense_bert_is_pruned_too():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(
            vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40
        )
    ).eval()
    report = prune_wanda(model, calibration(), show_progress=False)
    assert report.overall_sparsity == pytest.approx(0.5) and report.expert_tokens == {}
    assert {"classifier", "bert.pooler.dense"} <= set(report.skipped)
