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
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .models.moe import check_local_checkpoint
from .upcycling import UPCYCLING_METHODS

logger = logging.getLogger(__name__)

TUNING_CHOICES = ("full", "lora", "qlora")
# Extensions of local data files → the `datasets` builder that reads them.
DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".txt": "text"}
TASKS = ("masked-lm", "span-corruption", "sequence-classification", "token-classification", "seq2seq")
_MOE_MODEL_TYPES = ("moe_bert", "moe_t5")


# --------------------------------------------------------------------------------------------------------------
# Arguments shared by the scripts (each script adds its own data columns by subclassing `DataArguments`)
# --------------------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------------------
# Loading data
# --------------------------------------------------------------------------------------------------------------
def _data_builder(path: str, flag: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in DATA_FILE_BUILDERS:
        raise ValueError(
            f"{flag} {path!r} has extension {suffix!r}; use one of {sorted(DATA_FILE_BUILDERS)} "
            "(.json/.jsonl: one JSON object per line or a JSON list; .csv with a header row; .txt: one text per line)."
        )
    if not Path(path).is_file():
        raise ValueError(f"{flag} {path!r} does not exist or is not a file.")
    return DATA_FILE_BUILDERS[suffix]


def _is_saved_dataset(path: str) -> bool:
    folder = Path(path)
    return folder.is_dir() and ((folder / "dataset_dict.json").exists() or (folder / "state.json").exists())


def load_raw_datasets(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_file: str | None = None,
    validation_file: str | None = None,
    validation_split_percentage: int = 0,
    seed: int = 42,
    cache_dir: str | None = None,
):
    """Load `train` (and `validation`) splits from a Hub dataset, a `save_to_disk` folder or local files.

    Args:
        dataset_name (`str`, *optional*): Hub dataset id or a folder written by `save_to_disk`.
        dataset_config_name (`str`, *optional*): Hub configuration name.
        train_file / validation_file (`str`, *optional*): local `.json`, `.jsonl`, `.csv` or `.txt` files (the
            same format for both).
        validation_split_percentage (`int`, defaults to 0): when there is no validation split, hold out this
            percent of `train` as `validation` (0: no validation split).
        seed (`int`, defaults to 42): seed of that split.
        cache_dir (`str`, *optional*): `datasets` cache folder.

    Returns:
        `datasets.DatasetDict` with `train` and, when available, `validation`.

    Raises:
        `ValueError`: no source or two sources given, a missing file or unsupported extension, no `train`
            split, or a Hub dataset that cannot be reached (e.g. offline and not cached).
        `FileNotFoundError`: `dataset_name` is a local folder that does not exist.
    """
    import datasets

    if (dataset_name is None) == (train_file is None):
        raise ValueError(
            "Give exactly one data source: --dataset_name (a Hub dataset such as assin2, or a save_to_disk "
            "folder) or --train_file (a local .json/.jsonl/.csv file, with --validation_file for evaluation)."
        )
    if validation_file is not None and train_file is None:
        raise ValueError(
            "--validation_file needs --train_file (with --dataset_name the splits come from the Hub)."
        )

    if dataset_name is not None:
        check_local_checkpoint(
            dataset_name, "--dataset_name"
        )  # a missing save_to_disk folder is not a Hub id
    if train_file is not None:
        builder = _data_builder(train_file, "--train_file")
        data_files = {"train": train_file}
        if validation_file is not None:
            if _data_builder(validation_file, "--validation_file") != builder:
                raise ValueError(
                    f"--train_file {train_file!r} and --validation_file {validation_file!r} must have the same "
                    "format (both .json/.jsonl, both .csv or both .txt)."
                )
            data_files["validation"] = validation_file
        try:
            raw = datasets.load_dataset(builder, data_files=data_files, cache_dir=cache_dir)
        except (datasets.exceptions.DatasetGenerationError, ValueError, OSError) as error:
            cause = error.__cause__ or error
            raise ValueError(
                f"Could not read {sorted(data_files.values())} as {builder}: {type(cause).__name__}: {cause}. "
                "Check that every row has the same fields (JSON lines) or columns (CSV)."
            ) from None
        source = train_file
    elif _is_saved_dataset(dataset_name):
        raw = datasets.load_from_disk(dataset_name)
        source = dataset_name
    else:
        try:
            raw = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir)
        except Exception as error:  # datasets raises many types (ConnectionError, FileNotFoundError, …)
            offline = any(
                os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")
                for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
            )
            hint = (
                "Offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) and the dataset is not in the local "
                "cache: run once with network access to cache it, "
                if offline
                else "Check the dataset id (and --dataset_config_name) and your network, "
            )
            raise ValueError(
                f"Could not load --dataset_name {dataset_name!r}"
                f"{f' (config {dataset_config_name!r})' if dataset_config_name else ''}: "
                f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}. {hint}"
                "or pass local files with --train_file/--validation_file (.json/.jsonl/.csv)."
            ) from None
        source = dataset_name

    if isinstance(raw, datasets.Dataset):
        raw = datasets.DatasetDict({"train": raw})
    if "train" not in raw:
        raise ValueError(f"{source!r} has no 'train' split (splits: {sorted(raw)}).")
    if "validation" not in raw and validation_split_percentage > 0:
        split = raw["train"].train_test_split(test_size=validation_split_percentage / 100, seed=seed)
        raw = datasets.DatasetDict({**raw, "train": split["train"], "validation": split["test"]})
    return datasets.DatasetDict({name: raw[name] for name in ("train", "validation") if name in raw})


def start_run(
    argument_types: tuple, args: list[str] | None = None, defaults: Mapping[str, Any] | None = None
):
    """The start every script shares: parse arguments, set up logging and the seed, load and trim the data.

    Args:
        argument_types (`tuple`): `(ModelArguments, <script's DataArguments>, <TrainingArguments class>)`.
        args (`list[str]`, *optional*): command-line arguments (default `sys.argv[1:]`), or one `.json` file.
        defaults (`dict`, *optional*): defaults that differ from the argument classes' own.

    Returns:
        `(model_args, data_args, training_args, raw_datasets, do_train, do_eval)`.
    """
    from transformers import set_seed

    model_args, data_args, training_args = parse_arguments(argument_types, args, defaults=defaults)
    if "codecarbon" in (training_args.report_to or []):  # offline energy accounting: fail before any work
        from .energy import check_codecarbon

        check_codecarbon(model_args.energy_country_iso_code, model_args.energy_region)
    setup_logging(training_args)
    set_seed(training_args.seed)
    do_train, do_eval = resolve_do_train_eval(training_args)
    if do_train:
        check_training_output_dir(training_args, model_args.overwrite_output_dir)
    raw = load_raw_datasets(
        data_args.dataset_name,
        data_args.dataset_config_name,
        data_args.train_file,
        data_args.validation_file,
        validation_split_percentage=data_args.validation_split_percentage,
        seed=training_args.seed,
        cache_dir=model_args.cache_dir,
    )
    raw = limit_samples(raw, data_args.max_train_samples, data_args.max_eval_samples)
    return model_args, data_args, training_args, raw, do_train, do_eval


def check_training_output_dir(training_args, overwrite: bool = False) -> None:
    """Refuse to train into a non-empty `--output_dir` (the model files there would be replaced) before any work.

    Allowed with `overwrite` (`--overwrite_output_dir`) or `--resume_from_checkpoint` (which reads from it).

    Raises:
        `FileExistsError` naming the folder and the two ways out.
    """
    out = Path(training_args.output_dir)
    if overwrite or training_args.resume_from_checkpoint:
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(
            f"--output_dir {str(out)!r} exists and is not empty: training would replace the files in it. Pass "
            "another --output_dir, --overwrite_output_dir to replace them, or --resume_from_checkpoint to continue."
        )


