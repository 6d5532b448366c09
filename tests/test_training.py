"""Tests of ptmoe.training: data loading and validation, labels, tokenisation, span corruption, metrics, models.

The tiny tokenizers defined here are trained on the shipped corpus (`ptmoe/data/corpus.txt`) with `tokenizers`;
test_scripts.py reuses them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Sequence, Value

import ptmoe
from ptmoe import training

DATA_DIR = Path(ptmoe.__file__).parent / "data"


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------------------------
# Tiny tokenizers (shared with test_scripts.py)
# --------------------------------------------------------------------------------------------------------------
def _corpus_lines() -> list[str]:
    return [
        line for line in (DATA_DIR / "corpus.txt").read_text(encoding="utf-8").splitlines() if line.strip()
    ]


def make_bert_tokenizer(vocab_size: int = 400):
    """A cased WordPiece tokenizer with BERT's special tokens and [CLS] A [SEP] B [SEP] templates."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=False)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer.train_from_iterator(
        _corpus_lines(), trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special)
    )
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=64,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def make_t5_tokenizer(vocab_size: int = 400, extra_ids: int = 20):
    """A T5-style tokenizer: <pad>=0, </s>=1, <unk>=2, sentinels <extra_id_N>, EOS appended."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    sentinels = [f"<extra_id_{i}>" for i in range(extra_ids)]
    tokenizer = Tokenizer(models.WordPiece(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.train_from_iterator(
        _corpus_lines(),
        trainers.WordPieceTrainer(
            vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>", *sentinels]
        ),
    )
    eos_id = tokenizer.token_to_id("</s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="</s>",
        additional_special_tokens=sentinels,
    )


@pytest.fixture(scope="module")
def bert_tokenizer():
    return make_bert_tokenizer()


@pytest.fixture(scope="module")
def t5_tokenizer():
    return make_t5_tokenizer()


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in rows) + "\n", encoding="utf-8")
    return str(path)


def _sentiment_dict(train_labels, validation_labels) -> DatasetDict:
    return DatasetDict(
        {
            "train": Dataset.from_dict({"text": ["a"] * len(train_labels), "label": train_labels}),
            "validation": Dataset.from_dict(
                {"text": ["b"] * len(validation_labels), "label": validation_labels}
            ),
        }
    )


# --------------------------------------------------------------------------------------------------------------
# Loading data
# --------------------------------------------------------------------------------------------------------------
def test_load_local_jsonl_train_and_validation():
    raw = training.load_raw_datasets(
        train_file=str(DATA_DIR / "sentiment_train.jsonl"),
        validation_file=str(DATA_DIR / "sentiment_test.jsonl"),
    )
    assert set(raw) == {"train", "validation"}
    assert {"text", "label"} <= set(raw["train"].column_names)


def test_load_holds_out_validation_when_missing(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": f"t{i}", "label": i % 2} for i in range(20)])
    raw = training.load_raw_datasets(train_file=path, validation_split_percentage=20)
    assert (len(raw["train"]), len(raw["validation"])) == (16, 4)


def test_load_csv_and_txt(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text("frase,rotulo\nbom,1\nruim,0\n", encoding="utf-8")
    assert training.load_raw_datasets(train_file=str(csv))["train"].column_names == ["frase", "rotulo"]
    txt = tmp_path / "d.txt"
    txt.write_text("uma linha\noutra linha\n", encoding="utf-8")
    assert training.load_raw_datasets(train_file=str(txt))["train"]["text"] == ["uma linha", "outra linha"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "exactly one data source"),
        ({"dataset_name": "x", "train_file": "y.jsonl"}, "exactly one data source"),
        (
            {"train_file": "/nonexistent/train.jsonl"},
            "--train_file '/nonexistent/train.jsonl' does not exist",
        ),
        ({"train_file": "train.parquet"}, "extension '.parquet'"),
    ],
)
def test_load_bad_sources_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        training.load_raw_datasets(**kwargs)


def test_load_train_and_validation_formats_must_match(tmp_path):
    train = _write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": 0}])
    validation = tmp_path / "v.csv"
    validation.write_text("text,label\na,0\n", encoding="utf-8")
    with pytest.raises(ValueError, match="same format"):
        training.load_raw_datasets(train_file=train, validation_file=str(validation))


def test_malformed_local_file_is_reported(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a", "label": 1}\nnot json\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"Could not read .*bad.jsonl.* as json"):
        training.load_raw_datasets(train_file=str(path))


def test_unreachable_hub_dataset_stops_early_with_a_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ValueError, match="Could not load --dataset_name 'ptmoe-no-such/assin2'") as error:
        training.load_raw_datasets(dataset_name="ptmoe-no-such/assin2")
    assert "Offline mode is on" in str(error.value) and "--train_file" in str(error.value)
    assert time.perf_counter() - start < 30


def test_load_from_save_to_disk_folder(tmp_path):
    DatasetDict({"train": Dataset.from_dict({"text": ["a", "b"]})}).save_to_disk(str(tmp_path / "saved"))
    assert training.load_raw_datasets(dataset_name=str(tmp_path / "saved"))["train"]["text"] == ["a", "b"]


def test_check_columns_names_flag_and_existing_columns():
    raw = DatasetDict({"train": Dataset.from_dict({"frase": ["a"], "label": [0]})})
    with pytest.raises(
        ValueError, match=r"no column 'text' \(named by --text_column\).*\['frase', 'label'\]"
    ):
        training.check_columns(raw, {"--text_column": "text", "--label_column": "label", "--x": None})


def test_limit_samples_truncates_each_split():
    raw = _sentiment_dict([0, 1, 0, 1], [0, 1, 1])
    limited = training.limit_samples(raw, max_train_samples=2, max_eval_samples=1)
    assert (len(limited["train"]), len(limited["validation"])) == (2, 1)


# --------------------------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------------------------
def test_string_labels_sorted_into_ids():
    mapping = training.build_label_mapping(_sentiment_dict(["positivo", "negativo"], ["negativo"]), "label")
    assert mapping.names == ["negativo", "positivo"]
    assert mapping.encode("positivo") == 1 and mapping.num_labels == 2


def test_contiguous_integer_labels_keep_their_ids():
    mapping = training.build_label_mapping(_sentiment_dict([2, 0, 1], [1]), "label")
    assert [mapping.encode(v) for v in (0, 1, 2)] == [0, 1, 2]


def test_class_label_feature_gives_names():
    features = Features({"text": Value("string"), "label": ClassLabel(names=["None", "Entailment"])})
    raw = DatasetDict({"train": Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]}, features=features)})
    assert training.build_label_mapping(raw, "label").names == ["None", "Entailment"]


def test_validation_label_unseen_in_training_is_refused():
    with pytest.raises(
        ValueError, match=r"Labels \['neutro'\] of the validation split are not in the training"
    ):
        training.build_label_mapping(_sentiment_dict(["positivo", "negativo"], ["neutro"]), "label")


def test_labels_outside_model_label_set_are_refused():
    with pytest.raises(
        ValueError, match=r"outside the model's label set \['negativo', 'positivo'\]"
    ) as error:
        training.build_label_mapping(
            _sentiment_dict(["positivo", "neutro"], ["negativo"]),
            "label",
            model_labels=["negativo", "positivo"],
        )
    assert "--ignore_mismatched_sizes" in str(error.value)


def test_integer_labels_beyond_model_head_are_refused():
    with pytest.raises(ValueError, match=r"Labels \['2'\]"):
        training.build_label_mapping(
            _sentiment_dict([0, 1, 2], [0]), "label", model_labels=["LABEL_0", "LABEL_1"]
        )


def test_float_labels_need_regression():
    with pytest.raises(ValueError, match="use --task_type regression"):
        training.build_label_mapping(_sentiment_dict([0.5, 1.5], [0.5]), "label")


def test_regression_needs_numeric_labels():
    with pytest.raises(ValueError, match="needs numeric labels"):
        training.build_label_mapping(_sentiment_dict(["a", "b"], ["a"]), "label", task_type="regression")
    mapping = training.build_label_mapping(_sentiment_dict([0.5, 4], [3.2]), "label", task_type="regression")
    assert mapping.is_regression and mapping.num_labels == 1 and mapping.encode(4) == 4.0


def _ner_dict(tags_rows, words_rows=None) -> DatasetDict:
    words_rows = words_rows or [["w"] * len(tags) for tags in tags_rows]
    return DatasetDict({"train": Dataset.from_dict({"tokens": words_rows, "ner_tags": tags_rows})})


def test_ner_labels_from_file_and_training_tags():
    names = training.read_label_names(str(DATA_DIR / "ner_labels.json"))
    mapping = training.build_ner_label_mapping(
        _ner_dict([["O", "B-PER", "I-PER"]]), "tokens", "ner_tags", names
    )
    assert mapping.names == names
    seen = training.build_ner_label_mapping(
        _ner_dict([["B-PER", "O", "B-LOC", "I-LOC"]]), "tokens", "ner_tags"
    )
    assert seen.names == ["O", "B-LOC", "I-LOC", "B-PER"]


def test_ner_class_label_sequence_feature():
    features = Features(
        {"tokens": Sequence(Value("string")), "ner_tags": Sequence(ClassLabel(names=["O", "B-PER", "I-PER"]))}
    )
    raw = DatasetDict(
        {"train": Dataset.from_dict({"tokens": [["a", "b"]], "ner_tags": [[1, 2]]}, features=features)}
    )
    mapping = training.build_ner_label_mapping(raw, "tokens", "ner_tags")
    assert mapping.names == ["O", "B-PER", "I-PER"] and mapping.value_to_id[2] == 2


@pytest.mark.parametrize(
    "tags, kwargs, message",
    [
        ([["O", "B-MISC"]], {"label_names": ["O", "B-PER", "I-PER"]}, r"Tags \['B-MISC'\] are outside"),
        ([["O", "B-MISC"]], {"model_labels": ["O", "B-PER"]}, "--ignore_mismatched_sizes"),
        ([["O", "PER"]], {}, "not BIO tags"),
    ],
)
def test_ner_bad_tags_are_refused(tags, kwargs, message):
    with pytest.raises(ValueError, match=message):
        training.build_ner_label_mapping(_ner_dict(tags), "tokens", "ner_tags", **kwargs)


def test_ner_words_and_tags_must_align():
    with pytest.raises(ValueError, match="Row 0 of the train split has 3 words but 2 tags"):
        training.build_ner_label_mapping(_ner_dict([["O", "O"]], [["a", "b", "c"]]), "tokens", "ner_tags")


# --------------------------------------------------------------------------------------------------------------
# Tokenisation
# --------------------------------------------------------------------------------------------------------------
def test_sentence_pairs_tokenised_with_labels(bert_tokenizer):
    raw = DatasetDict(
        {
            "train": Dataset.from_dict(
                {"p": ["O menino corre."], "h": ["Uma criança corre."], "label": ["sim"]}
            )
        }
    )
    mapping = training.LabelMapping(names=["nao", "sim"], value_to_id={"nao": 0, "sim": 1})
    tokenized = training.tokenize_classification(
        raw, bert_tokenizer, "p", "label", mapping, text_pair_column="h"
    )
    row = tokenized["train"][0]
    assert row["labels"] == 1 and set(row["token_type_ids"]) == {0, 1}
    assert bert_tokenizer.convert_ids_to_tokens(row["input_ids"]).count("[SEP]") == 2


def test_ner_labels_only_on_first_subword(bert_tokenizer):
    words = ["Paralelepípedo", "em", "Lisboa"]
    raw = DatasetDict({"train": Dataset.from_dict({"tokens": [words], "ner_tags": [["O", "O", "B-LOC"]]})})
    mapping = training.LabelMapping(names=["O", "B-LOC"], value_to_id={"O": 0, "B-LOC": 1})
    row = training.tokenize_and_align_labels(raw, bert_tokenizer, "tokens", "ner_tags", mapping)["train"][0]
    word_ids = bert_tokenizer(words, is_split_into_words=True).word_ids()
    assert word_ids.count(0) > 1, "the first word must split into several sub-words for this test"
    expected, previous = [], None
    for word in word_ids:
        expected.append(-100 if word is None or word == previous else [0, 0, 1][word])
        previous = word
    assert row["labels"] == expected


def test_mlm_blocks_are_packed_to_max_length(bert_tokenizer):
    raw = DatasetDict({"train": Dataset.from_dict({"text": _corpus_lines()[:50]})})
    tokenized = training.tokenize_for_mlm(raw, bert_tokenizer, "text", max_seq_length=16)
    assert len(tokenized["train"]) > 5 and {len(ids) for ids in tokenized["train"]["input_ids"]} == {16}


def test_too_little_text_is_reported(bert_tokenizer):
    raw = DatasetDict({"train": Dataset.from_dict({"text": ["curto"]})})
    with pytest.raises(ValueError, match="Lower --max_seq_length"):
        training.tokenize_for_mlm(raw, bert_tokenizer, "text", max_seq_length=64)


def test_non_text_values_are_refused(bert_tokenizer):
    raw = DatasetDict({"train": Dataset.from_dict({"text": [None, "b"], "label": [0, 1]})})
    mapping = training.LabelMapping(names=["0", "1"], value_to_id={0: 0, 1: 1})
    with pytest.raises(ValueError, match="--text_column 'text' must hold text"):
        training.tokenize_classification(raw, bert_tokenizer, "text", "label", mapping)


# --------------------------------------------------------------------------------------------------------------
# T5 span corruption
# --------------------------------------------------------------------------------------------------------------
def test_span_corruption_lengths_match_t5_recipe():
    # The T5 pre-training recipe (and transformers' run_t5_mlm_flax.py) turns 568 raw tokens into 512 inputs
    # and 114 targets with noise density 0.15 and mean span length 3.
    assert training.t5_span_corruption_lengths(512, 0.15, 3.0) == (568, 114)


def test_noise_mask_density_and_mean_span_length():
    rng = np.random.default_rng(0)
    masks = [training.random_spans_noise_mask(100, 0.15, 3.0, rng) for _ in range(200)]
    assert all(mask.sum() == 15 for mask in masks)
    assert all(not mask[0] for mask in masks), "T5 starts with a kept span"
    spans = [np.count_nonzero(np.diff(mask.astype(int)) == 1) for mask in masks]
    assert all(count == 5 for count in spans)  # round(15 / 3) spans of mean length 3


def test_span_corrupt_follows_t5_example():
    tokens = [10, 11, 12, 13, 14]  # "Thank you for inviting me"
    mask = np.array([False, False, True, True, False])
    inputs, targets = training.span_corrupt(tokens, mask, sentinel_ids=[99, 98], eos_token_id=1)
    assert inputs == [10, 11, 99, 14, 1]
    assert targets == [99, 12, 13, 1]


def test_collator_round_trip_restores_the_text(t5_tokenizer):
    collator = training.DataCollatorForT5SpanCorruption(t5_tokenizer, seed=0)
    raw_length, target_length = training.t5_span_corruption_lengths(32)
    rows = [list(range(30, 30 + raw_length)), list(range(60, 60 + raw_length))]
    batch = collator([{"input_ids": row} for row in rows])
    assert batch["input_ids"].shape == (2, 32) and batch["labels"].shape == (2, target_length)
    sentinels = collator.sentinel_ids
    for row, inputs, labels in zip(rows, batch["input_ids"].tolist(), batch["labels"].tolist(), strict=True):
        spans, current = {}, None
        for token in labels[:-1]:  # drop EOS
            if token in sentinels:
                current = token
                spans[current] = []
            else:
                spans[current].append(token)
        restored = [t for token in inputs[:-1] for t in (spans[token] if token in sentinels else [token])]
        assert restored == row
        used = [token for token in inputs if token in sentinels]
        assert used == sentinels[: len(used)], "sentinels count up from <extra_id_0>"


def test_collator_pads_labels_with_ignore_index(t5_tokenizer):
    collator = training.DataCollatorForT5SpanCorruption(t5_tokenizer, seed=0)
    batch = collator([{"input_ids": list(range(30, 70))}, {"input_ids": list(range(30, 40))}])
    assert batch["attention_mask"][1].sum() < batch["attention_mask"][0].sum()
    assert (batch["labels"][1] == -100).any() and not (batch["labels"][0] == -100).any()
    assert (batch["input_ids"][1][batch["attention_mask"][1] == 0] == t5_tokenizer.pad_token_id).all()


def test_tokenizer_without_sentinels_is_refused(bert_tokenizer):
    with pytest.raises(ValueError, match="no sentinel tokens <extra_id_0>"):
        training.DataCollatorForT5SpanCorruption(bert_tokenizer)


# --------------------------------------------------------------------------------------------------------------
# Metrics: the offline modules, checked against the reference libraries
# --------------------------------------------------------------------------------------------------------------
class _Prediction:
    def __init__(self, predictions, label_ids):
        self.predictions, self.label_ids = predictions, label_ids


def test_classification_metrics_match_sklearn():
    from sklearn.metrics import accuracy_score, f1_score

    predictions, references = np.array([0, 1, 2, 2, 1, 0]), np.array([0, 2, 2, 2, 1, 1])
    mapping = training.LabelMapping(names=["a", "b", "c"], value_to_id={})
    results = training.classification_metrics(mapping)(
        _Prediction((predictions, np.float32(1.0)), references)
    )
    assert results["accuracy"] == pytest.approx(accuracy_score(references, predictions))
    assert results["f1"] == pytest.approx(f1_score(references, predictions, average="macro"))


def test_regression_metrics_match_scipy():
    from scipy.stats import pearsonr, spearmanr

    predictions, references = np.array([1.0, 2.5, 2.0, 4.5]), np.array([1.2, 2.0, 3.1, 4.0])
    mapping = training.LabelMapping(names=[], value_to_id={}, is_regression=True)
    results = training.classification_metrics(mapping)(_Prediction(predictions, references))
    assert results["pearson"] == pytest.approx(pearsonr(predictions, references)[0])
    assert results["spearman"] == pytest.approx(spearmanr(predictions, references)[0])
    assert results["mse"] == pytest.approx(np.mean((predictions - references) ** 2))


def test_ner_metrics_match_seqeval_on_labelled_positions():
    from seqeval.metrics import f1_score

    names = ["O", "B-PER", "I-PER", "B-LOC"]
    mapping = training.LabelMapping(names=names, value_to_id={n: i for i, n in enumerate(names)})
    labels = np.array([[-100, 1, 2, 0, 3, -100], [-100, 3, 0, 1, -100, -100]])
    predictions = np.array([[0, 1, 2, 0, 0, 3], [0, 3, 0, 1, 1, 1]])
    results = training.ner_metrics(mapping)(_Prediction(predictions, labels))
    reference = f1_score(
        [["B-PER", "I-PER", "O", "B-LOC"], ["B-LOC", "O", "B-PER"]],
        [["B-PER", "I-PER", "O", "O"], ["B-LOC", "O", "B-PER"]],
    )
    assert results["overall_f1"] == pytest.approx(reference)
    assert {"PER_f1", "LOC_f1", "overall_precision", "overall_recall", "overall_accuracy"} <= set(results)


def test_seq2seq_metrics_on_perfect_generation(t5_tokenizer):
    texts = ["A biblioteca vai abrir aos domingos.", "O técnico pediu calma aos jogadores."]
    ids = t5_tokenizer(texts, padding=True)["input_ids"]
    labels = np.where(np.array(ids) == t5_tokenizer.pad_token_id, -100, np.array(ids))
    results = training.seq2seq_metrics(t5_tokenizer)(_Prediction(np.array(ids), labels))
    assert results["rouge1"] == pytest.approx(1.0) and results["rougeL"] == pytest.approx(1.0)
    assert results["bleu"] == pytest.approx(100.0)
    assert results["gen_len"] > 0


def test_seq2seq_metrics_need_generated_ids(t5_tokenizer):
    with pytest.raises(ValueError, match="--predict_with_generate"):
        training.seq2seq_metrics(t5_tokenizer, ["bleu"])(_Prediction(np.zeros((1, 3, 5)), np.zeros((1, 3))))


def test_logits_to_predictions_drops_router_losses():
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2]])
    preprocess = training.logits_to_predictions("classification")
    assert preprocess((logits, torch.tensor(1.0), torch.tensor(2.0)), None).tolist() == [1, 0]
    assert training.logits_to_predictions("regression")(torch.tensor([[0.5], [1.5]]), None).tolist() == [
        0.5,
        1.5,
    ]


# --------------------------------------------------------------------------------------------------------------
# Arguments and models
# --------------------------------------------------------------------------------------------------------------
def test_parse_expert_list():
    assert training.parse_expert_list("all") == "all"
    assert training.parse_expert_list("3, 0,3") == [0, 3]
    with pytest.raises(ValueError, match="--lora_experts"):
        training.parse_expert_list("first")


def test_parse_arguments_from_cli_or_json_with_script_defaults(tmp_path):
    from transformers import Seq2SeqTrainingArguments

    types = (training.ModelArguments, training.DataArguments, Seq2SeqTrainingArguments)
    defaults = {"predict_with_generate": True}
    model_args, data_args, args = training.parse_arguments(
        types, ["--model_name_or_path", "m", "--train_file", "t.jsonl", "--tuning", "lora"], defaults
    )
    assert (model_args.tuning, data_args.train_file, args.predict_with_generate) == ("lora", "t.jsonl", True)
    config = tmp_path / "args.json"
    config.write_text(
        json.dumps({"model_name_or_path": "m", "predict_with_generate": False}), encoding="utf-8"
    )
    assert training.parse_arguments(types, [str(config)], defaults)[2].predict_with_generate is False


def test_model_arguments_validate_tuning():
    with pytest.raises(ValueError, match="--tuning must be one of"):
        training.ModelArguments(model_name_or_path="x", tuning="prefix")


def _save_tiny(model, tokenizer, path: Path) -> str:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_dense_checkpoint_needs_upcycle_experts(tmp_path, bert_tokenizer):
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=len(bert_tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    path = _save_tiny(BertForMaskedLM(config), bert_tokenizer, tmp_path / "dense")
    with pytest.raises(ValueError, match="dense 'bert' checkpoint: pass --upcycle_experts N"):
        training.load_model(training.ModelArguments(model_name_or_path=path), "masked-lm")
    args = training.ModelArguments(model_name_or_path=path, upcycle_experts=4)
    model = training.load_model(args, "masked-lm")
    assert isinstance(model, ptmoe.MoeBertForMaskedLM) and model.config.num_experts == 4


def test_load_model_sizes_head_and_declares_mean_loss(tmp_path, bert_tokenizer, tiny_bert_config):
    config = tiny_bert_config(vocab_size=len(bert_tokenizer))
    path = _save_tiny(ptmoe.MoeBertForMaskedLM(config), bert_tokenizer, tmp_path / "mlm")
    mapping = training.LabelMapping(names=["neg", "neu", "pos"], value_to_id={})
    model = training.load_model(
        training.ModelArguments(model_name_or_path=path), "sequence-classification", mapping
    )
    assert model.config.num_labels == 3 and model.config.id2label[2] == "pos"
    # The Trainer must divide the (mean) loss by gradient-accumulation steps and not rescale it under DDP.
    assert model.accepts_loss_kwargs is False


def test_task_must_fit_the_architecture(tmp_path, bert_tokenizer, tiny_bert_config):
    path = _save_tiny(
        ptmoe.MoeBertForMaskedLM(tiny_bert_config(vocab_size=len(bert_tokenizer))),
        bert_tokenizer,
        tmp_path / "m",
    )
    with pytest.raises(ValueError, match="needs an encoder-decoder"):
        training.load_model(training.ModelArguments(model_name_or_path=path), "seq2seq")


def test_unloadable_checkpoint_is_reported():
    with pytest.raises(FileNotFoundError, match="--model_name_or_path '/nonexistent/model': no such folder"):
        training.load_model(training.ModelArguments(model_name_or_path="/nonexistent/model"), "masked-lm")


def test_max_length_is_capped_by_position_embeddings(bert_tokenizer, tiny_bert_config):
    model = ptmoe.MoeBertForMaskedLM(tiny_bert_config(vocab_size=len(bert_tokenizer)))
    assert training.resolve_max_length(128, model, bert_tokenizer) == 64
    assert training.resolve_max_length(32, model, bert_tokenizer) == 32
