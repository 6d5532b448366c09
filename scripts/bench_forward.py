"""Forward throughput of MoE models next to their dense and transformers-Switch counterparts, in one run.

    python scripts/bench_forward.py                 # BERT-base and T5-base shapes, 16 x 128 tokens, fp32 + bf16
                                                    # (+ greedy generate: 32 new tokens at batch 8 for T5)
    python scripts/bench_forward.py --quick         # tiny shapes, to check the script works
    python scripts/bench_forward.py --families bert # BERT-base shapes only (includes expert choice and
                                                    # hierarchical routing next to top-2, at equal active compute)

Every model is built from a config with random weights (nothing is downloaded). Each speed is the median of
`--runs` timed calls after `--warmup` untimed ones, with `torch.set_num_threads(--threads)`; ratios are
computed between models measured in this same run, so they travel between machines better than tokens/s. Models
of one family are timed round-robin (one call of each per round) and every ratio is the median of per-round
ratios, printed with its range over the rounds, so the spread of the machine shows next to the result.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import (
    BertConfig,
    BertModel,
    SwitchTransformersConfig,
    SwitchTransformersEncoderModel,
    SwitchTransformersForConditionalGeneration,
    T5Config,
    T5EncoderModel,
    T5ForConditionalGeneration,
)

import ptmoe
from ptmoe.energy import add_energy_arguments, finish_benchmark_energy, start_benchmark_energy

BERT_BASE = dict(
    vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072
)
BERT_TINY = dict(
    vocab_size=99, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128
)


@dataclass
class Case:
    name: str
    build: Callable[[], torch.nn.Module]
    run: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], object]


def _encoder_forward(model, input_ids, attention_mask):
    return model(input_ids=input_ids, attention_mask=attention_mask)


def bert_cases(shape: dict) -> list[Case]:
    moe = dict(num_experts=8, moe_layers=2)
    switch_config = SwitchTransformersConfig(
        vocab_size=shape["vocab_size"],
        d_model=shape["hidden_size"],
        d_kv=shape["hidden_size"] // shape["num_attention_heads"],
        d_ff=shape["intermediate_size"],
        num_layers=shape["num_hidden_layers"],
        num_heads=shape["num_attention_heads"],
        num_experts=8,
        encoder_sparse_step=2,
        expert_capacity=64,  # per sequence of 128 tokens: capacity factor 4 (no drops), like ours in eval
    )
    return [
        Case("dense BERT", lambda: BertModel(BertConfig(**shape)), _encoder_forward),
        Case(
            "MoE-BERT top-1 (switch)",
            lambda: ptmoe.MoeBertModel(ptmoe.MoeBertConfig.switch(**shape, **moe)),
            _encoder_forward,
        ),
        Case(
            "MoE-BERT top-2",
            lambda: ptmoe.MoeBertModel(ptmoe.MoeBertConfig(**shape, **moe, num_experts_per_tok=2)),
            _encoder_forward,
        ),
        Case(
            "transformers Switch encoder",
            lambda: SwitchTransformersEncoderModel(switch_config),
            _encoder_forward,
        ),
        # The same active compute as top-2: expert choice with capacity factor 2 (2 experts per token on average),
        # and hierarchical routing picking 2 experts inside the best of 4 groups of 2.
        Case(
            "MoE-BERT expert choice (c=2)",
            lambda: ptmoe.MoeBertModel(
                ptmoe.MoeBertConfig(**shape, **moe, router_type="expert_choice", expert_capacity_factor=2.0)
            ),
            _encoder_forward,
        ),
        Case(
            "MoE-BERT hierarchical (4x2, top-2)",
            lambda: ptmoe.MoeBertModel(
                ptmoe.MoeBertConfig(
                    **shape, **moe, num_experts_per_tok=2, router_type="hierarchical", router_groups=4
                )
            ),
            _encoder_forward,
        ),
    ]


T5_BASE = dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12)
T5_TINY = dict(vocab_size=99, d_model=64, d_kv=16, d_ff=128, num_layers=4, num_heads=4)


GENERATE_BATCH, GENERATE_TOKENS = 8, 32


def _generate(model, input_ids, attention_mask):
    # greedy, KV cache; forced length so every model does the same work
    return model.generate(
        input_ids=input_ids[:GENERATE_BATCH],
        attention_mask=attention_mask[:GENERATE_BATCH],
        max_new_tokens=GENERATE_TOKENS,
        min_new_tokens=GENERATE_TOKENS,
        do_sample=False,
    )


def _one_expert_decoder(config) -> torch.nn.Module:
    model = ptmoe.MoeT5ForConditionalGeneration(config)
    with torch.no_grad():
        for block in model.decoder.block:
            if hasattr(block.layer[-1], "moe"):
                block.layer[-1].moe.router.weight.zero_()  # equal logits: the first expert wins every token
    return model


def t5_cases(shape: dict) -> list[Case]:
    moe = dict(num_experts=8, encoder_moe_layers=2, decoder_moe_layers=2)
    switch = dict(
        **shape,
        num_decoder_layers=shape["num_layers"],
        num_experts=8,
        encoder_sparse_step=2,
        decoder_sparse_step=2,
        expert_capacity=64,
        decoder_start_token_id=0,
    )
    moe_config = lambda: ptmoe.MoeT5Config.switch(**shape, **moe, decoder_start_token_id=0)  # noqa: E731
    t5_config = lambda: T5Config(**shape, decoder_start_token_id=0)  # noqa: E731
    return [
        Case("dense T5 encoder", lambda: T5EncoderModel(t5_config()), _encoder_forward),
        Case("MoE-T5 top-1 encoder", lambda: ptmoe.MoeT5EncoderModel(moe_config()), _encoder_forward),
        Case(
            "transformers Switch encoder (T5)",
            lambda: SwitchTransformersEncoderModel(SwitchTransformersConfig(**switch)),
            _encoder_forward,
        ),
        Case("dense T5 generate", lambda: T5ForConditionalGeneration(t5_config()), _generate),
        Case("MoE-T5 top-1 generate", lambda: ptmoe.MoeT5ForConditionalGeneration(moe_config()), _generate),
        # Diagnostic: the same model with every decoder token routed to expert 0 (zero router weights) reads
        # one expert per MoE layer and step, as much weight as dense T5. Against dense T5 it isolates the
        # routing overhead; against the real top-1 model, the cost of reading the other experts' weights.
        Case("MoE-T5 generate, 1 expert/step", lambda: _one_expert_decoder(moe_config()), _generate),
        Case(
            "transformers Switch generate",
            lambda: SwitchTransformersForConditionalGeneration(SwitchTransformersConfig(**switch)),
            _generate,
        ),
    ]


def decode_weight_traffic(case: Case, dtype: torch.dtype, batch: int, seq: int) -> tuple[float, float]:
    """Distinct experts per decoder MoE layer and decoding step in one greedy `generate()` of `case` (built as in
    `measure_round_robin`), and the weights such a step reads relative to dense T5 (one FFN per layer).

    At batch 8 a top-1 step reads the weights of every expert some token chose; dense T5 reads one FFN. Were a
    step bound only by memory traffic, its speed ratio to dense T5 would be the inverse of this weight ratio.
    """
    torch.manual_seed(0)
    model = case.build().to(dtype).eval()
    blocks = [m for m in model.decoder.modules() if isinstance(m, ptmoe.SparseMoeBlock)]
    distinct: list[int] = []

    def count(module, args, output):
        if args[0].shape[1] == 1:  # one new token per sequence: a decoding step
            routing = output[1]
            distinct.append(routing.topk_index[routing.dispatch_mask].unique().numel())

    handles = [block.register_forward_hook(count) for block in blocks]
    vocab = model.config.vocab_size
    with torch.inference_mode():
        case.run(model, torch.randint(0, vocab, (batch, seq)), torch.ones(batch, seq, dtype=torch.long))
    for handle in handles:
        handle.remove()
    expert = sum(p.numel() for p in blocks[0].experts[0].parameters())
    experts_total = sum(p.numel() for block in blocks for p in block.experts.parameters())
    # Weights a step reads besides the experts: decoder layers, final norm, LM head (tied or not). Not read: the
    # token embedding (a row lookup) and the cross-attention key/value projections (their outputs over the encoder
    # states are cached at the first step).
    decoder = (
        sum(
            p.numel()
            for name, p in model.decoder.named_parameters()
            if ".EncDecAttention.k." not in name and ".EncDecAttention.v." not in name
        )
        - model.decoder.embed_tokens.weight.numel()
    )
    shared = decoder - experts_total + model.lm_head.weight.numel()
    mean_distinct = statistics.mean(distinct)
    return mean_distinct, (shared + len(blocks) * mean_distinct * expert) / (shared + len(blocks) * expert)


def measure_round_robin(
    cases: list[Case], dtype: torch.dtype, batch: int, seq: int, warmup: int, runs: int
) -> dict[str, list[float]]:
    """Seconds per call of every case, `runs` rounds after `warmup`, the cases interleaved within each round.

    Interleaving matters on shared or virtual machines: speed drifts over seconds (steal time, page-fault
    storms when the allocator returns memory to the OS), so timing model A for a minute and then model B
    compares two different machines. Round by round, neighbouring calls see the same machine state, and
    per-round ratios (see `paired_ratio`) cancel most of the drift.
    """
    models, inputs = {}, {}
    for case in cases:
        torch.manual_seed(0)
        models[case.name] = case.build().to(dtype).eval()
        vocab = models[case.name].config.vocab_size
        inputs[case.name] = (torch.randint(0, vocab, (batch, seq)), torch.ones(batch, seq, dtype=torch.long))
    times = {case.name: [] for case in cases}
    with torch.inference_mode():
        for round_index in range(warmup + runs):
            for case in cases:
                start = time.perf_counter()
                case.run(models[case.name], *inputs[case.name])
                if round_index >= warmup:
                    times[case.name].append(time.perf_counter() - start)
    return times


def tokens_per_call(case: Case, batch: int, seq: int) -> int:
    return GENERATE_BATCH * GENERATE_TOKENS if case.run is _generate else batch * seq


def paired_ratio(times: dict[str, list[float]], numerator: str, denominator: str) -> list[float]:
    """Per-round speed ratios numerator / denominator (same work per call, so time_denominator / time_numerator)."""
    return [d / n for n, d in zip(times[numerator], times[denominator], strict=True)]


def report(
    speed: dict[tuple[str, str], float],
    ratios: dict[tuple[str, str, str], list[float]],
    targets: list[tuple[str, str, float | None]],
    dtypes: list[str],
) -> None:
    names = list(dict.fromkeys(name for name, _ in speed))
    print(f"\n{'model':<34}" + "".join(f"{d + ' tok/s':>16}" for d in dtypes))
    for name in names:
        print(f"{name:<34}" + "".join(f"{speed[(name, d)]:>16,.0f}" for d in dtypes))
    print(
        f"\n{'ratio (median of per-round ratios [min-max])':<58}"
        + "".join(f"{d:>20}" for d in dtypes)
        + f"{'target':>10}"
    )
    for numerator, denominator, target in targets:
        cells, medians = [], []
        for d in dtypes:
            values = ratios[(numerator, denominator, d)]
            medians.append(statistics.median(values))
            cells.append(f"{medians[-1]:.3f} [{min(values):.2f}-{max(values):.2f}]")
        label = f"{numerator} / {denominator}"
        if target is None:  # a diagnostic ratio, not a goal
            print(f"{label:<58}" + "".join(f"{c:>20}" for c in cells) + f"{'-':>10} (diagnostic)")
            continue
        verdict = "ok" if all(m >= target for m in medians) else "MISSED"
        print(f"{label:<58}" + "".join(f"{c:>20}" for c in cells) + f"{'>= ' + str(target):>10} {verdict}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 runs: check the script works")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--families", nargs="+", default=["bert", "t5"], choices=["bert", "t5"])
    add_energy_arguments(parser)
    args = parser.parse_args(argv)
    energy = start_benchmark_energy(args, parser)
    if args.quick:
        args.batch, args.seq, args.runs, args.warmup = 2, 16, 2, 1
    torch.set_num_threads(args.threads)

    families, targets = [], []
    if "bert" in args.families:
        families.append(bert_cases(BERT_TINY if args.quick else BERT_BASE))
        targets += [
            ("MoE-BERT top-1 (switch)", "dense BERT", 0.97),
            ("MoE-BERT top-1 (switch)", "transformers Switch encoder", 1.0),
            ("MoE-BERT top-2", "dense BERT", 0.55),
            # Routing cost at equal active compute: diagnostics, not goals (expert choice sorts each expert's
            # scores over the sequence; hierarchical adds a group gate).
            ("MoE-BERT expert choice (c=2)", "MoE-BERT top-2", None),
            ("MoE-BERT hierarchical (4x2, top-2)", "MoE-BERT top-2", None),
        ]
    if "t5" in args.families:
        families.append(t5_cases(T5_TINY if args.quick else T5_BASE))
        targets += [
            ("MoE-T5 top-1 encoder", "dense T5 encoder", 0.97),
            ("MoE-T5 top-1 encoder", "transformers Switch encoder (T5)", 1.0),
            ("MoE-T5 top-1 generate", "dense T5 generate", 0.97),
            ("MoE-T5 top-1 generate", "transformers Switch generate", 1.0),
            ("MoE-T5 generate, 1 expert/step", "dense T5 generate", None),
            ("MoE-T5 top-1 generate", "MoE-T5 generate, 1 expert/step", None),
        ]
    print(
        f"torch {torch.__version__}, {args.threads} threads, batch {args.batch} x {args.seq} tokens, "
        f"{args.runs} rounds after {args.warmup} warm-up, models interleaved within each round"
    )
    speed, ratios, traffic = {}, {}, {}
    for dtype_name in args.dtypes:
        for family_cases in families:
            times = measure_round_robin(
                family_cases, getattr(torch, dtype_name), args.batch, args.seq, args.warmup, args.runs
            )
            for case in family_cases:
                tokens = tokens_per_call(case, args.batch, args.seq)
                speed[(case.name, dtype_name)] = tokens / statistics.median(times[case.name])
                print(
                    f"  {case.name:<34} {dtype_name:<9} {speed[(case.name, dtype_name)]:>10,.0f} tokens/s",
                    flush=True,
                )
            names = {case.name for case in family_cases}
            for numerator, denominator, _ in targets:
                if numerator in names:
                    ratios[(numerator, denominator, dtype_name)] = paired_ratio(times, numerator, denominator)
            for case in family_cases:
                if case.name == "MoE-T5 top-1 generate":
                    traffic[dtype_name] = decode_weight_traffic(
                        case, getattr(torch, dtype_name), args.batch, args.seq
                    )
    report(speed, ratios, targets, args.dtypes)
    for dtype_name, (mean_distinct, weights) in traffic.items():
        print(
            f"MoE-T5 top-1 decoding, {dtype_name}: {mean_distinct:.2f} distinct experts per MoE layer and step "
            f"(batch {min(args.batch, GENERATE_BATCH)}); a step reads {weights:.3f}x the weights of dense T5 "
            f"(a step bound only by memory traffic would run at {1 / weights:.3f}x its speed)"
        )
    finish_benchmark_energy(energy)


if __name__ == "__main__":
    from ptmoe.errors import run_script  # here: after the environment set-up above

    run_script(main)
