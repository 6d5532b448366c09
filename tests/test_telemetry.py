"""Tests of ptmoe.telemetry: per-layer routing statistics, the Trainer callback and the plots."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

import ptmoe
from ptmoe.models.moe import RouterOutput, load_balancing_loss, router_z_loss
from ptmoe.telemetry import (
    LAYER_STAT_KEYS,
    RouterTelemetryCallback,
    RoutingAccumulator,
    add_router_telemetry,
    find_moe_blocks,
    plot_expert_load,
    routing_statistics,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


class _Batches(Dataset):
    """Random token ids with the last two positions padded, and binary labels."""

    def __init__(self, size: int = 16, length: int = 10, vocab_size: int = 99):
        generator = torch.Generator().manual_seed(0)
        self.input_ids = torch.randint(5, vocab_size, (size, length), generator=generator)
        self.attention_mask = torch.ones(size, length, dtype=torch.long)
        self.attention_mask[:, -2:] = 0

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i):
        return {
            "input_ids": self.input_ids[i],
            "attention_mask": self.attention_mask[i],
            "labels": torch.tensor(i % 2),
        }


def _classifier(tiny_bert_config, **overrides):
    torch.manual_seed(0)
    return ptmoe.MoeBertForSequenceClassification(tiny_bert_config(num_labels=2, **overrides))


def _routing(probs: list[list[float]], topk: list[list[int]], dispatched: list[list[bool]], mask: list[bool]):
    router_probs = torch.tensor([probs])  # (1, S, E)
    return RouterOutput(
        router_logits=router_probs.log(),
        router_probs=router_probs,
        topk_index=torch.tensor([topk]),
        topk_weights=torch.ones(1, len(topk), len(topk[0])),
        dispatch_mask=torch.tensor([dispatched]),
        token_mask=torch.tensor([mask]),
    )


# --------------------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------------------
def test_statistics_on_a_hand_computed_batch():
    # 3 real tokens (1 padding), 2 experts, top-1; the third token was dropped by capacity.
    routing = _routing(
        probs=[[0.5, 0.5], [1.0, 0.0], [0.25, 0.75], [0.5, 0.5]],
        topk=[[0], [0], [1], [1]],
        dispatched=[[True], [True], [False], [False]],
        mask=[True, True, True, False],
    )
    block = nn.Module()
    block.num_experts = 2
    accumulator = RoutingAccumulator({"layer_0": block})
    accumulator._make_hook("layer_0")(block, None, (None, routing))
    stats = accumulator.summary()["layer_0"]

    assert stats["tokens"] == 3
    assert stats["load"] == pytest.approx([2 / 3, 1 / 3])
    assert stats["load_std"] == pytest.approx(1 / 6)
    assert stats["load_max"] == pytest.approx(2 / 3)
    assert stats["load_entropy"] == pytest.approx(-(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)))
    token_entropies = [math.log(2), 0.0, -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]
    assert stats["router_entropy"] == pytest.approx(sum(token_entropies) / 3)
    assert stats["drop_rate"] == pytest.approx(1 / 3)
    assert stats["experts_per_token"] == pytest.approx(2 / 3)  # 2 dispatched assignments over 3 real tokens
    assert stats["unrouted_rate"] == pytest.approx(1 / 3)  # the dropped token reached no expert
    mask = routing.token_mask
    expected_aux = load_balancing_loss(routing.router_probs, routing.topk_index, mask).item()
    assert stats["aux_loss"] == pytest.approx(expected_aux)
    assert stats["z_loss"] == pytest.approx(router_z_loss(routing.router_logits, mask).item())


def test_routing_statistics_count_only_real_tokens(tiny_bert_config):
    model = _classifier(tiny_bert_config)
    data = _Batches(size=6)
    stats = routing_statistics(model, torch.utils.data.DataLoader(data, batch_size=3))
    assert list(stats) == ["layer_0", "layer_1"]
    for layer in stats.values():
        assert layer["tokens"] == int(data.attention_mask.sum())
        assert sum(layer["load"]) == pytest.approx(1.0)
        assert layer["drop_rate"] == 0.0  # top-k routing has no capacity
        assert 0.0 <= layer["router_entropy"] <= math.log(4) + 1e-6
    assert model.training, "the model's mode is restored"


def test_switch_capacity_drops_show_in_drop_rate(tiny_bert_config):
    model = _classifier(
        tiny_bert_config, router_type="switch", num_experts_per_tok=1, eval_capacity_factor=0.5
    )
    batch = _Batches(size=4)[0]
    stats = routing_statistics(model, [{k: v.unsqueeze(0) for k, v in batch.items()}])
    with torch.no_grad():
        model.eval()
        expert_index = model(
            **{k: v.unsqueeze(0) for k, v in batch.items()}, output_router_logits=True
        ).expert_index
    real = batch["attention_mask"].bool()
    for layer, index in zip(stats.values(), expert_index, strict=True):
        expected = (index[0][real] == -1).float().mean().item()
        assert expected > 0 and layer["drop_rate"] == pytest.approx(expected)


def test_layer_names_survive_peft_and_ddp_style_wrapping(tiny_bert_config):
    import peft

    model = ptmoe.MoeBertForMaskedLM(tiny_bert_config())
    assert list(find_moe_blocks(model)) == ["layer_0", "layer_1"]
    wrapped = peft.get_peft_model(model, ptmoe.expert_lora_config(model, r=2))
    assert list(find_moe_blocks(wrapped)) == ["layer_0", "layer_1"]

    class DataParallelLike(nn.Module):  # DDP/accelerate keep the model as `.module`
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert list(find_moe_blocks(DataParallelLike(wrapped))) == ["layer_0", "layer_1"]


def test_encoder_decoder_layers_are_named_by_stack():
    config = ptmoe.MoeT5Config(
        vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=2, num_heads=4,
        num_experts=4, encoder_moe_layers=[1], decoder_moe_layers=[0, 1],
    )  # fmt: skip
    names = list(find_moe_blocks(ptmoe.MoeT5ForConditionalGeneration(config)))
    assert names == ["encoder_layer_1", "decoder_layer_0", "decoder_layer_1"]


def test_gradient_checkpointing_recompute_is_not_counted_twice(tiny_bert_config):
    model = _classifier(tiny_bert_config)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    accumulator = RoutingAccumulator(find_moe_blocks(model), training_only=True)
    accumulator.install()
    batch = {
        k: torch.stack([row[k] for row in _Batches(size=2)])
        for k in ("input_ids", "attention_mask", "labels")
    }
    model(**batch).loss.backward()
    accumulator.remove()
    assert all(
        layer["tokens"] == int(batch["attention_mask"].sum()) for layer in accumulator.summary().values()
    )


def test_eval_forwards_are_ignored_in_training_only_mode(tiny_bert_config):
    model = _classifier(tiny_bert_config).eval()
    accumulator = RoutingAccumulator(find_moe_blocks(model), training_only=True)
    accumulator.install()
    with torch.no_grad():
        model(input_ids=torch.randint(5, 99, (2, 6)))
    accumulator.remove()
    assert all(layer["tokens"] == 0 for layer in accumulator.summary().values())


def test_routing_statistics_refuses_a_dense_model():
    with pytest.raises(ValueError, match="has no SparseMoeBlock"):
        routing_statistics(nn.Linear(2, 2), [])


# --------------------------------------------------------------------------------------------------------------
# The Trainer callback
# --------------------------------------------------------------------------------------------------------------
class _Recorder(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def _trainer(model, tmp_path, **overrides):
    options = dict(
        max_steps=4,
        logging_steps=2,
        per_device_train_batch_size=4,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    args = TrainingArguments(output_dir=str(tmp_path), **{**options, **overrides})
    return Trainer(model=model, args=args, train_dataset=_Batches(), eval_dataset=_Batches(size=4))


def _expected_keys(layers, num_experts=4):
    keys = {f"router/{layer}/{stat}" for layer in layers for stat in LAYER_STAT_KEYS}
    return keys | {f"router/{layer}/expert_{e}_load" for layer in layers for e in range(num_experts)}


def test_callback_logs_every_key_for_every_layer_and_writes_png(tmp_path, tiny_bert_config):
    model = _classifier(tiny_bert_config)
    trainer = _trainer(model, tmp_path)
    callback = add_router_telemetry(trainer)
    recorder = _Recorder()
    trainer.add_callback(recorder)
    trainer.train()

    expected = _expected_keys(["layer_0", "layer_1"])
    step_logs = [logs for logs in recorder.logs if "loss" in logs]
    assert len(step_logs) == 2
    for logs in step_logs:
        assert expected <= set(logs)
        assert all(isinstance(logs[key], float) and math.isfinite(logs[key]) for key in expected)
    assert expected <= set(trainer.state.log_history[0]), "trainer_state.json keeps the router keys"
    heatmap = tmp_path / "expert_load.png"
    assert heatmap.stat().st_size > 1000 and heatmap.read_bytes()[:8] == PNG_MAGIC
    assert (tmp_path / "expert_load_std.png").read_bytes()[:8] == PNG_MAGIC
    assert callback.totals["layer_0"]["tokens"] == 4 * 4 * 8  # 4 steps × 4 rows × 8 real tokens
    assert all(not block._forward_hooks for block in find_moe_blocks(model).values()), "hooks removed"


def test_tensor_parallel_ranks_count_their_shared_batch_once(tmp_path, tiny_bert_config, monkeypatch):
    """Under tp_size=2 both ranks route the same batch; the sum over ranks must not double the token counts."""
    import ptmoe.telemetry as telemetry

    sharded_like = nn.Sequential(nn.Linear(2, 2))
    sharded_like[
        0
    ]._tp_size = 2  # what `from_pretrained(distributed_config=DistributedConfig(tp_size=2))` records
    assert telemetry.batch_replicas(sharded_like) == 2 and telemetry.batch_replicas(nn.Linear(2, 2)) == 1
    model = _classifier(tiny_bert_config)
    monkeypatch.setattr(telemetry, "batch_replicas", lambda model: 2)
    # The all-reduce over the two tensor-parallel ranks: both hold the same sums.
    monkeypatch.setattr(
        telemetry, "all_reduce_vectors", lambda vectors, device: {k: 2 * v for k, v in vectors.items()}
    )
    trainer = _trainer(model, tmp_path)
    callback = add_router_telemetry(trainer)
    trainer.train()
    assert callback.totals["layer_0"]["tokens"] == 4 * 4 * 8  # as on one process
    assert sum(callback.totals["layer_0"]["load"]) == pytest.approx(1.0)


def test_report_to_integrations_receive_router_keys(tmp_path, tiny_bert_config):
    from transformers.integrations import TensorBoardCallback

    class FakeTensorBoard(TensorBoardCallback):  # an integration that records instead of writing event files
        def __init__(self):
            self.logs = []

        def on_train_begin(self, *args, **kwargs):
            pass

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs))

        def on_train_end(self, *args, **kwargs):
            pass

    trainer = _trainer(_classifier(tiny_bert_config), tmp_path)
    integration = FakeTensorBoard()
    trainer.add_callback(integration)  # where the Trainer puts report_to integrations: before user callbacks
    add_router_telemetry(trainer)
    callbacks = trainer.callback_handler.callbacks
    assert callbacks.index(integration) > next(
        i for i, c in enumerate(callbacks) if isinstance(c, RouterTelemetryCallback)
    )
    trainer.train()
    assert _expected_keys(["layer_0", "layer_1"]) <= set(integration.logs[0])


def test_evaluation_logs_are_left_alone(tmp_path, tiny_bert_config):
    trainer = _trainer(_classifier(tiny_bert_config), tmp_path, eval_strategy="steps", eval_steps=2)
    add_router_telemetry(trainer)
    recorder = _Recorder()
    trainer.add_callback(recorder)
    trainer.train()
    eval_logs = [logs for logs in recorder.logs if "eval_loss" in logs]
    assert eval_logs and not any(key.startswith("router/") for logs in eval_logs for key in logs)


def test_final_train_metrics_carry_whole_run_statistics(tmp_path, tiny_bert_config):
    trainer = _trainer(_classifier(tiny_bert_config), tmp_path, logging_steps=10)
    callback = add_router_telemetry(trainer)
    metrics = trainer.train().metrics
    assert metrics["router/layer_1/load_std"] == pytest.approx(callback.totals["layer_1"]["load_std"])


def test_plot_expert_load_writes_png_and_refuses_empty_stats(tmp_path):
    stats = {"layer_0": {"load": [0.1, 0.2, 0.3, 0.4]}, "layer_1": {"load": [0.25] * 4}}
    path = plot_expert_load(stats, tmp_path / "sub" / "load.png")
    assert path.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="at least one MoE layer"):
        plot_expert_load({}, tmp_path / "empty.png")
