"""Pearson and Spearman correlations, as a local `evaluate` metric module shipped with ptmoe (works offline).

Written for ptmoe with numpy only; the coefficients match `scipy.stats.pearsonr` and
`scipy.stats.spearmanr`. p-values (optional) need scipy.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Correlation between predicted and reference scores of a regression task (e.g. the 1-5 semantic
similarity of ASSIN / ASSIN2 or STS-B):
- Pearson's r measures the linear correlation of the values;
- Spearman's rho is Pearson's r of their ranks (ties get the average rank), so it measures any
  monotonic relation.
Both range from -1 to 1. If either input is constant the correlation is undefined and `nan` is returned.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `float`): predicted scores.
    references (`list` of `float`): reference scores (at least two).
    return_pvalue (`bool`, defaults to `False`): also return the two-sided p-values
        (`pearson_pvalue`, `spearman_pvalue`); this needs scipy.
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


def average_ranks(values):
    """Ranks 1..n of `values`, tied values sharing the mean of their ranks (scipy's method="average")."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    # Start index of each run of equal values in the sorted array.
    new_run = np.concatenate(([True], sorted_values[1:] != sorted_values[:-1]))
    run_id = np.cumsum(new_run) - 1
    run_starts = np.flatnonzero(new_run)
    run_ends = np.concatenate((run_starts[1:], [len(values)]))  # exclusive
    mean_rank = (run_starts + 1 + run_ends) / 2.0  # mean of the 1-based ranks start+1 .. end
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = mean_rank[run_id]
    return ranks


def pearson(x, y):
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    xc = x - x.mean()
    yc = y - y.mean()
    norm_x = np.linalg.norm(xc)
    norm_y = np.linalg.norm(yc)
    if norm_x == 0 or norm_y == 0:
        return float("nan")
    r = float(np.dot(xc / norm_x, yc / norm_y))
    return max(-1.0, min(1.0, r))


def _two_sided_pvalue(r, n, two_points_value):
    from scipy import stats  # only needed for p-values

    if np.isnan(r):
        return float("nan")
    if n == 2:  # two points always lie on a line: the test has no degree of freedom
        return two_points_value
    if abs(r) == 1.0:
        return 0.0
    t = r * np.sqrt((n - 2) / ((1.0 - r) * (1.0 + r)))
    return float(2 * stats.t.sf(abs(t), n - 2))


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
        if len(predictions) != len(references):
            raise ValueError(
                f"predictions and references differ in length: {len(predictions)} != {len(references)}"
            )
        n = len(predictions)
        if n < 2:
            raise ValueError("correlations need at least two predictions")
        r = pearson(predictions, references)
        rho = pearson(average_ranks(predictions), average_ranks(references))
        result = {"pearson": r, "spearman": rho}
        if return_pvalue:
            # scipy uses an exact distribution for Pearson's p-value, equal to this t-test formula;
            # for Spearman it uses the same t approximation. With two points scipy gives 1.0 for
            # Pearson and nan for Spearman; so do we.
            result["pearson_pvalue"] = _two_sided_pvalue(r, n, 1.0)
            result["spearman_pvalue"] = _two_sided_pvalue(rho, n, float("nan"))
        return result
