#!/usr/bin/env python
"""Fine-tune a MoE-BERT model on single-sentence or sentence-pair classification or regression.

Examples (run under `accelerate launch` unchanged for several processes):

    # sentiment (single sentence), local files shipped with ptmoe
    python scripts/finetune_classification.py --model_name_or_path my-moe-bert \\
        --train_file ptmoe/data/sentiment_train.jsonl --validation_file ptmoe/data/sentiment_test.jsonl \\
        --text_column text --label_column label --output_dir out/sentiment

    # ASSIN2 entailment (sentence pair) and similarity (regression) from the Hub
    python scripts/finetune_classification.py --model_name_or_path my-moe-bert --dataset_name assin2 \\
        --text_column premise --text_pair_column hypothesis --label_column entailment_judgment --output_dir out/rte
    python scripts/finetune_classification.py --model_name_or_path my-moe-bert --dataset_name assin2 \\
        --text_column premise --text_pair_column hypothesis --label_column relatedness_score \\
        --task_type regression --output_dir out/sts

    # binary screening (include / exclude): also report AWSS@95% and WSS@95% on the relevant class (label id 1)
    ... --metric awss@0.95 wss@0.95

    # expert LoRA (adapter saved; --merge_lora also saves the merged model) or QLoRA
    ... --tuning lora --lora_r 8 --lora_alpha 16 --lora_experts all --merge_lora
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

from ptmoe import domains, training
from ptmoe.errors import run_script


@dataclass
class ClassificationDataArguments(domains.DomainArguments, training.DataArguments):
    text_column: str = field(default="text", metadata={"help": "Column of the (first) sentence."})
    text_pair_column: str | None = field(
        default=None, metadata={"help": "Column of the second sentence of a pair (e.g. hypothesis)."}
    )
    label_column: str = field(default="label", metadata={"help": "Column of the class or score."})
    task_type: str = field(
        default="classification",
        metadata={
            "help": "classification (class ids or names) or regression (one float score).",
            "choices": ["classification", "regression"],
        },
    )
    metric: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Extra screening metrics for binary tasks, NAME@RECALL: awss@0.95, wss@0.95 (label id 1 = relevant)."
        },
    )


def main(args: list[str] | None = None) -> dict:
    """Run the script with command-line `args` (default `sys.argv[1:]`); returns the train and eval metrics."""
    model_args, data_args, training_args, raw, do_train, do_eval = training.start_run(
        (training.ModelArguments, ClassificationDataArguments, TrainingArguments), args
    )
    screening = training.parse_screening_metrics(data_args.metric)
    training.check_columns(
        raw,
        {
            "--text_column": data_args.text_column,
            "--text_pair_column": data_args.text_pair_column,
            "--label_column": data_args.label_column,
        },
    )
    model_labels = None
    if not model_args.ignore_mismatched_sizes:
        model_labels = training.model_label_names(
            model_args.model_name_or_path, "sequence", model_args.cache_dir
        )
    labels = training.build_label_mapping(raw, data_args.label_column, data_args.task_type, model_labels)
    compute_metrics = training.classification_metrics(
        labels, screening=screening
    )  # refuses awss on non-binary tasks

    tokenizer = training.load_tokenizer(model_args)
    model = training.load_model(model_args, "sequence-classification", labels)
    domain_ids = None
    if data_args.domain_column:  # checks the column's values against the experts' names before tokenising
        domain_ids = domains.setup_domains(
            model, raw, data_args.domain_column, data_args.expert_names, data_args.router_domain_loss_coef
        )
    max_seq_length = training.resolve_max_length(data_args.max_seq_length, model, tokenizer)
    with training_args.main_process_first(desc="tokenisation"):
        tokenized = training.tokenize_classification(
            raw,
            tokenizer,
            data_args.text_column,
            data_args.label_column,
            labels,
            text_pair_column=data_args.text_pair_column,
            max_seq_length=max_seq_length,
            num_proc=data_args.preprocessing_num_workers,
            domain_column=data_args.domain_column,
            domain_ids=domain_ids,
        )

    trainer_class = domains.DomainRoutingTrainer if data_args.domain_column else Trainer
    trainer = trainer_class(
        model=model,
        args=training_args,
        train_dataset=tokenized["train"] if do_train else None,
        eval_dataset=tokenized.get("validation") if do_eval else None,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=training.logits_to_predictions(data_args.task_type, bool(screening)),
    )
    if data_args.domain_column:
        domains.add_domain_telemetry(trainer)
    return training.train_evaluate_save(trainer, model_args, do_train, do_eval)


if __name__ == "__main__":
    run_script(main)
