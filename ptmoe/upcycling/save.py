"""Saving an upcycled model, all or nothing: weights, config and modeling code, and the source's tokenizer.

`save_upcycled` writes to a staged folder renamed into place, with the tokenizer of the dense checkpoint recorded in
`config.upcycled_from` (`ptmoe.calibration.load_tokenizer`, which warns when there is none).
"""

from __future__ import annotations

import os
from pathlib import Path

from transformers import PreTrainedModel

from ..calibration import load_tokenizer
from ..outputs import check_output_dir, staged_output_dir
from .families import SUPPORTED_ARCHITECTURES


def save_upcycled(
    model: PreTrainedModel,
    out_dir: str | os.PathLike,
    tokenizer=None,
    overwrite: bool = False,
) -> Path:
    """Save an upcycled model (safetensors + config, with its modeling code) and its tokenizer, all or nothing.

    Everything is written to a temporary folder next to `out_dir` and then renamed into place, so a failure leaves
    neither a half-written `out_dir` nor temporary files behind (and, with `overwrite`, keeps the old folder).

    Args:
        model (`PreTrainedModel`): the model returned by `upcycle`.
        out_dir (`str` or `os.PathLike`): destination folder; must not exist or be empty unless `overwrite`.
        tokenizer (*optional*): the tokenizer to save. By default the tokenizer of `model.config.upcycled_from` is
            loaded (`AutoTokenizer.from_pretrained`) when it names a path or Hub id; a warning says so when that
            source has none. Pass `False` to save no tokenizer.
        overwrite (`bool`, defaults to `False`): replace a non-empty `out_dir`.

    Returns:
        The output folder as a `Path`.
    """
    out = check_output_dir(out_dir, overwrite)
    if tokenizer is None:
        source = getattr(model.config, "upcycled_from", None)
        # An in-memory dense model records its class name: there is no folder to read a tokenizer from.
        tokenizer = None if source in SUPPORTED_ARCHITECTURES else load_tokenizer(source)
    with staged_output_dir(out, overwrite) as staging:
        model.save_pretrained(staging)
        if tokenizer:
            tokenizer.save_pretrained(staging)
    return out
