"""F1 score, as a local `evaluate` metric module shipped with ptmoe (works offline).

Written for ptmoe; the numbers match `sklearn.metrics.f1_score` for binary and multiclass labels
(averages "binary", "micro", "macro", "weighted" and None).
"""

import math

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
The F1 score is the harmonic mean of precision and recall: F1 = 2 * TP / (2 * TP + FP + FN).
For more than two classes, per-class scores are combined by the `average` argument.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels.
    references (`list` of `int`): reference labels.
    labels (`list` of `int`, optional): the labels to score, in this order, when `average != "binary"`.
        Defaults to the sorted set of labels found in `predictions` and `references`.
    pos_label (`int`, defaults to 1): the positive class when `average="binary"`.
    average (`str` or `None`, defaults to `"binary"`):
        - `"binary"`: the F1 of `pos_label` only (the data must hold at most two distinct labels);
        - `"micro"`: F1 of the total true positives, false negatives and false positives;
        - `"macro"`: unweighted mean of the per-label F1 scores;
        - `"weighted"`: mean of the per-label F1 scores weighted by their support (reference count);
        - `None`: the list of per-label F1 scores, in the order of `labels`.
    sample_weight (`list` of `float`, optional): one weight per example.
    zero_division (`0`, `1`, `"warn"` or `nan`, defaults to 0): the value of F1 when a label has no
        reference and no predicted example ("warn" behaves as 0, like scikit-learn without the warning).
        With `nan`, such labels are left out of the macro / weighted means.
Returns:
    f1 (`float`, or `list` of `float` when `average=None`).
Examples:
    >>> from ptmoe.metrics import load_metric
    >>> f1 = load_metric("f1")
    >>> f1.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0])
    {'f1': 0.6666666666666666}
    >>> round(f1.compute(predictions=[0, 2, 1, 0], references=[0, 1, 2, 0], average="macro")["f1"], 4)
    0.3333
"""

_CITATION = """
@article{scikit-learn,
  title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and others},
  journal={Journal of Machine Learning Research},
  volume={12},
  pages={2825--2830},
  year={2011}
}
"""

_AVERAGES = ("binary", "micro", "macro", "weighted", None)


def _zero_division_value(zero_division):
    if isinstance(zero_division, str):
        if zero_division != "warn":
            raise ValueError(f'zero_division must be 0, 1, nan or "warn", got {zero_division!r}')
        return 0.0
    value = float(zero_division)
    if not (value in (0.0, 1.0) or math.isnan(value)):
        raise ValueError(f'zero_division must be 0, 1, nan or "warn", got {zero_division!r}')
    return value


def _nan_weighted_mean(values, weights=None):
    """Mean ignoring NaN entries; if all remaining weights are zero, fall back to the plain mean."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return float("nan")
    keep = ~np.isnan(values)
    if not keep.any():
        return float("nan")
    if weights is None:
        return float(values[keep].mean())
    weights = np.asarray(weights, dtype=np.float64)[keep]
    if weights.sum() == 0:
        return float(values[keep].mean())
    return float(np.dot(values[keep], weights) / weights.sum())


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
            ),
            reference_urls=[
                "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.f1_score.html"
            ],
        )

    def _compute(
        self,
        predictions,
        references,
        labels=None,
        pos_label=1,
        average="binary",
        sample_weight=None,
        zero_division=0,
    ):
        if average not in _AVERAGES:
            raise ValueError(f"average must be one of {list(_AVERAGES)}, got {average!r}")
        zero = _zero_division_value(zero_division)
        y_pred = np.asarray(predictions)
        y_true = np.asarray(references)
        if y_pred.shape != y_true.shape:
            raise ValueError(f"predictions and references differ in length: {len(y_pred)} != {len(y_true)}")
        if y_true.size == 0:
            raise ValueError("f1 needs at least one prediction")
        if sample_weight is None:
            weights = np.ones(y_true.shape, dtype=np.float64)
        else:
            weights = np.asarray(sample_weight, dtype=np.float64)
            if weights.shape != y_true.shape:
                raise ValueError("sample_weight must have one weight per example")

        present = sorted(set(y_true.tolist()) | set(y_pred.tolist()))
        if average == "binary":
            if len(present) > 2:
                raise ValueError(
                    f"average='binary' needs at most two distinct labels, found {present}; "
                    "use average='micro', 'macro' or 'weighted'"
                )
            if pos_label not in present and len(present) == 2:
                raise ValueError(f"pos_label={pos_label} is not a valid label: it should be one of {present}")
            labels = [pos_label]
        elif labels is None:
            labels = present

        tp = np.array([weights[(y_true == lab) & (y_pred == lab)].sum() for lab in labels], dtype=np.float64)
        n_pred = np.array([weights[y_pred == lab].sum() for lab in labels], dtype=np.float64)
        n_true = np.array([weights[y_true == lab].sum() for lab in labels], dtype=np.float64)
        if average == "micro":
            tp, n_pred, n_true = tp.sum(keepdims=True), n_pred.sum(keepdims=True), n_true.sum(keepdims=True)

        # F1 = 2 TP / (2 TP + FP + FN) = 2 TP / (#true + #predicted); undefined (0/0) -> zero_division.
        denominator = n_true + n_pred
        with np.errstate(divide="ignore", invalid="ignore"):
            scores = np.where(denominator > 0, 2 * tp / np.where(denominator > 0, denominator, 1), zero)

        if average is None:
            return {"f1": [float(s) for s in scores]}
        if average == "weighted":
            return {"f1": _nan_weighted_mean(scores, n_true)}
        return {"f1": _nan_weighted_mean(scores)}
