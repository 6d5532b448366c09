"""Merge dense domain models into one Mixture-of-Experts model (Branch-Train-MiX).

Branch-Train-MiX (Sukhbaatar et al., 2024) continues training copies of one dense seed model on separate domains
("branch, train"), then "mixes" them: the feed-forward network (FFN) of layer l of domain model d becomes expert d of
MoE layer l, every other weight (embeddings, attention, norms, heads) is the average of the domain models, and a new
router learns to pick experts in a short "MiX" phase on mixed data (``scripts/train_mlm.py``; optionally with the
domain routing loss, ``--domain_column``). The path through this file::

    {"juridico": model/path, "noticias": ..., ...}
        ──► each source in MoE key space: a dense source is upcycled to 1 expert per MoE layer (`ptmoe.upcycle`,
            method "copy": the same explicit key maps as upcycling), a ptmoe MoE source keeps its experts
        ──► checks: same architecture, config, weight names and shapes, tokenizer vocabulary (errors name the field)
        ──► state dict: expert slots concatenated in source order; other weights averaged (or taken from `base`);
            routers initialised fresh by the MoE model
        ──► config with `expert_names` (one domain name per expert)

Several experts per domain: pass a ptmoe MoE model (e.g. a domain model upcycled first) as the source of a domain;
all its experts are named after that domain.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping, Sequence

import torch
from transformers import AutoConfig, PreTrainedModel

from .calibration import load_tokenizer
from .models.moe import count_parameters, domain_names
from .outputs import check_output_dir
from .upcycling import (
    FAMILIES,
    assign_tensors,
    import_class,
    initialise_remaining,
    layers_argument,
    router_keys,
    save_upcycled,
    upcycle,
)

logger = logging.getLogger(__name__)

_MOE_MODEL_TYPES = ("moe_bert", "moe_t5")
# Config fields that may differ between sources without changing what the weights compute.
_CONFIG_FIELDS_FREE = {
    "_name_or_path",
    "architectures",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "auto_map",
    "upcycled_from",
    "upcycling_method",
    "upcycling_seed",
    "expert_names",
    "num_experts",
    "router_init",
    "router_type",
    "num_experts_per_tok",
    "output_router_logits",
}
# Weights of the merged model a source's own router or expert count decides: never compared between sources.
_EXPERT_PATTERN = ".moe.experts."


def _is_free_field(name: str) -> bool:
    return name in _CONFIG_FIELDS_FREE or "dropout" in name or name.startswith("router_")


def _as_moe_model(
    domain: str,
    source: PreTrainedModel | str | os.PathLike,
    layers: dict,
    task: str | None,
    load_kwargs: Mapping,
) -> PreTrainedModel:
    """`source` in MoE key space: a ptmoe MoE model as is, a dense one upcycled to one expert per MoE layer."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        config = AutoConfig.from_pretrained(
            path, **{k: v for k, v in load_kwargs.items() if k in ("revision", "token")}
        )
        if config.model_type in _MOE_MODEL_TYPES:
            family = "t5" if config.model_type == "moe_t5" else "bert"
            class_name = (config.architectures or [None])[0]
            if class_name is None:
                raise ValueError(f"source {domain!r} ({path}) records no `architectures` in its config.json")
            model_class = import_class(FAMILIES[family].modeling_module, class_name)
            return model_class.from_pretrained(path, **load_kwargs).eval()
        return upcycle(
            path,
            num_experts=1,
            num_experts_per_tok=1,
            method="copy",
            task=task,
            load_kwargs=load_kwargs,
            progress=False,
            **layers,
        )
    if not isinstance(source, PreTrainedModel):
        raise TypeError(
            f"source {domain!r} must be a transformers model or a path / Hub id, got {type(source).__name__}"
        )
    if task is not None:
        raise ValueError("`task` only applies to sources given as a path or Hub id")
    if source.config.model_type in _MOE_MODEL_TYPES:
        return source
    return upcycle(source, num_experts=1, num_experts_per_tok=1, method="copy", progress=False, **layers)


def _moe_layer_spec(model: PreTrainedModel) -> dict:
    config = model.config
    if config.model_type == "moe_t5":
        return {
            "encoder": config.encoder_moe_layer_indices,
            "decoder": config.decoder_moe_layer_indices,
        }
    return {"encoder": config.moe_layer_indices}


