"""ROUGE-N/L/Lsum F-measures, as a local `evaluate` metric module shipped with ptmoe (works offline).

The scores are Google's `rouge-score` package's (`RougeScorer.score_multi`). What ptmoe adds is the
tokeniser, passed through rouge-score's `tokenizer` hook: rouge-score's default tokeniser drops every
non-ASCII letter, so Portuguese "não" becomes "n" "o" and "avó"/"avô" both become "av". Ours keeps
accented words whole.
"""

import re
import unicodedata

import datasets
import evaluate
from rouge_score import rouge_scorer, tokenizers

_DESCRIPTION = """
ROUGE compares a generated text with one or more references by counting overlapping units:
- rouge1 / rouge2 / ...: overlap of word n-grams;
- rougeL: longest common subsequence (LCS) of the two texts;
- rougeLsum: summary-level LCS over sentences split at newlines ("\\n").
Each score is the F-measure, in [0, 1], computed by `rouge-score`.

Tokenisation (default, ptmoe's): Unicode NFC normalisation, lower-casing, then every character that
is not a letter or a digit (str.isalnum) is treated as a space. Accented letters are kept
("Ação não é fácil." -> ["ação", "não", "é", "fácil"]). On ASCII text this equals rouge-score's own
tokeniser. `ascii_only=True` uses rouge-score's tokeniser instead, to compare with numbers published
with it.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): generated texts.
    references (`list` of `str`, or `list` of `list` of `str`): one reference, or several references,
        per prediction (each ROUGE type keeps the best-scoring reference, rouge-score's `score_multi`).
    rouge_types (`list` of `str`, defaults to rouge1, rouge2, rougeL, rougeLsum): any type that
        rouge-score accepts ("rouge1".."rouge9", "rougeL", "rougeLsum").
    use_aggregator (`bool`, defaults to `True`): return the mean F-measure over the examples; if
        `False`, the list of per-example F-measures.
    use_stemmer (`bool`, defaults to `False`): stem tokens longer than 3 characters with the Portuguese
        Snowball stemmer (needs `nltk`); with `ascii_only=True`, rouge-score's English Porter stemmer.
    tokenizer (callable, optional): a function str -> list of str that replaces the default tokeniser.
    ascii_only (`bool`, defaults to `False`): tokenise exactly as `rouge-score` does.
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
_ROUGE_TYPE = re.compile(r"^rouge([1-9]|L|Lsum)$")


class Tokenizer(tokenizers.Tokenizer):
    """Lower-cased words of letters and digits, accents kept (a rouge-score `Tokenizer`, also callable)."""

    def __init__(self, use_stemmer=False):
        self.stem = None
        if use_stemmer:
            try:
                from nltk.stem.snowball import SnowballStemmer
            except ImportError as err:  # pragma: no cover - depends on the environment
                raise ImportError("use_stemmer=True needs nltk: pip install nltk") from err
            self.stem = SnowballStemmer("portuguese").stem

    def tokenize(self, text):
        text = unicodedata.normalize("NFC", text).lower()
        words = "".join(ch if ch.isalnum() else " " for ch in text).split()
        if self.stem is not None:
            # Like rouge-score: short words are not stemmed.
            words = [self.stem(w) if len(w) > 3 else w for w in words]
        return words

    def __call__(self, text):
        return self.tokenize(text)


class _CallableTokenizer(tokenizers.Tokenizer):
    def __init__(self, function):
        self.function = function

    def tokenize(self, text):
        return list(self.function(text))


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
        bad = [t for t in rouge_types if not _ROUGE_TYPE.match(t)]
        if bad:  # rouge-score itself fails later, with a bare "Invalid rouge type"
            raise ValueError(f"unknown ROUGE type {bad[0]!r}: use rouge1..rouge9, rougeL or rougeLsum")
        if tokenizer is not None:
            hook = _CallableTokenizer(tokenizer)
        elif ascii_only:
            hook = None  # rouge-score's DefaultTokenizer
        else:
            hook = Tokenizer(use_stemmer)
        scorer = rouge_scorer.RougeScorer(rouge_types, use_stemmer=use_stemmer, tokenizer=hook)
        per_example = {rouge_type: [] for rouge_type in rouge_types}
        for prediction, refs in zip(predictions, references, strict=True):
            refs = [refs] if isinstance(refs, str) else list(refs)
            if not refs:
                raise ValueError("every prediction needs at least one reference")
            scores = scorer.score_multi(refs, prediction)
            for rouge_type in rouge_types:
                per_example[rouge_type].append(float(scores[rouge_type].fmeasure))
        if not use_aggregator:
            return per_example
        # The plain mean (the Hub metric's bootstrap aggregator reports a resampled estimate of it).
        return {
            rouge_type: (sum(values) / len(values) if values else 0.0)
            for rouge_type, values in per_example.items()
        }
