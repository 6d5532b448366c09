"""ptmoe.evaluation: the suite table against its fixtures, schema errors, the quick end-to-end run, seeds, cards."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from huggingface_hub import EvalResult
from huggingface_hub.repocard_data import model_index_to_eval_results

from ptmoe import cards
from ptmoe.cli import main as ptmoe_main
from ptmoe.evaluation import suites
from ptmoe.evaluation.cli import build_quick_models
from ptmoe.evaluation.cli import main as evaluate_pt_main
from ptmoe.evaluation.run import (
    RESULTS_FORMAT,
    finetune_and_evaluate,
    results_to_eval_results,
    summarise,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# The columns of each dataset on the Hub (loading scripts / dataset_infos of assin2, harem, lener_br).
HUB_SCHEMAS = {
    "assin2": {"sentence_pair_id", "premise", "hypothesis", "relatedness_score", "entailment_judgment"},
    "harem-selective": {"id", "tokens", "ner_tags"},
    "harem-total": {"id", "tokens", "ner_tags"},
    "lener-br": {"id", "tokens", "ner_tags"},
}
# Tag order of the Hub ClassLabels (harem.py / lener_br.py in huggingface/datasets).
HUB_TAGS = {
    "harem-selective": ["O", "B-PESSOA", "I-PESSOA", "B-ORGANIZACAO", "I-ORGANIZACAO", "B-LOCAL", "I-LOCAL",
                        "B-TEMPO", "I-TEMPO", "B-VALOR", "I-VALOR"],
    "lener-br": ["O", "B-ORGANIZACAO", "I-ORGANIZACAO", "B-PESSOA", "I-PESSOA", "B-TEMPO", "I-TEMPO", "B-LOCAL",
                 "I-LOCAL", "B-LEGISLACAO", "I-LEGISLACAO", "B-JURISPRUDENCIA", "I-JURISPRUDENCIA"],
}  # fmt: skip
HUB_TAGS["harem-total"] = HUB_TAGS["harem-selective"] + [
    f"{p}-{t}" for t in ("ABSTRACCAO", "ACONTECIMENTO", "COISA", "OBRA", "OUTRO") for p in "BI"
]


# --------------------------------------------------------------------------- the table


@pytest.mark.parametrize("name", suites.list_suites())
def test_every_suite_matches_its_fixture(name):
    suite = suites.get_suite(name)
    for split in suites.SPLITS:
        rows = [json.loads(line) for line in (suite.fixture_dir / f"{split}.jsonl").read_text().splitlines()]
        assert rows, (name, split)
        for row in rows:
            assert set(row) == HUB_SCHEMAS[suite.fixture_name], (name, split, row)
    raw = suites.load_suite_data(suite, "fixtures")
    assert set(raw) == set(suites.SPLITS)
    for dataset in raw.values():
        assert set(suite.columns.values()) <= set(dataset.column_names)
        if suite.task_type == "ner":
            assert dataset.features[suite.columns["tags"]].feature.names == list(suite.labels)
            tags = {t for row in dataset[suite.columns["tags"]] for t in row}
            assert tags <= set(range(len(suite.labels)))
            assert all(len(w) == len(t) for w, t in zip(dataset["tokens"], dataset["ner_tags"], strict=True))
        elif suite.task_type == "classification":
            assert dataset.features[suite.columns["label"]].names == list(suite.labels)
            assert set(dataset[suite.columns["label"]]) == set(
                range(len(suite.labels))
            )  # every class present
        else:
            scores = dataset[suite.columns["label"]]
            assert all(1.0 <= s <= 5.0 for s in scores)


@pytest.mark.parametrize("name", ["harem-selective", "harem-total", "lener-br"])
def test_tag_sets_are_the_hub_class_labels_in_order(name):
    assert list(suites.get_suite(name).labels) == HUB_TAGS[name]


def test_table_records_provenance_protocol_and_anchors():
    for suite in suites.SUITES.values():
        assert suite.hub_id and suite.licence and suite.verified and suite.citation
        assert suite.original is not None and set(suite.original.urls) == set(suites.SPLITS)
        assert suite.protocol.epochs > 0 and suite.protocol.seeds and suite.protocol.source
        for anchor in suite.anchors:
            assert 0 < anchor.value < 1 and anchor.source
    anchors = {(n, a.model): a.value for n, s in suites.SUITES.items() for a in s.anchors}
    assert anchors[("assin2-sts", "BERTimbau-base")] == 0.836
    assert anchors[("assin2-rte", "BERTimbau-large")] == 0.900
    assert anchors[("harem-selective", "BERTimbau-large")] == 0.837
    assert anchors[("harem-total", "BERTimbau-base")] == 0.776  # neuralmind-ai/portuguese-bert README table
    assert anchors[("harem-total", "BERTimbau-large")] == 0.785
    assert suites.get_suite("harem-total").hub_id == "Linguateca/harem"
    assert "1e-3" in suites.get_suite("harem-total").protocol.source  # BERTimbau's classifier-head lr
    assert "7,825" in suites.get_suite("lener-br").protocol.source  # PortuLex's copy of LeNER-Br
    notes = " ".join(
        s.unverified + s.protocol.source + " ".join(a.source for a in s.anchors)
        for s in suites.SUITES.values()
    )
    for verified_now in ("unverified guesses", "ptmoe issue 16", "macro average", "parquet conversion"):
        assert verified_now not in notes
    assert anchors[("lener-br", "RoBERTaLexPT-base")] == 0.9073
    assert suites.anchors_for("peluz/lener_br", None, "seqeval") == suites.get_suite("lener-br").anchors


def test_resolve_suites_and_unknown_names():
    assert [s.name for s in suites.resolve_suites("assin2,lener-br")] == [
        "assin2-sts",
        "assin2-rte",
        "lener-br",
    ]
    assert [s.name for s in suites.resolve_suites("harem-*")] == ["harem-selective", "harem-total"]
    assert len(suites.resolve_suites("all")) == len(suites.SUITES)
    with pytest.raises(ValueError, match="Unknown suite 'assin3'.*assin2-sts"):
        suites.resolve_suites("assin3")


# --------------------------------------------------------------------------- schema errors name the dataset


def _mirror(tmp_path, suite, edit):
    """A copy of the suite's fixture with `edit(row)` applied to every row of every split."""
    folder = tmp_path / suite.fixture_name
    folder.mkdir()
    for split in suites.SPLITS:
        rows = [json.loads(line) for line in (suite.fixture_dir / f"{split}.jsonl").read_text().splitlines()]
        (folder / f"{split}.jsonl").write_text(
            "\n".join(json.dumps(edit(dict(r)), ensure_ascii=False) for r in rows)
        )
    return folder