def _check_compatible(models: Mapping[str, PreTrainedModel]) -> None:
    """Refuse sources that differ in architecture, config, weight names or shapes (the error names the mismatch)."""
    (first_name, first), *others = models.items()
    first_config = first.config.to_dict()
    first_shapes = {
        k: tuple(v.shape) for k, v in first.state_dict().items() if _EXPERT_PATTERN not in f".{k}"
    }
    first_shapes = {k: v for k, v in first_shapes.items() if k not in router_keys(first_shapes)}
    first_expert_shapes = _expert_shapes(first)
    for name, model in others:
        if type(model).__name__ != type(first).__name__:
            raise ValueError(
                f"sources must share one architecture: {first_name!r} is (or upcycles to) {type(first).__name__}, "
                f"{name!r} to {type(model).__name__}; load every source with the same head (`task=`)"
            )
        if _moe_layer_spec(model) != _moe_layer_spec(first):
            raise ValueError(
                f"sources must have the same MoE layers: {first_name!r} has {_moe_layer_spec(first)}, {name!r} has "
                f"{_moe_layer_spec(model)} (an MoE source fixes the MoE layers; pass the same `moe_layers`)"
            )
        config = model.config.to_dict()
        differing = sorted(
            key
            for key in set(config) | set(first_config)
            if not _is_free_field(key) and config.get(key) != first_config.get(key)
        )
        if differing:
            shown = ", ".join(f"{k}: {first_config.get(k)!r} vs {config.get(k)!r}" for k in differing[:5])
            raise ValueError(
                f"sources {first_name!r} and {name!r} have different configs ({shown}); merged experts need "
                "models of one architecture and shape, continued from one seed (same tokenizer and vocabulary)"
            )
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if _EXPERT_PATTERN not in f".{k}"}
        shapes = {k: v for k, v in shapes.items() if k not in router_keys(shapes)}
        if set(shapes) != set(first_shapes):
            extra = sorted(set(shapes) ^ set(first_shapes))[:4]
            raise ValueError(f"sources {first_name!r} and {name!r} have different weights, e.g. {extra}")
        for key, shape in shapes.items():
            if shape != first_shapes[key]:
                raise ValueError(
                    f"shape mismatch between sources for {key!r}: {first_name!r} has {first_shapes[key]}, "
                    f"{name!r} has {shape}"
                )
        if _expert_shapes(model) != first_expert_shapes:
            raise ValueError(
                f"sources {first_name!r} and {name!r} have experts of different shapes "
                f"({first_expert_shapes} vs {_expert_shapes(model)})"
            )


def _expert_shapes(model: PreTrainedModel) -> dict[str, tuple]:
    """Shape of each expert tensor (`wi.weight`, …) in the model's first MoE block."""
    shapes = {}
    for key, tensor in model.state_dict().items():
        marker = key.find(".experts.0.")
        if ".moe." in f".{key}" and marker >= 0:
            shapes.setdefault(key[marker + len(".experts.0.") :], tuple(tensor.shape))
    return shapes


def _check_tokenizers(sources: Mapping[str, object]) -> None:
    """Sources given as paths with a tokenizer must share its vocabulary (the error names the differing token)."""
    vocabularies = {}
    for name, source in sources.items():
        if isinstance(source, (str, os.PathLike)):
            tokenizer = load_tokenizer(source)
            if tokenizer is not None:
                vocabularies[name] = tokenizer.get_vocab()
    if len(vocabularies) < 2:
        return
    (first_name, first), *others = vocabularies.items()
    for name, vocab in others:
        if vocab != first:
            differing = sorted(set(vocab.items()) ^ set(first.items()))[:3]
            raise ValueError(
                f"sources {first_name!r} and {name!r} have different tokenizer vocabularies "
                f"({len(first)} vs {len(vocab)} tokens; e.g. {differing}); merged experts need one tokenizer"
            )


def _flatten_sources(sources) -> list[tuple[str, object]]:
    if not isinstance(sources, Mapping):
        raise TypeError(
            "`sources` must be a mapping {domain name: model or path}, e.g. {'juridico': 'out/juridico', ...}"
        )
    flat = []
    for domain, value in sources.items():
        if not isinstance(domain, str) or not domain.strip():
            raise ValueError(f"domain names must be non-empty strings, got {domain!r}")
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if not items:
            raise ValueError(f"domain {domain!r} has no source model")
        for index, item in enumerate(items):
            flat.append((domain if len(items) == 1 else f"{domain}[{index}]", domain, item))
    if len(flat) < 2:
        raise ValueError(
            f"merge_experts needs at least 2 source models (one per domain expert), got {len(flat)}; with one "
            "model use `ptmoe.upcycle` instead"
        )
    return flat


