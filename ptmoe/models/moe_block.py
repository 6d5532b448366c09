"""The experts and the sparse MoE block that dispatches tokens to them.

`MoeExpert` is one feed-forward expert of plain `nn.Linear` layers; `SparseMoeBlock` runs the router, sends each
expert only the tokens routed to it and combines their outputs (plus the shared experts). Part of the model code
that travels inside Hub checkpoints: it imports only torch, transformers and its sibling modules, never ``ptmoe``.
"""

from __future__ import annotations

import weakref
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from .routers import RouterOutput, build_router

# The labels `SparseMoeBlock` gives its stages under `torch.profiler` (`scripts/bench_sparse.py --profile` reads them).
PROFILE_REGIONS = ("ptmoe.router", "ptmoe.dispatch", "ptmoe.gather", "ptmoe.experts", "ptmoe.combine")


def _region(name: str, profiling: bool):
    """A `record_function` label while a profiler runs, else nothing: the labels cost nothing when not profiling
    (`record_function` itself costs a few microseconds per call, and a forward enters five per MoE layer)."""
    return torch.profiler.record_function(name) if profiling else nullcontext()


def _row_bucket(rows: int) -> int:
    """`rows` rounded up to the next of 8 evenly spaced steps per power of two above 16 (17 → 18, 100 → 104,
    256 → 256, 257 → 288): few distinct row counts, at most 1/8 more rows (see `SparseMoeBlock._expert_forward`)."""
    if rows <= 16:
        return rows
    step = 1 << (rows.bit_length() - 4)
    return -(-rows // step) * step


# --------------------------------------------------------------------------------------------------------------
# bf16 CPU inference: expert weights reordered once for oneDNN
# --------------------------------------------------------------------------------------------------------------
# torch runs a bf16 `nn.Linear` on CPU through oneDNN, which reorders the plain weight into its blocked layout on
# every call. A dense FFN pays that twice per layer; E experts pay it 2E times, on products of a few hundred rows
# or fewer. Reordered once (`torch.ops.mkldnn._reorder_linear_weight`, the packing inductor's freezing uses) and run
# with `torch.ops.mkldnn._linear_pointwise`, the results are bit-identical and a 768 → 384 bf16 product on one AMX
# core took 26 / 44 / 127 µs for 8 / 32 / 256 rows against 61 / 67 / 178 µs (768 → 3072: 238 / 263 / 914 against
# 386 / 450 / 1,246 µs). The reordered copy costs the weights' size once more in memory; it is rebuilt when a
# weight changes (new tensor or in-place update) and is never used while autograd records.
# nn.Linear → ((data_ptr, version, shape) of the weight it was built from, reordered weight)
_PACKED_WEIGHTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_ONEDNN_BF16 = None


def _onednn_bf16() -> bool:
    global _ONEDNN_BF16
    if _ONEDNN_BF16 is None:
        try:
            _ONEDNN_BF16 = bool(
                torch.backends.mkldnn.is_available()
                and torch.ops.mkldnn._is_mkldnn_bf16_supported()
                and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
                and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            )
        except (AttributeError, RuntimeError):
            _ONEDNN_BF16 = False
    return _ONEDNN_BF16


def _project(linear: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """`linear(hidden_states)`, with the weight reordered once for oneDNN in CPU bf16 inference (see above).
    Anything else (training with autograd, other dtypes or devices, LoRA or quantized layers: only a plain
    `nn.Linear` qualifies) calls the layer itself."""
    weight = getattr(linear, "weight", None)
    if (
        type(linear) is not nn.Linear
        or hidden_states.dtype != torch.bfloat16
        or weight.dtype != torch.bfloat16
        or hidden_states.device.type != "cpu"
        or weight.device.type != "cpu"
        or torch.is_grad_enabled()
        or weight.is_inference()  # created under inference_mode: no version counter to watch
        or not _onednn_bf16()
    ):
        return linear(hidden_states)
    key = (weight.data_ptr(), weight._version, tuple(weight.shape))
    cached = _PACKED_WEIGHTS.get(linear)
    if cached is None or cached[0] != key:
        cached = (key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 256))
        _PACKED_WEIGHTS[linear] = cached
    return torch.ops.mkldnn._linear_pointwise(hidden_states, cached[1], linear.bias, "none", [], "")


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

    def has_plain_weights(self, dtype: torch.dtype = torch.float32) -> bool:
        """True when every projection holds a floating-point weight tensor of `dtype` (not bitsandbytes or torch.ao
        quantized; PEFT LoRA layers expose their base layer's weight)."""
        projections = (self.wi_0, self.wi_1, self.wo) if self.gated else (self.wi, self.wo)
        weights = [getattr(projection, "weight", None) for projection in projections]
        return all(isinstance(w, torch.Tensor) and w.dtype == dtype for w in weights)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.gated:
            hidden_states = self.act(_project(self.wi_0, hidden_states)) * _project(self.wi_1, hidden_states)
        else:
            hidden_states = self.act(_project(self.wi, hidden_states))
        hidden_states = self.dropout(hidden_states)
        # `getattr`: quantized linears may expose no weight tensor (torch.ao dynamic INT8: `weight()` is a method).
        wo_dtype = getattr(self.wo.weight, "dtype", None)
        if wo_dtype is not None and wo_dtype.is_floating_point and hidden_states.dtype != wo_dtype:
            hidden_states = hidden_states.to(wo_dtype)  # e.g. T5 keeps `wo` in fp32 under fp16
        return _project(self.wo, hidden_states)


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
        """`expert(expert_input)`, with its rows padded in CPU inference where the padded product is faster (the
        padding rows are zeros and are dropped; each row is computed on its own, so real rows change at most by
        float rounding). Training, GPUs and quantized experts get their own rows.

        - fp32, 2 or 3 rows → 4. The fp32 matrix product torch uses on x86 CPUs (MKL) is slower for 2 or 3 rows than
          for 4: an expert of T5-base shape (768 → 3072 → 768, weights not in cache) took 2.14 / 2.69 ms for 2 / 3
          rows against 2.00 ms for 4 (1.29 ms for 1 row, a matrix-vector product), and inside `generate()`
          2.5 / 3.0 ms against 2.0 ms for 8 rows. Decoding sends a handful of tokens to each expert.
        - bf16 / fp16, more than 16 rows → the next of 8 steps per power of two (`_row_bucket`: at most 1/8 more
          rows). torch runs these products through oneDNN, which builds a kernel ("primitive") for every new row
          count and caches it; an expert's row count changes with every batch, so without buckets nearly every call
          built one: a 768 → 768 bf16 linear on one AMX core took 1.17 ms at a repeated row count, 1.95 ms at fresh
          row counts between 200 and 312, 1.26 ms at those counts rounded up to multiples of 32; a BERT-base E=8/k=2
          model in bf16 took 228 ms per 8 × 128 batch on a repeated batch and 460 ms on fresh batches (dense: 254 /
          286 ms). torch.ao dynamic INT8 showed no such cost (and scales activations over all rows).
        """
        rows = expert_input.shape[0]
        if self.training or expert_input.device.type != "cpu":
            return expert(expert_input)
        dtype = expert_input.dtype
        if dtype == torch.float32:
            padded = 4 if 1 < rows < 4 else rows
        elif dtype in (torch.bfloat16, torch.float16):
            padded = _row_bucket(rows)
        else:
            padded = rows
        if padded == rows or not expert.has_plain_weights(dtype):
            return expert(expert_input)
        return expert(F.pad(expert_input, (0, 0, 0, padded - rows)))[:rows]

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
        profiling = torch.autograd._profiler_enabled()
        if token_mask is None:
            token_mask = torch.ones(batch_size, seq_len, dtype=torch.bool, device=hidden_states.device)
        with _region("ptmoe.router", profiling):
            routing = self.router(hidden_states, token_mask, input_ids)

        flat_states = hidden_states.reshape(-1, hidden_size)  # (N, H)
        k = routing.topk_index.shape[-1]
        with _region("ptmoe.dispatch", profiling):
            # Group the (token, slot) pairs by expert with one sort. Pairs that are not dispatched (padding,
            # capacity overflow) get the id `num_experts`, so they sort last and are never computed.
            slot_expert = routing.topk_index.reshape(-1).masked_fill(
                ~routing.dispatch_mask.reshape(-1), self.num_experts
            )  # (N*k,)
            order = torch.argsort(slot_expert, stable=True)
            counts = torch.bincount(slot_expert, minlength=self.num_experts + 1).tolist()  # the one host sync
            dispatched = len(order) - counts[-1]
            pairs = order[:dispatched]  # (D,) dispatched (token, slot) pairs, grouped by expert
            tokens = pairs // k if k > 1 else pairs  # (D,) the token row of each
        split = counts[:-1]
        if not torch.is_grad_enabled() and (k == 1 or len(order) <= self.sorted_dispatch_max_pairs):
            output = self._combine_sorted(flat_states, routing, order, pairs, tokens, split, profiling)
        else:
            output = self._combine_per_expert(flat_states, routing, pairs, tokens, split, profiling)

        output = output.view(batch_size, seq_len, hidden_size)
        if self.shared_experts is not None:
            with _region("ptmoe.experts", profiling):
                for shared_expert in self.shared_experts:
                    output = output + shared_expert(hidden_states)
        return output, routing

    # Inference with one expert per token or few (token, slot) pairs: one gather, per-expert slices, one gather
    # back (see `_combine_sorted` for when it wins and loses).
    sorted_dispatch_max_pairs = 512

    def _weights_are_ones(self) -> bool:
        return getattr(self.router, "combine_weights", "router") == "ones"

    def _combine_per_expert(self, flat_states, routing, pairs, tokens, split, profiling) -> torch.Tensor:
        """Per expert: gather its own rows, run it, scatter-add its weighted output (training, and many experts per
        token).

        Gathering per expert (not all N*k rows into one buffer, then `cat` + one scatter) keeps each expert's rows
        in cache: for many small experts (E=64, k=16, BERT-base FFN, 2048 tokens) the one-buffer version moved k
        copies of the hidden states through memory three times and took 472 ms per layer against 140 ms per
        expert (dense FFN: 338 ms); grouped/batched matmuls over stacked weights (`grouped_mm`, padded `bmm`)
        took 680 / 490 ms there and need one stacked weight tensor, which LoRA per expert and 4-bit cannot give.
        """
        weights = routing.topk_weights.reshape(-1)[pairs].unsqueeze(-1)  # (D, 1)
        ones = self._weights_are_ones()
        output = torch.zeros_like(flat_states)
        for expert, expert_tokens, expert_weights in zip(
            self.experts, tokens.split(split), weights.split(split), strict=True
        ):
            if expert_tokens.shape[0] == 0:
                continue
            with _region("ptmoe.gather", profiling):
                expert_input = flat_states.index_select(0, expert_tokens)
            with _region("ptmoe.experts", profiling):
                expert_output = self._expert_forward(expert, expert_input)
            with _region("ptmoe.combine", profiling):
                # `.to`: an fp32 `wo` (T5's `_keep_in_fp32_modules` under fp16 loads) returns fp32 expert outputs.
                if not ones:  # `combine_weights="ones"`: a multiply by 1 costs a pass over the rows
                    expert_output = expert_output * expert_weights.to(expert_output.dtype)
                output.index_add_(0, expert_tokens, expert_output.to(output.dtype))
        return output

    def _combine_sorted(self, flat_states, routing, order, pairs, tokens, split, profiling) -> torch.Tensor:
        """One gather of every dispatched row into an expert-sorted buffer, each expert on its slice of it, and one
        gather back into (token, slot) order summed over the k slots (inference; k = 1 or few pairs).

        Why: in bf16 on an AMX CPU the experts' products take only about half of a sparse layer (one-layer
        `torch.profiler` run, BERT-base FFN split E=8/k=2, 1,024 tokens); the rest is per-expert overhead, chiefly
        `index_add_` (bf16 scatter-add is not vectorised: ~100 µs per 256-row block). Here each expert costs
        one module call on a view, and rows return by the inverse permutation (undispatched pairs read one extra
        zero row). Measured against the per-expert path (one layer, 1 thread, loaded machine, 11 rounds,
        per-expert / sorted time): E=4/k=1 1,024 tokens 1.11 fp32, 1.18 bf16; 32 tokens 1.15 / 1.12; E=8/k=2
        32 tokens 1.10 / 1.15 — but E=8/k=2 1,024 tokens 0.79 / 0.87 and E=64/k=16 2,048 tokens 0.47 / 0.33:
        with many pairs the buffers are k copies of the hidden states, out of cache, which the per-expert path
        never builds. Hence `sorted_dispatch_max_pairs`.
        """
        num_pairs, hidden_size = order.shape[0], flat_states.shape[-1]
        k = num_pairs // flat_states.shape[0]
        with _region("ptmoe.gather", profiling):
            expert_input = flat_states.index_select(0, tokens)  # (D, H), grouped by expert
        with _region("ptmoe.experts", profiling):
            outputs = [
                self._expert_forward(expert, rows)
                for expert, rows in zip(self.experts, expert_input.split(split), strict=True)
                if rows.shape[0]
            ]
        with _region("ptmoe.combine", profiling):
            # `.to`: an fp32 `wo` (T5's `_keep_in_fp32_modules` under fp16 loads) returns fp32 expert outputs.
            dtype = outputs[0].dtype if outputs else flat_states.dtype
            outputs.append(flat_states.new_zeros(1, hidden_size, dtype=dtype))  # read by undispatched pairs
            expert_output = torch.cat(outputs)  # (D + 1, H)
            position = torch.full((num_pairs,), pairs.shape[0], dtype=torch.long, device=order.device)
            position[pairs] = torch.arange(pairs.shape[0], device=order.device)  # (N*k,) row of each pair
            gathered = expert_output.index_select(0, position).view(-1, k, hidden_size)  # (N, k, H)
            if not self._weights_are_ones():
                gathered = gathered * routing.topk_weights.reshape(-1, k, 1).to(dtype)
            output = gathered.sum(1) if k > 1 else gathered.view(-1, hidden_size)
        return output.to(flat_states.dtype)