def test_wrong_column_names_the_dataset(tmp_path):
    suite = suites.get_suite("assin2-rte")
    folder = _mirror(
        tmp_path, suite, lambda r: {("label" if k == "entailment_judgment" else k): v for k, v in r.items()}
    )
    with pytest.raises(ValueError, match=r"ASSIN 2 \(RTE\) \(assin2-rte\).*no column.*entailment_judgment"):
        suites.load_suite_data(suite, folder)


def test_wrong_label_set_names_the_dataset(tmp_path):
    suite = suites.get_suite("lener-br")
    folder = _mirror(
        tmp_path, suite, lambda r: {**r, "ner_tags": [t + 20 if t else 0 for t in r["ner_tags"]]}
    )
    with pytest.raises(ValueError, match=r"LeNER-Br \(lener-br\).*not in the suite's label set"):
        suites.load_suite_data(suite, folder)
    # label *names* work when they are the suite's, and fail clearly when they are another dataset's tags
    names = list(suite.labels)
    folder = (
        _mirror(tmp_path / "names", suite, lambda r: {**r, "ner_tags": [names[t] for t in r["ner_tags"]]})
        if ((tmp_path / "names").mkdir() or True)
        else None
    )
    raw = suites.load_suite_data(suite, folder)
    assert raw["train"].features["ner_tags"].feature.names == names
    harem = suites.get_suite("harem-selective")
    with pytest.raises(ValueError, match=r"MiniHAREM \(5 classes\) \(harem-selective\).*B-LEGISLACAO"):
        suites.load_suite_data(harem, folder)


