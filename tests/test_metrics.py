"""The offline metric modules of `ptmoe.metrics` against the libraries they wrap.

The modules compute with scikit-learn, scipy, seqeval, rouge-score and sacrebleu (runtime dependencies); these
tests call the same library on the same inputs, including the edge cases (empty input, one class, accents,
multiple references), and check that the module returns what the library returns (or raises what it raises).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from ptmoe.metrics import AVAILABLE_METRICS, available_metrics, load_metric, metric_path

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1"}


@pytest.fixture(scope="module")
def metrics():
    """Each metric loaded once (in memory, so no cache files are left behind)."""
    return {name: load_metric(name, keep_in_memory=True) for name in AVAILABLE_METRICS}


# --------------------------------------------------------------------------- loading


def test_available_metrics():
    assert available_metrics() == [
        "accuracy", "bleu", "f1", "pearson_spearman", "rouge", "seqeval", "awss", "wss"
    ]  # fmt: skip
    for name in AVAILABLE_METRICS:
        path = metric_path(name)
        assert os.path.isabs(path)
        assert os.path.isfile(os.path.join(path, f"{name}.py"))


@pytest.mark.parametrize("bad", ["acuracy", "sacrebleu", "", "ROUGE", "../accuracy"])
def test_unknown_metric_raises_clear_error(bad):
    with pytest.raises(ValueError, match="Unknown metric") as excinfo:
        metric_path(bad)
    for name in AVAILABLE_METRICS:  # the message lists the metrics one can use
        assert name in str(excinfo.value)
    with pytest.raises(ValueError, match="Unknown metric"):
        load_metric(bad)


def test_metrics_load_offline_without_hub(tmp_path):
    """In a fresh process with the offline switches set and the Hub endpoint pointing nowhere,
    every metric loads (with `load_metric` and with plain `evaluate.load`) and computes."""
    code = """
import evaluate
from ptmoe.metrics import AVAILABLE_METRICS, load_metric, metric_path
inputs = {
    "accuracy": ([0, 1], [0, 0]),
    "f1": ([0, 1], [0, 1]),
    "pearson_spearman": ([0.5, 1.0, 2.0], [1.0, 2.0, 2.5]),
    "seqeval": ([["B-PER", "O"]], [["B-PER", "O"]]),
    "rouge": (["um texto curto"], ["um texto"]),
    "bleu": (["um texto curto"], [["um texto curto"]]),
    "awss": ([0.9, 0.2], [1, 0]),
    "wss": ([0.9, 0.2], [1, 0]),
}
for name in AVAILABLE_METRICS:
    for metric in (load_metric(name), evaluate.load(metric_path(name))):
        predictions, references = inputs[name]
        assert metric.compute(predictions=predictions, references=references), name
print("ok", len(AVAILABLE_METRICS))
"""
    env = {
        **os.environ,
        **OFFLINE_ENV,
        "HF_ENDPOINT": "http://127.0.0.1:9",  # nothing listens there: any Hub call would fail
        "HF_HOME": str(tmp_path / "hf_home"),  # fresh module cache: nothing comes from an earlier run
    }
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(f"ok {len(AVAILABLE_METRICS)}")


@pytest.mark.parametrize("name", AVAILABLE_METRICS)
def test_docstring_examples_run(name):
    """The usage examples in each module's inputs description give the numbers they show."""
    import doctest
    import re

    with open(os.path.join(metric_path(name), f"{name}.py"), encoding="utf-8") as f:
        source = f.read()
    description = re.search(r'_KWARGS_DESCRIPTION = """(.*?)"""', source, re.S).group(1)
    test = doctest.DocTestParser().get_doctest(description, {}, name, None, 0)
    assert test.examples
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


def test_add_batch_then_compute(metrics):
    metric = metrics["accuracy"]
    metric.add_batch(predictions=[0, 1], references=[0, 0])
    metric.add_batch(predictions=[1, 1], references=[1, 1])
    assert metric.compute() == {"accuracy": 0.75}


# --------------------------------------------------------------------------- accuracy


def test_accuracy_matches_sklearn(metrics):
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for n_classes, n in [(2, 1), (2, 17), (5, 100), (3, 1000)]:
        y_true = rng.integers(0, n_classes, n)
        y_pred = rng.integers(0, n_classes, n)
        weights = rng.random(n)
        acc = metrics["accuracy"]
        assert acc.compute(predictions=y_pred, references=y_true)["accuracy"] == pytest.approx(
            sk.accuracy_score(y_true, y_pred), abs=1e-12
        )
        assert acc.compute(predictions=y_pred, references=y_true, normalize=False)[
            "accuracy"
        ] == pytest.approx(sk.accuracy_score(y_true, y_pred, normalize=False))
        assert acc.compute(predictions=y_pred, references=y_true, sample_weight=weights)[
            "accuracy"
        ] == pytest.approx(sk.accuracy_score(y_true, y_pred, sample_weight=weights), abs=1e-12)


