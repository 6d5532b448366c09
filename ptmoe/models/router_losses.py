"""The router losses: pure functions over router outputs, and `RouterLosses` (their per-model average).

Switch load balancing, router z-loss, importance loss and the domain loss (with the expert-name helpers
`domain_names` / `expert_domain_ids`), plus how they join the task loss (`wants_router_losses`, `total_loss`,
`layer_router_losses`, `compute_router_losses`). Part of the model code that travels inside Hub checkpoints: it
imports only torch, transformers and its sibling modules, never ``ptmoe``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .routers import RouterOutput


# --------------------------------------------------------------------------------------------------------------
# Losses: pure functions over router outputs. `token_mask` (True = real token) keeps padding out of every loss.
# --------------------------------------------------------------------------------------------------------------
def _masked_rows(tensor: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Flatten `(…, X)` to `(T, X)` keeping only the rows of real tokens."""
    rows = tensor.reshape(-1, tensor.shape[-1])
    if token_mask is None:
        return rows
    return rows[token_mask.reshape(-1)]


def load_balancing_loss(
    router_probs: torch.Tensor, topk_index: torch.Tensor, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch Transformer load-balancing loss (Fedus et al. 2021, eq. 4-6), generalised to top-k.

    ``loss = E · Σ_e f_e · P_e`` where ``f_e`` is the fraction of (token, slot) assignments that chose expert
    ``e`` (before capacity drops) and ``P_e`` the mean router probability of ``e``, both over the real tokens
    of the batch. It is 1 when routing is perfectly balanced, for any k. Multiply by ``router_aux_loss_coef``.

    Args:
        router_probs (`torch.Tensor` of shape `(…, E)`), topk_index (`torch.LongTensor` of shape `(…, k)`),
        token_mask (`torch.BoolTensor` of shape `(…)`, *optional*).
    """
    num_experts = router_probs.shape[-1]
    probs = _masked_rows(router_probs, token_mask)  # (T, E)
    index = _masked_rows(topk_index, token_mask)  # (T, k)
    if probs.shape[0] == 0:
        return router_probs.sum() * 0.0
    counts = F.one_hot(index, num_experts).sum(dim=(0, 1)).to(probs.dtype)  # (E,)
    fraction_routed = counts / index.numel()
    mean_prob = probs.mean(dim=0)
    return num_experts * torch.sum(fraction_routed * mean_prob)


def router_z_loss(router_logits: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Router z-loss (Zoph et al. 2022, ST-MoE eq. 5): mean over real tokens of ``logsumexp(logits)²``."""
    logits = _masked_rows(router_logits, token_mask)
    if logits.shape[0] == 0:
        return router_logits.sum() * 0.0
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


def importance_loss(
    topk_weights: torch.Tensor,
    topk_index: torch.Tensor,
    num_experts: int,
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Importance loss (Shazeer et al. 2017, eq. 6): ``CV(Importance)²`` with ``Importance_e = Σ_x G_e(x)``.

    ``G(x)`` are the sparse gates (the top-k combine weights scattered over the experts). CV² uses the
    population variance over experts divided by the squared mean (plus 1e-10, as in the original code).
    """
    weights = _masked_rows(topk_weights, token_mask)  # (T, k)
    index = _masked_rows(topk_index, token_mask)
    gates = torch.zeros(weights.shape[0], num_experts, dtype=weights.dtype, device=weights.device)
    gates = gates.scatter_add(1, index, weights)
    importance = gates.sum(dim=0)  # (E,)
    mean = importance.mean()
    return ((importance - mean).pow(2).mean()) / (mean.pow(2) + 1e-10)


def router_domain_loss(
    router_logits: torch.Tensor,
    domain_labels: torch.Tensor,
    expert_domains: torch.Tensor,
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Domain supervision of a router: ``-log Σ_{e ∈ experts(d)} p_e(x)`` averaged over the tokens of labelled texts.

    DEMix layers (Gururangan et al., "DEMix Layers: Disentangling Domains for Modular Language Modeling", NAACL 2022)
    send every training token of domain d to the expert of d (deterministic routing by the domain label). This loss
    is a soft version of that rule for a learned router (our formulation; the paper has no router to train): it
    maximises the router probability mass on the experts named d, i.e. the log-likelihood of the domain under the
    router, computed stably as ``logsumexp(logits) - logsumexp(logits of d's experts)``, so that the router routes by
    domain at inference without a label. Multiply by ``router_domain_loss_coef``.

    Args:
        router_logits (`torch.Tensor` of shape `(B, S, E)`): pre-softmax router scores.
        domain_labels (`torch.LongTensor` of shape `(B,)`): domain id of each sequence; -100 = no domain (ignored).
        expert_domains (`torch.LongTensor` of shape `(E,)`): domain id of each expert (-1 = an expert of no domain).
        token_mask (`torch.BoolTensor` of shape `(B, S)`, *optional*): True for real tokens.

    Returns:
        A scalar; 0 (with a gradient path) when no token has a domain.
    """
    logits = router_logits.float()  # (B, S, E)
    labels = domain_labels.to(logits.device).long()  # (B,)
    rows = labels.ne(-100).unsqueeze(-1).expand(logits.shape[:2])  # (B, S)
    if token_mask is not None:
        rows = rows & token_mask.to(rows.device).bool()
    in_domain = expert_domains.to(logits.device).unsqueeze(0) == labels.clamp(min=0).unsqueeze(-1)  # (B, E)
    if not bool(in_domain[labels.ne(-100)].any(dim=-1).all()):
        raise ValueError(
            "router_domain_loss: a domain label has no expert (every labelled domain needs >= 1 expert)"
        )
    domain_logits = logits.masked_fill(~in_domain.unsqueeze(1), float("-inf"))  # (B, S, E)
    nll = torch.logsumexp(logits, dim=-1) - torch.logsumexp(domain_logits, dim=-1)  # (B, S)
    if not bool(rows.any()):
        return logits.sum() * 0.0
    return nll[rows].mean()


def domain_names(expert_names: Sequence[str]) -> list[str]:
    """The distinct domains of `expert_names`, in order of first appearance (their index is the domain id)."""
    return list(dict.fromkeys(expert_names))


def expert_domain_ids(expert_names: Sequence[str]) -> torch.Tensor:
    """`(E,)` domain id of each expert (the index of its name in `domain_names(expert_names)`)."""
    names = domain_names(expert_names)
    return torch.tensor([names.index(name) for name in expert_names], dtype=torch.long)


@dataclass
class RouterLosses:
    """Router losses averaged over the MoE layers that have a learned router (0 when there is none)."""

    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    importance_loss: torch.Tensor

    @staticmethod
    def output_fields(losses: RouterLosses | None) -> dict[str, torch.Tensor | None]:
        """`aux_loss` / `z_loss` / `importance_loss` for a model output: all None when the losses were not computed."""
        if losses is None:
            return {"aux_loss": None, "z_loss": None, "importance_loss": None}
        return {
            "aux_loss": losses.aux_loss,
            "z_loss": losses.z_loss,
            "importance_loss": losses.importance_loss,
        }


def wants_router_losses(
    module: nn.Module,
    output_router_losses: bool | None,
    output_router_logits: bool,
    labels_given: bool = False,
) -> bool:
    """Whether a forward computes the router losses.

    An explicit `output_router_losses` wins; otherwise they are computed in training, when labels are given, or
    with `output_router_logits` (as transformers' MoE models do). Plain inference and every step of `generate()`
    skip them: a few dozen small ops per MoE layer whose results nobody reads.
    """
    if output_router_losses is not None:
        return output_router_losses
    return module.training or labels_given or bool(output_router_logits)


def total_loss(task_loss: torch.Tensor | None, outputs, config) -> torch.Tensor | None:
    """``task_loss + coef_aux · aux_loss + coef_z · z_loss + coef_importance · importance_loss`` (None without labels).

    `outputs` is any object with `aux_loss`, `z_loss` and `importance_loss` (a model output or `RouterLosses`).
    """
    if task_loss is None:
        return None
    if outputs.aux_loss is None:
        raise ValueError(
            "Labels were given but the router losses were not computed (`output_router_losses=False`): the "
            "training loss needs them. Leave `output_router_losses` unset (or True) when passing labels."
        )
    return (
        task_loss
        + config.router_aux_loss_coef * outputs.aux_loss
        + config.router_z_loss_coef * outputs.z_loss
        + config.router_importance_loss_coef * outputs.importance_loss
    )


def layer_router_losses(routing: RouterOutput) -> RouterLosses:
    """Load-balancing, z and importance losses of one MoE layer's routing decision.

    - Token choice (top-k, Switch, noisy top-k): the three losses above, on `router_probs` / `router_logits`.
    - Expert choice (Zhou et al. 2022): every expert takes the same number of tokens by construction, so the
      load-balancing and importance losses (which push towards that balance) are 0, as in the paper, which uses no
      auxiliary loss. The router z-loss is kept: it only keeps the logits small (ST-MoE's stability argument holds
      for any softmax router).
    - Hierarchical: the mean of the two levels' losses. Group level: the three losses over the G groups
      (`group_routing`). Expert level: load balance and importance over all E experts (probabilities
      ``P(g)·P(e|g)``, combine weights), and the z-loss of the expert gate's logits within each group
      (`expert_logits`), the softmax they enter. With one group, the group level is skipped (a single group is
      always balanced), so G = 1 gives exactly the losses of flat top-k routing.
    """
    token_mask = routing.token_mask
    if routing.expert_logits is not None:  # hierarchical: z-loss of the within-group softmaxes
        groups = routing.group_routing.router_probs.shape[-1]
        grouped = routing.expert_logits.unflatten(-1, (groups, -1))  # (B, S, G, E/G)
        z = router_z_loss(grouped, token_mask.unsqueeze(-1).expand(grouped.shape[:-1]))
    else:
        z = router_z_loss(routing.router_logits, token_mask)
    if routing.expert_choice:
        zero = z * 0.0
        return RouterLosses(zero, z, zero)
    num_experts = routing.router_probs.shape[-1]
    losses = RouterLosses(
        load_balancing_loss(routing.router_probs, routing.topk_index, token_mask),
        z,
        importance_loss(routing.topk_weights, routing.topk_index, num_experts, token_mask),
    )
    group = routing.group_routing
    if group is None or group.router_probs.shape[-1] == 1:
        return losses
    group_losses = layer_router_losses(group)
    return RouterLosses(
        (losses.aux_loss + group_losses.aux_loss) / 2,
        (losses.z_loss + group_losses.z_loss) / 2,
        (losses.importance_loss + group_losses.importance_loss) / 2,
    )


def compute_router_losses(router_outputs: Sequence[RouterOutput], reference: torch.Tensor) -> RouterLosses:
    """Per MoE layer load-balancing, z and importance losses (`layer_router_losses`), then averaged over layers.

    Args:
        router_outputs: one `RouterOutput` per MoE layer.
        reference (`torch.Tensor`): any tensor of the model, for the device of the zero losses.
    """
    learned = [layer_router_losses(r) for r in router_outputs if r.learned]
    if not learned:
        zero = torch.zeros((), device=reference.device)
        return RouterLosses(zero, zero, zero)
    aux = torch.stack([losses.aux_loss for losses in learned])
    z = torch.stack([losses.z_loss for losses in learned])
    imp = torch.stack([losses.importance_loss for losses in learned])
    return RouterLosses(aux.mean(), z.mean(), imp.mean())
