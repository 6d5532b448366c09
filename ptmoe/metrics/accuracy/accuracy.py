"""Accuracy, as a local `evaluate` metric module shipped with ptmoe (works offline).

The number is `sklearn.metrics.accuracy_score`; this module only adapts the `evaluate` interface.
"""

import datasets
import evaluate
from sklearn.metrics import accuracy_score

_DESCRIPTION = """
Accuracy is the proportion of predictions equal to their reference:
Accuracy = (number of correct predictions) / (number of predictions).
With the `multilabel` configuration a prediction counts as correct only when its whole label
vector equals the reference vector (subset accuracy). Computed by scikit-learn's `accuracy_score`.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels (lists of 0/1 ints with the `multilabel` config).
    references (`list` of `int`): reference labels, same shape as `predictions`.
    normalize (`bool`, defaults to `True`): if `False`, return the (weighted) number of correct
        predictions instead of the proportion.
    sample_weight (`list` of `float`, optional): one weight per example.
Returns:
    accuracy (`float`): in [0, 1] when `normalize=True`, else a count.
Examples:
    >>> from ptmoe.metrics import load_metric
    >>> accuracy = load_metric("accuracy")
    >>> accuracy.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0])
    {'accuracy': 0.75}
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
class Accuracy(evaluate.Metric):
    def _info(self):
        if self.config_name == "multilabel":
            features = datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("int32")),
                    "references": datasets.Sequence(datasets.Value("int32")),
                }
            )
        else:
            features = datasets.Features(
                {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
            )
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=features,
            reference_urls=[
                "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.accuracy_score.html"
            ],
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        return {
            "accuracy": float(
                accuracy_score(references, predictions, normalize=normalize, sample_weight=sample_weight)
            )
        }
