"""Router telemetry: how MoE layers route tokens, during training (a `TrainerCallback`) and offline.

Every `SparseMoeBlock` returns `(output, RouterOutput)`; a forward hook on each block sees the routing decision of
every batch without touching the model. Per MoE layer, over the real (non-padding) tokens, we report:

``load`` (one value per expert)
    share of the routing decisions that chose each expert: ``load_e = #(token, expert) assignments to e / A``
    with ``A`` all assignments of the ``T`` real tokens (``T · k`` for token-choice routers, counted *before*
    capacity drops: the ``f_e`` of the Switch load-balancing loss; for expert choice, the tokens the experts
    picked). Sums to 1; a perfectly balanced layer has ``load_e = 1 / E``.
``group_load`` (hierarchical routers only, one value per group)
    the summed ``load`` of each group's experts (each chosen expert lies in a chosen group).
``load_std`` / ``load_max``
    population standard deviation and maximum of ``load`` over experts (0 and ``1 / E`` when balanced).
``router_entropy``
    mean over tokens of the entropy (nats) of the token's router distribution ``router_probs``: how undecided the
    router is per token (``ln E`` = uniform probabilities, 0 = one-hot).
``load_entropy``
    entropy (nats) of the ``load`` distribution: how evenly the layer spreads its tokens (``ln E`` = balanced,
    0 = every token on one expert). A confident router (low ``router_entropy``) can still be balanced (high
    ``load_entropy``); that combination is the goal of load balancing.
``drop_rate``
    share of the assignments of real tokens that were not dispatched (Switch expert capacity overflow); 0 for
    routers without capacity (with `router_top_p`, the slots a token did not need count here too).
``experts_per_token``
    dispatched assignments per real token: the experts that really computed for a token on average (k for top-k,
    fewer with `router_top_p`; below 1 when Switch drops tokens; the capacity factor for expert choice, where it
    varies per token).
``unrouted_rate``
    share of real tokens that reached no expert (Switch: dropped; expert choice: picked by no expert). Their MoE
    output is zero and the residual connection carries them.
``aux_loss`` / ``z_loss``
    load-balancing (`load_balancing_loss`) and router z-loss (`router_z_loss`) recomputed from the
    `RouterOutput`, averaged over forward passes; 0 for routers without parameters (hash), as in the models.

`RouterTelemetryCallback` logs these as ``router/<layer>/<stat>`` (plus ``router/<layer>/expert_<e>_load``) and
their mean over the MoE layers as ``router/mean/<stat>`` through the Trainer's own logging, so every `report_to`
integration receives them, and writes ``expert_load.png`` (a layer × expert heatmap) and ``expert_load_std.png`` at
the end of training. With ``--report_to mlflow``, `add_router_telemetry` swaps transformers' `MLflowCallback` for
`MoeMLflowCallback`, which also logs the MoE set-up as run parameters and the two PNGs as run artifacts.
`routing_statistics` computes the same numbers over any dataloader for offline analysis.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.integrations import MLflowCallback

from .calibration import moe_blocks, move_to
from .models.moe import RouterOutput, SparseMoeBlock, count_parameters, layer_router_losses
from .outputs import save_figure
from .parallel import all_reduce_vectors

logger = logging.getLogger(__name__)

# Scalar statistics logged for every MoE layer (see the module docstring for their definitions).
LAYER_STAT_KEYS = (
    "load_std",
    "load_max",
    "router_entropy",
    "load_entropy",
    "drop_rate",
    "experts_per_token",
    "unrouted_rate",
    "aux_loss",
    "z_loss",
)

# Layout of one layer's accumulator vector: these sums, then one token count per expert. A flat vector lets all
# layers be summed across data-parallel ranks with a single all_reduce.
_TOKENS, _ASSIGNMENTS, _DISPATCHED, _ENTROPY_SUM, _AUX_SUM, _Z_SUM, _FORWARDS, _ROUTED_TOKENS = range(8)
_NUM_SUMS = 8


# --------------------------------------------------------------------------------------------------------------
# Finding and naming the MoE layers
# --------------------------------------------------------------------------------------------------------------
_STACK_PATTERN = re.compile(r"(?:^|\.)(encoder|decoder)(?:\.|$)")
_INDEX_PATTERN = re.compile(r"(?:^|\.)(?:layer|layers|block|h)\.(\d+)(?:\.|$)")
# Prefixes added by wrappers (PEFT, DDP/accelerate, torch.compile): not part of a layer's identity.
_WRAPPER_PREFIX = re.compile(r"^(?:(?:base_model|model|module|_orig_mod|_fsdp_wrapped_module)\.)+")


def find_moe_blocks(model: nn.Module) -> dict[str, SparseMoeBlock]:
    """The `SparseMoeBlock`s of `model` in module order, keyed by a short layer name.

    Works on wrapped models (PEFT, DDP, accelerate, `torch.compile`) because it walks `named_modules()`. Names
    are ``layer_<i>`` for a single stack (MoE-BERT) and ``encoder_layer_<i>`` / ``decoder_layer_<i>`` when the
    model has both stacks (MoE-T5); a path without a layer index keeps its (sanitised) module path.

    Args:
        model (`nn.Module`): a ptmoe model, possibly wrapped.
    """
    paths = list(moe_blocks(model).items())
    stacks = {m.group(1) for path, _ in paths if (m := _STACK_PATTERN.search(path))}
    two_stacks = len(stacks) > 1
    blocks: dict[str, SparseMoeBlock] = {}
    for path, module in paths:
        index = _INDEX_PATTERN.search(path)
        stack = _STACK_PATTERN.search(path)
        if index is None:
            name = _WRAPPER_PREFIX.sub("", path).replace(".", "_")
        elif two_stacks and stack is not None:
            name = f"{stack.group(1)}_layer_{index.group(1)}"
        else:
            name = f"layer_{index.group(1)}"
        if name in blocks:  # e.g. two MoE blocks in one layer: fall back to the unambiguous path
            name = _WRAPPER_PREFIX.sub("", path).replace(".", "_")
        blocks[name] = module
    return blocks


def _in_backward() -> bool:
    """True while autograd runs a backward pass (gradient checkpointing re-runs forwards there: don't count twice)."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


# --------------------------------------------------------------------------------------------------------------
# Accumulating routing decisions
# --------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def _routing_sums(routing: RouterOutput) -> torch.Tensor:
    """One batch's contribution to a layer's accumulator: `(_NUM_SUMS + E,)` fp32 on the router's device."""
    token_mask = routing.token_mask  # (B, S)
    router_probs = routing.router_probs.detach()[token_mask]  # (T, E)
    topk_index = routing.topk_index[token_mask]  # (T, k), -1 = empty slot (expert choice)
    dispatched = routing.dispatch_mask[token_mask]  # (T, k)
    num_experts = router_probs.shape[-1]
    assigned = topk_index[topk_index >= 0]
    counts = torch.bincount(assigned, minlength=num_experts).float()  # (E,)
    entropy_sum = -torch.special.xlogy(router_probs, router_probs).sum()
    if routing.learned and router_probs.shape[0] > 0:
        losses = layer_router_losses(routing)  # the models' own definition, per router kind
        aux, z = losses.aux_loss.detach(), losses.z_loss.detach()
    else:  # hash routing has nothing to learn: the models report 0 for these losses too
        aux = z = router_probs.new_zeros(())
    sums = torch.stack(
        [
            router_probs.new_tensor(float(router_probs.shape[0])),
            router_probs.new_tensor(float(assigned.numel())),
            dispatched.sum().float(),
            entropy_sum.float(),
            aux.float(),
            z.float(),
            router_probs.new_tensor(1.0),
            dispatched.any(dim=-1).sum().float(),
        ]
    )
    return torch.cat([sums, counts])


def summarize_sums(sums: torch.Tensor, num_groups: int = 1) -> dict[str, Any]:
    """Turn a layer's accumulated sums into its statistics (definitions in the module docstring).

    Args:
        sums (`torch.Tensor` of shape `(8 + num_experts,)`): as accumulated by `RoutingAccumulator`.
        num_groups (`int`, defaults to 1): expert groups of a hierarchical router; above 1, `group_load` is added.

    Returns:
        `dict` with `load` (`list[float]`, one share per expert), the `LAYER_STAT_KEYS` floats and `tokens` (`int`);
        with groups also `group_load` (`list[float]`, one share per group).
    """
    sums = sums.double().cpu()
    counts = sums[_NUM_SUMS:]
    assignments = sums[_ASSIGNMENTS].item()
    tokens = sums[_TOKENS].item()
    forwards = sums[_FORWARDS].item()
    load = counts / assignments if assignments > 0 else torch.zeros_like(counts)
    stats = {
        "load": load.tolist(),
        "load_std": load.std(unbiased=False).item() if load.numel() > 1 else 0.0,
        "load_max": load.max().item(),
        "router_entropy": sums[_ENTROPY_SUM].item() / tokens if tokens > 0 else 0.0,
        "load_entropy": (-torch.special.xlogy(load, load).sum()).item(),
        "drop_rate": 1.0 - sums[_DISPATCHED].item() / assignments if assignments > 0 else 0.0,
        "experts_per_token": sums[_DISPATCHED].item() / tokens if tokens > 0 else 0.0,
        "unrouted_rate": 1.0 - sums[_ROUTED_TOKENS].item() / tokens if tokens > 0 else 0.0,
        "aux_loss": sums[_AUX_SUM].item() / forwards if forwards > 0 else 0.0,
        "z_loss": sums[_Z_SUM].item() / forwards if forwards > 0 else 0.0,
        "tokens": int(round(tokens)),
    }
    if num_groups > 1:  # groups are consecutive experts
        stats["group_load"] = load.view(num_groups, -1).sum(dim=-1).tolist()
    return stats


def _num_groups(block: SparseMoeBlock) -> int:
    return getattr(getattr(block, "router", None), "num_groups", 1)


class RoutingAccumulator:
    """Sums of routing decisions per MoE layer, fed by forward hooks on `SparseMoeBlock`s.

    Args:
        blocks (`Mapping[str, SparseMoeBlock]`): layer name → block, e.g. from `find_moe_blocks`.
        training_only (`bool`, defaults to `False`): ignore forwards of blocks in eval mode (the callback uses
            this so evaluation batches do not mix into training telemetry).
    """

    def __init__(self, blocks: Mapping[str, SparseMoeBlock], training_only: bool = False):
        self.blocks = dict(blocks)
        self.training_only = training_only
        self.sums: dict[str, torch.Tensor | None] = dict.fromkeys(self.blocks)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def install(self) -> None:
        """Register one forward hook per block (idempotent)."""
        if self._handles:
            return
        for name, block in self.blocks.items():
            self._handles.append(block.register_forward_hook(self._make_hook(name)))

    def remove(self) -> None:
        """Remove the hooks; the model is left exactly as before `install`."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _make_hook(self, name: str):
        def hook(module: nn.Module, inputs, output) -> None:
            if (self.training_only and not module.training) or _in_backward():
                return
            contribution = _routing_sums(output[1])
            previous = self.sums[name]
            self.sums[name] = contribution if previous is None else previous + contribution

        return hook

    def reset(self) -> None:
        self.sums = dict.fromkeys(self.blocks)

    def vectors(self) -> dict[str, torch.Tensor]:
        """Per layer sums as CPU float64 vectors (zeros for layers that saw no token)."""
        result = {}
        for name, block in self.blocks.items():
            sums = self.sums[name]
            if sums is None:
                sums = torch.zeros(_NUM_SUMS + block.num_experts)
            result[name] = sums.detach().double().cpu()
        return result

    def summary(self) -> dict[str, dict[str, Any]]:
        """`summarize_sums` of every layer, in model order."""
        return {
            name: summarize_sums(sums, _num_groups(self.blocks[name]))
            for name, sums in self.vectors().items()
        }


def batch_replicas(model: nn.Module) -> int:
    """How many ranks process the same batch: the tensor-parallel size of a model sharded by transformers'
    `from_pretrained(..., distributed_config=DistributedConfig(tp_size=…))` (1 otherwise, FSDP and DDP included).

    Summing routing counts over all ranks counts each batch this many times.

    Args:
        model (`nn.Module`): a ptmoe model, possibly wrapped.
    """
    for module in model.modules():
        tp_size = getattr(module, "_tp_size", None)
        if isinstance(tp_size, int) and tp_size > 1:
            return tp_size
    return 1


# --------------------------------------------------------------------------------------------------------------
# The Trainer callback
# --------------------------------------------------------------------------------------------------------------
class RouterTelemetryCallback(TrainerCallback):
    """Log router statistics of every MoE layer through the Trainer's logging and plot expert load at the end.

    Hooks are installed on the model's `SparseMoeBlock`s at `on_train_begin` and removed at `on_train_end`; only
    forwards of training-mode blocks are counted (evaluation does not mix in), and re-computed forwards of
    gradient checkpointing are not counted twice. At each training log event the statistics of the steps since
    the previous log are summed over data-parallel ranks and added to the `logs` dict as
    ``router/<layer>/<stat>`` (`LAYER_STAT_KEYS`), ``router/<layer>/expert_<e>_load`` (and
    ``router/<layer>/group_<g>_load`` for hierarchical routers); they are also added to
    `state.log_history` (so `trainer_state.json` keeps them).

    Callbacks see `logs` in the order they were added, and the Trainer puts its `report_to` integrations
    (TensorBoard, MLflow, W&B, …) before callbacks passed to its constructor. Use `add_router_telemetry(trainer)`
    to place this callback ahead of them, so that they receive the router keys too. The summary logged when
    training ends (the metrics `trainer.train()` returns, `train_results.json`) gets whole-run statistics.

    Args:
        log_expert_load (`bool`, defaults to `True`): also log each expert's load share (E keys per layer).
        plot (`bool`, defaults to `True`): write `heatmap_file` and `curve_file` into `args.output_dir` at train
            end (main process only).
        heatmap_file (`str`, defaults to `"expert_load.png"`): load heatmap over the whole run.
        curve_file (`str`, defaults to `"expert_load_std.png"`): `load_std` per layer against the training step.
        prefix (`str`, defaults to `"router"`): first component of every logged key.

    Attributes:
        history (`list[dict]`): one entry per training log event: ``{"step": int, "layers": {name: stats}}``.
        totals (`dict[str, dict]`): statistics over the whole run (set at train end), as `routing_statistics`.
        plots (`list[Path]`): the PNGs written at the last train end (what `MoeMLflowCallback` uploads).
    """

    def __init__(
        self,
        log_expert_load: bool = True,
        plot: bool = True,
        heatmap_file: str = "expert_load.png",
        curve_file: str = "expert_load_std.png",
        prefix: str = "router",
    ):
        self.log_expert_load = log_expert_load
        self.plot = plot
        self.heatmap_file = heatmap_file
        self.curve_file = curve_file
        self.prefix = prefix
        self.history: list[dict[str, Any]] = []
        self.totals: dict[str, dict[str, Any]] = {}
        self.plots: list[Path] = []
        self._accumulator: RoutingAccumulator | None = None
        self._run_sums: dict[str, torch.Tensor] = {}
        self._num_groups: dict[str, int] = {}
        self._placed_before_integrations = False
        self._replicas = 1

    # -- events ------------------------------------------------------------------------------------------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        model = kwargs.get("model")
        if model is None:
            raise ValueError("RouterTelemetryCallback needs the model: use it as a Trainer callback.")
        blocks = find_moe_blocks(model)
        if not blocks:
            logger.warning("RouterTelemetryCallback: the model has no SparseMoeBlock; no router telemetry.")
            return
        reporting = [r for r in (args.report_to or []) if r != "none"]
        if reporting and not self._placed_before_integrations:
            logger.warning(
                "RouterTelemetryCallback was added after the report_to integrations %s, which therefore log "
                "before it adds the router keys. Add it with `ptmoe.telemetry.add_router_telemetry(trainer)`.",
                reporting,
            )
        self.history = []
        self.totals = {}
        self.plots = []
        self._run_sums = {}
        self._num_groups = {name: _num_groups(block) for name, block in blocks.items()}
        self._accumulator = RoutingAccumulator(blocks, training_only=True)
        self._accumulator.install()
        self._replicas = batch_replicas(model)

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs
    ):
        if self._accumulator is None or logs is None:
            return
        if any(key.startswith(("eval_", "test_")) for key in logs):
            return  # evaluation results: the training interval continues into the next training log
        stats = self._flush(args)
        if any(layer["tokens"] for layer in stats.values()):
            self.history.append({"step": state.global_step, "layers": stats})
        if "train_runtime" in logs:
            # The summary logged when training ends (also returned as `train()` metrics): whole-run statistics.
            stats = self._summarize(self._run_sums)
        if not any(layer["tokens"] for layer in stats.values()):
            return
        new_keys = self.flatten(stats)
        # `Trainer.log` stored a copy of `logs` in `log_history` just before this event: keep both in sync.
        entry = state.log_history[-1] if state.log_history else {}
        if entry.get("step") == state.global_step and logs.keys() <= entry.keys():
            entry.update(new_keys)
        logs.update(new_keys)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self._accumulator is None:
            return
        self._flush(args)
        self._accumulator.remove()
        self._accumulator = None
        self.totals = self._summarize(self._run_sums)
        if self.plot and state.is_world_process_zero and self.totals:
            output_dir = Path(args.output_dir)
            model = kwargs.get("model")
            heatmap = plot_expert_load(
                self.totals,
                output_dir / self.heatmap_file,
                title=f"Expert load (step {state.global_step})",
                expert_names=getattr(getattr(model, "config", None), "expert_names", None),
            )
            self.plots = [heatmap]
            if self.history:
                self.plots.append(plot_load_std_curve(self.history, output_dir / self.curve_file))

    # -- helpers -----------------------------------------------------------------------------------------------
    def _flush(self, args: TrainingArguments) -> dict[str, dict[str, Any]]:
        """Statistics since the previous flush, summed over ranks; adds them to the whole-run totals."""
        vectors = all_reduce_vectors(self._accumulator.vectors(), args.device)
        if self._replicas > 1:  # tensor-parallel ranks routed the same batch: count it once
            vectors = {name: sums / self._replicas for name, sums in vectors.items()}
        self._accumulator.reset()
        for name, sums in vectors.items():
            self._run_sums[name] = self._run_sums[name] + sums if name in self._run_sums else sums
        return self._summarize(vectors)

    def _summarize(self, vectors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
        return {name: summarize_sums(sums, self._num_groups.get(name, 1)) for name, sums in vectors.items()}

    def flatten(self, stats: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
        """``{"router/<layer>/<stat>": value}`` for every layer of `stats` (the keys this callback logs), and
        ``router/mean/<stat>``: the unweighted mean over layers, one curve per statistic for the whole model."""
        flat: dict[str, float] = {}
        if stats:
            for key in LAYER_STAT_KEYS:
                flat[f"{self.prefix}/mean/{key}"] = sum(float(s[key]) for s in stats.values()) / len(stats)
        for layer, layer_stats in stats.items():
            for key in LAYER_STAT_KEYS:
                flat[f"{self.prefix}/{layer}/{key}"] = float(layer_stats[key])
            if self.log_expert_load:
                for expert, share in enumerate(layer_stats["load"]):
                    flat[f"{self.prefix}/{layer}/expert_{expert}_load"] = float(share)
                for group, share in enumerate(layer_stats.get("group_load", [])):
                    flat[f"{self.prefix}/{layer}/group_{group}_load"] = float(share)
        return flat


def moe_run_params(model: nn.Module) -> dict[str, Any]:
    """The MoE set-up of `model` as flat run parameters (``moe.*``), for experiment trackers.

    The config fields (`num_experts`, `num_experts_per_tok`, `router_type`, `capacity_factor`, `expert_capacity`,
    …) are logged by transformers' `MLflowCallback` under their own names; these add what the config does not state
    directly: the routing algorithm under the name trackers of MoE runs use, which layers are MoE layers, and the
    total and per-token active parameter counts.

    Args:
        model (`nn.Module`): a ptmoe model, possibly wrapped (PEFT, DDP).
    """
    blocks = find_moe_blocks(model)
    config = getattr(model, "config", None)
    params: dict[str, Any] = {
        "moe.routing_algorithm": getattr(config, "router_type", None),
        "moe.num_moe_layers": len(blocks),
        "moe.layers": ",".join(blocks),
    }
    if getattr(config, "num_experts_per_tok", None) is not None:
        counts = count_parameters(model)
        params["moe.total_parameters"] = counts["total"]
        params["moe.active_parameters"] = counts["active"]
    return params


class MoeMLflowCallback(MLflowCallback):
    """transformers' `MLflowCallback` plus the MoE view of a run: `moe_run_params` as run parameters and the
    `RouterTelemetryCallback` PNGs as artifacts (under ``router/``).

    Router metrics need nothing extra: the telemetry callback, placed ahead of this one by `add_router_telemetry`,
    has already added ``router/...`` keys to the `logs` that `MLflowCallback.on_log` records at every logging step.
    Everything else (``MLFLOW_TRACKING_URI``, ``MLFLOW_EXPERIMENT_NAME``, run names, nested runs) is transformers'.

    Args:
        telemetry (`RouterTelemetryCallback`, *optional*): whose `plots` to upload at train end.
        end_run_on_train_end (`bool`, defaults to `True`): end the run when training ends, as `MLflowCallback`
            does. `ptmoe.training.train_evaluate_save` turns it off and calls `end_run` after evaluation, so the
            evaluation metrics join the training run instead of starting a new, unnamed one.
    """

    def __init__(self, telemetry: RouterTelemetryCallback | None = None, end_run_on_train_end: bool = True):
        super().__init__()
        self.telemetry = telemetry
        self.end_run_on_train_end = end_run_on_train_end

    def setup(self, args, state, model):
        super().setup(args, state, model)
        if state.is_world_process_zero and model is not None and find_moe_blocks(model):
            params = {k: v for k, v in moe_run_params(model).items() if v is not None}
            self._ml_flow.log_params(params)

    def on_train_end(self, args, state, control, **kwargs):
        if self._initialized and state.is_world_process_zero and self.telemetry is not None:
            for path in self.telemetry.plots:
                self._ml_flow.log_artifact(str(path), artifact_path="router")
        if self.end_run_on_train_end:
            super().on_train_end(args, state, control, **kwargs)

    def end_run(self) -> None:
        """End the run this callback started (a no-op when it joined a run the caller had started)."""
        if self._initialized and self._auto_end_run and self._ml_flow.active_run() is not None:
            self._ml_flow.end_run()


def add_router_telemetry(trainer, callback: RouterTelemetryCallback | None = None) -> RouterTelemetryCallback:
    """Add a `RouterTelemetryCallback` to `trainer`, ahead of its `report_to` integrations.

    The Trainer calls callbacks in list order with the same `logs` dict; placing the telemetry callback right
    after the Trainer's built-in flow/progress callbacks lets TensorBoard, MLflow, W&B, … log the router keys.
    With ``report_to`` mlflow, transformers' `MLflowCallback` is replaced in place by a `MoeMLflowCallback` linked
    to the telemetry callback (MoE parameters, expert-load PNGs as artifacts).

    Args:
        trainer (`transformers.Trainer`): the trainer to instrument.
        callback (`RouterTelemetryCallback`, *optional*): a configured callback (default: a new one).

    Returns:
        The callback (its `history` and `totals` are filled during/after `trainer.train()`).
    """
    from transformers.integrations import INTEGRATION_TO_CALLBACK

    callback = callback if callback is not None else RouterTelemetryCallback()
    reporting_classes = tuple(INTEGRATION_TO_CALLBACK.values())
    callbacks = trainer.callback_handler.callbacks
    position = next(
        (i for i, cb in enumerate(callbacks) if isinstance(cb, reporting_classes)), len(callbacks)
    )
    callbacks.insert(position, callback)
    callback._placed_before_integrations = True
    use_moe_mlflow(trainer, telemetry=callback)
    return callback


def use_moe_mlflow(trainer, telemetry: RouterTelemetryCallback | None = None) -> MoeMLflowCallback | None:
    """Replace transformers' `MLflowCallback` of `trainer` (``report_to`` mlflow) by a `MoeMLflowCallback` in the
    same place (idempotent; a user's own subclass of `MLflowCallback` is left alone).

    Args:
        trainer (`transformers.Trainer`): the trainer.
        telemetry (`RouterTelemetryCallback`, *optional*): linked to the callback, whose PNGs it uploads.

    Returns:
        The `MoeMLflowCallback` of `trainer`, or `None` when the trainer does not report to MLflow.
    """
    callbacks = trainer.callback_handler.callbacks
    for index, existing in enumerate(callbacks):
        if type(existing) is MLflowCallback:  # exactly transformers' own
            existing = callbacks[index] = MoeMLflowCallback()
        if isinstance(existing, MoeMLflowCallback):
            if telemetry is not None:
                existing.telemetry = telemetry
            return existing
    return None


# --------------------------------------------------------------------------------------------------------------
# Offline statistics and plots
# --------------------------------------------------------------------------------------------------------------
def routing_statistics(
    model: nn.Module, dataloader: Iterable[Mapping[str, Any]], max_batches: int | None = None
) -> dict[str, dict[str, Any]]:
    """Routing statistics of every MoE layer of `model` over `dataloader` (eval mode, no gradients).

    The numbers are those logged by `RouterTelemetryCallback` (definitions in the module docstring), computed
    over all real tokens of the batches. Eval mode matters for Switch routers: they use `eval_capacity_factor`.

    Args:
        model (`nn.Module`): a ptmoe model, possibly wrapped (PEFT, DDP).
        dataloader (iterable of `dict`): batches of keyword arguments for `model` (e.g. a `DataLoader` with a
            data collator); tensors are moved to the model's device.
        max_batches (`int`, *optional*): stop after this many batches.

    Returns:
        `dict` layer name → `{"load": list[float], "load_std", "load_max", "router_entropy", "load_entropy",
        "drop_rate", "experts_per_token", "unrouted_rate", "aux_loss", "z_loss": float, "tokens": int}`, plus
        `"group_load": list[float]` for hierarchical routers.
    """
    blocks = find_moe_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no SparseMoeBlock: there is no routing to measure.")
    device = next(model.parameters()).device
    accumulator = RoutingAccumulator(blocks)
    was_training = model.training
    accumulator.install()
    model.eval()
    try:
        with torch.no_grad():
            for step, batch in enumerate(dataloader):
                if max_batches is not None and step >= max_batches:
                    break
                model(**move_to(batch, device))
    finally:
        accumulator.remove()
        model.train(was_training)
    return accumulator.summary()


def plot_expert_load(
    stats: Mapping[str, Mapping[str, Any]],
    path: str | Path,
    title: str | None = None,
    expert_names: Sequence[str] | None = None,
) -> Path:
    """Write a PNG heatmap of expert load: one row per MoE layer, one column per expert, colour = token share.

    Args:
        stats (`Mapping[str, Mapping]`): layer name → statistics with a `"load"` list (`routing_statistics`,
            `RouterTelemetryCallback.totals`).
        path (`str` or `Path`): PNG file to write (parent folders are created).
        title (`str`, *optional*): figure title.
        expert_names (`list[str]`, *optional*): domain names of the experts (`config.expert_names`), shown under
            the expert ids.

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt
    import numpy as np

    if not stats:
        raise ValueError("plot_expert_load needs statistics for at least one MoE layer")
    layers = list(stats)
    num_experts = max(len(stats[layer]["load"]) for layer in layers)
    grid = np.full((len(layers), num_experts), np.nan)
    for row, layer in enumerate(layers):
        load = stats[layer]["load"]
        grid[row, : len(load)] = load

    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * num_experts + 2.5), max(2.5, 0.45 * len(layers) + 1.5)))
    vmax = max(float(np.nanmax(grid)), 1.0 / num_experts)
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax)
    names = list(expert_names) if expert_names and len(expert_names) == num_experts else None
    ax.set_xticks(range(num_experts), [f"{e}\n{names[e]}" if names else str(e) for e in range(num_experts)])
    ax.set_yticks(range(len(layers)), layers)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    if grid.size <= 256:  # values stay readable on small grids only
        for (row, col), value in np.ndenumerate(grid):
            if not np.isnan(value):
                color = "black" if value > 0.6 * vmax else "white"  # readable on viridis' light end
                ax.text(col, row, f"{value:.2f}", ha="center", va="center", color=color, fontsize=7)
    groups = {len(stats[layer].get("group_load", [])) for layer in layers}
    if len(groups) == 1 and (num_groups := groups.pop()) > 1:  # hierarchical routers: mark the expert groups
        for boundary in range(1, num_groups):
            ax.axvline(boundary * num_experts / num_groups - 0.5, color="red", linewidth=1.5)
        fig.colorbar(image, ax=ax, label="token share")
    ax.set_title(
        f"{title or 'Expert load per MoE layer'}\n(balanced = 1/{num_experts} = {1.0 / num_experts:.3f})"
    )
    return save_figure(fig, path)


