"""Batching calibration text and building model inputs, with one decoder-input rule for encoder-decoders.

Two batch shapes serve two needs: `batches` pads texts in order (router fitting, distillation, activation
collection mask the padding out), `calibration_sequences` + `length_batches` remove the padding and stack sequences
of equal length (input-norm statistics, where every row a linear sees must be a real token).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .tokenizers import resolve_tokenizer


def batches(
    texts: Sequence[str], tokenizer, batch_size: int = 16, max_length: int = 128, device=None
) -> Iterator[dict[str, torch.Tensor]]:
    """Tokenized, padded batches (`input_ids`, `attention_mask`) of `texts`, in order.

    Args:
        texts (`Sequence[str]`): the texts (see `load_texts`).
        tokenizer: a tokenizer (see `resolve_tokenizer`).
        batch_size (`int`, defaults to 16) / max_length (`int`, defaults to 128): texts per batch, tokens per text.
        device (`torch.device`, *optional*): where to put the tensors.
    """
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


def move_to(batch: Any, device: torch.device) -> Any:
    """`batch` with every tensor (also inside mappings) on `device`; other values as they are."""
    if isinstance(batch, Mapping):
        return {key: move_to(value, device) for key, value in batch.items()}
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    return batch


def _shift_right_of(model: nn.Module):
    """The model's `_shift_right` (transformers' T5 rule: prepend `decoder_start_token_id`), through PEFT wrappers."""
    shift = getattr(model, "_shift_right", None)
    if shift is None and callable(getattr(model, "get_base_model", None)):
        shift = getattr(model.get_base_model(), "_shift_right", None)
    return shift


def _forward_arguments(model: nn.Module) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def model_inputs(
    model: nn.Module, batch: Mapping[str, torch.Tensor], device=None, decoder_attention_mask: bool = False
) -> dict[str, torch.Tensor]:
    """A batch for `model(**inputs)`, with the one decoder-input rule of calibration.

    Encoder-decoder models (T5) read the same text in the decoder, shifted right (teacher forcing on unlabeled
    text), so that the decoder's layers see real text too: `decoder_input_ids = model._shift_right(input_ids)`
    (found through PEFT wrappers; a model without it, such as BART, builds them itself). `token_type_ids` are
    dropped for models whose forward does not take them (BERT tokenizers make them, T5 models do not read them).

    Args:
        model (`nn.Module`): the model the batch is for.
        batch (`Mapping[str, torch.Tensor]`): `input_ids` and optionally `attention_mask` / `token_type_ids`.
        device (`torch.device`, *optional*): move the tensors there.
        decoder_attention_mask (`bool`, defaults to `False`): also mask the decoder's padding with the encoder's
            `attention_mask` (the shifted text has its real tokens at the same positions).
    """
    inputs = dict(batch) if device is None else {key: value.to(device) for key, value in batch.items()}
    if getattr(model.config, "is_encoder_decoder", False):
        shift = _shift_right_of(model)
        if shift is not None:
            inputs["decoder_input_ids"] = shift(inputs["input_ids"])
        if decoder_attention_mask and "attention_mask" in inputs:
            inputs["decoder_attention_mask"] = inputs["attention_mask"]
    if "token_type_ids" in inputs and "token_type_ids" not in _forward_arguments(model):
        del inputs["token_type_ids"]
    return inputs


# --------------------------------------------------------------------------------------------------------------
# Unpadded sequences → length-bucketed batches
# --------------------------------------------------------------------------------------------------------------
def _rows_of_batch(batch: Mapping[str, Any]) -> list[dict[str, torch.Tensor]]:
    """One tokenized batch → its sequences without padding (`attention_mask == 0` positions removed)."""
    if "input_ids" not in batch:
        raise ValueError(f"a tokenized calibration batch needs `input_ids`, got keys {sorted(batch)}")
    input_ids = torch.as_tensor(batch["input_ids"])
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    mask = batch.get("attention_mask")
    mask = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else torch.as_tensor(mask).bool()
    mask = mask.reshape(input_ids.shape)
    extra = {}
    for key in ("token_type_ids",):
        if batch.get(key) is not None:
            extra[key] = torch.as_tensor(batch[key]).reshape(input_ids.shape)
    rows = []
    for i in range(input_ids.shape[0]):
        keep = mask[i]
        row = {"input_ids": input_ids[i][keep]}
        row.update({key: value[i][keep] for key, value in extra.items()})
        if row["input_ids"].numel():
            rows.append(row)
    return rows


def calibration_sequences(
    model: nn.Module,
    calibration_data: Any,
    tokenizer=None,
    max_length: int = 128,
    text_column: str = "text",
) -> list[dict[str, torch.Tensor]]:
    """Normalise calibration data to a list of unpadded sequences (`{"input_ids": (L,), ...}`).

    Accepts a list of texts (tokenized with `tokenizer`, or the tokenizer `resolve_tokenizer` finds for the
    model), a `datasets.Dataset` (with an `input_ids` column, or a `text_column`), a tokenized batch (a mapping
    with `input_ids` and optionally `attention_mask` / `token_type_ids`) or a list/iterable of such batches.
    Padding is removed here, so that every row a layer sees in calibration is a real token.
    """
    if isinstance(calibration_data, str):
        raise ValueError(
            "calibration_data must be a list of texts, a datasets.Dataset or tokenized batches, not one string"
        )
    if calibration_data is None:
        raise ValueError(
            "calibration_data is empty: give some texts (about 128 sequences is Wanda's default)"
        )
    try:
        import datasets

        is_dataset = isinstance(calibration_data, datasets.Dataset)
    except ImportError:  # pragma: no cover - datasets is a dependency
        is_dataset = False
    if is_dataset:
        if "input_ids" in calibration_data.column_names:
            columns = [
                c
                for c in ("input_ids", "attention_mask", "token_type_ids")
                if c in calibration_data.column_names
            ]
            items = [{c: row[c] for c in columns} for row in calibration_data]
        elif text_column in calibration_data.column_names:
            items = list(calibration_data[text_column])
        else:
            raise ValueError(
                f"the calibration Dataset has neither `input_ids` nor the text column {text_column!r} "
                f"(columns: {calibration_data.column_names}); pass text_column="
            )
    elif isinstance(calibration_data, Mapping):
        items = [calibration_data]
    elif isinstance(calibration_data, Iterable):
        items = list(calibration_data)
    else:
        raise ValueError(
            f"calibration_data must be a list of texts, a datasets.Dataset or tokenized batches, got "
            f"{type(calibration_data).__name__}"
        )
    if not items:
        raise ValueError(
            "calibration_data is empty: give some texts (about 128 sequences is Wanda's default)"
        )
    if all(isinstance(item, str) for item in items):
        texts = [text for text in items if text.strip()]
        if not texts:
            raise ValueError("calibration_data holds only empty texts")
        tokenizer = resolve_tokenizer(model, tokenizer)
        encoded = tokenizer(texts, truncation=True, max_length=max_length)
        keys = [key for key in ("input_ids", "token_type_ids") if key in encoded]
        return [{key: torch.tensor(encoded[key][i]) for key in keys} for i in range(len(texts))]
    if all(isinstance(item, Mapping) for item in items):
        sequences = []
        for item in items:
            if (
                isinstance(item.get("input_ids"), (list, tuple))
                and item["input_ids"]
                and not isinstance(item["input_ids"][0], (list, tuple, torch.Tensor))
            ):
                item = {k: [v] for k, v in item.items() if v is not None}  # one unbatched example
            sequences.extend(_rows_of_batch(item))
        return sequences
    raise ValueError(
        "calibration_data must hold only texts or only tokenized batches (mappings with `input_ids`), got "
        f"{sorted({type(item).__name__ for item in items})}"
    )


def length_batches(
    sequences: Sequence[dict[str, torch.Tensor]], batch_size: int
) -> list[dict[str, torch.Tensor]]:
    """Stack sequences of equal length (no padding needed), at most `batch_size` per batch, shortest first."""
    by_length: dict[int, list[dict[str, torch.Tensor]]] = {}
    for sequence in sequences:
        by_length.setdefault(sequence["input_ids"].numel(), []).append(sequence)
    stacked = []
    for length in sorted(by_length):
        same = by_length[length]
        for start in range(0, len(same), batch_size):
            chunk = same[start : start + batch_size]
            stacked.append({key: torch.stack([s[key] for s in chunk]) for key in chunk[0]})
    return stacked


__all__ = ["batches", "calibration_sequences", "length_batches", "model_inputs", "move_to"]


class TokenizedTexts(torch.utils.data.Dataset):
    """Texts tokenized once (truncated to `max_length`, unpadded), as `input_ids` / `attention_mask` items for a
    `Trainer` with a padding collator (distillation's training set)."""

    def __init__(self, texts: Sequence[str], tokenizer, max_length: int):
        self.encodings = [tokenizer(text, truncation=True, max_length=max_length) for text in texts]

    def __len__(self) -> int:
        return len(self.encodings)

    def __getitem__(self, index: int) -> dict:
        item = self.encodings[index]
        return {"input_ids": item["input_ids"], "attention_mask": item["attention_mask"]}
