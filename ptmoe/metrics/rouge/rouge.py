"""ROUGE-1/2/L/Lsum F-measures, as a local `evaluate` metric module shipped with ptmoe (works offline).

Written for ptmoe in pure Python; it follows the definitions of Google's `rouge-score` package
(used by the Hub metric "rouge"), with a tokeniser that keeps accented letters, so Portuguese words
such as "não", "ação" or "é" are compared whole instead of being cut into ASCII fragments.
"""

import re
import unicodedata
from collections import Counter

import datasets
import evaluate

_DESCRIPTION = """
ROUGE compares a generated text with one or more references by counting overlapping units:
- rouge1 / rouge2: overlap of word unigrams / bigrams;
- rougeL: longest common subsequence (LCS) of the two texts, taken as single sequences;
- rougeLsum: summary-level LCS; the texts are split into sentences at newlines ("\\n") and, for each
  reference sentence, the union of its LCS with every predicted sentence is counted.
Each score is the F-measure (harmonic mean of precision and recall), in [0, 1].

Tokenisation (default): Unicode NFC normalisation, lower-casing, then every character that is not a
letter or a digit (str.isalnum) is treated as a space; tokens are the resulting words. Accented
letters are kept ("Ação não é fácil." -> ["ação", "não", "é", "fácil"]). On ASCII text this is
exactly the tokeniser of `rouge-score` (lower-case, [^a-z0-9] -> space), so the scores are then
identical. `rouge-score` itself drops every non-ASCII letter ("não" -> "n", "o"), which distorts
Portuguese scores; pass `ascii_only=True` to reproduce that behaviour for comparison with numbers
published with `rouge-score`.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): generated texts.
    references (`list` of `str`, or `list` of `list` of `str`): one reference, or several references,
        per prediction. With several, each ROUGE type keeps the reference with the best F-measure
        (like `rouge-score`'s `score_multi`).
    rouge_types (`list` of `str`, defaults to all): among "rouge1", "rouge2", ..., "rouge9", "rougeL",
        "rougeLsum".
    use_aggregator (`bool`, defaults to `True`): return the mean F-measure over the examples; if
        `False`, return the list of per-example F-measures.
    use_stemmer (`bool`, defaults to `False`): stem tokens longer than 3 characters with the Portuguese
        Snowball stemmer (needs `nltk`). Note: `rouge-score` uses the English Porter stemmer instead.
    tokenizer (callable, optional): a function str -> list of str that replaces the default tokeniser
        (then `use_stemmer` and `ascii_only` are ignored).
    ascii_only (`bool`, defaults to `False`): tokenise exactly as `rouge-score` does (non-ASCII letters
        are dropped).
Returns:
    A dict with one entry per ROUGE type: a `float` (aggregated) or a `list` of `float`.
Examples:
    >>> from ptmoe.metrics import load_metric
    >>> rouge = load_metric("rouge")
    >>> out = rouge.compute(predictions=["o gato não dormiu"], references=["o gato não dormiu hoje"])
    >>> round(out["rouge1"], 4), round(out["rouge2"], 4)
    (0.8889, 0.8571)
"""

_CITATION = """
@inproceedings{lin-2004-rouge,
  title = "{ROUGE}: A Package for Automatic Evaluation of Summaries",
  author = "Lin, Chin-Yew",
  booktitle = "Text Summarization Branches Out",
  year = "2004",
  publisher = "Association for Computational Linguistics",
  url = "https://www.aclweb.org/anthology/W04-1013",
  pages = "74--81",
}
"""

_DEFAULT_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_ROUGE_N = re.compile(r"^rouge([1-9])$")
_NON_ASCII_ALNUM = re.compile(r"[^a-z0-9]+")


class Tokenizer:
    """Lower-cased words of letters and digits (Unicode-aware unless `ascii_only`)."""

    def __init__(self, use_stemmer=False, ascii_only=False):
        self.ascii_only = ascii_only
        self.stem = None
        if use_stemmer:
            try:
                from nltk.stem.snowball import SnowballStemmer
            except ImportError as err:  # pragma: no cover - depends on the environment
                raise ImportError("use_stemmer=True needs nltk: pip install nltk") from err
            self.stem = SnowballStemmer("portuguese").stem

    def __call__(self, text):
        if self.ascii_only:
            words = _NON_ASCII_ALNUM.sub(" ", text.lower()).split()
        else:
            text = unicodedata.normalize("NFC", text).lower()
            words = "".join(ch if ch.isalnum() else " " for ch in text).split()
        if self.stem is not None:
            words = [self.stem(w) if len(w) > 3 else w for w in words]
        return words


def _fmeasure(precision, recall):
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def _score(matches, n_pred, n_ref):
    precision = matches / n_pred if n_pred else 0.0
    recall = matches / n_ref if n_ref else 0.0
    return _fmeasure(precision, recall)


