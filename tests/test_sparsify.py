"""Sparse inference: dispatch of many small experts, partition splits, router fitting, distillation, `ptmoe sparsify`."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import ptmoe

pytestmark = pytest.mark.usefixtures("one_thread")
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"ptmoe_script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------------------------
# 1. Dispatch of many small experts
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("train", [False, True])
def test_many_small_experts_match_token_by_token_reference(train):
    hidden, num_experts, k = 16, 32, 8
    config = ptmoe.MoeBertConfig(
        hidden_size=hidden, num_attention_heads=1, num_experts=num_experts, num_experts_per_tok=k
    )
    block = ptmoe.SparseMoeBlock(config, hidden, 4, "gelu").train(train)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(3, 7, hidden, requires_grad=True)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 5:] = False
    out, routing = block(x, mask)
    reference = torch.zeros_like(out)
    for b in range(3):
        for s in range(7):
            for slot in range(k):
                if routing.dispatch_mask[b, s, slot]:
                    expert = block.experts[int(routing.topk_index[b, s, slot])]
                    reference[b, s] += routing.topk_weights[b, s, slot] * expert(x[b, s][None])[0]
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    out.sum().backward()  # gradients flow through the per-expert scatter-add
    assert block.experts[int(routing.topk_index[0, 0, 0])].wi.weight.grad is not None


def _token_by_token(block, x, routing):
    reference = torch.zeros_like(x)
    for b in range(x.shape[0]):
        for s in range(x.shape[1]):
            for slot in range(routing.topk_index.shape[-1]):
                if routing.dispatch_mask[b, s, slot]:
                    expert = block.experts[int(routing.topk_index[b, s, slot])]
                    reference[b, s] += routing.topk_weights[b, s, slot] * expert(x[b, s][None])[0]
    return reference


@pytest.mark.parametrize("router", ["topk-2", "topk-1"])
@pytest.mark.parametrize("combine", ["router", "ones"])
@pytest.mark.parametrize("max_pairs", [0, 10_000])  # per-expert scatter-add path / sorted gather path
def test_inference_dispatch_paths_match_token_by_token_reference(router, combine, max_pairs):
    router_type, k = router.split("-")
    config = ptmoe.MoeBertConfig(
        hidden_size=16, num_attention_heads=1, num_experts=4, num_experts_per_tok=int(k), router_type=router_type,
        combine_weights=combine,
    )  # fmt: skip
    block = ptmoe.SparseMoeBlock(config, 16, 8, "gelu").eval()
    block.sorted_dispatch_max_pairs = max_pairs
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(3, 7, 16)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 5:] = False  # padding: undispatched pairs read the zero row
    with torch.inference_mode():
        out, routing = block(x, mask)
        reference = _token_by_token(block, x, routing)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


def test_moe_block_labels_its_stages_only_under_the_profiler():
    from ptmoe.models.moe_block import PROFILE_REGIONS

    config = ptmoe.MoeBertConfig(hidden_size=16, num_attention_heads=1, num_experts=4, num_experts_per_tok=2)
    block = ptmoe.SparseMoeBlock(config, 16, 8, "gelu").eval()
    x = torch.randn(2, 5, 16)
    with torch.inference_mode(), torch.profiler.profile() as profiler:
        block(x)
    assert set(PROFILE_REGIONS) <= {event.key for event in profiler.key_averages()}


def test_bench_dispatch_quick(capsys):
    load_script("bench_dispatch").main(["--quick", "--threads", "1"])
    printed = capsys.readouterr().out
    assert "E=64 k=16" in printed and "grouped_mm" in printed


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="needs ptmoe[onnx]")
def test_bench_sparse_quick_profile_threads_and_onnx(tmp_path, capsys):
    load_script("bench_sparse").main(["--quick", "--threads", "1", "2", "--scratch", str(tmp_path), "--skip-quality",
                                      "--families", "bert", "--precisions", "fp32", "int8", "--onnx", "--profile"])  # fmt: skip
    printed = capsys.readouterr().out
    assert printed.count("## Speed:") == 2 and printed.count("## Profile:") == 2
    assert "1 threads" in printed and "2 threads" in printed and "flags" in printed
    for text in ("| 1 x 8 | 1/4 (E=4, k=1) |", "| int8 | 2 x 16 | dense, ONNX Runtime", "| 1/4 (E=8, k=2) | int8 |",
                 "best BERT sparse / best BERT dense at 1 x 8", "sparse MoE (1/4, E=8, k=2) in ONNX Runtime:"):  # fmt: skip
        assert text in printed


# --------------------------------------------------------------------------------------------------------------
# 2. Splits: co-activation and importance (shared neurons); exact with every expert active
# --------------------------------------------------------------------------------------------------------------
from test_upcycling import (  # noqa: E402  (tests/ is on sys.path: pytest's rootdir import mode)
    INTERMEDIATE,
    VOCAB,
    assert_same_outputs,
    bert_config,
    dense_model,
    t5_config,
    write_tokenizer,
)

from ptmoe.upcycling import neuron_importance, partition_groups  # noqa: E402

WORDS = VOCAB[5:]
TEXTS = [" ".join(WORDS[(7 * i + 3 * j) % len(WORDS)] for j in range(6 + i % 5)) for i in range(40)]


@pytest.fixture
def dense_bert(tmp_path):
    """A dense BertForMaskedLM saved with a tokenizer (a folder, like a Hub checkpoint)."""
    model = dense_model("BertForMaskedLM", bert_config())
    model.save_pretrained(tmp_path / "dense")
    write_tokenizer(tmp_path / "dense")
    return transformers_load(tmp_path / "dense")


def transformers_load(path):
    from transformers import BertForMaskedLM

    return BertForMaskedLM.from_pretrained(path).eval()


def split(dense, **kwargs):
    kwargs = {"num_experts": 4, "moe_layers": 1, "progress": False, "method": "partition", **kwargs}
    return ptmoe.upcycle(dense, **kwargs)


@pytest.mark.parametrize("combine", ["router", "ones"])
@pytest.mark.parametrize("partition, shared", [("coactivation", 0), ("random", 8), ("coactivation", 12)])
def test_calibrated_splits_are_exact_with_every_expert_active(dense_bert, partition, shared, combine):
    moe = split(
        dense_bert,
        partition=partition,
        num_shared_neurons=shared,
        calibration=TEXTS,
        num_experts_per_tok=4,
        combine_weights=combine,
    )
    assert moe.config.expert_intermediate_size == (INTERMEDIATE - shared) // 4
    assert moe.config.num_shared_experts == (1 if shared else 0)
    if shared:
        assert moe.config.shared_expert_intermediate_size == shared
    assert_same_outputs(dense_bert, moe)


def test_shared_neuron_split_is_exact_for_gated_t5(tmp_path):
    dense = dense_model("T5ForConditionalGeneration", t5_config("gated-gelu"))
    moe = split(
        dense,
        partition="coactivation",
        num_shared_neurons=8,
        calibration=TEXTS,
        tokenizer=write_tokenizer(tmp_path / "tok"),
        num_experts_per_tok=4,
        combine_weights="ones",
    )
    assert_same_outputs(dense, moe, decoder=True)


def test_importance_split_keeps_the_top_neurons_in_the_shared_expert(dense_bert):
    shared = 8
    moe = split(dense_bert, num_shared_neurons=shared, calibration=TEXTS, num_experts_per_tok=1)
    # Independent reference: the intermediate activations of layer 0 on the same text, the importance formula.
    tokenizer = write_tokenizer_like(dense_bert)
    captured = []
    layer = dense_bert.bert.encoder.layer[0]
    handle = layer.intermediate.register_forward_hook(lambda m, a, out: captured.append(out))
    with torch.no_grad():
        encoded = tokenizer(TEXTS, padding=True, return_tensors="pt")
        dense_bert(**encoded)
    handle.remove()
    activations = captured[0][encoded["attention_mask"].bool()]
    wo = layer.output.dense.weight
    importance = activations.abs().mean(0) * wo.norm(dim=0)
    top = importance.topk(shared).indices.sort().values
    shared_expert = moe.bert.encoder.layer[0].moe.shared_experts[0]
    torch.testing.assert_close(shared_expert.wi.weight, layer.intermediate.dense.weight[top])
    torch.testing.assert_close(shared_expert.wo.weight, wo[:, top])
    torch.testing.assert_close(shared_expert.wo.bias, layer.output.dense.bias)
    torch.testing.assert_close(neuron_importance({"wo.weight": wo}, activations), importance)


def write_tokenizer_like(model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model.config._name_or_path)


def test_coactivation_groups_recover_neurons_that_fire_together():
    generator = torch.Generator().manual_seed(0)
    owner = torch.randperm(36, generator=generator) % 4  # planted group of each neuron
    token_group = torch.randint(0, 4, (400,), generator=generator)
    # A neuron fires (positive) only on the tokens of its own group.
    activations = (owner[None, :] == token_group[:, None]).float() * torch.rand(400, 36, generator=generator)
    ffn = {
        "wi.weight": torch.randn(36, 8, generator=generator),
        "wo.weight": torch.randn(8, 36, generator=generator),
    }
    groups = partition_groups(ffn, 4, "coactivation", torch.Generator().manual_seed(0), activations)
    assert sorted(sorted(owner[g].tolist()) for g in groups) == [[c] * 9 for c in range(4)]


def test_split_bad_input_is_refused_early(dense_bert, tmp_path):
    with pytest.raises(ValueError, match="num_shared_neurons.*smaller than the 36"):
        split(dense_bert, num_shared_neurons=36, calibration=TEXTS)
    with pytest.raises(ValueError, match="calibration="):
        split(dense_bert, partition="coactivation")
    with pytest.raises(ValueError, match="calibration"):
        split(dense_bert, partition="coactivation", calibration=["", "  "])
    with pytest.raises(FileNotFoundError, match="calibration"):
        split(dense_bert, partition="coactivation", calibration=tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        split(dense_bert, num_experts_per_tok=5)
    with pytest.raises(ValueError, match="not divisible"):
        split(dense_bert, num_shared_neurons=6, calibration=TEXTS)
    with pytest.raises(ValueError, match="num_shared_neurons"):
        split(dense_bert, method="copy", num_shared_neurons=4, calibration=TEXTS)


# --------------------------------------------------------------------------------------------------------------
# 3. Router fitting
# --------------------------------------------------------------------------------------------------------------
def subspace_model(tmp_path):
    """MoE-BERT whose expert e's neurons read only the hidden dimensions 8e..8e+7 (disjoint subspaces)."""
    config = ptmoe.MoeBertConfig(
        **{
            **dict(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
            "intermediate_size": 37,
            "max_position_embeddings": 64,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_layers": [1],
            "hidden_act": "relu",
            "combine_weights": "ones",
            "router_init": "zeros",
            "expert_intermediate_size": 6,
        }
    )
    torch.manual_seed(0)
    model = ptmoe.MoeBertForMaskedLM(config).eval()
    block = model.bert.encoder.layer[1].moe
    generator = torch.Generator().manual_seed(1)
    scales = torch.rand(6, 1, generator=generator) + 0.5  # the same 6 neuron scales in every expert
    with torch.no_grad():
        for e, expert in enumerate(block.experts):
            direction = torch.zeros(32)
            direction[8 * e : 8 * e + 8] = torch.nn.functional.normalize(
                torch.randn(8, generator=generator), dim=0
            )
            # Every neuron of expert e detects the same direction of its subspace: mass_e = c · relu(u_e·x + 2).
            expert.wi.weight.copy_(scales * direction)
            expert.wi.bias.copy_(2.0 * scales.squeeze(-1))
            expert.wo.weight.copy_(torch.nn.functional.normalize(expert.wo.weight, dim=0))
    model.save_pretrained(tmp_path / "moe")
    write_tokenizer(tmp_path / "moe")
    return ptmoe.MoeBertForMaskedLM.from_pretrained(tmp_path / "moe").eval()


def true_mass(block, hidden):
    """Independent of ptmoe: Σ_i relu(w_i·x + b_i) · ‖wo[:, i]‖ per expert."""
    return torch.stack(
        [
            (torch.relu(hidden @ e.wi.weight.T + e.wi.bias) * e.wo.weight.norm(dim=0)).sum(-1)
            for e in block.experts
        ],
        dim=-1,
    )


def test_fit_routers_recovers_the_experts_of_a_known_assignment(tmp_path):
    model = subspace_model(tmp_path)
    block = model.bert.encoder.layer[1].moe
    texts = TEXTS * 3
    results = ptmoe.fit_routers(model, texts, steps=300, progress=False, seed=0)
    (fit,) = results.values()
    assert fit.agreement > 0.9 and fit.agreement > fit.agreement_before + 0.2
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())
    # Held-out check through the model itself: top-k of the fitted router vs the true mass ranking.
    captured = []
    handle = block.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    tokenizer = write_tokenizer_like(model)
    encoded = tokenizer([" ".join(reversed(t.split())) for t in TEXTS], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**encoded, output_router_logits=True)
    handle.remove()
    mask = encoded["attention_mask"].bool()
    mass = true_mass(block, captured[0])[mask]
    chosen = out.expert_index[0][mask].sort(-1).values
    oracle = mass.topk(2, dim=-1).indices.sort(-1).values
    assert (chosen == oracle).all(-1).float().mean() > 0.8


