"""`ptmoe evaluate` and `scripts/evaluate_pt.py`: argument parsing, the `--quick` setup, and printing.

Thin: the work is `ptmoe.evaluation.run.evaluate_suites` (and `few_shot.evaluate_few_shot` for `--few_shot`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .suites import SUITE_GROUPS, SUITES

QUICK_DEFAULTS = {"seeds": (0, 1), "epochs": 1.0, "max_length": 64, "batch_size": 4, "max_steps": 2}


def _seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--seeds takes comma-separated integers like 0,1,2, got {text!r}"
        ) from None
    if not seeds:
        raise argparse.ArgumentTypeError("--seeds needs at least one seed")
    return seeds


def _shots(text: str) -> tuple[int, ...]:
    try:
        shots = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--few_shot takes comma-separated integers like 8,16, got {text!r}"
        ) from None
    if not shots or min(shots) < 1:
        raise argparse.ArgumentTypeError(f"--few_shot needs positive examples-per-class counts, got {text!r}")
    return shots


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of `ptmoe evaluate` / `scripts/evaluate_pt.py`."""
    names = ", ".join(list(SUITES) + list(SUITE_GROUPS))
    parser.add_argument(
        "--model_name_or_path",
        "--model",
        dest="model",
        help="ptmoe checkpoint (or dense + --upcycle_experts)",
    )
    parser.add_argument(
        "--suite", "--suites", dest="suites", default=None, help=f"comma list of: {names} (default all)"
    )
    parser.add_argument(
        "--output_dir", "--output-dir", dest="output_dir", default=None, help="runs + results.json"
    )
    parser.add_argument("--tuning", choices=["full", "lora", "qlora"], default="full")
    parser.add_argument(
        "--dense_model",
        "--dense-model",
        dest="dense_model",
        help="dense source: evaluated the same way (baseline)",
    )
    parser.add_argument(
        "--data_dir",
        "--data-dir",
        dest="data_dir",
        help="local mirrors: <dir>/<dataset>/{train,validation,test}.{parquet,jsonl,json,csv} (what "
        "--prepare-data writes); 'fixtures' = shipped. Default: Hub dataset, its parquet export, original files",
    )
    parser.add_argument(
        "--prepare-data",
        "--prepare_data",
        dest="prepare_data",
        metavar="DIR",
        help="only load the --suite datasets (Hub, parquet export or original files) and write them as parquet "
        "into DIR for an offline machine, which reads them with --data_dir DIR; no model is needed",
    )
    parser.add_argument("--seeds", type=_seeds, help="comma list (default: the suite protocol's seeds)")
    parser.add_argument("--epochs", type=float, help="override the protocol's epochs")
    parser.add_argument("--learning_rate", type=float, help="override the protocol's learning rate")
    parser.add_argument("--batch_size", type=int, help="override the protocol's batch size")
    parser.add_argument("--max_length", type=int, help="override the protocol's max tokens")
    parser.add_argument("--max_steps", type=int, help="stop each run after N optimiser steps (smoke runs)")
    parser.add_argument("--max_train_samples", type=int)
    parser.add_argument("--max_eval_samples", type=int)
    parser.add_argument("--upcycle_experts", type=int, help="upcycle a dense --model on the fly")
    parser.add_argument("--lora_r", type=int, default=8)
    parser.add_argument("--lora_alpha", type=int, default=16)
    parser.add_argument(
        "--card_name", help="model name the results are filed under for `ptmoe cards --eval-results`"
    )
    parser.add_argument(
        "--few_shot",
        type=_shots,
        help="few-shot mode: examples per class, e.g. 8,16 (sentence classification suites)",
    )
    parser.add_argument(
        "--few_shot_methods",
        default="logreg-cls,logreg-mean,lora",
        help="comma list of logreg-cls, logreg-mean, lora",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny offline run on the shipped fixtures (builds tiny models if --model is not given)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty --output_dir (or --prepare-data DIR)"
    )
    parser.add_argument("--cache_dir")
    return parser