def test_accuracy_edge_cases(metrics):
    acc = metrics["accuracy"]
    assert acc.compute(predictions=[3], references=[3]) == {"accuracy": 1.0}
    assert acc.compute(predictions=[0, 0], references=[1, 1]) == {"accuracy": 0.0}
    with pytest.raises(ValueError):
        acc.compute(predictions=[], references=[])


def test_accuracy_multilabel_matches_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    acc = load_metric("accuracy", config_name="multilabel", keep_in_memory=True)
    y_true = [[0, 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 0]]
    y_pred = [[0, 1, 1], [1, 1, 0], [1, 1, 0], [0, 0, 1]]
    assert acc.compute(predictions=y_pred, references=y_true)["accuracy"] == pytest.approx(
        sk.accuracy_score(np.array(y_true), np.array(y_pred))
    )


# --------------------------------------------------------------------------- f1


def _sk_f1(y_true, y_pred, **kwargs):
    sk = pytest.importorskip("sklearn.metrics")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # UndefinedMetricWarning on zero division
        return sk.f1_score(y_true, y_pred, **kwargs)


def _assert_f1_close(ours, theirs):
    if np.ndim(theirs) == 0:
        theirs = float(theirs)
        assert (math.isnan(ours) and math.isnan(theirs)) or ours == pytest.approx(theirs, abs=1e-12)
    else:
        np.testing.assert_allclose(ours, theirs, atol=1e-12)


F1_CASES = [
    # (references, predictions, kwargs)
    ([0, 1, 1, 0, 1, 1], [0, 1, 0, 0, 1, 1], {}),
    ([0, 1, 1, 0, 1, 1], [0, 1, 0, 0, 1, 1], {"pos_label": 0}),
    ([0, 0, 0], [0, 0, 0], {}),  # no positive at all: zero division
    ([0, 0, 0], [0, 0, 0], {"zero_division": 1}),
    ([2, 2], [2, 2], {}),  # one class, pos_label absent
    ([1, 1, 0], [0, 0, 1], {}),  # all wrong
    ([0, 1, 2, 0, 1, 2, 2], [0, 2, 1, 0, 0, 2, 2], {"average": "macro"}),
    ([0, 1, 2, 0, 1, 2, 2], [0, 2, 1, 0, 0, 2, 2], {"average": "micro"}),
    ([0, 1, 2, 0, 1, 2, 2], [0, 2, 1, 0, 0, 2, 2], {"average": "weighted"}),
    ([0, 1, 2, 0, 1, 2, 2], [0, 2, 1, 0, 0, 2, 2], {"average": None}),
    ([0, 1, 2, 0, 1, 2, 2], [0, 2, 1, 0, 0, 2, 2], {"average": "macro", "labels": [2, 0, 5]}),
    ([0, 1, 2, 0, 1, 2, 2], [0, 2, 1, 0, 0, 2, 2], {"average": "micro", "labels": [0, 2]}),
    ([0, 1, 2, 0, 1, 2, 2], [0, 2, 1, 0, 0, 2, 2], {"average": None, "labels": [3, 1]}),
    ([0, 1, 2], [0, 1, 1], {"average": "weighted", "labels": [3]}),  # zero total support
    ([0, 1, 2], [0, 1, 1], {"average": "macro", "labels": [0, 1, 2, 3], "zero_division": 1}),
    ([0, 1, 2], [0, 1, 1], {"average": "macro", "labels": [0, 1, 2, 3], "zero_division": np.nan}),
    ([0, 1, 2], [3, 3, 3], {"average": "weighted"}),  # label only predicted
]


@pytest.mark.parametrize("references,predictions,kwargs", F1_CASES)
def test_f1_matches_sklearn(metrics, references, predictions, kwargs):
    expected = _sk_f1(references, predictions, **kwargs)
    ours = metrics["f1"].compute(predictions=predictions, references=references, **kwargs)["f1"]
    _assert_f1_close(ours, expected)


@pytest.mark.parametrize("average", ["binary", "micro", "macro", "weighted", None])
def test_f1_random_with_weights_matches_sklearn(metrics, average):
    rng = np.random.default_rng(1)
    n_classes = 2 if average == "binary" else 6
    for n in (5, 50, 500):
        y_true, y_pred = rng.integers(0, n_classes, n), rng.integers(0, n_classes, n)
        weights = rng.random(n)
        for sample_weight in (None, weights):
            kwargs = {"average": average, "sample_weight": sample_weight}
            expected = _sk_f1(y_true, y_pred, **kwargs)
            ours = metrics["f1"].compute(predictions=y_pred, references=y_true, **kwargs)["f1"]
            _assert_f1_close(ours, expected)


