"""`ptmoe prune MODEL OUT --calibration FILE`: load, Wanda-prune, save atomically (thin wiring over `pruning`)."""

from __future__ import annotations

import torch
from torch import nn

from ..calibration import read_calibration_file, resolve_tokenizer
from ..outputs import check_output_dir
from .pruning import EXPERT_SPARSITY_MODES, _check_sparsity, parse_structure, prune_wanda, save_pruned

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_for_pruning(model_name_or_path: str, dtype: str = "float32") -> nn.Module:
    """Load a checkpoint with the class named in its config (`architectures[0]`): ptmoe or transformers models."""
    import transformers
    from transformers import AutoConfig

    from .. import auto  # noqa: F401  (registers the ptmoe configs and models)
    from ..models import modeling_moe_bert, modeling_moe_t5

    if dtype not in _DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    config = AutoConfig.from_pretrained(model_name_or_path)
    architecture = (getattr(config, "architectures", None) or [None])[0]
    model_class = None
    for namespace in (modeling_moe_bert, modeling_moe_t5, transformers):
        model_class = model_class or getattr(namespace, architecture or "", None)
    if model_class is None:
        raise ValueError(
            f"{model_name_or_path}: its config names no loadable architecture ({architecture!r}); save the model "
            "with save_pretrained (which records `architectures`) or prune it in Python with ptmoe.prune_wanda"
        )
    return model_class.from_pretrained(model_name_or_path, dtype=_DTYPES[dtype]).eval()


def add_prune_arguments(parser) -> None:
    """The arguments of `ptmoe prune`."""
    parser.add_argument("model", help="folder or Hub id of a full-precision checkpoint (ptmoe MoE or dense)")
    parser.add_argument("out", help="output folder (must be empty unless --overwrite)")
    parser.add_argument(
        "--calibration", required=True, help="calibration texts: .txt (one per line), .jsonl/.json or .csv"
    )
    parser.add_argument("--text-column", default="text", help="text column of a .jsonl/.csv file")
    parser.add_argument("--max-samples", type=int, default=128, help="calibration texts used (default 128)")
    parser.add_argument(
        "--max-length", type=int, default=128, help="tokens per calibration text (default 128)"
    )
    parser.add_argument("--sparsity", type=float, help="fraction removed per row, in [0, 1) (default 0.5)")
    parser.add_argument(
        "--structure", default="unstructured", help="'unstructured' (default) or N:M, e.g. 2:4"
    )
    parser.add_argument(
        "--expert-sparsity",
        choices=EXPERT_SPARSITY_MODES,
        default="uniform",
        help="by_load: prune idle experts harder",
    )
    parser.add_argument("--skip", nargs="*", default=[], help="module name patterns to keep dense")
    parser.add_argument(
        "--include-heads", action="store_true", help="also prune task heads / output embeddings"
    )
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="load (and save) dtype")
    parser.add_argument("--min-tokens", type=int, default=64, help="refuse less calibration text than this")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")


def run_prune_command(args) -> int:
    """`ptmoe prune MODEL OUT --calibration FILE`: Wanda-prune, save atomically, print the report's summary."""

    check_output_dir(args.out, args.overwrite)  # before the (long) calibration, not after
    if args.max_samples is not None and args.max_samples < 1:
        raise ValueError(f"--max-samples must be >= 1, got {args.max_samples}")
    parse_structure(args.structure)
    if args.sparsity is not None:
        _check_sparsity(args.sparsity)
    texts = read_calibration_file(args.calibration, args.text_column, args.max_samples)
    model = load_for_pruning(args.model, args.dtype)
    tokenizer = resolve_tokenizer(model)
    report = prune_wanda(
        model,
        texts,
        sparsity=args.sparsity,
        structure=args.structure,
        skip=args.skip,
        tokenizer=tokenizer,
        include_heads=args.include_heads,
        expert_sparsity=args.expert_sparsity,
        max_length=args.max_length,
        min_tokens=args.min_tokens,
    )
    out = save_pruned(model, args.out, tokenizer=tokenizer, overwrite=args.overwrite)
    print(
        f"Wanda {report.structure} pruning: {report.overall_sparsity:.1%} of {report.total_weights:,} weights in "
        f"{len(report.layer_sparsity)} linears set to zero ({report.calibration_tokens:,} calibration tokens); "
        f"saved to {out}"
    )
    if report.unpruned_experts:
        print(f"left dense (no calibration token routed to them): {', '.join(report.unpruned_experts)}")
    return 0


__all__ = ["add_prune_arguments", "load_for_pruning", "run_prune_command"]