def limit_samples(raw_datasets, max_train_samples: int | None = None, max_eval_samples: int | None = None):
    """Keep the first `max_train_samples` / `max_eval_samples` rows of `train` / `validation` (smoke runs)."""
    import datasets

    limits = {"train": max_train_samples, "validation": max_eval_samples}
    return datasets.DatasetDict(
        {
            name: split.select(range(min(len(split), limits[name])))
            if limits.get(name) is not None
            else split
            for name, split in raw_datasets.items()
        }
    )


def check_columns(raw_datasets, columns: Mapping[str, str | None]) -> None:
    """Check that every split has the named columns before any processing.

    Args:
        raw_datasets (`datasets.DatasetDict`): the loaded splits.
        columns (`Mapping[str, str | None]`): command-line flag → column name, e.g.
            ``{"--text_column": "text", "--label_column": "label"}``; `None` values are skipped.

    Raises:
        `ValueError` naming the flag, the missing column and the columns that exist.
    """
    for split, dataset in raw_datasets.items():
        for flag, column in columns.items():
            if column is not None and column not in dataset.column_names:
                raise ValueError(
                    f"The {split} split has no column {column!r} (named by {flag}). Its columns are "
                    f"{dataset.column_names}: pass {flag} with one of them."
                )


# --------------------------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------------------------
@dataclass
class LabelMapping:
    """How the values of a dataset's label column become model label ids.

    Attributes:
        names (`list[str]`): label name of each id (empty for regression).
        value_to_id (`dict`): raw column value (a string, or an integer for integer/`ClassLabel` columns) → id.
        is_regression (`bool`): labels are floats and the model has one output.
        from_model (`bool`): the label set is the checkpoint's own (its task head is kept).
    """

    names: list[str]
    value_to_id: dict[Any, int]
    is_regression: bool = False
    from_model: bool = False

    @property
    def num_labels(self) -> int:
        return 1 if self.is_regression else len(self.names)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}

    def encode(self, value: Any) -> int | float:
        """The model label of one raw value (a float for regression)."""
        return float(value) if self.is_regression else self.value_to_id[value]

    def model_kwargs(self) -> dict[str, Any]:
        """`num_labels`, `id2label`, `label2id` (and `problem_type`) for `from_pretrained`."""
        if self.is_regression:
            return {"num_labels": 1, "problem_type": "regression"}
        kwargs: dict[str, Any] = {
            "num_labels": self.num_labels,
            "id2label": self.id2label,
            "label2id": self.label2id,
        }
        if not self.from_model:
            kwargs["problem_type"] = "single_label_classification"
        return kwargs


def model_label_names(model_name_or_path: str, head: str, cache_dir: str | None = None) -> list[str] | None:
    """The label names of a checkpoint that already has a task head of kind `head`, else `None`.

    A checkpoint saved from a `*ForSequenceClassification` (`head="sequence"`) or `*ForTokenClassification`
    (`head="token"`) model keeps its head when fine-tuned again, so the data must use its label set. Any other
    checkpoint (pre-trained MLM, dense, another task) gets a new head sized from the data.

    Args:
        model_name_or_path (`str`): checkpoint folder or Hub id.
        head (`str`): `"sequence"` or `"token"`.
        cache_dir (`str`, *optional*): Hub cache folder.
    """
    from transformers import AutoConfig

    suffix = {"sequence": "ForSequenceClassification", "token": "ForTokenClassification"}[head]
    try:
        config = AutoConfig.from_pretrained(model_name_or_path, cache_dir=cache_dir)
    except (OSError, ValueError):
        return None  # `load_model` reports unloadable checkpoints with a full message
    if not any(name.endswith(suffix) for name in (config.architectures or [])):
        return None
    return [config.id2label[i] for i in range(config.num_labels)]


def _column_values(raw_datasets, column: str, flatten: bool = False) -> dict[str, list]:
    """Distinct values of `column` per split (flattening one list level for token labels)."""
    values = {}
    for split, dataset in raw_datasets.items():
        if flatten:
            seen: dict[Any, None] = {}
            for row in dataset[column]:
                for value in row or []:
                    seen.setdefault(value)
            values[split] = list(seen)
        else:
            try:
                values[split] = dataset.unique(column)
            except TypeError:
                raise ValueError(
                    f"--label_column {column!r} holds lists: sequence labels need finetune_ner.py, not a "
                    "sentence-level task."
                ) from None
    return values


def _match_model_labels(values: Iterable[Any], model_labels: list[str], where: str) -> dict[Any, int]:
    """Map raw values onto a checkpoint's label set: names match names; integers are ids of that set."""
    label2id = {name: i for i, name in enumerate(model_labels)}
    value_to_id, outside = {}, []
    for value in dict.fromkeys(values):  # distinct values, first-seen order
        if isinstance(value, str) and value in label2id:
            value_to_id[value] = label2id[value]
        elif (
            isinstance(value, (int, np.integer))
            and not isinstance(value, bool)
            and 0 <= value < len(model_labels)
        ):
            value_to_id[value] = int(value)
        else:
            outside.append(value)
    if outside:
        raise ValueError(
            f"Labels {sorted(map(str, outside))[:10]} in {where} are outside the model's label set "
            f"{model_labels} (its task head). Fix the data or --label_column, or pass --ignore_mismatched_sizes "
            "to train a new head sized for the dataset's labels."
        )
    return value_to_id


def build_label_mapping(
    raw_datasets,
    label_column: str,
    task_type: str = "classification",
    model_labels: list[str] | None = None,
) -> LabelMapping:
    """Label ids of a sentence-level task, validated on every split.

    Label names come from, in order: the checkpoint's head (`model_labels`), a `ClassLabel` feature, or the sorted
    distinct values of the training split. Integer labels without names are used as they are when they are
    0..n-1, else numbered in sorted order.

    Args:
        raw_datasets (`datasets.DatasetDict`): splits holding `label_column`.
        label_column (`str`): the label column.
        task_type (`str`, defaults to `"classification"`): `"classification"` or `"regression"` (float labels, one
            output).
        model_labels (`list[str]`, *optional*): the label set of a checkpoint whose head is kept
            (`model_label_names`).

    Raises:
        `ValueError`: missing labels, float labels for classification, non-numeric labels for regression, labels
        outside the model's label set, or validation labels never seen in training.
    """
    from datasets import ClassLabel

    if task_type not in ("classification", "regression"):
        raise ValueError(f"--task_type must be 'classification' or 'regression', got {task_type!r}")
    values = _column_values(raw_datasets, label_column)
    for split, split_values in values.items():
        if any(v is None for v in split_values):
            raise ValueError(
                f"The {split} split has rows without a value in --label_column {label_column!r}."
            )

    if task_type == "regression":
        if model_labels is not None and len(model_labels) != 1:
            raise ValueError(
                f"The checkpoint's head predicts {len(model_labels)} classes but --task_type regression needs one "
                "output: pass --ignore_mismatched_sizes to train a new regression head."
            )
        for split, split_values in values.items():
            bad = [v for v in split_values if isinstance(v, (str, bool)) or not isinstance(v, (int, float))]
            if bad:
                raise ValueError(
                    f"--task_type regression needs numeric labels, but --label_column {label_column!r} of the {split} "
                    f"split holds {bad[:5]}. Pick a numeric column or use --task_type classification."
                )
        return LabelMapping(names=[], value_to_id={}, is_regression=True)

    for split, split_values in values.items():
        floats = [v for v in split_values if isinstance(v, float)]
        if floats:
            raise ValueError(
                f"--label_column {label_column!r} of the {split} split holds non-integer numbers ({floats[:5]}): "
                "use --task_type regression for scores, or a column of class names/ids for classification."
            )

    all_values = [v for split_values in values.values() for v in split_values]
    if model_labels is not None:
        feature = raw_datasets["train"].features[label_column]
        if isinstance(feature, ClassLabel):  # compare by name: the dataset's ids may be ordered differently
            all_values = [feature.int2str(v) for v in all_values]
            value_to_id = _match_model_labels(all_values, model_labels, f"--label_column {label_column!r}")
            value_to_id = {feature.str2int(name): i for name, i in value_to_id.items()}
        else:
            value_to_id = _match_model_labels(all_values, model_labels, f"--label_column {label_column!r}")
        return LabelMapping(names=list(model_labels), value_to_id=value_to_id, from_model=True)

    feature = raw_datasets["train"].features[label_column]
    if isinstance(feature, ClassLabel):
        names = list(feature.names)
        value_to_id = {i: i for i in range(len(names))}
    else:
        train_values = values["train"]
        if any(isinstance(v, str) for v in train_values) and not all(
            isinstance(v, str) for v in train_values
        ):
            raise ValueError(
                f"--label_column {label_column!r} mixes strings and numbers: {train_values[:10]}"
            )
        ordered = sorted(train_values)
        if all(isinstance(v, str) for v in ordered):
            names = list(ordered)
        else:
            names = [str(v) for v in ordered]
            if ordered != list(range(len(ordered))):
                logger.info(
                    "Integer labels %s are renumbered 0..%d in sorted order", ordered, len(ordered) - 1
                )
        value_to_id = {value: i for i, value in enumerate(ordered)}
    for split, split_values in values.items():
        unseen = [v for v in split_values if v not in value_to_id]
        if unseen:
            raise ValueError(
                f"Labels {sorted(map(str, unseen))[:10]} of the {split} split are not in the training labels "
                f"{names}: the model could never predict them. Fix the data or --label_column."
            )
    if len(names) < 2:
        raise ValueError(
            f"--label_column {label_column!r} has a single class {names} in the training split: classification "
            "needs at least two (use --task_type regression for scores)."
        )
    return LabelMapping(names=names, value_to_id=value_to_id)


