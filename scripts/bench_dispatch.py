"""Expert dispatch for many small experts: ptmoe's per-expert path next to the alternatives, one FFN layer, one run.

    python scripts/bench_dispatch.py             # BERT-base FFN (768 -> 3072), 128 and 2048 tokens, E/k 8/2 .. 64/16
    python scripts/bench_dispatch.py --quick     # tiny shapes, to check the script works

Options timed round-robin (one call of each per round, median of per-round times):

- ``dense``: the dense FFN the experts were split from (all 3072 neurons for every token);
- ``ptmoe``: `SparseMoeBlock`'s dispatch (one sort; per expert: gather its rows, run `experts.{i}`, weighted
  scatter-add);
- ``one_buffer``: the previous dispatch (gather all N*k rows into one buffer, run each expert on its slice, `cat`,
  one weighted scatter-add);
- ``grouped_mm``: `torch.nn.functional.grouped_mm` over weights stacked once beforehand (what transformers' experts
  interface does for fused 3-D expert tensors; the stacking itself is not timed);
- ``bmm_padded``: tokens gathered into an (E, max_count, H) padded block, `baddbmm` with the stacked weights.

Every option is checked against ``ptmoe`` before timing. The routing is random top-k (each token picks k distinct
experts), which is what a sparsified model's fitted router does on average.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import ptmoe


def build(hidden: int, intermediate: int, num_experts: int, k: int, tokens: int, seed: int = 0):
    config = ptmoe.MoeBertConfig(
        hidden_size=hidden, num_experts=num_experts, num_experts_per_tok=k, num_attention_heads=1
    )
    torch.manual_seed(seed)
    block = ptmoe.SparseMoeBlock(config, hidden, intermediate // num_experts, "gelu").eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.02)
    dense = ptmoe.models.moe.MoeExpert(hidden, intermediate, "gelu").eval()
    x = torch.randn(1, tokens, hidden)  # (B, S, H)
    index = torch.rand(tokens, num_experts).argsort(dim=-1)[:, :k]  # (N, k) distinct random experts
    weights = torch.full((tokens, k), 1.0 / k)
    return block, dense, x, index, weights


def _sorted(index: torch.Tensor, num_experts: int):
    k = index.shape[-1]
    order = torch.argsort(index.reshape(-1), stable=True)
    counts = torch.bincount(index.reshape(-1), minlength=num_experts)
    return order, counts, order // k


class FixedRouter(torch.nn.Module):
    """Returns a given `RouterOutput`: times the block's dispatch without a router in the way."""

    def __init__(self, routing):
        super().__init__()
        self.routing = routing

    def forward(self, *args):
        return self.routing


def ptmoe_dispatch(block, x, index, weights):
    # The block's own forward with its router replaced by the fixed routing.
    token_mask = torch.ones(x.shape[:2], dtype=torch.bool)
    routing = ptmoe.RouterOutput(
        router_logits=torch.zeros(*x.shape[:2], block.num_experts),
        router_probs=torch.zeros(*x.shape[:2], block.num_experts),
        topk_index=index.view(*x.shape[:2], -1),
        topk_weights=weights.view(*x.shape[:2], -1),
        dispatch_mask=token_mask.unsqueeze(-1).expand(*x.shape[:2], index.shape[-1]),
        token_mask=token_mask,
    )
    router = block.router
    block.router = FixedRouter(routing)
    try:
        return block(x)[0].view(-1, x.shape[-1])
    finally:
        block.router = router


def one_buffer(block, x, index, weights):
    flat = x.view(-1, x.shape[-1])
    order, counts, tokens = _sorted(index, block.num_experts)
    inputs = flat.index_select(0, tokens).split(counts.tolist())
    outputs = [expert(rows) for expert, rows in zip(block.experts, inputs, strict=True) if rows.shape[0]]
    out = torch.zeros_like(flat)
    out.index_add_(0, tokens, torch.cat(outputs) * weights.reshape(-1)[order].unsqueeze(-1))
    return out


