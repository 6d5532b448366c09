"""Unlabeled text for calibration, router fitting and distillation: one loader, one tokenizer rule."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch


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


def resolve_tokenizer(model, tokenizer=None):
    """`tokenizer` (an object or a path / Hub id), or the tokenizer saved beside `model` (its `name_or_path`, or the
    dense checkpoint it was upcycled from).

    Raises:
        `ValueError` naming the `tokenizer=` argument when none can be found.
    """
    from transformers import AutoTokenizer

    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    candidates = [tokenizer] if tokenizer is not None else []
    config = getattr(model, "config", None)
    candidates += [getattr(config, "_name_or_path", None), getattr(config, "upcycled_from", None)]
    errors = []
    for candidate in candidates:
        if not candidate:
            continue
        try:
            loaded = AutoTokenizer.from_pretrained(os.fspath(candidate))
        except (OSError, ValueError, TypeError, KeyError) as error:
            errors.append(f"{candidate}: {type(error).__name__}")
            continue
        if len(loaded) > len(set(loaded.all_special_tokens)):
            return loaded
        errors.append(f"{candidate}: no vocabulary")
    raise ValueError(
        "no tokenizer found for the model (tried: "
        + (", ".join(errors) or "nothing: the model has no path")
        + "); "
        "pass `tokenizer=` (a tokenizer or its folder / Hub id)"
    )


def batches(
    texts: Sequence[str], tokenizer, batch_size: int = 16, max_length: int = 128, device=None
) -> Iterator[dict[str, torch.Tensor]]:
    """Tokenized, padded batches (`input_ids`, `attention_mask`) of `texts`, in order."""
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(
            list(texts[start : start + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        yield {
            key: value.to(device) if device is not None else value
            for key, value in encoded.items()
            if key in ("input_ids", "attention_mask")
        }