_TAG_PATTERN = re.compile(r"^(O|[BIES]-.+)$")


def _tag_order(tag: str) -> tuple:
    return (tag != "O", tag[2:], tag[:1])  # "O" first, then grouped by entity type with B before I


def build_ner_label_mapping(
    raw_datasets,
    tokens_column: str,
    tags_column: str,
    label_names: list[str] | None = None,
    model_labels: list[str] | None = None,
) -> LabelMapping:
    """Tag ids of a token-classification task with BIO tags, validated on every split.

    Tag names come from, in order: the checkpoint's head (`model_labels`), an explicit list (`label_names`, e.g.
    `ner_labels.json`), a `Sequence(ClassLabel)` feature, or the distinct tags of the training split.

    Args:
        raw_datasets (`datasets.DatasetDict`): splits with a words column and a tags column (lists of equal
            length per row).
        tokens_column (`str`) / tags_column (`str`): the two columns.
        label_names (`list[str]`, *optional*): the complete tag set.
        model_labels (`list[str]`, *optional*): the label set of a checkpoint whose head is kept.

    Raises:
        `ValueError`: rows whose word and tag lists differ in length, tags that are not BIO/BIOES strings
        (``O``, ``B-X``, ``I-X``), or tags outside the tag set.
    """
    from datasets import ClassLabel

    for split, dataset in raw_datasets.items():
        for row, (words, tags) in enumerate(zip(dataset[tokens_column], dataset[tags_column], strict=True)):
            if not isinstance(words, list) or not isinstance(tags, list):
                raise ValueError(
                    f"Row {row} of the {split} split: --tokens_column {tokens_column!r} and --tags_column "
                    f"{tags_column!r} must hold lists (words and one tag per word), got "
                    f"{type(words).__name__} and {type(tags).__name__}."
                )
            if len(words) != len(tags):
                raise ValueError(
                    f"Row {row} of the {split} split has {len(words)} words but {len(tags)} tags: every word "
                    "needs exactly one tag."
                )

    feature = raw_datasets["train"].features[tags_column]
    inner = getattr(feature, "feature", None)  # `List` / `Sequence` features of datasets
    if inner is None and isinstance(feature, list) and feature:
        inner = feature[0]  # the `[ClassLabel(...)]` shorthand
    class_label = inner if isinstance(inner, ClassLabel) else None

    values = _column_values(raw_datasets, tags_column, flatten=True)
    if class_label is not None:
        values = {
            split: [class_label.int2str(v) for v in split_values] for split, split_values in values.items()
        }
    all_tags = sorted({tag for split_values in values.values() for tag in split_values}, key=str)
    bad = [tag for tag in all_tags if not isinstance(tag, str) or not _TAG_PATTERN.match(tag)]
    if bad:
        raise ValueError(
            f"--tags_column {tags_column!r} holds {bad[:10]}, which are not BIO tags: use 'O' for words outside "
            "entities and 'B-TYPE' / 'I-TYPE' for the first / following words of an entity."
        )

    if model_labels is not None:
        names, source = list(model_labels), "the model's label set (its task head)"
    elif label_names is not None:
        names, source = list(label_names), "--label_names_file"
    elif class_label is not None:
        names, source = list(class_label.names), f"the {tags_column!r} ClassLabel feature"
    else:
        names, source = sorted(set(values["train"]), key=_tag_order), "the training tags"
    outside = [tag for tag in all_tags if tag not in names]
    if outside:
        fix = (
            "Fix the data, or pass --ignore_mismatched_sizes to train a new head"
            if model_labels is not None
            else "Fix the data or the tag list"
        )
        raise ValueError(f"Tags {outside[:10]} are outside {source} {names}. {fix}.")
    label2id = {name: i for i, name in enumerate(names)}
    if class_label is not None:
        value_to_id = {i: label2id[name] for i, name in enumerate(class_label.names) if name in label2id}
    else:
        value_to_id = dict(label2id)
    return LabelMapping(names=names, value_to_id=value_to_id, from_model=model_labels is not None)


def read_label_names(path: str) -> list[str]:
    """A tag list from a JSON file: a list of names, or a `{name: id}` / `{id: name}` mapping."""
    try:
        content = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"--label_names_file {path!r} is not a readable JSON file: {error}") from None
    if isinstance(content, list) and all(isinstance(name, str) for name in content):
        return content
    if isinstance(content, dict):
        if all(isinstance(v, int) for v in content.values()):
            return [name for name, _ in sorted(content.items(), key=lambda item: item[1])]
        return [content[key] for key in sorted(content, key=int)]
    raise ValueError(
        f"--label_names_file {path!r} must hold a JSON list of tag names or a name ↔ id mapping."
    )


# --------------------------------------------------------------------------------------------------------------
# Tokenisation
# --------------------------------------------------------------------------------------------------------------
def _require_text(values: Sequence[Any], flag: str, column: str) -> None:
    for value in values:
        if not isinstance(value, str):
            raise ValueError(
                f"{flag} {column!r} must hold text, but a row holds {value!r} ({type(value).__name__})."
            )


def tokenize_classification(
    raw_datasets,
    tokenizer,
    text_column: str,
    label_column: str,
    label_mapping: LabelMapping,
    text_pair_column: str | None = None,
    max_seq_length: int = 128,
    num_proc: int | None = None,
    domain_column: str | None = None,
    domain_ids: Mapping[str, int] | None = None,
):
    """Tokenise single sentences or sentence pairs and encode labels into a `labels` column.

    With a `domain_column`, also a `domain_labels` column of domain ids (`domain_ids[value]`; see
    `ptmoe.domains.setup_domains`).

    Args:
        raw_datasets (`datasets.DatasetDict`), tokenizer (`PreTrainedTokenizerBase`)
        text_column (`str`), text_pair_column (`str`, *optional*): the sentence (pair) columns.
        label_column (`str`), label_mapping (`LabelMapping`): labels to encode.
        max_seq_length (`int`, defaults to 128): truncation length (pairs: longest-first).
        num_proc (`int`, *optional*): `map` processes.

    Returns:
        `datasets.DatasetDict` with the tokenizer outputs and `labels` only (pad with `DataCollatorWithPadding`).
    """

    def encode(batch):
        _require_text(batch[text_column], "--text_column", text_column)
        pair = None
        if text_pair_column is not None:
            pair = batch[text_pair_column]
            _require_text(pair, "--text_pair_column", text_pair_column)
        encoded = tokenizer(batch[text_column], pair, truncation=True, max_length=max_seq_length)
        encoded["labels"] = [label_mapping.encode(value) for value in batch[label_column]]
        if domain_column is not None:
            encoded["domain_labels"] = [domain_ids[value] for value in batch[domain_column]]
        return encoded

    return raw_datasets.map(
        encode,
        batched=True,
        num_proc=num_proc,
        remove_columns=raw_datasets["train"].column_names,
        desc="Tokenising sentences",
    )


