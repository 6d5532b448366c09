"""Input checks at the top of the model forwards: shapes only (no tensor values, so no host sync in the hot path).

`check_input_shapes` refuses inputs whose shapes do not fit with a `ValueError` naming the argument. Part of the
model code that travels inside Hub checkpoints: it imports only torch and transformers, never ``ptmoe``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


# --------------------------------------------------------------------------------------------------------------
# Input checks at the top of the forwards: shapes only (no tensor values, so no host sync in the hot path)
# --------------------------------------------------------------------------------------------------------------
def check_input_shapes(
    input_shape: Sequence[int],
    attention_mask: torch.Tensor | None = None,
    *,
    ids_name: str = "input_ids",
    mask_name: str = "attention_mask",
    max_positions: int | None = None,
    past_length: int = 0,
    **same_shape: torch.Tensor | None,
) -> None:
    """Refuse inputs whose shapes do not fit, with a `ValueError` naming the argument, before any tensor code runs.

    Without this a wrong mask or an over-long sequence ends in a broadcasting `RuntimeError` inside a router or an
    `IndexError` in the position embeddings.

    Args:
        input_shape (`Sequence[int]`): `(batch_size, sequence_length)` of `input_ids` (or of `inputs_embeds` without
            its hidden dimension).
        attention_mask (`torch.Tensor`, *optional*): a 2-D padding mask must be `(batch_size, past_length +
            sequence_length)`; 4-D masks are taken as they are.
        ids_name (`str`), mask_name (`str`): the argument names used in messages.
        max_positions (`int`, *optional*): learned absolute positions (`max_position_embeddings`); `past_length +
            sequence_length` must not exceed it.
        past_length (`int`, defaults to 0): tokens already in the cache (decoders).
        **same_shape: other `(batch_size, sequence_length)` inputs by argument name (e.g. `token_type_ids`).
    """
    if len(input_shape) != 2:
        raise ValueError(
            f"`{ids_name}` must have shape (batch_size, sequence_length), got {tuple(input_shape)}: add the batch "
            "dimension (e.g. `input_ids.unsqueeze(0)`, or `return_tensors='pt'` in the tokenizer)."
        )
    batch_size, seq_length = input_shape
    if seq_length == 0:
        raise ValueError(f"`{ids_name}` is empty (sequence length 0): pass at least one token per sequence.")
    total = past_length + seq_length
    if max_positions is not None and total > max_positions:
        raise ValueError(
            f"`{ids_name}` has {total} tokens per sequence but the model has {max_positions} positions "
            f"(`max_position_embeddings`): truncate the input (e.g. `truncation=True, max_length={max_positions}` "
            "in the tokenizer)."
        )
    if attention_mask is not None and attention_mask.dim() != 4:
        if tuple(attention_mask.shape) != (batch_size, total):
            expected = f"({batch_size}, {total})" + (
                f" = past {past_length} + {seq_length} new" if past_length else ""
            )
            raise ValueError(
                f"`{mask_name}` has shape {tuple(attention_mask.shape)} but `{ids_name}` needs {expected} "
                "(batch_size, sequence_length): build both with the same tokenizer call, with the same padding."
            )
    for name, tensor in same_shape.items():
        if tensor is not None and tuple(tensor.shape) != (batch_size, seq_length):
            raise ValueError(
                f"`{name}` has shape {tuple(tensor.shape)} but `{ids_name}` has ({batch_size}, {seq_length}): they "
                "must have the same shape."
            )
