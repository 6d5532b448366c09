"""AWSS@r and WSS@r (ptmoe/metrics/awss, ptmoe/metrics/wss): hand-checked values, bounds, the threshold rule against
scikit-learn's ROC curve, and bad input."""

from __future__ import annotations

import numpy as np
import pytest

from ptmoe.metrics import load_metric


@pytest.fixture(scope="module")
def awss():
    return load_metric("awss", keep_in_memory=True)


@pytest.fixture(scope="module")
def wss():
    return load_metric("wss", keep_in_memory=True)


# 10 documents, 4 relevant; scores in ranking order. Hand-checked confusion counts per recall level:
SCORES = [0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
LABELS = [1, 0, 1, 0, 1, 0, 0, 1, 0, 0]
HAND = {
    # r: (threshold, TN, FP, FN, TP); N_neg = 6, P = 4
    0.25: (0.95, 6, 0, 3, 1),  # one relevant needed: the top document
    0.5: (0.8, 5, 1, 2, 2),
    0.75: (0.6, 4, 2, 1, 3),
    0.95: (0.3, 2, 4, 0, 4),  # ceil(0.95 * 4) = 4: down to the last relevant
    1.0: (0.3, 2, 4, 0, 4),
}


@pytest.mark.parametrize("recall", sorted(HAND))
def test_hand_checked_values(awss, wss, recall):
    threshold, tn, fp, fn, tp = HAND[recall]
    a = awss.compute(predictions=SCORES, references=LABELS, recall=recall)
    w = wss.compute(predictions=SCORES, references=LABELS, recall=recall)
    assert a["awss_threshold"] == w["wss_threshold"] == threshold
    assert a["awss_recall"] == w["wss_recall"] == tp / 4
    assert a["awss"] == pytest.approx(tn / (tn + fp) - fn / (tp + fn))
    assert w["wss"] == pytest.approx((tn + fn) / 10 - (1 - tp / 4))


def test_hand_checked_numbers():
    """The same cases as plain numbers (AWSS = TN% − (1 − TP%), WSS = (TN + FN)/N − (1 − R))."""
    awss, wss = load_metric("awss"), load_metric("wss")
    expected = {0.25: (1 - 0.75, 0.9 - 0.75), 0.5: (5 / 6 - 0.5, 0.7 - 0.5), 0.95: (2 / 6, 0.2)}
    for recall, (a, w) in expected.items():
        assert awss.compute(predictions=SCORES, references=LABELS, recall=recall)["awss"] == pytest.approx(a)
        assert wss.compute(predictions=SCORES, references=LABELS, recall=recall)["wss"] == pytest.approx(w)


@pytest.mark.parametrize("recall", [0.5, 0.8, 0.95, 1.0])
def test_perfect_classifier(awss, wss, recall):
    labels = [1] * 5 + [0] * 15
    scores = np.linspace(1, 0, 20)
    needed = int(np.ceil(recall * 5 - 1e-9))
    a = awss.compute(predictions=scores, references=labels, recall=recall)
    assert a["awss"] == pytest.approx(1 - (5 - needed) / 5)  # TN% = 1, misses only those r allows
    w = wss.compute(predictions=scores, references=labels, recall=recall)
    assert w["wss"] == pytest.approx((15 + 5 - needed) / 20 - (1 - needed / 5))
    if recall == 1.0:
        assert a["awss"] == 1.0 and w["wss"] == pytest.approx(1 - 5 / 20)  # WSS's ceiling 1 − P/N


@pytest.mark.parametrize("recall", [0.5, 0.95])
def test_inverted_classifier(awss, wss, recall):
    labels = [1] * 4 + [0] * 16
    scores = np.linspace(0, 1, 20)  # every irrelevant document above every relevant one
    reached = int(np.ceil(recall * 4)) / 4
    a = awss.compute(predictions=scores, references=labels, recall=recall)
    assert a["awss"] == pytest.approx(reached - 1)  # TN% = 0
    w = wss.compute(predictions=scores, references=labels, recall=recall)
    assert w["wss"] == pytest.approx((4 - 4 * reached) / 20 - (1 - reached))


def test_constant_scores_save_nothing(awss, wss):
    labels = [1, 0, 0, 1, 0]
    assert awss.compute(predictions=[0.5] * 5, references=labels)["awss"] == 0.0
    assert wss.compute(predictions=[0.5] * 5, references=labels)["wss"] == 0.0


@pytest.mark.parametrize("recall", [0.5, 0.95])
def test_random_classifier_is_near_zero(awss, wss, recall):
    rng = np.random.default_rng(0)
    labels = (rng.random(20000) < 0.1).astype(int)
    scores = rng.random(20000)
    assert abs(awss.compute(predictions=scores, references=labels, recall=recall)["awss"]) < 0.03
    assert abs(wss.compute(predictions=scores, references=labels, recall=recall)["wss"]) < 0.03


def test_bounds_on_random_cases(awss, wss):
    rng = np.random.default_rng(1)
    for _ in range(30):
        n = int(rng.integers(2, 40))
        labels = rng.integers(0, 2, n)
        labels[:2] = [0, 1]
        scores = rng.integers(0, 5, n) / 4  # many ties
        recall = float(rng.uniform(0.05, 1.0))
        a = awss.compute(predictions=scores, references=labels, recall=recall)
        w = wss.compute(predictions=scores, references=labels, recall=recall)
        assert -1 <= recall - 1 - 1e-12 <= a["awss"] <= 1
        assert a["awss_recall"] >= recall - 1e-12
        assert -1 < w["wss"] <= 1 - labels.sum() / n + 1e-12


def test_threshold_rule_matches_sklearn_roc_curve(awss):
    """The chosen threshold is the first ROC point reaching the recall (the authors' rule, without dropping
    collinear ROC points)."""
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(2)
    for _ in range(20):
        labels = rng.integers(0, 2, 50)
        labels[:2] = [0, 1]
        scores = rng.integers(0, 20, 50) / 19
        for recall in (0.6, 0.9, 0.95):
            fpr, tpr, thresholds = sk.roc_curve(labels, scores, drop_intermediate=False)
            index = int(np.sum(tpr < recall))
            a = awss.compute(predictions=scores, references=labels, recall=recall)
            assert a["awss_threshold"] == pytest.approx(thresholds[index])
            assert a["awss"] == pytest.approx((1 - fpr[index]) - (1 - tpr[index]))


def test_awss_and_wss_modules_share_one_threshold_rule():
    from ptmoe.metrics import metric_path

    def function_source(name):
        source = open(f"{metric_path(name)}/{name}.py", encoding="utf-8").read()
        start = source.index("def confusion_at_recall")
        return source[start : source.index("@evaluate.utils", start)]

    assert function_source("awss") == function_source("wss")


# --------------------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("recall", [0, -0.1, 1.01, 95, True, "0.95", None])
def test_recall_outside_the_unit_interval(awss, wss, recall):
    for metric in (awss, wss):
        with pytest.raises(ValueError, match=r"recall must be a number in \(0, 1\]"):
            metric.compute(predictions=SCORES, references=LABELS, recall=recall)


def test_one_class_references(awss):
    with pytest.raises(ValueError, match="need both classes"):
        awss.compute(predictions=[0.1, 0.2], references=[0, 0])
    with pytest.raises(ValueError, match="need both classes"):
        awss.compute(predictions=[0.1, 0.2], references=[1, 1])


def test_nan_scores(wss):
    with pytest.raises(ValueError, match="NaN"):
        wss.compute(predictions=[0.1, float("nan")], references=[0, 1])


# --------------------------------------------------------------------------------------------------------------
# The classification script: --metric awss@0.95
# --------------------------------------------------------------------------------------------------------------
def test_parse_screening_metrics():
    from ptmoe.training import parse_screening_metrics

    assert parse_screening_metrics(["awss@0.95", "wss@1"]) == [("awss", 0.95), ("wss", 1.0)]
    for bad, message in [
        ("awss@1.5", r"in \(0, 1\]"),
        ("awss@0", r"in \(0, 1\]"),
        ("awss", "NAME@RECALL"),
        ("auc@0.9", "NAME@RECALL"),
        ("awss@x", "not a number"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_screening_metrics([bad])


def test_finetune_classification_reports_awss(tmp_path):
    import json

    from test_scripts import DATA, FAST, load_script
    from test_training import make_bert_tokenizer

    import ptmoe
    from conftest import TINY_BERT

    tokenizer = make_bert_tokenizer()
    model_dir = tmp_path / "moe"
    ptmoe.MoeBertForMaskedLM(
        ptmoe.MoeBertConfig(**{**TINY_BERT, "vocab_size": len(tokenizer)})
    ).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    script = load_script("finetune_classification")
    common = [
        "--model_name_or_path", str(model_dir), "--train_file", str(DATA / "sentiment_train.jsonl"),
        "--validation_file", str(DATA / "sentiment_test.jsonl"), *FAST,
    ]  # fmt: skip
    out = tmp_path / "out"
    metrics = script.main([*common, "--output_dir", str(out), "--metric", "awss@0.95", "wss@0.9"])
    saved = json.loads((out / "all_results.json").read_text())
    assert -1 <= saved["eval_awss@0.95"] <= 1 and "eval_wss@0.9" in saved and "eval_accuracy" in saved
    assert metrics["eval_awss@0.95"] == saved["eval_awss@0.95"]
    with pytest.raises(ValueError, match=r"recall level must be in \(0, 1\]"):
        script.main([*common, "--output_dir", str(tmp_path / "bad"), "--metric", "awss@95"])
    regression = [
        "--model_name_or_path", str(model_dir), "--train_file", str(DATA / "entailment_train.jsonl"),
        "--validation_file", str(DATA / "entailment_test.jsonl"), "--text_column", "premise",
        "--label_column", "similarity", "--task_type", "regression", *FAST,
    ]  # fmt: skip
    with pytest.raises(ValueError, match="needs a binary classification task"):
        script.main([*regression, "--output_dir", str(tmp_path / "reg"), "--metric", "awss@0.95"])