def tokenize_and_align_labels(
    raw_datasets,
    tokenizer,
    tokens_column: str,
    tags_column: str,
    label_mapping: LabelMapping,
    max_seq_length: int = 128,
    num_proc: int | None = None,
):
    """Tokenise pre-split words and align word-level tags to sub-word tokens.

    The first sub-word of each word gets the word's tag id; later sub-words and special tokens get -100, so the
    loss and the entity-level metric see exactly one prediction per (non-truncated) word.

    Args:
        raw_datasets (`datasets.DatasetDict`), tokenizer (a *fast* tokenizer: alignment uses `word_ids()`)
        tokens_column (`str`) / tags_column (`str`): the word list and tag list columns.
        label_mapping (`LabelMapping`): from `build_ner_label_mapping`.
        max_seq_length (`int`, defaults to 128), num_proc (`int`, *optional*)
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"Aligning word labels to sub-words needs a fast tokenizer (`word_ids()`); {type(tokenizer).__name__} "
            "is not one. Pass --tokenizer_name with a tokenizer.json folder."
        )

    def encode(batch):
        encoded = tokenizer(
            batch[tokens_column], is_split_into_words=True, truncation=True, max_length=max_seq_length
        )
        all_labels = []
        for row, tags in enumerate(batch[tags_column]):
            labels, previous_word = [], None
            for word in encoded.word_ids(batch_index=row):
                if word is None or word == previous_word:
                    labels.append(-100)
                else:
                    labels.append(label_mapping.value_to_id[tags[word]])
                previous_word = word
            all_labels.append(labels)
        encoded["labels"] = all_labels
        return encoded

    return raw_datasets.map(
        encode,
        batched=True,
        num_proc=num_proc,
        remove_columns=raw_datasets["train"].column_names,
        desc="Tokenising and aligning tags",
    )


def _concatenate_and_chunk(batch: Mapping[str, list], chunk_length: int) -> dict[str, list]:
    """Concatenate every column over the batch and cut it into chunks of `chunk_length` (the tail is dropped)."""
    concatenated = {key: [item for row in values for item in row] for key, values in batch.items()}
    total = (len(next(iter(concatenated.values()))) // chunk_length) * chunk_length
    return {
        key: [values[i : i + chunk_length] for i in range(0, total, chunk_length)]
        for key, values in concatenated.items()
    }


def _encode_by_domain(
    batch: Mapping[str, list], text_column: str, domain_column: str | None, domain_ids, encode: Callable
) -> dict[str, list]:
    """`encode(texts)` over the batch's texts; with a `domain_column`, once per domain (so that packed blocks never
    mix domains) with a `domain_labels` column of domain ids (`domain_ids`: domain value → id)."""
    if domain_column is None:
        return encode([text for text in batch[text_column] if isinstance(text, str) and text.strip()])
    groups: dict[Any, list[str]] = {}
    for text, domain in zip(batch[text_column], batch[domain_column], strict=True):
        if isinstance(text, str) and text.strip():
            groups.setdefault(domain, []).append(text)
    merged: dict[str, list] = {}
    for domain, texts in groups.items():
        rows = encode(texts)
        for key, values in rows.items():
            merged.setdefault(key, []).extend(values)
        count = len(next(iter(rows.values()), []))
        merged.setdefault("domain_labels", []).extend([domain_ids[domain]] * count)
    return merged


def tokenize_for_mlm(
    raw_datasets,
    tokenizer,
    text_column: str = "text",
    max_seq_length: int = 128,
    line_by_line: bool = False,
    num_proc: int | None = None,
    domain_column: str | None = None,
    domain_ids: Mapping[str, int] | None = None,
):
    """Token sequences for BERT masked-LM (`DataCollatorForLanguageModeling` then masks 15%).

    By default texts are tokenised with their special tokens, concatenated and cut into blocks of
    `max_seq_length` (no padding is wasted); `line_by_line=True` keeps one (truncated) text per example. With a
    `domain_column`, texts are packed per domain and every example gets `domain_labels` (`domain_ids[value]`; see
    `ptmoe.domains.setup_domains`).
    """

    def encode(batch):
        return _encode_by_domain(batch, text_column, domain_column, domain_ids, encode_texts)

    def encode_texts(texts):
        if line_by_line:
            return tokenizer(
                texts, truncation=True, max_length=max_seq_length, return_special_tokens_mask=True
            )
        return _concatenate_and_chunk(dict(tokenizer(texts, return_special_tokens_mask=True)), max_seq_length)

    tokenized = raw_datasets.map(
        encode,
        batched=True,
        num_proc=num_proc,
        remove_columns=raw_datasets["train"].column_names,
        desc="Tokenising for masked-LM",
    )
    _require_examples(tokenized, max_seq_length)
    return tokenized


def _require_examples(tokenized, length: int) -> None:
    for split, dataset in tokenized.items():
        if len(dataset) == 0:
            raise ValueError(
                f"The {split} split yields no training example of {length} tokens: the texts are too short in "
                "total. Lower --max_seq_length or add text."
            )


# --------------------------------------------------------------------------------------------------------------
# T5 span corruption
# --------------------------------------------------------------------------------------------------------------
def _span_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """`(noise tokens, noise spans)` of a sequence of `length` tokens (T5's rounding)."""
    num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    num_spans = max(int(round(num_noise / mean_noise_span_length)), 1)
    num_spans = min(num_spans, num_noise, length - num_noise)  # every span and every gap has >= 1 token
    return num_noise, num_spans


def t5_span_corruption_lengths(
    inputs_length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0
) -> tuple[int, int]:
    """How many raw tokens to corrupt so that the corrupted input is exactly `inputs_length` tokens long.

    A raw sequence of ``n`` tokens becomes an input of ``n - noise + spans + 1`` tokens (each span collapses to
    one sentinel; EOS appended) and a target of ``noise + spans + 1`` tokens (T5, Raffel et al. 2020, §3.1.4).

    Args:
        inputs_length (`int`): wanted encoder input length (e.g. `--max_seq_length`).
        noise_density (`float`, defaults to 0.15), mean_noise_span_length (`float`, defaults to 3.0)

    Returns:
        `(raw_length, targets_length)`.
    """

    def corrupted_lengths(raw_length: int) -> tuple[int, int]:
        num_noise, num_spans = _span_counts(raw_length, noise_density, mean_noise_span_length)
        return raw_length - num_noise + num_spans + 1, num_noise + num_spans + 1

    if inputs_length < 3:
        raise ValueError(f"Span corruption needs an input length >= 3, got {inputs_length}")
    raw_length = inputs_length
    while corrupted_lengths(raw_length + 1)[0] <= inputs_length:
        raw_length += 1
    while corrupted_lengths(raw_length)[0] > inputs_length:
        raw_length -= 1
    return raw_length, corrupted_lengths(raw_length)[1]


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Split `num_items` into `num_segments` positive lengths, uniformly over all such compositions."""
    cuts = np.sort(rng.choice(np.arange(1, num_items), size=num_segments - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [num_items]]))


def random_spans_noise_mask(
    length: int, noise_density: float, mean_noise_span_length: float, rng: np.random.Generator
) -> np.ndarray:
    """T5's noise mask: about `noise_density · length` tokens in spans of mean length `mean_noise_span_length`.

    As in T5 the sequence alternates kept and noise spans, starting with a kept span, with span lengths drawn
    uniformly at random given their counts. Sequences shorter than 2 tokens get no noise.

    Returns:
        `np.ndarray` of `bool`, shape `(length,)`: True for noise tokens.
    """
    mask = np.zeros(length, dtype=bool)
    if length < 2:
        return mask
    num_noise, num_spans = _span_counts(length, noise_density, mean_noise_span_length)
    noise_lengths = _random_segmentation(num_noise, num_spans, rng)
    kept_lengths = _random_segmentation(length - num_noise, num_spans, rng)
    position = 0
    for kept, noise in zip(kept_lengths, noise_lengths, strict=True):
        position += kept
        mask[position : position + noise] = True
        position += noise
    return mask


def sentinel_token_ids(tokenizer, count: int = 100) -> list[int]:
    """Ids of `<extra_id_0>`, `<extra_id_1>`, … (at most `count`) in `tokenizer`; raises if it has none."""
    ids = []
    for i in range(count):
        token = f"<extra_id_{i}>"
        token_id = tokenizer.convert_tokens_to_ids(token)
        if (
            token_id is None
            or token_id == tokenizer.unk_token_id
            or tokenizer.convert_ids_to_tokens(token_id) != token
        ):
            break
        ids.append(token_id)
    if not ids:
        raise ValueError(
            f"{type(tokenizer).__name__} has no sentinel tokens <extra_id_0>, <extra_id_1>, …: span corruption "
            "replaces each noise span by one of them. Use a T5 tokenizer (extra_ids=100) or add them with "
            "`tokenizer.add_special_tokens({'additional_special_tokens': [...]})`."
        )
    return ids


def span_corrupt(
    token_ids: Sequence[int], noise_mask: np.ndarray, sentinel_ids: Sequence[int], eos_token_id: int | None
) -> tuple[list[int], list[int]]:
    """Apply a noise mask: noise spans become sentinels in the input; the target lists ``sentinel_i span_i``.

    Example (T5 paper): ``Thank you for inviting me`` with noise ``for inviting`` → input
    ``Thank you <extra_id_0> me </s>``, target ``<extra_id_0> for inviting </s>``.
    """
    inputs, targets = [], []
    span, previous_noise = -1, False
    for token, noise in zip(token_ids, noise_mask, strict=True):
        if noise and not previous_noise:
            span += 1
            if span >= len(sentinel_ids):
                raise ValueError(
                    f"A sequence needs more than the tokenizer's {len(sentinel_ids)} sentinel tokens: lower "
                    "--max_seq_length or --noise_density, or raise --mean_noise_span_length."
                )
            inputs.append(sentinel_ids[span])
            targets.append(sentinel_ids[span])
        (targets if noise else inputs).append(int(token))
        previous_noise = bool(noise)
    if eos_token_id is not None:
        inputs.append(eos_token_id)
        targets.append(eos_token_id)
    return inputs, targets


class DataCollatorForT5SpanCorruption:
    """T5 span-corruption batches (Raffel et al. 2020): noise spans are cut out of the input and become the target.

    Each example's `input_ids` (raw tokens without EOS, e.g. from `tokenize_for_span_corruption`) is masked with
    `random_spans_noise_mask`; every noise span is replaced in the input by a sentinel `<extra_id_N>` (N counting
    up from 0), and the target lists each sentinel followed by the tokens it hides; EOS ends both. Inputs are
    padded with the pad token (`attention_mask` marks them), targets with -100 (ignored by the loss); the model
    builds `decoder_input_ids` by shifting `labels` right.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): with `<extra_id_N>` sentinels, a pad token and an EOS token.
        noise_density (`float`, defaults to 0.15): share of tokens corrupted.
        mean_noise_span_length (`float`, defaults to 3.0): mean length of a corrupted span.
        seed (`int`, *optional*): seed of the collator's own random generator (reproducible masks); without it,
            masks follow NumPy's global seed (`transformers.set_seed` sets it).
        pad_to_multiple_of (`int`, *optional*): pad lengths to a multiple of this.
    """

    def __init__(
        self,
        tokenizer,
        noise_density: float = 0.15,
        mean_noise_span_length: float = 3.0,
        seed: int | None = None,
        pad_to_multiple_of: int | None = None,
    ):
        if not 0 < noise_density < 1:
            raise ValueError(f"--noise_density must be in (0, 1), got {noise_density}")
        if mean_noise_span_length < 1:
            raise ValueError(f"--mean_noise_span_length must be >= 1, got {mean_noise_span_length}")
        if tokenizer.pad_token_id is None:
            raise ValueError(
                f"{type(tokenizer).__name__} has no pad token: span corruption pads its batches."
            )
        self.tokenizer = tokenizer
        self.noise_density = noise_density
        self.mean_noise_span_length = mean_noise_span_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.sentinel_ids = sentinel_token_ids(tokenizer)
        self.rng = np.random.default_rng(seed) if seed is not None else None

    def _generator(self) -> np.random.Generator:
        # Without a seed, draw from NumPy's global state so `set_seed` makes runs (and each DDP rank) reproducible.
        return self.rng if self.rng is not None else np.random.default_rng(np.random.randint(0, 2**31 - 1))

    def _pad(self, sequences: list[list[int]], value: int) -> torch.Tensor:
        length = max(len(s) for s in sequences)
        if self.pad_to_multiple_of:
            length = math.ceil(length / self.pad_to_multiple_of) * self.pad_to_multiple_of
        return torch.tensor([s + [value] * (length - len(s)) for s in sequences], dtype=torch.long)

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        rng = self._generator()
        inputs, targets = [], []
        for example in examples:
            token_ids = list(example["input_ids"])
            if token_ids and token_ids[-1] == self.tokenizer.eos_token_id:
                token_ids = token_ids[:-1]  # the collator adds EOS after corruption
            mask = random_spans_noise_mask(
                len(token_ids), self.noise_density, self.mean_noise_span_length, rng
            )
            source, target = span_corrupt(token_ids, mask, self.sentinel_ids, self.tokenizer.eos_token_id)
            inputs.append(source)
            targets.append(target)
        input_ids = self._pad(inputs, self.tokenizer.pad_token_id)
        batch = {
            "input_ids": input_ids,
            "attention_mask": (self._pad([[1] * len(s) for s in inputs], 0)).long(),
            "labels": self._pad(targets, -100),
        }
        if "domain_labels" in examples[0]:  # per-text domain ids (`ptmoe.domains`): passed through
            batch["domain_labels"] = torch.tensor(
                [int(e["domain_labels"]) for e in examples], dtype=torch.long
            )
        return batch


def tokenize_for_span_corruption(
    raw_datasets,
    tokenizer,
    text_column: str = "text",
    max_seq_length: int = 128,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    num_proc: int | None = None,
    domain_column: str | None = None,
    domain_ids: Mapping[str, int] | None = None,
):
    """Raw token blocks sized so that `DataCollatorForT5SpanCorruption` yields inputs of `max_seq_length` tokens.

    Texts are tokenised without special tokens (EOS is added after corruption), concatenated and cut into blocks
    of the raw length given by `t5_span_corruption_lengths`; per domain with a `domain_column` (as
    `tokenize_for_mlm`).
    """
    raw_length, _ = t5_span_corruption_lengths(max_seq_length, noise_density, mean_noise_span_length)

    def encode(batch):
        return _encode_by_domain(batch, text_column, domain_column, domain_ids, encode_texts)

    def encode_texts(texts):
        encoded = tokenizer(texts, add_special_tokens=False)
        return _concatenate_and_chunk({"input_ids": encoded["input_ids"]}, raw_length)

    tokenized = raw_datasets.map(
        encode,
        batched=True,
        num_proc=num_proc,
        remove_columns=raw_datasets["train"].column_names,
        desc="Tokenising for span corruption",
    )
    _require_examples(tokenized, raw_length)
    return tokenized


def tokenize_seq2seq(
    raw_datasets,
    tokenizer,
    source_column: str,
    target_column: str,
    max_source_length: int = 512,
    max_target_length: int = 128,
    source_prefix: str = "",
    num_proc: int | None = None,
):
    """Tokenise source texts (with an optional task prefix such as ``"resumir: "``) and target texts (`labels`)."""

    def encode(batch):
        _require_text(batch[source_column], "--source_column", source_column)
        _require_text(batch[target_column], "--target_column", target_column)
        sources = [source_prefix + text for text in batch[source_column]]
        encoded = tokenizer(sources, truncation=True, max_length=max_source_length)
        encoded["labels"] = tokenizer(
            text_target=batch[target_column], truncation=True, max_length=max_target_length
        )["input_ids"]
        return encoded

    return raw_datasets.map(
        encode,
        batched=True,
        num_proc=num_proc,
        remove_columns=raw_datasets["train"].column_names,
        desc="Tokenising source and target texts",
    )


# --------------------------------------------------------------------------------------------------------------
# Metrics (offline `evaluate` modules shipped in ptmoe/metrics)
# --------------------------------------------------------------------------------------------------------------
def _first(predictions: Any) -> Any:
    """The logits from a model output tuple: the Trainer passes every non-loss output (router losses too)."""
    return predictions[0] if isinstance(predictions, (tuple, list)) else predictions


def logits_to_predictions(task_type: str = "classification", with_scores: bool = False) -> Callable:
    """A `preprocess_logits_for_metrics` keeping only class ids (or regression scores) during evaluation.

    MoE outputs carry router losses beside the logits; keeping only the predictions also spares the Trainer from
    gathering full logits across processes. With `with_scores` (binary screening metrics such as AWSS), each
    example keeps `(class id, softmax probability of class 1)` as a `(batch, 2)` float tensor.
    """

    def preprocess(logits: Any, labels: torch.Tensor) -> torch.Tensor:
        logits = _first(logits)
        if task_type == "regression":
            return logits.squeeze(-1)
        if with_scores:
            return torch.stack(
                [logits.argmax(dim=-1).float(), logits.float().softmax(dim=-1)[..., 1]], dim=-1
            )
        return logits.argmax(dim=-1)

    return preprocess


SCREENING_METRICS = ("awss", "wss")


def parse_screening_metrics(specs: Sequence[str] | None) -> list[tuple[str, float]]:
    """`["awss@0.95", "wss@0.9"]` → `[("awss", 0.95), ("wss", 0.9)]` (the `--metric` values of binary tasks).

    Raises:
        ValueError: an unknown metric name, a missing `@recall`, or a recall level outside (0, 1].
    """
    parsed = []
    for spec in specs or []:
        name, _, level = str(spec).partition("@")
        if name not in SCREENING_METRICS or not level:
            raise ValueError(
                f"--metric {spec!r}: use NAME@RECALL with NAME in {SCREENING_METRICS}, e.g. awss@0.95"
            )
        try:
            recall = float(level)
        except ValueError:
            raise ValueError(f"--metric {spec!r}: the recall level {level!r} is not a number") from None
        if not 0 < recall <= 1:
            raise ValueError(f"--metric {spec!r}: the recall level must be in (0, 1], e.g. awss@0.95")
        parsed.append((name, recall))
    return parsed


def _scalars(results: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Keep numeric results as floats (lists such as BLEU's n-gram precisions are not loggable scalars)."""
    out = {}
    for key, value in results.items():
        if isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


