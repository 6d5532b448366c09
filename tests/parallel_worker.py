"""Worker of `tests/test_parallel.py`, run as `torchrun --nproc_per_node 2 tests/parallel_worker.py MODE CKPTS OUT`.

Every rank loads each tiny checkpoint twice: unsharded (the reference) and through transformers' distributed engine
(`from_pretrained(..., distributed_config=DistributedConfig(tp_size=2))` or `fsdp_size=2`), runs both on the same
inputs and writes the largest differences to `OUT/rank<r>.json`; the pytest side asserts on them. Under tensor
parallelism both ranks see the same batch; under FSDP each rank has its own batch (`batch(..., rank)`), so the
sharded gradients must equal the mean of the reference's gradients over both ranks' batches.

This file is not collected by pytest (no `test_` prefix); `test_parallel.py` imports `batch` and `CASES` from it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

# Dropout off (configs) and fixed seeds: the reference and the sharded copy must compute the same function.
SEED = 0
SEQ = 10
BATCH = 2
NEW_TOKENS = 6

# name → (model class name, uses labels, runs generate, checks gradients)
CASES = {
    "bert_mlm": ("MoeBertForMaskedLM", True, False, True),
    "bert_model": ("MoeBertModel", False, False, False),
    "bert_cls": ("MoeBertForSequenceClassification", True, False, True),
    "bert_token": ("MoeBertForTokenClassification", True, False, False),
    "bert_qa": ("MoeBertForQuestionAnswering", False, False, False),
    "t5_gated": ("MoeT5ForConditionalGeneration", True, True, True),
    "t5_relu_hash": ("MoeT5ForConditionalGeneration", True, True, True),
    "t5_model": ("MoeT5Model", False, False, False),
    "t5_encoder": ("MoeT5EncoderModel", False, False, False),
}
# FSDP runs the cases whose gradients are checked; the hash-routed MoE-T5 gives rank 1 a batch that never reaches
# some experts (FSDP must still reduce their gradients, or the ranks' reduce-scatters differ and hang).
FSDP_CASES = ("bert_mlm", "bert_cls", "t5_gated", "t5_relu_hash")


def batch(name: str, config, rank: int) -> dict[str, torch.Tensor]:
    """The inputs of case `name` for `rank` (deterministic; padding in the last positions of the first row)."""
    generator = torch.Generator().manual_seed(1000 * rank + len(name))
    vocab = config.vocab_size
    if name == "t5_relu_hash" and rank == 1:
        # Only tokens that the hash table sends to expert 0: experts 1.. see no token of this rank.
        table = torch.randperm(vocab, generator=torch.Generator().manual_seed(1234)) % config.num_experts
        pool = torch.nonzero(table == 0).flatten()
        pool = pool[pool > 2]
        ids = pool[torch.randint(len(pool), (BATCH, SEQ), generator=generator)]
    else:
        ids = torch.randint(3, vocab, (BATCH, SEQ), generator=generator)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[0, -3:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if name.startswith("t5"):
        if name != "t5_encoder":
            labels = ids[:, :6].flip(-1).clone()
            if name == "t5_model":
                inputs["decoder_input_ids"] = torch.cat(
                    [torch.zeros(BATCH, 1, dtype=torch.long), labels[:, :-1]], 1
                )
            else:
                inputs["labels"] = labels
    elif name == "bert_mlm":
        labels = torch.full_like(ids, -100)
        labels[:, 1:4] = ids[:, 1:4]
        inputs["labels"] = labels
    elif name == "bert_cls":
        inputs["labels"] = torch.tensor([1, 0])
    elif name == "bert_token":
        inputs["labels"] = torch.randint(0, 2, (BATCH, SEQ), generator=generator)
    return inputs


def _full(tensor):
    """A DTensor (TP shard, FSDP shard) gathered to a plain tensor; other tensors unchanged. Collective."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _diff(a, b) -> float:
    a, b = _full(a), _full(b)
    if a.shape != b.shape:
        return float("inf")
    return 0.0 if a.numel() == 0 else float((a.float() - b.float()).abs().max())


def _outputs(name: str, model, inputs) -> dict[str, torch.Tensor]:
    """The tensors a case compares: logits / hidden states, router logits, expert choices and the losses."""
    out = model(**inputs, output_router_logits=True, return_dict=True)
    tensors = {}
    for key in (
        "loss",
        "logits",
        "last_hidden_state",
        "start_logits",
        "aux_loss",
        "z_loss",
        "importance_loss",
    ):
        if out.get(key) is not None:
            tensors[key] = out[key]
    for key in ("router_logits", "encoder_router_logits", "decoder_router_logits"):
        for i, logits in enumerate(out.get(key) or ()):
            tensors[f"{key}.{i}"] = logits
    for key in ("expert_index", "encoder_expert_index", "decoder_expert_index"):
        for i, index in enumerate(out.get(key) or ()):
            tensors[f"{key}.{i}"] = index
    return tensors


