"""ptmoe.evaluation.sources: the loading chain (network mocked), the original-format parsers, --prepare-data."""

from __future__ import annotations

import json

import datasets
import pytest

from ptmoe.cli import main as ptmoe_main
from ptmoe.evaluation import sources, suites
from ptmoe.evaluation.run import suite_data_dir

ORIGINAL = suites.FIXTURES_DIR / "original"
ORIGINAL_FILES = {
    "assin2": {"train": "assin2/assin2-train-only.xml", "validation": "assin2/assin2-dev.xml",
               "test": "assin2/assin2-test.xml"},
    "harem-total": {"train": "harem/FirstHAREM-total-train.json", "validation": "harem/FirstHAREM-total-dev.json",
                    "test": "harem/MiniHAREM-total.json"},
    "harem-selective": {"train": "harem/FirstHAREM-selective-train.json",
                        "validation": "harem/FirstHAREM-selective-dev.json", "test": "harem/MiniHAREM-selective.json"},
    "lener-br": {"train": "lener-br/train.conll", "validation": "lener-br/dev.conll", "test": "lener-br/test.conll"},
}  # fmt: skip
SCRIPT_ERROR = RuntimeError("Dataset scripts are no longer supported, but found harem.py")


def _local_paths(suite):
    return {split: str(ORIGINAL / rel) for split, rel in ORIGINAL_FILES[suite.fixture_name].items()}


class FakeNetwork:
    """Stands in for `sources._hub_load` / `sources._download`: records calls, answers from `hub`, `export`, files."""

    def __init__(self, monkeypatch, hub=None, export=None, files=True):
        self.hub, self.export, self.files = hub, export, files
        self.hub_calls: list[tuple] = []
        self.downloads: list[dict] = []
        monkeypatch.setattr(sources, "_hub_load", self.hub_load)
        monkeypatch.setattr(sources, "_download", self.download)

    def hub_load(self, path, name, revision, cache_dir):
        self.hub_calls.append((path, name, revision))
        answer = self.export if revision == sources.PARQUET_EXPORT_REVISION else self.hub
        if isinstance(answer, BaseException):
            raise answer
        if answer is None:
            raise ConnectionError(f"Couldn't reach '{path}' on the Hub")
        return answer(path, name) if callable(answer) else answer

    def download(self, urls, cache_dir):
        self.downloads.append(dict(urls))
        if isinstance(self.files, BaseException):
            raise self.files
        # the URL's file name picks the local fixture (the suite is known from the URL set)
        suite = next(s for s in suites.SUITES.values() if s.original and dict(urls) == {
            k: s.original.urls[k] for k in urls})  # fmt: skip
        return {split: _local_paths(suite)[split] for split in urls}


def _as_hub(suite):
    """What a working Hub load returns: the original files parsed, keyed by the dataset's split names."""
    raw = sources.read_original_files(suite, _local_paths(suite))
    return datasets.DatasetDict({suite.splits[s]: d for s, d in raw.items()})


# --------------------------------------------------------------------------- the chain


def test_hub_dataset_is_used_when_it_loads(monkeypatch):
    suite = suites.get_suite("assin2-rte")
    net = FakeNetwork(monkeypatch, hub=lambda path, name: _as_hub(suite))
    raw = suites.load_suite_data(suite)
    assert net.hub_calls == [("nilc-nlp/assin2", None, None)] and not net.downloads
    assert raw["test"].features["entailment_judgment"].names == ["NONE", "ENTAILMENT"]
    assert raw["test"]["entailment_judgment"] == [1, 0, 0]


def test_script_repository_falls_back_to_the_parquet_export(monkeypatch):
    suite = suites.get_suite("harem-total")
    net = FakeNetwork(monkeypatch, hub=SCRIPT_ERROR, export=lambda path, name: _as_hub(suite))
    raw, source = sources.load_from_sources(suite)
    assert net.hub_calls == [
        ("Linguateca/harem", "default", None),
        ("Linguateca/harem", "default", "refs/convert/parquet"),
    ]
    assert "refs/convert/parquet" in source and not net.downloads
    assert raw["test"]["id"] == ["PTMOE-M-001", "PTMOE-M-002"]
    # the export names LeNER-Br's folder after the script's builder config, not None
    lener = suites.get_suite("lener-br")
    net = FakeNetwork(monkeypatch, hub=SCRIPT_ERROR, export=lambda path, name: _as_hub(lener))
    sources.load_from_sources(lener)
    assert net.hub_calls[-1] == ("peluz/lener_br", "lener_br", "refs/convert/parquet")