def test_other_class_label_set_names_the_dataset(tmp_path):
    """A saved dataset whose ClassLabel is another configuration's (10-class HAREM where 5 are expected)."""
    total = suites.load_suite_data("harem-total", "fixtures")
    total.save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match=r"harem-selective.*label set is.*ABSTRACCAO.*configuration"):
        suites.load_suite_data("harem-selective", tmp_path / "saved")


def test_missing_split_file_and_unreachable_hub(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"id": "0", "tokens": ["a"], "ner_tags": [0]}\n')
    with pytest.raises(FileNotFoundError, match=r"LeNER-Br \(lener-br\): no validation/test file"):
        suites.load_suite_data("lener-br", tmp_path)
    with pytest.raises(ValueError, match=r"peluz/lener_br.*--prepare-data DIR --suite lener-br.*--data_dir"):
        suites.load_suite_data("lener-br")  # offline in tests: every source of the chain is unreachable


# --------------------------------------------------------------------------- running


@pytest.fixture(scope="module")
def quick_models(tmp_path_factory):
    return build_quick_models(tmp_path_factory.mktemp("quick_models"))


def test_summarise_uses_the_sample_standard_deviation():
    values = [0.81, 0.84, 0.79]
    out = summarise(values)
    assert out["mean"] == pytest.approx(statistics.mean(values))
    assert out["std"] == pytest.approx(statistics.stdev(values))
    assert (out["min"], out["max"], out["n"]) == (0.79, 0.84, 3)
    assert summarise([0.5])["std"] == 0.0


def test_seeds_reproduce(quick_models, tmp_path):
    moe, _ = quick_models
    suite = suites.get_suite("assin2-rte")
    raw = suites.load_suite_data(suite, "fixtures", splits=("train", "test"))
    protocol = {"epochs": 1, "learning_rate": 1e-3, "batch_size": 4, "max_length": 48, "max_steps": 2}
    runs = [
        finetune_and_evaluate(moe, suite, raw, seed, protocol, tmp_path / f"run{i}")
        for i, seed in enumerate((3, 3, 4))
    ]
    assert runs[0]["eval_loss"] == runs[1]["eval_loss"]
    assert runs[0]["eval_f1"] == runs[1]["eval_f1"]
    assert runs[0]["eval_loss"] != runs[2]["eval_loss"]  # another seed: another head and data order


def test_quick_run_writes_results_that_render_into_a_card(quick_models, tmp_path, capsys):
    out = tmp_path / "eval"
    moe, dense = quick_models
    args = ["--quick", "--model", moe, "--dense_model", dense, "--suite", "assin2-rte,harem-selective",
            "--seeds", "0,1", "--output_dir", str(out)]  # fmt: skip
    assert evaluate_pt_main(args) == 0
    printed = capsys.readouterr().out
    assert "published: BERTimbau-base 0.892" in printed and "smoke test" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["format"] == RESULTS_FORMAT and results["model_name"] == "moe"
    assert [r["suite"] for r in results["results"]] == ["assin2-rte", "harem-selective"]
    for entry in results["results"]:
        values = [run["value"] for run in entry["model"]["runs"]]
        assert [run["seed"] for run in entry["model"]["runs"]] == [0, 1]
        assert entry["model"]["mean"] == pytest.approx(statistics.mean(values))
        assert entry["model"]["std"] == pytest.approx(statistics.stdev(values))
        assert entry["dense_baseline"]["n"] == 2
        assert entry["delta_vs_dense"] == pytest.approx(
            entry["model"]["mean"] - entry["dense_baseline"]["mean"]
        )
        assert entry["dataset"]["fixtures"] is True and entry["anchors"]
        fixture_dir = suites.get_suite(entry["suite"]).fixture_dir
        assert Path(entry["dataset"]["source"]).resolve() == fixture_dir.resolve()  # where the data came from
    # the same command again refuses to overwrite (the script's run_script turns this into one line, exit 2)
    with pytest.raises(FileExistsError, match="not empty"):
        evaluate_pt_main(args)

    assert ptmoe_main(["cards", "--eval-results", str(out / "results.json"), "--model-dir", moe,
                       "--out", str(tmp_path / "cards"), "--license", "apache-2.0"]) == 0  # fmt: skip
    card = tmp_path / "cards" / "moe" / "README.md"
    parsed = cards.validate_card(card)
    name, eval_results = model_index_to_eval_results(parsed.data.to_dict()["model-index"])
    assert name == "moe"
    assert [(r.dataset_type, r.dataset_config, r.metric_type) for r in eval_results] == [
        ("nilc-nlp/assin2", None, "f1"),
        ("Linguateca/harem", "selective", "seqeval"),
    ]
    for result, entry in zip(eval_results, results["results"], strict=True):
        assert result.metric_value == pytest.approx(round(entry["model"]["mean"], 4))
        assert "mean of 2 seeds" in result.metric_name
    text = card.read_text()
    assert "BERTimbau-base 0.892, BERTimbau-large 0.9" in text  # anchors beside ours, not in model-index
    assert all("BERTimbau" not in (r.metric_name or "") for r in eval_results)


