"""The routers of a MoE layer and what they decide (`RouterOutput`).

`TopKRouter` (learned top-k gate) and its variants `SwitchRouter`, `NoisyTopKRouter`, `HashRouter`,
`ExpertChoiceRouter` and `HierarchicalRouter`, built from a config by `build_router`. Part of the model code that
travels inside Hub checkpoints: it imports only torch, transformers and its sibling modules, never ``ptmoe``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .moe_config import EXPERT_CHOICE_DECODER_ERROR, HASH_ROUTER_SEED, ROUTER_TYPES, router_type_of


# --------------------------------------------------------------------------------------------------------------
# Routers
# --------------------------------------------------------------------------------------------------------------
@dataclass
class RouterOutput:
    """What a router decided for one batch. Shapes use B = batch, S = sequence, E = experts, k = experts per token.

    Attributes:
        router_logits (`torch.FloatTensor` of shape `(B, S, E)`): pre-softmax scores, always fp32.
        router_probs (`torch.FloatTensor` of shape `(B, S, E)`): softmax of `router_logits`.
        topk_index (`torch.LongTensor` of shape `(B, S, k)`): chosen experts, before any capacity drop; -1 marks a
            slot that holds no expert (expert choice: slot e holds expert e when e picked the token, else -1).
        topk_weights (`torch.FloatTensor` of shape `(B, S, k)`): weights that combine the chosen experts' outputs.
        dispatch_mask (`torch.BoolTensor` of shape `(B, S, k)`): True where the token really goes to that expert;
            False for padding tokens and for tokens dropped by the expert capacity (their expert output is zero).
        token_mask (`torch.BoolTensor` of shape `(B, S)`): True for real (non-padding) tokens.
        learned (`bool`): False for routers without trainable parameters (hash): their losses are not computed.
        expert_choice (`bool`): True when experts chose the tokens (`ExpertChoiceRouter`): the layer is balanced by
            construction, so the load-balancing and importance losses are not computed for it.
        group_routing (`RouterOutput`, *optional*): hierarchical routing only: the first level's decision over the
            G expert groups (`router_logits` / `router_probs` of shape `(B, S, G)`, `topk_index` / `topk_weights` of
            shape `(B, S, groups per token)`).
        expert_logits (`torch.FloatTensor` of shape `(B, S, E)`, *optional*): hierarchical routing only: the raw
            expert-gate logits, whose softmax runs within each group (`router_logits` then holds log(router_probs)).
    """

    router_logits: torch.Tensor
    router_probs: torch.Tensor
    topk_index: torch.Tensor
    topk_weights: torch.Tensor
    dispatch_mask: torch.Tensor
    token_mask: torch.Tensor
    learned: bool = True
    expert_choice: bool = False
    group_routing: RouterOutput | None = None
    expert_logits: torch.Tensor | None = None

    @property
    def expert_index(self) -> torch.Tensor:
        """`(B, S, k)` expert ids actually used, with -1 where the token was not dispatched (padding or dropped)."""
        return self.topk_index.masked_fill(~self.dispatch_mask, -1)


class TopKRouter(nn.Module):
    """Softmax top-k token-choice router (Shazeer et al. 2017; Mixtral / Qwen-MoE style).

    Logits are computed in fp32 from fp32 copies of the input and weight, whatever the model dtype ("selective
    precision", Switch Transformer §2.4). The weight is a bare `nn.Parameter` (no `nn.Linear`), so weight
    quantization (bitsandbytes) can never touch a router. Forward never changes module state.
    """

    learned = True
    expert_choice = False
    # Expert ids this router may choose (forced routing, set by `force_experts` / `model.route_to`); None = all.
    forced_experts: tuple[int, ...] | None = None
    # Routers whose `forward` applies `allowed_mask`; the others refuse forced routing instead of ignoring it.
    supports_forced_routing = True

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        num_experts_per_tok: int,
        norm_topk_prob: bool = True,
        jitter_noise: float = 0.0,
        combine_weights: str = "router",
        top_p: float | None = None,
    ):
        super().__init__()
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.norm_topk_prob = norm_topk_prob
        self.jitter_noise = jitter_noise
        self.combine_weights = combine_weights
        self.top_p = top_p
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))

    def force_experts(self, experts: Sequence[int] | None) -> None:
        """Route every token only to `experts` (expert ids) from now on; `None` restores learned routing.

        An explicit method, never called from `forward` (routers do not change their state while computing).
        """
        if experts is None:
            self.forced_experts = None
            return
        if not self.supports_forced_routing:
            raise ValueError(
                f"forced routing is not supported by {type(self).__name__}: use router_type 'topk', 'switch', "
                "'noisy_topk' or 'hash' for models whose experts are routed to by name"
            )
        experts = tuple(sorted({int(e) for e in experts}))
        if not experts or not all(0 <= e < self.num_experts for e in experts):
            raise ValueError(f"forced experts must be ids in 0..{self.num_experts - 1}, got {list(experts)}")
        self.forced_experts = experts

    def allowed_mask(self, device: torch.device) -> torch.Tensor | None:
        """`(E,)` bool mask of the experts this router may choose, or None when routing is not forced."""
        if self.forced_experts is None:
            return None
        allowed = torch.zeros(self.num_experts, dtype=torch.bool, device=device)
        allowed[list(self.forced_experts)] = True
        return allowed

    def router_input(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The fp32 router input, with Switch Transformer's multiplicative uniform jitter in training."""
        hidden_states = hidden_states.float()
        if self.training and self.jitter_noise > 0:
            noise = torch.empty_like(hidden_states).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
            hidden_states = hidden_states * noise
        return hidden_states

    def compute_logits(self, hidden_states: torch.Tensor, input_ids: torch.Tensor | None) -> torch.Tensor:
        return F.linear(self.router_input(hidden_states), self.weight.float())  # (B, S, E)

    def select(self, router_probs: torch.Tensor, token_mask: torch.Tensor):
        topk_weights, topk_index = torch.topk(router_probs, self.num_experts_per_tok, dim=-1)  # (B, S, k)
        dispatch_mask = token_mask.unsqueeze(-1).expand_as(topk_index)
        top_p = getattr(self, "top_p", None)
        if top_p is not None:
            # Dynamic compute (top-p): a slot is used while the mass of the better slots is still below p, so each
            # token gets the fewest experts whose probability mass reaches p (at least 1, at most k).
            mass_before = topk_weights.cumsum(dim=-1) - topk_weights  # (B, S, k)
            used = mass_before < top_p
            dispatch_mask = dispatch_mask & used
            topk_weights = topk_weights * used
        if getattr(self, "combine_weights", "router") == "ones":
            # MoEfication: the router only selects; the chosen experts' outputs are summed.
            topk_weights = torch.ones_like(topk_weights)
        elif self.norm_topk_prob:
            topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
        return topk_weights, topk_index, dispatch_mask

    def forward(
        self, hidden_states: torch.Tensor, token_mask: torch.Tensor, input_ids: torch.Tensor | None = None
    ) -> RouterOutput:
        """
        Args:
            hidden_states (`torch.Tensor` of shape `(B, S, H)`): router input.
            token_mask (`torch.BoolTensor` of shape `(B, S)`): True for real tokens, False for padding.
            input_ids (`torch.LongTensor` of shape `(B, S)`, *optional*): token ids (used by the hash router).
        """
        router_logits = self.compute_logits(hidden_states, input_ids)
        allowed = self.allowed_mask(router_logits.device)
        if allowed is None:
            router_probs = router_logits.softmax(dim=-1)
        else:  # forced routing: the softmax (and so top-k) runs over the allowed experts only
            router_probs = router_logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        topk_weights, topk_index, dispatch_mask = self.select(router_probs, token_mask)
        if allowed is not None:
            # Slots that top-k filled with a probability-0 expert (fewer allowed experts than k) are not dispatched.
            dispatch_mask = dispatch_mask & allowed[topk_index]
        return RouterOutput(
            router_logits=router_logits,
            router_probs=router_probs,
            topk_index=topk_index,
            topk_weights=topk_weights,
            dispatch_mask=dispatch_mask,
            token_mask=token_mask,
            learned=self.learned,
            expert_choice=self.expert_choice,
        )


class SwitchRouter(TopKRouter):
    """Switch Transformer top-1 router (Fedus et al. 2021) with an expert capacity.

    Each sequence is a routing group. An expert accepts at most ``capacity`` tokens per group, where
    ``capacity = ceil(capacity_factor · real_tokens_in_group / num_experts)`` (``eval_capacity_factor`` in eval
    mode), or the absolute ``expert_capacity`` when it is set (the format of transformers' Switch Transformers
    checkpoints). Tokens are served in sequence order; overflow tokens are dropped: their expert output is zero
    and the residual connection carries them. Padding tokens neither use capacity nor reach an expert. The
    combine weight is the router probability of the chosen expert (never renormalised, so the router learns).
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        capacity_factor: float = 1.25,
        eval_capacity_factor: float = 2.0,
        expert_capacity: int | None = None,
        jitter_noise: float = 0.0,
    ):
        super().__init__(hidden_size, num_experts, 1, norm_topk_prob=False, jitter_noise=jitter_noise)
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.expert_capacity = expert_capacity

    def capacity(self, token_mask: torch.Tensor) -> torch.Tensor:
        """`(B, 1)` number of tokens each expert accepts in each sequence."""
        if self.expert_capacity is not None:
            return torch.full((token_mask.shape[0], 1), self.expert_capacity, device=token_mask.device)
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        real_tokens = token_mask.sum(dim=-1, keepdim=True).float()
        return torch.ceil(real_tokens * factor / self.num_experts).long()

    def cannot_overflow(self, seq_len: int) -> bool:
        """True when no expert can receive more tokens of a sequence than its capacity (e.g. one decoding step)."""
        if self.expert_capacity is not None:
            return self.expert_capacity >= seq_len
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        # capacity = ceil(factor · real / E) >= real for every real <= seq_len when seq_len == 1 or factor >= E.
        return seq_len == 1 or factor >= self.num_experts

    def select(self, router_probs: torch.Tensor, token_mask: torch.Tensor):
        topk_weights, topk_index = router_probs.max(dim=-1, keepdim=True)  # (B, S, 1)
        if self.cannot_overflow(router_probs.shape[1]):
            return topk_weights, topk_index, token_mask.unsqueeze(-1)
        routed = F.one_hot(topk_index.squeeze(-1), self.num_experts) * token_mask.unsqueeze(-1)  # (B, S, E)
        # (B, S): each token's 1-based position in its expert's queue
        priority = (routed.cumsum(dim=1) * routed).sum(dim=-1)
        within_capacity = priority <= self.capacity(token_mask)
        dispatch_mask = (token_mask & within_capacity).unsqueeze(-1)  # (B, S, 1)
        return topk_weights, topk_index, dispatch_mask


class NoisyTopKRouter(TopKRouter):
    """Noisy top-k gating (Shazeer et al. 2017, eq. 3-5).

    In training, ``H(x) = x·W_g + ε · softplus(x·W_noise)`` with ``ε ~ N(0, 1)``; in eval the noise is off.
    Gates are the softmax over the top-k of ``H(x)``, which equals the renormalised top-k of the full softmax.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        num_experts_per_tok: int,
        jitter_noise: float = 0.0,
        combine_weights: str = "router",
        top_p: float | None = None,
    ):
        super().__init__(
            hidden_size,
            num_experts,
            num_experts_per_tok,
            norm_topk_prob=True,
            jitter_noise=jitter_noise,
            combine_weights=combine_weights,
            top_p=top_p,
        )
        self.noise_weight = nn.Parameter(torch.empty(num_experts, hidden_size))

    def compute_logits(self, hidden_states: torch.Tensor, input_ids: torch.Tensor | None) -> torch.Tensor:
        clean_logits = super().compute_logits(hidden_states, input_ids)
        if not self.training:
            return clean_logits
        noise_scale = F.softplus(F.linear(hidden_states.float(), self.noise_weight.float()))
        return clean_logits + torch.randn_like(clean_logits) * noise_scale


