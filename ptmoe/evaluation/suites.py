"""The Portuguese benchmark suites, as data: one table of datasets, their schema, protocol and published numbers.

Each `Suite` names a Hub dataset (id, configuration, split names), the original files its old loading script read,
the columns and label set of its schema, its licence, the fine-tuning protocol of the paper that reported the
reference numbers, and those numbers ("anchors"). `load_suite_data` reads a suite from local files that mirror it
(the same columns; labels as integer ids or as label names) or, without them, through the loading chain of
`ptmoe.evaluation.sources` (Hub dataset → the Hub's parquet export → the original files); it casts the label columns
to the suite's `ClassLabel`s and checks the schema, so a wrong column or label set fails early with the dataset's
name in the message.

Provenance (checked with the search tools on 2026-12-02 and 2026-12-05; `verified` / `unverified` on each entry):
- ASSIN 2: loading script and `dataset_infos.json` of `assin2` (now `nilc-nlp/assin2`): columns sentence_pair_id,
  premise, hypothesis, relatedness_score (float32, 1-5), entailment_judgment ClassLabel [NONE, ENTAILMENT]; splits
  train 6,500 / validation 500 / test 2,448; the script read three XML files (Google Drive links) of
  `<pair id entailment similarity><t/><h/></pair>`; licence "unknown" on the card. The ASSIN evaluation script
  (Erick Fonseca's assin-eval) reports RTE as sklearn's macro F1 and STS as Pearson's r.
- HAREM: the `harem` loading script of huggingface/datasets, whose Hub repository is now `Linguateca/harem` (it
  still holds `harem.py`, and on its latest revision a third party's small `train.parquet` / `validation.parquet`
  that are not the First HAREM splits): configs "default" (10 classes, "total") and "selective" (5 classes);
  columns id, tokens, ner_tags (ClassLabel: O, B-/I- of PESSOA, ORGANIZACAO, LOCAL, TEMPO, VALOR [, ABSTRACCAO,
  ACONTECIMENTO, COISA, OBRA, OUTRO]); train / validation / test = FirstHAREM-{total,selective}-train.json /
  -dev.json / MiniHAREM-{total,selective}.json of neuralmind-ai/portuguese-bert `ner_evaluation/data`; words split
  at whitespace and punctuation; one example per *document*; licence "unknown" on the card.
- LeNER-Br: the `lener_br` loading script (now `peluz/lener_br`): columns id, tokens, ner_tags (ClassLabel: O,
  B-/I- of ORGANIZACAO, PESSOA, TEMPO, LOCAL, LEGISLACAO, JURISPRUDENCIA); files leNER-Br/{train/train,dev/dev,
  test/test}.conll of github.com/peluz/lener-br (`word TAG` per line); licence "unknown" on the card.
- Anchors: ASSIN 2 and MiniHAREM from the evaluation table of the neuralmind-ai/portuguese-bert README (STS
  Pearson 0.836 / 0.852, RTE F1 89.2 / 90.0, MiniHAREM 5 classes 83.1 / 83.7, 10 classes 77.6 / 78.5, base /
  large). LeNER-Br 88.34 (BERTimbau-base) and 90.73 (RoBERTaLexPT-base) from the RoBERTaLexPT-base model card
  (PortuLex benchmark, test split, seqeval scheme IOB2). HAREM protocol from neuralmind-ai/portuguese-bert
  `ner_evaluation/README.md` and the argument defaults of its `trainer.py` (which the README says are the values
  of the experiments).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .sources import OriginalFiles

FIXTURES_DIR = Path(__file__).resolve().parent / "fixtures"
#: Suffixes of local files that mirror a split, in the order they are looked for.
LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
SPLITS = ("train", "validation", "test")
TASK_TYPES = ("regression", "classification", "ner")


@dataclass(frozen=True)
class Protocol:
    """How the reference paper fine-tuned (per seed), and where that comes from.

    Attributes:
        epochs (`float`), learning_rate (`float`), batch_size (`int`), max_length (`int`): the recipe.
        seeds (`tuple[int, ...]`): seeds to run; the result reports their mean and spread.
        source (`str`): where the values come from and which ones are verified.
    """

    epochs: float
    learning_rate: float
    batch_size: int
    max_length: int
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    source: str = ""


@dataclass(frozen=True)
class Anchor:
    """A published number for a dense model on the suite, in the suite's metric scale (0-1)."""

    model: str
    model_id: str
    value: float
    source: str


