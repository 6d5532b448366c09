"""Offline `evaluate` metric modules shipped with ptmoe.

`evaluate.load("accuracy")` fetches the metric script from the Hugging Face Hub, which fails
offline. ptmoe ships local `evaluate` modules instead: one folder per metric, holding `<name>.py`
with an `evaluate.Metric` subclass. They load from the local path and never touch the Hub. The
numbers come from the libraries the field uses (runtime dependencies of ptmoe): scikit-learn
(accuracy, f1), scipy (pearson_spearman), seqeval, rouge-score and sacrebleu (bleu). What is ptmoe's
own is only the adapter to `evaluate` and, for ROUGE, a tokeniser that keeps Portuguese accents
(passed through rouge-score's tokenizer hook; nltk's Portuguese stemmer for `use_stemmer`).

    >>> from ptmoe.metrics import load_metric
    >>> load_metric("accuracy").compute(predictions=[1, 0], references=[1, 1])
    {'accuracy': 0.5}

The modules work with plain `evaluate` as well: `evaluate.load(metric_path("rouge"))`.
"""

from __future__ import annotations

from pathlib import Path

METRICS_DIR = Path(__file__).resolve().parent

#: Names accepted by `metric_path` and `load_metric`.
AVAILABLE_METRICS = ("accuracy", "bleu", "f1", "pearson_spearman", "rouge", "seqeval", "awss", "wss")

__all__ = ["AVAILABLE_METRICS", "available_metrics", "load_metric", "metric_path"]


def available_metrics() -> list[str]:
    """The names of the metrics shipped with ptmoe."""
    return list(AVAILABLE_METRICS)


def metric_path(name: str) -> str:
    """Absolute path of the folder of metric `name`, to pass to `evaluate.load`.

    Raises:
        ValueError: `name` is not one of `AVAILABLE_METRICS`.
    """
    if name not in AVAILABLE_METRICS:
        raise ValueError(
            f"Unknown metric {name!r}. ptmoe ships these metrics: {', '.join(AVAILABLE_METRICS)}."
        )
    path = METRICS_DIR / name
    if not (path / f"{name}.py").is_file():  # pragma: no cover - broken installation
        raise FileNotFoundError(
            f"The metric script {path / (name + '.py')} is missing from the ptmoe install."
        )
    return str(path)


def load_metric(name: str, **kwargs):
    """`evaluate.load` of the local metric module `name` (no network access).

    Keyword arguments go to `evaluate.load` (e.g. `config_name="multilabel"`, `keep_in_memory=True`,
    `experiment_id=...`).
    """
    import evaluate

    return evaluate.load(metric_path(name), **kwargs)
