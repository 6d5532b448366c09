"""Tokenizer resolution: one rule for finding the tokenizer of a model or of a checkpoint folder / Hub id.

transformers 5 builds a tokenizer holding only the special tokens from a folder with a `config.json` alone; such a
tokenizer would turn every calibration text into `[UNK]`s, so both functions here refuse it (`has_vocabulary`).
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

# The files a saved tokenizer consists of (one of them is enough).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)

_LOAD_ERRORS = (OSError, ValueError, TypeError, KeyError)


def has_vocabulary(tokenizer) -> bool:
    """Whether `tokenizer` knows tokens beyond its special tokens."""
    return len(tokenizer) > len(set(tokenizer.all_special_tokens))


def resolve_tokenizer(model, tokenizer=None):
    """`tokenizer` (an object or a path / Hub id), or the tokenizer saved beside `model` (its `name_or_path`, or the
    dense checkpoint it was upcycled from).

    Args:
        model: the model the texts are for (its `config._name_or_path` / `config.upcycled_from` are tried).
        tokenizer: a tokenizer (returned as it is), its folder / Hub id, or `None`.

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
        except _LOAD_ERRORS as error:
            errors.append(f"{candidate}: {type(error).__name__}")
            continue
        if has_vocabulary(loaded):
            return loaded
        errors.append(f"{candidate}: no vocabulary")
    raise ValueError(
        "no tokenizer found for the model (tried: "
        + (", ".join(errors) or "nothing: the model has no path")
        + "); "
        "pass `tokenizer=` (a tokenizer or its folder / Hub id)"
    )


def load_tokenizer(source: str | os.PathLike | None):
    """The tokenizer saved in the checkpoint folder / Hub id `source`, or `None` with a warning saying why.

    For saving a derived checkpoint beside its source's tokenizer, where a missing tokenizer is not an error.

    Args:
        source (`str` or `os.PathLike`, *optional*): a checkpoint folder or Hub id.
    """
    if not source:
        return None
    from transformers import AutoTokenizer

    source = os.fspath(source)
    if os.path.isdir(source) and not any(os.path.exists(os.path.join(source, f)) for f in TOKENIZER_FILES):
        reason = f"the folder has none of {', '.join(TOKENIZER_FILES)}"
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except _LOAD_ERRORS as error:
            reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        else:
            if has_vocabulary(tokenizer):
                return tokenizer
            reason = "it has no vocabulary beyond the special tokens"
    logger.warning(
        "No tokenizer could be loaded from %r (%s); the checkpoint is saved without one. Pass `tokenizer=` to "
        "save one beside the weights.",
        source,
        reason,
    )
    return None


__all__ = ["TOKENIZER_FILES", "has_vocabulary", "load_tokenizer", "resolve_tokenizer"]
