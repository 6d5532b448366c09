"""Wanda pruning of a MoE-BERT: quality kept vs sparsity, footprint, and whether a sparse kernel makes it faster.

    python scripts/bench_prune.py              # small MoE-BERT trained here on the shipped corpus (a few minutes)
    python scripts/bench_prune.py --quick      # tiny sizes, 1 epoch, to check the script works
    python scripts/bench_prune.py --model_name_or_path outputs/demo/moe-mlm   # any MoE/dense MLM folder + tokenizer
    ... --report_to codecarbon --energy_country_iso_code BRA                  # + energy/CO2e of the run (offline)

Quality is the dense model's own objective on held-out text: masked-LM loss and top-1 accuracy on the last 20 % of
`ptmoe/data/corpus.txt` (never seen in training or calibration), 15 % of the real tokens of each line masked with a
seeded generator. For each seed, the calibration set is a different random sample of training lines and the masks
are drawn anew: the spread over seeds is the calibration-and-masking noise. Fidelity to the dense model at the same
masked positions: mean KL(dense ‖ pruned) and top-1 agreement (sensitive even when a small model's accuracy is
little above guessing frequent tokens). Variants (each pruned from a fresh copy
of the same model): Wanda unstructured at several sparsities, Wanda with `expert_sparsity="by_load"`, the ablation
`expert_statistics="all_tokens"` (expert norms from every token of the layer instead of the routed ones), Wanda 2:4,
and magnitude pruning (|W| only, per row) at 50 % as the baseline Wanda improves on.

Footprint: `get_memory_footprint()` of the stored (dense-format) model, and the bytes the pruned linears would take
as torch CSR tensors (values + column indices + row pointers), measured by converting them.

Speed: pruning alone changes nothing on dense kernels (the zeros are still multiplied), so the benchmark times
(a) the whole model, dense vs 50 % pruned, round-robin; (b) one expert-shaped linear layer, dense `F.linear` vs
`torch.sparse.mm` with a CSR weight at 50 % and 70 % sparsity, round-robin, median of per-round ratios; and (c)
tries torch's 2:4 semi-structured sparse tensors on this device and records whether they exist.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import ptmoe
from ptmoe.compress.pruning import prunable_linears, prune_wanda, wanda_mask
from ptmoe.energy import add_energy_arguments, finish_benchmark_energy, start_benchmark_energy

CORPUS = Path(ptmoe.__file__).parent / "data" / "corpus.txt"
FULL = dict(
    vocab_size=2000, hidden_size=128, num_layers=4, intermediate_size=512, dense_epochs=30.0, moe_epochs=5.0
)
QUICK = dict(
    vocab_size=600, hidden_size=64, num_layers=2, intermediate_size=128, dense_epochs=0.3, moe_epochs=0.3
)
SPARSITIES = (0.3, 0.5, 0.7)


# --------------------------------------------------------------------------------------------------------------
# Model and data
# --------------------------------------------------------------------------------------------------------------
def corpus_split() -> tuple[list[str], list[str]]:
    lines = [line for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]
    cut = int(len(lines) * 0.8)
    return lines[:cut], lines[cut:]


def train_model(sizes: dict, train_lines: list[str], workdir: Path, seed: int = 0):
    """Dense BERT MLM trained briefly on `train_lines`, upcycled to MoE-BERT (4 experts, top-2), trained briefly."""
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from ptmoe.training import train_tokenizer

    def training_args(out: str, epochs: float, learning_rate: float) -> TrainingArguments:
        return TrainingArguments(
            output_dir=str(workdir / out), num_train_epochs=epochs, learning_rate=learning_rate,
            per_device_train_batch_size=32, warmup_steps=0.1, weight_decay=0.01, save_strategy="no",
            report_to=[], seed=seed, use_cpu=True, disable_tqdm=True, logging_strategy="no",
        )  # fmt: skip

    set_seed(seed)
    tokenizer = train_tokenizer(train_lines, sizes["vocab_size"], workdir / "tokenizer")
    encoded = tokenizer(train_lines, truncation=True, max_length=64)
    dataset = [{"input_ids": ids} for ids in encoded["input_ids"]]
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    dense = BertForMaskedLM(
        BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=sizes["hidden_size"],
            num_hidden_layers=sizes["num_layers"],
            num_attention_heads=4,
            intermediate_size=sizes["intermediate_size"],
            max_position_embeddings=64,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    args = training_args("dense", sizes["dense_epochs"], 1e-3)
    Trainer(model=dense, args=args, train_dataset=dataset, data_collator=collator).train()
    dense.save_pretrained(workdir / "dense")
    tokenizer.save_pretrained(workdir / "dense")
    moe = ptmoe.upcycle(
        workdir / "dense", num_experts=4, num_experts_per_tok=2, moe_layers=1, method="noise", seed=seed
    )
    args = training_args("moe", sizes["moe_epochs"], 5e-4)
    Trainer(model=moe, args=args, train_dataset=dataset, data_collator=collator).train()
    return moe.eval(), tokenizer


def masked_batches(
    tokenizer, lines: list[str], seed: int, batch_size: int = 32
) -> list[dict[str, torch.Tensor]]:
    """Held-out lines with 15 % of their real tokens (at least one) replaced by [MASK]; labels -100 elsewhere."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for start in range(0, len(lines), batch_size):
        batch = tokenizer(
            lines[start : start + batch_size],
            truncation=True,
            max_length=64,
            padding=True,
            return_tensors="pt",
        )
        special = torch.tensor(
            [
                tokenizer.get_special_tokens_mask(ids, already_has_special_tokens=True)
                for ids in batch["input_ids"].tolist()
            ]
        ).bool()
        candidates = batch["attention_mask"].bool() & ~special  # (B, S)
        scores = torch.rand(candidates.shape, generator=generator).masked_fill(~candidates, 2.0)
        masked = (scores < 0.15) & candidates
        first = scores.argmin(dim=1)  # guarantee one masked token per line
        masked[torch.arange(len(first)), first] |= candidates[torch.arange(len(first)), first]
        labels = batch["input_ids"].masked_fill(~masked, -100)
        batch["input_ids"] = batch["input_ids"].masked_fill(masked, tokenizer.mask_token_id)
        batches.append({**batch, "labels": labels})
    return batches


