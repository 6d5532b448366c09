"""Saving an upcycled model, all or nothing: weights, config and modeling code, and the source's tokenizer.

`save_upcycled` writes to a staged folder renamed into place, with the tokenizer of the dense checkpoint recorded in
`config.upcycled_from` (`ptmoe.calibration.load_tokenizer`, which warns when there is none); `copy_sentence_transformers_modules`
carries a sentence-transformers folder's pooling (and other module) configuration over, so that
`SentenceTransformer(out)` embeds exactly as the source folder did.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from transformers import PreTrainedModel

from ..calibration import load_tokenizer
from ..outputs import check_output_dir, staged_output_dir
from .families import SUPPORTED_ARCHITECTURES

# The files of a sentence-transformers folder beside the transformer's own (module list, max length, prompts and
# similarity); the modules' sub-folders (1_Pooling/, 2_Normalize/, 2_Dense/ ...) are named in modules.json.
SENTENCE_TRANSFORMERS_FILES = (
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
)


def copy_sentence_transformers_modules(
    source: str | os.PathLike | None, destination: str | os.PathLike
) -> bool:
    """Copy the sentence-transformers configuration of a local `source` folder into `destination`.

    Only the modules after the transformer (pooling, dense, normalize) and their configuration files are copied:
    the transformer itself is the (new) model saved in `destination`. Its hidden size is unchanged by upcycling,
    splitting and merging, so the pooling configuration stays valid as it is.

    Args:
        source (`str` or `os.PathLike`, *optional*): the dense checkpoint folder (a Hub id or `None` is ignored).
        destination (`str` or `os.PathLike`): the folder the model was saved to.

    Returns:
        `True` when `source` is a sentence-transformers folder (has `modules.json`) and its modules were copied.
    """
    if source is None or not (Path(source) / "modules.json").is_file():
        return False
    source, destination = Path(source), Path(destination)
    for name in SENTENCE_TRANSFORMERS_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, destination / name)
    for module in json.loads((source / "modules.json").read_text(encoding="utf-8")):
        path = module.get("path", "")
        if path and (source / path).is_dir():  # "" is the transformer at the root: the model just saved
            shutil.copytree(source / path, destination / path, dirs_exist_ok=True)
    return True


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
            When the source is a local sentence-transformers folder, its pooling configuration is kept
            (`copy_sentence_transformers_modules`).
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
        copy_sentence_transformers_modules(getattr(model.config, "upcycled_from", None), staging)
    return out