@dataclass(frozen=True)
class Suite:
    """One benchmark: a dataset, its schema, the metric, the protocol and the published anchors.

    Attributes:
        name (`str`): suite name (`ptmoe evaluate --suite NAME`).
        pretty_name (`str`): the name shown on cards.
        task_type (`str`): `"regression"`, `"classification"` (sentence or pair) or `"ner"` (BIO tags per word).
        hub_id (`str`), hub_config (`str | None`): `datasets.load_dataset(hub_id, hub_config)`.
        export_config (`str`, *optional*): the configuration's folder in the Hub's parquet export
            (`refs/convert/parquet`, named after the loading script's builder configs; default `hub_config`, else
            `"default"`).
        original (`OriginalFiles`, *optional*): the files the old loading script downloaded, and their format.
        splits (`dict[str, str]`): ptmoe split (`train`, `validation`, `test`) → the dataset's split name.
        columns (`dict[str, str]`): role → column. Sentence tasks: `text`, `text_pair`, `label`; NER: `tokens`,
            `tags`.
        labels (`tuple[str, ...]`): class / tag names in the dataset's id order (empty for regression).
        metric (`str`): the key of the reported metric in the eval results (without `eval_`).
        metric_type (`str`): the `model-index` metric type (Hub metric id).
        metric_kwargs (`dict`): how the metric is computed (`f1_average`, seqeval `mode` / `scheme`).
        hub_task_type (`str`): the `model-index` task type.
        licence (`str`): the dataset's licence as recorded on its card.
        protocol (`Protocol`), anchors (`tuple[Anchor, ...]`).
        verified (`str`), unverified (`str`): what was and was not checked about this entry.
        citation (`str`): the dataset paper.
    """

    name: str
    pretty_name: str
    task_type: str
    hub_id: str
    hub_config: str | None
    splits: Mapping[str, str]
    columns: Mapping[str, str]
    labels: tuple[str, ...]
    metric: str
    metric_type: str
    hub_task_type: str
    licence: str
    protocol: Protocol
    anchors: tuple[Anchor, ...] = ()
    metric_kwargs: Mapping[str, Any] = field(default_factory=dict)
    verified: str = ""
    unverified: str = ""
    citation: str = ""
    export_config: str | None = None
    original: OriginalFiles | None = None

    @property
    def fixture_dir(self) -> Path:
        """The tiny local mirror of this suite shipped with ptmoe (original sentences, the dataset's schema)."""
        return FIXTURES_DIR / self.fixture_name

    @property
    def fixture_name(self) -> str:
        return {"assin2-sts": "assin2", "assin2-rte": "assin2"}.get(self.name, self.name)


def _bio(*types: str) -> tuple[str, ...]:
    return ("O",) + tuple(f"{prefix}-{t}" for t in types for prefix in ("B", "I"))


