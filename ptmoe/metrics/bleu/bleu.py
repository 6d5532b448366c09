"""Corpus BLEU, as a local `evaluate` metric module shipped with ptmoe (works offline).

Written for ptmoe in pure Python; it computes the same numbers as `sacrebleu.corpus_bleu` with its
defaults (13a tokenisation, exponential smoothing, n-grams up to 4, case-sensitive).
"""

import math
import re
from collections import Counter

import datasets
import evaluate

_DESCRIPTION = """
BLEU (Papineni et al., 2002) scores generated texts against references by the geometric mean of
their clipped n-gram precisions (n = 1..4), times a brevity penalty for too-short output. This is
corpus BLEU: n-gram matches and lengths are summed over all examples before the score is computed.
The computation follows SacreBLEU (Post, 2018): the "13a" tokenisation of the WMT `mteval-v13a`
script, smoothing "exp" (NIST geometric sequence smoothing), the reference length closest to each
hypothesis (the shorter one on a tie). Scores are reported on a 0-100 scale (`score`) and 0-1 (`bleu`).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): generated texts, untokenised.
    references (`list` of `str`, or `list` of `list` of `str`): one reference, or several references,
        per prediction.
    smooth_method (`str`, defaults to `"exp"`): "none", "floor", "add-k" or "exp".
    smooth_value (`float`, optional): value for "floor" (default 0.1) and "add-k" (default 1).
    lowercase (`bool`, defaults to `False`): lower-case texts before scoring.
    tokenize (`str`, defaults to `"13a"`): "13a", or "none" to split the texts on whitespace only.
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

MAX_ORDER = 4
_SMOOTH_DEFAULTS = {"none": None, "floor": 0.1, "add-k": 1, "exp": None}

# The "13a" rules of mteval-v13a.pl (WMT), as used by SacreBLEU.
_13A_RULES = [
    # Split off ASCII punctuation and symbols (everything printable that is not a letter, a digit,
    # "'", ",", "-" or "."; the period, comma and dash are handled below).
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),
    # Split a period or comma off, unless it sits between digits (decimal and thousand separators).
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),
    # Split a dash that follows a digit.
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),
]


def tokenize_13a(line):
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    line = f" {line} "
    for pattern, replacement in _13A_RULES:
        line = pattern.sub(replacement, line)
    return line.split()


def _ngram_counts(tokens):
    return Counter(
        tuple(tokens[i : i + n]) for n in range(1, MAX_ORDER + 1) for i in range(len(tokens) - n + 1)
    )


def _closest_ref_len(hyp_len, ref_lens):
    return min(ref_lens, key=lambda ref_len: (abs(hyp_len - ref_len), ref_len))


def _log(x):
    return math.log(x) if x > 0 else -9999999999.0


def bleu_from_stats(
    correct, total, sys_len, ref_len, smooth_method="exp", smooth_value=None, effective_order=False
):
    correct, total = list(correct), list(total)
    if smooth_value is None:
        smooth_value = _SMOOTH_DEFAULTS[smooth_method]
    bp = 1.0
    if sys_len < ref_len:
        bp = math.exp(1 - ref_len / sys_len) if sys_len > 0 else 0.0
    precisions = [0.0] * MAX_ORDER
    if not any(correct):
        return 0.0, correct, total, precisions, bp

    smooth_exp = 1.0
    orders = MAX_ORDER
    for n in range(MAX_ORDER):
        if smooth_method == "add-k" and n > 0:
            correct[n] += smooth_value
            total[n] += smooth_value
        if total[n] == 0:
            break
        if effective_order:
            orders = n + 1
        if correct[n] == 0:
            if smooth_method == "exp":
                smooth_exp *= 2
                precisions[n] = 100.0 / (smooth_exp * total[n])
            elif smooth_method == "floor":
                precisions[n] = 100.0 * smooth_value / total[n]
        else:
            precisions[n] = 100.0 * correct[n] / total[n]
    score = bp * math.exp(sum(_log(p) for p in precisions[:orders]) / orders)
    return score, correct, total, precisions, bp


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
        if smooth_method not in _SMOOTH_DEFAULTS:
            raise ValueError(f"smooth_method must be one of {list(_SMOOTH_DEFAULTS)}, got {smooth_method!r}")
        if tokenize not in ("13a", "none"):
            raise ValueError(f'tokenize must be "13a" or "none", got {tokenize!r}')
        if len(predictions) != len(references):
            raise ValueError(
                f"predictions and references differ in length: {len(predictions)} != {len(references)}"
            )

        def preprocess(text):
            if lowercase:
                text = text.lower()
            text = text.rstrip()
            return tokenize_13a(text) if tokenize == "13a" else text.split()

        correct = [0] * MAX_ORDER
        total = [0] * MAX_ORDER
        sys_len = ref_len = 0
        for prediction, refs in zip(predictions, references, strict=True):
            if isinstance(refs, str):
                refs = [refs]
            refs = [r for r in refs if r is not None]
            if not refs:
                raise ValueError("every prediction needs at least one reference")
            max_ref_counts = Counter()
            ref_lens = []
            for ref in refs:
                ref_tokens = preprocess(ref)
                ref_lens.append(len(ref_tokens))
                max_ref_counts |= _ngram_counts(ref_tokens)  # element-wise maximum over references
            hyp_tokens = preprocess(prediction)
            sys_len += len(hyp_tokens)
            ref_len += _closest_ref_len(len(hyp_tokens), ref_lens)
            for ngram, count in _ngram_counts(hyp_tokens).items():
                total[len(ngram) - 1] += count
                correct[len(ngram) - 1] += min(count, max_ref_counts[ngram])

        score, counts, totals, precisions, bp = bleu_from_stats(
            correct, total, sys_len, ref_len, smooth_method, smooth_value, use_effective_order
        )
        return {
            "score": score,
            "bleu": score / 100.0,
            "counts": counts,
            "totals": totals,
            "precisions": precisions,
            "bp": bp,
            "sys_len": sys_len,
            "ref_len": ref_len,
        }