def test_f1_errors(metrics):
    f1 = metrics["f1"]
    with pytest.raises(ValueError, match="binary"):
        f1.compute(predictions=[0, 1, 2], references=[0, 1, 1])
    with pytest.raises(ValueError, match="pos_label"):
        f1.compute(predictions=[0, 2], references=[2, 0])
    with pytest.raises(ValueError, match="average"):
        f1.compute(predictions=[0, 1], references=[0, 1], average="mean")


# --------------------------------------------------------------------------- pearson / spearman


CORRELATION_CASES = [
    ([1.0, 2.5, 3.0, 4.5], [1.2, 2.0, 3.5, 5.0]),
    ([5.0, 4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0, 5.0]),  # perfect negative
    ([1.0, 2.0, 2.0, 3.0, 3.0, 3.0, 4.0], [2.0, 1.0, 4.0, 4.0, 3.0, 5.0, 5.0]),  # ties on both sides
    ([4.2, 3.1], [2.0, 3.3]),  # two points
]


@pytest.mark.parametrize("predictions,references", CORRELATION_CASES)
def test_correlations_match_scipy(metrics, predictions, references):
    stats = pytest.importorskip("scipy.stats")
    out = metrics["pearson_spearman"].compute(
        predictions=predictions, references=references, return_pvalue=True
    )
    r, p = stats.pearsonr(predictions, references)
    rho, p_rho = stats.spearmanr(predictions, references)
    assert out["pearson"] == pytest.approx(r, abs=1e-12)
    assert out["spearman"] == pytest.approx(rho, abs=1e-12)
    for ours, theirs in [(out["pearson_pvalue"], p), (out["spearman_pvalue"], p_rho)]:
        assert (math.isnan(ours) and math.isnan(theirs)) or ours == pytest.approx(theirs, abs=1e-9)


def test_correlations_random_match_scipy(metrics):
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(2)
    for n in (3, 40, 400):
        references = rng.uniform(1, 5, n).round(1)  # rounding makes ties
        predictions = (references + rng.normal(0, 1, n)).round(1)
        out = metrics["pearson_spearman"].compute(predictions=predictions, references=references)
        assert set(out) == {"pearson", "spearman"}
        assert out["pearson"] == pytest.approx(stats.pearsonr(predictions, references)[0], abs=1e-12)
        assert out["spearman"] == pytest.approx(stats.spearmanr(predictions, references)[0], abs=1e-12)


def test_correlations_edge_cases(metrics):
    corr = metrics["pearson_spearman"]
    out = corr.compute(predictions=[2.0, 2.0, 2.0], references=[1.0, 2.0, 3.0])  # constant input
    assert math.isnan(out["pearson"]) and math.isnan(out["spearman"])
    with pytest.raises(ValueError, match="at least 2"):
        corr.compute(predictions=[1.0], references=[2.0])


# --------------------------------------------------------------------------- seqeval


def _reference_seqeval(predictions, references, **kwargs):
    """What the Hub metric "seqeval" returns (it wraps the seqeval library this way)."""
    pytest.importorskip("seqeval")
    from seqeval.metrics import accuracy_score, classification_report

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = classification_report(y_true=references, y_pred=predictions, output_dict=True, **kwargs)
    report.pop("macro avg")
    report.pop("weighted avg")
    overall = report.pop("micro avg")
    scores = {
        entity_type: {
            "precision": score["precision"],
            "recall": score["recall"],
            "f1": score["f1-score"],
            "number": score["support"],
        }
        for entity_type, score in report.items()
    }
    scores["overall_precision"] = overall["precision"]
    scores["overall_recall"] = overall["recall"]
    scores["overall_f1"] = overall["f1-score"]
    scores["overall_accuracy"] = accuracy_score(y_true=references, y_pred=predictions)
    return scores


def _assert_nested_close(ours, theirs):
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        if isinstance(value, dict):
            _assert_nested_close(ours[key], value)
        else:
            assert ours[key] == pytest.approx(float(value), abs=1e-12), key


SEQEVAL_CASES = [
    # (references, predictions)
    (
        [["B-PER", "I-PER", "O", "B-LOC", "O"], ["B-ORG", "I-ORG", "I-ORG", "O"]],
        [["B-PER", "I-PER", "O", "B-LOC", "O"], ["B-ORG", "I-ORG", "O", "O"]],
    ),
    (  # I- after O, type switches inside an entity, I- at the start of a sentence
        [["O", "I-PER", "I-PER", "O", "B-LOC", "I-LOC"], ["I-ORG", "B-ORG", "O"]],
        [["O", "B-PER", "I-PER", "O", "B-LOC", "I-ORG"], ["I-ORG", "I-ORG", "O"]],
    ),
    (  # adjacent entities of the same type, entity at the very end
        [["B-LOC", "B-LOC", "I-LOC", "O", "B-PER"], ["B-PER", "I-PER", "I-PER"]],
        [["B-LOC", "I-LOC", "I-LOC", "O", "B-PER"], ["B-PER", "I-PER", "B-PER"]],
    ),
    (  # no entity predicted
        [["B-PER", "O"], ["O", "B-ORG"]],
        [["O", "O"], ["O", "O"]],
    ),
    (  # only spurious entities
        [["O", "O", "O"]],
        [["B-MISC", "I-MISC", "O"]],
    ),
    (  # entity types whose names contain a dash
        [["B-DATE-TIME", "I-DATE-TIME", "O"]],
        [["B-DATE-TIME", "O", "O"]],
    ),
]


