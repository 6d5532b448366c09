"""Corpus BLEU, as a local `evaluate` metric module shipped with ptmoe (works offline).

The numbers are SacreBLEU's (`sacrebleu.metrics.BLEU.corpus_score`); this module only adapts the
`evaluate` interface (references per prediction instead of reference streams, and a variable number
of references per prediction).
"""

import datasets
import evaluate
from sacrebleu.metrics import BLEU

_DESCRIPTION = """
BLEU (Papineni et al., 2002) scores generated texts against references by the geometric mean of
their clipped n-gram precisions (n = 1..4), times a brevity penalty for too-short output. This is
corpus BLEU: n-gram matches and lengths are summed over all examples before the score is computed.
Computed by SacreBLEU (Post, 2018), defaults: the "13a" tokenisation of the WMT `mteval-v13a`
script, smoothing "exp", the reference length closest to each hypothesis. Scores are reported on a 0-100 scale (`score`) and 0-1 (`bleu`).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): generated texts, untokenised.
    references (`list` of `str`, or `list` of `list` of `str`): one reference, or several references,
        per prediction.
    smooth_method (`str`, defaults to `"exp"`): "none", "floor", "add-k" or "exp".
    smooth_value (`float`, optional): value for "floor" (default 0.1) and "add-k" (default 1).
    lowercase (`bool`, defaults to `False`): lower-case texts before scoring.
    tokenize (`str`, defaults to `"13a"`): any SacreBLEU tokeniser ("13a", "none", "intl", "char", ...).
    use_effective_order (`bool`, defaults to `False`): leave out n-gram orders with no candidate
        n-gram (useful for single sentences).
Returns:
    score (`float`): BLEU, 0-100 (as SacreBLEU reports it).
    bleu (`float`): BLEU, 0-1.
    counts (`list` of `int`): matched n-grams for n = 1..4.
    totals (`list` of `int`): predicted n-grams for n = 1..4.
    precisions (`list` of `float`): (smoothed) n-gram precisions, 0-100.
    bp (`float`): brevity penalty.
    sys_len (`int`): number of predicted tokens.
    ref_len (`int`): effective reference length.
Examples:
    >>> from ptmoe.metrics import load_metric
    >>> bleu = load_metric("bleu")
    >>> out = bleu.compute(
    ...     predictions=["o gato está sobre o tapete ."],
    ...     references=[["o gato está no tapete ."]],
    ... )
    >>> round(out["score"], 2)
    30.74
"""

_CITATION = """
@inproceedings{papineni-etal-2002-bleu,
  title = "{B}leu: a Method for Automatic Evaluation of Machine Translation",
  author = "Papineni, Kishore and Roukos, Salim and Ward, Todd and Zhu, Wei-Jing",
  booktitle = "Proceedings of the 40th Annual Meeting of the Association for Computational Linguistics",
  year = "2002",
  pages = "311--318",
}
@inproceedings{post-2018-call,
  title = "A Call for Clarity in Reporting {BLEU} Scores",
  author = "Post, Matt",
  booktitle = "Proceedings of the Third Conference on Machine Translation: Research Papers",
  year = "2018",
  pages = "186--191",
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Bleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features(
                    {
                        "predictions": datasets.Value("string", id="sequence"),
                        "references": datasets.Sequence(
                            datasets.Value("string", id="sequence"), id="references"
                        ),
                    }
                ),
                datasets.Features(
                    {
                        "predictions": datasets.Value("string", id="sequence"),
                        "references": datasets.Value("string", id="sequence"),
                    }
                ),
            ],
            reference_urls=["https://github.com/mjpost/sacrebleu", "https://aclanthology.org/P02-1040/"],
        )

    def _compute(
        self,
        predictions,
        references,
        smooth_method="exp",
        smooth_value=None,
        lowercase=False,
        tokenize="13a",
        use_effective_order=False,
    ):
        if smooth_method not in BLEU.SMOOTH_DEFAULTS:
            raise ValueError(
                f"smooth_method must be one of {list(BLEU.SMOOTH_DEFAULTS)}, got {smooth_method!r}"
            )
        if len(predictions) != len(references):
            raise ValueError(
                f"predictions and references differ in length: {len(predictions)} != {len(references)}"
            )
        references = [[refs] if isinstance(refs, str) else list(refs) for refs in references]
        if any(not refs for refs in references):
            raise ValueError("every prediction needs at least one reference")
        # SacreBLEU takes reference *streams* (the i-th reference of every prediction); a prediction with
        # fewer references gets `None`, which SacreBLEU skips.
        n_refs = max((len(refs) for refs in references), default=1)
        streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(n_refs)]
        bleu = BLEU(
            lowercase=lowercase,
            tokenize=tokenize,
            smooth_method=smooth_method,
            smooth_value=smooth_value,
            effective_order=use_effective_order,
        )
        score = bleu.corpus_score(predictions, streams)
        return {
            "score": float(score.score),
            "bleu": float(score.score) / 100.0,
            "counts": list(score.counts),
            "totals": list(score.totals),
            "precisions": [float(p) for p in score.precisions],
            "bp": float(score.bp),
            "sys_len": int(score.sys_len),
            "ref_len": int(score.ref_len),
        }
