"""Entity-level sequence labelling scores, as a local `evaluate` metric module shipped with ptmoe.

Written for ptmoe in pure Python (works offline, no `seqeval` package needed). The numbers and the
output layout match the Hub metric "seqeval" (which wraps the `seqeval` library):
- default mode: CoNLL-2000 `conlleval` chunking, like `seqeval` without `mode`;
- `mode="strict"`: strict IOB2, like `seqeval` with `mode="strict", scheme=IOB2`.
"""

import datasets
import evaluate

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
    scheme (`None` or `"IOB2"`): the tagging scheme of strict mode (only IOB2 is supported;
        `None` means IOB2).
    zero_division (`0` or `1`, defaults to 0): the precision (recall) when there is no predicted
        (reference) entity. `"warn"` behaves as 0.
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


def _split_tag(tag):
    """'B-PER' -> ('B', 'PER'); 'O' -> ('O', '_'); a bare prefix gets the type '_'."""
    prefix = tag[:1]
    entity_type = tag[1:].split("-", 1)[-1] or "_"
    return prefix, entity_type


def _chunk_ends(prev_prefix, prefix, prev_type, entity_type):
    """Does the chunk that contains the previous token end before the current one? (conlleval)"""
    if prev_prefix in ("E", "S"):
        return True
    if prev_prefix in ("B", "I") and prefix in ("B", "S", "O"):
        return True
    return prev_prefix not in ("O", ".") and prev_type != entity_type


def _chunk_starts(prev_prefix, prefix, prev_type, entity_type):
    """Does a chunk start at the current token? (conlleval)"""
    if prefix in ("B", "S"):
        return True
    if prev_prefix in ("E", "S", "O") and prefix in ("E", "I"):
        return True
    return prefix not in ("O", ".") and prev_type != entity_type


def conlleval_entities(tags):
    """Entities of one tag sequence as (type, first, last) token indices, conlleval style."""
    entities = []
    prev_prefix, prev_type, start = "O", "", 0
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, entity_type = _split_tag(tag)
        if _chunk_ends(prev_prefix, prefix, prev_type, entity_type):
            entities.append((prev_type, start, i - 1))
        if _chunk_starts(prev_prefix, prefix, prev_type, entity_type):
            start = i
        prev_prefix, prev_type = prefix, entity_type
    return entities


def strict_iob2_entities(tags):
    """Entities of one tag sequence as (type, first, last): `B-X` followed by the maximal run of `I-X`."""
    entities = []
    i = 0
    while i < len(tags):
        prefix, entity_type = _split_tag(tags[i])
        if prefix not in ("B", "I", "O"):
            raise ValueError(f"strict IOB2 mode accepts only B-, I- and O tags, got {tags[i]!r}")
        if prefix == "B":
            end = i + 1
            while end < len(tags) and tags[end][:1] == "I" and _split_tag(tags[end])[1] == entity_type:
                end += 1
            entities.append((entity_type, i, end - 1))
            i = end
        else:
            i += 1
    return entities


def _ratio(numerator, denominator, zero_division):
    return numerator / denominator if denominator else float(zero_division)


def _f1(precision, recall):
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


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

    def _compute(self, predictions, references, mode=None, scheme=None, zero_division=0):
        if mode not in (None, "default", "strict"):
            raise ValueError(f'mode must be None or "strict", got {mode!r}')
        if scheme not in (None, "IOB2") and not getattr(scheme, "__name__", None) == "IOB2":
            raise ValueError(f"only the IOB2 scheme is supported, got {scheme!r}")
        if zero_division == "warn":
            zero_division = 0
        if zero_division not in (0, 1):
            raise ValueError(f'zero_division must be 0, 1 or "warn", got {zero_division!r}')
        if len(predictions) != len(references):
            raise ValueError(
                f"predictions and references differ in length: {len(predictions)} != {len(references)}"
            )
        extract = strict_iob2_entities if mode == "strict" else conlleval_entities

        true_entities, pred_entities = set(), set()
        n_tokens = n_correct_tokens = 0
        for sentence_id, (pred, ref) in enumerate(zip(predictions, references, strict=True)):
            if len(pred) != len(ref):
                raise ValueError(
                    f"sentence {sentence_id}: {len(pred)} predicted tags for {len(ref)} reference tags"
                )
            true_entities.update((sentence_id, *entity) for entity in extract(ref))
            pred_entities.update((sentence_id, *entity) for entity in extract(pred))
            n_tokens += len(ref)
            n_correct_tokens += sum(p == r for p, r in zip(pred, ref, strict=True))

        scores = {}
        entity_types = sorted({entity[1] for entity in true_entities | pred_entities})
        for entity_type in entity_types:
            true_of_type = {e for e in true_entities if e[1] == entity_type}
            pred_of_type = {e for e in pred_entities if e[1] == entity_type}
            hits = len(true_of_type & pred_of_type)
            precision = _ratio(hits, len(pred_of_type), zero_division)
            recall = _ratio(hits, len(true_of_type), zero_division)
            scores[entity_type] = {
                "precision": precision,
                "recall": recall,
                "f1": _f1(precision, recall),
                "number": len(true_of_type),
            }
        hits = len(true_entities & pred_entities)
        precision = _ratio(hits, len(pred_entities), zero_division)
        recall = _ratio(hits, len(true_entities), zero_division)
        scores["overall_precision"] = precision
        scores["overall_recall"] = recall
        scores["overall_f1"] = _f1(precision, recall)
        scores["overall_accuracy"] = n_correct_tokens / n_tokens if n_tokens else 0.0
        return scores