def test_results_to_eval_results_are_valid_eval_results():
    entry = {
        "suite": "lener-br", "pretty_name": "LeNER-Br", "hub_task_type": "token-classification",
        "dataset": {"hub_id": "peluz/lener_br", "config": None, "split": "test", "fixtures": False},
        "metric": {"name": "overall_f1", "type": "seqeval", "kwargs": {"mode": "strict", "scheme": "IOB2"}},
        "model": {"mean": 0.8712345, "std": 0.004, "n": 5},
    }  # fmt: skip
    converted = results_to_eval_results({"format": RESULTS_FORMAT, "model_name": "x", "results": [entry]})
    (result,) = [EvalResult(**r) for r in converted["x"]]
    assert result.metric_value == 0.8712 and result.metric_args == {"mode": "strict", "scheme": "IOB2"}
    assert "smoke test" not in result.metric_name


@pytest.mark.parametrize("tuning", ["lora", "qlora"])
def test_lora_and_qlora_for_moe_and_dense(quick_models, tmp_path, tuning):
    """LoRA per expert (MoE, `ptmoe.training.load_model`) and on the encoder linears (dense baseline), in fp32 and on
    a 4-bit base: a step trains, the test split is scored, the adapter is saved."""
    moe, dense = quick_models
    suite = suites.get_suite("assin2-sts" if tuning == "lora" else "lener-br")
    raw = suites.load_suite_data(suite, "fixtures", splits=("train", "test"))
    protocol = {"epochs": 1, "learning_rate": 1e-3, "batch_size": 4, "max_length": 48, "max_steps": 1}
    for i, model in enumerate((moe, dense)):
        out = tmp_path / f"run{i}"
        metrics = finetune_and_evaluate(model, suite, raw, 0, protocol, out, tuning=tuning)
        assert f"eval_{suite.metric}" in metrics and metrics["train_loss"] > 0
        assert (out / "adapter_model.safetensors").is_file()


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert ptmoe_main(["evaluate", "--quick", "--suite", "assin3", "--output_dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ptmoe evaluate: error: Unknown suite 'assin3'") and err.count("\n") == 1
    assert ptmoe_main(["evaluate", "--suite", "lener-br", "--output_dir", str(tmp_path / "y")]) == 2
    assert "--model_name_or_path is required" in capsys.readouterr().err


# --------------------------------------------------------------------------- few-shot


def test_sample_per_class_draws_k_of_each_class_reproducibly():
    from ptmoe.evaluation.few_shot import sample_per_class

    train = suites.load_suite_data("assin2-rte", "fixtures", splits=("train",))["train"]
    labels = train["entailment_judgment"]
    first = sample_per_class(train, "entailment_judgment", 8, seed=0)
    assert len(first) == 16 and len(set(first)) == 16
    assert sorted(labels[i] for i in first) == [0] * 8 + [1] * 8
    assert list(first) == list(sample_per_class(train, "entailment_judgment", 8, seed=0))
    assert list(first) != list(sample_per_class(train, "entailment_judgment", 8, seed=1))
    with pytest.raises(
        ValueError, match=r"assin2-rte: the train split has 12 examples of class 'NONE', fewer than the 16"
    ):
        sample_per_class(train, "entailment_judgment", 16, seed=0, suite_name="assin2-rte")


def test_sentence_embeddings_pooling_matches_the_encoder(quick_models):
    """[CLS] pooling is the first hidden state; mean pooling of a padded row equals that row's mean run alone."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from ptmoe.evaluation.few_shot import sentence_embeddings

    moe, _ = quick_models
    data = suites.load_suite_data("assin2-rte", "fixtures", splits=("test",))["test"].select(range(3))
    cls = sentence_embeddings(moe, data, "premise", "hypothesis", "cls", batch_size=3)
    mean = sentence_embeddings(moe, data, "premise", "hypothesis", "mean", batch_size=3)
    tokenizer, model = AutoTokenizer.from_pretrained(moe), AutoModel.from_pretrained(moe).eval()
    for i in range(3):
        encoded = tokenizer(data[i]["premise"], data[i]["hypothesis"], return_tensors="pt")
        with torch.no_grad():
            hidden = model(**encoded).last_hidden_state[0]  # (seq, hidden), no padding
        torch.testing.assert_close(torch.from_numpy(cls[i]), hidden[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(torch.from_numpy(mean[i]), hidden.mean(0), atol=1e-5, rtol=1e-4)


def test_few_shot_run_reports_mean_and_spread(quick_models, tmp_path):
    from ptmoe.evaluation.few_shot import evaluate_few_shot
    from ptmoe.evaluation.run import EvalConfig

    moe, dense = quick_models
    config = EvalConfig(
        model_name_or_path=moe, suites=["assin2-rte"], output_dir=str(tmp_path / "fs"), dense_model=dense,
        data_dir="fixtures", seeds=(0, 1), max_steps=1, max_length=48,
    )  # fmt: skip
    results = evaluate_few_shot(config, shots=(8,), methods=("logreg-cls", "lora"))
    entries = results["few_shot"]
    assert {(e["model"], e["method"], e["k"]) for e in entries} == {
        (m, method, 8) for m in ("model", "dense") for method in ("logreg-cls", "lora")
    }
    for entry in entries:
        values = [r["value"] for r in entry["runs"]]
        assert entry["n"] == 2 and entry["mean"] == pytest.approx(statistics.mean(values))
        assert entry["std"] == pytest.approx(statistics.stdev(values))
    assert json.loads((tmp_path / "fs" / "results.json").read_text())["few_shot"] == entries
    with pytest.raises(ValueError, match="lener-br is not.*assin2-rte"):
        evaluate_few_shot(EvalConfig(moe, ["lener-br"], str(tmp_path / "x"), data_dir="fixtures"))
    with pytest.raises(ValueError, match="unknown few-shot method"):
        evaluate_few_shot(config, methods=("knn",))


def test_evaluate_pt_script_runs_as_a_script(monkeypatch, capsys):
    """The script file itself (run as __main__): its wiring and its one-line error, exit status 2."""
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "evaluate_pt.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--suite", "nope", "--quick"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("evaluate_pt.py: error: Unknown suite 'nope'") and "Traceback" not in err


def test_split_long_documents_keeps_every_word_and_cuts_between_sentences():
    suite = suites.get_suite("harem-total")
    raw = suites.load_suite_data(suite, "fixtures", splits=("train",))
    names = suite.labels
    chunks = suites.split_long_documents(raw, suite, max_words=9)["train"]
    assert len(chunks) > len(raw["train"])
    for doc in raw["train"]:
        parts = [c for c in chunks if c["id"] == doc["id"]]
        assert sum((p["tokens"] for p in parts), []) == doc["tokens"]
        assert sum((p["ner_tags"] for p in parts), []) == doc["ner_tags"]
        for part in parts:
            assert 1 <= len(part["tokens"]) <= 9
        for part in parts[
            1:
        ]:  # no chunk starts inside an entity (none of the fixture's entities is 9 words long)
            assert not names[part["ner_tags"][0]].startswith("I-")
    # a document with two sentences inside the limit is cut after the first sentence's end
    doc = next(d for d in raw["train"] if d["tokens"].count(".") >= 2)
    cut_room = suites.split_long_documents(raw, suite, max_words=len(doc["tokens"]) - 1)["train"]
    first = next(c for c in cut_room if c["id"] == doc["id"])
    assert first["tokens"][-1] == "."
    assert (
        suites.split_long_documents(raw, suite, max_words=10_000)["train"]["tokens"] == raw["train"]["tokens"]
    )
