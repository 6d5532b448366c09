"""The Portuguese benchmark suites: ASSIN 2 (STS, RTE), HAREM / MiniHAREM (5 and 10 classes) and LeNER-Br.

suites.py     one table of datasets (Hub id, config, original files, splits, columns, labels, licence, protocol,
              published anchors, what was verified), loading from local mirrors or the chain, schema checks
sources.py    the loading chain (Hub dataset → the Hub's parquet export → the original files, read by ptmoe's own
              ASSIN 2 XML / HAREM JSON / CoNLL parsers) and `--prepare-data` (parquet for an offline machine)
run.py        fine-tune + evaluate over seeds (ptmoe.training's loop), dense baseline, results JSON, and the
              conversion of results into model-card `model-index` entries
few_shot.py   k examples per class: logistic regression on frozen embeddings, LoRA; mean and spread over seeds
retrieval.py  sentence-encoder metrics: mean pooling, half-sentence retrieval (recall@1, MRR), the MiniLM locator
contrastive.py  contrastive continued training (half-sentence pairs, in-batch negatives) that bench_quality scores
              with retrieval.py: the quality protocol for a converged encoder
cli.py        `ptmoe evaluate` / `scripts/evaluate_pt.py`
fixtures/     a tiny mirror of each dataset in its exact schema, and original/: tiny files in each dataset's
              original format (sentences written for ptmoe)
"""

from .few_shot import evaluate_few_shot
from .run import EvalConfig, evaluate_suites, format_results, results_to_eval_results
from .sources import SuiteDataError, prepare_suite_data
from .suites import SUITES, Suite, get_suite, list_suites, load_suite_data

__all__ = [
    "EvalConfig",
    "SUITES",
    "Suite",
    "SuiteDataError",
    "evaluate_few_shot",
    "evaluate_suites",
    "format_results",
    "get_suite",
    "list_suites",
    "load_suite_data",
    "prepare_suite_data",
    "results_to_eval_results",
]
