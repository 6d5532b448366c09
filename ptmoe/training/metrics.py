"""Metrics glue for the Trainer (offline `evaluate` modules shipped in ptmoe/metrics): `logits_to_predictions`
(keep predictions, not logits, on the way to `compute_metrics`), `classification_metrics` (with the screening
metrics WSS / AWSS), `ner_metrics` (seqeval) and `seq2seq_metrics` (ROUGE, BLEU).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .labels import LabelMapping


def _first(predictions: Any) -> Any:
    """The logits from a model output tuple: the Trainer passes every non-loss output (router losses too)."""
    return predictions[0] if isinstance(predictions, (tuple, list)) else predictions


def logits_to_predictions(task_type: str = "classification", with_scores: bool = False) -> Callable:
    """A `preprocess_logits_for_metrics` keeping only class ids (or regression scores) during evaluation.

    MoE outputs carry router losses beside the logits; keeping only the predictions also spares the Trainer from
    gathering full logits across processes. With `with_scores` (binary screening metrics such as AWSS), each
    example keeps `(class id, softmax probability of class 1)` as a `(batch, 2)` float tensor.
    """

    def preprocess(logits: Any, labels: torch.Tensor) -> torch.Tensor:
        logits = _first(logits)
        if task_type == "regression":
            return logits.squeeze(-1)
        if with_scores:
            return torch.stack(
                [logits.argmax(dim=-1).float(), logits.float().softmax(dim=-1)[..., 1]], dim=-1
            )
        return logits.argmax(dim=-1)

    return preprocess


SCREENING_METRICS = ("awss", "wss")


def parse_screening_metrics(specs: Sequence[str] | None) -> list[tuple[str, float]]:
    """`["awss@0.95", "wss@0.9"]` → `[("awss", 0.95), ("wss", 0.9)]` (the `--metric` values of binary tasks).

    Raises:
        ValueError: an unknown metric name, a missing `@recall`, or a recall level outside (0, 1].
    """
    parsed = []
    for spec in specs or []:
        name, _, level = str(spec).partition("@")
        if name not in SCREENING_METRICS or not level:
            raise ValueError(
                f"--metric {spec!r}: use NAME@RECALL with NAME in {SCREENING_METRICS}, e.g. awss@0.95"
            )
        try:
            recall = float(level)
        except ValueError:
            raise ValueError(f"--metric {spec!r}: the recall level {level!r} is not a number") from None
        if not 0 < recall <= 1:
            raise ValueError(f"--metric {spec!r}: the recall level must be in (0, 1], e.g. awss@0.95")
        parsed.append((name, recall))
    return parsed


def _scalars(results: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Keep numeric results as floats (lists such as BLEU's n-gram precisions are not loggable scalars)."""
    out = {}
    for key, value in results.items():
        if isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


def classification_metrics(
    label_mapping: LabelMapping, f1_average: str | None = None, screening: Sequence[tuple[str, float]] = ()
) -> Callable:
    """`compute_metrics` for sentence tasks, with the offline metric modules.

    Classification: `accuracy` and `f1` (binary for two classes, macro average otherwise, or `f1_average` when
    given, e.g. `"macro"` for ASSIN 2 RTE). Regression: `pearson` and `spearman` (module `pearson_spearman`) and
    the mean squared error `mse`. `screening` (from `parse_screening_metrics`, binary tasks only) adds e.g.
    `awss@0.95` computed on the probability of label id 1 (needs `logits_to_predictions(with_scores=True)`).
    """
    from ..metrics import load_metric

    if screening and (label_mapping.is_regression or label_mapping.num_labels != 2):
        raise ValueError(
            f"--metric {', '.join(f'{n}@{r:g}' for n, r in screening)} needs a binary classification task (label id 1 "
            f"= relevant); this task has {'a regression target' if label_mapping.is_regression else str(label_mapping.num_labels) + ' labels'}"
        )

    if label_mapping.is_regression:
        correlation = load_metric("pearson_spearman")

        def compute(eval_prediction) -> dict[str, float]:
            predictions = np.asarray(_first(eval_prediction.predictions), dtype=np.float64).reshape(-1)
            references = np.asarray(eval_prediction.label_ids, dtype=np.float64).reshape(-1)
            results = _scalars(correlation.compute(predictions=predictions, references=references))
            results["mse"] = float(np.mean((predictions - references) ** 2))
            return results

        return compute

    accuracy, f1 = load_metric("accuracy"), load_metric("f1")
    average = f1_average or ("binary" if label_mapping.num_labels == 2 else "macro")

    screening_modules = {name: load_metric(name) for name in {name for name, _ in screening}}

    def compute(eval_prediction) -> dict[str, float]:
        predictions = np.asarray(_first(eval_prediction.predictions))
        scores = None
        if screening:  # (N, 2): class id, probability of label id 1
            predictions, scores = predictions[..., 0].astype(np.int64), predictions[..., 1].reshape(-1)
        predictions = predictions.reshape(-1)
        references = np.asarray(eval_prediction.label_ids).reshape(-1)
        results = _scalars(accuracy.compute(predictions=predictions, references=references))
        results.update(_scalars(f1.compute(predictions=predictions, references=references, average=average)))
        for name, recall in screening:
            value = screening_modules[name].compute(predictions=scores, references=references, recall=recall)
            results[f"{name}@{recall:g}"] = float(value[name])
        return results

    return compute


