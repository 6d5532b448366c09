"""Domain routing: the DEMix-style router loss, supervision on a synthetic task, per-domain telemetry, the
`--domain_column` of train_mlm (MoE-BERT and MoE-T5) and its bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_scripts import FAST, load_script, tiny_bert_kwargs
from test_training import make_bert_tokenizer, make_t5_tokenizer

import ptmoe
from ptmoe.domains import (
    DomainLoadAccumulator,
    domain_load_table,
    domain_purity,
    domain_routing_loss,
    domain_routing_statistics,
    expert_indices,
    plot_domain_load,
)
from ptmoe.models.moe import expert_domain_ids, router_domain_loss
from ptmoe.telemetry import plot_expert_load

pytestmark = pytest.mark.usefixtures("one_thread")
DATA = Path(__file__).resolve().parents[1] / "ptmoe" / "data"
NAMES = ["juridico", "juridico", "saude", "informal"]


def test_router_domain_loss_matches_the_formula():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 4)
    labels = torch.tensor([0, 2, -100])
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 3:] = False
    experts = expert_domain_ids(["a", "a", "b", "c"])  # domains a=0, b=1, c=2
    assert experts.tolist() == [0, 0, 1, 2]
    probs = logits.softmax(-1)
    expected = torch.cat([-probs[0, :, :2].sum(-1).log(), -probs[1, :3, 3].log()]).mean()
    torch.testing.assert_close(router_domain_loss(logits, labels, experts, mask), expected)
    # no labelled token: zero, with a gradient path
    logits.requires_grad_(True)
    zero = router_domain_loss(logits, torch.tensor([-100, -100, -100]), experts)
    zero.backward()
    assert zero.item() == 0.0
    with pytest.raises(ValueError, match="has no expert"):
        router_domain_loss(logits, torch.tensor([5, 0, 0]), experts)


def synthetic_batch(generator: torch.Generator, batch: int = 12):
    """Domain d's texts use only token ids from its own range: the router can tell domains apart by token."""
    ranges = [(5, 35), (35, 65), (65, 99)]
    labels = torch.arange(batch) % 3
    ids = torch.stack(
        [torch.randint(*ranges[d], (10,), generator=generator) for d in labels.tolist()]
    )  # (B, S)
    return ids, labels


def purity(model, ids, labels):
    with torch.no_grad():
        out = model(ids, output_router_logits=True)
    acc = DomainLoadAccumulator(["l0", "l1"], ["a", "b", "c"], 4)
    acc.update(expert_indices(out), labels)
    return domain_purity(acc.summary(model.config.expert_names))


