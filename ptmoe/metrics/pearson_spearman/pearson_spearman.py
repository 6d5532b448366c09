"""Pearson and Spearman correlations, as a local `evaluate` metric module shipped with ptmoe (works offline).

The numbers are `scipy.stats.pearsonr` and `scipy.stats.spearmanr`; this module only adapts the
`evaluate` interface and returns both coefficients in one call (what STS benchmarks such as
ASSIN 2 report).
"""

import datasets
import evaluate
from scipy import stats

_DESCRIPTION = """
Correlation between predicted and reference scores of a regression task (e.g. the 1-5 semantic
similarity of ASSIN / ASSIN 2 or STS-B):
- Pearson's r measures the linear correlation of the values;
- Spearman's rho is Pearson's r of their ranks (ties get the average rank).
Both range from -1 to 1; computed by scipy. If either input is constant the correlation is
undefined and `nan` is returned (scipy warns).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `float`): predicted scores.
    references (`list` of `float`): reference scores (at least two).
    return_pvalue (`bool`, defaults to `False`): also return scipy's two-sided p-values
        (`pearson_pvalue`, `spearman_pvalue`).
Returns:
    pearson (`float`): Pearson correlation coefficient.
    spearman (`float`): Spearman rank correlation coefficient.
Examples:
    >>> from ptmoe.metrics import load_metric
    >>> corr = load_metric("pearson_spearman")
    >>> out = corr.compute(predictions=[1.0, 2.5, 3.0, 4.5], references=[1.2, 2.0, 3.5, 5.0])
    >>> round(out["pearson"], 4), out["spearman"]
    (0.9657, 1.0)
"""

_CITATION = """
@article{2020SciPy-NMeth,
  title={{SciPy} 1.0: Fundamental Algorithms for Scientific Computing in Python},
  author={Virtanen, Pauli and others},
  journal={Nature Methods},
  year={2020},
  volume={17},
  pages={261--272}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PearsonSpearman(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("float64")}
            ),
            reference_urls=[
                "https://docs.scipy.org/doc/scipy/reference/generated/scipy.stats.pearsonr.html",
                "https://docs.scipy.org/doc/scipy/reference/generated/scipy.stats.spearmanr.html",
            ],
        )

    def _compute(self, predictions, references, return_pvalue=False):
        pearson = stats.pearsonr(predictions, references)
        spearman = stats.spearmanr(predictions, references)
        result = {"pearson": float(pearson.statistic), "spearman": float(spearman.statistic)}
        if return_pvalue:
            result["pearson_pvalue"] = float(pearson.pvalue)
            result["spearman_pvalue"] = float(spearman.pvalue)
        return result