@pytest.mark.parametrize("references,predictions", SEQEVAL_CASES)
def test_seqeval_default_mode_matches_seqeval(metrics, references, predictions):
    ours = metrics["seqeval"].compute(predictions=predictions, references=references)
    _assert_nested_close(ours, _reference_seqeval(predictions, references))


@pytest.mark.parametrize("references,predictions", SEQEVAL_CASES)
def test_seqeval_strict_iob2_matches_seqeval(metrics, references, predictions):
    pytest.importorskip("seqeval")
    from seqeval.scheme import IOB2

    ours = metrics["seqeval"].compute(
        predictions=predictions, references=references, mode="strict", scheme="IOB2"
    )
    _assert_nested_close(ours, _reference_seqeval(predictions, references, mode="strict", scheme=IOB2))


def test_seqeval_iobes_tags_default_mode(metrics):
    references = [["S-PER", "O", "B-LOC", "I-LOC", "E-LOC", "O"], ["B-ORG", "E-ORG", "S-ORG"]]
    predictions = [["S-PER", "O", "B-LOC", "E-LOC", "O", "O"], ["B-ORG", "E-ORG", "E-ORG"]]
    ours = metrics["seqeval"].compute(predictions=predictions, references=references)
    _assert_nested_close(ours, _reference_seqeval(predictions, references))


def test_seqeval_zero_division_one(metrics):
    references = [["O", "O"]]
    predictions = [["O", "O"]]
    ours = metrics["seqeval"].compute(predictions=predictions, references=references, zero_division=1)
    _assert_nested_close(ours, _reference_seqeval(predictions, references, zero_division=1))
    assert ours["overall_f1"] == 1.0


