"""Benchmark `ptmoe.upcycle`: wall time and peak memory to upcycle BERT-base- and T5-base-shaped dense models.

Every case runs in a fresh Python subprocess that builds a randomly initialised dense model (BERTimbau-base shape:
`BertForMaskedLM`, vocab 29794, hidden 768, 12 layers, FFN 3072; PTT5-base shape: `T5ForConditionalGeneration`,
vocab 32128, d_model 768, 12+12 layers, d_ff 3072, ReLU) and then times one `ptmoe.upcycle` call into 8 experts
(top-2, every 2nd layer). Nothing is downloaded.

Memory is the process's resident set size (RSS), not tracemalloc (which does not see torch's allocations):
the peak RSS (`VmHWM` in /proc/self/status) is reset to the current RSS just before the call (writing "5" to
/proc/self/clear_refs, Linux >= 4.0), and "peak" is `VmHWM` after the call minus the RSS before it: everything the
call allocated at its worst moment, the returned MoE model included. "ratio" divides it by the final MoE model's
size (bytes of its distinct parameter/buffer storages). With `--source disk` the dense checkpoint is saved first and
the call upcycles the folder path (the Hub-id code path: loading included in time and memory).

Usage:
    python scripts/bench_upcycle.py --quick                 # tiny shapes, in this process, seconds
    python scripts/bench_upcycle.py                         # BERT-base and T5-base → 8 experts, every method
    python scripts/bench_upcycle.py --shapes bert-base --methods copy --source disk
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

SHAPES = {
    "bert-base": (
        "BertForMaskedLM",
        dict(
            vocab_size=29794,
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
        ),
    ),
    "t5-base": (
        "T5ForConditionalGeneration",
        dict(
            vocab_size=32128,
            d_model=768,
            d_kv=64,
            d_ff=3072,
            num_layers=12,
            num_heads=12,
            feed_forward_proj="relu",
            decoder_start_token_id=0,
        ),
    ),
    "bert-tiny": (
        "BertForMaskedLM",
        dict(
            vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256
        ),
    ),
    "t5-tiny": (
        "T5ForConditionalGeneration",
        dict(
            vocab_size=1000,
            d_model=64,
            d_kv=16,
            d_ff=256,
            num_layers=2,
            num_heads=4,
            feed_forward_proj="relu",
            decoder_start_token_id=0,
        ),
    ),
}
# (label, upcycle keyword arguments)
METHODS = {
    "copy": {"method": "copy"},
    "noise": {"method": "noise"},
    "drop": {"method": "drop"},
    "partition-random": {"method": "partition", "partition": "random"},
    "partition-clustered": {"method": "partition", "partition": "clustered"},
}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _storage_bytes(model) -> int:
    storages = {}
    for tensor in (*model.parameters(), *model.buffers()):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def build_dense(shape: str):
    """The randomly initialised dense model of a shape (seed 0)."""
    import torch
    import transformers

    class_name, fields = SHAPES[shape]
    config_class = transformers.BertConfig if class_name.startswith("Bert") else transformers.T5Config
    torch.manual_seed(0)
    return getattr(transformers, class_name)(config_class(**fields)).eval()


def run_case(shape: str, method: str, num_experts: int, dense_dir: str | None = None) -> dict:
    """One measurement: upcycle the in-memory dense model, or the checkpoint folder `dense_dir` (source "disk")."""
    import gc

    import ptmoe

    if dense_dir is None:
        target = build_dense(shape)
        dense_bytes = _storage_bytes(target)
    else:  # saved by another process, so that no freed dense-model memory is reused here
        target = dense_dir
        dense_bytes = sum(
            os.path.getsize(os.path.join(dense_dir, f))
            for f in os.listdir(dense_dir)
            if f.endswith(".safetensors")
        )
    gc.collect()
    rss_before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset VmHWM (peak RSS) to the current RSS
    start = time.perf_counter()
    model = ptmoe.upcycle(target, num_experts=num_experts, progress=False, **METHODS[method])
    seconds = time.perf_counter() - start
    peak_bytes = (_status_kib("VmHWM") - rss_before) * 1024
    counts = ptmoe.count_parameters(model)
    final_bytes = _storage_bytes(model)
    return {
        "shape": shape,
        "method": method,
        "source": "memory" if dense_dir is None else "disk",
        "seconds": seconds,
        "peak_mib": peak_bytes / 2**20,
        "final_mib": final_bytes / 2**20,
        "dense_mib": dense_bytes / 2**20,
        "ratio": peak_bytes / final_bytes,
        "total_params": counts["total"],
        "active_params": counts["active"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (bert-tiny, t5-tiny)")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=None)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--source", choices=("memory", "disk"), default="memory")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run every case in this process (default with --quick: no subprocess start-up; memory numbers are then "
        "only indicative, since memory freed by an earlier case can be reused)",
    )
    parser.add_argument("--child", nargs=2, metavar=("SHAPE", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--dense-dir", help=argparse.SUPPRESS)
    parser.add_argument("--save-dense", nargs=2, metavar=("SHAPE", "DIR"), help=argparse.SUPPRESS)
    # = ptmoe.energy.add_energy_arguments, repeated: importing ptmoe at the top would weigh on the measured children
    parser.add_argument(
        "--report_to", choices=["none", "codecarbon"], default="none", help="codecarbon: energy/CO2e"
    )
    parser.add_argument(
        "--energy_country_iso_code", help="with --report_to codecarbon: e.g. BRA (ISO alpha-3)"
    )
    parser.add_argument("--energy_region", help="with --report_to codecarbon: a region codecarbon knows")
    args = parser.parse_args(argv)

    if args.save_dense:
        build_dense(args.save_dense[0]).save_pretrained(args.save_dense[1])
        return 0
    if args.child:
        print(json.dumps(run_case(args.child[0], args.child[1], args.experts, args.dense_dir)))
        return 0

    from ptmoe.energy import (
        finish_benchmark_energy,
        start_benchmark_energy,
    )  # parent only: children stay light

    energy = start_benchmark_energy(args, parser)  # the machine's energy, children included
    shapes = args.shapes or (["bert-tiny", "t5-tiny"] if args.quick else ["bert-base", "t5-base"])
    header = (
        f"{'shape':<10} {'method':<20} {'source':<7} {'time s':>7} {'peak MiB':>9} {'MoE MiB':>8} "
        f"{'ratio':>6} {'dense MiB':>9} {'total params':>14} {'active params':>14}"
    )
    print(
        f"ptmoe.upcycle → {args.experts} experts, top-2, every 2nd layer; peak = RSS high-water mark over the call"
    )
    print(header)
    print("-" * len(header))
    in_process = args.in_process or args.quick
    with tempfile.TemporaryDirectory() as workdir:  # dense checkpoints for --source disk
        for shape in shapes:
            dense_dir = None
            if args.source == "disk":
                dense_dir = os.path.join(workdir, shape)
                if in_process:
                    build_dense(shape).save_pretrained(dense_dir)
                else:
                    subprocess.run([sys.executable, __file__, "--save-dense", shape, dense_dir], check=True)
            for method in args.methods:
                if in_process:
                    r = run_case(shape, method, args.experts, dense_dir)
                else:  # a fresh process per case: no memory left over from the previous one
                    command = [sys.executable, os.path.abspath(__file__), "--child", shape, method]
                    command += ["--experts", str(args.experts)] + (
                        ["--dense-dir", dense_dir] if dense_dir else []
                    )
                    result = subprocess.run(command, capture_output=True, text=True)
                    if result.returncode != 0:
                        print(f"{shape:<10} {method:<20} FAILED\n{result.stderr[-2000:]}")
                        return 1
                    r = json.loads(result.stdout.strip().splitlines()[-1])
                print(
                    f"{r['shape']:<10} {r['method']:<20} {r['source']:<7} {r['seconds']:>7.2f} {r['peak_mib']:>9.1f} "
                    f"{r['final_mib']:>8.1f} {r['ratio']:>6.2f} {r['dense_mib']:>9.1f} {r['total_params']:>14,} "
                    f"{r['active_params']:>14,}",
                    flush=True,
                )
    finish_benchmark_energy(energy)
    return 0


if __name__ == "__main__":
    from ptmoe.errors import run_script  # here: after the environment set-up above

    run_script(main)
