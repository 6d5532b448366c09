"""Training with text domains: domain-supervised routing and routing telemetry per domain.

A data set with a domain column (e.g. `ptmoe/data/domains_train.jsonl`: `text`, `domain`) and a model whose experts
are named after domains (`config.expert_names`, written by `ptmoe.merge_experts`, or `--expert_names`) give::

    domain column ──► setup_domains: every value must name an expert ──► domain id per text
        ──► tokenize_for_mlm / tokenize_for_span_corruption(domain_column=...): blocks never mix domains,
            each carries `domain_labels`
        ──► DomainRoutingTrainer: loss + router_domain_loss_coef · router_domain_loss (DEMix-style supervision,
            training only) and expert load per domain (DomainLoadAccumulator) ──► table + heatmap PNG at train end
            (DomainLoadCallback); offline: domain_routing_statistics

At inference no label is needed: the trained routers route by domain, or `model.route_to("juridico")` forces it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from .calibration import move_to
from .models.moe import domain_names, expert_domain_ids, router_domain_loss
from .outputs import save_figure
from .parallel import all_reduce_vectors
from .telemetry import find_moe_blocks

logger = logging.getLogger(__name__)


@dataclass
class DomainArguments:
    """Command-line options for domain routing (mixed into a script's data arguments)."""

    domain_column: str | None = field(
        default=None,
        metadata={
            "help": "Column naming each text's domain: trains routers to send domain d to the experts named d "
            "(router_domain_loss) and reports expert load per domain. Needs named experts."
        },
    )
    router_domain_loss_coef: float | None = field(
        default=None,
        metadata={
            "help": "Weight of the domain routing loss (default: the config's router_domain_loss_coef)."
        },
    )
    expert_names: str | None = field(
        default=None,
        metadata={
            "help": "Name the experts, comma-separated, one per expert (e.g. 'juridico,juridico,saude,geral')."
        },
    )

    def __post_init__(self):
        if hasattr(super(), "__post_init__"):
            super().__post_init__()
        if self.router_domain_loss_coef is not None and self.router_domain_loss_coef < 0:
            raise ValueError(f"--router_domain_loss_coef must be >= 0, got {self.router_domain_loss_coef}")
        if self.router_domain_loss_coef and not self.domain_column:
            raise ValueError("--router_domain_loss_coef needs --domain_column (the domain of each text)")


def _config_of(model):
    return model.config  # PeftModel forwards `config` to the base model


def setup_domains(
    model,
    raw_datasets,
    domain_column: str,
    expert_names: str | Sequence[str] | None = None,
    router_domain_loss_coef: float | None = None,
) -> dict[str, int]:
    """Check the domain column against the model's expert names; returns domain name → domain id.

    Args:
        model: a ptmoe model (possibly PEFT-wrapped); `expert_names` / `router_domain_loss_coef` are written into its
            config when given.
        raw_datasets (`datasets.DatasetDict`): the raw splits.
        domain_column (`str`): the column with each text's domain.
        expert_names (`str` or `list[str]`, *optional*): one name per expert (a comma-separated string is split).
        router_domain_loss_coef (`float`, *optional*): overrides the config's coefficient.

    Raises:
        `ValueError` naming the flag: a missing column, a model without expert names, a wrong number of names, or
        domain values that name no expert.
    """
    from .training import check_columns

    check_columns(raw_datasets, {"--domain_column": domain_column})
    config = _config_of(model)
    if not hasattr(config, "expert_names"):
        raise ValueError(f"--domain_column needs a ptmoe MoE model, got a {type(model).__name__}")
    if expert_names is not None:
        names = (
            [n.strip() for n in expert_names.split(",")]
            if isinstance(expert_names, str)
            else list(expert_names)
        )
        if len(names) != config.num_experts or not all(names):
            raise ValueError(
                f"--expert_names needs {config.num_experts} non-empty names (one per expert), got {len(names)}: {names}"
            )
        config.expert_names = names
    if not config.expert_names:
        raise ValueError(
            "--domain_column routes domains to experts by name, but the model's experts have no names: merge domain "
            "models with `ptmoe merge-experts` or pass --expert_names (one name per expert)"
        )
    if router_domain_loss_coef is not None:
        config.router_domain_loss_coef = float(router_domain_loss_coef)
    ids = {name: index for index, name in enumerate(domain_names(config.expert_names))}
    for split, dataset in raw_datasets.items():
        values = set(dataset.unique(domain_column))
        unknown = sorted(map(str, values - set(ids)))
        if unknown:
            raise ValueError(
                f"The {split} split's --domain_column {domain_column!r} has values that name no expert: {unknown[:8]}. "
                f"The experts are named {list(ids)}: rename the values, or name the experts (--expert_names)."
            )
    if not config.router_domain_loss_coef:
        logger.warning(
            "--domain_column without a domain loss (router_domain_loss_coef = 0): only the expert load per domain "
            "is reported; pass --router_domain_loss_coef (e.g. 0.1) to train routers towards the domains' experts."
        )
    return ids


def _router_outputs(outputs, inputs: Mapping[str, Any]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """`(router_logits (B, S, E), token mask (B, S))` of every MoE layer of a model output (BERT or T5)."""
    attention_mask = inputs.get("attention_mask")
    encoder_mask = attention_mask.bool() if attention_mask is not None else None
    if getattr(outputs, "encoder_router_logits", None) is not None or hasattr(
        outputs, "decoder_router_logits"
    ):
        labels = inputs.get("labels")
        decoder_mask = inputs.get("decoder_attention_mask")
        if decoder_mask is None and labels is not None:
            decoder_mask = labels.ne(-100)
        encoder = [(logits, encoder_mask) for logits in outputs.encoder_router_logits or ()]
        decoder = [(logits, decoder_mask) for logits in outputs.decoder_router_logits or ()]
        return encoder + decoder
    return [(logits, encoder_mask) for logits in outputs.router_logits or ()]


def expert_indices(outputs) -> tuple[torch.Tensor, ...]:
    """The `(B, S, k)` expert choices of every MoE layer, in module order (T5: encoder layers, then decoder)."""
    if hasattr(outputs, "encoder_expert_index"):
        return tuple(outputs.encoder_expert_index or ()) + tuple(outputs.decoder_expert_index or ())
    return tuple(outputs.expert_index or ())


def domain_routing_loss(
    outputs, inputs: Mapping[str, Any], domain_labels: torch.Tensor, expert_names
) -> torch.Tensor:
    """`router_domain_loss` averaged over the MoE layers of a forward run with `output_router_logits=True`."""
    layers = _router_outputs(outputs, inputs)
    if not layers:
        raise ValueError("the model output has no router logits: run it with output_router_logits=True")
    expert_domains = expert_domain_ids(expert_names)
    return torch.stack(
        [router_domain_loss(logits, domain_labels, expert_domains, mask) for logits, mask in layers]
    ).mean()


class DomainRoutingTrainer(Trainer):
    """A `Trainer` for batches with `domain_labels` `(B,)`: adds the domain routing loss and counts load per domain.

    In training, the loss is the model's loss plus ``config.router_domain_loss_coef · router_domain_loss`` (averaged
    over MoE layers), and every training batch's expert choices are added to `domain_load`
    (`DomainLoadAccumulator`); evaluation drops `domain_labels` and computes the model's own loss, so
    eval losses stay comparable with a plain `Trainer`. Add `DomainLoadCallback` (the training scripts do) to log
    routing purity per domain and write the table and heatmap at the end.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        config = _config_of(self.model)
        self.domain_load = DomainLoadAccumulator(
            list(find_moe_blocks(self.model)), domain_names(config.expert_names), config.num_experts
        )

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if "domain_labels" not in self._signature_columns:
            self._signature_columns.append("domain_labels")

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        domain_labels = inputs.pop("domain_labels", None)
        if domain_labels is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        outputs = model(**inputs, output_router_logits=True)
        loss = outputs.loss
        config = _config_of(self.model)  # `model` may be wrapped (DDP) and have no `config`
        if config.router_domain_loss_coef:
            loss = loss + config.router_domain_loss_coef * domain_routing_loss(
                outputs, inputs, domain_labels, config.expert_names
            )
        self.domain_load.update(expert_indices(outputs), domain_labels)
        return (loss, outputs) if return_outputs else loss


def add_domain_telemetry(trainer: DomainRoutingTrainer):
    """Attach a `DomainLoadCallback` to a `DomainRoutingTrainer` (purity logs, table and heatmap at train end)."""
    callback = DomainLoadCallback(trainer.domain_load, _config_of(trainer.model).expert_names)
    trainer.add_callback(callback)
    return callback


# --------------------------------------------------------------------------------------------------------------
# Expert load per text domain
# --------------------------------------------------------------------------------------------------------------
class DomainLoadAccumulator:
    """Counts, per MoE layer, which experts the tokens of each text domain reach.

    ``counts[layer, d, e]`` = number of (token, slot) assignments of real tokens of domain-d texts dispatched to
    expert e. The load of domain d in a layer is its row normalised to sum 1; its *purity* is the share of that row
    on the experts named d (1 = every token of d reaches only d's experts; with E experts and random routing it is
    about `#experts(d) / E`).

    Args:
        layers (`list[str]`): MoE layer names in model order (`find_moe_blocks`).
        domains (`list[str]`): domain names; domain id i is `domains[i]`.
        num_experts (`int`): experts per MoE layer.
    """

    def __init__(self, layers: list[str], domains: list[str], num_experts: int):
        self.layers, self.domains, self.num_experts = list(layers), list(domains), num_experts
        self.counts = torch.zeros(len(self.layers), len(self.domains), num_experts, dtype=torch.float64)

    @torch.no_grad()
    def update(self, expert_index: Sequence[torch.Tensor], domain_labels: torch.Tensor) -> None:
        """Add one batch.

        Args:
            expert_index (`tuple` of `torch.LongTensor` of shape `(B, S, k)`): per MoE layer (model order), -1 =
                not dispatched (e.g. padding).
            domain_labels (`torch.LongTensor` of shape `(B,)`): domain id per sequence, -100 = none.
        """
        if len(expert_index) != len(self.layers):
            raise ValueError(
                f"expected expert choices of {len(self.layers)} MoE layers, got {len(expert_index)}"
            )
        labels = domain_labels.detach().long().cpu()  # (B,)
        for layer, index in enumerate(expert_index):
            index = index.detach().cpu()  # (B, S, k)
            domain = labels.view(-1, *([1] * (index.dim() - 1))).expand_as(index)
            keep = (index >= 0) & (domain >= 0)
            flat = domain[keep] * self.num_experts + index[keep]
            counts = torch.bincount(flat, minlength=len(self.domains) * self.num_experts)
            self.counts[layer] += counts.view(len(self.domains), self.num_experts).double()

    def summary(self, expert_names: Sequence[str] | None = None) -> dict[str, dict[str, dict[str, Any]]]:
        """``{layer: {domain: {"load": [share per expert], "tokens": int, "purity": float | None}}}``.

        `purity` needs `expert_names` (None without them).
        """
        result: dict[str, dict[str, dict[str, Any]]] = {}
        for layer, name in enumerate(self.layers):
            result[name] = {}
            for d, domain in enumerate(self.domains):
                row = self.counts[layer, d]
                total = row.sum().item()
                load = (row / total).tolist() if total > 0 else [0.0] * self.num_experts
                purity = None
                if expert_names is not None and total > 0:
                    purity = sum(
                        share for share, owner in zip(load, expert_names, strict=True) if owner == domain
                    )
                result[name][domain] = {"load": load, "tokens": int(total), "purity": purity}
        return result


def domain_purity(stats: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, float | None]:
    """Routing purity of each domain averaged over MoE layers (None for a domain without tokens or names)."""
    purity: dict[str, list[float]] = {}
    for layer_stats in stats.values():
        for domain, entry in layer_stats.items():
            if entry["purity"] is not None:
                purity.setdefault(domain, []).append(entry["purity"])
    domains = {d for layer_stats in stats.values() for d in layer_stats}
    return {d: (sum(purity[d]) / len(purity[d]) if d in purity else None) for d in sorted(domains)}


def domain_load_table(
    stats: Mapping[str, Mapping[str, Mapping[str, Any]]], expert_names: Sequence[str] | None = None
) -> str:
    """A Markdown table: one row per (MoE layer, domain), one column per expert (token share), tokens, purity."""
    if not stats:
        raise ValueError("domain_load_table needs statistics of at least one MoE layer")
    num_experts = len(next(iter(next(iter(stats.values())).values()))["load"])
    headers = [f"{e}" + (f" ({expert_names[e]})" if expert_names else "") for e in range(num_experts)]
    lines = [
        "| layer | domain | " + " | ".join(headers) + " | tokens | purity |",
        "|---|---|" + "---|" * num_experts + "---|---|",
    ]
    for layer, layer_stats in stats.items():
        for domain, entry in layer_stats.items():
            shares = " | ".join(f"{v:.2f}" for v in entry["load"])
            purity = "–" if entry["purity"] is None else f"{entry['purity']:.2f}"
            lines.append(f"| {layer} | {domain} | {shares} | {entry['tokens']} | {purity} |")
    return "\n".join(lines) + "\n"


def plot_domain_load(
    stats: Mapping[str, Mapping[str, Mapping[str, Any]]],
    path: str | Path,
    expert_names: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Write a PNG heatmap per MoE layer: rows = domains, columns = experts (labelled with their names), colour =
    share of the domain's tokens reaching the expert.

    Args:
        stats: `DomainLoadAccumulator.summary()` or `domain_routing_statistics`.
        path (`str` or `Path`): PNG file to write.
        expert_names (`list[str]`, *optional*): expert labels.
        title (`str`, *optional*): figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if not stats:
        raise ValueError("plot_domain_load needs statistics of at least one MoE layer")
    layers = list(stats)
    domains = list(next(iter(stats.values())))
    num_experts = len(next(iter(stats[layers[0]].values()))["load"])
    labels = [f"{e}\n{expert_names[e]}" if expert_names else str(e) for e in range(num_experts)]
    fig, axes = plt.subplots(
        len(layers),
        1,
        figsize=(max(4.0, 0.7 * num_experts + 2.5), (0.45 * len(domains) + 1.2) * len(layers) + 0.6),
        squeeze=False,
    )
    for ax, layer in zip(axes[:, 0], layers, strict=True):
        grid = np.array([stats[layer][d]["load"] for d in domains])
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_xticks(range(num_experts), labels, fontsize=7)
        ax.set_yticks(range(len(domains)), domains)
        ax.set_title(layer, fontsize=9)
        if grid.size <= 256:
            for (row, col), value in np.ndenumerate(grid):
                ax.text(
                    col,
                    row,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="black" if value > 0.6 else "white",
                )
        fig.colorbar(image, ax=ax, label="share of tokens")
    fig.suptitle(title or "Expert load per domain (rows sum to 1)", fontsize=10)
    return save_figure(fig, path)


def domain_routing_statistics(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, Any]],
    domains: Sequence[str] | None = None,
    max_batches: int | None = None,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Expert load per domain over batches that carry `domain_labels` `(B,)` (eval mode, no gradients).

    Args:
        model (`nn.Module`): a ptmoe model; its `config.expert_names` give the default `domains` and the purity.
        dataloader (iterable of `dict`): model inputs plus `domain_labels` (ids into `domains`).
        domains (`list[str]`, *optional*): domain names by id (default: the distinct `config.expert_names`).
        max_batches (`int`, *optional*): stop after this many batches.

    Returns:
        `DomainLoadAccumulator.summary` of the batches.
    """
    config = model.config
    expert_names = getattr(config, "expert_names", None)
    if domains is None:
        if not expert_names:
            raise ValueError(
                "pass `domains` (names by domain id): the model's experts have no `expert_names`"
            )
        domains = list(dict.fromkeys(expert_names))
    accumulator = DomainLoadAccumulator(list(find_moe_blocks(model)), list(domains), config.num_experts)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for step, batch in enumerate(dataloader):
                if max_batches is not None and step >= max_batches:
                    break
                batch = dict(batch)
                if "domain_labels" not in batch:
                    raise ValueError("every batch needs `domain_labels` (one domain id per sequence)")
                labels = batch.pop("domain_labels")
                outputs = model(**move_to(batch, device), output_router_logits=True)
                accumulator.update(expert_indices(outputs), torch.as_tensor(labels))
    finally:
        model.train(was_training)
    return accumulator.summary(expert_names)


class DomainLoadCallback(TrainerCallback):
    """Report the expert load per domain that a `DomainRoutingTrainer` counts.

    At every training log it adds ``domain/<domain>/purity`` (averaged over MoE layers, since the start of
    training); at train end it sums the counts over data-parallel ranks and writes `domain_expert_load.md` (table)
    and `domain_expert_load.png` (heatmap) into `args.output_dir` (main process).

    Args:
        accumulator (`DomainLoadAccumulator`): the trainer's `domain_load`.
        expert_names (`list[str]`): the model's expert names.
    """

    def __init__(self, accumulator: DomainLoadAccumulator, expert_names: Sequence[str]):
        self.accumulator, self.expert_names = accumulator, list(expert_names)
        self.summary: dict[str, Any] = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or any(key.startswith(("eval_", "test_")) for key in logs):
            return
        new_keys = {
            f"domain/{domain}/purity": purity
            for domain, purity in domain_purity(self.accumulator.summary(self.expert_names)).items()
            if purity is not None
        }
        # `Trainer.log` stored a copy of `logs` in `log_history` just before this event: keep both in sync.
        entry = state.log_history[-1] if state.log_history else {}
        if entry.get("step") == state.global_step and logs.keys() <= entry.keys():
            entry.update(new_keys)
        logs.update(new_keys)

    def on_train_end(self, args, state, control, **kwargs):
        counts = self.accumulator.counts
        reduced = all_reduce_vectors({"counts": counts.flatten()}, args.device)["counts"]
        self.accumulator.counts = reduced.view_as(counts)
        self.summary = self.accumulator.summary(self.expert_names)
        if state.is_world_process_zero and self.accumulator.counts.sum() > 0:
            output_dir = Path(args.output_dir)
            output_dir.mkdir(parents=True, exist_ok=True)
            (output_dir / "domain_expert_load.md").write_text(
                domain_load_table(self.summary, self.expert_names), encoding="utf-8"
            )
            plot_domain_load(self.summary, output_dir / "domain_expert_load.png", self.expert_names)


__all__ = [
    "DomainLoadAccumulator",
    "DomainLoadCallback",
    "domain_load_table",
    "domain_purity",
    "domain_routing_statistics",
    "plot_domain_load",
    "add_domain_telemetry",
    "DomainArguments",
    "DomainRoutingTrainer",
    "domain_routing_loss",
    "expert_indices",
    "setup_domains",
]