def test_seqeval_random_matches_seqeval(metrics):
    pytest.importorskip("seqeval")
    from seqeval.scheme import IOB2

    rng = np.random.default_rng(3)
    tags = ["O", "O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
    references, predictions = [], []
    for _ in range(60):
        n = int(rng.integers(1, 12))
        ref = [tags[i] for i in rng.integers(0, len(tags), n)]
        pred = [t if rng.random() < 0.7 else tags[int(rng.integers(0, len(tags)))] for t in ref]
        references.append(ref)
        predictions.append(pred)
    ours = metrics["seqeval"].compute(predictions=predictions, references=references)
    _assert_nested_close(ours, _reference_seqeval(predictions, references))
    ours = metrics["seqeval"].compute(predictions=predictions, references=references, mode="strict")
    _assert_nested_close(ours, _reference_seqeval(predictions, references, mode="strict", scheme=IOB2))


def test_seqeval_errors(metrics):
    seqeval = metrics["seqeval"]
    with pytest.raises(ValueError, match="sentence 0"):
        seqeval.compute(predictions=[["O"]], references=[["O", "B-PER"]])
    with pytest.raises(ValueError, match="S-PER"):  # seqeval's own message names the tag
        seqeval.compute(predictions=[["S-PER"]], references=[["S-PER"]], mode="strict")
    with pytest.raises(ValueError, match="scheme"):
        seqeval.compute(predictions=[["O"]], references=[["O"]], mode="strict", scheme="XYZ")


# --------------------------------------------------------------------------- rouge

ROUGE_TYPES = ["rouge1", "rouge2", "rouge3", "rougeL", "rougeLsum"]

ASCII_PAIRS = [
    # (prediction, reference): ASCII only, where our tokeniser and rouge-score's agree
    ("the cat sat on the mat", "the cat was sitting on the mat"),
    ("O governo anunciou hoje um novo plano.", "Hoje o governo anunciou um plano novo para o setor."),
    (
        "A chuva forte fechou 3 estradas em Curitiba",
        "Chuvas fortes fecham tres estradas em Curitiba, diz a prefeitura",
    ),
    (
        "first sentence here.\nsecond one is longer than the first.",
        "a first sentence.\nthe second sentence is long.",
    ),
    ("one two three\nfour five six\nseven", "seven six five\none two\nthree four"),
    ("a a a b b", "a b a b a b"),
    ("", "some reference text"),
    ("some prediction", ""),
    ("!!! ???", "... ---"),
    ("same text, same words", "same text, same words"),
]


def _rouge_score_reference(predictions, references, rouge_types=ROUGE_TYPES, tokenizer=None):
    """Per-example F-measures of rouge-score (max over references, like `score_multi`)."""
    pytest.importorskip("rouge_score")
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(rouge_types, tokenizer=tokenizer)
    out = {t: [] for t in rouge_types}
    for prediction, refs in zip(predictions, references, strict=True):
        refs = [refs] if isinstance(refs, str) else refs
        scores = scorer.score_multi(refs, prediction)
        for t in rouge_types:
            out[t].append(scores[t].fmeasure)
    return out


def test_rouge_matches_rouge_score_on_ascii(metrics):
    predictions = [p for p, _ in ASCII_PAIRS]
    references = [r for _, r in ASCII_PAIRS]
    expected = _rouge_score_reference(predictions, references)
    ours = metrics["rouge"].compute(
        predictions=predictions, references=references, rouge_types=ROUGE_TYPES, use_aggregator=False
    )
    for t in ROUGE_TYPES:
        np.testing.assert_allclose(ours[t], expected[t], atol=1e-12, err_msg=t)
    aggregated = metrics["rouge"].compute(
        predictions=predictions, references=references, rouge_types=ROUGE_TYPES
    )
    for t in ROUGE_TYPES:
        assert aggregated[t] == pytest.approx(float(np.mean(expected[t])), abs=1e-12)


def test_rouge_multiple_references_match_rouge_score(metrics):
    predictions = ["the quick brown fox", "a b c d"]
    references = [["a quick brown dog", "the quick fox jumped"], ["d c b a", "a b", "x y z"]]
    expected = _rouge_score_reference(predictions, references)
    ours = metrics["rouge"].compute(
        predictions=predictions, references=references, rouge_types=ROUGE_TYPES, use_aggregator=False
    )
    for t in ROUGE_TYPES:
        np.testing.assert_allclose(ours[t], expected[t], atol=1e-12, err_msg=t)


PORTUGUESE_PAIRS = [
    ("A ação não é fácil, disse o ministro.", "O ministro disse que a ação não será fácil."),
    ("Choveu muito em São Paulo e no Paraná.", "Em São Paulo choveu forte; no Paraná, também."),
    (
        "Três lojas fecharam.\nA prefeitura não comentou.",
        "A prefeitura não comentou o fechamento.\nTrês lojas fecharam.",
    ),
]


def test_rouge_ascii_only_reproduces_rouge_score_on_portuguese(metrics):
    predictions = [p for p, _ in PORTUGUESE_PAIRS]
    references = [r for _, r in PORTUGUESE_PAIRS]
    expected = _rouge_score_reference(predictions, references)
    ours = metrics["rouge"].compute(
        predictions=predictions,
        references=references,
        rouge_types=ROUGE_TYPES,
        use_aggregator=False,
        ascii_only=True,
    )
    for t in ROUGE_TYPES:
        np.testing.assert_allclose(ours[t], expected[t], atol=1e-12, err_msg=t)


def test_rouge_portuguese_keeps_accents(metrics):
    """Our default tokeniser keeps accented words whole; rouge-score's scoring rules, given the same
    tokens, give the same scores."""
    pytest.importorskip("rouge_score")
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_ptmoe_rouge", os.path.join(metric_path("rouge"), "rouge.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tokenizer = module.Tokenizer()
    assert tokenizer("A AÇÃO não é fácil!") == ["a", "ação", "não", "é", "fácil"]
    # Decomposed accents (NFD) are normalised first.
    assert tokenizer("nao e\u0301 assim") == ["nao", "é", "assim"]

    class SameTokens:  # rouge-score accepts any object with a `tokenize` method
        def tokenize(self, text):
            return tokenizer(text)

    predictions = [p for p, _ in PORTUGUESE_PAIRS]
    references = [r for _, r in PORTUGUESE_PAIRS]
    expected = _rouge_score_reference(predictions, references, tokenizer=SameTokens())
    ours = metrics["rouge"].compute(
        predictions=predictions, references=references, rouge_types=ROUGE_TYPES, use_aggregator=False
    )
    for t in ROUGE_TYPES:
        np.testing.assert_allclose(ours[t], expected[t], atol=1e-12, err_msg=t)

    # "avó" (grandmother) and "avô" (grandfather) are different words; rouge-score's tokeniser cuts
    # both to "av" and calls them a perfect match.
    ours = metrics["rouge"].compute(predictions=["a avó"], references=["o avô"], rouge_types=["rouge1"])
    ascii_only = metrics["rouge"].compute(
        predictions=["a avó"], references=["o avô"], rouge_types=["rouge1"], ascii_only=True
    )
    assert ours["rouge1"] == 0.0
    assert ascii_only["rouge1"] == pytest.approx(0.5)


def test_rouge_options(metrics):
    rouge = metrics["rouge"]
    out = rouge.compute(predictions=["o gato não dormiu"], references=["o gato não dormiu hoje"])
    assert set(out) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    assert out["rouge1"] == pytest.approx(8 / 9)
    # A custom tokenizer replaces the default one.
    out = rouge.compute(
        predictions=["A-B c"], references=["a-b c"], rouge_types=["rouge1"], tokenizer=lambda s: s.split()
    )
    assert out["rouge1"] == pytest.approx(0.5)
    # Portuguese stemming (needs nltk): inflected forms match.
    pytest.importorskip("nltk")
    plain = rouge.compute(
        predictions=["meninos correndo"], references=["menino corre"], rouge_types=["rouge1"]
    )
    stemmed = rouge.compute(
        predictions=["meninos correndo"],
        references=["menino corre"],
        rouge_types=["rouge1"],
        use_stemmer=True,
    )
    assert plain["rouge1"] == 0.0
    assert stemmed["rouge1"] == 1.0
    with pytest.raises(ValueError, match="unknown ROUGE type"):
        rouge.compute(predictions=["a"], references=["a"], rouge_types=["rougeW"])


# --------------------------------------------------------------------------- bleu

BLEU_CORPORA = [
    (  # one reference each, punctuation, numbers, accents
        [
            "O gato está sobre o tapete.",
            "A prefeitura de Recife anunciou 1.500 vagas, com salário de R$ 2.300,50.",
            'Ele disse: "não volto mais" - e foi embora!',
            "Choveu.",
        ],
        [
            ["O gato está no tapete."],
            ["A prefeitura do Recife abriu 1.500 vagas com salário de R$ 2.300,50."],
            ['Ele falou: "não volto nunca mais" e saiu!'],
            ["Choveu muito durante toda a noite em Belém."],
        ],
    ),
    (  # two references each
        ["the cat is on the mat", "there is a cat on the mat", "hello world"],
        [
            ["the cat is on the mat", "hello there world"],
            ["a cat is on the mat", "there is a cat on the mat"],
            ["hello big world", "hello world !"],
        ],
    ),
    (  # no n-gram match at all
        ["xyz abc"],
        [["completely different words"]],
    ),
    (  # only unigram matches, short hypothesis (brevity penalty), 4-grams impossible
        ["gato cão", "mesa"],
        [["o cão e o gato dormem"], ["a mesa posta"]],
    ),
    (  # HTML entities, dash after a digit, 13a special characters
        ["Tom &amp; Jerry 1990-2000 &lt;b&gt; {x} [y] @z #w ~q `r`"],
        [["Tom & Jerry 1990 - 2000 <b> {x} [y] @z #w ~q `r`"]],
    ),
    (  # an empty hypothesis in the corpus, trailing spaces
        ["", "um dois três quatro cinco   "],
        [["qualquer coisa"], ["um dois três quatro cinco seis"]],
    ),
]


def _sacrebleu_reference(predictions, references, **kwargs):
    sacrebleu = pytest.importorskip("sacrebleu")
    n_refs = len(references[0])
    ref_streams = [[refs[i] for refs in references] for i in range(n_refs)]  # sacrebleu wants streams
    return sacrebleu.corpus_bleu(predictions, ref_streams, **kwargs)


def _assert_bleu_equal(ours, ref):
    assert ours["score"] == pytest.approx(ref.score, abs=1e-9)
    assert ours["bleu"] == pytest.approx(ref.score / 100, abs=1e-11)
    assert ours["counts"] == pytest.approx(list(ref.counts))
    assert ours["totals"] == pytest.approx(list(ref.totals))
    np.testing.assert_allclose(ours["precisions"], ref.precisions, atol=1e-9)
    assert ours["bp"] == pytest.approx(ref.bp, abs=1e-12)
    assert ours["sys_len"] == ref.sys_len
    assert ours["ref_len"] == ref.ref_len


@pytest.mark.parametrize("predictions,references", BLEU_CORPORA)
def test_bleu_matches_sacrebleu_defaults(metrics, predictions, references):
    ours = metrics["bleu"].compute(predictions=predictions, references=references)
    _assert_bleu_equal(ours, _sacrebleu_reference(predictions, references))


@pytest.mark.parametrize(
    "kwargs,sacrebleu_kwargs",
    [
        ({"lowercase": True}, {"lowercase": True}),
        ({"tokenize": "none"}, {"tokenize": "none"}),
        ({"smooth_method": "none"}, {"smooth_method": "none"}),
        ({"smooth_method": "floor"}, {"smooth_method": "floor"}),
        ({"smooth_method": "floor", "smooth_value": 0.3}, {"smooth_method": "floor", "smooth_value": 0.3}),
        ({"smooth_method": "add-k"}, {"smooth_method": "add-k"}),
        ({"use_effective_order": True}, {"use_effective_order": True}),
    ],
)
def test_bleu_options_match_sacrebleu(metrics, kwargs, sacrebleu_kwargs):
    for predictions, references in BLEU_CORPORA:
        ours = metrics["bleu"].compute(predictions=predictions, references=references, **kwargs)
        _assert_bleu_equal(ours, _sacrebleu_reference(predictions, references, **sacrebleu_kwargs))


def test_bleu_single_reference_strings(metrics):
    predictions = ["o gato está sobre o tapete .", "bom dia a todos"]
    as_lists = metrics["bleu"].compute(
        predictions=predictions, references=[["o gato está no tapete ."], ["bom dia"]]
    )
    as_strings = metrics["bleu"].compute(
        predictions=predictions, references=["o gato está no tapete .", "bom dia"]
    )
    assert as_lists == as_strings
    with pytest.raises(ValueError, match="smooth_method"):
        metrics["bleu"].compute(predictions=["a"], references=["a"], smooth_method="best")


# --------------------------------------------------------------------------- edge cases, against the libraries
# Each case calls the library itself on the same input: a module must return what the library returns, or raise the
# exception type the library raises.


def _outcome(function):
    """`("ok", value)` or `("error", exception type)` of calling `function` (library warnings silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return "ok", function()
        except Exception as error:  # noqa: BLE001 - the type is what is compared
            return "error", type(error)


def _assert_same_outcome(ours, theirs):
    assert ours[0] == theirs[0], (ours, theirs)
    if ours[0] == "error":
        assert issubclass(ours[1], theirs[1]) or issubclass(theirs[1], ours[1]), (ours, theirs)
    else:
        _assert_f1_close(ours[1], theirs[1])


@pytest.mark.parametrize(
    "references,predictions",
    [([], []), ([1], [1]), ([0, 0, 0], [0, 0, 0]), ([2, 2], [1, 1]), ([0, 1, 0], [0, 1, 1])],
    ids=["empty", "one-example", "one-class", "one-class-all-wrong", "two-classes"],
)
def test_accuracy_and_f1_edge_cases_match_sklearn(metrics, references, predictions):
    from sklearn.metrics import accuracy_score, f1_score

    ours = _outcome(
        lambda: metrics["accuracy"].compute(predictions=predictions, references=references)["accuracy"]
    )
    _assert_same_outcome(ours, _outcome(lambda: accuracy_score(references, predictions)))
    for average in ("binary", "macro", "micro"):
        ours = _outcome(
            lambda average=average: metrics["f1"].compute(
                predictions=predictions, references=references, average=average
            )["f1"]
        )
        theirs = _outcome(lambda average=average: f1_score(references, predictions, average=average))
        _assert_same_outcome(ours, theirs)


@pytest.mark.parametrize(
    "references,predictions",
    [([], []), ([1.0], [2.0]), ([3.0, 3.0, 3.0], [1.0, 2.0, 3.0]), ([1.0, 2.0], [2.0, 1.0])],
    ids=["empty", "one-point", "constant", "two-points"],
)
def test_correlation_edge_cases_match_scipy(metrics, references, predictions):
    from scipy import stats

    def ours():
        out = metrics["pearson_spearman"].compute(predictions=predictions, references=references)
        return out["pearson"], out["spearman"]

    def theirs():
        return (
            float(stats.pearsonr(predictions, references).statistic),
            float(stats.spearmanr(predictions, references).statistic),
        )

    mine, lib = _outcome(ours), _outcome(theirs)
    assert mine[0] == lib[0], (mine, lib)
    if mine[0] == "ok":
        np.testing.assert_allclose(mine[1], lib[1], atol=1e-12, equal_nan=True)


SEQEVAL_EDGE_CASES = {
    "empty-sentence": ([[]], [[]]),
    "only-O": ([["O", "O"]], [["O", "O"]]),
    "one-class": ([["B-PESSOA", "I-PESSOA", "O"]], [["B-PESSOA", "O", "O"]]),
    # Portuguese entity types with accents and cedillas, as a user's own label set might spell them
    "accents": (
        [["B-ORGANIZAÇÃO", "I-ORGANIZAÇÃO", "O", "B-LEGISLAÇÃO"]],
        [["B-ORGANIZAÇÃO", "I-ORGANIZAÇÃO", "O", "B-JURISPRUDÊNCIA"]],
    ),
}


@pytest.mark.parametrize("case", sorted(SEQEVAL_EDGE_CASES))
def test_seqeval_edge_cases_match_seqeval(metrics, case):
    references, predictions = SEQEVAL_EDGE_CASES[case]
    mine = _outcome(lambda: metrics["seqeval"].compute(predictions=predictions, references=references))
    lib = _outcome(lambda: _reference_seqeval(predictions, references))
    assert mine[0] == lib[0], (mine, lib)
    if mine[0] == "ok":
        _assert_nested_close(mine[1], lib[1])


def test_seqeval_empty_input_matches_seqeval(metrics):
    mine = _outcome(lambda: metrics["seqeval"].compute(predictions=[], references=[]))
    lib = _outcome(lambda: _reference_seqeval([], []))
    assert mine[0] == lib[0] == "error"


class _PtTokens:
    """rouge-score's tokenizer hook with ptmoe's accent-keeping tokeniser (the reference gets the same tokens)."""

    def __init__(self):
        import importlib.util

        spec = importlib.util.spec_from_file_location(
            "_ptmoe_rouge_edge", os.path.join(metric_path("rouge"), "rouge.py")
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        self.tokenizer = module.Tokenizer()

    def tokenize(self, text):
        return self.tokenizer.tokenize(text)


ROUGE_EDGE_CASES = {
    "empty-prediction": (["", "a casa"], ["a casa é azul", "a casa"]),
    "empty-reference": (["a casa é azul"], [""]),
    "accents": (["Não há ação sem reação."], [["A ação não teve reação.", "Não houve ação."]]),
    "multiple-references": (
        ["o juiz negou o pedido", "a avó saiu"],
        [["o juiz aceitou o pedido", "o tribunal negou o pedido"], ["a avó chegou", "o avô saiu", "ninguém"]],
    ),
}


@pytest.mark.parametrize("case", sorted(ROUGE_EDGE_CASES))
def test_rouge_edge_cases_match_rouge_score(metrics, case):
    predictions, references = ROUGE_EDGE_CASES[case]
    expected = _rouge_score_reference(predictions, references, tokenizer=_PtTokens())
    ours = metrics["rouge"].compute(
        predictions=predictions, references=references, rouge_types=ROUGE_TYPES, use_aggregator=False
    )
    for t in ROUGE_TYPES:
        np.testing.assert_allclose(ours[t], expected[t], atol=1e-12, err_msg=t)
    # ascii_only is rouge-score's own tokeniser, unchanged
    expected = _rouge_score_reference(predictions, references)
    ours = metrics["rouge"].compute(
        predictions=predictions,
        references=references,
        rouge_types=ROUGE_TYPES,
        use_aggregator=False,
        ascii_only=True,
    )
    for t in ROUGE_TYPES:
        np.testing.assert_allclose(ours[t], expected[t], atol=1e-12, err_msg=t)


def test_rouge_empty_input(metrics):
    """`evaluate` itself cannot pick the input layout (one reference or several) of an empty batch and fails before
    the module runs; rouge-score has no corpus-level call to compare with."""
    with pytest.raises((IndexError, ValueError)):
        metrics["rouge"].compute(predictions=[], references=[], rouge_types=["rouge1"])


def test_bleu_variable_number_of_references_matches_sacrebleu(metrics):
    """Predictions with 1, 3 and 2 references; sacrebleu takes streams padded with None."""
    import sacrebleu

    predictions = ["O réu não compareceu à audiência.", "A lei foi sancionada ontem.", "Choveu em Belém."]
    references = [
        ["O réu não foi à audiência."],
        ["A lei foi sancionada ontem à noite.", "Ontem a lei foi sancionada.", "Sancionaram a lei ontem."],
        ["Choveu muito em Belém.", "Em Belém choveu."],
    ]
    streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(3)]
    _assert_bleu_equal(
        metrics["bleu"].compute(predictions=predictions, references=references),
        sacrebleu.corpus_bleu(predictions, streams),
    )


def test_bleu_empty_input_matches_sacrebleu(metrics):
    import sacrebleu

    mine = _outcome(lambda: metrics["bleu"].compute(predictions=[], references=[])["score"])
    lib = _outcome(lambda: sacrebleu.corpus_bleu([], [[]]).score)
    assert mine[0] == lib[0], (mine, lib)
    if mine[0] == "ok":
        assert mine[1] == lib[1]
    with pytest.raises(ValueError, match="at least one reference"):
        metrics["bleu"].compute(predictions=["a"], references=[[]])


def test_bleu_accents_with_intl_tokenizer_matches_sacrebleu(metrics):
    import sacrebleu

    predictions = ["«Não», disse ela — é tarde."]
    references = [["«Não», respondeu ela — já é tarde."]]
    _assert_bleu_equal(
        metrics["bleu"].compute(predictions=predictions, references=references, tokenize="intl"),
        sacrebleu.corpus_bleu(predictions, [[references[0][0]]], tokenize="intl"),
    )


def test_modules_hold_no_hand_written_maths():
    """The modules compute with the libraries: each imports its library."""
    libraries = {
        "accuracy": "sklearn",
        "f1": "sklearn",
        "pearson_spearman": "scipy",
        "seqeval": "seqeval",
        "rouge": "rouge_score",
        "bleu": "sacrebleu",
    }
    for name, library in libraries.items():
        with open(os.path.join(metric_path(name), f"{name}.py"), encoding="utf-8") as f:
            source = f.read()
        assert f"from {library}" in source, name
