"""T5 span corruption (the T5 pre-training objective): noise-span lengths and masks, sentinel tokens,
`span_corrupt` on one sequence, `DataCollatorForT5SpanCorruption` that corrupts each batch, and the tokenisation for
it (`tokenize_for_span_corruption`) and for seq2seq fine-tuning (`tokenize_seq2seq`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .tokenization import (
    _concatenate_and_chunk,
    _encode_by_domain,
    _map_replacing_columns,
    _require_examples,
    _require_text,
)


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

    tokenized = _map_replacing_columns(raw_datasets, encode, num_proc, "Tokenising for span corruption")
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

    return _map_replacing_columns(raw_datasets, encode, num_proc, "Tokenising source and target texts")