class HashRouter(TopKRouter):
    """Hash routing (Roller et al. 2021): each token id goes to a fixed expert; nothing is learned.

    The token → expert table is a balanced random assignment (a seeded permutation of the vocabulary, modulo the
    number of experts) stored as a persistent buffer, so it is saved with the checkpoint. Combine weight is 1.
    `resize_table` follows a resized vocabulary (`model.resize_token_embeddings` calls it).
    """

    learned = False

    def __init__(self, num_experts: int, vocab_size: int):
        nn.Module.__init__(self)
        self.num_experts = num_experts
        self.num_experts_per_tok = 1
        self.jitter_noise = 0.0
        self.register_buffer("hash_table", self.build_table(vocab_size, num_experts), persistent=True)

    @staticmethod
    def build_table(vocab_size: int, num_experts: int, start: int = 0) -> torch.Tensor:
        """The experts of token ids `start .. vocab_size - 1`: a seeded permutation of them, modulo `num_experts`.

        Seeded by `start` as well, so the ids a resize adds get a fixed, balanced assignment of their own, while
        `start=0` is the table of a new model.
        """
        generator = torch.Generator().manual_seed(HASH_ROUTER_SEED + start)
        return torch.randperm(vocab_size - start, generator=generator) % num_experts  # (vocab_size - start,)

    @torch.no_grad()
    def resize_table(self, vocab_size: int) -> None:
        """Fit the table to a vocabulary of `vocab_size` ids: existing ids keep their expert, removed ids are cut,
        added ids get `build_table(vocab_size, num_experts, start=old size)`. An explicit call, never from `forward`.
        """
        table = self.hash_table
        if vocab_size <= table.numel():
            resized = table[:vocab_size].clone()
        else:
            added = self.build_table(vocab_size, self.num_experts, start=table.numel())
            resized = torch.cat([table, added.to(device=table.device, dtype=table.dtype)])
        # the registered buffer is replaced by a tensor of another size, still persistent
        self.hash_table = resized

    def compute_logits(self, hidden_states: torch.Tensor, input_ids: torch.Tensor | None) -> torch.Tensor:
        if input_ids is None:
            raise ValueError(
                "`router_type='hash'` routes by token id: pass `input_ids` (not `inputs_embeds`)."
            )
        expert = self.hash_table[input_ids]  # (B, S)
        # One-hot logits: probabilities put all mass on the hashed expert, for telemetry.
        return F.one_hot(expert, self.num_experts).float() * 1e4

    def select(self, router_probs: torch.Tensor, token_mask: torch.Tensor):
        topk_index = router_probs.argmax(dim=-1, keepdim=True)
        topk_weights = torch.ones_like(topk_index, dtype=router_probs.dtype)
        return topk_weights, topk_index, token_mask.unsqueeze(-1)