def test_fit_routers_is_seeded(tmp_path):
    weights = []
    for _ in range(2):
        model = subspace_model(tmp_path / str(len(weights)))
        ptmoe.fit_routers(model, TEXTS, steps=20, progress=False, seed=3)
        weights.append(model.bert.encoder.layer[1].moe.router.weight.detach().clone())
    torch.testing.assert_close(weights[0], weights[1])


def test_fit_routers_bad_input(tmp_path, dense_bert):
    model = subspace_model(tmp_path)
    with pytest.raises(ValueError, match="no non-empty text"):
        ptmoe.fit_routers(model, [], steps=5, progress=False)
    with pytest.raises(FileNotFoundError, match="no such text file"):
        ptmoe.fit_routers(model, tmp_path / "nope.txt", steps=5, progress=False)
    with pytest.raises(ValueError, match="steps"):
        ptmoe.fit_routers(model, TEXTS, steps=0, progress=False)
    dense_as_moe = ptmoe.MoeBertForMaskedLM(
        ptmoe.MoeBertConfig(**{**bert_config().to_dict(), "moe_layers": []})
    )
    with pytest.raises(ValueError, match="no MoE layers"):
        ptmoe.fit_routers(dense_as_moe, TEXTS, steps=5, progress=False)
    with pytest.raises(ValueError, match="no MoE layers"):
        ptmoe.fit_routers(dense_bert, TEXTS, steps=5, progress=False)
    weighted = split(dense_bert, num_experts_per_tok=2)
    with pytest.raises(ValueError, match="combine_weights='ones'"):
        ptmoe.fit_routers(weighted, TEXTS, steps=5, progress=False)
    no_tokenizer = split(dense_model("BertForMaskedLM", bert_config()), combine_weights="ones")
    with pytest.raises(ValueError, match="tokenizer="):
        ptmoe.fit_routers(no_tokenizer, TEXTS, steps=5, progress=False)


