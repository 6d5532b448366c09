"""Forward throughput of MoE models next to their dense and transformers-Switch counterparts, in one run.

    python scripts/bench_forward.py                 # BERT-base and T5-base shapes, 16 x 128 tokens, fp32 + bf16
                                                    # (+ greedy generate: 32 new tokens at batch 8 for T5)
    python scripts/bench_forward.py --quick         # tiny shapes, to check the script works

Every model is built from a config with random weights (nothing is downloaded). Each number is the median of
`--runs` timed forwards after `--warmup` untimed ones, with `torch.set_num_threads(--threads)`; ratios are
computed between models measured in this same run, so they travel between machines better than tokens/s.
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
    ]


T5_BASE = dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12)
T5_TINY = dict(vocab_size=99, d_model=64, d_kv=16, d_ff=128, num_layers=4, num_heads=4)


def _generate(model, input_ids, attention_mask):
    # greedy, 32 new tokens, KV cache; forced length so every model does the same work
    return model.generate(
        input_ids=input_ids[:8],
        attention_mask=attention_mask[:8],
        max_new_tokens=32,
        min_new_tokens=32,
        do_sample=False,
    )


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
        Case(
            "transformers Switch generate",
            lambda: SwitchTransformersForConditionalGeneration(SwitchTransformersConfig(**switch)),
            _generate,
        ),
    ]


def measure(case: Case, dtype: torch.dtype, batch: int, seq: int, warmup: int, runs: int) -> float:
    """Median tokens/s of `case` at `batch x seq` in `dtype`."""
    torch.manual_seed(0)
    model = case.build().to(dtype).eval()
    vocab = model.config.vocab_size
    input_ids = torch.randint(0, vocab, (batch, seq))
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    times = []
    with torch.inference_mode():
        for i in range(warmup + runs):
            start = time.perf_counter()
            case.run(model, input_ids, attention_mask)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    tokens = 8 * 32 if case.run is _generate else batch * seq
    return tokens / statistics.median(times)


def report(
    results: dict[tuple[str, str], float], ratios: list[tuple[str, str, float]], dtypes: list[str]
) -> None:
    names = list(dict.fromkeys(name for name, _ in results))
    print(f"\n{'model':<34}" + "".join(f"{d + ' tok/s':>16}" for d in dtypes))
    for name in names:
        print(f"{name:<34}" + "".join(f"{results[(name, d)]:>16,.0f}" for d in dtypes))
    print(f"\n{'ratio':<58}" + "".join(f"{d:>10}" for d in dtypes) + f"{'target':>10}")
    for numerator, denominator, target in ratios:
        values = [results[(numerator, d)] / results[(denominator, d)] for d in dtypes]
        verdict = "ok" if all(v >= target for v in values) else "MISSED"
        label = f"{numerator} / {denominator}"
        print(
            f"{label:<58}" + "".join(f"{v:>10.3f}" for v in values) + f"{'>= ' + str(target):>10} {verdict}"
        )


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
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.runs, args.warmup = 2, 16, 2, 1
    torch.set_num_threads(args.threads)

    cases, ratios = [], []
    if "bert" in args.families:
        cases += bert_cases(BERT_TINY if args.quick else BERT_BASE)
        ratios += [
            ("MoE-BERT top-1 (switch)", "dense BERT", 0.97),
            ("MoE-BERT top-1 (switch)", "transformers Switch encoder", 1.0),
            ("MoE-BERT top-2", "dense BERT", 0.55),
        ]
    if "t5" in args.families:
        cases += t5_cases(T5_TINY if args.quick else T5_BASE)
        ratios += [
            ("MoE-T5 top-1 encoder", "dense T5 encoder", 0.97),
            ("MoE-T5 top-1 encoder", "transformers Switch encoder (T5)", 1.0),
            ("MoE-T5 top-1 generate", "dense T5 generate", 0.97),
            ("MoE-T5 top-1 generate", "transformers Switch generate", 1.0),
        ]
    print(
        f"torch {torch.__version__}, {args.threads} threads, batch {args.batch} x {args.seq} tokens, "
        f"median of {args.runs} runs after {args.warmup} warm-up"
    )
    results = {}
    for dtype_name in args.dtypes:
        for case in cases:
            results[(case.name, dtype_name)] = measure(
                case, getattr(torch, dtype_name), args.batch, args.seq, args.warmup, args.runs
            )
            print(
                f"  {case.name:<34} {dtype_name:<9} {results[(case.name, dtype_name)]:>10,.0f} tokens/s",
                flush=True,
            )
    report(results, ratios, args.dtypes)


if __name__ == "__main__":
    main()
