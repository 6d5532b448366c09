"""The Portuguese benchmark suites: ASSIN 2 (STS, RTE), HAREM / MiniHAREM (5 and 10 classes) and LeNER-Br.

suites.py     one table of datasets (Hub id, config, splits, columns, labels, licence, protocol, published
              anchors, what was verified), loading from the Hub or local mirrors, schema checks
run.py        fine-tune + evaluate over seeds (ptmoe.training's loop), dense baseline, results JSON, and the
              conversion of results into model-card `model-index` entries
few_shot.py   k examples per class: logistic regression on frozen embeddings, LoRA; mean and spread over seeds
cli.py        `ptmoe evaluate` / `scripts/evaluate_pt.py`
fixtures/     a tiny mirror of each dataset in its exact schema (sentences written for ptmoe)
"""

from .few_shot import evaluate_few_shot
from .run import EvalConfig, evaluate_suites, format_results, results_to_eval_results
from .suites import SUITES, Suite, get_suite, list_suites, load_suite_data

__all__ = [
    "EvalConfig",
    "SUITES",
    "Suite",
    "evaluate_few_shot",
    "evaluate_suites",
    "format_results",
    "get_suite",
    "list_suites",
    "load_suite_data",
    "results_to_eval_results",
]