@torch.no_grad()
def merge_experts(
    sources: Mapping[
        str, PreTrainedModel | str | os.PathLike | Sequence[PreTrainedModel | str | os.PathLike]
    ],
    base: str | None = None,
    moe_layers: int | Sequence[int] | None = 1,
    num_experts_per_tok: int | None = None,
    *,
    encoder_moe_layers: int | Sequence[int] | None = None,
    decoder_moe_layers: int | Sequence[int] | None = None,
    router_type: str = "topk",
    router_init: str = "normal",
    seed: int = 0,
    task: str | None = None,
    load_kwargs: Mapping | None = None,
    **moe_config_overrides,
) -> PreTrainedModel:
    """Merge dense (or MoE) domain models of one architecture into one MoE model with named domain experts.

    Expert slots are filled in the order of `sources`: a dense source gives one expert per MoE layer (its FFN of
    that layer), a ptmoe MoE source all of its experts, every one named after its domain in `config.expert_names`.
    Every other weight is the mean of the sources (Branch-Train-MiX), or the weight of the source named `base`.
    Routers are new (`router_init`); train them on mixed data (the "MiX" phase) before relying on the routing, or
    force routing per domain with `model.route_to(name)`.

    Args:
        sources (`Mapping[str, model | path | list]`): domain name → a dense BERT / RoBERTa / T5 model, a ptmoe MoE
            model, or a path / Hub id of one; a list gives the domain several experts (one per model).
        base (`str`, *optional*): the domain whose non-expert weights are taken; `None` averages all sources.
        moe_layers (`int` or `list[int]`, defaults to 1): MoE layers (1 = every layer, as in Branch-Train-MiX;
            n = every n-th layer; or a list). Layers that are not MoE keep an FFN averaged over the sources.
            T5: default of both `encoder_moe_layers` and `decoder_moe_layers`. Ignored for MoE sources (their
            MoE layers are used; they must agree).
        num_experts_per_tok (`int`, *optional*): experts per token; defaults to 2 (1 for `"switch"` / `"hash"`).
        router_type (`str`, defaults to `"topk"`), router_init (`str`, defaults to `"normal"`), seed (`int`): the
            new routers.
        task (`str`, *optional*): for path sources, which head to load (see `ptmoe.upcycle`).
        load_kwargs (`dict`, *optional*): `from_pretrained` arguments for path sources.
        moe_config_overrides: other MoE config fields (`router_aux_loss_coef`, `router_domain_loss_coef`, …).

    Returns:
        The merged MoE model in `eval()` mode. Its config records `expert_names`, `upcycling_method="merge"` and
        `upcycled_from` (the first path source: its tokenizer is the merged model's).

    Raises:
        `ValueError` for fewer than 2 sources, an unknown `base`, or sources that differ in architecture, config,
        weight names or shapes, or tokenizer vocabulary (the message names the mismatch).

    Example:

    ```python
    >>> import ptmoe
    >>> moe = ptmoe.merge_experts({"juridico": "out/bert-juridico", "noticias": "out/bert-noticias",
    ...                            "saude": "out/bert-saude"}, num_experts_per_tok=2)
    >>> moe.route_to("juridico")  # or train the routers: scripts/train_mlm.py --domain_column domain
    ```
    """
    flat = _flatten_sources(sources)
    if base is not None and base not in sources:
        raise ValueError(f"`base` must be one of the source domains {list(sources)}, got {base!r}")
    load_kwargs = dict(load_kwargs or {})
    if num_experts_per_tok is None:
        num_experts_per_tok = 1 if router_type in ("switch", "hash") else 2
    layers = {"moe_layers": moe_layers}
    if encoder_moe_layers is not None or decoder_moe_layers is not None:
        layers.update(encoder_moe_layers=encoder_moe_layers, decoder_moe_layers=decoder_moe_layers)
    for key, value in list(layers.items()):
        if value is None:
            del layers[key]

    for label, _, source in flat:
        if isinstance(source, (str, os.PathLike)):
            path = os.fspath(source)
            # A Hub id is "name" or "org/name"; anything that looks like a file path must exist here.
            if (path.startswith((os.sep, ".", "~")) or os.path.splitdrive(path)[0]) and not os.path.isdir(
                path
            ):
                raise FileNotFoundError(f"source {label!r}: no such folder {path!r}")
    _check_tokenizers({label: source for label, _, source in flat})
    models = {label: _as_moe_model(label, source, layers, task, load_kwargs) for label, _, source in flat}
    _check_compatible(models)

    expert_names: list[str] = []
    slots: list[tuple[str, int]] = []  # merged expert id → (source label, its expert id)
    for label, domain, _ in flat:
        for local in range(models[label].config.num_experts):
            expert_names.append(domain)
            slots.append((label, local))

    first = next(iter(models.values()))
    source_paths = [os.fspath(s) for _, _, s in flat if isinstance(s, (str, os.PathLike))]
    provenance = source_paths[0] if source_paths else (first.config.upcycled_from or type(first).__name__)
    fields = {
        k: v
        for k, v in first.config.to_dict().items()
        if k not in ("architectures", "auto_map", "_name_or_path", "transformers_version")
    }
    fields.update(
        num_experts=len(slots),
        num_experts_per_tok=num_experts_per_tok,
        router_type=router_type,
        router_init=router_init,
        expert_names=expert_names,
        upcycled_from=provenance,
        upcycling_method="merge",
        upcycling_seed=seed,
        **moe_config_overrides,
    )
    config = type(first.config)(**fields)
    with torch.device("meta"):
        merged = type(first)(config)
    expected = {key: tensor.shape for key, tensor in merged.state_dict().items()}
    states = {label: model.state_dict() for label, model in models.items()}
    base_labels = [label for label, domain, _ in flat if domain == base] if base is not None else list(states)
    skip = router_keys(expected)
    tensors: dict[str, torch.Tensor] = {}
    for key, shape in expected.items():
        if key in skip:
            continue
        marker = key.find(".experts.")
        if ".moe." in f".{key}" and marker >= 0:
            index_text, _, rest = key[marker + len(".experts.") :].partition(".")
            label, local = slots[int(index_text)]
            tensor = states[label][f"{key[:marker]}.experts.{local}.{rest}"].clone()
        else:
            values = [states[label][key] for label in base_labels]
            if len(values) == 1 or not values[0].is_floating_point():
                tensor = values[0].clone()
            else:  # accumulate in fp32: the mean of bf16 weights would round at every addition
                tensor = (torch.stack([v.float() for v in values]).mean(dim=0)).to(values[0].dtype)
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(
                f"merged weight {key!r} has shape {tuple(tensor.shape)}, the model expects {tuple(shape)}"
            )
        tensors[key] = tensor
    reference = next(iter(first.parameters()))
    assign_tensors(merged, tensors)
    initialise_remaining(merged, reference.device, reference.dtype, seed)
    leftover = [name for name, t in (*merged.named_parameters(), *merged.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"merge_experts left tensors on the meta device: {leftover[:8]}")
    logger.info(
        "Merged %d sources into %s with %d experts per MoE layer: %s",
        len(flat),
        type(merged).__name__,
        len(slots),
        expert_names,
    )
    return merged.eval()


# --------------------------------------------------------------------------------------------------------------
# Command line: `ptmoe merge-experts` (wired in ptmoe/cli.py)
# --------------------------------------------------------------------------------------------------------------
def _source_argument(text: str) -> tuple[str, str]:
    domain, sep, path = text.partition("=")
    if not sep or not domain.strip() or not path.strip():
        raise argparse.ArgumentTypeError(
            f"expected DOMAIN=PATH (e.g. juridico=out/bert-juridico), got {text!r}"
        )
    return domain.strip(), path.strip()


def add_merge_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `ptmoe merge-experts`."""
    parser.add_argument(
        "sources",
        nargs="+",
        type=_source_argument,
        metavar="DOMAIN=PATH",
        help="a domain model per domain (repeat a domain for several experts)",
    )
    parser.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    parser.add_argument(
        "--base", default=None, help="take non-expert weights from this domain (default: average)"
    )
    parser.add_argument("--top-k", type=int, default=None, help="experts per token (default 2)")
    parser.add_argument(
        "--moe-layers", type=layers_argument, default=1, help="every n-th layer (1) or a list"
    )
    parser.add_argument("--router", choices=("topk", "switch", "noisy_topk", "hash"), default="topk")
    parser.add_argument("--router-init", choices=("normal", "zeros"), default="normal")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task", default=None, help="dense head to load (e.g. masked-lm)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def run_merge_command(args: argparse.Namespace) -> int:
    """`ptmoe merge-experts`: merge the sources, save to `--out` with the first source's tokenizer."""
    import sys

    grouped: dict[str, list[str]] = {}
    for domain, path in args.sources:
        grouped.setdefault(domain, []).append(path)
    try:
        check_output_dir(args.out, args.overwrite)  # fail before loading the sources, not after
        model = merge_experts(
            {d: p if len(p) > 1 else p[0] for d, p in grouped.items()},
            base=args.base,
            moe_layers=args.moe_layers,
            num_experts_per_tok=args.top_k,
            router_type=args.router,
            router_init=args.router_init,
            seed=args.seed,
            task=args.task,
        )
        out = save_upcycled(model, args.out, overwrite=args.overwrite)
    except (FileExistsError, FileNotFoundError, ValueError, OSError) as error:
        print(f"ptmoe merge-experts: error: {str(error).splitlines()[0]}", file=sys.stderr)
        return 2
    counts = count_parameters(model)
    print(
        f"{type(model).__name__}: {model.config.num_experts} experts per MoE layer "
        f"({', '.join(domain_names(model.config.expert_names))}), top-{model.config.num_experts_per_tok}, "
        f"saved to {out}"
    )
    print(f"total parameters:  {counts['total']:>14,}")
    print(f"active per token:  {counts['active']:>14,}")
    return 0


__all__ = ["merge_experts", "add_merge_arguments", "run_merge_command"]