def build_quick_models(folder: Path, seed: int = 0) -> tuple[str, str]:
    """A tiny dense BERT and its upcycled MoE-BERT (4 experts, top-2) with a WordPiece tokenizer trained on the
    fixtures' text; returns `(moe_path, dense_path)`. Random weights: `--quick` checks the path, not quality."""
    import json

    import torch
    from transformers import BertConfig, BertForMaskedLM

    import ptmoe

    from ..training import train_tokenizer
    from .suites import FIXTURES_DIR

    texts = []
    for path in sorted(FIXTURES_DIR.glob("*/*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            texts.extend([row[k] for k in ("premise", "hypothesis") if k in row])
            if "tokens" in row:
                texts.append(" ".join(row["tokens"]))
    dense_dir, moe_dir = folder / "dense", folder / "moe"
    tokenizer = train_tokenizer(texts, vocab_size=300, out_dir=dense_dir)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, max_position_embeddings=128,
    )  # fmt: skip
    BertForMaskedLM(config).save_pretrained(dense_dir)
    moe = ptmoe.upcycle(str(dense_dir), num_experts=4, num_experts_per_tok=2, progress=False)
    moe.save_pretrained(moe_dir)
    tokenizer.save_pretrained(moe_dir)
    return str(moe_dir), str(dense_dir)


def run_evaluate_command(args: argparse.Namespace) -> int:
    """Run `ptmoe evaluate` from parsed arguments; prints the table and the results path."""
    import logging

    from .run import EvalConfig, evaluate_suites, format_results, write_results

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    from .suites import resolve_suites

    suites = args.suites.split(",") if args.suites else ["all"]
    resolved = resolve_suites(suites)  # unknown names fail before anything is built or loaded
    if args.prepare_data is not None:
        return run_prepare_data(args, resolved)
    output_dir = Path(args.output_dir or ("outputs/evaluate-quick" if args.quick else "outputs/evaluate"))
    overrides = {}
    if args.quick:
        overrides = dict(QUICK_DEFAULTS)
    for name in ("seeds", "epochs", "learning_rate", "batch_size", "max_length", "max_steps"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    data_dir = args.data_dir or ("fixtures" if args.quick else None)
    model, dense = args.model, args.dense_model
    if model is None:
        if not args.quick:
            raise ValueError("--model_name_or_path is required (or --quick, which builds tiny models)")
        from ..outputs import check_output_dir

        check_output_dir(output_dir, args.overwrite)  # before creating anything inside it
        model, built_dense = build_quick_models(output_dir / "models")
        dense = dense or built_dense
        args.overwrite = True  # the folder now holds only what this command created
    config = EvalConfig(
        model_name_or_path=model,
        suites=suites,
        output_dir=str(output_dir),
        tuning=args.tuning,
        dense_model=dense,
        data_dir=data_dir,
        upcycle_experts=args.upcycle_experts,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        card_name=args.card_name,
        overwrite=args.overwrite,
        max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_eval_samples,
        cache_dir=args.cache_dir,
        **overrides,
    )
    if args.few_shot:
        from .few_shot import evaluate_few_shot

        methods = [m.strip() for m in args.few_shot_methods.split(",") if m.strip()]
        results = evaluate_few_shot(config, shots=args.few_shot, methods=methods)
    else:
        results = evaluate_suites(config)
    write_results(results, output_dir / "results.json")
    print(format_results(results))
    print(f"results: {output_dir / 'results.json'}")
    return 0


def run_prepare_data(args: argparse.Namespace, suites) -> int:
    """`ptmoe evaluate --prepare-data DIR`: write the suites' splits as parquet; prints where each came from."""
    from .sources import prepare_suite_data

    if args.data_dir is not None:
        raise ValueError(
            "--prepare-data loads the datasets from the internet and writes them into its folder; --data_dir is "
            "where an offline run reads that folder back. Pass only one of them."
        )
    written = prepare_suite_data(
        suites, args.prepare_data, overwrite=args.overwrite, cache_dir=args.cache_dir
    )
    for folder, source in written.items():
        print(f"{folder}: {source}")
    print(f"data: {args.prepare_data} (evaluate offline with --data_dir {args.prepare_data})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `scripts/evaluate_pt.py` (its user errors become one line through `ptmoe.errors.run_script`)."""
    parser = add_evaluate_arguments(
        argparse.ArgumentParser(
            prog="evaluate_pt.py", description="Fine-tune and evaluate on the Portuguese suites."
        )
    )
    return run_evaluate_command(parser.parse_args(argv))