class ExpertChoiceRouter(TopKRouter):
    """Expert-choice routing (Zhou et al., NeurIPS 2022): each expert picks its top tokens, not tokens their experts.

    Per sequence with ``n`` real tokens, every expert takes the ``c = min(n, ceil(capacity_factor · n / E))`` real
    tokens with the highest router probability ``S = softmax(x·W)`` (softmax over experts, as in the paper's eq. 1)
    and scales its output for a token by that token's score ``S[t, e]``. Every expert therefore does exactly the
    same work (perfect balance by construction, no load-balancing loss), a token may be taken by 0 to E experts
    (``capacity_factor`` of them on average: the compute of top-k with k = capacity_factor), and padding is never
    picked. Ties go to the earlier token (stable sort), so a sequence is routed the same in any batch.

    Encoder only: the choice depends on every token of the sequence, which a decoder (and `generate()`) does not
    have. The decision is expressed as a `RouterOutput` with E slots: slot e holds expert e when e picked the token
    and -1 otherwise (up to E experts per token: the paper's uncapped variant), so `SparseMoeBlock` dispatches it
    like any other router.
    """

    supports_forced_routing = False  # its own forward: experts choose tokens / two-level gates

    expert_choice = True

    def __init__(self, hidden_size: int, num_experts: int, capacity_factor: float, jitter_noise: float = 0.0):
        super().__init__(
            hidden_size, num_experts, num_experts, norm_topk_prob=False, jitter_noise=jitter_noise
        )
        self.capacity_factor = capacity_factor

    def capacity(self, token_mask: torch.Tensor) -> torch.Tensor:
        """`(B,)` tokens each expert takes in each sequence: ``min(n, ceil(capacity_factor · n / E))``."""
        real_tokens = token_mask.sum(dim=-1)  # (B,)
        # float64: the same rounding as a Python `math.ceil(capacity_factor * n / E)`
        capacity = torch.ceil(real_tokens.double() * self.capacity_factor / self.num_experts).long()
        return torch.minimum(capacity, real_tokens)

    def select(self, router_probs: torch.Tensor, token_mask: torch.Tensor):
        seq_len, num_experts = router_probs.shape[1:]
        # Probabilities are >= 0, so -1 puts padding after every real token of the sequence.
        scores = router_probs.masked_fill(~token_mask.unsqueeze(-1), -1.0).transpose(1, 2)  # (B, E, S)
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices  # (B, E, S)
        positions = torch.arange(seq_len, device=order.device).expand_as(order)
        rank = torch.empty_like(order).scatter_(-1, order, positions)  # (B, E, S): token's place in e's queue
        chosen = (rank < self.capacity(token_mask).view(-1, 1, 1)).transpose(1, 2)  # (B, S, E)
        experts = torch.arange(num_experts, device=router_probs.device).expand_as(chosen)
        topk_index = experts.masked_fill(~chosen, -1)  # (B, S, E): slot e = expert e or -1
        topk_weights = router_probs * chosen
        return topk_weights, topk_index, chosen