#: The ClassLabel of ASSIN 2's `entailment_judgment` (assin2.py), shared by the two ASSIN 2 suites.
ASSIN2_ENTAILMENT_LABELS = ("NONE", "ENTAILMENT")
_ASSIN2_COLUMNS = {"text": "premise", "text_pair": "hypothesis"}
_ASSIN2_ORIGINAL = OriginalFiles(
    format="assin2-xml",
    urls={
        # assin2-train-only.xml, assin2-dev.xml, assin2-test.xml on Google Drive, as in assin2.py
        "train": "https://drive.google.com/u/0/uc?id=1Q9j1a83CuKzsHCGaNulSkNxBm7Dkn7Ln&export=download",
        "validation": "https://drive.google.com/u/0/uc?id=1kb7xq6Mb3eaqe9cOAo70BaG9ypwkIqEU&export=download",
        "test": "https://drive.google.com/u/0/uc?id=1J3FpQaHxpM-FDfBUyooh-sZF-B-bM_lU&export=download",
    },
    source="huggingface/datasets datasets/assin2/assin2.py (_URLS; splits train / dev / test)",
)
_ASSIN2_SPLITS = {"train": "train", "validation": "validation", "test": "test"}
_ASSIN2_CITATION = (
    "Real, Fonseca, Gonçalo Oliveira (2020). The ASSIN 2 shared task: a quick overview. PROPOR 2020, 406-412."
)
_ASSIN2_PROTOCOL = Protocol(
    epochs=3,
    learning_rate=2e-5,
    batch_size=16,
    max_length=128,
    source=(
        "ptmoe's default sentence-pair recipe (3 epochs, lr 2e-5, batch 16, 128 tokens, 5 seeds): the BERTimbau "
        "paper's exact ASSIN 2 hyperparameters were not verified here."
    ),
)
_BERTIMBAU = "Souza, Nogueira, Lotufo (2020), BERTimbau, BRACIS: evaluation table of the neuralmind-ai/portuguese-bert README"
# The README table does not say which NER architecture its rows are; the BERTimbau paper's NER table, as recalled
# (not re-read: the search tools hold no copy of it), lists these values on its BERTimbau + CRF rows.
_BERTIMBAU_NER = _BERTIMBAU + " (BERT-CRF rows of the paper, 15 epochs; ptmoe fine-tunes without a CRF)"
_HAREM_TAGS = ("PESSOA", "ORGANIZACAO", "LOCAL", "TEMPO", "VALOR")
_HAREM_TOTAL_TAGS = _HAREM_TAGS + ("ABSTRACCAO", "ACONTECIMENTO", "COISA", "OBRA", "OUTRO")
_HAREM_PROTOCOL = Protocol(
    epochs=50,
    learning_rate=5e-5,
    batch_size=16,
    max_length=512,
    source=(
        "neuralmind-ai/portuguese-bert ner_evaluation: BERT without CRF 50 epochs, batch 16 (2 x 8 accumulation) "
        "(README); lr 5e-5, 512 tokens, doc stride 128, warm-up 10% (trainer.py defaults, the experiments' values "
        "per the README) - verified. BERTimbau trains the classifier head (and CRF) at lr 1e-3 (classifier_lr); "
        "ptmoe uses one lr for all weights. BERTimbau reads each document in 512-token windows with context, ptmoe "
        "splits documents into chunks of whole sentences (split_long_documents) and scores every word; each run's "
        "final model is scored (BERTimbau keeps the best epoch on validation)."
    ),
)
_HAREM_CITATION = "Santos, Seco, Cardoso, Vilela (2006). HAREM: An Advanced NER Evaluation Contest for Portuguese. LREC 2006."
_NEURALMIND_DATA = (
    "https://raw.githubusercontent.com/neuralmind-ai/portuguese-bert/master/ner_evaluation/data"
)


def _harem_original(scenario: str) -> OriginalFiles:
    return OriginalFiles(
        format="harem-json",
        urls={
            "train": f"{_NEURALMIND_DATA}/FirstHAREM-{scenario}-train.json",
            "validation": f"{_NEURALMIND_DATA}/FirstHAREM-{scenario}-dev.json",
            "test": f"{_NEURALMIND_DATA}/MiniHAREM-{scenario}.json",
        },
        source="huggingface/datasets datasets/harem/harem.py (_URLs; train / dev / test = MiniHAREM)",
    )