@torch.no_grad()
def mlm_quality(model: nn.Module, batches, reference: list[torch.Tensor] | None = None) -> dict[str, float]:
    """Over the masked positions: mean cross-entropy, top-1 accuracy, and against `reference` (the dense model's
    log-probabilities at the same positions, one tensor per batch) the mean KL(dense ‖ model) and top-1 agreement.

    The fidelity numbers matter for small models trained briefly: their accuracy is close to guessing frequent
    tokens, while KL shows how far pruning moved the whole output distribution.
    """
    loss_sum, correct, count, kl_sum, agree = 0.0, 0, 0, 0.0, 0
    log_probs_per_batch = []
    for index, batch in enumerate(batches):
        labels = batch["labels"]
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits  # (B, S, V)
        chosen = labels != -100
        log_probs = logits[chosen].float().log_softmax(-1)  # (masked, V)
        log_probs_per_batch.append(log_probs)
        loss_sum += F.nll_loss(log_probs, labels[chosen], reduction="sum").item()
        correct += int((log_probs.argmax(-1) == labels[chosen]).sum())
        count += int(chosen.sum())
        if reference is not None:
            dense = reference[index]
            kl_sum += F.kl_div(log_probs, dense, log_target=True, reduction="sum").item()
            agree += int((log_probs.argmax(-1) == dense.argmax(-1)).sum())
    out = {"loss": loss_sum / count, "accuracy": correct / count, "log_probs": log_probs_per_batch}
    if reference is not None:
        out.update(kl_to_dense=kl_sum / count, top1_agreement=agree / count)
    return out


def magnitude_prune(model: nn.Module, sparsity: float) -> None:
    """Baseline: the lowest |W| of each output row (Wanda with every input norm equal)."""
    with torch.no_grad():
        for name in prunable_linears(model):
            weight = model.get_submodule(name).weight
            weight.masked_fill_(wanda_mask(weight.abs().float(), sparsity), 0)


def variants() -> list[tuple[str, dict | None]]:
    """(name, prune_wanda kwargs); None = dense; {"magnitude": s} = the baseline."""
    out: list[tuple[str, dict | None]] = [("dense", None)]
    out += [(f"wanda {s:.0%}", {"sparsity": s}) for s in SPARSITIES]
    out += [("wanda 50% by_load", {"sparsity": 0.5, "expert_sparsity": "by_load"})]
    out += [("wanda 50% all-token", {"sparsity": 0.5, "expert_statistics": "all_tokens"})]  # ablation
    out += [("wanda 2:4", {"structure": "2:4"})]
    out += [("magnitude 50%", {"magnitude": 0.5})]
    return out


# --------------------------------------------------------------------------------------------------------------
# Footprint and speed
# --------------------------------------------------------------------------------------------------------------
def csr_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the prunable linears' weights as stored, bytes as torch CSR tensors)."""
    dense_bytes = sparse_bytes = 0
    for name in prunable_linears(model):
        weight = model.get_submodule(name).weight.detach()
        csr = weight.to_sparse_csr()
        dense_bytes += weight.numel() * weight.element_size()
        sparse_bytes += sum(
            t.numel() * t.element_size() for t in (csr.values(), csr.col_indices(), csr.crow_indices())
        )
    return dense_bytes, sparse_bytes


