"""Expert-choice routing, hierarchical routing and expert dropout (ptmoe/models/routers.py), end to end.

References: Zhou et al. 2022 (expert choice: each expert takes its top-c tokens by softmax score), Jordan & Jacobs
1994 (two-level gating: combine weight = group gate x expert gate), Fedus et al. 2021 (expert dropout).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from test_moe import _reference_block_output
from transformers import AutoModelForMaskedLM, AutoModelForSeq2SeqLM

import ptmoe
from conftest import TINY_BERT, run_without_ptmoe
from ptmoe.models.moe import (
    ExpertChoiceRouter,
    HierarchicalRouter,
    TopKRouter,
    compute_router_losses,
    importance_loss,
    layer_router_losses,
    load_balancing_loss,
    router_z_loss,
)

pytestmark = pytest.mark.usefixtures("one_thread")

H = 16
TINY_T5 = dict(
    vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, num_experts=4,
    num_experts_per_tok=2, decoder_start_token_id=0, pad_token_id=0,
)  # fmt: skip


def _init(router, std=0.5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in router.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * std)
    return router


def _hidden(batch=3, seq=10, seed=0, lengths=(10, 7, 3)):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq, H, generator=g)
    mask = torch.arange(seq).expand(batch, seq) < torch.tensor(lengths[:batch]).unsqueeze(-1)
    return hidden, mask


# ------------------------------------------------------------------------------------------------ expert choice


@settings(max_examples=30, deadline=None)
@given(
    num_experts=st.integers(1, 6),
    capacity_factor=st.floats(0.1, 8.0),
    lengths=st.lists(st.integers(0, 10), min_size=1, max_size=4),
    seed=st.integers(0, 10_000),
)
def test_expert_choice_takes_exactly_its_capacity_of_the_best_real_tokens(
    num_experts, capacity_factor, lengths, seed
):
    router = _init(ExpertChoiceRouter(H, num_experts, capacity_factor), seed=seed).eval()
    hidden, mask = _hidden(batch=len(lengths), seed=seed, lengths=lengths)
    out = router(hidden, mask)
    chosen = out.dispatch_mask  # (B, S, E)
    assert out.topk_index.shape == (len(lengths), 10, num_experts)
    for b, n in enumerate(lengths):
        capacity = min(n, math.ceil(capacity_factor * n / num_experts))
        assert not chosen[b][~mask[b]].any()  # padding is never selected
        for e in range(num_experts):
            picked = chosen[b, :, e]
            assert int(picked.sum()) == capacity  # exactly its capacity of real tokens
            scores = out.router_probs[b, :, e]
            if 0 < capacity < n:  # the picked tokens are the expert's best real tokens
                assert scores[picked].min() >= scores[mask[b] & ~picked].max()
    # slot e holds expert e or -1; combine weights are the chosen experts' softmax scores (0 elsewhere)
    experts = torch.arange(num_experts).expand_as(out.topk_index)
    assert torch.equal(out.topk_index, torch.where(chosen, experts, -1))
    torch.testing.assert_close(out.router_probs, out.router_logits.softmax(-1))
    torch.testing.assert_close(out.topk_weights, torch.where(chosen, out.router_probs, 0.0))
    assert torch.equal(out.expert_index, out.topk_index)


@pytest.mark.parametrize(
    "router",
    [ExpertChoiceRouter(H, 4, 2.0, jitter_noise=0.1), HierarchicalRouter(H, 8, 2, 4, jitter_noise=0.1)],
)
def test_new_routers_compute_in_fp32_and_do_not_change_module_state(router):
    router = _init(router).train()
    before = {k: v.clone() for k, v in router.state_dict().items()}
    hidden, mask = _hidden()
    out = router(hidden.to(torch.bfloat16), mask)
    assert out.router_logits.dtype == out.router_probs.dtype == out.topk_weights.dtype == torch.float32
    after = router.state_dict()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)


def test_expert_choice_block_matches_token_by_token_reference():
    config = ptmoe.MoeBertConfig(
        hidden_size=H, num_experts=4, router_type="expert_choice", num_shared_experts=1
    )
    block = ptmoe.SparseMoeBlock(config, H, 24, "gelu").eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    hidden, mask = _hidden()
    out, routing = block(hidden, mask)
    torch.testing.assert_close(out, _reference_block_output(block, hidden, routing), atol=1e-5, rtol=1e-5)
    assert routing.dispatch_mask.sum(-1).float()[mask].mean() == pytest.approx(2.0, abs=0.35)


def test_expert_choice_routes_a_sequence_the_same_in_any_batch():
    """Alone, padded next to longer sequences, left-padded, or in another order: the same experts and weights."""
    router = _init(ExpertChoiceRouter(H, 4, 2.0)).eval()
    g = torch.Generator().manual_seed(1)
    sequences = [torch.randn(n, H, generator=g) for n in (9, 4, 6)]
    alone = [router(s[None], torch.ones(1, len(s), dtype=torch.bool)) for s in sequences]

    def batch(order, seq_len, left):
        hidden = torch.randn(len(order), seq_len, H, generator=g) * 100  # garbage in the padding
        mask = torch.zeros(len(order), seq_len, dtype=torch.bool)
        for row, i in enumerate(order):
            n = len(sequences[i])
            span = slice(seq_len - n, seq_len) if left else slice(0, n)
            hidden[row, span], mask[row, span] = sequences[i], True
        return router(hidden, mask), mask

    for order, seq_len, left in [((0, 1, 2), 9, False), ((2, 0), 12, True), ((1,), 5, False)]:
        out, mask = batch(order, seq_len, left)
        for row, i in enumerate(order):
            real = mask[row]
            assert torch.equal(out.topk_index[row][real], alone[i].topk_index[0])
            torch.testing.assert_close(out.topk_weights[row][real], alone[i].topk_weights[0])


def test_expert_choice_model_outputs_do_not_depend_on_the_batch(tiny_bert_config):
    model = ptmoe.MoeBertModel(tiny_bert_config(router_type="expert_choice")).eval()
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(1, 99, (n,), generator=g) for n in (9, 5)]
    padded = torch.zeros(2, 9, dtype=torch.long)
    padded[0], padded[1, :5] = ids[0], ids[1]
    with torch.no_grad():
        together = model(input_ids=padded, attention_mask=(padded != 0).long()).last_hidden_state
        for row, sequence in enumerate(ids):
            alone = model(input_ids=sequence[None]).last_hidden_state[0]
            torch.testing.assert_close(together[row, : len(sequence)], alone, atol=1e-5, rtol=1e-5)


def test_expert_choice_losses_are_z_loss_only():
    router = _init(ExpertChoiceRouter(H, 4, 2.0)).train()
    hidden, mask = _hidden()
    routing = router(hidden, mask)
    losses = layer_router_losses(routing)
    assert losses.aux_loss.item() == losses.importance_loss.item() == 0.0
    torch.testing.assert_close(losses.z_loss, router_z_loss(routing.router_logits, mask))
    losses.z_loss.backward()
    assert router.weight.grad.abs().sum() > 0


def test_expert_choice_telemetry_reports_experts_per_token_and_unrouted_tokens(tiny_bert_config):
    from ptmoe.telemetry import routing_statistics

    model = ptmoe.MoeBertModel(tiny_bert_config(router_type="expert_choice", expert_capacity_factor=1.0))
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1, 99, (2, 12), generator=g), "attention_mask": torch.ones(2, 12)}
    batch["attention_mask"][1, 8:] = 0
    seen = []
    hooks = [
        m.register_forward_hook(lambda mod, args, out: seen.append(out[1]))
        for m in model.modules()
        if isinstance(m, ptmoe.SparseMoeBlock)
    ]
    stats = routing_statistics(model, [batch])
    for hook in hooks:
        hook.remove()
    for routing, layer in zip(seen, stats.values(), strict=True):
        per_token = routing.dispatch_mask.sum(-1)[routing.token_mask].float()  # (T,)
        assert layer["experts_per_token"] == pytest.approx(per_token.mean().item())
        assert layer["unrouted_rate"] == pytest.approx((per_token == 0).float().mean().item())
        assert layer["experts_per_token"] == pytest.approx(
            (3 + 2) * 4 / 20
        )  # capacities ceil(12/4), ceil(8/4)
        assert layer["load"] == pytest.approx([0.25] * 4)  # balanced by construction
        assert layer["drop_rate"] == 0.0 and layer["aux_loss"] == 0.0


# ------------------------------------------------------------------------------------------------ hierarchical


@settings(max_examples=20, deadline=None)
@given(k=st.integers(1, 4), norm=st.booleans(), seed=st.integers(0, 10_000))
def test_hierarchical_with_one_group_is_flat_topk(k, norm, seed):
    flat = _init(TopKRouter(H, 4, k, norm_topk_prob=norm), seed=seed).eval()
    tree = _init(HierarchicalRouter(H, 4, k, num_groups=1, norm_topk_prob=norm), seed=seed + 1).eval()
    with torch.no_grad():
        tree.weight.copy_(flat.weight)
    hidden, mask = _hidden(seed=seed)
    a, b = flat(hidden, mask), tree(hidden, mask)
    assert torch.equal(a.topk_index, b.topk_index) and torch.equal(a.dispatch_mask, b.dispatch_mask)
    torch.testing.assert_close(a.topk_weights, b.topk_weights)
    torch.testing.assert_close(a.router_probs, b.router_probs)
    la, lb = layer_router_losses(a), layer_router_losses(b)
    for name in ("aux_loss", "z_loss", "importance_loss"):
        torch.testing.assert_close(getattr(la, name), getattr(lb, name))


def test_hierarchical_block_with_one_group_equals_flat_topk_block():
    flat = ptmoe.SparseMoeBlock(ptmoe.MoeBertConfig(hidden_size=H, num_experts=4), H, 24, "gelu").eval()
    tree_config = ptmoe.MoeBertConfig(
        hidden_size=H, num_experts=4, router_type="hierarchical", router_groups=1
    )
    tree = ptmoe.SparseMoeBlock(tree_config, H, 24, "gelu").eval()
    for p in flat.parameters():
        torch.nn.init.normal_(p, std=0.3)
    tree.load_state_dict(flat.state_dict(), strict=False)  # all but the (irrelevant) single-group gate
    hidden, mask = _hidden()
    torch.testing.assert_close(tree(hidden, mask)[0], flat(hidden, mask)[0])


@settings(max_examples=40, deadline=None)
@given(
    shape=st.sampled_from(
        [(4, 2, 1, 1), (4, 2, 1, 2), (4, 2, 2, 2), (6, 3, 2, 2), (8, 4, 2, 4), (8, 2, 1, 3)]
    ),
    norm=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_hierarchical_invariants_at_both_levels(shape, norm, seed):
    num_experts, groups, groups_per_tok, k = shape
    size, per_group = num_experts // groups, k // groups_per_tok
    router = _init(
        HierarchicalRouter(H, num_experts, k, groups, groups_per_tok, norm_topk_prob=norm), seed=seed
    ).eval()
    hidden, mask = _hidden(seed=seed)
    out = router(hidden, mask)
    # independent recomputation of the two gates from the router's parameters
    group_gate = F.linear(hidden, router.group_weight).softmax(-1)  # (B, S, G)
    expert_gate = F.linear(hidden, router.weight).unflatten(-1, (groups, size)).softmax(-1)  # (B, S, G, E/G)
    torch.testing.assert_close(out.router_probs, (group_gate.unsqueeze(-1) * expert_gate).flatten(2))
    torch.testing.assert_close(out.router_probs.sum(-1), torch.ones(mask.shape))
    torch.testing.assert_close(out.router_logits.softmax(-1), out.router_probs)
    assert torch.equal(out.dispatch_mask, mask.unsqueeze(-1).expand_as(out.topk_index))
    for b, s in zip(*torch.nonzero(mask, as_tuple=True), strict=True):
        index = out.topk_index[b, s].tolist()
        chosen_groups = out.group_routing.topk_index[b, s].tolist()
        # level 1: the top groups by group gate
        assert sorted(chosen_groups) == sorted(group_gate[b, s].topk(groups_per_tok).indices.tolist())
        assert len(set(index)) == k
        for g in chosen_groups:  # level 2: the top experts of each chosen group, inside it
            inside = [e for e in index if e // size == g]
            best = (expert_gate[b, s, g].topk(per_group).indices + g * size).tolist()
            assert sorted(inside) == sorted(best)
        # combine weight = group gate x expert gate (each renormalised over the chosen ones with norm_topk_prob)
        gsum = group_gate[b, s, chosen_groups].sum() if norm else 1.0
        for slot, e in enumerate(index):
            g = e // size
            in_group = [x % size for x in index if x // size == g]
            esum = expert_gate[b, s, g, in_group].sum() if norm else 1.0
            expected = group_gate[b, s, g] / gsum * expert_gate[b, s, g, e % size] / esum
            torch.testing.assert_close(out.topk_weights[b, s, slot], expected)
        if norm:
            assert out.topk_weights[b, s].sum().item() == pytest.approx(1.0, abs=1e-5)


def test_hierarchical_losses_average_the_two_levels():
    router = _init(HierarchicalRouter(H, 8, 2, num_groups=4, num_groups_per_tok=1)).train()
    hidden, mask = _hidden()
    out = router(hidden, mask)
    group = out.group_routing
    losses = compute_router_losses([out], hidden)
    expert_aux = load_balancing_loss(out.router_probs, out.topk_index, mask)
    group_aux = load_balancing_loss(group.router_probs, group.topk_index, mask)
    torch.testing.assert_close(losses.aux_loss, (expert_aux + group_aux) / 2)
    grouped = out.expert_logits.unflatten(-1, (4, 2))
    expert_z = torch.logsumexp(grouped[mask], -1).pow(2).mean()
    torch.testing.assert_close(losses.z_loss, (expert_z + router_z_loss(group.router_logits, mask)) / 2)
    expert_imp = importance_loss(out.topk_weights, out.topk_index, 8, mask)
    group_imp = importance_loss(group.topk_weights, group.topk_index, 4, mask)
    torch.testing.assert_close(losses.importance_loss, (expert_imp + group_imp) / 2)
    (losses.aux_loss + losses.z_loss).backward()
    assert router.group_weight.grad.abs().sum() > 0 and router.weight.grad.abs().sum() > 0


def test_hierarchical_telemetry_reports_group_and_expert_load(tiny_bert_config, tmp_path):
    from ptmoe.telemetry import routing_statistics

    model = ptmoe.MoeBertModel(
        tiny_bert_config(num_experts=8, router_type="hierarchical", router_groups=4)
    ).eval()
    for block in model.modules():
        if isinstance(block, ptmoe.SparseMoeBlock):
            _init(block.router)
    batch = {"input_ids": torch.randint(1, 99, (3, 10), generator=torch.Generator().manual_seed(0))}
    with torch.no_grad():
        routing = model(**batch, output_router_logits=True)
    stats = routing_statistics(model, [batch])
    for layer, index in zip(stats.values(), routing.expert_index, strict=True):
        groups = torch.bincount(index.flatten() // 2, minlength=4).float()
        assert layer["group_load"] == pytest.approx((groups / groups.sum()).tolist())
        assert sum(layer["group_load"]) == pytest.approx(1.0)
        assert layer["experts_per_token"] == 2.0 and layer["unrouted_rate"] == 0.0
    from ptmoe.telemetry import plot_expert_load

    assert plot_expert_load(stats, tmp_path / "load.png").stat().st_size > 0  # groups marked on the heatmap


def test_hierarchical_copy_upcycling_reproduces_the_dense_model():
    """Config fields pass through `upcycle`; weights that sum to 1 per token keep a copy-upcycled model exact."""
    from transformers import BertConfig, BertForMaskedLM

    dense_config = {
        k: v for k, v in TINY_BERT.items() if k not in ("num_experts", "num_experts_per_tok", "moe_layers")
    }
    torch.manual_seed(0)
    dense = BertForMaskedLM(BertConfig(**dense_config)).eval()
    moe = ptmoe.upcycle(
        dense,
        num_experts=4,
        num_experts_per_tok=2,
        router_type="hierarchical",
        router_groups=2,
        progress=False,
    )
    assert moe.config.router_groups == 2 and moe.config.upcycling_method == "copy"
    ids = torch.randint(1, 99, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            moe(input_ids=ids).logits, dense(input_ids=ids).logits, atol=1e-5, rtol=1e-5
        )


def test_active_parameters_and_model_card_follow_the_router(tiny_bert_config):
    from ptmoe.cards import _routing_section

    top1 = ptmoe.count_parameters(ptmoe.MoeBertModel(tiny_bert_config(num_experts_per_tok=1)))
    config = tiny_bert_config(router_type="expert_choice", expert_capacity_factor=1.0)
    assert ptmoe.count_parameters(ptmoe.MoeBertModel(config)) == top1  # one expert per token on average
    assert "Expert-choice routing" in _routing_section(config)
    tree = tiny_bert_config(router_type="hierarchical", router_groups=2)
    assert "Hierarchical routing" in _routing_section(tree) and "2 groups" in _routing_section(tree)


def test_upcycle_command_passes_the_routing_options(tmp_path, capsys):
    from transformers import BertConfig, BertForMaskedLM

    from ptmoe.cli import main as cli_main

    dense_config = {
        k: v for k, v in TINY_BERT.items() if k not in ("num_experts", "num_experts_per_tok", "moe_layers")
    }
    BertForMaskedLM(BertConfig(**dense_config)).save_pretrained(tmp_path / "dense")
    argv = ["upcycle", "--base", str(tmp_path / "dense"), "--experts", "4", "--no-progress"]
    argv += ["--router", "hierarchical", "--router-groups", "2", "--expert-dropout", "0.4"]
    assert cli_main([*argv, "--out", str(tmp_path / "moe")]) == 0
    config = ptmoe.MoeBertConfig.from_pretrained(tmp_path / "moe")
    assert (config.router_type, config.router_groups, config.expert_dropout) == ("hierarchical", 2, 0.4)
    bad = ["upcycle", "--base", str(tmp_path / "dense"), "--experts", "4", "--router", "hierarchical"]
    assert cli_main([*bad, "--router-groups", "3", "--out", str(tmp_path / "bad"), "--no-progress"]) == 2
    assert "must divide `num_experts`" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


# ------------------------------------------------------------------------------------------------ expert dropout


def _dropouts(model):
    return {name: m.p for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_expert_dropout_changes_only_the_experts_dropout(family, tiny_bert_config):
    if family == "bert":
        make = lambda **kw: ptmoe.MoeBertModel(tiny_bert_config(hidden_dropout_prob=0.1, **kw))  # noqa: E731
        default = 0.0  # BERT's FFN has no dropout between its projections
    else:
        make = lambda **kw: ptmoe.MoeT5Model(ptmoe.MoeT5Config(**TINY_T5, dropout_rate=0.1, **kw))  # noqa: E731
        default = 0.1  # T5's dense FFN applies dropout_rate there
    base, tuned = _dropouts(make()), _dropouts(make(expert_dropout=0.4))
    inside = {name for name in tuned if ".experts." in name}
    assert inside and all(tuned[name] == 0.4 for name in inside)
    assert all(base.get(name, 0.0) == default for name in inside)  # BERT: an Identity without expert dropout
    assert {n: p for n, p in tuned.items() if n not in inside} == {
        n: p for n, p in base.items() if n not in inside
    }


def test_expert_dropout_acts_only_in_training_and_only_inside_experts(tiny_bert_config):
    config = tiny_bert_config(
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, expert_dropout=0.5, moe_layers=[1]
    )
    model = ptmoe.MoeBertModel(config)
    captured = {}
    for name, module in model.named_modules():
        if name.endswith(("layer.0", "layer.1.attention", "layer.1.moe")):
            module.register_forward_hook(
                lambda m, a, out, name=name: captured.setdefault(name, []).append(out[0])
            )
    ids = torch.randint(1, 99, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.eval()
        model(input_ids=ids), model(input_ids=ids)
        assert all(torch.equal(*runs) for runs in captured.values())  # eval: no dropout anywhere
        captured.clear()
        model.train()
        torch.manual_seed(0)
        model(input_ids=ids), model(input_ids=ids)
    dense, attention, moe = (
        captured[k] for k in ("encoder.layer.0", "encoder.layer.1.attention", "encoder.layer.1.moe")
    )
    assert torch.equal(*dense) and torch.equal(*attention)  # outside the experts: unchanged
    assert not torch.equal(*moe)  # inside: dropout


def test_training_arguments_expose_expert_dropout(tmp_path, tiny_bert_config):
    from ptmoe.training import ModelArguments, load_model

    ptmoe.MoeBertForMaskedLM(tiny_bert_config()).save_pretrained(tmp_path)
    model = load_model(ModelArguments(str(tmp_path), expert_dropout=0.4), "masked-lm")
    assert model.config.expert_dropout == 0.4
    assert {
        m.p for n, m in model.named_modules() if ".experts." in n and isinstance(m, torch.nn.Dropout)
    } == {0.4}
    with pytest.raises(ValueError, match="--expert_dropout"):
        ModelArguments(str(tmp_path), expert_dropout=1.5)
    # upcycling on the fly: the field goes to the MoE config, not to the dense checkpoint's
    from transformers import BertConfig, BertForMaskedLM

    dense_config = {
        k: v for k, v in TINY_BERT.items() if k not in ("num_experts", "num_experts_per_tok", "moe_layers")
    }
    BertForMaskedLM(BertConfig(**dense_config)).save_pretrained(tmp_path / "dense")
    args = ModelArguments(str(tmp_path / "dense"), upcycle_experts=4, expert_dropout=0.4)
    assert load_model(args, "masked-lm").config.expert_dropout == 0.4


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(router_type="hierarchical", router_groups=3), "must divide `num_experts`"),
        (dict(router_type="hierarchical", router_groups=4, num_experts_per_tok=2), "a group has only"),
        (dict(router_type="hierarchical", router_groups=2, num_groups_per_tok=3), "cannot be larger"),
        (
            dict(router_type="hierarchical", router_groups=2, num_groups_per_tok=2, num_experts_per_tok=3),
            "split",
        ),
        (dict(router_type="hierarchical", router_groups=0), "router_groups"),
        (dict(router_groups=2), "apply to `router_type='hierarchical'`"),
        (dict(router_type="expert_choice", expert_capacity_factor=0), "expert_capacity_factor"),
        (dict(expert_capacity_factor=2.0), "applies to `router_type='expert_choice'` only"),
        (dict(expert_dropout=1.0), "expert_dropout"),
        (dict(expert_dropout=-0.1), "expert_dropout"),
    ],
)
def test_bad_routing_fields_are_refused(overrides, message, tiny_bert_config):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny_bert_config(**overrides)


def test_decoder_router_fields_are_checked_for_the_decoder():
    with pytest.raises(ValueError, match="must divide `num_experts`"):
        ptmoe.MoeT5Config(**TINY_T5, decoder_router_type="hierarchical", router_groups=3)
    with pytest.raises(ValueError, match="a group has only"):
        ptmoe.MoeT5Config(**TINY_T5, decoder_router_type="hierarchical", router_groups=4)
    with pytest.raises(ValueError, match="num_experts_per_tok=1"):
        ptmoe.MoeT5Config(**TINY_T5, decoder_router_type="switch")


def test_expert_choice_in_a_decoder_is_refused():
    with pytest.raises(ValueError, match="only works in encoders.*generate"):
        ptmoe.MoeT5Config(**TINY_T5, router_type="expert_choice")  # decoder MoE layers by default
    with pytest.raises(ValueError, match="only works in encoders"):
        ptmoe.MoeT5Config(**TINY_T5, decoder_router_type="expert_choice")
    config = ptmoe.MoeT5Config(**TINY_T5, router_type="expert_choice", decoder_moe_layers=[])
    config.decoder_moe_layers = [1]  # changed after validation: building the decoder stack still refuses
    with pytest.raises(ValueError, match="only works in encoders"):
        ptmoe.MoeT5ForConditionalGeneration(config)
    with pytest.raises(ValueError, match="encoder"):
        ptmoe.MoeBertConfig(**TINY_BERT, router_type="expert_choice", is_decoder=True)


def test_generate_with_an_expert_choice_encoder_and_a_topk_decoder():
    """generate() runs the encoder once over the whole input, so expert choice there is sound; the decoder routes by
    token choice (`decoder_router_type`)."""
    config = ptmoe.MoeT5Config(**TINY_T5, router_type="expert_choice", decoder_router_type="topk")
    model = ptmoe.MoeT5ForConditionalGeneration(config).eval()
    encoder_router = model.encoder.block[1].layer[-1].moe.router
    decoder_router = model.decoder.block[1].layer[-1].moe.router
    assert type(encoder_router) is ExpertChoiceRouter and type(decoder_router) is TopKRouter
    ids = torch.randint(1, 99, (2, 6), generator=torch.Generator().manual_seed(0))
    generated = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert generated.shape == (2, 5)
    with pytest.raises(ValueError, match="decoder_router_type"):
        ptmoe.MoeT5Config(**TINY_T5, decoder_router_type="nope")


# ------------------------------------------------------------------------------------------------ save, load, LoRA, 4-bit


def _variants():
    return {
        "bert_expert_choice": (
            ptmoe.MoeBertForMaskedLM,
            ptmoe.MoeBertConfig(**TINY_BERT, router_type="expert_choice", expert_capacity_factor=1.5),
            AutoModelForMaskedLM,
        ),
        "bert_hierarchical": (
            ptmoe.MoeBertForMaskedLM,
            ptmoe.MoeBertConfig(
                **{**TINY_BERT, "num_experts": 8}, router_type="hierarchical", router_groups=4, num_groups_per_tok=2,
                expert_dropout=0.3,
            ),
            AutoModelForMaskedLM,
        ),
        "t5_expert_choice_hierarchical": (
            ptmoe.MoeT5ForConditionalGeneration,
            ptmoe.MoeT5Config(
                **TINY_T5, router_type="expert_choice", decoder_router_type="hierarchical", router_groups=2,
                expert_dropout=0.2,
            ),
            AutoModelForSeq2SeqLM,
        ),
    }  # fmt: skip


def _inputs(name):
    g = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(1, 99, (2, 8), generator=g), "attention_mask": torch.ones(2, 8)}
    inputs["attention_mask"][1, 5:] = 0
    if name.startswith("t5"):
        inputs["decoder_input_ids"] = torch.randint(1, 99, (2, 4), generator=g)
    return inputs


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("routing_extensions")
    expected = {}
    for name, (model_class, config, _) in _variants().items():
        torch.manual_seed(0)
        model = model_class(config).eval()
        for block in model.modules():
            if isinstance(block, ptmoe.SparseMoeBlock):
                _init(block.router, std=0.3)
        model.save_pretrained(folder / name)
        with torch.no_grad():
            expected[name] = model(**_inputs(name)).logits
    return folder, expected


def test_save_and_load_through_auto_classes(saved):
    folder, expected = saved
    for name, (_, config, auto_class) in _variants().items():
        model = auto_class.from_pretrained(folder / name).eval()
        for field in (
            "router_type",
            "router_groups",
            "num_groups_per_tok",
            "expert_dropout",
            "expert_capacity_factor",
        ):
            assert getattr(model.config, field) == getattr(config, field)
        with torch.no_grad():
            torch.testing.assert_close(model(**_inputs(name)).logits, expected[name])


def test_trust_remote_code_without_ptmoe(saved, tmp_path):
    folder, expected = saved
    from safetensors.torch import load_file, save_file

    names = list(_variants())
    for name in names:
        save_file(
            {k: v.contiguous() for k, v in _inputs(name).items()}, str(tmp_path / f"{name}.safetensors")
        )
    autos = {name: auto.__name__ for name, (_, _, auto) in _variants().items()}
    run_without_ptmoe(
        f"""
        import torch, transformers
        from safetensors.torch import load_file, save_file
        outputs = {{}}
        for name, auto in {autos!r}.items():
            model = getattr(transformers, auto).from_pretrained({str(folder)!r} + "/" + name, trust_remote_code=True)
            assert "ptmoe" not in type(model).__module__
            with torch.no_grad():
                outputs[name] = model.eval()(**load_file(name + ".safetensors")).logits.contiguous()
        save_file(outputs, "outputs.safetensors")
        """,
        tmp_path,
    )
    got = load_file(str(tmp_path / "outputs.safetensors"))
    for name in names:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-5)


def test_lora_per_expert_trains_only_adapters(saved):
    import peft

    folder, _ = saved
    for name, (model_class, _, _) in _variants().items():
        model = model_class.from_pretrained(folder / name)
        peft_model = peft.get_peft_model(model, ptmoe.expert_lora_config(model, r=4))
        trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
        assert trainable and all("lora_" in n and ".experts." in n for n in trainable if "lm_head" not in n)
        peft_model.train()
        out = peft_model(
            **_inputs(name),
            labels=_inputs(name)["input_ids"][:, :4] if name.startswith("t5") else _inputs(name)["input_ids"],
        )
        out.loss.backward()
        assert all(peft_model.get_parameter(n).grad is not None for n in trainable if ".experts.0." in n)


def test_4bit_loading_keeps_routers_in_fp32(saved):
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn import Linear4bit

    folder, expected = saved
    for name, (model_class, _, _) in _variants().items():
        model = model_class.from_pretrained(folder / name, quantization_config=ptmoe.bnb_4bit_config()).eval()
        experts = [m for n, m in model.named_modules() if ".experts." in n and n.endswith(".wo")]
        assert experts and all(isinstance(m, Linear4bit) for m in experts)
        routers = [m for m in model.modules() if isinstance(m, TopKRouter)]
        assert routers and all(p.dtype == torch.float32 for r in routers for p in r.parameters())
        with torch.no_grad():
            logits = model(**_inputs(name)).logits
        assert torch.isfinite(logits).all() and logits.shape == expected[name].shape
