"""Contrastive continued training of a sentence encoder: half-sentence pairs with in-batch negatives.

A converged sentence encoder (sentence-transformers' MiniLM, a BERT) is continued on plain text with an objective it
keeps: the first half of a sentence is the query, its second half the positive, and the other second halves of the
batch the negatives (InfoNCE / multiple-negatives ranking loss, symmetric, on mean-pooled normalised embeddings
scaled by `scale`). No labels are needed, so any corpus works, and the held-out metric is the same task
(`ptmoe.evaluation.retrieval.half_sentence_retrieval`).

MoE models (ptmoe) add their router losses (`router_aux_loss_coef` · load balancing + z-loss, as their task models
do) and, with `domain_ids` and `domain_loss_coef`, the domain routing loss of Branch-Train-MiX's MiX phase
(`ptmoe.domains.domain_routing_loss`).

    pairs (first, second halves) ──► pair_schedule(seed) ──► train_contrastive(model, …, callback) ──► {steps, wall}
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch

from ..domains import domain_routing_loss
from ..models.router_losses import total_loss
from .retrieval import mean_pool

__all__ = ["contrastive_loss", "pair_schedule", "train_contrastive"]


def contrastive_loss(queries: torch.Tensor, documents: torch.Tensor, scale: float = 20.0) -> torch.Tensor:
    """Symmetric in-batch-negatives loss: cross-entropy of `scale · cos(q_i, d_j)` towards j = i, both directions.

    Args:
        queries, documents (`torch.Tensor` of shape `(B, H)`): L2-normalised embeddings; row i of each is a pair.
        scale (`float`, defaults to 20.0): inverse temperature (sentence-transformers' default for this loss).
    """
    if queries.shape != documents.shape or queries.dim() != 2:
        raise ValueError(
            f"queries {tuple(queries.shape)} and documents {tuple(documents.shape)} must be (B, H)"
        )
    logits = scale * queries @ documents.T
    target = torch.arange(len(queries), device=queries.device)
    cross_entropy = torch.nn.functional.cross_entropy
    return 0.5 * (cross_entropy(logits, target) + cross_entropy(logits.T, target))


def pair_schedule(num_pairs: int, steps: int, batch_size: int, seed: int) -> torch.Tensor:
    """`(steps, batch_size)` pair indices: epochs of a seeded permutation, so every pair is used before any twice.

    A batch never holds the same pair twice (that would be a false negative): batches do not straddle epochs.
    """
    if num_pairs < batch_size:
        raise ValueError(
            f"{num_pairs} training pairs are fewer than one batch of {batch_size}: lower the batch size"
        )
    per_epoch = num_pairs // batch_size
    generator = torch.Generator().manual_seed(seed)
    epochs = [
        torch.randperm(num_pairs, generator=generator)[: per_epoch * batch_size].view(per_epoch, batch_size)
        for _ in range(math.ceil(steps / per_epoch))
    ]
    return torch.cat(epochs)[:steps]


def _is_moe(model) -> bool:
    return getattr(model.config, "num_experts", None) is not None


def _encode(model, tokenizer, texts: Sequence[str], max_length: int, router_logits: bool):
    encoded = tokenizer(
        list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    encoded = {key: value.to(model.device) for key, value in encoded.items()}
    kwargs = {"output_router_logits": True} if router_logits else {}
    outputs = model(**encoded, **kwargs)
    return mean_pool(outputs.last_hidden_state, encoded["attention_mask"]), outputs, encoded


def train_contrastive(
    model,
    tokenizer,
    first: Sequence[str],
    second: Sequence[str],
    schedule: torch.Tensor,
    learning_rate: float,
    *,
    max_length: int = 64,
    scale: float = 20.0,
    warmup_steps: int | None = None,
    weight_decay: float = 0.01,
    domain_ids: torch.Tensor | None = None,
    domain_loss_coef: float = 0.0,
    callback: Callable[[int, float], bool] | None = None,
) -> dict:
    """Train `model` (its parameters with `requires_grad`, e.g. only LoRA adapters) on the pairs of `schedule`.

    AdamW with a linear warm-up over `warmup_steps` (default 10 % of the schedule) and a constant rate after it, so
    that the model after n steps is the same whether the run stops at n or goes on (equal-wall-time comparisons
    read it mid-run).

    Args:
        model: a dense or ptmoe encoder returning `last_hidden_state` (a `PeftModel` wrapping one works too).
        tokenizer: its tokenizer.
        first, second (`list[str]`): pair i is (`first[i]`, `second[i]`).
        schedule (`torch.LongTensor` of shape `(steps, B)`): pair indices per step (`pair_schedule`).
        learning_rate (`float`): peak learning rate.
        max_length (`int`, defaults to 64): tokens per half sentence.
        scale (`float`, defaults to 20.0): see `contrastive_loss`.
        domain_ids (`torch.LongTensor` of shape `(num_pairs,)`, *optional*): domain id per pair (the index of its
            domain in the model's `domain_names(config.expert_names)`), for `domain_loss_coef`.
        domain_loss_coef (`float`, defaults to 0.0): weight of the domain routing loss (MoE with named experts).
        callback (`Callable[[int, float], bool]`, *optional*): called after each step with (steps done, training
            wall seconds so far; callback time excluded); returning True stops training.

    Returns:
        `{"steps": steps done, "wall": seconds spent in training steps, "losses": contrastive loss per step}`.
    """
    if domain_loss_coef and domain_ids is None:
        raise ValueError("`domain_loss_coef` needs `domain_ids` (a domain id per pair)")
    moe = _is_moe(getattr(model, "base_model", model)) or _is_moe(model)
    config = model.config
    if domain_loss_coef and not getattr(config, "expert_names", None):
        raise ValueError(
            "`domain_loss_coef` needs a MoE model with `config.expert_names` (ptmoe.merge_experts)"
        )
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay)
    warmup = warmup_steps if warmup_steps is not None else max(1, len(schedule) // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup))
    )
    model.train()
    losses: list[float] = []
    wall = 0.0
    for step, rows in enumerate(schedule):
        start = time.perf_counter()
        index = rows.tolist()
        queries, q_out, q_in = _encode(
            model, tokenizer, [first[i] for i in index], max_length, domain_loss_coef > 0
        )
        documents, d_out, d_in = _encode(
            model, tokenizer, [second[i] for i in index], max_length, domain_loss_coef > 0
        )
        task = contrastive_loss(queries, documents, scale)
        loss = task
        if moe:  # router losses of both passes, weighted as the MoE task models weight them
            loss = 0.5 * (total_loss(task, q_out, config) + total_loss(task, d_out, config))
        if domain_loss_coef:
            labels = domain_ids[rows]
            names = config.expert_names
            loss = loss + domain_loss_coef * 0.5 * (
                domain_routing_loss(q_out, q_in, labels, names)
                + domain_routing_loss(d_out, d_in, labels, names)
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        wall += time.perf_counter() - start
        losses.append(task.item())
        if callback is not None and callback(step + 1, wall):
            break
    model.eval()
    return {"steps": len(losses), "wall": wall, "losses": losses}
