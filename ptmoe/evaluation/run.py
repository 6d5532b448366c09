"""Fine-tune and evaluate a model on the Portuguese suites, over several seeds, next to its dense source.

    load_suite_data ─► build_(ner_)label_mapping ─► tokenize_* ─► load_model (full | lora | qlora) ─► Trainer
          (suites.py)              └──────────── ptmoe.training ───────────────┘       train_evaluate_save
                                                                                              │
    results.json ◄── summarise (mean, spread over seeds, dense baseline, published anchors) ◄─┘

The Trainer loop is `ptmoe.training.train_evaluate_save` (the one the fine-tuning scripts use); this module only
chooses the data, the protocol and the metric per suite, repeats over seeds and writes one results JSON, which
`ptmoe cards --eval-results` turns into `model-index` entries.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import training
from ..outputs import check_output_dir
from .suites import FIXTURES_DIR, Suite, resolve_suites, split_long_documents

logger = logging.getLogger(__name__)

RESULTS_FORMAT = "ptmoe-eval-results/1"
RESULTS_FILE = "results.json"
_MOE_MODEL_TYPES = ("moe_bert", "moe_t5")


@dataclass
class EvalConfig:
    """What `evaluate_suites` runs.

    Args:
        model_name_or_path (`str`): the model to fine-tune (a ptmoe checkpoint, or a dense one with
            `upcycle_experts`).
        suites (`list[str]`): suite names, groups (`assin2`, `harem`, `all`) or patterns.
        output_dir (`str`): where runs and `results.json` go (must be empty or absent unless `overwrite`).
        tuning (`str`): `full`, `lora` (LoRA per expert) or `qlora`.
        dense_model (`str`, *optional*): the dense source, fine-tuned and evaluated the same way (baseline).
        data_dir (`str`, *optional*): a folder with one sub-folder per dataset (`assin2`, `harem-selective`,
            `harem-total`, `lener-br`) holding `train`/`validation`/`test` files; `"fixtures"` = the tiny mirrors
            shipped with ptmoe. Without it the Hub datasets are loaded.
        seeds, epochs, learning_rate, batch_size, max_length: override the suite's protocol.
        max_steps (`int`, *optional*): stop each run after this many optimiser steps (smoke runs).
        card_name (`str`, *optional*): the model name the results are filed under for `ptmoe cards`.
    """

    model_name_or_path: str
    suites: list[str]
    output_dir: str
    tuning: str = "full"
    dense_model: str | None = None
    data_dir: str | None = None
    seeds: tuple[int, ...] | None = None
    epochs: float | None = None
    learning_rate: float | None = None
    batch_size: int | None = None
    max_length: int | None = None
    max_steps: int | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    upcycle_experts: int | None = None
    lora_r: int = 8
    lora_alpha: int = 16
    card_name: str | None = None
    overwrite: bool = False
    cache_dir: str | None = None

    def __post_init__(self):
        if self.tuning not in training.TUNING_CHOICES:
            raise ValueError(f"--tuning must be one of {training.TUNING_CHOICES}, got {self.tuning!r}")
        if self.seeds is not None and not self.seeds:
            raise ValueError("--seeds needs at least one seed")
        resolve_suites(self.suites)  # unknown suite names fail before anything loads


def suite_data_dir(suite: Suite, data_dir: str | os.PathLike | None) -> Path | None:
    """The folder holding `suite`'s local files under `data_dir` (`"fixtures"`: the shipped mirrors)."""
    if data_dir is None:
        return None
    root = FIXTURES_DIR if str(data_dir) == "fixtures" else Path(data_dir)
    return root / suite.fixture_name


def _protocol(suite: Suite, config: EvalConfig) -> dict[str, Any]:
    p = suite.protocol
    return {
        "epochs": config.epochs if config.epochs is not None else p.epochs,
        "learning_rate": config.learning_rate if config.learning_rate is not None else p.learning_rate,
        "batch_size": config.batch_size if config.batch_size is not None else p.batch_size,
        "max_length": config.max_length if config.max_length is not None else p.max_length,
        "seeds": list(config.seeds if config.seeds is not None else p.seeds),
        "max_steps": config.max_steps,
        "paper_protocol": asdict(p),
    }


def label_mapping_for(suite: Suite, raw) -> training.LabelMapping:
    """The label ids of `suite` (checked on every split by `ptmoe.training`)."""
    if suite.task_type == "ner":
        return training.build_ner_label_mapping(raw, suite.columns["tokens"], suite.columns["tags"])
    return training.build_label_mapping(raw, suite.columns["label"], suite.task_type)


# Every linear of a BERT-family encoder layer (BERT, RoBERTa, XLM-R): the dense baseline's LoRA targets.
_DENSE_LORA_TARGETS = (
    r".*\.encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|"
    r"intermediate\.dense|output\.dense)$"
)


