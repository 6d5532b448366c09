"""Few-shot evaluation: k examples per class, several seeds, mean and spread.

Two families of methods, for sentence(-pair) classification suites:
- ``logreg-cls`` / ``logreg-mean``: frozen encoder embeddings ([CLS] token, or the mean over tokens) and a
  scikit-learn logistic regression on top - the classification head of SetFit (Tunstall et al., 2022) without its
  contrastive fine-tuning of the body;
- ``lora``: LoRA fine-tuning (per expert for MoE models, on every linear layer for dense ones) on the k-shot set,
  through the same `finetune_and_evaluate` run as the full-data suites.

Embeddings do not depend on the seed, so each model embeds the train and test sets once; each seed then draws
another k-shot sample (and, for LoRA, another head and data order).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..outputs import check_output_dir
from .run import (
    EvalConfig,
    _card_name,
    _versions,
    finetune_and_evaluate,
    suite_data_dir,
    summarise,
    write_results,
)
from .suites import Suite, load_suite_data, resolve_suites

logger = logging.getLogger(__name__)

FEW_SHOT_METHODS = ("logreg-cls", "logreg-mean", "lora")
#: LoRA on a few examples needs more passes and a larger step than full-data fine-tuning (ptmoe's choice,
#: overridden by `--epochs` / `--learning_rate` / `--batch_size`).
FEW_SHOT_LORA_PROTOCOL = {"epochs": 20.0, "learning_rate": 1e-4, "batch_size": 8}


def sample_per_class(dataset, label_column: str, k: int, seed: int, suite_name: str = "") -> np.ndarray:
    """Indices of `k` examples of every class of `dataset[label_column]`, drawn without replacement with `seed`.

    Raises:
        ValueError: a class with fewer than `k` examples (naming the suite, the class and its count).
    """
    labels = np.asarray(dataset[label_column])
    rng = np.random.default_rng(seed)
    names = getattr(dataset.features[label_column], "names", None)
    chosen = []
    for label in np.unique(labels):
        pool = np.flatnonzero(labels == label)
        if len(pool) < k:
            name = names[label] if names is not None else label
            raise ValueError(
                f"{suite_name}: the train split has {len(pool)} examples of class {name!r}, fewer than the "
                f"{k} per class asked for (--few_shot)."
            )
        chosen.append(rng.choice(pool, size=k, replace=False))
    return np.sort(np.concatenate(chosen))


def sentence_embeddings(
    model_name_or_path: str,
    dataset,
    text_column: str,
    text_pair_column: str | None = None,
    pooling: str = "cls",
    max_length: int = 128,
    batch_size: int = 16,
    cache_dir: str | None = None,
) -> np.ndarray:
    """Frozen-encoder embeddings of every row: the [CLS] vector or the mean over non-padding tokens.

    Args:
        model_name_or_path (`str`): an encoder checkpoint (dense or ptmoe; its base model is used).
        dataset (`datasets.Dataset`): rows with `text_column` (and `text_pair_column`).
        pooling (`str`): `"cls"` or `"mean"`.

    Returns:
        `np.ndarray` of shape `(len(dataset), hidden_size)`, float32.
    """
    import torch
    from transformers import AutoModel, AutoTokenizer

    import ptmoe  # noqa: F401  (registers the ptmoe model types)

    if pooling not in ("cls", "mean"):
        raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
    from ..training import resolve_max_length
    from .retrieval import mean_pool

    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, cache_dir=cache_dir)
    model = AutoModel.from_pretrained(model_name_or_path, cache_dir=cache_dir).eval()
    max_length = resolve_max_length(max_length, model, tokenizer, flag="max_length")
    outputs = []
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            rows = dataset[start : start + batch_size]
            pair = rows[text_pair_column] if text_pair_column else None
            encoded = tokenizer(
                rows[text_column],
                pair,
                truncation=True,
                max_length=max_length,
                padding=True,
                return_tensors="pt",
            )
            hidden = model(**encoded).last_hidden_state  # (batch, seq, hidden)
            if pooling == "cls":
                pooled = hidden[:, 0]
            else:
                pooled = mean_pool(hidden, encoded["attention_mask"], normalize=False)
            outputs.append(pooled.float().numpy())
    return np.concatenate(outputs)


def _score(suite: Suite, predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
    from ..metrics import load_metric

    average = suite.metric_kwargs.get("f1_average", "binary" if len(suite.labels) == 2 else "macro")
    f1 = load_metric("f1", keep_in_memory=True).compute(
        predictions=predictions, references=references, average=average
    )["f1"]
    accuracy = load_metric("accuracy", keep_in_memory=True).compute(
        predictions=predictions, references=references
    )["accuracy"]
    return {"eval_f1": float(f1), "eval_accuracy": float(accuracy)}


def logistic_regression_run(
    train_embeddings: np.ndarray, train_labels: np.ndarray, test_embeddings: np.ndarray, seed: int
) -> np.ndarray:
    """Fit a scikit-learn logistic regression on the k-shot embeddings; predicted test labels."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    classifier.fit(train_embeddings, train_labels)
    return classifier.predict(test_embeddings)