def semi_structured_status() -> str:
    """Whether torch's 2:4 semi-structured sparse tensors work on this device (tried, not assumed)."""
    try:
        from torch.sparse import to_sparse_semi_structured

        weight = torch.randn(64, 64) * torch.tensor([1.0, 1.0, 0.0, 0.0]).repeat(64, 16)
        to_sparse_semi_structured(weight)
    except Exception as error:  # noqa: BLE001 - any failure means "not available here"; we report the message
        return f"not available: {type(error).__name__}: {str(error).splitlines()[0]}"
    return "available"


def round_robin(
    calls: dict[str, callable], runs: int, reference: str
) -> dict[str, tuple[float, float, float]]:
    """Median seconds per call and the median [min, max] of per-round time ratios `reference / name` (speed-up)."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():  # warm-up
        call()
    for _ in range(runs):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    out = {}
    for name in calls:
        ratios = [r / t for r, t in zip(times[reference], times[name], strict=True)]
        out[name] = (statistics.median(times[name]), statistics.median(ratios), min(ratios), max(ratios))
    return out


def linear_speed(in_features: int, out_features: int, tokens: int, runs: int) -> dict[str, tuple]:
    """Dense F.linear vs CSR `torch.sparse.mm` on one layer pruned with Wanda's per-row rule (random weights)."""
    torch.manual_seed(0)
    weight = torch.randn(out_features, in_features)
    x = torch.randn(tokens, in_features)
    calls = {"dense": lambda: F.linear(x, weight)}
    for sparsity in (0.5, 0.7):
        pruned = weight.masked_fill(wanda_mask(weight.abs(), sparsity), 0).to_sparse_csr()
        calls[f"CSR {sparsity:.0%}"] = lambda pruned=pruned: torch.sparse.mm(pruned, x.T)
    return round_robin(calls, runs, "dense")


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny model, 1 epoch, 1 seed: checks the script runs"
    )
    parser.add_argument(
        "--model_name_or_path", help="MoE (or dense) MLM folder with tokenizer; default: train one"
    )
    parser.add_argument("--seeds", type=int, default=3, help="calibration samples / mask draws (default 3)")
    parser.add_argument("--calibration_lines", type=int, default=64, help="calibration lines per seed")
    parser.add_argument("--runs", type=int, default=15, help="timed rounds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", help="also write the results as JSON here")
    parser.add_argument(
        "--save_model", help="keep the model trained here in this folder (reuse: --model_name_or_path)"
    )
    add_energy_arguments(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.runs, args.calibration_lines = 1, 3, 16
    if args.seeds < 1 or args.runs < 1 or args.calibration_lines < 1:
        parser.error("--seeds, --runs and --calibration_lines must be >= 1")
    tracker = start_benchmark_energy(args, parser)  # checked before any work; the whole run is tracked
    torch.set_num_threads(args.threads)
    train_lines, heldout = corpus_split()
    if args.quick:
        heldout = heldout[:32]

    with tempfile.TemporaryDirectory() as workdir:
        if args.model_name_or_path:
            from transformers import AutoTokenizer

            from ptmoe.compress.prune_command import load_for_pruning

            model = load_for_pruning(args.model_name_or_path)
            tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
            source = args.model_name_or_path
        else:
            sizes = QUICK if args.quick else FULL
            print(f"training a MoE-BERT MLM on {len(train_lines)} corpus lines: {sizes}", flush=True)
            model, tokenizer = train_model(sizes, train_lines, Path(workdir))
            if args.save_model:
                from ptmoe.compress import save_pruned  # the same atomic writer; nothing is pruned yet

                save_pruned(model, args.save_model, tokenizer=tokenizer)
            source = f"trained here: {sizes}, upcycled (noise) to 4 experts top-2 in every layer"

    results: dict = {"model": source, "heldout_lines": len(heldout), "seeds": args.seeds, "variants": {}}
    dense_footprint = model.get_memory_footprint()
    dense_log_probs: dict[
        int, list[torch.Tensor]
    ] = {}  # seed → the dense model's log-probs ("dense" runs first)
    for name, kwargs in variants():
        per_seed = []
        for seed in range(args.seeds):
            candidate = copy.deepcopy(model)
            sample = torch.randperm(len(train_lines), generator=torch.Generator().manual_seed(seed))
            calibration = [train_lines[i] for i in sample[: args.calibration_lines].tolist()]
            report = None
            if kwargs and "magnitude" in kwargs:
                magnitude_prune(candidate, kwargs["magnitude"])
            elif kwargs:
                report = prune_wanda(
                    candidate, calibration, tokenizer=tokenizer, show_progress=False, min_tokens=1, **kwargs
                )
            quality = mlm_quality(
                candidate, masked_batches(tokenizer, heldout, seed), dense_log_probs.get(seed)
            )
            if kwargs is None:
                dense_log_probs[seed] = quality["log_probs"]
            dense_bytes, sparse_bytes = csr_bytes(candidate)
            per_seed.append(
                {
                    "loss": quality["loss"],
                    "accuracy": quality["accuracy"],
                    "kl_to_dense": quality.get("kl_to_dense", 0.0),
                    "top1_agreement": quality.get("top1_agreement", 1.0),
                    "overall_sparsity": report.overall_sparsity if report else None,
                    "unpruned_experts": len(report.unpruned_experts) if report else 0,
                    "linear_bytes": dense_bytes,
                    "linear_csr_bytes": sparse_bytes,
                }
            )
        results["variants"][name] = per_seed
        del candidate

    dense_quality = results["variants"]["dense"]
    print(
        f"\nWanda pruning, MLM on {len(heldout)} held-out corpus lines, {args.seeds} seed(s) (calibration sample + masks)"
    )
    print(
        f"{'variant':<20} {'MLM loss':>16} {'accuracy':>16} {'acc kept':>9} {'KL to dense':>18} "
        f"{'top-1 = dense':>14} {'CSR/dense':>10}"
    )
    for name, per_seed in results["variants"].items():
        losses = [s["loss"] for s in per_seed]
        accuracies = [s["accuracy"] for s in per_seed]
        kept = [s["accuracy"] / d["accuracy"] for s, d in zip(per_seed, dense_quality, strict=True)]
        csr = per_seed[0]["linear_csr_bytes"] / per_seed[0]["linear_bytes"]
        kls = [s["kl_to_dense"] for s in per_seed]
        agreements = [s["top1_agreement"] for s in per_seed]
        summary = {
            "loss_median": statistics.median(losses),
            "loss_range": [min(losses), max(losses)],
            "accuracy_median": statistics.median(accuracies),
            "accuracy_range": [min(accuracies), max(accuracies)],
            "accuracy_kept_median": statistics.median(kept),
            "kl_to_dense_median": statistics.median(kls),
            "kl_to_dense_range": [min(kls), max(kls)],
            "top1_agreement_median": statistics.median(agreements),
            "csr_over_dense_linear_bytes": csr,
        }
        results.setdefault("summary", {})[name] = summary
        print(
            f"{name:<20} {summary['loss_median']:7.3f} [{min(losses):.2f}-{max(losses):.2f}]"
            f" {summary['accuracy_median']:7.3f} [{min(accuracies):.2f}-{max(accuracies):.2f}]"
            f" {summary['accuracy_kept_median']:9.3f} {summary['kl_to_dense_median']:7.4f} [{min(kls):.3f}-{max(kls):.3f}]"
            f" {summary['top1_agreement_median']:14.3f} {csr:10.2f}"
        )
    print(f"\nfootprint as stored (dense format, every variant): {dense_footprint / 2**20:.2f} MB")

    pruned = copy.deepcopy(model)
    prune_wanda(
        pruned, train_lines[: args.calibration_lines], tokenizer=tokenizer, show_progress=False, min_tokens=1
    )
    batch = tokenizer(heldout[:16], truncation=True, max_length=64, padding="max_length", return_tensors="pt")
    with torch.inference_mode():
        model_speed = round_robin(
            {"dense": lambda: model(**batch), "wanda 50%": lambda: pruned(**batch)}, args.runs, "dense"
        )
    tokens = int(batch["attention_mask"].numel())
    config = model.config
    shapes = [(config.hidden_size, config.intermediate_size, 128)]
    if not args.quick:
        shapes.append((768, 3072, 128))  # a BERT-base expert's wi
    layer_speed = {f"{i}->{o} x{t}": linear_speed(i, o, t, args.runs) for i, o, t in shapes}
    results["speed"] = {
        "model": model_speed,
        "linear": layer_speed,
        "semi_structured_2_4": semi_structured_status(),
    }
    print(f"\nforward, {tokens} tokens, dense kernels ({args.runs} rounds, round-robin):")
    for name, (seconds, ratio, low, high) in model_speed.items():
        print(
            f"  {name:<12} {tokens / seconds:9.0f} tokens/s   speed-up vs dense {ratio:.3f} [{low:.2f}-{high:.2f}]"
        )
    for shape, timings in layer_speed.items():
        print(f"one linear {shape} (CPU, {args.threads} threads):")
        for name, (seconds, ratio, low, high) in timings.items():
            print(
                f"  {name:<12} {seconds * 1e3:8.3f} ms   speed-up vs dense {ratio:.3f} [{low:.2f}-{high:.2f}]"
            )
    print(f"torch 2:4 semi-structured sparsity on CPU: {results['speed']['semi_structured_2_4']}")
    if tracker is not None:
        results["energy"] = finish_benchmark_energy(tracker)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    from ptmoe.errors import run_script

    run_script(main)
