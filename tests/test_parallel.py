"""ptmoe models on transformers' distributed engine: tensor parallelism and FSDP2, two CPU processes over gloo.

Two `torchrun --nproc_per_node 2` launches (one per mode) run every case of `parallel_worker.py`: each rank
compares a sharded model with an unsharded copy (outputs, router logits/choices, routing statistics, generate,
loss, router losses and gradients). The FSDP launch also trains one step and saves; here the saved checkpoint is
reloaded in one process and compared with the same step computed without sharding. The torchrun tests are skipped,
with the reason, when this machine cannot start the processes (no gloo, torchrun cannot start or rendezvous); a
launch that hangs fails. They take about 2 minutes on 2 shared cores (model loading dominates).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ptmoe
from ptmoe.parallel import (
    ACCELERATE_MOE_LAYER_CLS_NAMES,
    FSDP_LAYER_CLASS_NAMES,
    fsdp_layer_class_names,
    moe_leaf_module_classes,
    set_zero3_leaf_modules,
)

HERE = Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location("parallel_worker", HERE / "parallel_worker.py")
worker = importlib.util.module_from_spec(spec)
spec.loader.exec_module(worker)

# Shared processes on 2 busy cores: model loading dominates; be generous rather than flaky.
LAUNCH_TIMEOUT = 900
TOL = 1e-4  # fp32; sharded matmuls sum in another order

BERT = dict(
    vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
    max_position_embeddings=64, num_experts=4, num_experts_per_tok=2, moe_layers=[1], num_shared_experts=1,
    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, router_importance_loss_coef=0.01,
)  # fmt: skip
T5 = dict(
    vocab_size=100, d_model=32, d_ff=40, d_kv=8, num_layers=2, num_decoder_layers=2, num_heads=4,
    num_experts=4, num_experts_per_tok=2, encoder_moe_layers=[1], decoder_moe_layers=[0, 1], dropout_rate=0.0,
    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, router_importance_loss_coef=0.01,
)  # fmt: skip
CONFIGS = {
    "bert_mlm": lambda: ptmoe.MoeBertConfig(**BERT),
    "bert_model": lambda: ptmoe.MoeBertConfig(**BERT),
    "bert_cls": lambda: ptmoe.MoeBertConfig(**BERT, num_labels=2),
    "bert_token": lambda: ptmoe.MoeBertConfig(**BERT, num_labels=2),
    "bert_qa": lambda: ptmoe.MoeBertConfig(**BERT),
    "t5_gated": lambda: ptmoe.MoeT5Config(**T5, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "t5_relu_hash": lambda: ptmoe.MoeT5Config(
        **{**T5, "num_experts_per_tok": 1}, feed_forward_proj="relu", router_type="hash"
    ),
    "t5_model": lambda: ptmoe.MoeT5Config(**T5, feed_forward_proj="relu"),
    "t5_encoder": lambda: ptmoe.MoeT5Config(**T5, feed_forward_proj="gated-gelu"),
}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel_checkpoints")
    for name, (class_name, *_) in worker.CASES.items():
        torch.manual_seed(len(name))
        model = getattr(ptmoe, class_name)(CONFIGS[name]())
        model.save_pretrained(root / name)
    return root


def _launch(mode: str, checkpoints: Path, out: Path) -> dict:
    """Run the worker under torchrun; skip (with the reason) when the processes cannot start."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), env.get("PYTHONPATH")]))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        str(HERE / "parallel_worker.py"), mode, str(checkpoints), str(out),
    ]  # fmt: skip
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("this torch build has no torch.distributed with the gloo backend: no CPU process group")
    try:
        run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    except OSError as error:
        pytest.skip(f"could not start torchrun here: {error}")
    except subprocess.TimeoutExpired as error:
        # A hang is what a collective mismatch between ranks looks like: a failure, not a skip.
        output = (error.stdout or b"")[-3000:], (error.stderr or b"")[-3000:]
        pytest.fail(
            f"torchrun {mode} did not finish in {LAUNCH_TIMEOUT} s (ranks waiting on each other?): {output}"
        )
    log = run.stdout[-4000:] + run.stderr[-6000:]
    if run.returncode != 0 and any(
        sign in log for sign in ("Address already in use", "DistNetworkError", "Connection refused")
    ):
        pytest.skip(f"torchrun could not set up its rendezvous on this machine:\n{log[-1500:]}")
    assert run.returncode == 0, log
    return {rank: json.loads((out / f"{mode}_rank{rank}.json").read_text()) for rank in (0, 1)}