def _few_shot_model(
    model: str, role: str, suite: Suite, raw, shots, methods, seeds, config: EvalConfig, out: Path
) -> list[dict]:
    import datasets

    label_column = suite.columns["label"]
    train_labels = np.asarray(raw["train"][label_column])
    test_labels = np.asarray(raw["test"][label_column])
    max_length = config.max_length or suite.protocol.max_length
    embeddings = {}
    for method in methods:
        if method.startswith("logreg-"):
            pooling = method.split("-", 1)[1]
            embeddings[method] = tuple(
                sentence_embeddings(
                    model, raw[split], suite.columns["text"], suite.columns.get("text_pair"), pooling, max_length,
                    cache_dir=config.cache_dir,
                )
                for split in ("train", "test")
            )  # fmt: skip
    protocol = {
        "epochs": config.epochs or FEW_SHOT_LORA_PROTOCOL["epochs"],
        "learning_rate": config.learning_rate or FEW_SHOT_LORA_PROTOCOL["learning_rate"],
        "batch_size": config.batch_size or FEW_SHOT_LORA_PROTOCOL["batch_size"],
        "max_length": max_length,
        "max_steps": config.max_steps,
    }
    entries = []
    for k in shots:
        samples = {seed: sample_per_class(raw["train"], label_column, k, seed, suite.name) for seed in seeds}
        for method in methods:
            runs = []
            for seed, index in samples.items():
                if method == "lora":
                    subset = datasets.DatasetDict({"train": raw["train"].select(index), "test": raw["test"]})
                    metrics = finetune_and_evaluate(
                        model, suite, subset, seed, protocol, out / role / f"lora-k{k}-seed{seed}", tuning="lora",
                        lora_r=config.lora_r, lora_alpha=config.lora_alpha, cache_dir=config.cache_dir,
                    )  # fmt: skip
                else:
                    train_x, test_x = embeddings[method]
                    predictions = logistic_regression_run(train_x[index], train_labels[index], test_x, seed)
                    metrics = _score(suite, predictions, test_labels)
                runs.append(
                    {
                        "seed": seed,
                        "value": float(metrics[f"eval_{suite.metric}"]),
                        "accuracy": metrics.get("eval_accuracy"),
                    }
                )
            entries.append(
                {
                    "suite": suite.name,
                    "model": role,
                    "name_or_path": model,
                    "method": method,
                    "k": k,
                    "metric": suite.metric,
                    "runs": runs,
                    **summarise([r["value"] for r in runs]),
                    **({"protocol": protocol} if method == "lora" else {}),
                }
            )
    return entries


def evaluate_few_shot(
    config: EvalConfig, shots: Sequence[int] = (8, 16), methods: Sequence[str] = FEW_SHOT_METHODS
) -> dict[str, Any]:
    """Few-shot results of `config.model_name_or_path` (and of `config.dense_model`) on classification suites.

    Args:
        config (`EvalConfig`): model, suites, output folder, seeds (default: the suite protocol's), data.
        shots (`Sequence[int]`): examples per class, e.g. `(8, 16)`.
        methods (`Sequence[str]`): among `FEW_SHOT_METHODS`.

    Returns:
        The results (also written to `<output_dir>/results.json`), with a `few_shot` list of
        `{suite, model, method, k, metric, runs, mean, std, min, max, n}`.

    Raises:
        ValueError: an unknown method, a suite that is not sentence classification, too few examples of a class.
    """
    unknown = [m for m in methods if m not in FEW_SHOT_METHODS]
    if unknown:
        raise ValueError(f"unknown few-shot method(s) {unknown}: use {', '.join(FEW_SHOT_METHODS)}")
    suites = resolve_suites(config.suites)
    wrong = [s.name for s in suites if s.task_type != "classification"]
    if wrong:
        raise ValueError(
            f"few-shot mode needs sentence classification suites (k examples per class); {', '.join(wrong)} "
            f"{'is' if len(wrong) == 1 else 'are'} not. Use --suite assin2-rte."
        )
    output_dir = Path(config.output_dir)
    check_output_dir(output_dir, config.overwrite)
    seeds = list(config.seeds) if config.seeds is not None else None
    entries = []
    for suite in suites:
        raw = load_suite_data(
            suite, suite_data_dir(suite, config.data_dir), config.cache_dir, ("train", "test")
        )
        suite_seeds = seeds or list(suite.protocol.seeds)
        models = [("model", config.model_name_or_path)]
        if config.dense_model:
            models.append(("dense", config.dense_model))
        for role, model in models:
            entries.extend(
                _few_shot_model(
                    model, role, suite, raw, shots, methods, suite_seeds, config, output_dir / suite.name
                )
            )
    results = {
        "format": "ptmoe-eval-results/1",
        "model_name": _card_name(config),
        "model_name_or_path": config.model_name_or_path,
        "tuning": "few-shot",
        "dense_model": config.dense_model,
        "results": [],
        "few_shot": entries,
        "versions": _versions(),
    }
    write_results(results, output_dir / "results.json")
    return results


__all__ = [
    "FEW_SHOT_LORA_PROTOCOL",
    "FEW_SHOT_METHODS",
    "evaluate_few_shot",
    "logistic_regression_run",
    "sample_per_class",
    "sentence_embeddings",
]
