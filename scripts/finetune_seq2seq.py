#!/usr/bin/env python
"""Fine-tune a MoE-T5 model for summarization or translation; evaluates generated text with ROUGE and BLEU.

Generation during evaluation (`--predict_with_generate`) is on by default here; `--generation_max_length`
defaults to `--max_target_length`. Examples:

    python scripts/finetune_seq2seq.py --model_name_or_path my-moe-t5 \\
        --train_file ptmoe/data/summarization_train.jsonl --validation_file ptmoe/data/summarization_test.jsonl \\
        --source_column text --target_column summary --source_prefix "resumir: " --output_dir out/summ

    # translation from a local CSV with columns en,pt; expert LoRA
    python scripts/finetune_seq2seq.py --model_name_or_path my-moe-t5 --train_file en_pt.csv \\
        --source_column en --target_column pt --source_prefix "traduzir inglês para português: " \\
        --metrics bleu --tuning lora --output_dir out/mt

    # evaluation only, no generation (loss only): --do_eval --predict_with_generate False
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments

from ptmoe import training
from ptmoe.errors import run_script


@dataclass
class Seq2SeqDataArguments(training.DataArguments):
    source_column: str = field(default="text", metadata={"help": "Column of the input text."})
    target_column: str = field(default="summary", metadata={"help": "Column of the expected output text."})
    source_prefix: str = field(default="", metadata={"help": "Task prefix added to every input (T5 style)."})
    max_target_length: int = field(default=64, metadata={"help": "Maximum tokens of a target text."})
    metrics: str = field(default="rouge,bleu", metadata={"help": "Comma list among rouge, bleu."})

    def __post_init__(self):
        super().__post_init__()
        if not self.metric_names or set(self.metric_names) - {"rouge", "bleu"}:
            raise ValueError(f"--metrics must be a comma list among rouge, bleu; got {self.metrics!r}")

    @property
    def metric_names(self) -> list[str]:
        return [name.strip() for name in self.metrics.split(",") if name.strip()]


def main(args: list[str] | None = None) -> dict:
    """Run the script with command-line `args` (default `sys.argv[1:]`); returns the train and eval metrics."""
    model_args, data_args, training_args, raw, do_train, do_eval = training.start_run(
        (training.ModelArguments, Seq2SeqDataArguments, Seq2SeqTrainingArguments),
        args,
        defaults={"predict_with_generate": True},  # generation is the point of evaluating a summarizer
    )
    if training_args.generation_max_length is None:
        training_args.generation_max_length = data_args.max_target_length
    training.check_columns(
        raw, {"--source_column": data_args.source_column, "--target_column": data_args.target_column}
    )

    tokenizer = training.load_tokenizer(model_args)
    model = training.load_model(model_args, "seq2seq")
    with training_args.main_process_first(desc="tokenisation"):
        tokenized = training.tokenize_seq2seq(
            raw,
            tokenizer,
            data_args.source_column,
            data_args.target_column,
            max_source_length=data_args.max_seq_length,
            max_target_length=data_args.max_target_length,
            source_prefix=data_args.source_prefix,
            num_proc=data_args.preprocessing_num_workers,
        )

    trainer = Seq2SeqTrainer(
        model=model,
        args=training_args,
        train_dataset=tokenized["train"] if do_train else None,
        eval_dataset=tokenized.get("validation") if do_eval else None,
        processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100),
        compute_metrics=(
            training.seq2seq_metrics(tokenizer, data_args.metric_names)
            if training_args.predict_with_generate
            else None
        ),
    )
    return training.train_evaluate_save(trainer, model_args, do_train, do_eval)


if __name__ == "__main__":
    run_script(main)
