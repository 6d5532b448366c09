"""Adjusted Work Saved over Sampling (AWSS@r), as a local `evaluate` metric module shipped with ptmoe (offline).

Written for ptmoe from the definition of de Melo et al. (2022) and the reference code of its authors
(github.com/BecomeAllan/ML-SLRC, `wss_calc`), with the threshold rule stated below.
"""

import math

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
AWSS@r (de Melo et al., 2022) measures the screening work a classifier saves at a recall level r, independent of
the share of relevant documents (which makes WSS hard to compare across datasets):

    AWSS@r = TN% - (1 - TP%) = TN / (TN + FP) - FN / (TP + FN)        (true-negative rate minus miss rate)

The confusion counts are taken at the decision threshold chosen on the scores as the authors do: the largest
score threshold t such that predicting "relevant" for every score >= t reaches recall >= r (all ties of t are
predicted relevant). The authors' code finds it through `sklearn.metrics.roc_curve` with its default
`drop_intermediate=True`, which can move to a lower threshold inside a straight segment of the ROC curve; here
every distinct score is a candidate, so the threshold is the largest one reaching the recall. TP% is the recall
actually reached at that threshold (>= r: the first multiple of 1/P not below r, or more when scores tie).
Range: [-1, 1]; at the chosen threshold AWSS >= r - 1. 1 = every irrelevant document screened out with no miss,
about 0 = random scores, and a classifier that ranks every irrelevant document above the relevant ones gets
(r' - 1) with r' the recall reached. AWSS is Youden's J statistic at that threshold.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `float`): a score per document, higher = more likely relevant (e.g. the softmax
        probability of the positive class).
    references (`list` of `int`): 1 for relevant (include), 0 for irrelevant (exclude).
    recall (`float`, defaults to 0.95): the recall level r, in (0, 1].
    pos_label (`int`, defaults to 1): the reference value of the relevant class.
Returns:
    awss (`float`): AWSS@r.
    awss_recall (`float`): the recall reached at the chosen threshold (>= r).
    awss_threshold (`float`): the chosen score threshold.
Examples:
    >>> from ptmoe.metrics import load_metric
    >>> awss = load_metric("awss")
    >>> awss.compute(predictions=[0.9, 0.8, 0.7, 0.4, 0.3, 0.2], references=[1, 0, 1, 0, 0, 0], recall=0.95)
    {'awss': 0.75, 'awss_recall': 1.0, 'awss_threshold': 0.7}
"""

_CITATION = """
@inproceedings{melo2022fewshot,
  title={Few-shot Approach for Systematic Literature Review Classifications},
  author={de Melo, Ma{\\'\\i}sa Kely and Faria, Allan Victor Almeida and Weigang, Li and Nery, Arthur Gomes and
          de Oliveira, Fl{\\'a}vio Augusto R. and Barreiro, Ian Teixeira and Celestino, Victor Rafael Rezende},
  booktitle={Proceedings of the 24th International Conference on Enterprise Information Systems (ICEIS)},
  pages={33--44},
  year={2022}
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
class Awss(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("int32")}
            ),
            reference_urls=[
                "https://doi.org/10.5220/0011064700003179",
                "https://github.com/BecomeAllan/ML-SLRC",
            ],
        )

    def _compute(self, predictions, references, recall=0.95, pos_label=1):
        tn, fp, fn, tp, threshold = confusion_at_recall(predictions, references, recall, pos_label)
        reached = tp / (tp + fn)
        return {
            "awss": tn / (tn + fp) - fn / (tp + fn),
            "awss_recall": reached,
            "awss_threshold": threshold,
        }
