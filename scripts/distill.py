#!/usr/bin/env python
"""Distil a dense teacher into a sparse (or any same-shape) ptmoe student on unlabeled text, with the Trainer.

Loss: layer-wise hidden-state MSE + output KL (or last-hidden MSE); see `ptmoe.compress.distillation`. Examples:

    python scripts/distill.py --student_name_or_path my-sparse-bert --teacher_name_or_path my-dense-bert \\
        --train_file corpus.txt --max_steps 500 --output_dir out/distilled
    python scripts/distill.py --student_name_or_path my-sparse-bert --teacher_name_or_path my-dense-bert \\
        --train_file corpus.txt --tuning lora --lora_r 8 --max_steps 500 --output_dir out/distilled-lora
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import (
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    TrainingArguments,
)

import ptmoe
from ptmoe import training
from ptmoe.calibration import TokenizedTexts, load_texts
from ptmoe.compress.distillation import check_teacher, distillation_trainer
from ptmoe.errors import run_script
from ptmoe.telemetry import add_router_telemetry, find_moe_blocks


@dataclass
class DistillationArguments:
    student_name_or_path: str = field(metadata={"help": "The ptmoe student (folder or Hub id)."})
    teacher_name_or_path: str = field(metadata={"help": "The dense teacher it was split from."})
    train_file: str = field(
        metadata={"help": "Unlabeled text: .txt (one text per line) or .jsonl (--text_column)."}
    )
    text_column: str = field(default="text", metadata={"help": "Column of a .jsonl train file."})
    head: str = field(default="masked-lm", metadata={"help": "masked-lm | seq2seq-lm | base"})
    tuning: str = field(default="full", metadata={"help": "full | lora (LoRA on every expert)"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (--tuning lora)."})
    max_seq_length: int = field(default=128)
    hidden_weight: float = field(default=1.0, metadata={"help": "Weight of the layer-wise hidden-state MSE."})
    output_weight: float = field(default=1.0, metadata={"help": "Weight of the output KL / last-hidden MSE."})
    temperature: float = field(default=2.0, metadata={"help": "Softmax temperature of the output KL."})

    def __post_init__(self):
        if self.tuning not in ("full", "lora"):
            raise ValueError(f"--tuning must be 'full' or 'lora', got {self.tuning!r}")
        if self.head not in ("masked-lm", "seq2seq-lm", "base"):
            raise ValueError(f"--head must be masked-lm, seq2seq-lm or base, got {self.head!r}")


AUTO_CLASSES = {"masked-lm": AutoModelForMaskedLM, "seq2seq-lm": AutoModelForSeq2SeqLM, "base": AutoModel}


def main(args: list[str] | None = None) -> dict:
    """Run the script with command-line `args` (default `sys.argv[1:]`); returns the train metrics."""
    distill_args, training_args = training.parse_arguments((DistillationArguments, TrainingArguments), args)
    texts = load_texts(distill_args.train_file, distill_args.text_column, what="--train_file")
    auto = AUTO_CLASSES[distill_args.head]
    student = auto.from_pretrained(distill_args.student_name_or_path)
    teacher = auto.from_pretrained(distill_args.teacher_name_or_path)
    check_teacher(student, teacher)
    tokenizer = AutoTokenizer.from_pretrained(distill_args.student_name_or_path)
    if distill_args.tuning == "lora":
        from peft import get_peft_model

        student = get_peft_model(student, ptmoe.expert_lora_config(student, r=distill_args.lora_r))
    training_args.remove_unused_columns = False
    trainer = distillation_trainer(
        student,
        teacher,
        TokenizedTexts(texts, tokenizer, distill_args.max_seq_length),
        tokenizer,
        training_args,
        distill_args.hidden_weight,
        distill_args.output_weight,
        distill_args.temperature,
    )
    # Router telemetry of the student (and with --report_to mlflow its MoE parameters and expert-load PNGs).
    if find_moe_blocks(trainer.model):
        add_router_telemetry(trainer)
    result = trainer.train()
    trainer.save_model()
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(training_args.output_dir)
    return result.metrics


if __name__ == "__main__":
    run_script(main)
