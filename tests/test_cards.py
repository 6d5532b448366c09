"""Model cards (ptmoe/cards.py): rendered from the registry, validated with huggingface_hub's parsers offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import EvalResult, ModelCard, metadata_load
from huggingface_hub.repocard_data import model_index_to_eval_results

import ptmoe
from ptmoe import cards, zoo
from ptmoe.cli import main as ptmoe_main

REPO_CARDS = Path(__file__).resolve().parent.parent / "model_cards"
TINY = {
    "moe_bert": dict(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37
    ),
    "moe_t5": dict(
        vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=2, num_heads=4
    ),
}
RESULT = dict(
    task_type="text-classification",
    dataset_type="assin2",
    dataset_name="ASSIN 2",
    dataset_split="test",
    metric_type="f1",
    metric_value=0.875,
)


def tiny_config(name):
    return zoo.create_config(name, **TINY[zoo.get_model_info(name).family])


@pytest.mark.parametrize("name", zoo.list_models())
def test_card_renders_and_validates_at_tiny_size(name):
    entry = ptmoe.get_model_info(name)
    text = cards.render_card(name, config=tiny_config(name))
    card = cards.validate_card(text)
    data = ModelCard(text).data
    assert data.language == "pt"
    assert data.license == entry.dense_license
    assert data.base_model == entry.dense_source
    assert data.library_name == "transformers"
    assert data.pipeline_tag == entry.pipeline_tag
    assert {"moe", "mixture-of-experts", "upcycled", "portuguese", "ptmoe"} <= set(data.tags)
    assert data.datasets == list(entry.datasets)
    assert data.eval_results is None and "model-index" not in card.data.to_dict()


def test_card_counts_are_those_of_the_real_model():
    """The counts in a card (computed on `meta`) equal those of the model built with real weights."""
    name = "moe-ptt5-base-top2-8e"
    config = tiny_config(name)
    counts = ptmoe.count_parameters(ptmoe.MoeT5ForConditionalGeneration(config))
    text = cards.render_card(name, config=config)
    assert f"| Parameters, total (all experts) | {counts['total']:,} |" in text
    assert f"| Parameters active per token | {counts['active']:,} |" in text


def test_full_size_card_describes_the_registered_architecture():
    text = cards.render_card("moe-bertimbau-large-switch-8e")
    counts = zoo.parameter_counts("moe-bertimbau-large-switch-8e")
    assert f"({counts['total']:,})" in text and f"({counts['active']:,})" in text
    assert "| Layers | 24 |" in text
    assert "encoder: 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23 (12 of 24)" in text
    assert "Switch routing" in text and "capacity" in text


def test_eval_results_add_a_parseable_model_index(tmp_path):
    name = "moe-bertimbau-base-top2-8e"
    text = cards.render_card(name, [RESULT], config=tiny_config(name))
    cards.validate_card(text)
    path = tmp_path / "README.md"
    path.write_text(text)
    metadata = metadata_load(path)
    model_name, results = model_index_to_eval_results(metadata["model-index"])
    assert model_name == name
    assert results == [EvalResult(**RESULT)]
    assert "| text-classification | ASSIN 2 | test | f1 | 0.875 | – |" in text


def test_bad_eval_result_fields_are_named():
    with pytest.raises(ValueError, match="EvalResult"):
        cards.render_card("moe-bertimbau-base-top2-8e", [{"task": "x"}])


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.replace("license: mit", "license: not-a-license"), "not a Hub license"),
        (lambda t: t.replace("- upcycled\n", ""), "tags lack"),
        (lambda t: t.replace("## Limitations", "## Caveats"), "sections missing"),
        (lambda t: t.replace("pipeline_tag: fill-mask", "pipeline_tag: guessing"), "not a Hub task"),
        (lambda t: t.replace("language: pt", "language: en"), "language must be 'pt'"),
        (lambda t: t.replace("language: pt", "language: [pt"), "does not parse"),
        (lambda t: t.split("---", 2)[2], "no YAML metadata"),
    ],
)
def test_validate_card_rejects_bad_cards(edit, message):
    name = "moe-bertimbau-base-top2-8e"
    text = cards.render_card(name, config=tiny_config(name))
    with pytest.raises(ValueError, match=message):
        cards.validate_card(edit(text))


def test_cli_cards_writes_every_card(tmp_path, capsys):
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"moe-ptt5-base-top2-8e": [RESULT]}))
    assert ptmoe_main(["cards", "--out", str(tmp_path / "cards"), "--eval-results", str(results)]) == 0
    assert f"wrote {len(zoo.list_models())} model cards" in capsys.readouterr().out
    for name in zoo.list_models():
        path = tmp_path / "cards" / name / "README.md"
        metadata = metadata_load(path)
        assert metadata["license"] == zoo.get_model_info(name).dense_license
        assert ("model-index" in metadata) == (name == "moe-ptt5-base-top2-8e")
        cards.validate_card(path)


def test_cli_cards_refuses_results_for_unknown_models(tmp_path, capsys):
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"moe-nonexistent": [RESULT]}))
    assert ptmoe_main(["cards", "--out", str(tmp_path), "--eval-results", str(results)]) == 2
    assert "unregistered models: moe-nonexistent" in capsys.readouterr().err


@pytest.mark.parametrize("name", zoo.list_models())
def test_cards_in_the_repository_are_up_to_date(name):
    """model_cards/<name>/README.md is exactly what `ptmoe cards` renders now (regenerate after edits)."""
    path = REPO_CARDS / name / "README.md"
    assert path.is_file(), f"{path} is missing: run `ptmoe cards`"
    assert path.read_text() == cards.render_card(name), f"{path} is stale: run `ptmoe cards`"


def test_card_for_a_trained_folder_without_provenance(tmp_path):
    """A checkpoint with no upcycling record gets a card from its config, flagged as needing a license."""
    config = ptmoe.MoeBertConfig(
        **TINY["moe_bert"], num_experts=4, architectures=["MoeBertForSequenceClassification"]
    )
    ptmoe.MoeBertForSequenceClassification(config).save_pretrained(tmp_path / "model")
    text = cards.card_for_model_dir(tmp_path / "model", repo_id="ptmoe-test/tiny-classifier")
    data = ModelCard(text).data
    assert data.pipeline_tag == "text-classification" and data.license == "other" and data.base_model is None
    assert 'AutoModelForSequenceClassification.from_pretrained("ptmoe-test/tiny-classifier"' in text
    assert cards.UNRECORDED_TRAINING in text
    with pytest.raises(ValueError, match="license is 'other'"):
        cards.validate_card(text)


def test_card_for_a_zoo_cache_folder_names_its_variant(tmp_path, monkeypatch):
    """A folder written by create_model(pretrained=True) carries ptmoe_zoo.json: its card is the variant's."""
    from transformers import BertConfig, BertForMaskedLM

    monkeypatch.setenv("PTMOE_CACHE", str(tmp_path / "cache"))
    BertForMaskedLM(BertConfig(**TINY["moe_bert"])).save_pretrained(tmp_path / "dense")
    name = "moe-bertimbau-base-top2-8e"
    torch.manual_seed(0)
    ptmoe.create_model(name, pretrained=True, source=tmp_path / "dense")
    (folder,) = (tmp_path / "cache").iterdir()
    text = cards.card_for_model_dir(folder)
    cards.validate_card(text)
    assert f"# {name}" in text and "base_model: neuralmind/bert-base-portuguese-cased" in text
    assert "Not trained after upcycling" in text


def test_missing_template_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="template"):
        cards.render_card("moe-ptt5-base-top2-8e", template_path=tmp_path / "nope.md")
