"""The `ptmoe` command. Each subcommand is thin: it parses arguments and calls a library function.

ptmoe info                      versions and registered model types
"""

from __future__ import annotations

import argparse
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    import torch
    import transformers

    from . import __version__
    from .auto import REGISTRY

    print(f"ptmoe {__version__} (transformers {transformers.__version__}, torch {torch.__version__})")
    for config_class, models in REGISTRY:
        print(f"  {config_class.model_type}: " + ", ".join(m.__name__ for _, m in models))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ptmoe", description="Mixture-of-Experts models for Portuguese.")
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="print versions and registered model types")
    info.set_defaults(func=_cmd_info)

    # Subcommands of the other modules are added below, one block each.

    # ptmoe list [PATTERN]: the model zoo as a table (ptmoe/zoo.py).
    def _cmd_list(args: argparse.Namespace) -> int:
        from .zoo import list_models, models_table

        if not list_models(args.pattern):
            print(f"ptmoe list: no registered model matches {args.pattern!r}", file=sys.stderr)
            return 1
        print(models_table(args.pattern, with_counts=not args.no_counts))
        return 0

    list_parser = commands.add_parser("list", help="list the model zoo (names, sources, routing, parameters)")
    list_parser.add_argument("pattern", nargs="?", help="shell-style filter, e.g. 'moe-ptt5-*'")
    list_parser.add_argument("--no-counts", action="store_true", help="skip the parameter-count columns")
    list_parser.set_defaults(func=_cmd_list)

    # ptmoe cards [--out model_cards] [--eval-results FILE]: write every zoo model card (ptmoe/cards.py).
    def _cmd_cards(args: argparse.Namespace) -> int:
        from .cards import load_eval_results, write_cards
        from .zoo import UnknownModelError

        try:
            results = load_eval_results(args.eval_results) if args.eval_results else None
            paths = write_cards(args.out, names=args.names or None, eval_results=results)
        except (UnknownModelError, ValueError, FileNotFoundError) as error:
            print(f"ptmoe cards: error: {error}", file=sys.stderr)
            return 2
        print(f"wrote {len(paths)} model cards under {args.out}/")
        return 0

    cards = commands.add_parser(
        "cards", help="generate the model cards of the zoo (model_cards/<name>/README.md)"
    )
    cards.add_argument("--out", default="model_cards", help="output folder (default: model_cards)")
    cards.add_argument("--eval-results", metavar="FILE", help="JSON {model name: [EvalResult fields, ...]}")
    cards.add_argument("names", nargs="*", help="only these zoo names (default: all)")
    cards.set_defaults(func=_cmd_cards)

    # upcycle: dense BERT / RoBERTa / T5 checkpoint → MoE checkpoint (ptmoe/upcycling.py)
    from .upcycling import add_upcycle_arguments, run_upcycle_command

    upcycle = commands.add_parser(
        "upcycle", help="turn a dense BERT/RoBERTa/T5 checkpoint into an MoE checkpoint (sparse upcycling)"
    )
    add_upcycle_arguments(upcycle)
    upcycle.set_defaults(func=run_upcycle_command)

    # merge-experts: dense domain models → one MoE with named domain experts (ptmoe/merging.py)
    from .merging import add_merge_arguments, run_merge_command

    merge = commands.add_parser(
        "merge-experts",
        help="merge dense domain models into one MoE with an expert per domain (Branch-Train-MiX)",
    )
    add_merge_arguments(merge)
    merge.set_defaults(func=run_merge_command)

    # ptmoe convert-switch SRC OUT: transformers SwitchTransformers checkpoint → MoE-T5 folder (ptmoe/convert.py).
    def _cmd_convert_switch(args: argparse.Namespace) -> int:
        from .convert import convert_switch_to_folder

        try:
            out = convert_switch_to_folder(args.src, args.out, target=args.target, overwrite=args.overwrite)
        except (ValueError, FileExistsError) as error:
            print(f"ptmoe convert-switch: error: {error}", file=sys.stderr)
            return 2
        print(f"MoE-T5 ({args.target}) written to {out}")
        return 0

    convert_switch = commands.add_parser(
        "convert-switch", help="convert a SwitchTransformers checkpoint (folder or Hub id) to MoE-T5"
    )
    convert_switch.add_argument("src", help="folder or Hub id of a SwitchTransformers checkpoint")
    convert_switch.add_argument("out", help="output folder (must be empty unless --overwrite)")
    convert_switch.add_argument(
        "--target", choices=["conditional_generation", "model", "encoder"], default="conditional_generation"
    )
    convert_switch.add_argument("--overwrite", action="store_true", help="write into a non-empty folder")
    convert_switch.set_defaults(func=_cmd_convert_switch)

    # ptmoe demo: the offline end-to-end demo (ptmoe/demo.py).
    def _cmd_demo(args: argparse.Namespace) -> int:
        from .demo import DemoConfig, run_demo

        make = DemoConfig.quick if args.quick else DemoConfig
        overrides = {"output_dir": args.output_dir, "seed": args.seed, "overwrite": args.overwrite}
        for name in ("pretrain_epochs", "finetune_epochs", "num_experts", "num_experts_per_tok"):
            if getattr(args, name) is not None:
                overrides[name] = getattr(args, name)
        run_demo(make(**overrides))
        return 0

    demo = commands.add_parser(
        "demo",
        help="offline end-to-end demo: tokenizer → dense BERT → upcycle → expert LoRA → 4-bit → Hub folder",
    )
    demo.add_argument("--output-dir", default="outputs/demo", help="where every artefact is written")
    demo.add_argument(
        "--quick", action="store_true", help="tiny sizes and one epoch per stage (about a minute)"
    )
    demo.add_argument(
        "--pretrain-epochs", dest="pretrain_epochs", type=float, help="dense MLM epochs (default 40)"
    )
    demo.add_argument(
        "--finetune-epochs", dest="finetune_epochs", type=float, help="LoRA epochs (default 30)"
    )
    demo.add_argument("--experts", dest="num_experts", type=int, help="experts per MoE layer (default 4)")
    demo.add_argument("--top-k", dest="num_experts_per_tok", type=int, help="experts per token (default 2)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--no-overwrite", dest="overwrite", action="store_false", help="refuse a non-empty --output-dir"
    )
    demo.set_defaults(func=_cmd_demo)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
