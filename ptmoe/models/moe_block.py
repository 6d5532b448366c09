"""The experts and the sparse MoE block that dispatches tokens to them.

`MoeExpert` is one feed-forward expert of plain `nn.Linear` layers; `SparseMoeBlock` runs the router, sends each
expert only the tokens routed to it and combines their outputs (plus the shared experts). Part of the model code
that travels inside Hub checkpoints: it imports only torch, transformers and its sibling modules, never ``ptmoe``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from .routers import RouterOutput, build_router


# --------------------------------------------------------------------------------------------------------------
# Experts and the sparse MoE block
# --------------------------------------------------------------------------------------------------------------
class MoeExpert(nn.Module):
    """One feed-forward expert made of plain `nn.Linear` layers.

    Plain FFN (BERT, T5 v1.0): ``wo(dropout(act(wi(x))))``. Gated FFN (T5 v1.1): ``wo(dropout(act(wi_0(x)) * wi_1(x)))``.
    The names ``wi``/``wi_0``/``wi_1``/``wo`` are a user-facing contract (PEFT regexes, bitsandbytes, upcycling).
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        hidden_act: str,
        gated: bool = False,
        bias: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.gated = gated
        if gated:
            self.wi_0 = nn.Linear(hidden_size, intermediate_size, bias=bias)
            self.wi_1 = nn.Linear(hidden_size, intermediate_size, bias=bias)
        else:
            self.wi = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.wo = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act = ACT2FN[hidden_act]
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def has_plain_fp32_weights(self) -> bool:
        """True when every projection holds an fp32 weight tensor (not bitsandbytes or torch.ao quantized; PEFT LoRA
        layers expose their base layer's weight)."""
        projections = (self.wi_0, self.wi_1, self.wo) if self.gated else (self.wi, self.wo)
        weights = [getattr(projection, "weight", None) for projection in projections]
        return all(isinstance(w, torch.Tensor) and w.dtype == torch.float32 for w in weights)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.gated:
            hidden_states = self.act(self.wi_0(hidden_states)) * self.wi_1(hidden_states)
        else:
            hidden_states = self.act(self.wi(hidden_states))
        hidden_states = self.dropout(hidden_states)
        # `getattr`: quantized linears may expose no weight tensor (torch.ao dynamic INT8: `weight()` is a method).
        wo_dtype = getattr(self.wo.weight, "dtype", None)
        if wo_dtype is not None and wo_dtype.is_floating_point and hidden_states.dtype != wo_dtype:
            hidden_states = hidden_states.to(wo_dtype)  # e.g. T5 keeps `wo` in fp32 under fp16
        return self.wo(hidden_states)