_HAREM_COMMON = dict(
    task_type="ner",
    hub_id="Linguateca/harem",
    splits={"train": "train", "validation": "validation", "test": "test"},
    columns={"tokens": "tokens", "tags": "ner_tags"},
    metric="overall_f1",
    metric_type="seqeval",
    hub_task_type="token-classification",
    licence="unknown",
    protocol=_HAREM_PROTOCOL,
    metric_kwargs={},  # conlleval-style micro F1 (seqeval default mode), as the BERTimbau NER code reports
    verified=(
        "configs, columns, tag names and order, split roles, source files: huggingface/datasets "
        "datasets/harem/harem.py; protocol (lr 5e-5, 512 tokens, 50 epochs, batch 16) and the MiniHAREM anchors: "
        "neuralmind-ai/portuguese-bert."
    ),
    unverified=(
        "whether the Hub's parquet export of Linguateca/harem exists (the repository holds a loading script, so "
        "the chain falls back to the original JSON files); the BERT-CRF attribution of the anchors (paper not "
        "re-read)."
    ),
    citation=_HAREM_CITATION,
)

SUITES: dict[str, Suite] = {
    suite.name: suite
    for suite in (
        Suite(
            name="assin2-sts",
            pretty_name="ASSIN 2 (STS)",
            task_type="regression",
            hub_id="nilc-nlp/assin2",
            hub_config=None,
            splits=_ASSIN2_SPLITS,
            columns={**_ASSIN2_COLUMNS, "label": "relatedness_score"},
            labels=(),
            metric="pearson",
            metric_type="pearsonr",
            hub_task_type="text-classification",
            licence="unknown",
            protocol=_ASSIN2_PROTOCOL,
            anchors=(
                Anchor("BERTimbau-base", "neuralmind/bert-base-portuguese-cased", 0.836, _BERTIMBAU),
                Anchor("BERTimbau-large", "neuralmind/bert-large-portuguese-cased", 0.852, _BERTIMBAU),
            ),
            verified=(
                "columns, dtypes, splits and sizes, source files: assin2 dataset_infos.json / loading script "
                "(nilc-nlp/assin2); anchors: the neuralmind-ai/portuguese-bert README."
            ),
            unverified=(
                "which chain step serves nilc-nlp/assin2 today (its latest visible snapshot still holds assin2.py); "
                "the protocol (see protocol.source)."
            ),
            citation=_ASSIN2_CITATION,
            original=_ASSIN2_ORIGINAL,
        ),
        Suite(
            name="assin2-rte",
            pretty_name="ASSIN 2 (RTE)",
            task_type="classification",
            hub_id="nilc-nlp/assin2",
            hub_config=None,
            splits=_ASSIN2_SPLITS,
            columns={**_ASSIN2_COLUMNS, "label": "entailment_judgment"},
            labels=ASSIN2_ENTAILMENT_LABELS,
            metric="f1",
            metric_type="f1",
            metric_kwargs={
                "f1_average": "macro"
            },  # the ASSIN 2 evaluation reports macro F1 over both classes
            hub_task_type="text-classification",
            licence="unknown",
            protocol=_ASSIN2_PROTOCOL,
            anchors=(
                Anchor("BERTimbau-base", "neuralmind/bert-base-portuguese-cased", 0.892, _BERTIMBAU),
                Anchor("BERTimbau-large", "neuralmind/bert-large-portuguese-cased", 0.900, _BERTIMBAU),
            ),
            verified=(
                "columns, ClassLabel [NONE, ENTAILMENT], splits: assin2 dataset_infos.json / loading script; macro "
                "F1: the ASSIN evaluation script; anchors: the neuralmind-ai/portuguese-bert README."
            ),
            unverified="Hub loading and protocol as for assin2-sts.",
            citation=_ASSIN2_CITATION,
            original=_ASSIN2_ORIGINAL,
        ),
        Suite(
            name="harem-selective",
            pretty_name="MiniHAREM (5 classes)",
            hub_config="selective",
            labels=_bio(*_HAREM_TAGS),
            anchors=(
                Anchor("BERTimbau-base", "neuralmind/bert-base-portuguese-cased", 0.831, _BERTIMBAU_NER),
                Anchor("BERTimbau-large", "neuralmind/bert-large-portuguese-cased", 0.837, _BERTIMBAU_NER),
            ),
            original=_harem_original("selective"),
            **_HAREM_COMMON,
        ),
        Suite(
            name="harem-total",
            pretty_name="MiniHAREM (10 classes)",
            hub_config="default",
            labels=_bio(*_HAREM_TOTAL_TAGS),
            anchors=(
                Anchor("BERTimbau-base", "neuralmind/bert-base-portuguese-cased", 0.776, _BERTIMBAU_NER),
                Anchor("BERTimbau-large", "neuralmind/bert-large-portuguese-cased", 0.785, _BERTIMBAU_NER),
            ),
            original=_harem_original("total"),
            **_HAREM_COMMON,
        ),
        Suite(
            name="lener-br",
            pretty_name="LeNER-Br",
            task_type="ner",
            hub_id="peluz/lener_br",
            hub_config=None,
            splits={"train": "train", "validation": "validation", "test": "test"},
            columns={"tokens": "tokens", "tags": "ner_tags"},
            labels=_bio("ORGANIZACAO", "PESSOA", "TEMPO", "LOCAL", "LEGISLACAO", "JURISPRUDENCIA"),
            metric="overall_f1",
            metric_type="seqeval",
            metric_kwargs={"mode": "strict", "scheme": "IOB2"},
            hub_task_type="token-classification",
            licence="unknown",
            protocol=Protocol(
                epochs=10,
                learning_rate=2e-5,
                batch_size=16,
                max_length=256,
                source=(
                    "unverified: the PortuLex fine-tuning recipe behind the anchors was not found; 10 epochs, lr "
                    "2e-5 is what public BERTimbau LeNER-Br fine-tunes on the Hub use. The anchors were measured on "
                    "PortuLex's copy of LeNER-Br (7,825 train sentences)."
                ),
            ),
            anchors=(
                Anchor(
                    "BERTimbau-base",
                    "neuralmind/bert-base-portuguese-cased",
                    0.8834,
                    "RoBERTaLexPT-base model card, PortuLex benchmark table (test split, seqeval IOB2; PortuLex's "
                    "copy of LeNER-Br, 7,825 train sentences)",
                ),
                Anchor(
                    "RoBERTaLexPT-base",
                    "eduagarcia/RoBERTaLexPT-base",
                    0.9073,
                    "RoBERTaLexPT-base model card, model-index (test split, seqeval IOB2; PortuLex's copy of "
                    "LeNER-Br, 7,825 train sentences)",
                ),
            ),
            verified=(
                "columns, tag names and order, splits, source files: huggingface/datasets "
                "datasets/lener_br/lener_br.py; anchors: the RoBERTaLexPT-base card (measured on PortuLex's copy, "
                "7,825 train sentences, where lener_br's dataset_infos.json lists 7,828 / 1,177 / 1,390)."
            ),
            unverified=(
                "whether the anchors are micro F1 (ptmoe reports seqeval's micro overall_f1) - the PortuLex table "
                "header says 'Macro F1-Score', its model-index says 'Mean F1'; the protocol (see protocol.source)."
            ),
            export_config="lener_br",  # the builder config of lener_br.py names the export's folder
            original=OriginalFiles(
                format="conll",
                urls={
                    "train": "https://github.com/peluz/lener-br/raw/master/leNER-Br/train/train.conll",
                    "validation": "https://github.com/peluz/lener-br/raw/master/leNER-Br/dev/dev.conll",
                    "test": "https://github.com/peluz/lener-br/raw/master/leNER-Br/test/test.conll",
                },
                source="huggingface/datasets datasets/lener_br/lener_br.py (_URL + train / dev / test files)",
            ),
            citation=(
                "Luz de Araujo et al. (2018). LeNER-Br: a Dataset for Named Entity Recognition in Brazilian Legal "
                "Text. PROPOR 2018, LNCS 11122, 313-323."
            ),
        ),
    )
}