def plot_load_std_curve(history: list[Mapping[str, Any]], path: str | Path) -> Path:
    """Write a PNG of each layer's `load_std` against the training step (`RouterTelemetryCallback.history`).

    Args:
        history (`list[dict]`): entries ``{"step": int, "layers": {name: {"load_std": float, ...}}}``.
        path (`str` or `Path`): PNG file to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if not history:
        raise ValueError("plot_load_std_curve needs at least one logged step")
    fig, ax = plt.subplots(figsize=(6.0, 3.5))
    for layer in history[0]["layers"]:
        steps = [entry["step"] for entry in history if layer in entry["layers"]]
        values = [entry["layers"][layer]["load_std"] for entry in history if layer in entry["layers"]]
        ax.plot(steps, values, marker="o", markersize=3, label=layer)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("training step")
    ax.set_ylabel("std of expert load")
    ax.set_title("Load imbalance per MoE layer (0 = balanced)")
    ax.legend(fontsize=7, ncols=2)
    return save_figure(fig, path)


__all__ = [
    "LAYER_STAT_KEYS",
    "MoeMLflowCallback",
    "RouterTelemetryCallback",
    "RoutingAccumulator",
    "add_router_telemetry",
    "find_moe_blocks",
    "moe_run_params",
    "plot_expert_load",
    "plot_load_std_curve",
    "routing_statistics",
    "summarize_sums",
    "use_moe_mlflow",
]
