"""Labels: `LabelMapping` (label names ↔ ids, or regression), built from the data and the checkpoint's own labels
for sequence classification (`build_label_mapping`) and from BIO/BIOES tags for token classification
(`build_ner_label_mapping`), plus `model_label_names` and `read_label_names`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


@dataclass
class LabelMapping:
    """How the values of a dataset's label column become model label ids.

    Attributes:
        names (`list[str]`): label name of each id (empty for regression).
        value_to_id (`dict`): raw column value (a string, or an integer for integer/`ClassLabel` columns) → id.
        is_regression (`bool`): labels are floats and the model has one output.
        from_model (`bool`): the label set is the checkpoint's own (its task head is kept).
    """

    names: list[str]
    value_to_id: dict[Any, int]
    is_regression: bool = False
    from_model: bool = False

    @property
    def num_labels(self) -> int:
        return 1 if self.is_regression else len(self.names)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}

    def encode(self, value: Any) -> int | float:
        """The model label of one raw value (a float for regression)."""
        return float(value) if self.is_regression else self.value_to_id[value]

    def model_kwargs(self) -> dict[str, Any]:
        """`num_labels`, `id2label`, `label2id` (and `problem_type`) for `from_pretrained`."""
        if self.is_regression:
            return {"num_labels": 1, "problem_type": "regression"}
        kwargs: dict[str, Any] = {
            "num_labels": self.num_labels,
            "id2label": self.id2label,
            "label2id": self.label2id,
        }
        if not self.from_model:
            kwargs["problem_type"] = "single_label_classification"
        return kwargs


def model_label_names(model_name_or_path: str, head: str, cache_dir: str | None = None) -> list[str] | None:
    """The label names of a checkpoint that already has a task head of kind `head`, else `None`.

    A checkpoint saved from a `*ForSequenceClassification` (`head="sequence"`) or `*ForTokenClassification`
    (`head="token"`) model keeps its head when fine-tuned again, so the data must use its label set. Any other
    checkpoint (pre-trained MLM, dense, another task) gets a new head sized from the data.

    Args:
        model_name_or_path (`str`): checkpoint folder or Hub id.
        head (`str`): `"sequence"` or `"token"`.
        cache_dir (`str`, *optional*): Hub cache folder.
    """
    from transformers import AutoConfig

    suffix = {"sequence": "ForSequenceClassification", "token": "ForTokenClassification"}[head]
    try:
        config = AutoConfig.from_pretrained(model_name_or_path, cache_dir=cache_dir)
    except (OSError, ValueError):
        return None  # `load_model` reports unloadable checkpoints with a full message
    if not any(name.endswith(suffix) for name in (config.architectures or [])):
        return None
    return [config.id2label[i] for i in range(config.num_labels)]


def _column_values(raw_datasets, column: str, flatten: bool = False) -> dict[str, list]:
    """Distinct values of `column` per split (flattening one list level for token labels)."""
    values = {}
    for split, dataset in raw_datasets.items():
        if flatten:
            seen: dict[Any, None] = {}
            for row in dataset[column]:
                for value in row or []:
                    seen.setdefault(value)
            values[split] = list(seen)
        else:
            try:
                values[split] = dataset.unique(column)
            except TypeError:
                raise ValueError(
                    f"--label_column {column!r} holds lists: sequence labels need finetune_ner.py, not a "
                    "sentence-level task."
                ) from None
    return values


def _match_model_labels(values: Iterable[Any], model_labels: list[str], where: str) -> dict[Any, int]:
    """Map raw values onto a checkpoint's label set: names match names; integers are ids of that set."""
    label2id = {name: i for i, name in enumerate(model_labels)}
    value_to_id, outside = {}, []
    for value in dict.fromkeys(values):  # distinct values, first-seen order
        if isinstance(value, str) and value in label2id:
            value_to_id[value] = label2id[value]
        elif (
            isinstance(value, (int, np.integer))
            and not isinstance(value, bool)
            and 0 <= value < len(model_labels)
        ):
            value_to_id[value] = int(value)
        else:
            outside.append(value)
    if outside:
        raise ValueError(
            f"Labels {sorted(map(str, outside))[:10]} in {where} are outside the model's label set "
            f"{model_labels} (its task head). Fix the data or --label_column, or pass --ignore_mismatched_sizes "
            "to train a new head sized for the dataset's labels."
        )
    return value_to_id


