"""F1 score, as a local `evaluate` metric module shipped with ptmoe (works offline).

The number is `sklearn.metrics.f1_score`; this module only adapts the `evaluate` interface.
"""

import datasets
import evaluate
from sklearn.metrics import f1_score

_DESCRIPTION = """
The F1 score is the harmonic mean of precision and recall: F1 = 2 * TP / (2 * TP + FP + FN).
For more than two classes, per-class scores are combined by the `average` argument.
Computed by scikit-learn's `f1_score` (all its arguments are accepted).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels.
    references (`list` of `int`): reference labels.
    labels (`list` of `int`, optional): the labels to score when `average != "binary"`.
    pos_label (`int`, defaults to 1): the positive class when `average="binary"`.
    average (`str` or `None`, defaults to `"binary"`): `"binary"`, `"micro"`, `"macro"`,
        `"weighted"`, or `None` for the list of per-label scores.
    sample_weight (`list` of `float`, optional): one weight per example.
    zero_division (`0`, `1`, `"warn"` or `nan`, defaults to `"warn"`): the value of an undefined
        (0/0) F1, as in scikit-learn.
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
        zero_division="warn",
    ):
        score = f1_score(
            references,
            predictions,
            labels=labels,
            pos_label=pos_label,
            average=average,
            sample_weight=sample_weight,
            zero_division=zero_division,
        )
        return {"f1": [float(s) for s in score] if average is None else float(score)}