def test_supervision_moves_each_domain_to_its_experts(tiny_bert_config):
    torch.manual_seed(0)
    model = ptmoe.MoeBertForMaskedLM(
        tiny_bert_config(expert_names=["a", "a", "b", "c"], num_experts_per_tok=1)
    )
    generator = torch.Generator().manual_seed(0)
    test_ids, test_labels = synthetic_batch(generator, 30)
    before = purity(model.eval(), test_ids, test_labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for _ in range(60):
        ids, labels = synthetic_batch(generator)
        out = model(ids, output_router_logits=True)
        loss = domain_routing_loss(out, {}, labels, model.config.expert_names)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = purity(model.eval(), test_ids, test_labels)
    assert all(after[d] > 0.95 for d in "abc"), (before, after)
    assert sum(before.values()) / 3 < 0.7, before  # random routing: ~ #experts(d) / E


def test_accumulator_counts_and_forced_routing_purity(tiny_bert_config, tmp_path):
    model = ptmoe.MoeBertForMaskedLM(tiny_bert_config(expert_names=NAMES)).eval()
    ids = torch.randint(5, 99, (4, 7))
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[0, 5:] = 0
    labels = torch.tensor([0, 1, 2, -100])  # juridico, saude, informal, unlabelled
    out = model(ids, attention_mask=mask, output_router_logits=True)
    acc = DomainLoadAccumulator(["layer_0", "layer_1"], ["juridico", "saude", "informal"], 4)
    acc.update(expert_indices(out), labels)
    index = out.expert_index[0]
    for d in range(3):
        chosen = index[d][index[d] >= 0]
        assert acc.counts[0, d].tolist() == torch.bincount(chosen, minlength=4).double().tolist()
    assert acc.counts[0, 0].sum() == 5 * 2  # padding is not counted
    stats = acc.summary(NAMES)
    assert abs(sum(stats["layer_0"]["saude"]["load"]) - 1) < 1e-9
    table = domain_load_table(stats, NAMES)
    assert "| layer_0 | saude |" in table and "(juridico)" in table
    assert plot_domain_load(stats, tmp_path / "d.png", NAMES).stat().st_size > 0
    # forced routing: every token of every domain reaches the "saude" expert → purity 1 for saude, 0 elsewhere
    with model.route_to("saude"):
        batches = [{"input_ids": ids, "attention_mask": mask, "domain_labels": labels}]
        forced = domain_routing_statistics(model, batches)
    assert domain_purity(forced) == {"informal": 0.0, "juridico": 0.0, "saude": 1.0}


# ---------------------------------------------------------------------------------------------------------------
# The training script
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def named_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("named")
    torch.manual_seed(0)
    bert_tokenizer, t5_tokenizer = make_bert_tokenizer(), make_t5_tokenizer()
    bert = ptmoe.MoeBertForMaskedLM(
        ptmoe.MoeBertConfig(**tiny_bert_kwargs(len(bert_tokenizer)), expert_names=NAMES)
    )
    bert.save_pretrained(root / "bert")
    bert_tokenizer.save_pretrained(root / "bert")
    unnamed = ptmoe.MoeBertForMaskedLM(ptmoe.MoeBertConfig(**tiny_bert_kwargs(len(bert_tokenizer))))
    unnamed.save_pretrained(root / "unnamed")
    bert_tokenizer.save_pretrained(root / "unnamed")
    t5 = ptmoe.MoeT5ForConditionalGeneration(
        ptmoe.MoeT5Config(
            vocab_size=len(t5_tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=2,
            num_heads=4, num_experts=4, num_experts_per_tok=2, encoder_moe_layers=[1], decoder_moe_layers=[1],
            pad_token_id=t5_tokenizer.pad_token_id, eos_token_id=t5_tokenizer.eos_token_id,
            decoder_start_token_id=0, expert_names=NAMES,
        )
    )  # fmt: skip
    t5.save_pretrained(root / "t5")
    t5_tokenizer.save_pretrained(root / "t5")
    return {name: str(root / name) for name in ("bert", "unnamed", "t5")}


def domain_args(model: str, out: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", model,
        "--train_file", str(DATA / "domains_train.jsonl"), "--validation_file", str(DATA / "domains_test.jsonl"),
        "--domain_column", "domain", "--line_by_line", "--output_dir", str(out), *FAST, *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_train_mlm_with_domain_column(named_checkpoints, tmp_path, family):
    out = tmp_path / family
    extra = ["--expert_names", "juridico,noticias,saude,informal", "--router_domain_loss_coef", "0.5"]
    metrics = load_script("train_mlm").main(domain_args(named_checkpoints[family], out, *extra))
    assert metrics["eval_loss"] > 0
    config = json.loads((out / "config.json").read_text())
    assert config["expert_names"] == ["juridico", "noticias", "saude", "informal"]
    assert config["router_domain_loss_coef"] == 0.5
    assert (out / "domain_expert_load.png").stat().st_size > 0
    table = (out / "domain_expert_load.md").read_text()
    assert "| noticias |" in table and "| informal |" in table
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert any("domain/saude/purity" in entry for entry in history)


def test_domain_column_missing(named_checkpoints, tmp_path):
    with pytest.raises(ValueError, match=r"no column 'dominio' \(named by --domain_column\)"):
        load_script("train_mlm").main(
            domain_args(named_checkpoints["bert"], tmp_path / "x", "--domain_column", "dominio")
        )


def test_domain_values_without_an_expert(named_checkpoints, tmp_path):
    # the checkpoint names juridico / saude / informal experts; the data also has "noticias"
    with pytest.raises(ValueError, match=r"name no expert: \['noticias'\]"):
        load_script("train_mlm").main(domain_args(named_checkpoints["bert"], tmp_path / "x"))


def test_domain_column_needs_named_experts(named_checkpoints, tmp_path):
    with pytest.raises(ValueError, match="experts have no names"):
        load_script("train_mlm").main(domain_args(named_checkpoints["unnamed"], tmp_path / "x"))
    with pytest.raises(ValueError, match="--expert_names needs 4"):
        load_script("train_mlm").main(
            domain_args(named_checkpoints["unnamed"], tmp_path / "x", "--expert_names", "a,b")
        )


def test_domain_loss_without_domain_column(named_checkpoints, tmp_path):
    args = domain_args(named_checkpoints["bert"], tmp_path / "x", "--router_domain_loss_coef", "0.1")
    args = [a for a in args if a not in ("--domain_column", "domain")]
    with pytest.raises(ValueError, match="needs --domain_column"):
        load_script("train_mlm").main(args)


def test_expert_load_heatmap_shows_expert_names(tmp_path):
    stats = {"layer_0": {"load": [0.5, 0.25, 0.25, 0.0]}}
    assert plot_expert_load(stats, tmp_path / "e.png", expert_names=NAMES).stat().st_size > 0


@pytest.mark.parametrize("router_type", ["topk", "switch", "noisy_topk", "hash"])
def test_forced_routing_for_every_router(tiny_bert_config, router_type):
    k = 1 if router_type in ("switch", "hash") else 2
    config = tiny_bert_config(
        expert_names=NAMES, router_type=router_type, num_experts_per_tok=k, eval_capacity_factor=4.0
    )
    model = ptmoe.MoeBertForMaskedLM(config).eval()
    ids = torch.randint(5, 99, (2, 9))
    with model.route_to("juridico"):  # experts 0 and 1
        out = model(ids, output_router_logits=True)
    for index in out.expert_index:
        assert set(index.unique().tolist()) <= {0, 1, -1} and (index[..., 0] >= 0).all()
    with model.route_to(3):  # by expert id
        out = model(ids, output_router_logits=True)
    assert all((index[..., 0] == 3).all() for index in out.expert_index)


@pytest.mark.parametrize(
    "overrides", [dict(router_type="expert_choice"), dict(router_type="hierarchical", router_groups=2)]
)
def test_forced_routing_is_refused_by_routers_that_cannot_apply_it(tiny_bert_config, overrides):
    model = ptmoe.MoeBertForMaskedLM(tiny_bert_config(expert_names=NAMES, **overrides))
    with pytest.raises(ValueError, match="forced routing is not supported"):
        model.route_to("juridico")


def test_finetune_classification_with_domain_column(named_checkpoints, tmp_path):
    out = tmp_path / "cls"
    metrics = load_script("finetune_classification").main([
        "--model_name_or_path", named_checkpoints["bert"],
        "--train_file", str(DATA / "domains_train.jsonl"), "--validation_file", str(DATA / "domains_test.jsonl"),
        "--label_column", "domain", "--domain_column", "domain",
        "--expert_names", "juridico,noticias,saude,informal", "--router_domain_loss_coef", "0.1",
        "--output_dir", str(out), *FAST,
    ])  # fmt: skip
    assert "eval_accuracy" in metrics
    assert "| juridico |" in (out / "domain_expert_load.md").read_text()