def test_failed_export_falls_back_to_the_original_files(monkeypatch):
    suite = suites.get_suite("lener-br")
    net = FakeNetwork(
        monkeypatch, hub=SCRIPT_ERROR, export=FileNotFoundError("no refs/convert/parquet branch")
    )
    raw, source = suites.load_suite_data(suite, return_source=True)
    assert net.downloads == [dict(suite.original.urls)]
    assert source.startswith("the original conll files")  # what results.json records as the data's source
    assert [len(raw[s]) for s in suites.SPLITS] == [4, 2, 3]
    names = raw["train"].features["ner_tags"].feature.names
    assert names == list(suite.labels)
    assert [names[t] for t in raw["train"][3]["ner_tags"]] == ["O"] * 4 + [
        "B-JURISPRUDENCIA",
        "I-JURISPRUDENCIA",
        "O",
    ]


def test_other_hub_failures_skip_the_export(monkeypatch):
    suite = suites.get_suite("harem-selective")
    net = FakeNetwork(monkeypatch, hub=ConnectionError("Couldn't reach 'Linguateca/harem' on the Hub"))
    raw, source = sources.load_from_sources(suite, splits=("train", "test"))
    assert [call[2] for call in net.hub_calls] == [None]  # no export request
    assert "original harem-json files" in source and set(raw) == {"train", "test"}


def test_when_every_source_fails_the_error_names_each_and_the_fix(monkeypatch):
    suite = suites.get_suite("harem-total")
    FakeNetwork(monkeypatch, hub=SCRIPT_ERROR, export=FileNotFoundError("no parquet export"),
                files=ConnectionError("raw.githubusercontent.com unreachable"))  # fmt: skip
    with pytest.raises(sources.SuiteDataError) as caught:
        suites.load_suite_data(suite)
    message = str(caught.value)
    assert "(1) the Hub dataset Linguateca/harem (config default): RuntimeError: Dataset scripts" in message
    assert "(2) the Hub dataset Linguateca/harem (config default) at revision refs/convert/parquet" in message
    assert "FileNotFoundError: no parquet export" in message
    assert "(3) the original harem-json files (https://raw.githubusercontent.com/neuralmind-ai/" in message
    assert "MiniHAREM-total.json): ConnectionError: raw.githubusercontent.com unreachable" in message
    assert "--prepare-data DIR --suite harem-total" in message and "--data_dir DIR" in message
    assert "parquet conversion is served" not in message  # the old, wrong advice
    assert [where for where, _ in caught.value.attempts][0].startswith("the Hub dataset")
    assert isinstance(caught.value, ValueError)  # a user error: one line from the CLI


def test_the_real_offline_failure_is_reported_per_source():
    """No mock: tests run with HF_*_OFFLINE=1, so every source fails without touching the network."""
    with pytest.raises(
        sources.SuiteDataError, match=r"peluz/lener_br.*not tried.*lener-br/raw/master.*--data_dir"
    ):
        suites.load_suite_data("lener-br")


# --------------------------------------------------------------------------- parsers against the suites' labels


def test_assin2_xml_parser_gives_the_hub_schema():
    rows = sources.parse_assin2_xml(ORIGINAL / "assin2/assin2-train-only.xml")
    assert rows[0] == {
        "sentence_pair_id": 1,
        "premise": "Um menino está andando de bicicleta na calçada",
        "hypothesis": "Uma criança está andando de bicicleta",
        "relatedness_score": 4.7,
        "entailment_judgment": "ENTAILMENT",
    }
    assert [r["entailment_judgment"] for r in rows] == ["ENTAILMENT", "NONE", "ENTAILMENT", "NONE"]
    for name in ("assin2-sts", "assin2-rte"):
        suite = suites.get_suite(name)
        raw = sources.read_original_files(suite, _local_paths(suite))
        suites.check_schema(suite, raw, "fixture")
        assert raw["validation"].features["relatedness_score"] == datasets.Value("float32")
    assert raw["train"].features["entailment_judgment"].names == list(suites.get_suite("assin2-rte").labels)