#: Names that stand for several suites.
SUITE_GROUPS: dict[str, tuple[str, ...]] = {
    "assin2": ("assin2-sts", "assin2-rte"),
    "harem": ("harem-selective", "harem-total"),
    "all": tuple(SUITES),
}


def list_suites() -> list[str]:
    """The suite names, in table order."""
    return list(SUITES)


def get_suite(name: str) -> Suite:
    """The suite called `name`.

    Raises:
        ValueError: unknown name (the message lists the suites).
    """
    if name not in SUITES:
        raise ValueError(
            f"Unknown suite {name!r}. Suites: {', '.join(SUITES)}; groups: "
            + ", ".join(f"{g} ({', '.join(m)})" for g, m in SUITE_GROUPS.items())
        )
    return SUITES[name]


def resolve_suites(names: str | Sequence[str]) -> list[Suite]:
    """Suites from names, group names (`assin2`, `harem`, `all`) or shell patterns, comma-separated or a list."""
    if isinstance(names, str):
        names = [part.strip() for part in names.split(",") if part.strip()]
    resolved: list[str] = []
    for name in names:
        if name in SUITE_GROUPS:
            matches = list(SUITE_GROUPS[name])
        elif any(ch in name for ch in "*?["):
            matches = fnmatch.filter(SUITES, name)
        else:
            matches = [get_suite(name).name]
        if not matches:
            get_suite(name)  # raises with the list of suites
        resolved.extend(m for m in matches if m not in resolved)
    if not resolved:
        raise ValueError(f"No suite given. Suites: {', '.join(SUITES)}")
    return [SUITES[name] for name in resolved]