# --------------------------------------------------------------------------------------------------------------
# 4. Distillation
# --------------------------------------------------------------------------------------------------------------
HELD_OUT = [" ".join(reversed(t.split())) for t in TEXTS[:10]]


@pytest.fixture
def strong_teacher(dense_bert):
    """The dense BERT with FFN weights large enough that dropping neurons changes its outputs clearly."""
    with torch.no_grad():
        for layer in dense_bert.bert.encoder.layer:
            layer.intermediate.dense.weight.mul_(10)
            layer.output.dense.weight.mul_(10)
    return dense_bert


def sparse_student(dense_bert):
    return split(dense_bert, num_experts_per_tok=1, combine_weights="ones", router_init="normal")


def test_distillation_lowers_the_student_teacher_gap_on_held_out_text(strong_teacher):
    from ptmoe.compress import student_teacher_gap

    dense_bert = strong_teacher
    student = sparse_student(dense_bert)
    before = student_teacher_gap(student, dense_bert, HELD_OUT)
    ptmoe.distill(student, dense_bert, TEXTS, steps=30, learning_rate=2e-3, progress=False)
    after = student_teacher_gap(student, dense_bert, HELD_OUT)
    assert after < 0.7 * before
    assert not any(p.requires_grad for p in dense_bert.parameters())