def test_assin2_xml_parser_rejects_an_unknown_judgment(tmp_path):
    bad = tmp_path / "bad.xml"
    bad.write_text('<c><pair id="9" entailment="Paraphrase" similarity="3"><t>a</t><h>b</h></pair></c>')
    with pytest.raises(ValueError, match=r"bad.xml: pair '9': entailment 'Paraphrase'"):
        sources.parse_assin2_xml(bad)


def test_split_words_keeps_punctuation_apart_and_maps_characters():
    words, word_of_char = sources.split_words("  D.Teresa: meio-dia, 20$00.")
    assert words == ["D", ".", "Teresa", ":", "meio", "-", "dia", ",", "20", "$", "00", "."]
    assert word_of_char[0] == 0 and word_of_char[4] == 2 and word_of_char[-1] == len(words) - 1


@pytest.mark.parametrize("name", ["harem-total", "harem-selective"])
def test_harem_json_parser_tags_entities_with_the_suite_labels(name):
    suite = suites.get_suite(name)
    raw = sources.read_original_files(suite, _local_paths(suite))
    suites.check_schema(suite, raw, "fixture")
    names = raw["train"].features["ner_tags"].feature.names
    assert names == list(suite.labels)
    first = raw["train"][0]
    tagged = dict(zip(first["tokens"][16:20], [names[t] for t in first["ner_tags"][16:20]], strict=True))
    assert tagged == {"Câmara": "B-ORGANIZACAO", "Municipal": "I-ORGANIZACAO", "de": "I-ORGANIZACAO",
                      "Viseu": "I-ORGANIZACAO"}  # fmt: skip
    used = {names[t][2:] for split in raw.values() for row in split["ner_tags"] for t in row if t}
    expected = {"PESSOA", "ORGANIZACAO", "LOCAL", "TEMPO", "VALOR"}
    if name == "harem-total":
        expected |= {"ABSTRACCAO", "ACONTECIMENTO", "COISA", "OBRA", "OUTRO"}
    assert used == expected
    # the 10-class files do not parse as 5 classes: the error names the document and the label
    if name == "harem-selective":
        with pytest.raises(ValueError, match=r"document 'PTMOE-T-001'.*label 'OBRA'"):
            sources.parse_harem_json(ORIGINAL / "harem/FirstHAREM-total-train.json", suites._HAREM_TAGS)


def test_harem_documents_are_long_enough_to_be_split():
    suite = suites.get_suite("harem-total")
    raw = sources.read_original_files(suite, _local_paths(suite))
    lengths = [len(tokens) for split in raw.values() for tokens in split["tokens"]]
    assert max(lengths) > 300  # whole documents, as MiniHAREM's
    chunks = suites.split_long_documents(raw, suite, max_words=100)
    for split in raw:
        assert len(chunks[split]) > len(raw[split]) or max(len(t) for t in raw[split]["tokens"]) <= 100
        for doc_id in raw[split]["id"]:
            pieces = [row for row in chunks[split] if row["id"] == doc_id]
            original = next(row for row in raw[split] if row["id"] == doc_id)
            assert sum((p["tokens"] for p in pieces), []) == original["tokens"]  # every word kept, in order
            assert sum((p["ner_tags"] for p in pieces), []) == original["ner_tags"]
            assert all(len(p["tokens"]) <= 100 for p in pieces)


def test_harem_offsets_that_miss_their_text_are_refused(tmp_path):
    doc = {"doc_id": "X", "doc_text": "Vive em Braga.", "entities": [
        {"text": "Braga", "label": "LOCAL", "start_offset": 7, "end_offset": 13}]}  # fmt: skip
    path = tmp_path / "x.json"
    path.write_text(json.dumps([doc]))
    with pytest.raises(ValueError, match=r"document 'X', entity 'Braga': offsets 7..13 cover 'em Braga'"):
        sources.parse_harem_json(path, ["LOCAL"])