def anchors_for(dataset_type: str, dataset_config: str | None, metric_type: str) -> tuple[Anchor, ...]:
    """The published anchors of the suite with this Hub id, configuration and metric (for model cards)."""
    for suite in SUITES.values():
        if (suite.hub_id, suite.hub_config, suite.metric_type) == (dataset_type, dataset_config, metric_type):
            return suite.anchors
    return ()


# ----------------------------------------------------------------------------------------------------------------
# Loading and checking data
# ----------------------------------------------------------------------------------------------------------------
def _local_split_file(data_dir: Path, split: str) -> Path | None:
    for suffix in LOCAL_SUFFIXES:
        path = data_dir / f"{split}{suffix}"
        if path.is_file():
            return path
    return None


def _label_features(suite: Suite):
    import datasets

    if suite.task_type == "ner":
        return {suite.columns["tags"]: datasets.Sequence(datasets.ClassLabel(names=list(suite.labels)))}
    if suite.task_type == "classification":
        return {suite.columns["label"]: datasets.ClassLabel(names=list(suite.labels))}
    return {suite.columns["label"]: datasets.Value("float32")}


def check_schema(suite: Suite, raw, source: str) -> None:
    """Check that every split has the suite's columns and label set.

    Args:
        suite (`Suite`): the expected schema.
        raw (`datasets.DatasetDict`): the loaded splits.
        source (`str`): where the data came from (named in errors).

    Raises:
        ValueError: a missing column, or labels that are not the suite's label set (names or ids), naming the suite,
            the source and what to fix.
    """
    import datasets

    for split, dataset in raw.items():
        missing = [column for column in suite.columns.values() if column not in dataset.column_names]
        if missing:
            raise ValueError(
                f"{suite.pretty_name} ({suite.name}) data from {source}: the {split} split has no column(s) "
                f"{missing}; its columns are {dataset.column_names}. The suite expects {dict(suite.columns)} "
                f"(the schema of {suite.hub_id})."
            )
        if suite.task_type == "regression":
            continue
        column = suite.columns["tags" if suite.task_type == "ner" else "label"]
        feature = dataset.features[column]
        inner = getattr(feature, "feature", feature)
        if isinstance(inner, datasets.ClassLabel) and tuple(inner.names) != suite.labels:
            raise ValueError(
                f"{suite.pretty_name} ({suite.name}) data from {source}: the {split} split's {column!r} label set is "
                f"{list(inner.names)}, but the suite's is {list(suite.labels)} (in this order). Check the dataset "
                f"configuration (expected {suite.hub_config!r}) or the file."
            )


