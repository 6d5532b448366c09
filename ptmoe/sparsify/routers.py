"""Router fitting (MoEfication, Zhang et al. 2022, §3.2): routers learn which experts carry a token's activation mass.

The routers of a partitioned model start untrained (uniform or random), so top-k picks arbitrary experts. Fitting:

1. one pass over unlabeled text in which every MoE layer routes each token to its *oracle* experts — the k whose
   neurons carry the most activation mass (`expert_activation_mass`) — recording the router input (the hidden state
   entering the MoE block) and the mass of every expert;
2. per layer, the router weight (and nothing else) is trained to predict the mass distribution from the hidden state
   (soft cross-entropy between `softmax(router_logits)` and `mass / Σ mass`), on mini-batches of recorded tokens;
3. the top-k agreement with the oracle is measured on held-out recorded tokens.

The oracle routing in step 1 makes later layers see the hidden states the fitted model will produce (the dense
model's, as MoEfication uses, are further from them once earlier layers are sparse).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..calibration import batches, load_texts, model_inputs, moe_blocks, resolve_tokenizer
from ..models.moe import RouterOutput, SparseMoeBlock


def require_moe_blocks(model: nn.Module, what: str = "model") -> dict[str, SparseMoeBlock]:
    """`{module name: MoE block}` of `model` (`ptmoe.calibration.moe_blocks`), or a `ValueError` naming `what`."""
    blocks = moe_blocks(model)
    if not blocks:
        raise ValueError(
            f"`{what}` ({type(model).__name__}) has no MoE layers (SparseMoeBlock): build one with "
            "ptmoe.upcycle(dense, method='partition', ...) first"
        )
    return blocks


@torch.no_grad()
def expert_activation_mass(block: SparseMoeBlock, hidden_states: torch.Tensor) -> torch.Tensor:
    """`(…, E)` activation mass of each routed expert: ``Σ_{i ∈ e} |a_i| · ‖wo[:, i]‖₂``.

    ``a = act(wi x)`` (or ``act(wi_0 x) · wi_1 x``) are the expert's intermediate activations; weighting each by
    the norm of its output column makes the mass an upper bound of the norm of what the expert adds to the output,
    so the experts with the largest mass are the ones whose removal would change the output most.

    Args:
        block (`SparseMoeBlock`): the MoE layer.
        hidden_states (`torch.Tensor` of shape `(…, H)`): the block's input.
    """
    masses = []
    for expert in block.experts:
        if expert.gated:
            activations = expert.act(expert.wi_0(hidden_states)) * expert.wi_1(hidden_states)
        else:
            activations = expert.act(expert.wi(hidden_states))
        column_norms = expert.wo.weight.float().norm(dim=0)  # (I_e,)
        masses.append((activations.float().abs() * column_norms).sum(dim=-1))
    return torch.stack(masses, dim=-1)


class _OracleRouter(nn.Module):
    """Routes each token to its k experts of largest activation mass and records (router input, mass) pairs."""

    learned = False

    def __init__(self, block: SparseMoeBlock, k: int, max_tokens: int):
        super().__init__()
        self.block = [block]  # a list: not registered as a submodule (no cycle in named_modules)
        self.k = k
        self.max_tokens = max_tokens
        self.inputs: list[torch.Tensor] = []
        self.masses: list[torch.Tensor] = []
        self.recorded = 0

    def forward(self, hidden_states, token_mask, input_ids=None) -> RouterOutput:
        mass = expert_activation_mass(self.block[0], hidden_states)  # (B, S, E)
        if self.recorded < self.max_tokens:
            self.inputs.append(hidden_states[token_mask].float().cpu())
            self.masses.append(mass[token_mask].cpu())
            self.recorded += int(token_mask.sum())
        topk_mass, topk_index = torch.topk(mass, self.k, dim=-1)  # (B, S, k)
        router_probs = mass / mass.sum(dim=-1, keepdim=True).clamp(min=1e-9)
        return RouterOutput(
            router_logits=torch.log(router_probs.clamp(min=1e-9)),
            router_probs=router_probs,
            topk_index=topk_index,
            topk_weights=torch.ones_like(topk_mass),  # combine_weights="ones": the chosen experts are summed
            dispatch_mask=token_mask.unsqueeze(-1).expand_as(topk_index),
            token_mask=token_mask,
            learned=False,
        )


def topk_agreement(router_logits: torch.Tensor, mass: torch.Tensor, k: int) -> float:
    """Mean over tokens of `|top-k(router) ∩ top-k(mass)| / k`."""
    chosen = F.one_hot(router_logits.topk(k, dim=-1).indices, mass.shape[-1]).sum(dim=-2)  # (T, E)
    oracle = F.one_hot(mass.topk(k, dim=-1).indices, mass.shape[-1]).sum(dim=-2)
    return float((chosen * oracle).sum(dim=-1).float().mean() / k)


@dataclass
class RouterFit:
    """What fitting did for one MoE layer.

    Attributes:
        tokens (`int`): recorded tokens (training + held-out).
        loss (`float`): final soft cross-entropy on the held-out tokens.
        agreement (`float`): top-k agreement with the oracle (largest mass) on the held-out tokens after fitting.
        agreement_before (`float`): the same for the router as it was before fitting.
    """

    tokens: int
    loss: float
    agreement: float
    agreement_before: float


def fit_routers(
    model: nn.Module,
    data,
    *,
    steps: int = 300,
    tokenizer=None,
    learning_rate: float = 1e-2,
    batch_size: int = 16,
    max_length: int = 128,
    max_tokens: int = 16384,
    tokens_per_step: int = 1024,
    heldout_fraction: float = 0.1,
    seed: int = 0,
    text_column: str = "text",
    progress: bool = True,
) -> dict[str, RouterFit]:
    """Train only the routers of a partitioned MoE model to select the experts that carry each token's activation mass.

    See the module docstring for the procedure. The model must sum its chosen experts (`combine_weights="ones"`,
    as `ptmoe.upcycle(..., method="partition", combine_weights="ones")` builds it): then a router only selects,
    and the mass ranking is exactly what it has to learn. Every other weight stays as it is.

    Args:
        model: a ptmoe MoE model with `"topk"` or `"noisy_topk"` routers.
        data: unlabeled text: a list of texts, a `datasets.Dataset` (column `text_column`) or a text file.
        steps (`int`, defaults to 300): optimisation steps per MoE layer.
        tokenizer (*optional*): a tokenizer or its path (default: the one saved beside the model).
        learning_rate (`float`, defaults to 1e-2): Adam learning rate of the router weights.
        batch_size / max_length: tokenization of `data` for the recording pass.
        max_tokens (`int`, defaults to 16384): tokens recorded per MoE layer (the pass stops when all have them).
        tokens_per_step (`int`, defaults to 1024): recorded tokens per optimisation step.
        heldout_fraction (`float`, defaults to 0.1): recorded tokens kept out of training to measure agreement.
        seed (`int`, defaults to 0): seeds the mini-batch order.
        progress (`bool`, defaults to `True`): progress bars.

    Returns:
        `{MoE layer name: RouterFit}`.

    Raises:
        `ValueError` for a model without MoE layers, with unlearnable routers (hash/switch) or with
        `combine_weights="router"`, for empty data or `steps < 1`.
    """
    blocks = require_moe_blocks(model)
    config = model.config
    if config.router_type not in ("topk", "noisy_topk"):
        raise ValueError(
            f"fit_routers fits 'topk' / 'noisy_topk' routers, the model has router_type={config.router_type!r}"
        )
    if getattr(config, "combine_weights", "router") != "ones":
        raise ValueError(
            "fit_routers trains routers that only select experts, so the model must sum its chosen experts: build it "
            "with ptmoe.upcycle(dense, method='partition', combine_weights='ones', ...) (this model has "
            f"combine_weights={getattr(config, 'combine_weights', 'router')!r})"
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"`steps` must be an integer >= 1, got {steps!r}")
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"`heldout_fraction` must be in (0, 1), got {heldout_fraction!r}")
    texts = load_texts(data, text_column)
    tokenizer = resolve_tokenizer(model, tokenizer)
    k = config.num_experts_per_tok

    # 1. Record router inputs and expert masses with oracle routing.
    oracles = {name: _OracleRouter(block, k, max_tokens) for name, block in blocks.items()}
    routers = {name: block.router for name, block in blocks.items()}
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for name, block in blocks.items():
            block.router = oracles[name]
        total = math.ceil(len(texts) / batch_size)
        with torch.no_grad():
            for batch in tqdm(
                batches(texts, tokenizer, batch_size, max_length, device),
                total=total,
                desc="recording expert masses",
                disable=not progress,
            ):
                model(**model_inputs(model, batch))
                if all(oracle.recorded >= max_tokens for oracle in oracles.values()):
                    break
    finally:
        for name, block in blocks.items():
            block.router = routers[name]
        model.train(was_training)

    # 2. Fit each router on its recorded tokens.
    generator = torch.Generator().manual_seed(seed)
    results = {}
    bar = tqdm(total=steps * len(blocks), desc="fitting routers", disable=not progress)
    for name, block in blocks.items():
        inputs = torch.cat(oracles[name].inputs)[:max_tokens]  # (T, H)
        mass = torch.cat(oracles[name].masses)[:max_tokens]  # (T, E)
        target = mass / mass.sum(dim=-1, keepdim=True).clamp(min=1e-9)
        order = torch.randperm(inputs.shape[0], generator=generator)
        heldout = max(1, int(heldout_fraction * inputs.shape[0]))
        test, train = order[:heldout], order[heldout:]
        if train.numel() == 0:
            train = test
        weight = block.router.weight
        before = topk_agreement(F.linear(inputs[test], weight.detach().float().cpu()), mass[test], k)
        fitted = weight.detach().float().cpu().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([fitted], lr=learning_rate)
        for _ in range(steps):
            rows = train[
                torch.randint(train.numel(), (min(tokens_per_step, train.numel()),), generator=generator)
            ]
            loss = -(target[rows] * F.log_softmax(F.linear(inputs[rows], fitted), dim=-1)).sum(-1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            bar.update(1)
        with torch.no_grad():
            logits = F.linear(inputs[test], fitted)
            test_loss = -(target[test] * F.log_softmax(logits, dim=-1)).sum(-1).mean()
            weight.copy_(fitted.to(weight.dtype))
        results[name] = RouterFit(
            tokens=int(inputs.shape[0]),
            loss=float(test_loss),
            agreement=topk_agreement(logits, mass[test], k),
            agreement_before=before,
        )
    bar.close()
    return results
