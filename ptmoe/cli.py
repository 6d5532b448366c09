"""The `ptmoe` command. Each subcommand is thin: it parses arguments and calls a library function.

ptmoe info                      versions and registered model types

Errors: a subcommand reports bad input by raising `ValueError` / `OSError` (`FileNotFoundError`, `FileExistsError`,
…) / `ptmoe.errors.UserError`; `main` prints it as one line `ptmoe <command>: error: <message>` and exits with 2
(`ptmoe.errors.run_command`). `--debug` (anywhere on the line) or `PTMOE_DEBUG=1` shows the traceback instead.
Commands that write a folder refuse a non-empty one unless `--overwrite`, and write through
`ptmoe.outputs.staged_output_dir`.
"""

from __future__ import annotations

import argparse
import sys

from .errors import DEBUG_ENV, run_command


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
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"show the full traceback of an error instead of one line (also: {DEBUG_ENV}=1); accepted anywhere",
    )
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

    # ptmoe cards [--out model_cards] [--eval-results FILE] [--model-dir DIR]: write every zoo model card, or the
    # card of one trained folder (ptmoe/cards.py).
    def _cmd_cards(args: argparse.Namespace) -> int:
        from .cards import load_eval_results, write_cards, write_folder_card

        results = load_eval_results(args.eval_results) if args.eval_results else None
        if args.model_dir:
            path = write_folder_card(
                args.model_dir,
                args.out,
                eval_results=results,
                eval_results_path=args.eval_results,
                license=args.license,
            )
            print(f"wrote {path}")
            return 0
        paths = write_cards(args.out, names=args.names or None, eval_results=results)
        print(f"wrote {len(paths)} model cards under {args.out}/")
        return 0

    cards = commands.add_parser(
        "cards", help="generate the model cards of the zoo (model_cards/<name>/README.md)"
    )
    cards.add_argument("--out", default="model_cards", help="output folder (default: model_cards)")
    cards.add_argument(
        "--eval-results",
        metavar="FILE",
        help="results.json of `ptmoe evaluate`, or JSON {model name: [EvalResult fields, ...]}",
    )
    cards.add_argument(
        "--model-dir",
        metavar="DIR",
        help="write the card of this trained ptmoe folder (to OUT/<name>/README.md)",
    )
    cards.add_argument(
        "--license", help="with --model-dir: the checkpoint's Hub licence if its source is unregistered"
    )
    cards.add_argument("names", nargs="*", help="only these zoo names (default: all)")
    cards.set_defaults(func=_cmd_cards)

    # ptmoe evaluate: fine-tune + evaluate on the Portuguese suites (ptmoe/evaluation).
    def _cmd_evaluate(args: argparse.Namespace) -> int:
        from .evaluation.cli import run_evaluate_command

        return run_evaluate_command(args)

    from .evaluation.cli import add_evaluate_arguments

    evaluate = commands.add_parser(
        "evaluate",
        help="fine-tune and evaluate on ASSIN 2 / HAREM / LeNER-Br over seeds, next to the dense source",
    )
    add_evaluate_arguments(evaluate)
    evaluate.set_defaults(func=_cmd_evaluate)

    # upcycle: dense BERT / RoBERTa / T5 checkpoint → MoE checkpoint (ptmoe/upcycling/)
    from .upcycling import add_upcycle_arguments, run_upcycle_command

    upcycle = commands.add_parser(
        "upcycle", help="turn a dense BERT/RoBERTa/T5 checkpoint into an MoE checkpoint (sparse upcycling)"
    )
    add_upcycle_arguments(upcycle)
    upcycle.set_defaults(func=run_upcycle_command)

    # ptmoe sparsify: dense checkpoint → split → fit routers → distil → save (ptmoe/sparsify/pipeline.py)
    from .sparsify.pipeline import add_sparsify_arguments, run_sparsify_command

    sparsify = commands.add_parser(
        "sparsify", help="make a dense BERT/T5 cheaper to run: split FFNs into experts, fit routers, distil"
    )
    add_sparsify_arguments(sparsify)
    sparsify.set_defaults(func=run_sparsify_command)

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

        out = convert_switch_to_folder(args.src, args.out, target=args.target, overwrite=args.overwrite)
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
    convert_switch.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty output folder (after a successful conversion)",
    )
    convert_switch.set_defaults(func=_cmd_convert_switch)

    # ptmoe prune MODEL OUT --calibration FILE: Wanda pruning (ptmoe/compress/).
    from .compress.prune_command import add_prune_arguments, run_prune_command

    prune = commands.add_parser(
        "prune", help="Wanda-prune a checkpoint (expert statistics from routed tokens)"
    )
    add_prune_arguments(prune)
    prune.set_defaults(func=run_prune_command)

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
    demo.add_argument(
        "--output-dir",
        default="outputs/demo",
        help="where every artefact is written (must be empty or missing)",
    )
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
        "--overwrite",
        action="store_true",
        help="replace a non-empty --output-dir, once the demo has finished (it runs in a temporary folder beside it)",
    )
    demo.set_defaults(func=_cmd_demo)

    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `ptmoe` with `argv` (default `sys.argv[1:]`); returns the exit code (2 for a user error, one line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    # `--debug` is accepted after the subcommand too, so every subcommand has it without declaring it
    parser = build_parser()
    args, unknown = parser.parse_known_args([arg for arg in argv if arg != "--debug"])
    if unknown:  # reported by the subcommand's parser: `ptmoe <command>: error: …` like every other error
        parser._subparsers._group_actions[0].choices[args.command].error(
            f"unrecognized arguments: {' '.join(unknown)}"
        )
    return run_command(args.func, args, prog=f"ptmoe {args.command}", debug=debug, exit_on_sigterm=True)


if __name__ == "__main__":
    sys.exit(main())
