"""Where a suite's data comes from on a connected machine, and the parsers of the datasets' original files.

    load_from_sources(suite)                  the loading chain, first success wins:
      1. the Hub dataset                      datasets.load_dataset(hub_id, hub_config)
      2. the Hub's parquet export             same id, revision="refs/convert/parquet" - only when step 1 failed
                                              because the repository holds a loading script (datasets >= 4 no
                                              longer runs them: "Dataset scripts are no longer supported")
      3. the original files                   the files the old loading script downloaded (ASSIN 2 XML, HAREM JSON
                                              of neuralmind-ai/portuguese-bert, LeNER-Br CoNLL), read by the
                                              parsers below into the suite's schema
    When all fail, `SuiteDataError` names every source tried and why it failed, and the fix: `ptmoe evaluate
    --prepare-data DIR` on a connected machine, then `--data_dir DIR`.

    prepare_suite_data(suites, out_dir)       runs the chain and writes <out_dir>/<dataset>/<split>.parquet, the
                                              layout `--data_dir` reads (one folder per dataset: assin2,
                                              harem-selective, harem-total, lener-br)

The file formats, URLs and split mapping were read off the old loading scripts of huggingface/datasets
(datasets/assin2/assin2.py, datasets/harem/harem.py, datasets/lener_br/lener_br.py); the parsers are ptmoe's own.
"""

from __future__ import annotations

import json
import logging
import os
import unicodedata
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # suites imports this module; the annotation only
    from .suites import Suite

logger = logging.getLogger(__name__)

PARQUET_EXPORT_REVISION = "refs/convert/parquet"
#: The message datasets >= 4 raises for a Hub repository that holds a loading script.
SCRIPT_ERROR_TEXT = "Dataset scripts are no longer supported"
ORIGINAL_FORMATS = ("assin2-xml", "harem-json", "conll")


@dataclass(frozen=True)
class OriginalFiles:
    """The files a dataset's old loading script downloaded, and how to read them.

    Attributes:
        format (`str`): `"assin2-xml"`, `"harem-json"` or `"conll"` (the parser used).
        urls (`dict[str, str]`): ptmoe split (`train`, `validation`, `test`) → URL.
        source (`str`): where the URLs and the format were read.
    """

    format: str
    urls: Mapping[str, str]
    source: str

    def __post_init__(self):
        if self.format not in ORIGINAL_FORMATS:
            raise ValueError(f"OriginalFiles.format must be one of {ORIGINAL_FORMATS}, got {self.format!r}")


class SuiteDataError(ValueError):
    """No source of a suite's data could be loaded; `attempts` holds `(source, reason)` for each one tried."""

    def __init__(self, message: str, attempts: Sequence[tuple[str, str]]):
        super().__init__(message)
        self.attempts = list(attempts)