def _cast_labels(suite: Suite, raw, source: str):
    """Local files hold ids (ints) or names (strings): cast the label column to the suite's `ClassLabel`."""
    import datasets

    features = _label_features(suite)
    out = {}
    for split, dataset in raw.items():
        column, target = next(iter(features.items()))
        current = dataset.features[column]
        if current == target:
            out[split] = dataset
            continue
        values = dataset[column]
        flat = [v for row in values for v in (row or [])] if suite.task_type == "ner" else list(values)
        if suite.task_type != "regression":
            bad = sorted(
                {
                    str(v)
                    for v in flat
                    if not (
                        (isinstance(v, str) and v in suite.labels)
                        or (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(suite.labels))
                    )
                }
            )
            if bad:
                raise ValueError(
                    f"{suite.pretty_name} ({suite.name}) data from {source}: the {split} split's {column!r} holds "
                    f"{bad[:10]}, which are not in the suite's label set {list(suite.labels)} (names, or their ids "
                    f"0..{len(suite.labels) - 1})."
                )
        try:
            out[split] = dataset.cast_column(column, target)
        except (ValueError, TypeError) as error:
            raise ValueError(
                f"{suite.pretty_name} ({suite.name}) data from {source}: the {split} split's {column!r} cannot be "
                f"read as {target}: {error}"
            ) from None
    return datasets.DatasetDict(out)


def load_suite_data(
    suite: Suite | str,
    data_dir: str | Path | None = None,
    cache_dir: str | None = None,
    splits: Sequence[str] = SPLITS,
    return_source: bool = False,
):
    """Load a suite's splits from a local mirror or from the Hub, with labels as the suite's `ClassLabel`s.

    Args:
        suite (`Suite` or `str`): the suite.
        data_dir (`str` or `Path`, *optional*): a folder holding `train`, `validation` and `test` files
            (`.jsonl`, `.json`, `.csv` or `.parquet`) in the dataset's schema (what `ptmoe evaluate --prepare-data`
            writes), or a `save_to_disk` folder; the string `"fixtures"` means the tiny mirror shipped with ptmoe.
            Without it, the data is loaded through `sources.load_from_sources` (Hub dataset, the Hub's parquet
            export, the original files).
        cache_dir (`str`, *optional*): `datasets` cache folder.
        splits (`Sequence[str]`): the ptmoe splits to load (default all three).
        return_source (`bool`, *optional*, defaults to `False`): also return a description of where the data came
            from (the local folder, the Hub dataset, its parquet export or the original files).

    Returns:
        `datasets.DatasetDict` with keys `train`, `validation`, `test` (those asked for); with `return_source`,
        `(raw, source)`.

    Raises:
        FileNotFoundError: a local folder without one of the split files.
        SuiteDataError (a `ValueError`): no source could be loaded (the message names each one tried and why).
        ValueError: data that does not match the suite's schema.
    """
    import datasets

    suite = get_suite(suite) if isinstance(suite, str) else suite
    if data_dir is not None and str(data_dir) == "fixtures":
        data_dir = suite.fixture_dir
    if data_dir is not None:
        data_dir = Path(data_dir)
        source = str(data_dir)
        if (data_dir / "dataset_dict.json").is_file():
            saved = datasets.load_from_disk(str(data_dir))
            raw = datasets.DatasetDict(
                {s: saved[suite.splits[s]] for s in splits if suite.splits[s] in saved}
            )
        else:
            files = {s: _local_split_file(data_dir, s) for s in splits}
            absent = [s for s, path in files.items() if path is None]
            if absent:
                raise FileNotFoundError(
                    f"{suite.pretty_name} ({suite.name}): no {'/'.join(absent)} file in {data_dir} (looked for "
                    f"<split>{'|'.join(LOCAL_SUFFIXES)}). Write the folder with `ptmoe evaluate --prepare-data DIR` on a "
                    f"connected machine and pass DIR as --data_dir (it holds one sub-folder per dataset)."
                )
            builders = {path.suffix: path for path in files.values()}
            if len(builders) > 1:
                raise ValueError(
                    f"{suite.name}: the split files in {data_dir} must share one format, got {sorted(builders)}"
                )
            builder = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}[
                next(iter(builders))
            ]
            raw = datasets.load_dataset(
                builder, data_files={s: str(p) for s, p in files.items()}, cache_dir=cache_dir
            )
    else:
        from .sources import load_from_sources

        raw, source = load_from_sources(suite, cache_dir=cache_dir, splits=splits)
    raw = datasets.DatasetDict({s: raw[s] for s in splits})
    check_schema(suite, raw, source)
    raw = _cast_labels(suite, raw, source)
    return (raw, source) if return_source else raw