def _routing_statistics(model, inputs) -> dict[str, float]:
    """`ptmoe.telemetry.routing_statistics` (what the Trainer callback logs) flattened to numbers."""
    from ptmoe.telemetry import routing_statistics

    stats = routing_statistics(model, [inputs])
    flat = {}
    for layer, values in stats.items():
        for key, value in values.items():
            for i, v in enumerate(value if isinstance(value, list) else [value]):
                flat[f"{layer}.{key}.{i}"] = float(v)
    return flat


def run_case(name: str, checkpoint: Path, mode: str, rank: int, out_dir: Path) -> dict[str, float]:
    from transformers.distributed import DistributedConfig

    import ptmoe

    class_name, labelled, generates, check_grads = CASES[name]
    cls = getattr(ptmoe, class_name)
    torch.manual_seed(SEED)
    reference = cls.from_pretrained(checkpoint)
    parallel = {"tp_size": 2} if mode == "tp" else {"fsdp_size": 2}
    sharded = cls.from_pretrained(checkpoint, distributed_config=DistributedConfig(**parallel))
    from torch.distributed.tensor import DTensor

    # Evidence that the copy really is sharded (`meta.` entries are facts, not differences).
    result: dict[str, float] = {
        "meta.sharded_params": float(sum(isinstance(p, DTensor) for p in sharded.parameters())),
        "meta.params": float(len(list(sharded.parameters()))),
    }
    data_rank = rank if mode == "fsdp" else 0  # TP: one batch shared by the ranks; FSDP: each rank its own
    ranks = (0, 1) if mode == "fsdp" else (0,)
    own = batch(name, reference.config, data_rank)

    # Inference: outputs, router decisions and routing statistics on this rank's batch.
    reference.eval()
    sharded.eval()
    with torch.no_grad():
        expected, got = _outputs(name, reference, own), _outputs(name, sharded, own)
        for key, value in expected.items():
            result[f"eval.{key}"] = _diff(got[key], value)
        stats_expected = _routing_statistics(reference, own)
        stats_got = _routing_statistics(sharded, own)
        for key, value in stats_expected.items():
            result[f"stats.{key}"] = abs(stats_got[key] - value)
    if generates:
        prompt = {k: own[k] for k in ("input_ids", "attention_mask")}
        settings = dict(max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1)
        expected_ids = reference.generate(**prompt, **settings)
        got_ids = sharded.generate(**prompt, **settings)
        result["generate.mismatch"] = _diff(got_ids, expected_ids)

    # Training: loss, router losses and every gradient (FSDP: averaged over the ranks' batches).
    if check_grads:
        reference.train()
        sharded.train()
        reference_grads: dict[str, torch.Tensor] = {}
        for r in ranks:
            out = reference(**batch(name, reference.config, r), return_dict=True)
            out.loss.backward()
            if r == data_rank:
                expected_loss, expected_aux = out.loss.detach(), out.aux_loss.detach()
        for key, param in reference.named_parameters():
            if param.grad is not None:
                reference_grads[key] = param.grad / len(ranks)
        out = sharded(**own, return_dict=True)
        out.loss.backward()
        result["train.loss"] = _diff(out.loss.detach(), expected_loss)
        result["train.aux_loss"] = _diff(out.aux_loss.detach(), expected_aux)
        worst, missing = 0.0, 0
        for key, param in sharded.named_parameters():  # same order on every rank: `_full` is collective
            grad = _full(param.grad) if param.grad is not None else None
            if key not in reference_grads:
                continue
            if grad is None:
                missing += 1
                continue
            worst = max(worst, _diff(grad, reference_grads[key]))
        result["train.grad"] = worst
        result["train.grad_missing"] = float(missing)
        if mode == "fsdp":
            # One SGD step, then a gathered save: the pytest side reloads it in one process and checks the update.
            with torch.no_grad():
                for param in sharded.parameters():
                    if param.grad is not None:
                        param -= 0.5 * param.grad
            sharded.save_pretrained(out_dir / f"{name}_step")
    return result


def _expert_parallel_refused(checkpoint: Path) -> bool:
    """No expert-parallel plan (docs/distributed.md): `ep_size=2` must fail early and say so, not run unsharded."""
    from transformers.distributed import DistributedConfig

    import ptmoe

    try:
        ptmoe.MoeBertForMaskedLM.from_pretrained(
            checkpoint, distributed_config=DistributedConfig(ep_size=2, fsdp_size=2)
        )
    except ValueError as error:
        return "ep_plan" in str(error)
    return False


def main(argv: list[str]) -> None:
    mode, checkpoints, out_dir = argv[0], Path(argv[1]), Path(argv[2])
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    cases = FSDP_CASES if mode == "fsdp" else tuple(CASES)
    results = {}
    for name in cases:
        results[name] = run_case(name, checkpoints / name, mode, rank, out_dir)
    if mode == "fsdp":
        results["expert_parallel"] = {
            "refused_with_reason": float(_expert_parallel_refused(checkpoints / "bert_mlm"))
        }
    (out_dir / f"{mode}_rank{rank}.json").write_text(json.dumps(results, indent=1))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
