"""Routers, experts, the sparse block and the router losses (ptmoe/models/routers.py, moe_block.py, router_losses.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.switch_transformers.modeling_switch_transformers import (
    load_balancing_loss_func,
    router_z_loss_func,
)

import ptmoe
from ptmoe.models.moe import (
    HashRouter,
    NoisyTopKRouter,
    SwitchRouter,
    TopKRouter,
    compute_router_losses,
    importance_loss,
    load_balancing_loss,
    resolve_moe_layers,
    router_z_loss,
)

H, E = 16, 4


def _router(kind: str, **kwargs):
    routers = {
        "topk": lambda: TopKRouter(H, E, kwargs.get("k", 2), norm_topk_prob=kwargs.get("norm", True)),
        "switch": lambda: SwitchRouter(
            H, E, capacity_factor=kwargs.get("cf", 1.0), eval_capacity_factor=kwargs.get("cf", 1.0)
        ),
        "noisy_topk": lambda: NoisyTopKRouter(H, E, kwargs.get("k", 2)),
        "hash": lambda: HashRouter(E, vocab_size=50),
    }
    router = routers[kind]()
    for p in router.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return router


def _inputs(batch=3, seq=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq, H, generator=g)
    ids = torch.randint(0, 50, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.bool)
    mask[0, 7:] = False  # some padding
    return hidden, ids, mask


# ---------------------------------------------------------------------------------------------------- config


def test_resolve_moe_layers_step_and_list():
    assert resolve_moe_layers(2, 6) == [1, 3, 5]
    assert resolve_moe_layers(1, 3) == [0, 1, 2]
    assert resolve_moe_layers(3, 6) == [2, 5]
    assert resolve_moe_layers([4, 0], 6) == [0, 4]
    assert resolve_moe_layers(None, 6) == []


@pytest.mark.parametrize(
    "spec, message",
    [([6], "index 6"), ([-1], "index -1"), ([1, 1], "duplicate"), (0, ">= 1"), ([1.5], "integer")],
)
def test_resolve_moe_layers_rejects_bad_specs(spec, message):
    with pytest.raises(ValueError, match="moe_layers") as error:
        resolve_moe_layers(spec, 6)
    assert message in str(error.value)


# ---------------------------------------------------------------------------------------------------- routers


@pytest.mark.parametrize("kind", ["topk", "switch", "noisy_topk", "hash"])
def test_router_logits_are_fp32_and_shapes(kind):
    router = _router(kind).eval()
    hidden, ids, mask = _inputs()
    out = router(hidden.to(torch.bfloat16), mask, ids)
    k = router.num_experts_per_tok
    assert out.router_logits.dtype == torch.float32
    assert out.router_logits.shape == (3, 10, E)
    assert out.topk_index.shape == out.topk_weights.shape == out.dispatch_mask.shape == (3, 10, k)


@settings(max_examples=25, deadline=None)
@given(k=st.integers(1, E), seed=st.integers(0, 10_000), norm=st.booleans())
def test_topk_router_invariants(k, seed, norm):
    router = _router("topk", k=k, norm=norm).eval()
    hidden, ids, mask = _inputs(seed=seed)
    out = router(hidden, mask)
    # each token gets exactly k distinct experts
    assert all(len(set(row.tolist())) == k for row in out.topk_index.reshape(-1, k))
    # the chosen experts are the k most probable ones
    top = out.router_probs.topk(k, dim=-1).values
    assert torch.allclose(out.router_probs.gather(-1, out.topk_index), top)
    if norm:
        assert torch.allclose(out.topk_weights.sum(-1), torch.ones(3, 10))
    else:
        assert torch.allclose(out.topk_weights, top)
    # padding is never dispatched, real tokens always are
    assert torch.equal(out.dispatch_mask, mask.unsqueeze(-1).expand_as(out.dispatch_mask))


@settings(max_examples=25, deadline=None)
@given(capacity_factor=st.floats(0.25, 3.0), seed=st.integers(0, 10_000))
def test_switch_capacity_is_respected_and_counts_only_real_tokens(capacity_factor, seed):
    router = _router("switch", cf=capacity_factor).eval()
    hidden, ids, mask = _inputs(seed=seed)
    out = router(hidden, mask)
    for b in range(3):
        real = int(mask[b].sum())
        capacity = math.ceil(capacity_factor * real / E)
        served = out.expert_index[b, :, 0]
        for e in range(E):
            chosen = (out.topk_index[b, :, 0] == e) & mask[b]
            n_served = int((served == e).sum())
            assert n_served == min(int(chosen.sum()), capacity)  # first-come first-served up to capacity
        assert not out.dispatch_mask[b][~mask[b]].any()


@pytest.mark.parametrize(
    "capacity_factor, expert_capacity, seq_len",
    [(0.5, None, 1), (1.0, None, 1), (float(E), None, 10), (3.0 * E, None, 10), (1.0, 10, 10), (1.0, 64, 10)],
)
def test_switch_skips_capacity_only_when_nothing_can_overflow(capacity_factor, expert_capacity, seq_len):
    """The short cut (one decoding step, factor >= E, absolute capacity >= length) routes exactly as the full path."""
    router = SwitchRouter(
        H,
        E,
        capacity_factor=capacity_factor,
        eval_capacity_factor=capacity_factor,
        expert_capacity=expert_capacity,
    ).eval()
    torch.nn.init.zeros_(router.weight)  # every token → expert 0: the worst case for capacity
    hidden, _, mask = _inputs()
    hidden, mask = hidden[:, :seq_len], mask[:, :seq_len]
    assert router.cannot_overflow(seq_len)
    fast = router(hidden, mask)
    router.cannot_overflow = lambda seq_len: False
    full = router(hidden, mask)
    assert torch.equal(fast.dispatch_mask, full.dispatch_mask)
    assert torch.equal(fast.topk_index, full.topk_index)
    assert not SwitchRouter(H, E, eval_capacity_factor=E - 0.5).eval().cannot_overflow(2)


def test_switch_weight_is_router_probability():
    router = _router("switch", cf=2.0).eval()
    hidden, ids, mask = _inputs()
    out = router(hidden, mask)
    assert torch.allclose(out.topk_weights[..., 0], out.router_probs.max(-1).values)


def test_switch_absolute_expert_capacity():
    router = SwitchRouter(H, E, expert_capacity=1).eval()
    torch.nn.init.zeros_(router.weight)  # all tokens → expert 0
    hidden, _, mask = _inputs()
    out = router(hidden, torch.ones_like(mask))
    assert out.dispatch_mask[..., 0].sum(dim=1).tolist() == [1, 1, 1]
    assert out.dispatch_mask[:, 0, 0].all()  # the first token of each sequence is served


@pytest.mark.parametrize("kind", ["switch", "noisy_topk"])
def test_noise_only_in_training(kind):
    router = _router(kind)
    if kind == "switch":
        router.jitter_noise = 0.1
    hidden, ids, mask = _inputs()
    router.eval()
    assert torch.equal(router(hidden, mask).router_logits, router(hidden, mask).router_logits)
    router.train()
    torch.manual_seed(0)
    a = router(hidden, mask).router_logits
    b = router(hidden, mask).router_logits
    assert not torch.equal(a, b)


def test_routers_do_not_change_module_state():
    for kind in ["topk", "switch", "noisy_topk", "hash"]:
        router = _router(kind).train()
        before = {k: v.clone() for k, v in router.state_dict().items()}
        hidden, ids, mask = _inputs()
        router(hidden.to(torch.bfloat16), mask, ids)
        after = router.state_dict()
        assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)


def test_hash_router_is_deterministic_and_balanced():
    a, b = HashRouter(E, vocab_size=1000), HashRouter(E, vocab_size=1000)
    assert torch.equal(a.hash_table, b.hash_table)
    assert torch.bincount(a.hash_table, minlength=E).tolist() == [250] * E
    hidden, ids, mask = _inputs()
    out = a(hidden, mask, ids)
    assert torch.equal(out.topk_index[..., 0], a.hash_table[ids])
    assert not out.learned and list(a.parameters()) == []
    with pytest.raises(ValueError, match="input_ids"):
        a(hidden, mask, None)


@pytest.mark.parametrize("kind", ["topk", "switch", "noisy_topk"])
def test_gradients_reach_router_weights(kind):
    config = ptmoe.MoeBertConfig(
        hidden_size=H, num_experts=E, num_experts_per_tok=1 if kind == "switch" else 2, router_type=kind
    )
    block = ptmoe.SparseMoeBlock(config, H, 24, "gelu").train()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    hidden, ids, mask = _inputs()
    out, routing = block(hidden, mask, ids)
    (out.pow(2).sum() + load_balancing_loss(routing.router_probs, routing.topk_index, mask)).backward()
    assert block.router.weight.grad is not None and block.router.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------- block


def _reference_block_output(block, hidden, routing):
    """Token-by-token reference: Σ_slots weight · expert(x) over dispatched slots (+ shared experts)."""
    out = torch.zeros_like(hidden)
    for b in range(hidden.shape[0]):
        for s in range(hidden.shape[1]):
            for slot in range(routing.topk_index.shape[-1]):
                if routing.dispatch_mask[b, s, slot]:
                    expert = block.experts[int(routing.topk_index[b, s, slot])]
                    out[b, s] += routing.topk_weights[b, s, slot] * expert(hidden[b, s][None])[0]
            if block.shared_experts is not None:
                out[b, s] += sum(e(hidden[b, s][None])[0] for e in block.shared_experts)
    return out


@pytest.mark.parametrize(
    "kind, shared, gated",
    [("topk", 0, False), ("switch", 0, False), ("hash", 1, True), ("noisy_topk", 2, False)],
)
def test_sparse_block_matches_token_by_token_reference(kind, shared, gated):
    config = ptmoe.MoeBertConfig(
        hidden_size=H,
        vocab_size=50,
        num_experts=E,
        num_experts_per_tok=1 if kind in ("switch", "hash") else 2,
        router_type=kind,
        capacity_factor=0.5,
        eval_capacity_factor=0.5,
        num_shared_experts=shared,
    )
    block = ptmoe.SparseMoeBlock(config, H, 24, "gelu", gated=gated).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    hidden, ids, mask = _inputs()
    out, routing = block(hidden, mask, ids)
    torch.testing.assert_close(out, _reference_block_output(block, hidden, routing), atol=1e-5, rtol=1e-5)


def _block_with_routed_rows(wanted: torch.Tensor, train: bool, dtype: torch.dtype = torch.float32):
    """A top-1 block whose router sends token i (one per sequence) to expert `wanted[i]`, and its input."""
    config = ptmoe.MoeBertConfig(hidden_size=H, num_experts=E, num_experts_per_tok=1, router_type="topk")
    block = ptmoe.SparseMoeBlock(config, H, 24, "gelu").train(train)
    generator = torch.Generator().manual_seed(0)  # the same weights and inputs on every run
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3, generator=generator)
    hidden = torch.randn(len(wanted), 1, H, generator=generator)
    with torch.no_grad():
        block.router.weight.copy_(torch.eye(E, H) * 100.0)
        hidden[:, 0, :E] = F.one_hot(wanted, E).float() * 10.0
    return block.to(dtype), hidden.to(dtype)


def _rows_seen(block) -> list[int]:
    """The row count each expert is called with, filled as the block runs."""
    rows_seen = []
    for expert in block.experts:
        expert.register_forward_hook(lambda module, args, output: rows_seen.append(args[0].shape[0]))
    return rows_seen


@pytest.mark.parametrize("mode", ["eval", "train", "int8"])
def test_small_expert_batches_are_padded_only_in_cpu_fp32_inference(mode):
    """A decoding step sends 1, 2 or 3 tokens to an expert; in fp32 CPU eval 2-3 rows run padded to 4 (a faster
    matrix product), with the same result as the token-by-token reference. Training and quantized experts
    (torch.ao dynamic INT8 scales activations over all rows) get their own rows."""
    wanted = torch.tensor([0, 1, 1, 2, 2, 2, 3, 3])  # 8 sequences, one new token each: experts get 1, 2, 3, 2
    block, hidden = _block_with_routed_rows(wanted, train=mode == "train")
    if mode == "int8":
        block = ptmoe.quantize_dynamic_int8(block)
        assert not block.experts[0].has_plain_weights(torch.float32)
    rows_seen = _rows_seen(block)
    out, routing = block(hidden)
    assert torch.equal(routing.topk_index.flatten(), wanted)
    assert rows_seen == ([1, 4, 4, 4] if mode == "eval" else [1, 2, 3, 2])
    # INT8's per-call activation scale makes a one-token-at-a-time reference differ by design.
    if mode != "int8":
        torch.testing.assert_close(out, _reference_block_output(block, hidden, routing), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_half_precision_expert_batches_run_in_row_buckets(mode):
    """In bf16 CPU inference an expert's rows are padded to a bucket (oneDNN builds a kernel per new row count); the
    output matches the token-by-token reference, and training keeps its own rows."""
    wanted = torch.tensor([0] * 17 + [1] * 33 + [2] * 5 + [3] * 9)  # 17, 33, 5 and 9 tokens
    block, hidden = _block_with_routed_rows(wanted, train=mode == "train", dtype=torch.bfloat16)
    rows_seen = _rows_seen(block)
    out, routing = block(hidden)
    assert torch.equal(routing.topk_index.flatten(), wanted)
    assert rows_seen == ([18, 36, 5, 9] if mode == "eval" else [17, 33, 5, 9])
    torch.testing.assert_close(out, _reference_block_output(block, hidden, routing), atol=2e-2, rtol=2e-2)


def test_row_buckets_are_few_and_tight():
    from ptmoe.models.moe_block import _row_bucket

    buckets = [_row_bucket(rows) for rows in range(1, 4097)]
    assert all(
        rows <= bucket <= max(16, rows * 9 // 8 + 1)
        for rows, bucket in zip(range(1, 4097), buckets, strict=True)
    )
    assert len(set(buckets)) <= 16 + 8 * 8


def test_dropped_tokens_get_zero_expert_output():
    config = ptmoe.MoeBertConfig(
        hidden_size=H, num_experts=E, num_experts_per_tok=1, router_type="switch", eval_capacity_factor=0.25
    )
    block = ptmoe.SparseMoeBlock(config, H, 24, "gelu").eval()
    torch.nn.init.zeros_(block.router.weight)  # every token picks expert 0 → capacity overflows
    hidden, ids, mask = _inputs()
    out, routing = block(hidden, mask, ids)
    dropped = ~routing.dispatch_mask[..., 0]
    assert dropped.any() and (~dropped).any()
    assert torch.equal(out[dropped], torch.zeros_like(out[dropped]))
    assert (out[~dropped].abs().sum(-1) > 0).all()


# ---------------------------------------------------------------------------------------------------- losses


def test_load_balancing_loss_matches_transformers_switch_for_one_group():
    logits = torch.randn(1, 20, E)
    probs = logits.softmax(-1)
    index = probs.argmax(-1)
    ours = load_balancing_loss(probs, index.unsqueeze(-1))
    theirs = load_balancing_loss_func(probs, index)
    torch.testing.assert_close(ours, theirs)


def test_load_balancing_loss_is_one_when_balanced():
    probs = torch.full((8, E), 1.0 / E)
    index = torch.arange(8).remainder(E).unsqueeze(-1)
    torch.testing.assert_close(load_balancing_loss(probs, index), torch.tensor(1.0))


def test_z_loss_matches_transformers_switch():
    logits = torch.randn(2, 9, E)
    torch.testing.assert_close(router_z_loss(logits), router_z_loss_func(logits))


def test_importance_loss_is_cv_squared_of_gate_sums():
    weights = torch.tensor([[0.7, 0.3], [0.6, 0.4], [1.0, 0.0]])
    index = torch.tensor([[0, 1], [0, 2], [3, 1]])
    importance = torch.tensor([1.3, 0.3, 0.4, 1.0])
    expected = importance.var(unbiased=False) / importance.mean() ** 2
    torch.testing.assert_close(importance_loss(weights, index, E), expected)
    assert importance_loss(torch.ones(4, 1), torch.arange(4)[:, None], E).item() == pytest.approx(0.0)


def test_losses_ignore_padding_tokens():
    logits = torch.randn(2, 6, E)
    probs = logits.softmax(-1)
    index = probs.topk(2, dim=-1).indices
    weights = probs.topk(2, dim=-1).values
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 3:] = False
    garbage_logits = logits.clone()
    garbage_logits[1, 3:] = 1e3 * torch.randn(3, E)
    garbage_probs = garbage_logits.softmax(-1)
    assert router_z_loss(garbage_logits, mask) == pytest.approx(router_z_loss(logits, mask).item())
    assert load_balancing_loss(garbage_probs, index, mask) == pytest.approx(
        load_balancing_loss(probs, index, mask).item()
    )
    assert importance_loss(weights, index, E, mask) == pytest.approx(
        importance_loss(weights, index, E, mask).item()
    )
    # and the masked value equals the loss on the real tokens alone
    real = mask.reshape(-1)
    expected = torch.logsumexp(logits.reshape(-1, E)[real], -1).pow(2).mean()
    torch.testing.assert_close(router_z_loss(logits, mask), expected)


def test_compute_router_losses_averages_layers_and_skips_hash():
    hidden, ids, mask = _inputs()
    routers = [_router("topk").eval(), _router("topk").eval(), _router("hash")]
    outs = [r(hidden, mask, ids) for r in routers]
    losses = compute_router_losses(outs, hidden)
    expected = (
        load_balancing_loss(outs[0].router_probs, outs[0].topk_index, mask)
        + load_balancing_loss(outs[1].router_probs, outs[1].topk_index, mask)
    ) / 2
    torch.testing.assert_close(losses.aux_loss, expected)
    zero = compute_router_losses(outs[2:], hidden)
    assert zero.aux_loss.item() == zero.z_loss.item() == 0.0


def test_expert_index_marks_undispatched_slots():
    # expert_index marks undispatched slots with -1
    router = _router("topk").eval()
    hidden, ids, mask = _inputs()
    out = router(hidden, mask)
    assert (out.expert_index[~mask] == -1).all()
    assert torch.equal(out.expert_index[mask], out.topk_index[mask])
    assert F.one_hot(out.topk_index, E).sum(-2).max() == 1


def test_bf16_inference_reuses_reordered_expert_weights_and_notices_updates():
    """CPU bf16 inference runs the experts on weights reordered once for oneDNN: outputs equal the plain layers',
    an in-place weight update rebuilds the copy, and autograd or a deep copy never see it."""
    import copy

    from ptmoe.models import moe_block

    if not moe_block._onednn_bf16():
        pytest.skip("this torch build has no oneDNN bf16 linear")
    config = ptmoe.MoeBertConfig(hidden_size=H, num_experts=E, num_experts_per_tok=2, router_type="topk")
    block = ptmoe.SparseMoeBlock(config, H, 24, "gelu").eval()
    generator = torch.Generator().manual_seed(0)
    for p in block.parameters():  # the router's weight is left to the model's `_init_weights`
        torch.nn.init.normal_(p, std=0.3, generator=generator)
    block = block.to(torch.bfloat16)
    hidden, ids, mask = _inputs()
    hidden = hidden.to(torch.bfloat16)
    with torch.no_grad():
        plain, routing = block(hidden, mask, ids)  # fills the cache
    assert any(expert.wi in moe_block._PACKED_WEIGHTS for expert in block.experts)  # those that got tokens
    torch.testing.assert_close(plain, _reference_block_output(block, hidden, routing), atol=2e-2, rtol=2e-2)
    with torch.inference_mode():
        packed, _ = block(hidden, mask, ids)
    with torch.enable_grad():
        with_grad, _ = block(hidden, mask, ids)
    assert torch.equal(packed, plain) and torch.equal(with_grad.detach(), plain)
    with torch.no_grad():
        for expert in block.experts:
            expert.wo.weight.mul_(2.0)  # in place: the version counter moves
        doubled, _ = block(hidden, mask, ids)
    with torch.enable_grad():
        reference, _ = block(hidden, mask, ids)
    assert torch.equal(doubled, reference.detach()) and not torch.equal(doubled, plain)
    clone = copy.deepcopy(block)
    assert not any(expert.wi in moe_block._PACKED_WEIGHTS for expert in clone.experts)
    assert set(clone.state_dict()) == set(block.state_dict())
    with torch.no_grad():
        assert torch.equal(clone(hidden, mask, ids)[0], doubled)
