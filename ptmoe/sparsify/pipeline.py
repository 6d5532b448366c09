"""`ptmoe.sparsify` / `ptmoe sparsify`: dense checkpoint → split → fit routers → distil → save, with a report."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence

import torch
from torch import nn
from transformers import AutoConfig, PreTrainedModel

from ..calibration import batches, load_texts, model_inputs, resolve_tokenizer
from ..outputs import check_output_dir
from ..upcycling import (
    PARTITION_STRATEGIES,
    architecture_for_checkpoint,
    import_class,
    layers_argument,
    save_upcycled,
    upcycle,
)
from .routers import fit_routers, require_moe_blocks


def active_ffn_share(config) -> float:
    """Share of the dense FFN's neurons one token uses: ``(S + k · expert_size) / intermediate_size``."""
    dense = getattr(config, "intermediate_size", None) or config.d_ff
    shared = (config.shared_expert_intermediate_size or 0) * (1 if config.num_shared_experts else 0)
    expert = config.expert_intermediate_size or dense
    return (shared + config.num_experts_per_tok * expert) / dense


@torch.no_grad()
@torch.no_grad()
def agreement_with_dense(
    model: nn.Module, dense: nn.Module, texts: Sequence[str], tokenizer
) -> dict[str, float]:
    """How close `model` stays to `dense` on `texts`: mean per-token cosine of the last hidden states, and (with an
    LM head) the share of tokens whose top-1 prediction is the same."""
    model.eval()
    dense.eval()
    cosines, same, count = [], 0, 0
    for batch in batches(texts, tokenizer, 16, 128, next(model.parameters()).device):
        a = model(**model_inputs(model, batch), output_hidden_states=True)
        b = dense(**model_inputs(dense, batch), output_hidden_states=True)
        mask = batch["attention_mask"].bool()
        ha = (a.hidden_states if getattr(a, "hidden_states", None) is not None else a.encoder_hidden_states)[
            -1
        ]
        hb = (b.hidden_states if getattr(b, "hidden_states", None) is not None else b.encoder_hidden_states)[
            -1
        ]
        cosines.append(torch.nn.functional.cosine_similarity(ha[mask], hb[mask], dim=-1))
        if getattr(a, "logits", None) is not None and a.logits.shape[1] == mask.shape[1]:
            same += int((a.logits.argmax(-1) == b.logits.argmax(-1))[mask].sum())
            count += int(mask.sum())
    result = {"hidden_cosine": float(torch.cat(cosines).mean())}
    if count:
        result["top1_agreement"] = same / count
    return result


def load_dense(base: str | os.PathLike, task: str | None = None) -> PreTrainedModel:
    """The dense checkpoint as the transformers class `ptmoe.upcycle` maps (see `architecture_for_checkpoint`)."""
    arch = architecture_for_checkpoint(AutoConfig.from_pretrained(os.fspath(base)), task)
    return import_class("transformers", arch.dense_class).from_pretrained(os.fspath(base)).eval()