def ner_metrics(label_mapping: LabelMapping, **seqeval_kwargs: Any) -> Callable:
    """`compute_metrics` for BIO tagging: entity-level precision/recall/F1 (module `seqeval`) and token accuracy.

    Only positions with a label (first sub-word of each word) are scored; per-type F1 is reported as
    ``<TYPE>_f1``. `seqeval_kwargs` go to the metric (e.g. `mode="strict", scheme="IOB2"`); by default
    conlleval-style chunking with undefined scores set to 0.
    """
    from ..metrics import load_metric

    seqeval = load_metric("seqeval")
    names = label_mapping.names

    def compute(eval_prediction) -> dict[str, float]:
        predictions = np.asarray(_first(eval_prediction.predictions))
        if predictions.ndim == 3:  # logits were not reduced by `logits_to_predictions`
            predictions = predictions.argmax(-1)
        references = np.asarray(eval_prediction.label_ids)
        predicted_tags, reference_tags = [], []
        for prediction_row, reference_row in zip(predictions, references, strict=True):
            keep = reference_row != -100
            predicted_tags.append([names[i] for i in prediction_row[keep]])
            reference_tags.append([names[i] for i in reference_row[keep]])
        results = seqeval.compute(
            predictions=predicted_tags, references=reference_tags, **{"zero_division": 0, **seqeval_kwargs}
        )
        flat = {}
        for key, value in results.items():
            if isinstance(value, Mapping):
                if "f1" in value:
                    flat[f"{key}_f1"] = float(value["f1"])
            elif isinstance(value, (int, float, np.floating)):
                flat[key] = float(value)
        return flat

    return compute


def seq2seq_metrics(tokenizer, metric_names: Sequence[str] = ("rouge", "bleu")) -> Callable:
    """`compute_metrics` for generated text (needs `predict_with_generate`): ROUGE and/or BLEU, plus `gen_len`.

    Predictions and labels are decoded without special tokens; -100 label padding becomes the pad token first.
    Reported: `rouge1`, `rouge2`, `rougeL`, `rougeLsum` (mean F-measures, 0-1, Portuguese-aware tokenisation of
    the `rouge` module), `bleu` (corpus SacreBLEU, 0-100) with `bleu_bp`, `bleu_sys_len`, `bleu_ref_len`, and
    `gen_len` (mean generated tokens).
    """
    from ..metrics import load_metric

    metrics = {name: load_metric(name) for name in metric_names}

    def compute(eval_prediction) -> dict[str, float]:
        predictions = np.asarray(_first(eval_prediction.predictions))
        if predictions.ndim == 3:
            raise ValueError(
                "seq2seq metrics need generated token ids: run the Seq2SeqTrainer with --predict_with_generate."
            )
        labels = np.asarray(eval_prediction.label_ids)
        pad = tokenizer.pad_token_id
        predictions = np.where(predictions < 0, pad, predictions)  # the Trainer pads across batches with -100
        labels = np.where(labels < 0, pad, labels)
        decoded_predictions = [
            text.strip() for text in tokenizer.batch_decode(predictions, skip_special_tokens=True)
        ]
        decoded_labels = [text.strip() for text in tokenizer.batch_decode(labels, skip_special_tokens=True)]
        results: dict[str, float] = {}
        for name, metric in metrics.items():
            scores = metric.compute(predictions=decoded_predictions, references=decoded_labels)
            if name == "bleu":
                # SacreBLEU's 0-100 `score` is the number papers quote; its other scalars keep a `bleu_` prefix.
                results["bleu"] = float(scores["score"])
                results.update(
                    _scalars({k: v for k, v in scores.items() if k not in ("score", "bleu")}, "bleu_")
                )
            else:
                results.update(_scalars(scores))
        results["gen_len"] = float(np.mean([np.count_nonzero(row != pad) for row in predictions]))
        return results

    return compute
