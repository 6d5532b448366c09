"""Command line: `ptmoe upcycle` (wired in ptmoe/cli.py): upcycle `--base`, save to `--out`, print the counts.

`layers_argument` parses a layer option ("2", "1,3,5", "none") and is shared by `ptmoe merge-experts` and
`ptmoe sparsify`.
"""

from __future__ import annotations

import argparse

from ..models.moe import ROUTER_TYPES, check_local_checkpoint, count_parameters
from ..outputs import check_output_dir
from .api import upcycle
from .experts import PARTITION_STRATEGIES, UPCYCLING_METHODS
from .save import save_upcycled


# --------------------------------------------------------------------------------------------------------------
# Command line: `ptmoe upcycle` (wired in ptmoe/cli.py)
# --------------------------------------------------------------------------------------------------------------
def layers_argument(text: str) -> int | list[int]:
    """ "2" → every 2nd layer; "1,3,5" → those layers; "none" → no MoE layer."""
    text = text.strip()
    if text.lower() in ("none", ""):
        return []
    try:
        return [int(part) for part in text.split(",")] if "," in text else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a step (e.g. 2), a comma-separated list of layer indices (e.g. 1,3,5) or 'none', got {text!r}"
        ) from None


def add_upcycle_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `ptmoe upcycle`."""
    parser.add_argument("--base", required=True, help="dense checkpoint: local path or Hub id")
    parser.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    parser.add_argument("--experts", type=int, default=8, help="experts per MoE layer (default 8)")
    parser.add_argument(
        "--top-k", type=int, default=None, help="experts per token (default 2; 1 for switch/hash)"
    )
    parser.add_argument("--method", choices=UPCYCLING_METHODS, default="copy")
    parser.add_argument(
        "--moe-layers", type=layers_argument, default=2, help="every n-th layer (2) or a list (1,3,5)"
    )
    parser.add_argument("--encoder-moe-layers", type=layers_argument, default=None, help="T5 only")
    parser.add_argument("--decoder-moe-layers", type=layers_argument, default=None, help="T5 only")
    parser.add_argument("--router", choices=ROUTER_TYPES, default="topk")
    parser.add_argument(
        "--router-groups",
        type=int,
        default=None,
        help="hierarchical router: expert groups (must divide --experts)",
    )
    parser.add_argument(
        "--groups-per-token", type=int, default=None, help="hierarchical router: groups per token"
    )
    parser.add_argument(
        "--expert-capacity-factor",
        type=float,
        default=None,
        help="expert-choice router: mean experts per token",
    )
    parser.add_argument(
        "--decoder-router", choices=ROUTER_TYPES, default=None, help="T5: the decoder's router (e.g. topk)"
    )
    parser.add_argument("--expert-dropout", type=float, default=None, help="dropout inside the experts only")
    parser.add_argument("--router-init", choices=("normal", "zeros"), default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise-std", type=float, default=0.01, help="method noise: relative noise std")
    parser.add_argument(
        "--drop-ratio", type=float, default=0.5, help="method drop: fraction of neurons re-drawn"
    )
    parser.add_argument(
        "--partition", choices=PARTITION_STRATEGIES, default="random", help="method partition"
    )
    parser.add_argument(
        "--task", default=None, help="dense head to load (e.g. masked-lm, sequence-classification)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


_ROUTING_OPTIONS = {
    "router_groups": "router_groups",
    "groups_per_token": "num_groups_per_tok",
    "expert_capacity_factor": "expert_capacity_factor",
    "decoder_router": "decoder_router_type",
    "expert_dropout": "expert_dropout",
}


def _routing_overrides(args: argparse.Namespace) -> dict:
    """The MoE config fields given on the command line (unset options keep the config defaults)."""
    return {
        field: getattr(args, option)
        for option, field in _ROUTING_OPTIONS.items()
        if getattr(args, option) is not None
    }


def run_upcycle_command(args: argparse.Namespace) -> int:
    """`ptmoe upcycle`: upcycle `--base`, save to `--out`, print total vs active parameter counts.

    Bad input (an existing `--out`, a missing `--base` folder, an unsupported architecture, invalid MoE values)
    raises; `ptmoe.cli.main` prints it as one error line with exit code 2 (see `ptmoe.errors`).
    """
    check_output_dir(args.out, args.overwrite)  # fail before the (long) upcycling, not after
    check_local_checkpoint(args.base, "--base")
    model = upcycle(
        args.base,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        moe_layers=args.moe_layers,
        encoder_moe_layers=args.encoder_moe_layers,
        decoder_moe_layers=args.decoder_moe_layers,
        method=args.method,
        router_type=args.router,
        seed=args.seed,
        router_init=args.router_init,
        noise_std=args.noise_std,
        drop_ratio=args.drop_ratio,
        partition=args.partition,
        task=args.task,
        progress=not args.no_progress,
        **_routing_overrides(args),
    )
    out = save_upcycled(model, args.out, overwrite=args.overwrite)
    counts = count_parameters(model)
    config = model.config
    print(
        f"{type(model).__name__} ({config.upcycling_method}, {config.num_experts} experts, "
        f"top-{config.num_experts_per_tok}, router {config.router_type}) saved to {out}"
    )
    print(f"total parameters:  {counts['total']:>14,}")
    print(f"active per token:  {counts['active']:>14,}  ({counts['active'] / counts['total']:.1%} of total)")
    return 0