def sparsify(
    base: str | os.PathLike | PreTrainedModel,
    calibration,
    *,
    num_experts: int = 8,
    num_experts_per_tok: int = 2,
    num_shared_neurons: int = 0,
    split: str = "coactivation",
    moe_layers: int | list[int] = 1,
    fit_steps: int = 300,
    distill_steps: int = 200,
    learning_rate: float = 1e-4,
    distill_batch_size: int = 8,
    heldout_fraction: float = 0.1,
    tokenizer=None,
    task: str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> tuple[PreTrainedModel, dict]:
    """Split a dense model's FFNs into experts, fit the routers and distil: a model that runs k/E of each FFN.

    Args:
        base: the dense checkpoint (path / Hub id) or model.
        calibration: unlabeled text (list, `datasets.Dataset` or text file); the last `heldout_fraction` is kept
            out of every step to measure the agreement with the dense model.
        num_experts / num_experts_per_tok / num_shared_neurons / split: see `ptmoe.upcycle` (method "partition").
        moe_layers (defaults to 1 = every layer): which FFNs to split.
        fit_steps / distill_steps: router-fitting and distillation steps (0 skips distillation).
        learning_rate (`float`, defaults to 1e-4): distillation learning rate.
        distill_batch_size (`int`, defaults to 8): texts per distillation step.
        tokenizer (*optional*): tokenizer for `calibration` (default: the dense checkpoint's).
        task (`str`, *optional*): which dense head to load (see `ptmoe.upcycle`).
        seed (`int`): seeds the split, the routers and distillation.

    Returns:
        `(model, report)`; the report has `active_ffn_share`, the agreement with the dense model on the held-out
        text before fitting, after fitting and after distillation, and the wall time of each step (seconds).
    """
    from ..compress.distillation import distill

    texts = load_texts(calibration, what="calibration")
    if len(texts) < 2:
        raise ValueError("`calibration` needs at least 2 texts (some are held out to measure the agreement)")
    heldout = max(1, int(len(texts) * heldout_fraction))
    train_texts, heldout_texts = texts[:-heldout], texts[-heldout:]
    dense = base if isinstance(base, PreTrainedModel) else load_dense(base, task)
    tokenizer = resolve_tokenizer(dense, tokenizer)
    report: dict = {"seconds": {}}
    start = time.perf_counter()
    model = upcycle(
        dense,
        num_experts=num_experts,
        num_experts_per_tok=num_experts_per_tok,
        moe_layers=moe_layers,
        method="partition",
        partition=split,
        num_shared_neurons=num_shared_neurons,
        calibration=train_texts if split == "coactivation" or num_shared_neurons else None,
        tokenizer=tokenizer,
        combine_weights="ones",
        router_init="normal",
        seed=seed,
        progress=progress,
    )
    require_moe_blocks(model)
    report["seconds"]["split"] = time.perf_counter() - start
    report["active_ffn_share"] = active_ffn_share(model.config)
    report["untrained_routers"] = agreement_with_dense(model, dense, heldout_texts, tokenizer)
    start = time.perf_counter()
    fits = fit_routers(model, train_texts, steps=fit_steps, tokenizer=tokenizer, seed=seed, progress=progress)
    report["seconds"]["fit_routers"] = time.perf_counter() - start
    report["router_agreement_with_oracle"] = sum(f.agreement for f in fits.values()) / len(fits)
    report["fitted_routers"] = agreement_with_dense(model, dense, heldout_texts, tokenizer)
    if distill_steps:
        start = time.perf_counter()
        distill(
            model,
            dense,
            train_texts,
            steps=distill_steps,
            tokenizer=tokenizer,
            learning_rate=learning_rate,
            batch_size=distill_batch_size,
            seed=seed,
            progress=progress,
        )
        report["seconds"]["distill"] = time.perf_counter() - start
        report["distilled"] = agreement_with_dense(model, dense, heldout_texts, tokenizer)
    model.eval()
    return model, report


# --------------------------------------------------------------------------------------------------------------
# `ptmoe sparsify` (registered in ptmoe/cli.py)
# --------------------------------------------------------------------------------------------------------------
def add_sparsify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help="dense BERT/RoBERTa/T5 checkpoint: folder or Hub id")
    parser.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    parser.add_argument("--calibration", required=True, help="unlabeled text file, one text per line")
    parser.add_argument("--experts", type=int, default=8, help="experts per FFN (default 8)")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    parser.add_argument(
        "--shared-neurons", type=int, default=0, help="most important neurons kept always active"
    )
    parser.add_argument("--split", choices=PARTITION_STRATEGIES, default="coactivation")
    parser.add_argument("--moe-layers", type=layers_argument, default=1, help="every n-th layer (1 = all)")
    parser.add_argument("--fit-steps", type=int, default=300, help="router-fitting steps per layer")
    parser.add_argument("--distill-steps", type=int, default=200, help="distillation steps (0: none)")
    parser.add_argument("--learning-rate", type=float, default=1e-4, help="distillation learning rate")
    parser.add_argument("--task", default=None, help="dense head to load (e.g. masked-lm, base)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--no-progress", action="store_true")


def run_sparsify_command(args: argparse.Namespace) -> int:
    """`ptmoe sparsify`: split → fit routers → distil → save (atomic); prints the active FFN share and agreement.

    Bad input raises (`ValueError` / `OSError`); `ptmoe.cli.main` prints it as one error line with exit code 2.
    """
    from ..models.moe import check_local_checkpoint

    check_output_dir(args.out, args.overwrite)  # before hours of work, not after
    check_local_checkpoint(args.base, "--base")
    if args.top_k > args.experts:
        raise ValueError(f"--top-k ({args.top_k}) cannot be larger than --experts ({args.experts})")
    load_texts(args.calibration, what="--calibration")
    model, report = sparsify(
        args.base,
        args.calibration,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        num_shared_neurons=args.shared_neurons,
        split=args.split,
        moe_layers=args.moe_layers,
        fit_steps=args.fit_steps,
        distill_steps=args.distill_steps,
        learning_rate=args.learning_rate,
        task=args.task,
        seed=args.seed,
        progress=not args.no_progress,
    )
    # The tokenizer of `--base` (recorded as `upcycled_from`) is saved beside the weights.
    out = save_upcycled(model, args.out, overwrite=args.overwrite)
    print(f"sparsified model saved to {out}")
    print(
        f"active FFN share: {report['active_ffn_share']:.3f} (top-{args.top_k} of {args.experts} experts"
        f"{f' + {args.shared_neurons} shared neurons' if args.shared_neurons else ''})"
    )
    for stage in ("untrained_routers", "fitted_routers", "distilled"):
        if stage in report:
            values = ", ".join(f"{k} {v:.4f}" for k, v in report[stage].items())
            print(f"agreement with dense on held-out calibration text, {stage.replace('_', ' ')}: {values}")
    print("wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in report["seconds"].items()))
    return 0
