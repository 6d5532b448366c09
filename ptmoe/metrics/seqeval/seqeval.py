"""Entity-level sequence labelling scores, as a local `evaluate` metric module shipped with ptmoe.

The numbers are the `seqeval` library's (`classification_report` and `accuracy_score`), laid out as the
Hub metric "seqeval" lays them out; this module only adapts the `evaluate` interface and accepts the
scheme by name (`scheme="IOB2"`) so that it can be given on a command line or in a JSON file.
"""

import importlib

import datasets
import evaluate
from seqeval.metrics import accuracy_score, classification_report

_DESCRIPTION = """
Precision, recall and F1 of the entities (chunks) found in BIO-tagged sequences, overall (micro
average over entities) and per entity type, plus the token-level accuracy.

An entity counts as correct only if its type, first token and last token all match a reference
entity. Tags are `O` or `<prefix>-<TYPE>` with prefix `B` (begin) or `I` (inside); `E-`/`S-` tags
are also understood in the default mode.

Two ways to read the tags:
- default (`mode=None`), as the CoNLL `conlleval` script: an `I-X` tag that does not continue an
  entity of type X (after `O`, or after a tag of another type) starts a new entity;
- `mode="strict"` (IOB2): an entity must start with `B-X` and continues over the following `I-X`
  tags; an `I-X` that does not continue an entity of type X belongs to no entity.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `str`): predicted tags, one list per sentence.
    references (`list` of `list` of `str`): reference tags, same lengths as `predictions`.
    mode (`None` or `"strict"`, defaults to `None`): tag reading, see the description.
    scheme (`None`, a `seqeval.scheme` class or its name such as `"IOB2"`, `"IOE2"`, `"IOBES"`,
        `"BILOU"`): the tagging scheme of strict mode (`None` means IOB2).
    suffix (`bool`, defaults to `False`): tags are written `PER-B` instead of `B-PER`.
    zero_division (`0`, `1` or `"warn"`, defaults to `"warn"`): the precision (recall) when there
        is no predicted (reference) entity, as in seqeval.
Returns:
    For each entity type X found in the references or predictions, `X`: a dict with `precision`,
    `recall`, `f1` and `number` (count of reference entities of type X); and
    `overall_precision`, `overall_recall`, `overall_f1` (micro averages over all entities),
    `overall_accuracy` (proportion of tokens whose tag is right).
Examples:
    >>> from ptmoe.metrics import load_metric
    >>> seqeval = load_metric("seqeval")
    >>> out = seqeval.compute(
    ...     predictions=[["B-PER", "I-PER", "O", "B-LOC"]],
    ...     references=[["B-PER", "I-PER", "O", "B-ORG"]],
    ... )
    >>> out["overall_f1"], out["PER"]["f1"], out["overall_accuracy"]
    (0.5, 1.0, 0.75)
"""

_CITATION = """
@inproceedings{ramshaw-marcus-1995-text,
  title = "Text Chunking using Transformation-Based Learning",
  author = "Ramshaw, Lance and Marcus, Mitch",
  booktitle = "Third Workshop on Very Large Corpora",
  year = "1995",
  url = "https://www.aclweb.org/anthology/W95-0107",
}
@misc{seqeval,
  title={{seqeval}: A Python framework for sequence labeling evaluation},
  url={https://github.com/chakki-works/seqeval},
  author={Hiroki Nakayama},
  year={2018},
}
"""


def _scheme(scheme, mode):
    """`None` / a name such as "IOB2" / a seqeval scheme class -> the class seqeval expects (strict mode only)."""
    if mode != "strict":
        return None
    if scheme is None:
        scheme = "IOB2"
    if isinstance(scheme, str):
        schemes = importlib.import_module("seqeval.scheme")
        if not hasattr(schemes, scheme) or scheme.startswith("_"):
            raise ValueError(
                f"unknown scheme {scheme!r}: use one of IOB1, IOB2, IOE1, IOE2, IOBES, BILOU (seqeval.scheme)"
            )
        return getattr(schemes, scheme)
    return scheme


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Seqeval(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("string", id="label"), id="sequence"),
                    "references": datasets.Sequence(datasets.Value("string", id="label"), id="sequence"),
                }
            ),
            reference_urls=[
                "https://github.com/chakki-works/seqeval",
                "https://www.clips.uantwerpen.be/conll2000/chunking/",
            ],
        )

    def _compute(self, predictions, references, mode=None, scheme=None, suffix=False, zero_division="warn"):
        if mode not in (None, "default", "strict"):
            raise ValueError(f'mode must be None or "strict", got {mode!r}')
        for sentence_id, (pred, ref) in enumerate(zip(predictions, references, strict=True)):
            if len(pred) != len(ref):  # seqeval only says "inconsistent numbers of samples"
                raise ValueError(
                    f"sentence {sentence_id}: {len(pred)} predicted tags for {len(ref)} reference tags"
                )
        report = classification_report(
            y_true=references,
            y_pred=predictions,
            suffix=suffix,
            output_dict=True,
            mode="strict" if mode == "strict" else None,
            scheme=_scheme(scheme, mode),
            zero_division=zero_division,
        )
        report.pop("macro avg")
        report.pop("weighted avg")
        overall = report.pop("micro avg")
        scores = {
            entity_type: {
                "precision": float(score["precision"]),
                "recall": float(score["recall"]),
                "f1": float(score["f1-score"]),
                "number": int(score["support"]),
            }
            for entity_type, score in report.items()
        }
        scores["overall_precision"] = float(overall["precision"])
        scores["overall_recall"] = float(overall["recall"])
        scores["overall_f1"] = float(overall["f1-score"])
        scores["overall_accuracy"] = float(accuracy_score(y_true=references, y_pred=predictions))
        return scores
