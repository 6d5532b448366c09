"""Training with text domains: domain-supervised routing and routing telemetry per domain.

A data set with a domain column (e.g. `ptmoe/data/domains_train.jsonl`: `text`, `domain`) and a model whose experts
are named after domains (`config.expert_names`, written by `ptmoe.merge_experts`, or `--expert_names`) give::

    domain column ──► setup_domains: every value must name an expert ──► domain id per text
        ──► tokenize_for_mlm / tokenize_for_span_corruption(domain_column=...): blocks never mix domains,
            each carries `domain_labels`
        ──► DomainRoutingTrainer: loss + router_domain_loss_coef · router_domain_loss (DEMix-style supervision,
            training only) and expert load per domain (DomainLoadAccumulator) ──► table + heatmap PNG at train end

At inference no label is needed: the trained routers route by domain, or `model.route_to("juridico")` forces it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import Trainer

from .models.moe import domain_names, expert_domain_ids, router_domain_loss

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
    (`ptmoe.telemetry.DomainLoadAccumulator`); evaluation drops `domain_labels` and computes the model's own loss, so
    eval losses stay comparable with a plain `Trainer`. Add `DomainLoadCallback` (the training scripts do) to log
    routing purity per domain and write the table and heatmap at the end.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from .telemetry import DomainLoadAccumulator, find_moe_blocks

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
    from .telemetry import DomainLoadCallback

    callback = DomainLoadCallback(trainer.domain_load, _config_of(trainer.model).expert_names)
    trainer.add_callback(callback)
    return callback


__all__ = [
    "add_domain_telemetry",
    "DomainArguments",
    "DomainRoutingTrainer",
    "domain_routing_loss",
    "expert_indices",
    "setup_domains",
]