def classification_metrics(
    label_mapping: LabelMapping, f1_average: str | None = None, screening: Sequence[tuple[str, float]] = ()
) -> Callable:
    """`compute_metrics` for sentence tasks, with the offline metric modules.

    Classification: `accuracy` and `f1` (binary for two classes, macro average otherwise, or `f1_average` when
    given, e.g. `"macro"` for ASSIN 2 RTE). Regression: `pearson` and `spearman` (module `pearson_spearman`) and
    the mean squared error `mse`. `screening` (from `parse_screening_metrics`, binary tasks only) adds e.g.
    `awss@0.95` computed on the probability of label id 1 (needs `logits_to_predictions(with_scores=True)`).
    """
    from .metrics import load_metric

    if screening and (label_mapping.is_regression or label_mapping.num_labels != 2):
        raise ValueError(
            f"--metric {', '.join(f'{n}@{r:g}' for n, r in screening)} needs a binary classification task (label id 1 "
            f"= relevant); this task has {'a regression target' if label_mapping.is_regression else str(label_mapping.num_labels) + ' labels'}"
        )

    if label_mapping.is_regression:
        correlation = load_metric("pearson_spearman")

        def compute(eval_prediction) -> dict[str, float]:
            predictions = np.asarray(_first(eval_prediction.predictions), dtype=np.float64).reshape(-1)
            references = np.asarray(eval_prediction.label_ids, dtype=np.float64).reshape(-1)
            results = _scalars(correlation.compute(predictions=predictions, references=references))
            results["mse"] = float(np.mean((predictions - references) ** 2))
            return results

        return compute

    accuracy, f1 = load_metric("accuracy"), load_metric("f1")
    average = f1_average or ("binary" if label_mapping.num_labels == 2 else "macro")

    screening_modules = {name: load_metric(name) for name in {name for name, _ in screening}}

    def compute(eval_prediction) -> dict[str, float]:
        predictions = np.asarray(_first(eval_prediction.predictions))
        scores = None
        if screening:  # (N, 2): class id, probability of label id 1
            predictions, scores = predictions[..., 0].astype(np.int64), predictions[..., 1].reshape(-1)
        predictions = predictions.reshape(-1)
        references = np.asarray(eval_prediction.label_ids).reshape(-1)
        results = _scalars(accuracy.compute(predictions=predictions, references=references))
        results.update(_scalars(f1.compute(predictions=predictions, references=references, average=average)))
        for name, recall in screening:
            value = screening_modules[name].compute(predictions=scores, references=references, recall=recall)
            results[f"{name}@{recall:g}"] = float(value[name])
        return results

    return compute