def build_label_mapping(
    raw_datasets,
    label_column: str,
    task_type: str = "classification",
    model_labels: list[str] | None = None,
) -> LabelMapping:
    """Label ids of a sentence-level task, validated on every split.

    Label names come from, in order: the checkpoint's head (`model_labels`), a `ClassLabel` feature, or the sorted
    distinct values of the training split. Integer labels without names are used as they are when they are
    0..n-1, else numbered in sorted order.

    Args:
        raw_datasets (`datasets.DatasetDict`): splits holding `label_column`.
        label_column (`str`): the label column.
        task_type (`str`, defaults to `"classification"`): `"classification"` or `"regression"` (float labels, one
            output).
        model_labels (`list[str]`, *optional*): the label set of a checkpoint whose head is kept
            (`model_label_names`).

    Raises:
        `ValueError`: missing labels, float labels for classification, non-numeric labels for regression, labels
        outside the model's label set, or validation labels never seen in training.
    """
    from datasets import ClassLabel

    if task_type not in ("classification", "regression"):
        raise ValueError(f"--task_type must be 'classification' or 'regression', got {task_type!r}")
    values = _column_values(raw_datasets, label_column)
    for split, split_values in values.items():
        if any(v is None for v in split_values):
            raise ValueError(
                f"The {split} split has rows without a value in --label_column {label_column!r}."
            )

    if task_type == "regression":
        if model_labels is not None and len(model_labels) != 1:
            raise ValueError(
                f"The checkpoint's head predicts {len(model_labels)} classes but --task_type regression needs one "
                "output: pass --ignore_mismatched_sizes to train a new regression head."
            )
        for split, split_values in values.items():
            bad = [v for v in split_values if isinstance(v, (str, bool)) or not isinstance(v, (int, float))]
            if bad:
                raise ValueError(
                    f"--task_type regression needs numeric labels, but --label_column {label_column!r} of the {split} "
                    f"split holds {bad[:5]}. Pick a numeric column or use --task_type classification."
                )
        return LabelMapping(names=[], value_to_id={}, is_regression=True)

    for split, split_values in values.items():
        floats = [v for v in split_values if isinstance(v, float)]
        if floats:
            raise ValueError(
                f"--label_column {label_column!r} of the {split} split holds non-integer numbers ({floats[:5]}): "
                "use --task_type regression for scores, or a column of class names/ids for classification."
            )

    all_values = [v for split_values in values.values() for v in split_values]
    if model_labels is not None:
        feature = raw_datasets["train"].features[label_column]
        if isinstance(feature, ClassLabel):  # compare by name: the dataset's ids may be ordered differently
            all_values = [feature.int2str(v) for v in all_values]
            value_to_id = _match_model_labels(all_values, model_labels, f"--label_column {label_column!r}")
            value_to_id = {feature.str2int(name): i for name, i in value_to_id.items()}
        else:
            value_to_id = _match_model_labels(all_values, model_labels, f"--label_column {label_column!r}")
        return LabelMapping(names=list(model_labels), value_to_id=value_to_id, from_model=True)

    feature = raw_datasets["train"].features[label_column]
    if isinstance(feature, ClassLabel):
        names = list(feature.names)
        value_to_id = {i: i for i in range(len(names))}
    else:
        train_values = values["train"]
        if any(isinstance(v, str) for v in train_values) and not all(
            isinstance(v, str) for v in train_values
        ):
            raise ValueError(
                f"--label_column {label_column!r} mixes strings and numbers: {train_values[:10]}"
            )
        ordered = sorted(train_values)
        if all(isinstance(v, str) for v in ordered):
            names = list(ordered)
        else:
            names = [str(v) for v in ordered]
            if ordered != list(range(len(ordered))):
                logger.info(
                    "Integer labels %s are renumbered 0..%d in sorted order", ordered, len(ordered) - 1
                )
        value_to_id = {value: i for i, value in enumerate(ordered)}
    for split, split_values in values.items():
        unseen = [v for v in split_values if v not in value_to_id]
        if unseen:
            raise ValueError(
                f"Labels {sorted(map(str, unseen))[:10]} of the {split} split are not in the training labels "
                f"{names}: the model could never predict them. Fix the data or --label_column."
            )
    if len(names) < 2:
        raise ValueError(
            f"--label_column {label_column!r} has a single class {names} in the training split: classification "
            "needs at least two (use --task_type regression for scores)."
        )
    return LabelMapping(names=names, value_to_id=value_to_id)


_TAG_PATTERN = re.compile(r"^(O|[BIES]-.+)$")


def _tag_order(tag: str) -> tuple:
    return (tag != "O", tag[2:], tag[:1])  # "O" first, then grouped by entity type with B before I


