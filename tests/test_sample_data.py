"""The sample data shipped in `ptmoe/data`: format, fields, labels, sizes, splits."""

from __future__ import annotations

import json
import re
from collections import Counter
from importlib.resources import files
from pathlib import Path

import pytest

DATA_DIR = Path(str(files("ptmoe") / "data"))
NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]

# task -> (fields and their Python types, expected train size, expected test size)
TASKS = {
    "sentiment": ({"text": str, "label": int}, 240, 80),
    "entailment": ({"premise": str, "hypothesis": str, "label": int, "similarity": float}, 120, 40),
    "ner": ({"tokens": list, "ner_tags": list}, 100, 30),
    "summarization": ({"text": str, "summary": str}, 50, 15),
    "domains": ({"text": str, "domain": str}, 224, 56),
}
DOMAINS = ("juridico", "noticias", "saude", "informal")


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            assert line.endswith("\n"), f"{path.name}:{number}: missing newline"
            assert line.strip(), f"{path.name}:{number}: empty line"
            rows.append(json.loads(line))
    return rows


def split(task: str, name: str) -> list[dict]:
    return read_jsonl(DATA_DIR / f"{task}_{name}.jsonl")


def test_files_present():
    expected = {f"{task}_{name}.jsonl" for task in TASKS for name in ("train", "test")}
    expected |= {"ner_labels.json", "corpus.txt", "README.md"}
    assert expected <= {p.name for p in DATA_DIR.iterdir()}


@pytest.mark.parametrize("task", sorted(TASKS))
def test_jsonl_is_utf8_without_ascii_escapes(task):
    for name in ("train", "test"):
        text = (DATA_DIR / f"{task}_{name}.jsonl").read_text(encoding="utf-8")
        assert "\\u00" not in text  # written with ensure_ascii=False
        assert any(ch in text for ch in "ãçéêóõ")  # real Portuguese accents


@pytest.mark.parametrize("task", sorted(TASKS))
def test_fields_types_and_sizes(task):
    fields, n_train, n_test = TASKS[task]
    for name, size in (("train", n_train), ("test", n_test)):
        rows = split(task, name)
        assert len(rows) == size
        for row in rows:
            assert set(row) == set(fields), row
            for field, kind in fields.items():
                assert isinstance(row[field], kind), (field, row)
                if kind is str:
                    assert row[field].strip() == row[field] and row[field], row
            if "label" in row:
                assert not isinstance(row["label"], bool)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_load_dataset_json(task):
    """The files load with `datasets.load_dataset("json", ...)` with the expected columns and sizes."""
    datasets = pytest.importorskip("datasets")
    fields, n_train, n_test = TASKS[task]
    dataset = datasets.load_dataset(
        "json",
        data_files={name: str(DATA_DIR / f"{task}_{name}.jsonl") for name in ("train", "test")},
    )
    assert dataset.num_rows == {"train": n_train, "test": n_test}
    assert set(dataset["train"].column_names) == set(fields)
    features = dataset["train"].features
    if task in ("sentiment", "entailment"):
        assert features["label"].dtype == "int64"
    if task == "entailment":
        assert features["similarity"].dtype == "float64"
    if task == "ner":
        assert features["tokens"].feature.dtype == "string"
        assert features["ner_tags"].feature.dtype == "string"


def test_sentiment_labels_balanced():
    for name, per_label in (("train", 120), ("test", 40)):
        counts = Counter(row["label"] for row in split("sentiment", name))
        assert counts == {0: per_label, 1: per_label}


def test_entailment_labels_and_similarity():
    for name, per_label in (("train", 60), ("test", 20)):
        rows = split("entailment", name)
        assert Counter(row["label"] for row in rows) == {0: per_label, 1: per_label}
        for row in rows:
            assert 1.0 <= row["similarity"] <= 5.0
            if row["label"] == 1:
                assert row["similarity"] >= 3.0  # entailment implies closely related sentences
            assert row["premise"] != row["hypothesis"]


def test_domains_balanced():
    """Four domains with 56 train / 14 test sentences each (the quick modes and tests rely on every domain)."""
    for name, per_domain in (("train", 56), ("test", 14)):
        assert Counter(row["domain"] for row in split("domains", name)) == dict.fromkeys(DOMAINS, per_domain)


def test_ner_labels_file():
    labels = json.loads((DATA_DIR / "ner_labels.json").read_text(encoding="utf-8"))
    assert labels == NER_LABELS


def test_ner_bio_validity():
    """Same lengths, known tags, IOB2: an I-X tag only continues a B-X or I-X of the same type."""
    counts = Counter()
    for name in ("train", "test"):
        for row in split("ner", name):
            tokens, tags = row["tokens"], row["ner_tags"]
            assert len(tokens) == len(tags) > 0
            assert all(isinstance(t, str) and t and not re.search(r"\s", t) for t in tokens), tokens
            previous = "O"
            for tag in tags:
                assert tag in NER_LABELS, tag
                if tag.startswith("I-"):
                    assert previous in (f"B-{tag[2:]}", f"I-{tag[2:]}"), (tokens, tags)
                if tag.startswith("B-"):
                    counts[name, tag[2:]] += 1
                previous = tag
    for name in ("train", "test"):
        for entity_type in ("PER", "LOC", "ORG"):
            assert counts[name, entity_type] >= 10, (name, entity_type)


def test_summarization_shape():
    for name in ("train", "test"):
        for row in split("summarization", name):
            sentences = re.split(r"(?<=[.!?])\s+", row["text"])
            assert 3 <= len(sentences) <= 6, row["text"]
            assert len(re.split(r"(?<=[.!?])\s+", row["summary"])) == 1, row["summary"]
            assert len(row["summary"]) < len(row["text"])


def _key(task: str, row: dict):
    if task == "ner":
        return tuple(row["tokens"])
    if task == "entailment":
        return (row["premise"], row["hypothesis"])
    return row["text"]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_no_duplicates_and_no_train_test_overlap(task):
    train = [_key(task, row) for row in split(task, "train")]
    test = [_key(task, row) for row in split(task, "test")]
    assert len(set(train)) == len(train)
    assert len(set(test)) == len(test)
    assert not set(train) & set(test)
    if task == "entailment":  # split by premise: no test premise is seen in training
        assert not {row["premise"] for row in split(task, "train")} & {
            row["premise"] for row in split(task, "test")
        }
    if task == "summarization":
        assert not {row["summary"] for row in split(task, "train")} & {
            row["summary"] for row in split(task, "test")
        }


def test_corpus():
    text = (DATA_DIR / "corpus.txt").read_text(encoding="utf-8")
    assert text.endswith("\n")
    lines = text.splitlines()
    assert 400 <= len(lines) <= 800
    assert all(line.strip() == line and line for line in lines)
    assert len(set(lines)) == len(lines)
    # Built from train splits only: no test text leaks into pre-training.
    tokenize = re.compile(r"\w+(?:[-'’]\w+)*|[^\w\s]").findall
    corpus_lines = set(lines)
    corpus_token_lines = {tuple(tokenize(line)) for line in lines}
    for row in split("sentiment", "test"):
        assert row["text"] not in corpus_lines
    for row in split("entailment", "test"):
        assert row["premise"] not in corpus_lines and row["hypothesis"] not in corpus_lines
    for row in split("summarization", "test"):
        assert row["summary"] not in corpus_lines
        assert not set(re.split(r"(?<=[.!?])\s+", row["text"])) & corpus_lines
    for row in split("ner", "test"):
        assert tuple(row["tokens"]) not in corpus_token_lines