def ner_metrics(label_mapping: LabelMapping, **seqeval_kwargs: Any) -> Callable:
    """`compute_metrics` for BIO tagging: entity-level precision/recall/F1 (module `seqeval`) and token accuracy.

    Only positions with a label (first sub-word of each word) are scored; per-type F1 is reported as
    ``<TYPE>_f1``. `seqeval_kwargs` go to the metric (e.g. `mode="strict", scheme="IOB2"`); by default
    conlleval-style chunking with undefined scores set to 0.
    """
    from .metrics import load_metric

    seqeval = load_metric("seqeval")
    names = label_mapping.names

    def compute(eval_prediction) -> dict[str, float]:
        predictions = np.asarray(_first(eval_prediction.predictions))
        if predictions.ndim == 3:  # logits were not reduced by `logits_to_predictions`
            predictions = predictions.argmax(-1)
        references = np.asarray(eval_prediction.label_ids)
        predicted_tags, reference_tags = [], []
        for prediction_row, reference_row in zip(predictions, references, strict=True):
            keep = reference_row != -100
            predicted_tags.append([names[i] for i in prediction_row[keep]])
            reference_tags.append([names[i] for i in reference_row[keep]])
        results = seqeval.compute(
            predictions=predicted_tags, references=reference_tags, **{"zero_division": 0, **seqeval_kwargs}
        )
        flat = {}
        for key, value in results.items():
            if isinstance(value, Mapping):
                if "f1" in value:
                    flat[f"{key}_f1"] = float(value["f1"])
            elif isinstance(value, (int, float, np.floating)):
                flat[key] = float(value)
        return flat

    return compute


