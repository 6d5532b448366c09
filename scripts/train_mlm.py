#!/usr/bin/env python
"""Continued pre-training of a (possibly just upcycled) MoE model on Portuguese text.

MoE-BERT: masked-LM (15% of tokens: 80% [MASK], 10% random, 10% kept; `DataCollatorForLanguageModeling`).
MoE-T5: span corruption (T5's recipe: 15% noise in spans of mean length 3, each span replaced by a sentinel
`<extra_id_N>`; the decoder restores the spans; `ptmoe.training.DataCollatorForT5SpanCorruption`).
The objective follows the checkpoint's architecture. Examples:

    python scripts/train_mlm.py --model_name_or_path my-moe-bert --train_file ptmoe/data/corpus.txt \\
        --max_seq_length 128 --output_dir out/mlm
    # upcycle a dense BERT on the fly, then continue pre-training
    python scripts/train_mlm.py --model_name_or_path neuralmind/bert-base-portuguese-cased --upcycle_experts 8 \\
        --train_file corpus.txt --output_dir out/bertimbau-moe
    python scripts/train_mlm.py --model_name_or_path my-moe-t5 --dataset_name <hub corpus> --text_column text \\
        --noise_density 0.15 --mean_noise_span_length 3 --output_dir out/t5-span
    # the "MiX" phase of a merged domain MoE (ptmoe merge-experts), routers supervised by the domain column
    python scripts/train_mlm.py --model_name_or_path out/merged --train_file ptmoe/data/domains_train.jsonl \\
        --validation_file ptmoe/data/domains_test.jsonl --domain_column domain --router_domain_loss_coef 0.1 \\
        --line_by_line --output_dir out/mix
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from ptmoe import domains, training
from ptmoe.errors import run_script


@dataclass
class PretrainingDataArguments(domains.DomainArguments, training.DataArguments):
    text_column: str = field(default="text", metadata={"help": "Column of raw text (.txt files: 'text')."})
    line_by_line: bool = field(
        default=False,
        metadata={"help": "MLM: one example per text instead of packed blocks of max_seq_length."},
    )
    mlm_probability: float = field(default=0.15, metadata={"help": "MLM: share of tokens masked."})
    noise_density: float = field(default=0.15, metadata={"help": "T5: share of tokens corrupted."})
    mean_noise_span_length: float = field(default=3.0, metadata={"help": "T5: mean corrupted span length."})

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.mlm_probability < 1:
            raise ValueError(f"--mlm_probability must be in (0, 1), got {self.mlm_probability}")


def main(args: list[str] | None = None) -> dict:
    """Run the script with command-line `args` (default `sys.argv[1:]`); returns the train and eval metrics."""
    model_args, data_args, training_args, raw, do_train, do_eval = training.start_run(
        (training.ModelArguments, PretrainingDataArguments, TrainingArguments), args
    )
    training.check_columns(raw, {"--text_column": data_args.text_column})

    tokenizer = training.load_tokenizer(model_args)
    span_corruption = "t5" in training.load_config(model_args).model_type
    model = training.load_model(model_args, "span-corruption" if span_corruption else "masked-lm")
    domain_ids = None
    if data_args.domain_column:  # checks the column's values against the experts' names before tokenising
        domain_ids = domains.setup_domains(
            model, raw, data_args.domain_column, data_args.expert_names, data_args.router_domain_loss_coef
        )
    domain_kwargs = {"domain_column": data_args.domain_column, "domain_ids": domain_ids}
    max_seq_length = training.resolve_max_length(data_args.max_seq_length, model, tokenizer)
    with training_args.main_process_first(desc="tokenisation"):
        if span_corruption:
            tokenized = training.tokenize_for_span_corruption(
                raw,
                tokenizer,
                data_args.text_column,
                max_seq_length=max_seq_length,
                noise_density=data_args.noise_density,
                mean_noise_span_length=data_args.mean_noise_span_length,
                num_proc=data_args.preprocessing_num_workers,
                **domain_kwargs,
            )
        else:
            tokenized = training.tokenize_for_mlm(
                raw,
                tokenizer,
                data_args.text_column,
                max_seq_length=max_seq_length,
                line_by_line=data_args.line_by_line,
                num_proc=data_args.preprocessing_num_workers,
                **domain_kwargs,
            )
    if span_corruption:
        collator = training.DataCollatorForT5SpanCorruption(
            tokenizer, data_args.noise_density, data_args.mean_noise_span_length
        )
    else:
        collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=data_args.mlm_probability)

    trainer_class = domains.DomainRoutingTrainer if data_args.domain_column else Trainer
    trainer = trainer_class(
        model=model,
        args=training_args,
        train_dataset=tokenized["train"] if do_train else None,
        eval_dataset=tokenized.get("validation") if do_eval else None,
        processing_class=tokenizer,
        data_collator=collator,
    )
    if data_args.domain_column:
        domains.add_domain_telemetry(trainer)
    # Perplexity of the (de)noising objective; the loss includes the weighted router losses, which are small.
    return training.train_evaluate_save(trainer, model_args, do_train, do_eval, perplexity=True)


if __name__ == "__main__":
    run_script(main)