def test_distillation_with_lora_per_expert_trains_only_adapters(strong_teacher):
    from peft import get_peft_model

    from ptmoe.compress import student_teacher_gap

    dense_bert = strong_teacher
    student = sparse_student(dense_bert)
    frozen = {k: v.clone() for k, v in student.state_dict().items()}
    peft_model = get_peft_model(student, ptmoe.expert_lora_config(student, r=4))
    before = student_teacher_gap(peft_model, dense_bert, HELD_OUT)
    ptmoe.distill(peft_model, dense_bert, TEXTS, steps=30, learning_rate=5e-3, progress=False)
    assert student_teacher_gap(peft_model, dense_bert, HELD_OUT) < before
    merged = peft_model.merge_and_unload()
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, frozen[k])]
    assert changed and all(".experts." in k for k in changed)


def test_distillation_refuses_a_teacher_of_another_shape(dense_bert):
    student = sparse_student(dense_bert)
    wider = dense_model("BertForMaskedLM", bert_config(hidden_size=48))
    with pytest.raises(ValueError, match="teacher's hidden size"):
        ptmoe.distill(student, wider, TEXTS, steps=1, progress=False)
    other_vocab = dense_model("BertForMaskedLM", bert_config(vocab_size=120))
    with pytest.raises(ValueError, match="teacher's vocabulary"):
        ptmoe.distill(student, other_vocab, TEXTS, steps=1, progress=False)
    deeper = dense_model("BertForMaskedLM", bert_config(num_hidden_layers=3))
    with pytest.raises(ValueError, match="num_hidden_layers"):
        ptmoe.distill(student, deeper, TEXTS, steps=1, progress=False)
    with pytest.raises(ValueError, match="no non-empty text"):
        ptmoe.distill(student, dense_bert, ["  "], steps=1, progress=False)