class HierarchicalRouter(TopKRouter):
    """Two-level (hierarchical) mixture-of-experts gating (Jordan & Jacobs 1994; Bishop, PRML §14.5.3).

    The E experts form G groups of E/G consecutive experts. A group gate ``softmax(x·W_group)`` picks the
    `num_groups_per_tok` best groups; inside each chosen group an expert gate (a softmax over that group's E/G
    logits of ``x·W``) picks ``num_experts_per_tok / num_groups_per_tok`` experts. A token's combine weight for an
    expert is the product of its group gate and its expert gate, each renormalised over the chosen ones when
    `norm_topk_prob`. `router_probs` is the full two-level distribution ``P(g) · P(e | g)`` over the E experts
    (`router_logits` its log). With one group this is exactly flat top-k routing.
    """

    supports_forced_routing = False  # its own forward: experts choose tokens / two-level gates

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        num_experts_per_tok: int,
        num_groups: int,
        num_groups_per_tok: int = 1,
        norm_topk_prob: bool = True,
        jitter_noise: float = 0.0,
    ):
        super().__init__(hidden_size, num_experts, num_experts_per_tok, norm_topk_prob, jitter_noise)
        self.num_groups = num_groups
        self.num_groups_per_tok = num_groups_per_tok
        self.group_weight = nn.Parameter(torch.empty(num_groups, hidden_size))

    def _top(self, probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        weights, index = torch.topk(probs, k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, index

    def forward(
        self, hidden_states: torch.Tensor, token_mask: torch.Tensor, input_ids: torch.Tensor | None = None
    ) -> RouterOutput:
        groups, group_size = self.num_groups, self.num_experts // self.num_groups
        groups_per_tok = self.num_groups_per_tok
        experts_per_group = self.num_experts_per_tok // groups_per_tok
        router_input = self.router_input(hidden_states)  # one (jittered) input for both levels
        group_logits = F.linear(router_input, self.group_weight.float())  # (B, S, G)
        expert_logits = F.linear(router_input, self.weight.float())  # (B, S, E)
        group_probs = group_logits.softmax(dim=-1)
        group_weights, group_index = self._top(group_probs, groups_per_tok)  # (B, S, g)
        in_group_probs = expert_logits.unflatten(-1, (groups, group_size)).softmax(dim=-1)  # (B, S, G, E/G)
        chosen_groups = in_group_probs.gather(
            2, group_index.unsqueeze(-1).expand(-1, -1, -1, group_size)
        )  # (B, S, g, E/G)
        expert_weights, expert_in_group = self._top(chosen_groups, experts_per_group)  # (B, S, g, k/g)
        topk_index = (group_index.unsqueeze(-1) * group_size + expert_in_group).flatten(2)  # (B, S, k)
        topk_weights = (group_weights.unsqueeze(-1) * expert_weights).flatten(2)  # (B, S, k)
        router_probs = (group_probs.unsqueeze(-1) * in_group_probs).flatten(2)  # (B, S, E)
        router_logits = (
            group_logits.log_softmax(dim=-1).unsqueeze(-1)
            + expert_logits.unflatten(-1, (groups, group_size)).log_softmax(dim=-1)
        ).flatten(2)  # (B, S, E): log P(g) + log P(e | g), so softmax(router_logits) == router_probs
        group_routing = RouterOutput(
            router_logits=group_logits,
            router_probs=group_probs,
            topk_index=group_index,
            topk_weights=group_weights,
            dispatch_mask=token_mask.unsqueeze(-1).expand_as(group_index),
            token_mask=token_mask,
        )
        return RouterOutput(
            router_logits=router_logits,
            router_probs=router_probs,
            topk_index=topk_index,
            topk_weights=topk_weights,
            dispatch_mask=token_mask.unsqueeze(-1).expand_as(topk_index),
            token_mask=token_mask,
            group_routing=group_routing,
            expert_logits=expert_logits,
        )


def build_router(config, hidden_size: int) -> TopKRouter:
    """Build the router named by ``config.router_type`` (``decoder_router_type`` in a decoder stack, when set)."""
    router_type = router_type_of(config)
    if router_type == "topk":
        return TopKRouter(
            hidden_size,
            config.num_experts,
            config.num_experts_per_tok,
            config.norm_topk_prob,
            config.router_jitter_noise,
            getattr(config, "combine_weights", "router"),
            getattr(config, "router_top_p", None),
        )
    if router_type == "switch":
        return SwitchRouter(
            hidden_size,
            config.num_experts,
            capacity_factor=config.capacity_factor,
            eval_capacity_factor=config.eval_capacity_factor,
            expert_capacity=config.expert_capacity,
            jitter_noise=config.router_jitter_noise,
        )
    if router_type == "noisy_topk":
        return NoisyTopKRouter(
            hidden_size,
            config.num_experts,
            config.num_experts_per_tok,
            config.router_jitter_noise,
            getattr(config, "combine_weights", "router"),
            getattr(config, "router_top_p", None),
        )
    if router_type == "hash":
        return HashRouter(config.num_experts, config.vocab_size)
    if router_type == "expert_choice":
        if getattr(config, "is_decoder", False):
            raise ValueError(EXPERT_CHOICE_DECODER_ERROR)
        capacity_factor = getattr(config, "expert_capacity_factor", None)
        return ExpertChoiceRouter(
            hidden_size,
            config.num_experts,
            capacity_factor if capacity_factor is not None else config.num_experts_per_tok,
            config.router_jitter_noise,
        )
    if router_type == "hierarchical":
        return HierarchicalRouter(
            hidden_size,
            config.num_experts,
            config.num_experts_per_tok,
            num_groups=config.router_groups,
            num_groups_per_tok=config.num_groups_per_tok,
            norm_topk_prob=config.norm_topk_prob,
            jitter_noise=config.router_jitter_noise,
        )
    raise ValueError(f"`router_type` must be one of {ROUTER_TYPES}, got {config.router_type!r}")
