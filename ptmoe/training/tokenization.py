"""Tokenisation for the Trainer tasks: sentence (pair) classification (`tokenize_classification`), word labels
aligned to sub-words (`tokenize_and_align_labels`), and masked-LM blocks (`tokenize_for_mlm`), concatenated and
chunked within each domain when the text is tagged with one (domain-aware packing).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerFast

from .labels import LabelMapping


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

    return _map_replacing_columns(raw_datasets, encode, num_proc, "Tokenising sentences")


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

    return _map_replacing_columns(raw_datasets, encode, num_proc, "Tokenising and aligning tags")


def _map_replacing_columns(raw_datasets, encode: Callable[[dict], dict], num_proc: int | None, desc: str):
    """`raw_datasets.map(encode, batched=True)` keeping only the columns `encode` returns (the raw ones are removed)."""
    return raw_datasets.map(
        encode, batched=True, num_proc=num_proc, remove_columns=raw_datasets["train"].column_names, desc=desc
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

    tokenized = _map_replacing_columns(raw_datasets, encode, num_proc, "Tokenising for masked-LM")
    _require_examples(tokenized, max_seq_length)
    return tokenized


def _require_examples(tokenized, length: int) -> None:
    for split, dataset in tokenized.items():
        if len(dataset) == 0:
            raise ValueError(
                f"The {split} split yields no training example of {length} tokens: the texts are too short in "
                "total. Lower --max_seq_length or add text."
            )


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path) -> PreTrainedTokenizerFast:
    """A cased WordPiece tokenizer (BERTimbau-style: accents kept) trained on `texts`, saved in `out_dir`.

    For offline fixtures and benchmarks: a small vocabulary learnt from the task's own text, no download.

    Args:
        texts (`list[str]`): the training texts.
        vocab_size (`int`): the WordPiece vocabulary size (special tokens included).
        out_dir (`Path`): where the tokenizer is saved.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False, clean_text=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.train_from_iterator(
        texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special)
    )
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    from transformers import BertTokenizerFast

    fast = BertTokenizerFast(tokenizer_object=tokenizer, do_lower_case=False)
    fast.save_pretrained(out_dir)
    return fast