@pytest.fixture(scope="module")
def tp_results(checkpoints, tmp_path_factory):
    return _launch("tp", checkpoints, tmp_path_factory.mktemp("tp"))


@pytest.fixture(scope="module")
def fsdp_run(checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    return _launch("fsdp", checkpoints, out), out


def _assert_close(results: dict, case: str) -> None:
    for rank, cases in results.items():
        facts = cases[case]
        assert facts["meta.sharded_params"] > 0, f"rank {rank}, {case}: no parameter was sharded"
        diffs = {key: value for key, value in facts.items() if not key.startswith("meta.")}
        assert any(key.startswith("eval.") for key in diffs), f"rank {rank} compared nothing for {case}"
        bad = {key: value for key, value in diffs.items() if not value <= TOL}
        assert not bad, f"rank {rank}, {case}: sharded and unsharded differ: {bad}"


@pytest.mark.parametrize("case", list(worker.CASES))
def test_tensor_parallel_matches_unsharded(tp_results, case):
    """tp_size=2: outputs, router logits and choices, routing statistics, generate, loss and gradients."""
    _assert_close(tp_results, case)
    if worker.CASES[case][2]:
        assert "generate.mismatch" in tp_results[0][case]
    if worker.CASES[case][3]:
        assert "train.grad" in tp_results[0][case] and tp_results[0][case]["train.grad_missing"] == 0


@pytest.mark.parametrize("case", worker.FSDP_CASES)
def test_fsdp_matches_unsharded(fsdp_run, case):
    """fsdp_size=2, a batch per rank: per-rank outputs and router losses (not summed over ranks), mean gradients."""
    results, _ = fsdp_run
    _assert_close(results, case)
    assert results[0][case]["train.grad_missing"] == 0


@pytest.mark.parametrize("case", ["bert_mlm", "t5_relu_hash"])
def test_fsdp_step_checkpoint_reloads_in_one_process(fsdp_run, checkpoints, case):
    """The FSDP-trained step, saved gathered, loads without any process group and equals the unsharded step."""
    _, out = fsdp_run
    cls = getattr(ptmoe, worker.CASES[case][0])
    trained = cls.from_pretrained(out / f"{case}_step")
    reference = cls.from_pretrained(checkpoints / case)
    reference.train()
    for rank in (0, 1):
        reference(**worker.batch(case, reference.config, rank), return_dict=True).loss.backward()
    with torch.no_grad():
        for param in reference.parameters():
            if param.grad is not None:
                param -= 0.5 * param.grad / 2
    expected = reference.state_dict()
    for key, value in trained.state_dict().items():
        assert torch.allclose(value, expected[key], atol=TOL), key
    trained.eval()
    reference.eval()
    inputs = worker.batch(case, reference.config, 0)
    with torch.no_grad():
        assert torch.allclose(trained(**inputs).logits, reference(**inputs).logits, atol=TOL)


def test_expert_parallelism_is_refused_with_the_reason(fsdp_run):
    """No `base_model_ep_plan` (per-expert modules, docs/distributed.md): `ep_size=2` fails early naming the plan."""
    results, _ = fsdp_run
    for rank in (0, 1):
        assert results[rank]["expert_parallel"]["refused_with_reason"] == 1.0


# --------------------------------------------------------------------------------------------------------------
# Plans, DeepSpeed leaf modules and accelerate recipes (one process)
# --------------------------------------------------------------------------------------------------------------
REPO = HERE.parent
RECIPES = REPO / "examples" / "accelerate"


@pytest.mark.parametrize("name", ["bert_mlm", "bert_cls", "t5_gated", "t5_relu_hash", "t5_encoder"])
def test_plans_name_only_existing_modules_and_leave_routers_whole(name):
    model = getattr(ptmoe, worker.CASES[name][0])(CONFIGS[name]())
    from transformers.distributed.parallel_utils import replace_layer_number_by_wildcard

    names = {replace_layer_number_by_wildcard(n) for n, _ in model.named_modules()}
    names |= {replace_layer_number_by_wildcard(n) for n, _ in model.named_parameters()}
    assert model.tp_plan and set(model.tp_plan) <= names
    assert model.fsdp_plan and set(model.fsdp_plan) <= names
    assert not any("router" in rule for rule in model.tp_plan)
    # Every expert projection is split: first projections by columns, `wo` by rows.
    experts = {rule.rsplit(".", 1)[-1]: style for rule, style in model.tp_plan.items() if ".experts." in rule}
    assert experts and experts.pop("wo") == "rowwise" and set(experts.values()) == {"colwise"}
    # FSDP units are whole layers/blocks, never single experts.
    assert all(rule.endswith(("layer.*", "block.*")) for rule in model.fsdp_plan)


def test_moe_leaf_modules_are_the_moe_blocks():
    bert = ptmoe.MoeBertForMaskedLM(CONFIGS["bert_mlm"]())
    t5 = ptmoe.MoeT5ForConditionalGeneration(CONFIGS["t5_gated"]())
    assert moe_leaf_module_classes(bert) == [ptmoe.SparseMoeBlock]
    assert moe_leaf_module_classes(t5) == [ptmoe.SparseMoeBlock]
    with pytest.raises(ValueError, match="no SparseMoeBlock"):
        moe_leaf_module_classes(ptmoe.MoeBertModel(ptmoe.MoeBertConfig(**{**BERT, "moe_layers": []})))
    # accelerate resolves its `deepspeed_moe_layer_cls_names` value to the same class.
    from accelerate.utils.dataclasses import get_module_class_from_name

    assert get_module_class_from_name(t5, ACCELERATE_MOE_LAYER_CLS_NAMES) is ptmoe.SparseMoeBlock


def test_set_zero3_leaf_modules_marks_every_moe_block():
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed")
    from deepspeed.utils import get_z3_leaf_modules

    model = ptmoe.MoeT5ForConditionalGeneration(CONFIGS["t5_gated"]())
    assert set_zero3_leaf_modules(model) == [ptmoe.SparseMoeBlock]
    blocks = [m for m in model.modules() if isinstance(m, ptmoe.SparseMoeBlock)]
    assert len(blocks) == 3 and get_z3_leaf_modules(model) == blocks


def test_set_zero3_leaf_modules_without_deepspeed_says_how(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    monkeypatch.setitem(sys.modules, "deepspeed.utils", None)
    with pytest.raises(ImportError, match="pip install deepspeed"):
        set_zero3_leaf_modules(ptmoe.MoeBertForMaskedLM(CONFIGS["bert_mlm"]()))


def test_accelerate_recipes_name_ptmoe_classes():
    import yaml

    recipes = {path.stem: yaml.safe_load(path.read_text()) for path in RECIPES.glob("*.yaml")}
    assert set(recipes) == {"ddp", "fsdp2_moe_bert", "fsdp2_moe_t5", "deepspeed_zero2", "deepspeed_zero3"}
    assert recipes["ddp"]["num_processes"] == 2
    for family, config in (("moe_bert", CONFIGS["bert_mlm"]()), ("moe_t5", CONFIGS["t5_gated"]())):
        fsdp = recipes[f"fsdp2_{family}"]["fsdp_config"]
        assert fsdp["fsdp_version"] == 2
        assert [fsdp["fsdp_transformer_layer_cls_to_wrap"]] == [FSDP_LAYER_CLASS_NAMES[config.model_type]]
    assert recipes["deepspeed_zero2"]["deepspeed_config"]["zero_stage"] == 2
    zero3 = recipes["deepspeed_zero3"]["deepspeed_config"]
    assert (
        zero3["zero_stage"] == 3 and zero3["deepspeed_moe_layer_cls_names"] == ACCELERATE_MOE_LAYER_CLS_NAMES
    )


def test_fsdp_layer_class_names_exist_in_the_models():
    from accelerate.utils.dataclasses import get_module_class_from_name

    for name in ("bert_mlm", "t5_gated"):
        model = getattr(ptmoe, worker.CASES[name][0])(CONFIGS[name]())
        (layer,) = fsdp_layer_class_names(model)
        assert get_module_class_from_name(model, layer) is not None
    with pytest.raises(ValueError, match="ptmoe model types"):
        fsdp_layer_class_names(torch.nn.Linear(2, 2))


def test_bench_experts_quick(capsys):
    spec = importlib.util.spec_from_file_location("bench_experts", REPO / "scripts" / "bench_experts.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--quick", "--threads", "1"])
    printed = capsys.readouterr().out
    assert "| fused grouped_mm |" in printed and "fused target_parameters" in printed
    assert "per-expert ModuleList (ptmoe): 100%" in printed