def seq2seq_metrics(tokenizer, metric_names: Sequence[str] = ("rouge", "bleu")) -> Callable:
    """`compute_metrics` for generated text (needs `predict_with_generate`): ROUGE and/or BLEU, plus `gen_len`.

    Predictions and labels are decoded without special tokens; -100 label padding becomes the pad token first.
    Reported: `rouge1`, `rouge2`, `rougeL`, `rougeLsum` (mean F-measures, 0-1, Portuguese-aware tokenisation of
    the `rouge` module), `bleu` (corpus SacreBLEU, 0-100) with `bleu_bp`, `bleu_sys_len`, `bleu_ref_len`, and
    `gen_len` (mean generated tokens).
    """
    from .metrics import load_metric

    metrics = {name: load_metric(name) for name in metric_names}

    def compute(eval_prediction) -> dict[str, float]:
        predictions = np.asarray(_first(eval_prediction.predictions))
        if predictions.ndim == 3:
            raise ValueError(
                "seq2seq metrics need generated token ids: run the Seq2SeqTrainer with --predict_with_generate."
            )
        labels = np.asarray(eval_prediction.label_ids)
        pad = tokenizer.pad_token_id
        predictions = np.where(predictions < 0, pad, predictions)  # the Trainer pads across batches with -100
        labels = np.where(labels < 0, pad, labels)
        decoded_predictions = [
            text.strip() for text in tokenizer.batch_decode(predictions, skip_special_tokens=True)
        ]
        decoded_labels = [text.strip() for text in tokenizer.batch_decode(labels, skip_special_tokens=True)]
        results: dict[str, float] = {}
        for name, metric in metrics.items():
            scores = metric.compute(predictions=decoded_predictions, references=decoded_labels)
            if name == "bleu":
                # SacreBLEU's 0-100 `score` is the number papers quote; its other scalars keep a `bleu_` prefix.
                results["bleu"] = float(scores["score"])
                results.update(
                    _scalars({k: v for k, v in scores.items() if k not in ("score", "bleu")}, "bleu_")
                )
            else:
                results.update(_scalars(scores))
        results["gen_len"] = float(np.mean([np.count_nonzero(row != pad) for row in predictions]))
        return results

    return compute


# --------------------------------------------------------------------------------------------------------------
# Tokenizer and model
# --------------------------------------------------------------------------------------------------------------
def load_tokenizer(model_args: ModelArguments):
    """`AutoTokenizer` from `--tokenizer_name` or `--model_name_or_path`, with a clear error when missing."""
    from transformers import AutoTokenizer

    name = model_args.tokenizer_name or model_args.model_name_or_path
    try:
        return AutoTokenizer.from_pretrained(name, cache_dir=model_args.cache_dir)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"Could not load a tokenizer from {name!r}: {str(error).splitlines()[0]}. Save the tokenizer with the "
            "model (tokenizer.save_pretrained) or pass --tokenizer_name."
        ) from None


def _auto_class(task: str, model_type: str):
    import transformers

    is_t5 = "t5" in model_type
    if task in ("seq2seq", "span-corruption") or (task == "masked-lm" and is_t5):
        if not is_t5:
            raise ValueError(
                f"Task {task!r} needs an encoder-decoder (MoE-T5) checkpoint, got model_type {model_type!r}"
            )
        return transformers.AutoModelForSeq2SeqLM
    if is_t5:
        raise ValueError(
            f"Task {task!r} needs an encoder (MoE-BERT) checkpoint, got model_type {model_type!r}"
        )
    return {
        "masked-lm": transformers.AutoModelForMaskedLM,
        "sequence-classification": transformers.AutoModelForSequenceClassification,
        "token-classification": transformers.AutoModelForTokenClassification,
    }[task]


def load_config(model_args: ModelArguments):
    """The checkpoint's config (`AutoConfig`), with a clear error for a path or Hub id that cannot be loaded."""
    from transformers import AutoConfig

    import ptmoe  # noqa: F401  (registers the ptmoe model types)

    try:
        return AutoConfig.from_pretrained(model_args.model_name_or_path, cache_dir=model_args.cache_dir)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"Could not load --model_name_or_path {model_args.model_name_or_path!r}: "
            f"{str(error).splitlines()[0]}. Pass a folder with config.json or a reachable Hub id."
        ) from None


def load_model(model_args: ModelArguments, task: str, label_mapping: LabelMapping | None = None):
    """Load the model for `task`, upcycling a dense checkpoint and adding (Q)LoRA adapters as asked.

    Args:
        model_args (`ModelArguments`): checkpoint, upcycling and tuning options.
        task (`str`): one of `TASKS`. `"masked-lm"` loads a MoE-BERT MLM head or, for a MoE-T5 checkpoint, the
            seq2seq model used for span corruption.
        label_mapping (`LabelMapping`, *optional*): label set of classification tasks (sizes the head).

    Returns:
        A `PreTrainedModel`, or a `peft.PeftModel` for `--tuning lora|qlora`.

    Raises:
        `ValueError`: an unloadable checkpoint, a dense checkpoint without `--upcycle_experts`, a task the
        architecture cannot do, or QLoRA with on-the-fly upcycling.
    """
    import ptmoe  # registers the Auto classes

    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    config = load_config(model_args)
    auto_class = _auto_class(task, config.model_type)
    kwargs: dict[str, Any] = {"cache_dir": model_args.cache_dir}
    if label_mapping is not None:
        kwargs.update(label_mapping.model_kwargs())
    if model_args.ignore_mismatched_sizes:
        kwargs["ignore_mismatched_sizes"] = True
    if model_args.expert_dropout is not None:  # a config override, for loading and for upcycling alike
        kwargs["expert_dropout"] = model_args.expert_dropout

    if config.model_type not in _MOE_MODEL_TYPES:
        if model_args.upcycle_experts is None:
            raise ValueError(
                f"{model_args.model_name_or_path!r} is a dense {config.model_type!r} checkpoint: pass "
                "--upcycle_experts N to upcycle it into a MoE model on the fly, or start from a ptmoe checkpoint."
            )
        if model_args.tuning == "qlora":
            raise ValueError(
                "QLoRA loads the checkpoint in 4 bits and cannot upcycle on the fly: upcycle first (`ptmoe upcycle` "
                "or `ptmoe.upcycle(...).save_pretrained(folder)`), then pass that folder with --tuning qlora."
            )
        expert_dropout = kwargs.pop("expert_dropout", None)  # a MoE field: not for the dense config
        dense, loading_info = auto_class.from_pretrained(
            model_args.model_name_or_path, output_loading_info=True, **kwargs
        )
        upcycle_kwargs: dict[str, Any] = {
            "num_experts": model_args.upcycle_experts,
            "num_experts_per_tok": model_args.upcycle_experts_per_tok,
        }
        if expert_dropout is not None:
            upcycle_kwargs["expert_dropout"] = expert_dropout
        if model_args.upcycle_method is not None:
            upcycle_kwargs["method"] = model_args.upcycle_method
        model = ptmoe.upcycle(dense, progress=False, **upcycle_kwargs)
        logger.info("Upcycled %s into %d experts", model_args.model_name_or_path, model_args.upcycle_experts)
    else:
        if model_args.tuning == "qlora":
            kwargs["quantization_config"] = ptmoe.bnb_4bit_config()
        model, loading_info = auto_class.from_pretrained(
            model_args.model_name_or_path, output_loading_info=True, **kwargs
        )

    # ptmoe losses are means over the batch (task loss + router losses), not sums to be divided by the number of
    # label tokens. Without this, the Trainer sees `**kwargs` in `forward`, passes `num_items_in_batch`, stops
    # dividing the loss by the gradient-accumulation steps and multiplies it by the number of processes (DDP).
    if not hasattr(type(model), "accepts_loss_kwargs"):
        model.accepts_loss_kwargs = False
    if model_args.tuning == "full":
        return model
    # Modules the checkpoint did not have (a new pooler or head) start random: with LoRA they must be trained and
    # saved with the adapter, or the adapter could not be reloaded onto the base checkpoint.
    module_names = {name for name, _ in model.named_modules()}
    new_modules = sorted(
        {key.rsplit(".", 1)[0] for key in loading_info.get("missing_keys", [])} & module_names
    )
    return add_expert_lora(model, model_args, new_modules)