# --------------------------------------------------------------------------------------------------------------
# 5. One command: `ptmoe sparsify`
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture
def sparsified(tmp_path, strong_teacher, capsys):
    from ptmoe.cli import main as cli_main

    strong_teacher.save_pretrained(tmp_path / "dense")
    calibration = tmp_path / "calibration.txt"
    calibration.write_text("\n".join(TEXTS), encoding="utf-8")
    out = tmp_path / "sparse"
    code = cli_main(
        ["sparsify", "--base", str(tmp_path / "dense"), "--experts", "4", "--top-k", "1", "--shared-neurons", "4",
         "--calibration", str(calibration), "--fit-steps", "20", "--distill-steps", "5", "--out", str(out),
         "--no-progress"]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    return out, printed, calibration


def test_sparsify_command_saves_a_model_that_reloads_everywhere(sparsified, tmp_path):
    from transformers import AutoModelForMaskedLM, AutoTokenizer, BitsAndBytesConfig

    from conftest import run_without_ptmoe

    out, printed, _ = sparsified
    assert "active FFN share: 0.333" in printed  # (4 shared + 1 · 32/4) / 36
    assert "distilled: hidden_cosine" in printed and "top1_agreement" in printed
    model = AutoModelForMaskedLM.from_pretrained(out)
    assert type(model).__name__ == "MoeBertForMaskedLM"
    assert model.config.combine_weights == "ones" and model.config.num_shared_experts == 1
    tokenizer = AutoTokenizer.from_pretrained(out)
    encoded = tokenizer(TEXTS[:2], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**encoded).logits
    quantized = AutoModelForMaskedLM.from_pretrained(
        out, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    )
    assert any("Linear4bit" in type(m).__name__ for m in quantized.modules())
    torch.save(expected, tmp_path / "expected.pt")
    run_without_ptmoe(
        f"""
        import torch
        from transformers import AutoModelForMaskedLM, AutoTokenizer
        model = AutoModelForMaskedLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
        tokenizer = AutoTokenizer.from_pretrained({str(out)!r})
        encoded = tokenizer({TEXTS[:2]!r}, padding=True, return_tensors="pt")
        with torch.no_grad():
            logits = model(**encoded).logits
        torch.testing.assert_close(logits, torch.load({str(tmp_path / "expected.pt")!r}), atol=1e-5, rtol=1e-5)
        """,
        tmp_path,
    )


def test_sparsify_command_bad_input(sparsified, tmp_path, capsys):
    from ptmoe.cli import main as cli_main

    out, _, calibration = sparsified
    before = sorted(p.name for p in out.iterdir())
    base = [
        "sparsify",
        "--base",
        str(tmp_path / "dense"),
        "--calibration",
        str(calibration),
        "--experts",
        "4",
    ]
    assert cli_main([*base, "--out", str(out), "--top-k", "1"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before  # nothing overwritten
    assert cli_main([*base, "--out", str(tmp_path / "new1"), "--top-k", "5"]) == 2
    assert "--top-k (5) cannot be larger than --experts (4)" in capsys.readouterr().err
    assert cli_main([*base, "--out", str(tmp_path / "new2"), "--shared-neurons", "36"]) == 2
    assert "num_shared_neurons" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    dense = str(tmp_path / "dense")
    assert (
        cli_main(["sparsify", "--base", dense, "--calibration", str(empty), "--out", str(tmp_path / "new3")])
        == 2
    )
    assert "no non-empty text" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in ("new1", "new2", "new3"))


def test_distill_script_runs_full_and_lora(sparsified, tmp_path):
    out, _, calibration = sparsified
    script = load_script("distill")
    for tuning in ("full", "lora"):
        metrics = script.main(
            ["--student_name_or_path", str(out), "--teacher_name_or_path", str(tmp_path / "dense"),
             "--train_file", str(calibration), "--tuning", tuning, "--max_steps", "2",
             "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / f"distilled-{tuning}"),
             "--report_to", "none", "--disable_tqdm", "true"]
        )  # fmt: skip
        assert metrics["train_loss"] > 0
    reloaded = ptmoe.MoeBertForMaskedLM.from_pretrained(tmp_path / "distilled-full")
    assert reloaded.config.combine_weights == "ones"
    assert (tmp_path / "distilled-lora" / "adapter_config.json").exists()


# --------------------------------------------------------------------------------------------------------------
# 6. Dynamic compute: top-p routing
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("combine", ["router", "ones"])
def test_top_p_router_uses_the_fewest_experts_reaching_p(combine):
    config = ptmoe.MoeBertConfig(
        hidden_size=16, num_attention_heads=1, num_experts=6, num_experts_per_tok=3, router_top_p=0.5,
        combine_weights=combine,
    )  # fmt: skip
    block = ptmoe.SparseMoeBlock(config, 16, 4, "gelu").eval()
    torch.nn.init.normal_(block.router.weight, std=0.5)
    x = torch.randn(2, 9, 16)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 7:] = False
    out, routing = block(x, mask)
    probs = routing.router_probs
    for b in range(2):
        for s in range(9):
            if not mask[b, s]:
                assert not routing.dispatch_mask[b, s].any()
                continue
            ranked = probs[b, s].sort(descending=True).values
            needed = int((ranked.cumsum(0) < 0.5).sum()) + 1  # brute force: fewest experts reaching 0.5
            assert int(routing.dispatch_mask[b, s].sum()) == min(needed, 3)
    # The block computes exactly the dispatched experts with their weights (the token-by-token oracle).
    reference = torch.zeros_like(out)
    for b, s, slot in routing.dispatch_mask.nonzero().tolist():
        expert = block.experts[int(routing.topk_index[b, s, slot])]
        reference[b, s] += routing.topk_weights[b, s, slot] * expert(x[b, s][None])[0]
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    if combine == "router":  # renormalised over the used experts
        used = routing.topk_weights * routing.dispatch_mask
        torch.testing.assert_close(used.sum(-1)[mask], torch.ones(int(mask.sum())))


def test_top_p_average_experts_per_token_in_telemetry(tiny_bert_config):
    from ptmoe.telemetry import routing_statistics

    model = ptmoe.MoeBertModel(
        tiny_bert_config(num_experts=4, num_experts_per_tok=4, router_top_p=0.6)
    ).eval()
    torch.nn.init.normal_(model.encoder.layer[0].moe.router.weight, std=1.0)
    ids = torch.randint(5, 99, (3, 10), generator=torch.Generator().manual_seed(0))
    stats = routing_statistics(model, [{"input_ids": ids}])
    with torch.no_grad():
        out = model(ids, output_router_logits=True)
    for index, layer in enumerate(stats.values()):
        expected = (out.expert_index[index] >= 0).sum(-1).float().mean().item()
        assert layer["experts_per_token"] == pytest.approx(expected)
        assert 1 <= layer["experts_per_token"] <= 4


def test_top_p_bad_values():
    with pytest.raises(ValueError, match="router_top_p"):
        ptmoe.MoeBertConfig(router_top_p=1.5)
    with pytest.raises(ValueError, match="router_top_p"):
        ptmoe.MoeBertConfig(router_top_p=0.5, router_type="switch", num_experts_per_tok=1)
    with pytest.raises(ValueError, match="combine_weights"):
        ptmoe.MoeBertConfig(combine_weights="mean")


# --------------------------------------------------------------------------------------------------------------
# 7. The benchmark's quick mode
# --------------------------------------------------------------------------------------------------------------
def test_bench_sparse_quick(tmp_path, capsys):
    load_script("bench_sparse").main(["--quick", "--threads", "1", "--scratch", str(tmp_path), "--cost"])
    printed = capsys.readouterr().out
    for text in (
        "BERT (tiny) | int8 | 2 x 16 | 1/8 shared",
        "T5 encoder (tiny) | bf16 | 2 x 16 | 1/4 (E=8, k=2)",
        "| distilled |",
        "MRR (kept)",
        "| fit routers (5 steps per layer) |",
        "**total for 2 distillation steps** (measured)",
    ):
        assert text in printed


def test_fit_routers_and_distill_run_on_t5(tmp_path):
    from ptmoe.compress import student_teacher_gap

    dense = dense_model("T5ForConditionalGeneration", t5_config("gated-gelu"))
    tokenizer = write_tokenizer(tmp_path / "tok")
    moe = split(dense, num_experts_per_tok=2, combine_weights="ones", router_init="normal")
    before = [b.router.weight.detach().clone() for b in moe.modules() if isinstance(b, ptmoe.SparseMoeBlock)]
    fits = ptmoe.fit_routers(moe, TEXTS, steps=10, tokenizer=tokenizer, progress=False)
    assert {name.split(".")[0] for name in fits} == {"encoder", "decoder"}
    after = [b.router.weight for b in moe.modules() if isinstance(b, ptmoe.SparseMoeBlock)]
    assert all(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    gap = student_teacher_gap(moe, dense, HELD_OUT, tokenizer=tokenizer)
    ptmoe.distill(moe, dense, TEXTS, steps=3, tokenizer=tokenizer, learning_rate=1e-3, progress=False)
    assert student_teacher_gap(moe, dense, HELD_OUT, tokenizer=tokenizer) < gap
