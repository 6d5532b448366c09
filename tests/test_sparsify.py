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


def test_bench_dispatch_quick(capsys):
    load_script("bench_dispatch").main(["--quick", "--threads", "1"])
    printed = capsys.readouterr().out
    assert "E=64 k=16" in printed and "grouped_mm" in printed