class SparseMoeBlock(nn.Module):
    """Router + `experts.{i}` (+ always-active `shared_experts.{j}`), replacing a dense feed-forward network.

    Args:
        config: a ptmoe MoE config (router fields, `num_experts`, `num_shared_experts`, `vocab_size`).
        hidden_size (`int`), intermediate_size (`int`), hidden_act (`str`), gated (`bool`), bias (`bool`),
        dropout (`float`): the shape of every expert, as in the dense FFN it replaces. `dropout` is the dropout the
            dense FFN applies between its projections (T5: `dropout_rate`; BERT: none); `config.expert_dropout`,
            when set, replaces it inside the experts only (Switch Transformer's expert dropout).
    """

    def __init__(
        self,
        config,
        hidden_size: int,
        intermediate_size: int,
        hidden_act: str,
        gated: bool = False,
        bias: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.num_experts = config.num_experts
        self.router = build_router(config, hidden_size)
        if getattr(config, "expert_dropout", None) is not None:
            dropout = config.expert_dropout
        expert_args = (hidden_size, intermediate_size, hidden_act, gated, bias, dropout)
        self.experts = nn.ModuleList([MoeExpert(*expert_args) for _ in range(config.num_experts)])
        # The shared experts may be wider than the routed ones (the importance split keeps its top neurons there).
        shared_size = getattr(config, "shared_expert_intermediate_size", None) or intermediate_size
        shared_args = (hidden_size, shared_size, hidden_act, gated, bias, dropout)
        self.shared_experts = (
            nn.ModuleList([MoeExpert(*shared_args) for _ in range(config.num_shared_experts)])
            if config.num_shared_experts > 0
            else None
        )

    def _expert_forward(self, expert: MoeExpert, expert_input: torch.Tensor) -> torch.Tensor:
        """`expert(expert_input)`, with 2 or 3 rows padded to 4 in CPU fp32 inference (the padding is dropped).

        The fp32 matrix product torch uses on x86 CPUs (MKL) is slower for 2 or 3 rows than for 4: an expert of
        T5-base shape (768 → 3072 → 768, weights not in cache) took 2.14 / 2.69 ms for 2 / 3 rows against
        2.00 ms for 4 (1.29 ms for 1 row, a matrix-vector product), and inside `generate()` 2.5 / 3.0 ms against
        2.0 ms for 8 rows; the same step shows at 1024 → 4096 and on one thread. Decoding sends a handful of
        tokens to each expert, so such calls are common there. Each row is computed on its own, so real rows change
        only by float rounding. Only experts with plain fp32 weights are padded (quantized layers use other kernels,
        and torch.ao's dynamic INT8 scales activations over all rows); bf16/fp16 kernels show no such step, and
        training is left as it is.
        """
        rows = expert_input.shape[0]
        if (
            1 < rows < 4
            and not self.training
            and expert_input.dtype == torch.float32
            and expert_input.device.type == "cpu"
            and expert.has_plain_fp32_weights()
        ):
            return expert(F.pad(expert_input, (0, 0, 0, 4 - rows)))[:rows]
        return expert(expert_input)

    def forward(
        self,
        hidden_states: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, RouterOutput]:
        """
        Args:
            hidden_states (`torch.Tensor` of shape `(B, S, H)`)
            token_mask (`torch.BoolTensor` of shape `(B, S)`, *optional*): False for padding tokens.
            input_ids (`torch.LongTensor` of shape `(B, S)`, *optional*): needed by the hash router only.

        Returns:
            `(output, router_output)` with `output` of shape `(B, S, H)`.
        """
        batch_size, seq_len, hidden_size = hidden_states.shape
        if token_mask is None:
            token_mask = torch.ones(batch_size, seq_len, dtype=torch.bool, device=hidden_states.device)
        routing = self.router(hidden_states, token_mask, input_ids)

        flat_states = hidden_states.reshape(-1, hidden_size)  # (N, H)
        k = routing.topk_index.shape[-1]
        # Group the (token, slot) pairs by expert with one sort. Pairs that are not dispatched (padding, capacity
        # overflow) get the id `num_experts`, so they sort last and are never computed.
        slot_expert = routing.topk_index.reshape(-1).masked_fill(
            ~routing.dispatch_mask.reshape(-1), self.num_experts
        )  # (N*k,)
        order = torch.argsort(slot_expert, stable=True)
        counts = torch.bincount(slot_expert, minlength=self.num_experts + 1).tolist()  # the one host sync
        dispatched = len(order) - counts[-1]
        order = order[:dispatched]
        tokens = order // k if k > 1 else order  # (D,) token row of each dispatched pair, grouped by expert
        weights = routing.topk_weights.reshape(-1)[order].unsqueeze(-1)  # (D, 1)
        # Per expert: gather its own rows, run it, scatter-add its weighted output. Gathering per expert (not all
        # N*k rows into one buffer, then `cat` + one scatter) keeps each expert's rows in cache: for many small
        # experts (E=64, k=16, BERT-base FFN, 2048 tokens) the one-buffer version moved k copies of the hidden
        # states through memory three times and took 472 ms per layer against 140 ms per expert (dense FFN:
        # 338 ms); grouped/batched matmuls over stacked weights (`torch.nn.functional.grouped_mm`, padded `bmm`)
        # took 680 / 490 ms there and need one stacked weight tensor, which LoRA per expert and 4-bit cannot give.
        output = torch.zeros_like(flat_states)
        split = counts[:-1]
        for expert, expert_tokens, expert_weights in zip(
            self.experts, tokens.split(split), weights.split(split), strict=True
        ):
            if expert_tokens.shape[0] == 0:
                continue
            expert_output = self._expert_forward(expert, flat_states.index_select(0, expert_tokens))
            # `.to`: an fp32 `wo` (T5's `_keep_in_fp32_modules` under fp16 loads) returns fp32 expert outputs.
            weighted = expert_output * expert_weights.to(expert_output.dtype)
            output.index_add_(0, expert_tokens, weighted.to(output.dtype))

        output = output.view(batch_size, seq_len, hidden_size)
        if self.shared_experts is not None:
            for shared_expert in self.shared_experts:
                output = output + shared_expert(hidden_states)
        return output, routing