def _load_dense(model_args: training.ModelArguments, task: str, labels: training.LabelMapping):
    """The dense baseline: the same head and tuning mode; LoRA on every linear of the encoder layers (there are no
    experts to target), with modules missing from the checkpoint (a new pooler, the head) trained in full."""
    import peft
    import transformers

    import ptmoe

    auto = {
        "sequence-classification": transformers.AutoModelForSequenceClassification,
        "token-classification": transformers.AutoModelForTokenClassification,
    }[task]
    kwargs: dict[str, Any] = {"cache_dir": model_args.cache_dir, "ignore_mismatched_sizes": True}
    kwargs.update(labels.model_kwargs())
    if model_args.tuning == "qlora":
        # New modules (pooler, head) are random: keep them out of 4-bit so they can be trained (skip patterns match
        # a name's start or its suffix).
        kwargs["quantization_config"] = ptmoe.bnb_4bit_config(skip_modules=["pooler.dense", "classifier"])
    model, loading_info = auto.from_pretrained(
        model_args.model_name_or_path, output_loading_info=True, **kwargs
    )
    model.accepts_loss_kwargs = False
    if model_args.tuning == "full":
        return model
    new_modules = training.new_module_names(model, loading_info)
    config = peft.LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=_DENSE_LORA_TARGETS,
        modules_to_save=new_modules or None,
    )
    if model_args.tuning == "qlora":
        return ptmoe.prepare_qlora_model(model, lora_config=config)
    return peft.get_peft_model(model, config)


def load_model_for(model_args: training.ModelArguments, task: str, labels: training.LabelMapping):
    """`ptmoe.training.load_model` for ptmoe checkpoints (or dense ones with `upcycle_experts`), else the dense
    baseline loader."""
    config = training.load_config(model_args)
    if config.model_type in _MOE_MODEL_TYPES or model_args.upcycle_experts is not None:
        return training.load_model(model_args, task, labels)
    return _load_dense(model_args, task, labels)


