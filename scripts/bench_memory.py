"""Memory, speed and fine-tuning cost of MoE-BERT-base in fp32, bf16, 8-bit, 4-bit NF4 and INT8 dynamic.

    python scripts/bench_memory.py            # MoE-BERT-base: 8 experts in every 2nd layer, top-2, 16 x 128 tokens
    python scripts/bench_memory.py --quick    # tiny shapes, to check the script works

The model is built from its config with random weights (nothing is downloaded), saved once to a temporary folder
and loaded per variant in a fresh Python subprocess, so every variant's peak RSS is its own:

- memory: `model.get_memory_footprint()` (parameters + buffers; bitsandbytes' quantization constants are not
  parameters and are not counted); the subprocess's peak RSS (`resource.getrusage(RUSAGE_SELF).ru_maxrss`) over
  loading and one forward; its private memory (`RssAnon` of /proc/self/status after that forward, minus the value
  after importing torch/transformers/ptmoe) and its file-backed memory (`RssFile`: libraries and the
  memory-mapped checkpoint, which the kernel can drop under pressure);
- forward speed: tokens/s, median of `--runs` timed forwards after `--warmup`, `--threads` threads, inference mode;
- LoRA per expert at r=8 on every expert (`ptmoe.expert_lora_config`): trainable share and adapter size on disk;
- training step time (forward + backward + AdamW step, median of `--steps`) of LoRA on the fp32 base against
  QLoRA on the NF4 base, both with gradient checkpointing off for a like-for-like comparison.

Ratios are computed between variants measured in this run: they travel between machines better than absolutes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ptmoe.energy import add_energy_arguments, finish_benchmark_energy, start_benchmark_energy

BERT_BASE = dict(
    vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072
)
BERT_TINY = dict(
    vocab_size=99, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128
)
MOE = dict(num_experts=8, num_experts_per_tok=2, moe_layers=2, num_labels=2)

LOAD_VARIANTS = ["fp32", "bf16", "int8-bnb", "nf4"]
SPEED_VARIANTS = ["fp32", "bf16", "int8-dynamic", "nf4", "nf4-fp32-compute"]
TRAIN_VARIANTS = ["lora-fp32", "qlora-nf4"]
TARGET_4BIT_FOOTPRINT = 0.22
TARGET_TRAINABLE_SHARE = 0.01


# --------------------------------------------------------------------------------------------------------------
# Child process: load one variant, measure, print one JSON line
# --------------------------------------------------------------------------------------------------------------
def _status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (Linux, kB) in bytes: RssAnon, RssFile or VmHWM (peak RSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports kB


def _load(variant: str, path: str):
    import torch
    from transformers import BitsAndBytesConfig

    import ptmoe

    model_class = ptmoe.MoeBertForSequenceClassification
    if variant in ("fp32", "int8-dynamic", "lora-fp32"):
        model = model_class.from_pretrained(path)
    elif variant == "bf16":
        model = model_class.from_pretrained(path, dtype=torch.bfloat16)
    elif variant == "int8-bnb":
        model = model_class.from_pretrained(path, quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    elif variant in ("nf4", "qlora-nf4"):
        model = model_class.from_pretrained(path, quantization_config=ptmoe.bnb_4bit_config())
    elif variant == "nf4-fp32-compute":
        config = ptmoe.bnb_4bit_config(compute_dtype=torch.float32)
        model = model_class.from_pretrained(path, quantization_config=config)
    else:
        raise ValueError(f"unknown variant {variant!r}")
    if variant == "int8-dynamic":
        model = ptmoe.quantize_dynamic_int8(model, inplace=True)
    return model


def _inputs(vocab_size: int, batch: int, seq: int, labels: bool = False) -> dict:
    import torch

    generator = torch.Generator().manual_seed(0)
    inputs = {
        "input_ids": torch.randint(0, vocab_size, (batch, seq), generator=generator),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
    }
    if labels:
        inputs["labels"] = torch.randint(0, 2, (batch,), generator=generator)
    return inputs


def child(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import ptmoe  # noqa: F401  (import cost belongs to the baseline)

    result = {"variant": args.child, "baseline_anon": _status_bytes("RssAnon")}
    model = _load(args.child, args.path).eval()
    if args.child != "int8-dynamic":  # packed int8 weights are not parameters: the footprint would be wrong
        result["footprint"] = model.get_memory_footprint()

    if args.mode == "load":
        # One forward touches every weight: an fp32 checkpoint is memory-mapped and only read on first use.
        with torch.inference_mode():
            model(**_inputs(model.config.vocab_size, 4, args.seq))
        result.update(
            peak_rss=_peak_rss_bytes(), anon=_status_bytes("RssAnon"), file=_status_bytes("RssFile")
        )
    elif args.mode == "speed":
        inputs = _inputs(model.config.vocab_size, args.batch, args.seq)
        times = []
        with torch.inference_mode():
            for i in range(args.warmup + args.runs):
                start = time.perf_counter()
                model(**inputs)
                if i >= args.warmup:
                    times.append(time.perf_counter() - start)
        result["tokens_per_s"] = args.batch * args.seq / statistics.median(times)
    elif args.mode == "train":
        result.update(_train_steps(model, args))
    return result


def _train_steps(model, args: argparse.Namespace) -> dict:
    import torch

    import ptmoe

    peft_model = ptmoe.prepare_qlora_model(model, r=8, gradient_checkpointing=False)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    inputs = _inputs(model.config.vocab_size, args.train_batch, args.seq, labels=True)
    peft_model.train()
    times = []
    for i in range(1 + args.steps):
        start = time.perf_counter()
        peft_model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if i >= 1:
            times.append(time.perf_counter() - start)
    result = {
        "step_s": statistics.median(times),
        "peak_rss_after_training": _peak_rss_bytes(),
        "anon_after_training": _status_bytes("RssAnon"),
    }
    if args.child == "lora-fp32":
        total = sum(p.numel() for p in peft_model.parameters())
        with tempfile.TemporaryDirectory() as adapter_dir:
            peft_model.save_pretrained(adapter_dir)
            adapter_bytes = (Path(adapter_dir) / "adapter_model.safetensors").stat().st_size
        result.update(trainable=trainable, total=total, adapter_bytes=adapter_bytes)
    return result


def run_child(variant: str, mode: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", variant, "--mode", mode, "--path", str(args.path)]
    for name in ("threads", "batch", "seq", "runs", "warmup", "steps", "train_batch"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    completed = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    if completed.returncode != 0:
        raise RuntimeError(f"variant {variant} ({mode}) failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------------------
# Parent: build the checkpoint, run the children, print the tables
# --------------------------------------------------------------------------------------------------------------
def build_checkpoint(path: Path, shape: dict) -> dict:
    import torch

    import ptmoe

    torch.manual_seed(0)
    model = ptmoe.MoeBertForSequenceClassification(ptmoe.MoeBertConfig(**shape, **MOE))
    model.save_pretrained(path)
    return {
        "fp32_footprint": model.get_memory_footprint(),
        "predicted_nf4": ptmoe.estimate_quantized_footprint(model, 4),
        "predicted_int8": ptmoe.estimate_quantized_footprint(model, 8),
        "predicted_bf16_nf4": ptmoe.estimate_quantized_footprint(model, 4, dtype=torch.bfloat16),
        "params": sum(p.numel() for p in model.parameters()),
        "checkpoint_bytes": (path / "model.safetensors").stat().st_size,
    }


def mb(value: float) -> str:
    return f"{value / 2**20:,.1f}"


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def report(info: dict, loads: dict, speeds: dict, trains: dict) -> None:
    fp32 = loads["fp32"]
    print(
        f"\nmemory (MB)              {'footprint':>10} {'x fp32':>7} {'peak RSS':>10} {'private':>10} {'x fp32':>7}"
        f" {'file-backed':>12}"
    )
    for variant, result in loads.items():
        private = result["anon"] - result["baseline_anon"]
        fp32_private = fp32["anon"] - fp32["baseline_anon"]
        print(
            f"{variant:<24} {mb(result['footprint']):>10} {result['footprint'] / fp32['footprint']:>7.3f} "
            f"{mb(result['peak_rss']):>10} {mb(private):>10} {private / fp32_private:>7.3f} {mb(result['file']):>12}"
        )
    print(
        "peak RSS = ru_maxrss of the variant's own process (load + one 4 x seq forward); private = RssAnon after that"
        " forward minus RssAnon after the imports; file-backed = RssFile (libraries and the memory-mapped fp32"
        " checkpoint: clean pages the kernel can drop)"
    )
    print(
        f"predicted footprint: nf4 {mb(info['predicted_nf4'])} MB, 8-bit {mb(info['predicted_int8'])} MB "
        f"(ptmoe.estimate_quantized_footprint)"
    )
    nf4_ratio = loads["nf4"]["footprint"] / fp32["footprint"]
    print(
        f"4-bit footprint / fp32 = {nf4_ratio:.3f}  (target <= {TARGET_4BIT_FOOTPRINT})  {verdict(nf4_ratio <= 0.22)}"
    )

    print(f"\nforward                  {'tokens/s':>10} {'x fp32':>7}")
    for variant, result in speeds.items():
        ratio = result["tokens_per_s"] / speeds["fp32"]["tokens_per_s"]
        print(f"{variant:<24} {result['tokens_per_s']:>10,.0f} {ratio:>7.3f}")

    lora, qlora = trains["lora-fp32"], trains["qlora-nf4"]
    share = lora["trainable"] / lora["total"]
    print(
        f"\nLoRA per expert, r=8, every expert: {lora['trainable']:,} trainable of {lora['total']:,} parameters = "
        f"{100 * share:.3f}%  (target <= {100 * TARGET_TRAINABLE_SHARE:.0f}%)  {verdict(share <= 0.01)}"
    )
    print(
        f"adapter on disk: {mb(lora['adapter_bytes'])} MB  ({lora['adapter_bytes'] / info['checkpoint_bytes']:.4f} "
        f"x the {mb(info['checkpoint_bytes'])} MB fp32 checkpoint)"
    )
    print(f"\ntraining step            {'s/step':>10} {'x LoRA':>7} {'peak RSS':>10} {'RssAnon':>10}")
    for variant, result in trains.items():
        print(
            f"{variant:<24} {result['step_s']:>10.3f} {result['step_s'] / lora['step_s']:>7.3f} "
            f"{mb(result['peak_rss_after_training']):>10} {mb(result['anon_after_training']):>10}"
        )
    print(f"QLoRA step time / LoRA step time = {qlora['step_s'] / lora['step_s']:.3f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny shapes and few runs: check the script works"
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed training steps (after one warm-up step)")
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="load", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    add_energy_arguments(parser)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(child(args)))
        return
    energy = start_benchmark_energy(args, parser)  # the machine's energy, children included
    if args.quick:
        args.batch, args.seq, args.runs, args.warmup, args.steps, args.train_batch = 2, 16, 3, 1, 2, 2
    shape = BERT_TINY if args.quick else BERT_BASE
    print(
        f"MoE-BERT{' (tiny)' if args.quick else '-base'}: {shape}, {MOE}; {args.threads} threads; forward "
        f"{args.batch} x {args.seq} tokens, median of {args.runs} after {args.warmup} warm-up; training batch "
        f"{args.train_batch} x {args.seq}, median of {args.steps} steps",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as folder:
        args.path = Path(folder)
        info = build_checkpoint(args.path, shape)
        print(f"checkpoint: {info['params']:,} parameters, {mb(info['checkpoint_bytes'])} MB", flush=True)
        loads, speeds, trains = {}, {}, {}
        for variant in LOAD_VARIANTS:
            loads[variant] = run_child(variant, "load", args)
            print(f"  loaded {variant}", flush=True)
        for variant in SPEED_VARIANTS:
            speeds[variant] = run_child(variant, "speed", args)
            print(f"  forward {variant}: {speeds[variant]['tokens_per_s']:,.0f} tokens/s", flush=True)
        for variant in TRAIN_VARIANTS:
            trains[variant] = run_child(variant, "train", args)
            print(f"  training {variant}: {trains[variant]['step_s']:.3f} s/step", flush=True)
    report(info, loads, speeds, trains)
    finish_benchmark_energy(energy)


if __name__ == "__main__":
    from ptmoe.errors import run_script  # here: after the environment set-up above

    run_script(main)