def add_expert_lora(model, model_args: ModelArguments, new_modules: Sequence[str] = ()):
    """Wrap `model` with LoRA adapters on its experts (`ptmoe.expert_lora_config`; QLoRA: `ptmoe.prepare_qlora_model`).

    The task head (e.g. `classifier`) and `new_modules` (modules absent from the checkpoint, such as a new
    pooler) are trained in full next to the adapters and saved with them; routers stay frozen.
    `--lora_experts 0,3` adapts experts 0 and 3 of every MoE layer.
    """
    import peft

    import ptmoe

    experts = parse_expert_list(model_args.lora_experts)
    if experts != "all":
        experts = {layer.key: experts for layer in ptmoe.moe_layers(model)}
    lora_kwargs = {
        "r": model_args.lora_r,
        "alpha": model_args.lora_alpha,
        "experts": experts,
        "dropout": model_args.lora_dropout,
    }
    if new_modules:
        lora_kwargs["modules_to_save"] = list(new_modules)
        logger.info(
            "Trained in full and saved with the adapter (not in the checkpoint): %s", list(new_modules)
        )
    if model_args.tuning == "qlora":
        model = ptmoe.prepare_qlora_model(model, **lora_kwargs)
    else:
        model = peft.get_peft_model(model, ptmoe.expert_lora_config(model, **lora_kwargs))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info(
        "LoRA: %d trainable parameters of %d (%.2f%%)", trainable, total, 100 * trainable / max(total, 1)
    )
    return model


def resolve_max_length(requested: int, model, tokenizer, flag: str = "--max_seq_length") -> int:
    """`requested`, lowered to what the model's position embeddings and the tokenizer accept (with a warning).

    BERT-style models fail deep inside the embeddings on longer inputs; T5's relative positions have no limit.
    """
    limits = []
    config = getattr(model, "config", None)
    max_positions = getattr(config, "max_position_embeddings", None)
    if isinstance(max_positions, int) and max_positions > 0:
        limits.append(max_positions)
    model_max_length = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max_length, int) and 0 < model_max_length < 1_000_000:  # "no limit" is stored as 1e30
        limits.append(model_max_length)
    limit = min(limits, default=requested)
    if requested > limit:
        logger.warning("%s %d is above what the model accepts (%d): using %d", flag, requested, limit, limit)
        return limit
    return requested


# --------------------------------------------------------------------------------------------------------------
# Running: train, save once, evaluate, write metrics
# --------------------------------------------------------------------------------------------------------------
def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def train_evaluate_save(
    trainer,
    model_args: ModelArguments,
    do_train: bool = True,
    do_eval: bool = True,
    perplexity: bool = False,
) -> dict:
    """Train, save the final model once, evaluate, and write `all_results.json` (main process only).

    With `codecarbon` in `--report_to`, training energy is tracked offline (`ptmoe.energy`): `train_energy_kwh`,
    `train_emissions_kg_co2e` and `train_energy_duration_s` join the metrics and `energy.json` the output folder.

    The model (or, with LoRA, the adapter) and the tokenizer are written to `args.output_dir` by
    `Trainer.save_model`, which writes on the main process only; with `--merge_lora` the merged model also goes to
    `<output_dir>/merged`. Router telemetry is attached when `--router_telemetry` is on and the model has MoE
    layers.

    Args:
        trainer (`Trainer`): a configured trainer.
        model_args (`ModelArguments`): for `router_telemetry` and `merge_lora`.
        do_train (`bool`), do_eval (`bool`): the phases to run.
        perplexity (`bool`, defaults to `False`): add `eval_perplexity = exp(eval_loss)` (language modelling).

    Returns:
        `dict` of train and eval metrics.
    """
    from .energy import use_offline_codecarbon, write_energy_report
    from .telemetry import add_router_telemetry, find_moe_blocks

    if model_args.router_telemetry and do_train and find_moe_blocks(trainer.model):
        add_router_telemetry(trainer)
    energy = use_offline_codecarbon(
        trainer,
        getattr(model_args, "energy_country_iso_code", None),
        getattr(model_args, "energy_region", None),
    )
    metrics: dict[str, Any] = {}
    if do_train:
        result = trainer.train()
        train_metrics = dict(result.metrics)
        train_metrics["train_samples"] = len(trainer.train_dataset)
        if energy is not None and energy.report is not None:  # kWh, kg CO2e, seconds (main process)
            train_metrics.update(energy.report.metrics("train"))
            if trainer.is_world_process_zero():
                Path(trainer.args.output_dir).mkdir(parents=True, exist_ok=True)
                write_energy_report(energy.report, Path(trainer.args.output_dir) / "energy.json")
        trainer.save_model()  # the final model (or adapter) + tokenizer, on the main process only
        trainer.log_metrics("train", train_metrics)
        trainer.save_metrics("train", train_metrics)
        trainer.save_state()
        metrics.update(train_metrics)
    if do_eval and trainer.eval_dataset is not None:
        eval_metrics = trainer.evaluate()
        eval_metrics["eval_samples"] = len(trainer.eval_dataset)
        if perplexity and "eval_loss" in eval_metrics:
            eval_metrics["eval_perplexity"] = math.exp(min(eval_metrics["eval_loss"], 50.0))
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    if do_train and model_args.merge_lora:
        save_merged(trainer)
    args = trainer.args
    # One line per process (logging is quiet on replicas): shows that every rank of a distributed run finished.
    print(f"ptmoe: process {args.process_index + 1}/{args.world_size} finished", flush=True)
    return metrics


def save_merged(trainer) -> Path | None:
    """Save the LoRA-merged model (+ tokenizer) to `<output_dir>/merged` on the main process (LoRA only)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if not is_peft_model(model):
        logger.warning("--merge_lora ignored: the model has no LoRA adapter (--tuning full).")
        return None
    if getattr(model.base_model.model, "is_loaded_in_4bit", False):
        logger.warning(
            "--merge_lora ignored for QLoRA: merging into 4-bit weights loses precision. Load the base checkpoint "
            "in full precision, `PeftModel.from_pretrained(base, adapter).merge_and_unload()`, then save."
        )
        return None
    trainer.accelerator.wait_for_everyone()
    if not trainer.is_world_process_zero():
        return None
    merged_dir = Path(trainer.args.output_dir) / "merged"
    merged = model.merge_and_unload()
    merged.save_pretrained(merged_dir)
    if trainer.processing_class is not None:
        trainer.processing_class.save_pretrained(merged_dir)
    return merged_dir


def resolve_do_train_eval(training_args) -> tuple[bool, bool]:
    """Both when neither `--do_train` nor `--do_eval` is given; otherwise what was asked."""
    if not training_args.do_train and not training_args.do_eval:
        return True, True
    return bool(training_args.do_train), bool(training_args.do_eval)


def setup_logging(training_args) -> None:
    """Log ptmoe's messages at INFO on the main process; transformers and datasets keep their verbosity.

    `--log_level` / `--log_level_replica` set the level of all three (replicas stay at WARNING by default, as in
    the Trainer).
    """
    import datasets
    import transformers

    level = training_args.get_process_log_level()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level)
    logging.getLogger("ptmoe").setLevel(min(level, logging.INFO) if training_args.should_log else level)
    transformers.utils.logging.set_verbosity(level)
    datasets.utils.logging.set_verbosity(level)


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
    "train_evaluate_save",
]