# ----------------------------------------------------------------------------------------------------------------
# Parsers of the original formats
# ----------------------------------------------------------------------------------------------------------------
def parse_assin2_xml(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read an ASSIN 2 XML file: `<pair id=".." entailment="Entailment|None" similarity="1-5"><t>..</t><h>..</h>`.

    Returns:
        One dict per pair with the Hub schema: `sentence_pair_id` (int), `premise` (the `t` text), `hypothesis`
        (the `h` text), `relatedness_score` (float), `entailment_judgment` (`"NONE"` or `"ENTAILMENT"`).

    Raises:
        ValueError: a pair without its id, texts or attributes, or with another entailment value (names the file
            and the pair).
    """
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as error:
        raise ValueError(f"{path}: not an ASSIN 2 XML file ({error})") from None
    rows = []
    for pair in root.iter("pair"):
        where = f"{path}: pair {pair.get('id')!r}"
        t, h = pair.find("t"), pair.find("h")
        if t is None or h is None or pair.get("id") is None or pair.get("similarity") is None:
            raise ValueError(f"{where} lacks <t>, <h>, id or similarity")
        judgment = (pair.get("entailment") or "").upper()
        if judgment not in ("NONE", "ENTAILMENT"):
            raise ValueError(f"{where}: entailment {pair.get('entailment')!r} is not None or Entailment")
        rows.append(
            {
                "sentence_pair_id": int(pair.get("id")),
                "premise": (t.text or "").strip(),
                "hypothesis": (h.text or "").strip(),
                "relatedness_score": float(pair.get("similarity")),
                "entailment_judgment": judgment,
            }
        )
    if not rows:
        raise ValueError(f"{path}: no <pair> elements (not an ASSIN 2 file?)")
    return rows


def _is_punctuation(char: str) -> bool:
    # Every ASCII symbol counts as punctuation (as BERT's basic tokenizer, which the HAREM JSON offsets assume),
    # plus the Unicode punctuation categories.
    code = ord(char)
    if 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126:
        return True
    return unicodedata.category(char).startswith("P")


def _is_space(char: str) -> bool:
    return char in " \t\n\r" or unicodedata.category(char) == "Zs"


def split_words(text: str) -> tuple[list[str], list[int]]:
    """Split `text` into words at whitespace and around every punctuation mark (each mark is a word).

    Returns:
        `(words, word_of_char)`: the words and, for every character, the index of the word it belongs to (or of the
        word before it, for whitespace; 0 before the first word), so that character offsets map onto words.
    """
    words: list[str] = []
    word_of_char: list[int] = []
    open_word = False  # whether the next letter continues the last word
    for char in text:
        if _is_space(char):
            open_word = False
        elif _is_punctuation(char):
            words.append(char)
            open_word = False
        elif open_word:
            words[-1] += char
        else:
            words.append(char)
            open_word = True
        word_of_char.append(max(len(words) - 1, 0))
    return words, word_of_char


def parse_harem_json(path: str | os.PathLike, entity_types: Sequence[str]) -> list[dict[str, Any]]:
    """Read a HAREM JSON file of neuralmind-ai/portuguese-bert into one BIO-tagged example per document.

    The file is a list of documents `{"doc_id", "doc_text", "entities": [{"text", "label", "start_offset",
    "end_offset"}, ...]}` with character offsets (end exclusive). Words are split at whitespace and punctuation
    (`split_words`); an entity tags its first word `B-<label>` and the following ones `I-<label>`.

    Args:
        path: the JSON file.
        entity_types (`Sequence[str]`): the allowed labels (the suite's 5 or 10 classes).

    Returns:
        Dicts with `id` (the document id), `tokens` and `ner_tags` (tag names).

    Raises:
        ValueError: not a list of documents, an unknown label, or an entity whose offsets do not cover its text.
    """
    try:
        documents = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not a HAREM JSON file ({error})") from None
    if not isinstance(documents, list):
        raise ValueError(f"{path}: expected a JSON list of documents, got {type(documents).__name__}")
    allowed = set(entity_types)
    rows = []
    for document in documents:
        try:
            doc_id, text, entities = document["doc_id"], document["doc_text"], document["entities"]
        except (KeyError, TypeError):
            raise ValueError(f"{path}: a document lacks doc_id, doc_text or entities") from None
        words, word_of_char = split_words(text)
        tags = ["O"] * len(words)
        for entity in entities:
            label, start, end = entity["label"], entity["start_offset"], entity["end_offset"]
            where = f"{path}: document {doc_id!r}, entity {entity.get('text')!r}"
            if label not in allowed:
                raise ValueError(f"{where}: label {label!r} is not one of {sorted(allowed)}")
            if not 0 <= start < end <= len(text):
                raise ValueError(f"{where}: offsets {start}..{end} are outside the document")
            first, last = word_of_char[start], word_of_char[end - 1]
            # The words must spell the entity (whitespace aside): offsets off by a character would tag a neighbour.
            if "".join(words[first : last + 1]) != "".join(entity.get("text", text[start:end]).split()):
                raise ValueError(
                    f"{where}: offsets {start}..{end} cover {' '.join(words[first : last + 1])!r}"
                )
            for index in range(first, last + 1):
                tags[index] = ("B-" if index == first else "I-") + label  # a later entity wins an overlap
        rows.append({"id": str(doc_id), "tokens": words, "ner_tags": tags})
    return rows


def parse_conll(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a two-column CoNLL file (`word TAG` per line; a blank or `-DOCSTART-` line ends a sentence).

    Returns:
        One dict per sentence: `id` (its index in the file, as a string), `tokens`, `ner_tags` (tag names).
        Empty sentences are skipped.

    Raises:
        ValueError: a line that is not `word TAG` (names the file and line).
    """
    rows: list[dict[str, Any]] = []
    tokens: list[str] = []
    tags: list[str] = []

    def end_sentence():
        if tokens:
            rows.append({"id": str(len(rows)), "tokens": list(tokens), "ner_tags": list(tags)})
            tokens.clear()
            tags.clear()

    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip() or line.startswith("-DOCSTART-"):
                end_sentence()
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{path}, line {number}: expected 'word TAG', got {line.rstrip()!r}")
            tokens.append(parts[0])
            tags.append(parts[1])
    end_sentence()
    return rows


# ----------------------------------------------------------------------------------------------------------------
# The loading chain
# ----------------------------------------------------------------------------------------------------------------
def _hub_load(path: str, name: str | None, revision: str | None, cache_dir: str | None):
    """`datasets.load_dataset` of a Hub repository (the one place the chain touches the Hub datasets API)."""
    import datasets

    return datasets.load_dataset(path, name, revision=revision, cache_dir=cache_dir)


def _download(urls: Mapping[str, str], cache_dir: str | None) -> dict[str, str]:
    """Download `urls` (split → URL) into the `datasets` cache; returns split → local path.

    `datasets`' download manager caches by URL and knows Google Drive's confirmation page (ASSIN 2's files).
    """
    import datasets

    manager = datasets.DownloadManager(download_config=datasets.DownloadConfig(cache_dir=cache_dir))
    return dict(manager.download(dict(urls)))


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}" if text else type(error).__name__


def original_features(suite: Suite):
    """The `datasets.Features` of the suite's dataset as its loading script declared them (all columns)."""
    import datasets

    if suite.task_type == "ner":
        return datasets.Features(
            {
                "id": datasets.Value("string"),
                "tokens": datasets.Sequence(datasets.Value("string")),
                "ner_tags": datasets.Sequence(datasets.ClassLabel(names=list(suite.labels))),
            }
        )
    from .suites import ASSIN2_ENTAILMENT_LABELS

    return datasets.Features(
        {
            "sentence_pair_id": datasets.Value("int64"),
            "premise": datasets.Value("string"),
            "hypothesis": datasets.Value("string"),
            "relatedness_score": datasets.Value("float32"),
            "entailment_judgment": datasets.ClassLabel(names=list(ASSIN2_ENTAILMENT_LABELS)),
        }
    )


def read_original_files(suite: Suite, paths: Mapping[str, str | os.PathLike]):
    """Parse the suite's original files (split → local path) into a `datasets.DatasetDict` in the Hub schema."""
    import datasets

    original = suite.original
    if original is None:
        raise ValueError(f"{suite.name}: no original files are recorded for this suite")
    out = {}
    for split, path in paths.items():
        if original.format == "assin2-xml":
            rows = parse_assin2_xml(path)
        elif original.format == "harem-json":
            rows = parse_harem_json(path, sorted({label[2:] for label in suite.labels if label != "O"}))
        else:
            rows = parse_conll(path)
        out[split] = datasets.Dataset.from_list(rows, features=original_features(suite))
    return datasets.DatasetDict(out)


def _describe_hub(suite: Suite, revision: str | None = None, config: str | None = None) -> str:
    config = suite.hub_config if config is None else config
    text = f"the Hub dataset {suite.hub_id}" + (f" (config {config})" if config else "")
    return text + (f" at revision {revision}" if revision else "")


def _select_splits(suite: Suite, loaded, splits: Sequence[str]):
    import datasets

    missing = [s for s in splits if suite.splits[s] not in loaded]
    if missing:
        raise ValueError(f"no {'/'.join(suite.splits[s] for s in missing)} split (it has {sorted(loaded)})")
    return datasets.DatasetDict({s: loaded[suite.splits[s]] for s in splits})


def load_from_sources(
    suite: Suite, cache_dir: str | None = None, splits: Sequence[str] = ("train", "validation", "test")
):
    """Load `suite`'s splits through the chain: the Hub dataset, its parquet export, the original files.

    Args:
        suite (`Suite`): the suite.
        cache_dir (`str`, *optional*): `datasets` cache folder (downloads of the original files too).
        splits (`Sequence[str]`): the ptmoe splits wanted.

    Returns:
        `(raw, source)`: a `datasets.DatasetDict` keyed by ptmoe split, and a description of the source used.

    Raises:
        SuiteDataError: every source failed; the message names each one and why, and the fix.
    """
    attempts: list[tuple[str, str]] = []
    source = _describe_hub(suite)
    script_repo = False
    try:
        raw = _select_splits(suite, _hub_load(suite.hub_id, suite.hub_config, None, cache_dir), splits)
        logger.info("%s: loaded from %s", suite.name, source)
        return raw, source
    # datasets raises many types (RuntimeError, ConnectionError, DatasetNotFoundError, ...)
    except Exception as error:
        attempts.append((source, _reason(error)))
        script_repo = SCRIPT_ERROR_TEXT in str(error)

    export_config = suite.export_config or suite.hub_config or "default"
    source = _describe_hub(suite, PARQUET_EXPORT_REVISION, export_config) + " (the Hub's parquet export)"
    if script_repo:
        try:
            loaded = _hub_load(suite.hub_id, export_config, PARQUET_EXPORT_REVISION, cache_dir)
            raw = _select_splits(suite, loaded, splits)
            logger.warning(
                "%s: the Hub dataset failed (%s); loaded from %s", suite.name, attempts[0][1], source
            )
            return raw, source
        except Exception as error:
            attempts.append((source, _reason(error)))
    else:
        attempts.append(
            (source, "not tried: it only serves repositories whose loading script datasets refuses")
        )

    if suite.original is not None:
        urls = {s: suite.original.urls[s] for s in splits}
        source = f"the original {suite.original.format} files ({', '.join(urls.values())})"
        try:
            raw = read_original_files(suite, _download(urls, cache_dir))
            logger.warning("%s: the Hub failed (%s); loaded from %s", suite.name, attempts[0][1], source)
            return raw, source
        except Exception as error:
            attempts.append((source, _reason(error)))

    tried = "; ".join(f"({i}) {where}: {why}" for i, (where, why) in enumerate(attempts, start=1))
    raise SuiteDataError(
        f"Could not load {suite.pretty_name} ({suite.name}). Tried {tried}. Fix: on a machine with internet run "
        f"`ptmoe evaluate --prepare-data DIR --suite {suite.name}`, copy DIR here and pass `--data_dir DIR`.",
        attempts,
    )


# ----------------------------------------------------------------------------------------------------------------
# --prepare-data
# ----------------------------------------------------------------------------------------------------------------
PREPARED_MANIFEST = "prepared.json"


def prepare_suite_data(
    suites: Sequence[Suite], out_dir: str | os.PathLike, overwrite: bool = False, cache_dir: str | None = None
) -> dict[str, str]:
    """Load `suites` through the chain and write every split as parquet for an offline machine.

    The layout is the one `--data_dir` reads: `<out_dir>/<dataset>/{train,validation,test}.parquet`, one folder
    per dataset (`assin2` serves both ASSIN 2 suites), plus `prepared.json` recording each folder's source. The
    folder is written in a staging folder and moved into place only when every suite loaded.

    Args:
        suites (`Sequence[Suite]`): the suites.
        out_dir (`str` or `os.PathLike`): the folder to write (empty or absent unless `overwrite`).
        overwrite (`bool`): replace a non-empty `out_dir`.
        cache_dir (`str`, *optional*): `datasets` cache folder.

    Returns:
        Dataset folder name → the source it was loaded from.

    Raises:
        FileExistsError: `out_dir` is not empty and `overwrite` is not set (checked before anything loads).
        SuiteDataError: a suite could not be loaded from any source.
    """
    import datasets

    from ..outputs import check_output_dir, staged_output_dir

    check_output_dir(out_dir, overwrite)  # before any download
    written: dict[str, str] = {}
    with staged_output_dir(out_dir, overwrite) as staging:
        for suite in suites:
            if suite.fixture_name in written:
                continue  # assin2-sts and assin2-rte read one dataset
            raw, source = load_from_sources(suite, cache_dir=cache_dir)
            folder = staging / suite.fixture_name
            folder.mkdir()
            for split, dataset in raw.items():
                dataset.to_parquet(str(folder / f"{split}.parquet"))
            written[suite.fixture_name] = source
            logger.info("%s: %s", suite.fixture_name, source)
        manifest = {
            "datasets_version": datasets.__version__,
            "sources": written,
            "read_with": "ptmoe evaluate --data_dir <this folder>",
        }
        (staging / PREPARED_MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return written


__all__ = [
    "OriginalFiles",
    "PARQUET_EXPORT_REVISION",
    "SuiteDataError",
    "load_from_sources",
    "original_features",
    "parse_assin2_xml",
    "parse_conll",
    "parse_harem_json",
    "prepare_suite_data",
    "read_original_files",
    "split_words",
]
