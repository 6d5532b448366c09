"""Calibration text: one loader for lists, datasets and text files, and one map from file extension to reader."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

# Extensions of local data files → the `datasets` builder that reads them (training data and calibration files).
DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".txt": "text"}


def data_file_builder(path: str, flag: str) -> str:
    """The `datasets` builder (`"json"`, `"csv"`, `"text"`) that reads the local data file `path`.

    Args:
        path (`str`): a `.json`/`.jsonl`/`.csv`/`.txt` file.
        flag (`str`): the argument naming the file (e.g. `"--train_file"`), for error messages.

    Raises:
        `ValueError` naming `flag` for another extension or a missing file.
    """
    suffix = Path(path).suffix.lower()
    if suffix not in DATA_FILE_BUILDERS:
        raise ValueError(
            f"{flag} {path!r} has extension {suffix!r}; use one of {sorted(DATA_FILE_BUILDERS)} "
            "(.json/.jsonl: one JSON object per line or a JSON list; .csv with a header row; .txt: one text per line)."
        )
    if not Path(path).is_file():
        raise ValueError(f"{flag} {path!r} does not exist or is not a file.")
    return DATA_FILE_BUILDERS[suffix]


def load_texts(data, text_column: str = "text", what: str = "data") -> list[str]:
    """The non-empty texts of `data`.

    Args:
        data: a list of strings, a `datasets.Dataset` (column `text_column`) or a path to a text file (one text per
            line; `.jsonl` files are read with `datasets`, column `text_column`).
        text_column (`str`, defaults to `"text"`): the column of a dataset / JSON lines file.
        what (`str`): the argument's name, for error messages.

    Raises:
        `FileNotFoundError` for a missing file; `ValueError` for empty data or another type.
    """
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.is_file():
            raise FileNotFoundError(f"`{what}`: no such text file: {str(path)!r}")
        if path.suffix in (".jsonl", ".json"):
            import datasets

            data = datasets.load_dataset("json", data_files=str(path), split="train")
        else:
            data = path.read_text(encoding="utf-8").splitlines()
    if hasattr(data, "column_names"):  # datasets.Dataset
        if text_column not in data.column_names:
            raise ValueError(
                f"`{what}` has no column {text_column!r} (columns: {data.column_names}); pass text_column="
            )
        data = data[text_column]
    if not isinstance(data, Sequence) or isinstance(data, (str, bytes)):
        raise ValueError(
            f"`{what}` must be a list of texts, a datasets.Dataset or a text file path, got {type(data).__name__}"
        )
    texts = [text.strip() for text in data if isinstance(text, str) and text.strip()]
    if not texts:
        raise ValueError(f"`{what}` holds no non-empty text: fitting and distillation need unlabeled text")
    return texts


def read_calibration_file(path: str, text_column: str = "text", max_samples: int | None = None):
    """Calibration texts from a .txt (one per line), .jsonl/.json or .csv file, as a `datasets.Dataset`.

    Args:
        path (`str`): the file (`--calibration`).
        text_column (`str`, defaults to `"text"`): the column holding the texts (`--text-column`).
        max_samples (`int`, *optional*): keep at most this many non-empty texts.
    """
    import datasets

    builder = data_file_builder(path, "--calibration")
    dataset = datasets.load_dataset(builder, data_files=path, split="train")
    if text_column not in dataset.column_names:
        raise ValueError(
            f"--calibration {path!r} has no column {text_column!r} (columns: {dataset.column_names}); "
            "set --text-column"
        )
    dataset = dataset.filter(lambda row: bool(row[text_column] and row[text_column].strip()))
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    return dataset


__all__ = ["DATA_FILE_BUILDERS", "data_file_builder", "load_texts", "read_calibration_file"]
