"""Work Saved over Sampling (WSS@r), as a local `evaluate` metric module shipped with ptmoe (offline).

Written for ptmoe from Cohen et al. (2006), with the threshold rule and the recall term of de Melo et al. (2022)'s
reference code (github.com/BecomeAllan/ML-SLRC, `wss_calc`), stated below.
"""

import math

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
WSS@r (Cohen et al., 2006) is the share of documents a reviewer does not have to read at recall r, minus the
share that random sampling would save at the same recall:

    WSS@r = (TN + FN) / N - (1 - R)

N is the number of documents and R the recall reached at the decision threshold, chosen on the scores as for
AWSS (module `awss`): the largest score threshold t such that predicting "relevant" for every score >= t reaches
recall >= r (all ties of t are predicted relevant). R >= r (the first multiple of 1/P
not below r, or more when scores tie; Cohen et al. write the 95 % case as (TN + FN) / N - 0.05). WSS depends on the share of relevant
documents P / N: since FN / N <= FN / P, WSS <= 1 - P / N (a perfect ranking at r = 1), which is why AWSS was
proposed. At the chosen threshold WSS >= R - 1 > -1; random scores give about 0.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `float`): a score per document, higher = more likely relevant.
    references (`list` of `int`): 1 for relevant (include), 0 for irrelevant (exclude).
    recall (`float`, defaults to 0.95): the recall level r, in (0, 1].
    pos_label (`int`, defaults to 1): the reference value of the relevant class.
Returns:
    wss (`float`): WSS@r.
    wss_recall (`float`): the recall reached at the chosen threshold (>= r).
    wss_threshold (`float`): the chosen score threshold.
Examples:
    >>> from ptmoe.metrics import load_metric
    >>> wss = load_metric("wss")
    >>> wss.compute(predictions=[0.9, 0.8, 0.7, 0.4, 0.3, 0.2], references=[1, 0, 1, 0, 0, 0], recall=0.95)
    {'wss': 0.5, 'wss_recall': 1.0, 'wss_threshold': 0.7}
"""

_CITATION = """
@article{cohen2006reducing,
  title={Reducing workload in systematic review preparation using automated citation classification},
  author={Cohen, Aaron M. and Hersh, William R. and Peterson, K. and Yen, Po-Yin},
  journal={Journal of the American Medical Informatics Association},
  volume={13},
  number={2},
  pages={206--219},
  year={2006}
}
"""


def confusion_at_recall(scores, labels, recall, pos_label=1):
    """(tn, fp, fn, tp, threshold) at the largest score threshold whose recall reaches `recall`.

    Kept identical in awss.py and wss.py: `evaluate` loads each module file on its own (a test checks they agree).
    """
    if isinstance(recall, bool) or not isinstance(recall, (int, float)) or not 0 < recall <= 1:
        raise ValueError(f"recall must be a number in (0, 1] (e.g. 0.95 for r = 95 %), got {recall!r}")
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    positive = np.asarray(labels).reshape(-1) == pos_label
    if scores.shape != positive.shape:
        raise ValueError(f"predictions and references differ in length: {scores.size} != {positive.size}")
    if np.isnan(scores).any():
        raise ValueError("predictions contain NaN scores")
    num_pos = int(positive.sum())
    num_neg = positive.size - num_pos
    if num_pos == 0 or num_neg == 0:
        raise ValueError(
            f"the references need both classes (got {num_pos} relevant with pos_label={pos_label!r} and {num_neg} "
            "irrelevant): recall and the true-negative rate are undefined otherwise"
        )
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_pos = scores[order], positive[order]
    # Candidate thresholds: each distinct score; predicting score >= t takes every document up to its last tie.
    last_of_tie = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
    tp = np.cumsum(sorted_pos)[last_of_tie]
    fp = np.cumsum(~sorted_pos)[last_of_tie]
    # r·P with a tolerance: 0.7 * 10 is 7.000000000000001 in floating point, and 7 true positives reach it.
    needed = math.ceil(recall * num_pos - 1e-9)
    index = int(np.argmax(tp >= needed))
    tp, fp = int(tp[index]), int(fp[index])
    return num_neg - fp, fp, num_pos - tp, tp, float(sorted_scores[last_of_tie][index])


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Wss(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("int32")}
            ),
            reference_urls=["https://doi.org/10.1197/jamia.M1929"],
        )

    def _compute(self, predictions, references, recall=0.95, pos_label=1):
        tn, fp, fn, tp, threshold = confusion_at_recall(predictions, references, recall, pos_label)
        reached = tp / (tp + fn)
        return {
            "wss": (tn + fn) / (tn + fp + fn + tp) - (1 - reached),
            "wss_recall": reached,
            "wss_threshold": threshold,
        }