def build_ner_label_mapping(
    raw_datasets,
    tokens_column: str,
    tags_column: str,
    label_names: list[str] | None = None,
    model_labels: list[str] | None = None,
) -> LabelMapping:
    """Tag ids of a token-classification task with BIO tags, validated on every split.

    Tag names come from, in order: the checkpoint's head (`model_labels`), an explicit list (`label_names`, e.g.
    `ner_labels.json`), a `Sequence(ClassLabel)` feature, or the distinct tags of the training split.

    Args:
        raw_datasets (`datasets.DatasetDict`): splits with a words column and a tags column (lists of equal
            length per row).
        tokens_column (`str`) / tags_column (`str`): the two columns.
        label_names (`list[str]`, *optional*): the complete tag set.
        model_labels (`list[str]`, *optional*): the label set of a checkpoint whose head is kept.

    Raises:
        `ValueError`: rows whose word and tag lists differ in length, tags that are not BIO/BIOES strings
        (``O``, ``B-X``, ``I-X``), or tags outside the tag set.
    """
    from datasets import ClassLabel

    for split, dataset in raw_datasets.items():
        for row, (words, tags) in enumerate(zip(dataset[tokens_column], dataset[tags_column], strict=True)):
            if not isinstance(words, list) or not isinstance(tags, list):
                raise ValueError(
                    f"Row {row} of the {split} split: --tokens_column {tokens_column!r} and --tags_column "
                    f"{tags_column!r} must hold lists (words and one tag per word), got "
                    f"{type(words).__name__} and {type(tags).__name__}."
                )
            if len(words) != len(tags):
                raise ValueError(
                    f"Row {row} of the {split} split has {len(words)} words but {len(tags)} tags: every word "
                    "needs exactly one tag."
                )

    feature = raw_datasets["train"].features[tags_column]
    inner = getattr(feature, "feature", None)  # `List` / `Sequence` features of datasets
    if inner is None and isinstance(feature, list) and feature:
        inner = feature[0]  # the `[ClassLabel(...)]` shorthand
    class_label = inner if isinstance(inner, ClassLabel) else None

    values = _column_values(raw_datasets, tags_column, flatten=True)
    if class_label is not None:
        values = {
            split: [class_label.int2str(v) for v in split_values] for split, split_values in values.items()
        }
    all_tags = sorted({tag for split_values in values.values() for tag in split_values}, key=str)
    bad = [tag for tag in all_tags if not isinstance(tag, str) or not _TAG_PATTERN.match(tag)]
    if bad:
        raise ValueError(
            f"--tags_column {tags_column!r} holds {bad[:10]}, which are not BIO tags: use 'O' for words outside "
            "entities and 'B-TYPE' / 'I-TYPE' for the first / following words of an entity."
        )

    if model_labels is not None:
        names, source = list(model_labels), "the model's label set (its task head)"
    elif label_names is not None:
        names, source = list(label_names), "--label_names_file"
    elif class_label is not None:
        names, source = list(class_label.names), f"the {tags_column!r} ClassLabel feature"
    else:
        names, source = sorted(set(values["train"]), key=_tag_order), "the training tags"
    outside = [tag for tag in all_tags if tag not in names]
    if outside:
        fix = (
            "Fix the data, or pass --ignore_mismatched_sizes to train a new head"
            if model_labels is not None
            else "Fix the data or the tag list"
        )
        raise ValueError(f"Tags {outside[:10]} are outside {source} {names}. {fix}.")
    label2id = {name: i for i, name in enumerate(names)}
    if class_label is not None:
        value_to_id = {i: label2id[name] for i, name in enumerate(class_label.names) if name in label2id}
    else:
        value_to_id = dict(label2id)
    return LabelMapping(names=names, value_to_id=value_to_id, from_model=model_labels is not None)


def read_label_names(path: str) -> list[str]:
    """A tag list from a JSON file: a list of names, or a `{name: id}` / `{id: name}` mapping."""
    try:
        content = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"--label_names_file {path!r} is not a readable JSON file: {error}") from None
    if isinstance(content, list) and all(isinstance(name, str) for name in content):
        return content
    if isinstance(content, dict):
        if all(isinstance(v, int) for v in content.values()):
            return [name for name, _ in sorted(content.items(), key=lambda item: item[1])]
        return [content[key] for key in sorted(content, key=int)]
    raise ValueError(
        f"--label_names_file {path!r} must hold a JSON list of tag names or a name ↔ id mapping."
    )