def _ngrams(tokens, n):
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def rouge_n(ref_tokens, pred_tokens, n):
    ref, pred = _ngrams(ref_tokens, n), _ngrams(pred_tokens, n)
    matches = sum((ref & pred).values())
    return _score(matches, sum(pred.values()), sum(ref.values()))


def _lcs_table(ref, pred):
    table = [[0] * (len(pred) + 1) for _ in range(len(ref) + 1)]
    for i in range(1, len(ref) + 1):
        row, prev_row = table[i], table[i - 1]
        for j in range(1, len(pred) + 1):
            row[j] = prev_row[j - 1] + 1 if ref[i - 1] == pred[j - 1] else max(prev_row[j], row[j - 1])
    return table


def _lcs_positions(ref, pred):
    """Indices in `ref` of one longest common subsequence (backtracking that prefers moving in `ref`)."""
    table = _lcs_table(ref, pred)
    i, j, positions = len(ref), len(pred), []
    while i > 0 and j > 0:
        if ref[i - 1] == pred[j - 1]:
            positions.append(i - 1)
            i, j = i - 1, j - 1
        elif table[i][j - 1] > table[i - 1][j]:
            j -= 1
        else:
            i -= 1
    return positions[::-1]


def rouge_l(ref_tokens, pred_tokens):
    if not ref_tokens or not pred_tokens:
        return 0.0
    lcs = _lcs_table(ref_tokens, pred_tokens)[-1][-1]
    return _score(lcs, len(pred_tokens), len(ref_tokens))


def rouge_lsum(ref_sentences, pred_sentences):
    """Summary-level LCS over sentences (lists of tokens), each token matched at most as often as it occurs."""
    n_ref = sum(map(len, ref_sentences))
    n_pred = sum(map(len, pred_sentences))
    if not n_ref or not n_pred:
        return 0.0
    ref_left = Counter(t for s in ref_sentences for t in s)
    pred_left = Counter(t for s in pred_sentences for t in s)
    hits = 0
    for ref in ref_sentences:
        union = sorted(set().union(*(_lcs_positions(ref, pred) for pred in pred_sentences)))
        for token in (ref[k] for k in union):
            if ref_left[token] > 0 and pred_left[token] > 0:
                hits += 1
                ref_left[token] -= 1
                pred_left[token] -= 1
    return _score(hits, n_pred, n_ref)


def _sentences(text):
    return [line for line in text.split("\n") if line]


def score_pair(reference, prediction, rouge_types, tokenize):
    """F-measure of each ROUGE type for one (reference, prediction) pair."""
    ref_tokens, pred_tokens = tokenize(reference), tokenize(prediction)
    out = {}
    for rouge_type in rouge_types:
        if rouge_type == "rougeL":
            out[rouge_type] = rouge_l(ref_tokens, pred_tokens)
        elif rouge_type == "rougeLsum":
            out[rouge_type] = rouge_lsum(
                [tokenize(s) for s in _sentences(reference)], [tokenize(s) for s in _sentences(prediction)]
            )
        else:
            out[rouge_type] = rouge_n(ref_tokens, pred_tokens, int(_ROUGE_N.match(rouge_type).group(1)))
    return out


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features(
                    {
                        "predictions": datasets.Value("string", id="sequence"),
                        "references": datasets.Sequence(datasets.Value("string", id="sequence")),
                    }
                ),
                datasets.Features(
                    {
                        "predictions": datasets.Value("string", id="sequence"),
                        "references": datasets.Value("string", id="sequence"),
                    }
                ),
            ],
            reference_urls=["https://github.com/google-research/google-research/tree/master/rouge"],
        )

    def _compute(
        self,
        predictions,
        references,
        rouge_types=None,
        use_aggregator=True,
        use_stemmer=False,
        tokenizer=None,
        ascii_only=False,
    ):
        rouge_types = list(_DEFAULT_TYPES if rouge_types is None else rouge_types)
        for rouge_type in rouge_types:
            if rouge_type not in ("rougeL", "rougeLsum") and not _ROUGE_N.match(rouge_type):
                raise ValueError(
                    f"unknown ROUGE type {rouge_type!r}: use rouge1..rouge9, rougeL or rougeLsum"
                )
        if len(predictions) != len(references):
            raise ValueError(
                f"predictions and references differ in length: {len(predictions)} != {len(references)}"
            )
        tokenize = tokenizer if tokenizer is not None else Tokenizer(use_stemmer, ascii_only)

        per_example = {rouge_type: [] for rouge_type in rouge_types}
        for prediction, refs in zip(predictions, references, strict=True):
            if isinstance(refs, str):
                refs = [refs]
            if not refs:
                raise ValueError("every prediction needs at least one reference")
            scores = [score_pair(ref, prediction, rouge_types, tokenize) for ref in refs]
            for rouge_type in rouge_types:
                per_example[rouge_type].append(max(s[rouge_type] for s in scores))

        if not use_aggregator:
            return per_example
        return {
            rouge_type: (sum(values) / len(values) if values else 0.0)
            for rouge_type, values in per_example.items()
        }