# ----------------------------------------------------------------------------------------------------------------
# Long NER documents
# ----------------------------------------------------------------------------------------------------------------
_SENTENCE_END = frozenset({".", "!", "?", ";"})


def _cut_points(words: Sequence[str], tags: Sequence[int], names: Sequence[str], max_words: int) -> list[int]:
    """Chunk ends (exclusive) for one document: at the last sentence end inside the limit, else at the limit moved
    back to a word that does not continue an entity (an entity longer than `max_words` is cut where it must be)."""
    ends, start = [], 0
    while len(words) - start > max_words:
        limit = start + max_words
        cut = next((i + 1 for i in range(limit - 1, start, -1) if words[i] in _SENTENCE_END), None)
        if cut is None:
            cut = limit
            while cut > start + 1 and names[tags[cut]].startswith("I-"):
                cut -= 1
            if cut == start + 1:
                cut = limit
        ends.append(cut)
        start = cut
    ends.append(len(words))
    return ends


def split_long_documents(raw, suite: Suite, max_words: int):
    """Split NER examples longer than `max_words` words into consecutive chunks, so that every word is scored.

    HAREM examples are whole documents (hundreds of words) and a model reads at most `max_length` sub-word tokens:
    truncation would leave the rest of each document out of training and out of the score. BERTimbau's NER code
    reads documents in overlapping 512-token windows instead; ptmoe cuts them into chunks at sentence ends (or,
    inside a long sentence, between entities) and scores every chunk. Other columns are copied to each chunk.

    Args:
        raw (`datasets.DatasetDict`): splits with the suite's `tokens` and `tags` columns (tags as `ClassLabel` ids).
        suite (`Suite`): an NER suite.
        max_words (`int`): the longest chunk, in words.
    """
    if max_words < 1:
        raise ValueError(f"max_words must be >= 1, got {max_words}")
    tokens_column, tags_column = suite.columns["tokens"], suite.columns["tags"]

    def split(batch):
        out = {column: [] for column in batch}
        for row in range(len(batch[tokens_column])):
            words, tags = batch[tokens_column][row], batch[tags_column][row]
            start = 0
            for end in _cut_points(words, tags, suite.labels, max_words):
                for column in batch:
                    value = batch[column][row]
                    out[column].append(value[start:end] if column in (tokens_column, tags_column) else value)
                start = end
        return out

    return raw.map(split, batched=True, desc="Splitting long documents")


__all__ = [
    "Anchor",
    "FIXTURES_DIR",
    "Protocol",
    "SUITES",
    "SUITE_GROUPS",
    "Suite",
    "anchors_for",
    "check_schema",
    "get_suite",
    "list_suites",
    "load_suite_data",
    "resolve_suites",
    "split_long_documents",
]
