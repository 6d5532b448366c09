"""Loading data: a Hub dataset or local files (`.json`/`.jsonl`/`.csv`/`.txt`, or a saved dataset) as a
`DatasetDict` (`load_raw_datasets`); `start_run`, the start every script shares (parse arguments, set up logging and
the seed, load and trim the data); and the checks on a run (`check_training_output_dir`, `limit_samples`,
`check_columns`), each failing with the flag to fix.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..calibration import data_file_builder
from ..models.moe import check_local_checkpoint
from .arguments import parse_arguments
from .run import resolve_do_train_eval, setup_logging


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
        builder = data_file_builder(train_file, "--train_file")
        data_files = {"train": train_file}
        if validation_file is not None:
            if data_file_builder(validation_file, "--validation_file") != builder:
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
        from ..energy import check_codecarbon

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
