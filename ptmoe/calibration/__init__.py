"""Calibration: the ground floor every tool that runs a model over unlabeled text stands on.

    texts.py        load_texts (lists, datasets, text files), read_calibration_file, data_file_builder
    tokenizers.py   resolve_tokenizer (of a model), load_tokenizer (of a checkpoint), has_vocabulary
    batches.py      batches (padded), calibration_sequences + length_batches (unpadded), model_inputs (the one
                    decoder-input rule of encoder-decoders), move_to,
                    TokenizedTexts (a tokenized text dataset for a Trainer)
    blocks.py       is_moe_block / moe_blocks / expert_owners: the one MoE block finder
    activations.py  collect_ffn_activations (dense FFN neurons), collect_input_norms / input_norm_statistics

Upcycling, sparsify, compress (pruning, distillation), merging, domains and telemetry use it. It imports only
`torch`, `transformers`, `datasets` and its own modules: nothing from the floors above (see `tests/test_layout.py`).
"""

from .activations import CalibrationStats, collect_ffn_activations, collect_input_norms, input_norm_statistics
from .batches import TokenizedTexts, batches, calibration_sequences, length_batches, model_inputs, move_to
from .blocks import expert_owners, is_moe_block, moe_blocks
from .texts import DATA_FILE_BUILDERS, data_file_builder, load_texts, read_calibration_file
from .tokenizers import TOKENIZER_FILES, has_vocabulary, load_tokenizer, resolve_tokenizer

__all__ = [
    "DATA_FILE_BUILDERS",
    "TOKENIZER_FILES",
    "CalibrationStats",
    "TokenizedTexts",
    "batches",
    "calibration_sequences",
    "collect_ffn_activations",
    "collect_input_norms",
    "data_file_builder",
    "expert_owners",
    "has_vocabulary",
    "input_norm_statistics",
    "is_moe_block",
    "length_batches",
    "load_texts",
    "load_tokenizer",
    "model_inputs",
    "move_to",
    "moe_blocks",
    "read_calibration_file",
    "resolve_tokenizer",
]
