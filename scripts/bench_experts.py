"""Expert representation benchmark: today's per-expert `nn.ModuleList` against fused 3-D expert tensors.

Evidence for the expert-parallelism decision (docs/distributed.md). transformers' expert parallelism
(`DistributedConfig(ep_size=…)`) shards a fused 3-D expert tensor (`up_proj [E, d_ff, d]`, `down_proj [E, d, d_ff]`)
along its expert dimension and replaces the experts' forward; ptmoe keeps one `MoeExpert` of `nn.Linear`s per
expert. This script measures, in one run and on the same weights and routing:

1. speed: the forward and forward + backward of a ptmoe `SparseMoeBlock` (router + per-expert dispatch) against
   the same router followed by a fused experts module under transformers' experts interface (`eager` loop,
   `batched_mm`, `grouped_mm`), timed round-robin (one call of each per round; ratios are medians of per-round
   ratios, with the lowest and highest);
2. LoRA per expert: PEFT `target_modules` on the per-expert `nn.Linear`s against PEFT `target_parameters` on the
   fused tensors (trainable parameters, forward + backward time of a LoRA step, and whether a subset of the experts
   can be chosen, as ESFT does);
3. 4-bit: how much of the expert weights bitsandbytes' replacement (what `load_in_4bit` runs) turns into 4-bit.

The fused module here is a measuring prototype, not a second representation: ptmoe's models use the ModuleList.

    python scripts/bench_experts.py            # BERT-base expert shape (768 → 3072), 8 experts, top-2, 2048 tokens
    python scripts/bench_experts.py --quick    # tiny shapes, 2 rounds (CI)
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch
from torch import nn
from transformers.integrations.moe import use_experts_implementation

from ptmoe.models.moe import SparseMoeBlock

SHAPES = {
    "full": dict(hidden=768, ffn=3072, experts=8, k=2, tokens=2048, rounds=9),
    "quick": dict(hidden=32, ffn=64, experts=4, k=2, tokens=64, rounds=2),
}
IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")
BATCHED_MM_LIMIT = 2 * 2**30  # bytes


def batched_mm_bytes(shape: dict) -> int:
    """fp32 bytes `batched_mm` gathers for the up projection: one `(d_ff, d)` matrix per (token, slot) pair."""
    return shape["tokens"] * shape["k"] * shape["ffn"] * shape["hidden"] * 4


@use_experts_implementation(has_gate=False, has_bias=True)
class FusedExperts(nn.Module):
    """All experts of one `SparseMoeBlock` as 3-D tensors (the layout transformers' EP and experts kernels use)."""

    def __init__(self, config, experts: nn.ModuleList):
        super().__init__()
        self.num_experts = len(experts)
        self.up_proj = nn.Parameter(
            torch.stack([e.wi.weight.detach() for e in experts]).clone()
        )  # (E, d_ff, d)
        self.up_proj_bias = nn.Parameter(
            torch.stack([e.wi.bias.detach() for e in experts]).clone()
        )  # (E, d_ff)
        self.down_proj = nn.Parameter(
            torch.stack([e.wo.weight.detach() for e in experts]).clone()
        )  # (E, d, d_ff)
        self.down_proj_bias = nn.Parameter(
            torch.stack([e.wo.bias.detach() for e in experts]).clone()
        )  # (E, d)
        self.act_fn = experts[0].act

    def forward(self, hidden_states, top_k_index, top_k_weights):
        """Eager loop over the experts that received tokens (the `eager` implementation, as in Mixtral)."""
        output = torch.zeros_like(hidden_states)  # (N, d)
        for expert in top_k_index.unique().tolist():
            token, slot = torch.where(top_k_index == expert)
            h = self.act_fn(
                nn.functional.linear(hidden_states[token], self.up_proj[expert], self.up_proj_bias[expert])
            )
            h = nn.functional.linear(h, self.down_proj[expert], self.down_proj_bias[expert])
            output.index_add_(0, token, h * top_k_weights[token, slot, None])
        return output


class PerExpert(nn.Module):
    """ptmoe's block: router + `experts.{i}` ModuleList + dispatch."""

    def __init__(self, block: SparseMoeBlock):
        super().__init__()
        self.block = block

    def forward(self, hidden_states):  # (B, S, d)
        return self.block(hidden_states)[0]


class Fused(nn.Module):
    """The same router, then the fused experts under one of transformers' experts implementations."""

    def __init__(self, block: SparseMoeBlock, implementation: str):
        super().__init__()
        self.router = block.router
        self.experts = FusedExperts(SimpleNamespace(_experts_implementation=implementation), block.experts)

    def forward(self, hidden_states):  # (B, S, d)
        batch, seq, hidden = hidden_states.shape
        token_mask = torch.ones(batch, seq, dtype=torch.bool)
        routing = self.router(hidden_states, token_mask)
        k = routing.topk_index.shape[-1]
        out = self.experts(
            hidden_states.reshape(-1, hidden),
            routing.topk_index.reshape(-1, k),
            routing.topk_weights.reshape(-1, k).to(hidden_states.dtype),
        )
        return out.view(batch, seq, hidden)


def build(shape: dict) -> tuple[dict[str, nn.Module], torch.Tensor]:
    config = SimpleNamespace(
        num_experts=shape["experts"], num_experts_per_tok=shape["k"], router_type="topk", norm_topk_prob=True,
        router_jitter_noise=0.0, num_shared_experts=0, vocab_size=10,
    )  # fmt: skip
    torch.manual_seed(0)
    block = SparseMoeBlock(config, shape["hidden"], shape["ffn"], "gelu")
    for module in block.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.normal_(module.bias, std=0.02)
    nn.init.normal_(block.router.weight, std=0.5)
    variants = {"per-expert ModuleList (ptmoe)": PerExpert(block)}
    for implementation in IMPLEMENTATIONS:
        gathered = batched_mm_bytes(shape)
        if implementation == "batched_mm" and gathered > BATCHED_MM_LIMIT:
            # batched_mm gathers one weight matrix per (token, slot) pair: measured here as an allocation failure.
            print(f"fused batched_mm skipped: it would gather {gathered / 2**30:.1f} GiB of expert weights")
            continue
        variants[f"fused {implementation}"] = Fused(block, implementation)
    hidden_states = torch.randn(shape["tokens"] // 128 or 1, min(128, shape["tokens"]), shape["hidden"])
    return variants, hidden_states


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_round_robin(variants: dict[str, nn.Module], inputs: torch.Tensor, rounds: int) -> dict[str, dict]:
    """Per variant: median forward / forward+backward seconds and the median [min–max] ratio to the ModuleList."""
    names = list(variants)
    times = {name: {"fwd": [], "bwd": []} for name in names}

    def forward(model):
        with torch.no_grad():
            model(inputs)

    def backward(model):
        model.zero_grad(set_to_none=True)
        x = inputs.clone().requires_grad_(True)
        model(x).square().mean().backward()

    for model in variants.values():  # warm-up
        forward(model)
        backward(model)
    for _ in range(rounds):
        for name in names:
            model = variants[name]
            times[name]["fwd"].append(_time(lambda model=model: forward(model)))
            times[name]["bwd"].append(_time(lambda model=model: backward(model)))
    base = names[0]
    summary = {}
    for name in names:
        row = {}
        for kind in ("fwd", "bwd"):
            ratios = [b / t for t, b in zip(times[name][kind], times[base][kind], strict=True)]
            row[kind] = (
                statistics.median(times[name][kind]),
                statistics.median(ratios),
                min(ratios),
                max(ratios),
            )
        summary[name] = row
    return summary


def max_output_difference(variants: dict[str, nn.Module], inputs: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        reference = next(iter(variants.values()))(inputs)
        return {name: float((model(inputs) - reference).abs().max()) for name, model in variants.items()}


def lora_step(model: nn.Module, inputs: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    model(inputs).square().mean().backward()


def lora_comparison(variants: dict[str, nn.Module], inputs: torch.Tensor, rounds: int) -> dict[str, dict]:
    """PEFT LoRA r=8 on every expert: per-`nn.Linear` (`target_modules`) vs fused (`target_parameters`)."""
    import copy

    from peft import LoraConfig, get_peft_model

    per_expert = variants["per-expert ModuleList (ptmoe)"]
    fused = variants["fused grouped_mm"]
    num_experts = len(per_expert.block.experts)
    subset = "|".join(str(i) for i in range(0, num_experts, 2))
    configs = {
        "per-expert target_modules": (per_expert, LoraConfig(r=8, target_modules=r".*experts\.\d+\.(wi|wo)")),
        "per-expert ESFT subset (even experts)": (
            per_expert,
            LoraConfig(r=8, target_modules=rf".*experts\.({subset})\.(wi|wo)"),
        ),
        "fused target_parameters": (
            fused,
            LoraConfig(r=8, lora_dropout=0.0, target_modules=[], target_parameters=["up_proj", "down_proj"]),
        ),
    }
    results = {}
    for name, (model, config) in configs.items():
        peft_model = get_peft_model(copy.deepcopy(model), config)
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        seconds = []
        for _ in range(rounds + 1):
            seconds.append(_time(lambda model=peft_model: lora_step(model, inputs)))
        results[name] = {"trainable": trainable, "step_s": statistics.median(seconds[1:])}
    results["fused ESFT subset"] = {
        "trainable": None,
        "step_s": None,
        "note": "not expressible: target_parameters names a whole 3-D tensor, LoRA covers all its experts",
    }
    return results


def four_bit_coverage(variants: dict[str, nn.Module]) -> dict[str, float]:
    """Share of expert weight elements that bitsandbytes' `load_in_4bit` replacement turns into 4-bit layers."""
    import copy

    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    coverage = {}
    for name in ("per-expert ModuleList (ptmoe)", "fused grouped_mm"):
        model = copy.deepcopy(variants[name])
        experts = model.block.experts if hasattr(model, "block") else model.experts
        total = sum(p.numel() for n, p in experts.named_parameters() if not n.endswith("bias"))
        replace_with_bnb_linear(model, quantization_config=config)
        experts = model.block.experts if hasattr(model, "block") else model.experts
        quantized = sum(
            m.in_features * m.out_features for m in experts.modules() if isinstance(m, bnb.nn.Linear4bit)
        )
        coverage[name] = quantized / total
    return coverage


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes and 2 rounds (CI smoke test)")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds (default 9, quick 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be >= 1")
    torch.set_num_threads(args.threads)
    shape = dict(SHAPES["quick" if args.quick else "full"])
    rounds = args.rounds or shape["rounds"]
    variants, inputs = build(shape)
    print(
        f"experts {shape['experts']} top-{shape['k']}, {shape['hidden']} → {shape['ffn']} → {shape['hidden']}, "
        f"{inputs.shape[0] * inputs.shape[1]} tokens, fp32, {args.threads} threads, {rounds} rounds"
    )
    for name, diff in max_output_difference(variants, inputs).items():
        print(f"max |output - ModuleList| {name}: {diff:.2e}")
    print("\n| variant | forward s | fwd speed vs ModuleList | fwd+bwd s | fwd+bwd speed vs ModuleList |")
    print("|---|---|---|---|---|")
    for name, row in time_round_robin(variants, inputs, rounds).items():
        cells = [
            f"{row[k][0]:.4f} | {row[k][1]:.2f} [{row[k][2]:.2f}–{row[k][3]:.2f}]" for k in ("fwd", "bwd")
        ]
        print(f"| {name} | {cells[0]} | {cells[1]} |")
    print("\nLoRA r=8 on the experts (PEFT):")
    for name, row in lora_comparison(variants, inputs, rounds).items():
        if row["trainable"] is None:
            print(f"  {name}: {row['note']}")
        else:
            print(f"  {name}: {row['trainable']:,} trainable, step {row['step_s']:.4f} s")
    print("\nbitsandbytes 4-bit (load_in_4bit replacement), share of expert weights quantized:")
    for name, share in four_bit_coverage(variants).items():
        print(f"  {name}: {share:.0%}")


if __name__ == "__main__":
    from ptmoe.errors import run_script

    run_script(main)