def test_conll_parser_reads_sentences_and_refuses_bad_lines(tmp_path):
    rows = sources.parse_conll(ORIGINAL / "lener-br/train.conll")
    assert [r["id"] for r in rows] == ["0", "1", "2", "3"]  # -DOCSTART- is not a sentence
    assert rows[0]["tokens"][:5] == ["O", "Superior", "Tribunal", "de", "Justiça"]
    assert rows[0]["ner_tags"][:5] == [
        "O",
        "B-ORGANIZACAO",
        "I-ORGANIZACAO",
        "I-ORGANIZACAO",
        "I-ORGANIZACAO",
    ]
    suite = suites.get_suite("lener-br")
    assert {t for r in rows for t in r["ner_tags"]} <= set(suite.labels)
    bad = tmp_path / "bad.conll"
    bad.write_text("Lei B-LEGISLACAO\nsem_tag\n")
    with pytest.raises(ValueError, match=r"bad.conll, line 2: expected 'word TAG'"):
        sources.parse_conll(bad)


# --------------------------------------------------------------------------- --prepare-data → --data_dir


def test_prepare_data_round_trips_through_data_dir(monkeypatch, tmp_path, capsys):
    # Hub: HAREM and LeNER-Br are script repos without an export (→ original files); ASSIN 2 loads from the Hub.
    def hub(path, name):
        if path == "nilc-nlp/assin2":
            return _as_hub(suites.get_suite("assin2-sts"))
        raise SCRIPT_ERROR

    FakeNetwork(monkeypatch, hub=hub, export=FileNotFoundError("no export"))
    out = tmp_path / "pt-bench"
    assert ptmoe_main(["evaluate", "--prepare-data", str(out), "--suite", "all"]) == 0
    printed = capsys.readouterr().out
    assert "assin2: the Hub dataset nilc-nlp/assin2" in printed and f"--data_dir {out}" in printed
    assert sorted(p.name for p in out.iterdir()) == ["assin2", "harem-selective", "harem-total", "lener-br",
                                                     "prepared.json"]  # fmt: skip
    manifest = json.loads((out / "prepared.json").read_text())
    assert "original conll files" in manifest["sources"]["lener-br"]
    for suite in suites.SUITES.values():
        assert sorted(p.name for p in (out / suite.fixture_name).iterdir()) == [
            "test.parquet", "train.parquet", "validation.parquet"]  # fmt: skip
        expected, _ = sources.load_from_sources(suite)
        # the layout --data_dir reads (run.py's suite_data_dir), loaded back with identical rows and features
        back = suites.load_suite_data(suite, suite_data_dir(suite, str(out)))
        for split in suites.SPLITS:
            assert back[split].to_list() == expected[split].to_list(), (suite.name, split)
            assert back[split].features == expected[split].features, (suite.name, split)

    # a non-empty folder is refused (before any download) unless --overwrite
    assert ptmoe_main(["evaluate", "--prepare-data", str(out), "--suite", "lener-br"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert ptmoe_main(["evaluate", "--prepare-data", str(out), "--suite", "lener-br", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["lener-br", "prepared.json"]


def test_prepare_data_failure_leaves_nothing_behind(monkeypatch, tmp_path, capsys):
    FakeNetwork(monkeypatch, files=ConnectionError("offline"))
    out = tmp_path / "pt-bench"
    assert ptmoe_main(["evaluate", "--prepare-data", str(out), "--suite", "lener-br"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Could not load LeNER-Br (lener-br)" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []  # the staging folder is gone too


def test_prepare_data_and_data_dir_are_exclusive(tmp_path, capsys):
    args = ["evaluate", "--prepare-data", str(tmp_path / "a"), "--data_dir", str(tmp_path / "b")]
    assert ptmoe_main(args) == 2
    assert "Pass only one of them" in capsys.readouterr().err
