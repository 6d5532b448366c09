#!/usr/bin/env python
"""Fine-tune a MoE-BERT model for named-entity recognition with word-level BIO tags (entity-level F1, seqeval).

Each word's tag goes to its first sub-word token; later sub-words and special tokens are ignored (-100) by the
loss and the metric. Examples:

    python scripts/finetune_ner.py --model_name_or_path my-moe-bert \\
        --train_file ptmoe/data/ner_train.jsonl --validation_file ptmoe/data/ner_test.jsonl \\
        --tokens_column tokens --tags_column ner_tags --label_names_file ptmoe/data/ner_labels.json \\
        --output_dir out/ner

    # a Hub dataset whose tags are a Sequence(ClassLabel) (e.g. LeNER-Br), with expert LoRA
    python scripts/finetune_ner.py --model_name_or_path my-moe-bert --dataset_name lener_br \\
        --tokens_column tokens --tags_column ner_tags --tuning lora --output_dir out/lener
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import DataCollatorForTokenClassification, Trainer, TrainingArguments

from ptmoe import training
from ptmoe.errors import run_script


@dataclass
class NerDataArguments(training.DataArguments):
    tokens_column: str = field(default="tokens", metadata={"help": "Column holding the list of words."})
    tags_column: str = field(default="ner_tags", metadata={"help": "Column holding one BIO tag per word."})
    label_names_file: str | None = field(
        default=None,
        metadata={
            "help": "JSON list of every tag (e.g. ptmoe/data/ner_labels.json); default: tags seen in train."
        },
    )


def main(args: list[str] | None = None) -> dict:
    """Run the script with command-line `args` (default `sys.argv[1:]`); returns the train and eval metrics."""
    model_args, data_args, training_args, raw, do_train, do_eval = training.start_run(
        (training.ModelArguments, NerDataArguments, TrainingArguments), args
    )
    training.check_columns(
        raw, {"--tokens_column": data_args.tokens_column, "--tags_column": data_args.tags_column}
    )
    label_names = (
        training.read_label_names(data_args.label_names_file) if data_args.label_names_file else None
    )
    model_labels = None
    if not model_args.ignore_mismatched_sizes:
        model_labels = training.model_label_names(
            model_args.model_name_or_path, "token", model_args.cache_dir
        )
    labels = training.build_ner_label_mapping(
        raw,
        data_args.tokens_column,
        data_args.tags_column,
        label_names=label_names,
        model_labels=model_labels,
    )

    tokenizer = training.load_tokenizer(model_args)
    model = training.load_model(model_args, "token-classification", labels)
    max_seq_length = training.resolve_max_length(data_args.max_seq_length, model, tokenizer)
    with training_args.main_process_first(desc="tokenisation"):
        tokenized = training.tokenize_and_align_labels(
            raw,
            tokenizer,
            data_args.tokens_column,
            data_args.tags_column,
            labels,
            max_seq_length=max_seq_length,
            num_proc=data_args.preprocessing_num_workers,
        )

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=tokenized["train"] if do_train else None,
        eval_dataset=tokenized.get("validation") if do_eval else None,
        processing_class=tokenizer,
        data_collator=DataCollatorForTokenClassification(tokenizer),
        compute_metrics=training.ner_metrics(labels),
        preprocess_logits_for_metrics=training.logits_to_predictions("classification"),
    )
    return training.train_evaluate_save(trainer, model_args, do_train, do_eval)


if __name__ == "__main__":
    run_script(main)
