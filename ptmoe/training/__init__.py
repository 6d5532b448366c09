"""The reusable logic of the Trainer scripts in `scripts/`: arguments, data, labels, tokenisation, metrics, models.

Each script is thin wiring over these functions::

    load_raw_datasets ──► check_columns ──► build_label_mapping / build_ner_label_mapping
          │                                        │
          └──► tokenize_* (+ a data collator) ◄────┘        load_tokenizer, load_model (full | lora | qlora)
                              │                                           │
                              └──────────► Trainer / Seq2SeqTrainer ◄─────┘  (+ RouterTelemetryCallback)
                                                   │
                                       train_evaluate_save: train, save once, evaluate, metrics JSON

Every check that can fail on user input raises a `ValueError` whose message names the argument to fix, before
any expensive work starts.

The parts, in the order a script uses them::

    arguments.py        ModelArguments, DataArguments, parse_arguments, parse_expert_list
    data.py             load_raw_datasets, start_run, check_training_output_dir, limit_samples, check_columns
    labels.py           LabelMapping, build_label_mapping, build_ner_label_mapping, model_label_names, read_label_names
    tokenization.py     tokenize_classification, tokenize_and_align_labels, tokenize_for_mlm (domain-aware packing)
    span_corruption.py  DataCollatorForT5SpanCorruption, span_corrupt and helpers, tokenize_for_span_corruption,
                        tokenize_seq2seq
    metrics.py          logits_to_predictions, classification_metrics (+ screening), ner_metrics, seq2seq_metrics
    models.py           load_tokenizer, load_config, load_model, add_expert_lora, resolve_max_length
    run.py              train_evaluate_save, save_merged, resolve_do_train_eval, setup_logging

Every name the scripts use is re-exported here: `from ptmoe import training; training.load_model(...)`.
"""

from .arguments import (
    TUNING_CHOICES,
    DataArguments,
    ModelArguments,
    parse_arguments,
    parse_expert_list,
)
from .data import (
    check_columns,
    check_training_output_dir,
    limit_samples,
    load_raw_datasets,
    start_run,
)
from .labels import (
    LabelMapping,
    build_label_mapping,
    build_ner_label_mapping,
    model_label_names,
    read_label_names,
)
from .metrics import (
    SCREENING_METRICS,
    classification_metrics,
    logits_to_predictions,
    ner_metrics,
    parse_screening_metrics,
    seq2seq_metrics,
)
from .models import (
    TASKS,
    add_expert_lora,
    load_config,
    load_model,
    load_tokenizer,
    new_module_names,
    resolve_max_length,
)
from .run import (
    is_peft_model,
    resolve_do_train_eval,
    save_merged,
    setup_logging,
    train_evaluate_save,
)
from .span_corruption import (
    DataCollatorForT5SpanCorruption,
    random_spans_noise_mask,
    sentinel_token_ids,
    span_corrupt,
    t5_span_corruption_lengths,
    tokenize_for_span_corruption,
    tokenize_seq2seq,
)
from .tokenization import (
    _concatenate_and_chunk as _concatenate_and_chunk,  # private; scripts/bench_quality.py imports it
)
from .tokenization import (
    tokenize_and_align_labels,
    tokenize_classification,
    tokenize_for_mlm,
    train_tokenizer,
)

__all__ = [
    "DataArguments",
    "DataCollatorForT5SpanCorruption",
    "LabelMapping",
    "ModelArguments",
    "TASKS",
    "add_expert_lora",
    "build_label_mapping",
    "build_ner_label_mapping",
    "check_training_output_dir",
    "check_columns",
    "classification_metrics",
    "limit_samples",
    "load_config",
    "load_model",
    "new_module_names",
    "load_raw_datasets",
    "load_tokenizer",
    "logits_to_predictions",
    "model_label_names",
    "ner_metrics",
    "parse_arguments",
    "parse_expert_list",
    "parse_screening_metrics",
    "random_spans_noise_mask",
    "read_label_names",
    "resolve_do_train_eval",
    "resolve_max_length",
    "save_merged",
    "sentinel_token_ids",
    "seq2seq_metrics",
    "span_corrupt",
    "t5_span_corruption_lengths",
    "tokenize_and_align_labels",
    "tokenize_classification",
    "tokenize_for_mlm",
    "tokenize_for_span_corruption",
    "tokenize_seq2seq",
    "train_tokenizer",
    "train_evaluate_save",
    # also used by the scripts and other modules
    "SCREENING_METRICS",
    "TUNING_CHOICES",
    "is_peft_model",
    "setup_logging",
    "start_run",
]