def stacked(block):
    wi = torch.stack([e.wi.weight.T for e in block.experts])  # (E, H, I_e)
    wo = torch.stack([e.wo.weight.T for e in block.experts])  # (E, I_e, H)
    bi = torch.stack([e.wi.bias for e in block.experts])  # (E, I_e)
    bo = torch.stack([e.wo.bias for e in block.experts])  # (E, H)
    return wi.contiguous(), wo.contiguous(), bi, bo


def grouped_mm(block, x, index, weights, weights_stacked):
    wi, wo, bi, bo = weights_stacked
    flat = x.view(-1, x.shape[-1])
    order, counts, tokens = _sorted(index, block.num_experts)
    offsets = counts.cumsum(0).to(torch.int32)
    expert_of_row = torch.repeat_interleave(torch.arange(block.num_experts), counts)
    hidden = F.gelu(F.grouped_mm(flat.index_select(0, tokens), wi, offs=offsets) + bi[expert_of_row])
    rows = F.grouped_mm(hidden, wo, offs=offsets) + bo[expert_of_row]
    out = torch.zeros_like(flat)
    out.index_add_(0, tokens, rows * weights.reshape(-1)[order].unsqueeze(-1))
    return out


def bmm_padded(block, x, index, weights, weights_stacked):
    wi, wo, bi, bo = weights_stacked
    flat = x.view(-1, x.shape[-1])
    order, counts, tokens = _sorted(index, block.num_experts)
    expert_of_row = index.reshape(-1)[order]
    position = torch.arange(len(order)) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    padded = flat.new_zeros(block.num_experts, int(counts.max()), flat.shape[-1])  # (E, C, H)
    padded[expert_of_row, position] = flat.index_select(0, tokens)
    hidden = F.gelu(torch.baddbmm(bi.unsqueeze(1), padded, wi))
    rows = torch.baddbmm(bo.unsqueeze(1), hidden, wo)[expert_of_row, position]
    out = torch.zeros_like(flat)
    out.index_add_(0, tokens, rows * weights.reshape(-1)[order].unsqueeze(-1))
    return out


@torch.no_grad()
def measure(hidden, intermediate, num_experts, k, tokens, runs) -> dict[str, float]:
    block, dense, x, index, weights = build(hidden, intermediate, num_experts, k, tokens)
    weights_stacked = stacked(block)
    options = {
        "dense": lambda: dense(x),
        "ptmoe": lambda: ptmoe_dispatch(block, x, index, weights),
        "one_buffer": lambda: one_buffer(block, x, index, weights),
        "grouped_mm": lambda: grouped_mm(block, x, index, weights, weights_stacked),
        "bmm_padded": lambda: bmm_padded(block, x, index, weights, weights_stacked),
    }
    reference = options["ptmoe"]()
    for name in ("one_buffer", "grouped_mm", "bmm_padded"):
        torch.testing.assert_close(options[name](), reference, atol=1e-4, rtol=1e-4)
    times: dict[str, list[float]] = {name: [] for name in options}
    for _ in range(runs + 1):  # the first round warms up
        for name, call in options.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values[1:]) * 1e3 for name, values in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 rounds")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        hidden, intermediate, token_counts, runs = 64, 256, (16,), 2
    else:
        hidden, intermediate, token_counts, runs = 768, 3072, (128, 2048), args.runs
    print(f"one FFN layer {hidden} -> {intermediate}, {args.threads} threads, median ms of {runs} rounds")
    for tokens in token_counts:
        for num_experts, k in ((8, 2), (16, 4), (32, 8), (64, 16)):
            result = measure(hidden, intermediate, num_experts, k, tokens, runs)
            cells = "  ".join(f"{name} {ms:8.2f}" for name, ms in result.items())
            print(f"tokens {tokens:5d}  E={num_experts:2d} k={k:2d}  {cells}", flush=True)


if __name__ == "__main__":
    from ptmoe.errors import run_script

    run_script(main)
