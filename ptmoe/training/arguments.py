"""The arguments the Trainer scripts share: `ModelArguments` (which model, how to tune it) and `DataArguments`
(which data; each script subclasses it with its own columns), `parse_arguments` (flags or one `.json` file, checked
before any work starts) and `parse_expert_list` (`--lora_experts`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..models.moe import check_local_checkpoint
from ..upcycling import UPCYCLING_METHODS

TUNING_CHOICES = ("full", "lora", "qlora")


@dataclass
class ModelArguments:
    """Which model to start from and how to tune it."""

    model_name_or_path: str = field(
        metadata={
            "help": "A ptmoe checkpoint (folder or Hub id), or a dense BERT/T5 one with --upcycle_experts."
        }
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer folder or Hub id (default: --model_name_or_path)."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where Hub downloads are cached."})
    upcycle_experts: int | None = field(
        default=None,
        metadata={"help": "Upcycle a dense checkpoint on the fly into a MoE model with this many experts."},
    )
    upcycle_experts_per_tok: int = field(
        default=2, metadata={"help": "Experts per token (k) of the upcycled model."}
    )
    upcycle_method: str | None = field(
        default=None,
        metadata={
            "help": "`ptmoe.upcycle` initialisation of the experts (default: its own, 'copy').",
            "choices": list(UPCYCLING_METHODS),
        },
    )
    tuning: str = field(
        default="full",
        metadata={
            "help": "full: every weight; lora: LoRA per expert (PEFT); qlora: LoRA on a 4-bit model.",
            "choices": list(TUNING_CHOICES),
        },
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (scaling = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_experts: str = field(
        default="all",
        metadata={
            "help": "Experts that get LoRA adapters in every MoE layer: 'all' or a comma list like '0,3'."
        },
    )
    merge_lora: bool = field(
        default=False,
        metadata={"help": "With --tuning lora, also save the merged full model to <output_dir>/merged."},
    )
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={"help": "Start a new task head when the checkpoint's head has another label set."},
    )
    router_telemetry: bool = field(
        default=True, metadata={"help": "Log router statistics per MoE layer and plot expert load."}
    )
    expert_dropout: float | None = field(
        default=None,
        metadata={
            "help": "Dropout inside the experts only (Switch Transformer fine-tuning uses 0.4 there, 0.1 elsewhere); "
            "default: the checkpoint's `expert_dropout`."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Train into a non-empty --output_dir, replacing the files the run writes (default: refuse it; "
            "--resume_from_checkpoint also allows it)."
        },
    )
    energy_country_iso_code: str | None = field(
        default=None,
        metadata={
            "help": "With --report_to codecarbon: ISO 3166-1 alpha-3 code of the country whose grid powers this "
            "machine (e.g. BRA); energy and CO2e are computed offline from it (ptmoe.energy)."
        },
    )
    energy_region: str | None = field(
        default=None,
        metadata={"help": "With --report_to codecarbon: a region codecarbon knows (e.g. a US state)."},
    )

    def __post_init__(self):
        # A missing local folder is named as such now, not as an invalid Hub id after the data was loaded.
        check_local_checkpoint(self.model_name_or_path, "--model_name_or_path")
        if self.tokenizer_name is not None:
            check_local_checkpoint(self.tokenizer_name, "--tokenizer_name")
        if self.tuning not in TUNING_CHOICES:
            raise ValueError(f"--tuning must be one of {TUNING_CHOICES}, got {self.tuning!r}")
        parse_expert_list(self.lora_experts)  # fail at parse time, not after loading the model
        if self.upcycle_experts is not None and self.upcycle_experts < 2:
            raise ValueError(f"--upcycle_experts must be >= 2, got {self.upcycle_experts}")
        if self.lora_r < 1:
            raise ValueError(f"--lora_r must be >= 1, got {self.lora_r}")
        if self.expert_dropout is not None and not 0 <= self.expert_dropout < 1:
            raise ValueError(f"--expert_dropout must be in [0, 1), got {self.expert_dropout}")


@dataclass
class DataArguments:
    """Where the data comes from (a Hub dataset or local files) and how much of it to use."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub dataset id (e.g. assin2) or a folder saved with `Dataset.save_to_disk`."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    train_file: str | None = field(
        default=None, metadata={"help": "Local training file (.json/.jsonl/.csv)."}
    )
    validation_file: str | None = field(default=None, metadata={"help": "Local validation file."})
    validation_split_percentage: int = field(
        default=10,
        metadata={"help": "Percent of train held out for evaluation when the data has no validation split."},
    )
    max_seq_length: int = field(default=128, metadata={"help": "Maximum tokens per input sequence."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation set."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for `map`."})

    def __post_init__(self):
        if not 0 <= self.validation_split_percentage < 100:
            raise ValueError(
                f"--validation_split_percentage must be in [0, 100), got {self.validation_split_percentage}"
            )
        if self.max_seq_length < 4:
            raise ValueError(f"--max_seq_length must be >= 4, got {self.max_seq_length}")


def parse_arguments(
    dataclass_types: Sequence[type],
    args: Sequence[str] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> tuple:
    """Parse command-line arguments (or one `.json` file of them) into the given dataclasses.

    Args:
        dataclass_types (`Sequence[type]`): e.g. `(ModelArguments, MyDataArguments, TrainingArguments)`.
        args (`Sequence[str]`, *optional*): the arguments (default: `sys.argv[1:]`).
        defaults (`Mapping[str, Any]`, *optional*): script-specific defaults overriding the dataclasses' own
            (e.g. `{"predict_with_generate": True}`); explicit arguments still win.
    """
    from transformers import HfArgumentParser

    parser = HfArgumentParser(dataclass_types)
    args = list(sys.argv[1:] if args is None else args)
    if len(args) == 1 and args[0].endswith(".json"):
        values = json.loads(Path(args[0]).read_text(encoding="utf-8"))
        return parser.parse_dict({**(defaults or {}), **values})
    if defaults:
        parser.set_defaults(**defaults)
    return parser.parse_args_into_dataclasses(args=args)


def parse_expert_list(spec: str) -> str | list[int]:
    """``"all"`` → ``"all"``; ``"0,3"`` → ``[0, 3]`` (the `experts` argument of `ptmoe.expert_lora_config`)."""
    if spec.strip() == "all":
        return "all"
    try:
        experts = sorted({int(part) for part in spec.split(",") if part.strip()})
    except ValueError:
        raise ValueError(
            f"--lora_experts must be 'all' or comma-separated expert ids like '0,3', got {spec!r}"
        ) from None
    if not experts or experts[0] < 0:
        raise ValueError(f"--lora_experts must be 'all' or non-negative expert ids like '0,3', got {spec!r}")
    return experts
