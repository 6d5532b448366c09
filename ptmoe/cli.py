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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