def finetune_and_evaluate(
    model_name_or_path: str,
    suite: Suite,
    raw,
    seed: int,
    protocol: dict[str, Any],
    output_dir: str | os.PathLike,
    tuning: str = "full",
    upcycle_experts: int | None = None,
    lora_r: int = 8,
    lora_alpha: int = 16,
    cache_dir: str | None = None,
) -> dict[str, float]:
    """One run: fine-tune on `raw["train"]` with `seed`, evaluate on `raw["test"]`; returns the eval metrics.

    Args:
        model_name_or_path (`str`): checkpoint. suite (`Suite`): the task. raw (`DatasetDict`): train and test.
        seed (`int`): seed of the head initialisation, the data order and dropout.
        protocol (`dict`): `epochs`, `learning_rate`, `batch_size`, `max_length` (`max_steps` optional).
        output_dir (`str`): the run's folder (the fine-tuned model or adapter is saved there).
        tuning, upcycle_experts, lora_r, lora_alpha, cache_dir: as in `ptmoe.training.ModelArguments`.
    """
    from transformers import (
        DataCollatorForTokenClassification,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    set_seed(seed)
    model_args = training.ModelArguments(
        model_name_or_path=model_name_or_path,
        tuning=tuning,
        upcycle_experts=upcycle_experts,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        cache_dir=cache_dir,
        ignore_mismatched_sizes=True,
        router_telemetry=False,
    )
    labels = label_mapping_for(suite, raw)
    tokenizer = training.load_tokenizer(model_args)
    is_ner = suite.task_type == "ner"
    model = load_model_for(
        model_args, "token-classification" if is_ner else "sequence-classification", labels
    )
    max_length = training.resolve_max_length(protocol["max_length"], model, tokenizer)
    raw = type(raw)({split: raw[split] for split in ("train", "test")})
    if is_ner:
        # Whole documents (HAREM) would be truncated: chunks of at most ~half as many words as tokens fit.
        raw = split_long_documents(raw, suite, max_words=max(8, (max_length - 2) // 2))
        tokenized = training.tokenize_and_align_labels(
            raw, tokenizer, suite.columns["tokens"], suite.columns["tags"], labels, max_seq_length=max_length
        )
        collator = DataCollatorForTokenClassification(tokenizer)
        metric_kwargs = {k: v for k, v in suite.metric_kwargs.items() if k in ("mode", "scheme")}
        compute_metrics = training.ner_metrics(labels, **metric_kwargs)
    else:
        tokenized = training.tokenize_classification(
            raw,
            tokenizer,
            suite.columns["text"],
            suite.columns["label"],
            labels,
            text_pair_column=suite.columns.get("text_pair"),
            max_seq_length=max_length,
        )
        collator = DataCollatorWithPadding(tokenizer)
        compute_metrics = training.classification_metrics(labels, suite.metric_kwargs.get("f1_average"))
    args = TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=protocol["epochs"],
        max_steps=protocol.get("max_steps") or -1,
        learning_rate=protocol["learning_rate"],
        per_device_train_batch_size=protocol["batch_size"],
        per_device_eval_batch_size=max(protocol["batch_size"], 8),
        seed=seed,
        data_seed=seed,
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="epoch",
        report_to=[],
        disable_tqdm=not logger.isEnabledFor(logging.INFO),
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=tokenized["train"],
        eval_dataset=tokenized["test"],
        processing_class=tokenizer,
        data_collator=collator,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=training.logits_to_predictions(
            "regression" if suite.task_type == "regression" else "classification"
        ),
    )
    return training.train_evaluate_save(trainer, model_args, do_train=True, do_eval=True)


def summarise(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation (ddof=1; 0 for one run), min and max over seeds."""
    array = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(array.mean()),
        "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0,
        "min": float(array.min()),
        "max": float(array.max()),
        "n": len(array),
    }


def _model_runs(
    model: str, suite: Suite, raw, protocol: dict, out: Path, config: EvalConfig, tuning: str, upcycle
):
    runs = []
    for seed in protocol["seeds"]:
        metrics = finetune_and_evaluate(
            model,
            suite,
            raw,
            seed,
            protocol,
            out / f"seed-{seed}",
            tuning=tuning,
            upcycle_experts=upcycle,
            lora_r=config.lora_r,
            lora_alpha=config.lora_alpha,
            cache_dir=config.cache_dir,
        )
        key = f"eval_{suite.metric}"
        if key not in metrics or metrics[key] is None or math.isnan(float(metrics[key])):
            logger.warning("%s seed %d: %s is %s", suite.name, seed, key, metrics.get(key))
        runs.append(
            {"seed": seed, "value": float(metrics.get(key, float("nan"))), "metrics": _jsonable(metrics)}
        )
    return {"name_or_path": model, "tuning": tuning, "runs": runs, **summarise([r["value"] for r in runs])}


def _jsonable(metrics: dict) -> dict:
    return {
        k: (float(v) if isinstance(v, (int, float, np.floating, np.integer)) else v)
        for k, v in metrics.items()
    }


def evaluate_suite(suite: Suite, config: EvalConfig, output_dir: Path) -> dict[str, Any]:
    """Every seed of `config.model_name_or_path` (and of `config.dense_model`) on `suite`; the suite's result."""
    from .suites import load_suite_data

    source_dir = suite_data_dir(suite, config.data_dir)
    raw, source = load_suite_data(
        suite, source_dir, cache_dir=config.cache_dir, splits=("train", "test"), return_source=True
    )
    raw = training.limit_samples(raw, config.max_train_samples, None)
    if config.max_eval_samples is not None:
        raw["test"] = raw["test"].select(range(min(len(raw["test"]), config.max_eval_samples)))
    protocol = _protocol(suite, config)
    result: dict[str, Any] = {
        "suite": suite.name,
        "pretty_name": suite.pretty_name,
        "task_type": suite.task_type,
        "hub_task_type": suite.hub_task_type,
        "dataset": {
            "hub_id": suite.hub_id,
            "config": suite.hub_config,
            "split": suite.splits["test"],
            "source": source,
            "fixtures": source_dir is not None and Path(source_dir).resolve().is_relative_to(FIXTURES_DIR),
            "train_examples": len(raw["train"]),
            "test_examples": len(raw["test"]),
            "licence": suite.licence,
        },
        "metric": {"name": suite.metric, "type": suite.metric_type, "kwargs": dict(suite.metric_kwargs)},
        "protocol": protocol,
        "model": _model_runs(
            config.model_name_or_path,
            suite,
            raw,
            protocol,
            output_dir / suite.name / "model",
            config,
            config.tuning,
            config.upcycle_experts,
        ),
        "dense_baseline": None,
        "anchors": [asdict(anchor) for anchor in suite.anchors],
    }
    if config.dense_model is not None:
        result["dense_baseline"] = _model_runs(
            config.dense_model,
            suite,
            raw,
            protocol,
            output_dir / suite.name / "dense",
            config,
            config.tuning,
            None,
        )
        result["delta_vs_dense"] = result["model"]["mean"] - result["dense_baseline"]["mean"]
    return result


def write_results(results: dict, path: str | os.PathLike) -> Path:
    """Write `results` as JSON next to `path` first, then move it into place (no half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        "w", dir=path.parent, suffix=".tmp", delete=False, encoding="utf-8"
    ) as f:
        json.dump(results, f, indent=2, ensure_ascii=False)
        tmp = f.name
    os.replace(tmp, path)
    return path


def _card_name(config: EvalConfig) -> str:
    if config.card_name:
        return config.card_name
    provenance = Path(config.model_name_or_path) / "ptmoe_zoo.json"
    if provenance.is_file():
        name = json.loads(provenance.read_text()).get("zoo_name")
        if name:
            return name
    return Path(config.model_name_or_path).name or config.model_name_or_path


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for package in (
        "ptmoe",
        "torch",
        "transformers",
        "peft",
        "datasets",
        "evaluate",
        "scikit-learn",
        "seqeval",
    ):
        try:
            out[package] = md.version(package)
        except md.PackageNotFoundError:
            pass
    return out


def evaluate_suites(config: EvalConfig) -> dict[str, Any]:
    """Run every suite of `config` and write `<output_dir>/results.json`; returns the results.

    Raises:
        ValueError: an unknown suite, data that does not match a suite's schema, or a model that cannot be loaded.
        FileExistsError: a non-empty output folder without `overwrite`.
    """
    suites = resolve_suites(config.suites)
    output_dir = Path(config.output_dir)
    check_output_dir(output_dir, config.overwrite)
    results = {
        "format": RESULTS_FORMAT,
        "model_name": _card_name(config),
        "model_name_or_path": config.model_name_or_path,
        "tuning": config.tuning,
        "dense_model": config.dense_model,
        "results": [evaluate_suite(suite, config, output_dir) for suite in suites],
        "versions": _versions(),
    }
    write_results(results, output_dir / RESULTS_FILE)
    return results


def format_results(results: dict) -> str:
    """A plain-text table: ours (mean ± std over seeds), the dense baseline, and the published anchors."""
    lines = [f"{results['model_name']} ({results['tuning']})"]
    for entry in results.get("results", []):
        model = entry["model"]
        line = (
            f"  {entry['pretty_name']:<24} {entry['metric']['name']:<11} {model['mean']:.4f} ± {model['std']:.4f} "
            f"({model['n']} seeds)"
        )
        if entry.get("dense_baseline"):
            dense = entry["dense_baseline"]
            line += f" | dense {dense['mean']:.4f} ± {dense['std']:.4f} (Δ {entry['delta_vs_dense']:+.4f})"
        anchors = ", ".join(f"{a['model']} {a['value']:.4g}" for a in entry.get("anchors", []))
        if anchors:
            line += f" | published: {anchors}"
        if entry["dataset"].get("fixtures"):
            line += " [fixtures: a smoke test, not a measurement]"
        lines.append(line)
    for entry in results.get("few_shot", []):
        lines.append(
            f"  few-shot {entry['suite']:<11} {entry['model']:<6} {entry['method']:<12} k={entry['k']:<3} "
            f"{entry['metric']:<4} {entry['mean']:.4f} ± {entry['std']:.4f} ({entry['n']} seeds)"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Results → model cards
# ----------------------------------------------------------------------------------------------------------------
_METRIC_NAMES = {"pearson": "Pearson", "f1": "F1 (macro)", "overall_f1": "F1 (entity, micro)"}


def is_results_file(data: Any) -> bool:
    """Is `data` (a parsed JSON) a results file written by `evaluate_suites`?"""
    return isinstance(data, dict) and data.get("format") == RESULTS_FORMAT


def results_to_eval_results(results: dict) -> dict[str, list[dict[str, Any]]]:
    """`{model name: [EvalResult fields, ...]}` for `ptmoe.cards` (one `model-index` entry per suite).

    The value is the mean over seeds; the metric name says how many seeds and their standard deviation, and marks
    results computed on the shipped fixtures as smoke tests (they are not measurements).
    """
    entries = []
    for entry in results["results"]:
        model = entry["model"]
        name = _METRIC_NAMES.get(entry["metric"]["name"], entry["metric"]["name"])
        entries.append(
            {
                "task_type": entry["hub_task_type"],
                "dataset_type": entry["dataset"]["hub_id"],
                "dataset_name": entry["pretty_name"],
                "dataset_config": entry["dataset"]["config"],
                "dataset_split": entry["dataset"]["split"],
                "metric_type": entry["metric"]["type"],
                "metric_value": round(model["mean"], 4),
                "metric_name": f"{name}, mean of {model['n']} seeds (std {model['std']:.4f})"
                + (
                    " - smoke test on ptmoe fixtures, not a measurement"
                    if entry["dataset"].get("fixtures")
                    else ""
                ),
                "metric_args": entry["metric"]["kwargs"] or None,
            }
        )
    return {results["model_name"]: entries}


__all__ = [
    "EvalConfig",
    "RESULTS_FILE",
    "RESULTS_FORMAT",
    "evaluate_suite",
    "evaluate_suites",
    "finetune_and_evaluate",
    "format_results",
    "is_results_file",
    "label_mapping_for",
    "load_model_for",
    "results_to_eval_results",
    "suite_data_dir",
    "summarise",
    "write_results",
]
