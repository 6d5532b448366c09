"""Model cards for the zoo and for trained checkpoints, rendered from registry entries (+ optional eval results).

One command writes every card: `ptmoe cards [--out model_cards] [--eval-results results.json]`, i.e.
`write_cards()`. A card is `model_cards/TEMPLATE.md` with its `$placeholders` filled in: Hub metadata (YAML,
built with `huggingface_hub.ModelCardData`, so the Hub's own serialiser writes it) and the sections. Parameter
counts come from the architecture built on the `meta` device, never from hand-written numbers.

`validate_card` repeats offline what the Hub checks when a README is pushed (metadata parsed by
`huggingface_hub`'s card parser, known license / pipeline tag, parseable `model-index`) plus ptmoe's own
requirements (tags, sections). `RepoCard.validate` itself needs the network, so it is not used here.
"""

from __future__ import annotations

import json
import os
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.repocard_data import model_index_to_eval_results

from . import zoo
from .zoo import ZooEntry

TEMPLATE_PATH = Path(__file__).resolve().parent.parent / "model_cards" / "TEMPLATE.md"

# library_name "transformers": a card is for a folder that loads with transformers' Auto classes and
# `trust_remote_code=True`; the Hub then shows the matching code snippet and counts downloads from config.json.
# ("ptmoe" is no Hub library: it would get neither.)
LIBRARY_NAME = "transformers"
BASE_TAGS = ("moe", "mixture-of-experts", "upcycled", "sparse-upcycling", "portuguese", "ptmoe")
FAMILY_TAGS = {"moe_bert": ("bert",), "moe_t5": ("t5",)}
SECTIONS = (
    "Architecture",
    "Routing",
    "How it was upcycled and trained",
    "How to use",
    "Evaluation",
    "Limitations",
    "License",
)

# Hub license identifiers (https://huggingface.co/docs/hub/repositories-licenses) that a dense source may carry.
HUB_LICENSES = frozenset(
    {
        "apache-2.0",
        "mit",
        "afl-3.0",
        "artistic-2.0",
        "bsl-1.0",
        "bsd",
        "bsd-2-clause",
        "bsd-3-clause",
        "bsd-3-clause-clear",
        "cc",
        "cc0-1.0",
        "cc-by-2.0",
        "cc-by-2.5",
        "cc-by-3.0",
        "cc-by-4.0",
        "cc-by-sa-3.0",
        "cc-by-sa-4.0",
        "cc-by-nc-2.0",
        "cc-by-nc-3.0",
        "cc-by-nc-4.0",
        "cc-by-nd-4.0",
        "cc-by-nc-nd-4.0",
        "cc-by-nc-sa-4.0",
        "epl-2.0",
        "gpl",
        "gpl-2.0",
        "gpl-3.0",
        "lgpl",
        "lgpl-2.1",
        "lgpl-3.0",
        "agpl-3.0",
        "mpl-2.0",
        "odc-by",
        "openrail",
        "openrail++",
        "unlicense",
        "wtfpl",
        "other",
    }
)
# Hub pipeline tags of the tasks ptmoe's classes serve.
HUB_PIPELINE_TAGS = frozenset(
    {
        "fill-mask",
        "text2text-generation",
        "text-classification",
        "token-classification",
        "question-answering",
        "feature-extraction",
        "summarization",
        "translation",
        "text-generation",
    }
)
# Task class suffix → (Hub pipeline tag, transformers Auto class).
_TASKS = {
    "ForMaskedLM": ("fill-mask", "AutoModelForMaskedLM"),
    "ForSequenceClassification": ("text-classification", "AutoModelForSequenceClassification"),
    "ForTokenClassification": ("token-classification", "AutoModelForTokenClassification"),
    "ForQuestionAnswering": ("question-answering", "AutoModelForQuestionAnswering"),
    "ForConditionalGeneration": ("text2text-generation", "AutoModelForSeq2SeqLM"),
    "EncoderModel": ("feature-extraction", "AutoModelForTextEncoding"),
    "Model": ("feature-extraction", "AutoModel"),
}
_DENSE_ARCHITECTURES = {"moe_bert": "BertForMaskedLM", "moe_t5": "T5ForConditionalGeneration"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PLACEHOLDER_REPO = "ORG/NAME"
UNRECORDED_TRAINING = (
    "Not recorded with the checkpoint. Describe the training data, objective, steps and hyperparameters here "
    "before publishing."
)


def task_of(architecture: str) -> tuple[str, str]:
    """`(pipeline_tag, Auto class name)` of a ptmoe task class name such as `"MoeBertForMaskedLM"`."""
    for suffix, task in _TASKS.items():
        if architecture.endswith(suffix):
            return task
    raise ValueError(f"no Hub task is known for the architecture {architecture!r}")


# --------------------------------------------------------------------------------------------------------------
# Evaluation results
# --------------------------------------------------------------------------------------------------------------
def as_eval_results(results: Iterable[EvalResult | Mapping[str, Any]] | None) -> list[EvalResult] | None:
    """Turn dicts with `EvalResult` fields (`task_type`, `dataset_type`, `dataset_name`, `metric_type`,
    `metric_value`, optional `dataset_split`, `metric_name`, ...) into `EvalResult`s; `None`/empty → `None`."""
    if not results:
        return None
    converted = []
    for result in results:
        if isinstance(result, EvalResult):
            converted.append(result)
            continue
        try:
            converted.append(EvalResult(**result))
        except TypeError as error:
            raise ValueError(
                f"invalid evaluation result {result!r}: {error}. Expected the fields of huggingface_hub.EvalResult "
                "(task_type, dataset_type, dataset_name, metric_type, metric_value, ...)"
            ) from None
    return converted


def load_eval_results(path: str | os.PathLike) -> dict[str, list[EvalResult]]:
    """Read `{model name: [result, ...]}` from a JSON file (results as in `as_eval_results`), or the results file
    written by `ptmoe evaluate` (`ptmoe.evaluation.run.results_to_eval_results`: one entry per suite, the mean over
    seeds).

    Args:
        path (`str` or `os.PathLike`): the JSON file.
    """
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not a JSON file ({error})") from None
    from .evaluation.run import is_results_file, results_to_eval_results

    if is_results_file(data):
        data = results_to_eval_results(data)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object mapping model names to lists of results")
    return {name: as_eval_results(results) or [] for name, results in data.items()}


# --------------------------------------------------------------------------------------------------------------
# Card inputs for a model folder that is not (exactly) a registry entry
# --------------------------------------------------------------------------------------------------------------
def _license_of(dense_source: str | None) -> str:
    for entry in zoo.MODEL_REGISTRY.values():
        if entry.dense_source == dense_source:
            return entry.dense_license
    return "other"


def _datasets_of(dense_source: str | None) -> tuple[str, ...]:
    for entry in zoo.MODEL_REGISTRY.values():
        if entry.dense_source == dense_source:
            return entry.datasets
    return ()


def entry_from_config(config, name: str) -> ZooEntry:
    """Describe a trained ptmoe checkpoint as a `ZooEntry`, taking every value from its config.

    The dense license is the registry's for a registered dense source, else `"other"` (the card then says to fill
    it in).

    Args:
        config: a `MoeBertConfig` / `MoeT5Config`.
        name (`str`): the name shown on the card.
    """
    family = config.model_type
    if family not in _DENSE_ARCHITECTURES:
        raise ValueError(
            f"{name}: model_type {family!r} is not a ptmoe family ({sorted(_DENSE_ARCHITECTURES)})"
        )
    architecture = (config.architectures or [None])[0] or (
        "MoeBertForMaskedLM" if family == "moe_bert" else "MoeT5ForConditionalGeneration"
    )
    values = config.to_dict()
    layer_fields = ("moe_layers",) if family == "moe_bert" else ("encoder_moe_layers", "decoder_moe_layers")
    dense_source = config.upcycled_from
    return ZooEntry(
        name=name,
        family=family,
        architecture=architecture,
        pipeline_tag=task_of(architecture)[0],
        dense_source=dense_source or "unknown",
        dense_architecture=_DENSE_ARCHITECTURES[family],
        dense_license=_license_of(dense_source),
        dense_config={k: values[k] for k in zoo.DENSE_CONFIG_KEYS[family] if k in values},
        tokenizer=dense_source or "unknown",
        num_experts=config.num_experts,
        num_experts_per_tok=config.num_experts_per_tok,
        router_type=config.router_type,
        moe_layers={k: values[k] for k in layer_fields},
        router_config={k: values[k] for k in zoo.ROUTER_CONFIG_KEYS if k in values},
        upcycling_method=config.upcycling_method or "unknown",
        upcycling_seed=config.upcycling_seed if config.upcycling_seed is not None else 0,
        hub_id=None,
        datasets=_datasets_of(dense_source),
        description=f"A ptmoe {architecture} checkpoint.",
        citations=(zoo.UPCYCLING_CITATION,),
    )


# --------------------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------------------
def card_data(entry: ZooEntry, eval_results: Sequence[EvalResult] | None = None) -> ModelCardData:
    """The Hub metadata of a card.

    Args:
        entry (`ZooEntry`): the variant.
        eval_results (`list[EvalResult]`, *optional*): turns into `model-index`; without it there is none.
    """
    tags = list(BASE_TAGS) + list(FAMILY_TAGS[entry.family])
    if entry.router_type == "switch":
        tags.append("switch-transformer")
    return ModelCardData(
        language="pt",
        license=entry.dense_license,
        base_model=entry.dense_source if _is_hub_id(entry.dense_source) else None,
        library_name=LIBRARY_NAME,
        pipeline_tag=entry.pipeline_tag,
        tags=tags,
        datasets=list(entry.datasets) or None,
        model_name=entry.name if eval_results else None,
        eval_results=list(eval_results) if eval_results else None,
    )


def _count_text(count: int) -> str:
    return f"{count / 1e6:,.1f}M ({count:,})" if count >= 100_000 else f"{count:,}"


def _is_hub_id(source: str | None) -> bool:
    return bool(source) and bool(_HUB_ID.match(source)) and not Path(source).exists()


def _source_link(entry: ZooEntry) -> str:
    """The dense source as a Hub link, or as plain code for a local path."""
    if _is_hub_id(entry.dense_source):
        return f"[`{entry.dense_source}`](https://huggingface.co/{entry.dense_source})"
    return f"`{entry.dense_source}`"


def _has_source(entry: ZooEntry) -> bool:
    return entry.dense_source not in ("", "unknown")


def _layer_indices(config) -> dict[str, list[int]]:
    if config.model_type == "moe_bert":
        return {"encoder": config.moe_layer_indices}
    return {"encoder": config.encoder_moe_layer_indices, "decoder": config.decoder_moe_layer_indices}


def _architecture_section(entry: ZooEntry, config, counts: Mapping[str, int]) -> str:
    is_t5 = entry.family == "moe_t5"
    hidden = config.d_model if is_t5 else config.hidden_size
    ffn = config.d_ff if is_t5 else config.intermediate_size
    expert_ffn = config.expert_intermediate_size or ffn
    heads = config.num_heads if is_t5 else config.num_attention_heads
    layers = (
        f"{config.num_layers} encoder + {config.num_decoder_layers} decoder"
        if is_t5
        else str(config.num_hidden_layers)
    )
    ffn_kind = "plain"
    if is_t5:
        ffn_kind = f"gated ({config.feed_forward_proj})" if config.is_gated_act else config.feed_forward_proj
    else:
        ffn_kind = config.hidden_act
    moe_layers = "; ".join(
        f"{stack}: {', '.join(map(str, indices)) or 'none'} ({len(indices)} of {total})"
        for (stack, indices), total in zip(
            _layer_indices(config).items(),
            [
                config.num_layers if is_t5 else config.num_hidden_layers,
                config.num_decoder_layers if is_t5 else 0,
            ],
            strict=False,
        )
    )
    rows = [
        ("Class", f"`{entry.architecture}` (ptmoe), model type `{entry.family}`"),
        ("Parameters, total (all experts)", _count_text(counts["total"])),
        ("Parameters active per token", _count_text(counts["active"])),
        (
            f"Dense source `{entry.dense_source}`" if _has_source(entry) else "Dense model of the same shape",
            _count_text(counts["dense"]),
        ),
        ("Hidden size / attention heads", f"{hidden} / {heads}"),
        ("Layers", layers),
        ("Feed-forward", f"{ffn} wide, {ffn_kind}; each expert is {expert_ffn} wide"),
        ("Vocabulary", f"{config.vocab_size:,} (the dense source's tokenizer, `{entry.tokenizer}`)"),
        ("MoE layers (0-based)", moe_layers),
        ("Experts per MoE layer / used per token", f"{config.num_experts} / {config.num_experts_per_tok}"),
    ]
    if getattr(config, "num_shared_experts", 0):
        rows.append(("Shared (always active) experts", str(config.num_shared_experts)))
    table = "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    return (
        f"{table}\n\nEvery MoE layer replaces the dense feed-forward network by {config.num_experts} experts of the "
        "same shape and a router. *Total* counts every expert; *active* counts what one token uses: the shared "
        f"(attention, embedding, norm) weights, the routers and {config.num_experts_per_tok} expert(s) per MoE "
        "layer. Compute per token follows the active count; memory follows the total. Counts are computed by "
        "`ptmoe.count_parameters` on the architecture built on the `meta` device."
    )


def _routing_section(config) -> str:
    losses = (
        f"Training adds the load-balancing loss (coefficient {config.router_aux_loss_coef}) and the router z-loss "
        f"(coefficient {config.router_z_loss_coef}) to the task loss."
    )
    if config.router_type == "switch":
        return (
            "Switch routing (Fedus et al. 2022): a router (one linear map, computed in fp32) scores the experts and "
            "each token goes to its single best expert; the expert output is scaled by that expert's router "
            f"probability. Each expert takes at most {config.capacity_factor} × (tokens ÷ experts) tokens of a "
            f"sequence in training and {config.eval_capacity_factor} × at evaluation; a token over capacity skips "
            "the MoE layer and is carried by the residual connection. "
            f"Router input jitter noise in training: {config.router_jitter_noise}. {losses}"
        )
    if config.router_type == "hash":
        return (
            "Hash routing (Roller et al. 2021): each token id is assigned to fixed experts by a deterministic table; "
            "the router has no trainable parameters and no routing loss."
        )
    if config.router_type == "expert_choice":
        capacity = getattr(config, "expert_capacity_factor", None) or config.num_experts_per_tok
        decoder = getattr(config, "decoder_router_type", None)
        return (
            "Expert-choice routing (Zhou et al. 2022) in the encoder: in every sequence each of the "
            f"{config.num_experts} experts takes the {capacity} × (tokens ÷ experts) tokens it scores highest (a "
            "router computed in fp32) and weights its output by that score, so every expert does the same work and a "
            f"token uses {capacity} experts on average (possibly none: the residual connection carries it). "
            + (f"The decoder routes with `{decoder}` token choice. " if decoder else "")
            + f"Training adds the router z-loss (coefficient {config.router_z_loss_coef}); no load-balancing loss is "
            "needed."
        )
    if config.router_type == "hierarchical":
        groups, per_tok = config.router_groups, config.num_groups_per_tok
        return (
            f"Hierarchical routing (Jordan & Jacobs 1994): the {config.num_experts} experts form {groups} groups; a "
            f"group gate picks {per_tok} group(s) per token, then an expert gate picks "
            f"{config.num_experts_per_tok // per_tok} expert(s) inside each, and an expert's output is weighted by "
            f"the product of the two gates (both computed in fp32). {losses} Both are averaged over the two levels."
        )
    noisy = " with learned Gaussian noise on the router logits in training (Shazeer et al. 2017)" * (
        config.router_type == "noisy_topk"
    )
    renorm = (
        "renormalised to sum to 1" if getattr(config, "norm_topk_prob", True) else "as softmax probabilities"
    )
    return (
        f"Top-{config.num_experts_per_tok} token-choice routing{noisy}: a router (one linear map, computed in fp32) "
        f"scores the {config.num_experts} experts, each token uses its {config.num_experts_per_tok} best experts, "
        f"and their outputs are mixed with the router weights {renorm}. No token is dropped. {losses}"
    )


_METHODS = {
    "copy": "every expert starts as an exact copy of the dense feed-forward network it replaces",
    "noise": "every expert starts as a copy of the dense feed-forward network plus small Gaussian noise, so that "
    "experts differ from the first step",
    "drop": "every expert starts as a copy of the dense feed-forward network in which a random part of the "
    "weights is re-initialised (Drop-Upcycling), so that experts diversify",
    "partition": "the dense feed-forward network's hidden units are split between the experts, each expert "
    "taking a slice",
}


def _upcycling_section(entry: ZooEntry, config, training: str | None) -> str:
    method = _METHODS.get(entry.upcycling_method, f"method `{entry.upcycling_method}`")
    kwargs = "".join(
        f"    {k}={json.dumps(v) if isinstance(v, str) else repr(v)},\n"
        for k, v in entry.moe_settings().items()
    )
    reproduce = (
        "```python\nimport ptmoe\n\n"
        f'model = ptmoe.upcycle(\n    "{entry.dense_source}",\n{kwargs}'
        f'    method="{entry.upcycling_method}",\n    seed={entry.upcycling_seed},\n)\n```'
    )
    if entry.name in zoo.MODEL_REGISTRY:
        reproduce = (
            "```python\nimport ptmoe\n\n"
            f'model = ptmoe.create_model("{entry.name}", pretrained=True)  # upcycles once, then loads from the cache\n'
            "```\n\nwhich runs\n\n" + reproduce
        )
    if entry.upcycling_method == "copy" and config.router_type == "topk" and config.norm_topk_prob:
        start = (
            "Identical experts mixed with weights that sum to 1 give the dense output, so the upcycled model starts "
            "out computing exactly the dense function."
        )
    elif config.router_type == "switch":
        start = (
            "Under Switch routing an expert's output is scaled by its router probability, well below 1 with a fresh "
            "router, so the upcycled model starts out away from the dense function and needs training to recover."
        )
    else:
        start = ""
    trained = training or (
        "Not trained after upcycling: the weights are the dense source's, rearranged into experts, and the routers "
        "are freshly initialised. Continue pretraining (or fine-tune) before relying on the routing."
    )
    if not _has_source(entry):
        return (
            "This checkpoint records no upcycling provenance (`upcycled_from` is not set in its config): it was "
            f"not made by `ptmoe.upcycle`, or its config lost the record.\n\n**Training.** {trained}"
        )
    return (
        f"Sparse upcycling (Komatsuzaki et al. 2023) of {_source_link(entry)}: embeddings, attention, norms and "
        f"the dense layers are copied unchanged; in each MoE layer {method}. Routers are initialised fresh (`router_init`), seed {entry.upcycling_seed}. {start}\n\n"
        f"{reproduce}\n\n**Training.** {trained}"
    )


def _usage_section(entry: ZooEntry, config, repo_id: str | None) -> str:
    _, auto_class = task_of(entry.architecture)
    repo = repo_id or entry.hub_id
    is_t5 = entry.family == "moe_t5"
    if repo is None and entry.name in zoo.MODEL_REGISTRY:
        with_ptmoe = (
            "```bash\npip install ptmoe\n```\n\n```python\nimport ptmoe\nfrom transformers import AutoTokenizer\n\n"
            f'tokenizer = AutoTokenizer.from_pretrained("{entry.tokenizer}")\n'
            f'model = ptmoe.create_model("{entry.name}", pretrained=True)\n```\n\n'
            "This checkpoint is not published yet; once it is, it also loads with the Auto classes below."
        )
        repo = _PLACEHOLDER_REPO
    else:
        repo = repo or _PLACEHOLDER_REPO
        with_ptmoe = (
            "```bash\npip install ptmoe\n```\n\n```python\nimport ptmoe  # registers the MoE classes with transformers\n"
            f"from transformers import {auto_class}, AutoTokenizer\n\n"
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")\n'
            f'model = {auto_class}.from_pretrained("{repo}")\n```'
        )
    if entry.pipeline_tag == "fill-mask":
        example = (
            'inputs = tokenizer("Tinha uma [MASK] no meio do caminho.", return_tensors="pt")\n'
            "logits = model(**inputs).logits"
        )
    elif is_t5:
        example = (
            'inputs = tokenizer("O Brasil é o maior país da <extra_id_0>.", return_tensors="pt")\n'
            "output_ids = model.generate(**inputs, max_new_tokens=10)"
        )
    else:
        example = 'outputs = model(**tokenizer("Um exemplo em português.", return_tensors="pt"))'
    remote = (
        "```python\n"
        f"from transformers import {auto_class}, AutoTokenizer\n\n"
        f'tokenizer = AutoTokenizer.from_pretrained("{repo}")\n'
        f'model = {auto_class}.from_pretrained("{repo}", trust_remote_code=True)\n'
        f"{example}\n```\n\n"
        "The modeling code (`modeling_*.py`, `configuration_*.py` and the modules they import: `moe*.py`, `routers.py`, "
        "`router_losses.py`, `input_checks.py`) ships in the repository and needs "
        "only torch and transformers. Read it before trusting it, and pin `revision=` to a commit you have read."
    )
    expert_modules = "wi_0|wi_1|wo" if getattr(config, "is_gated_act", False) else "wi|wo"
    head = "lm_head" if is_t5 else "cls"
    quantized = (
        "```python\nimport torch\nfrom transformers import BitsAndBytesConfig\n\n"
        'bnb = BitsAndBytesConfig(\n    load_in_4bit=True,\n    bnb_4bit_quant_type="nf4",\n'
        "    bnb_4bit_compute_dtype=torch.bfloat16,\n"
        f'    llm_int8_skip_modules=["{head}"],  # keep the output head in full precision\n)\n'
        f'model = {auto_class}.from_pretrained("{repo}", trust_remote_code=True, quantization_config=bnb)\n```\n\n'
        "Experts are `nn.Linear` layers, so bitsandbytes quantizes them; routers are plain fp32 parameters and "
        "are never quantized. With ptmoe installed, `quantization_config=ptmoe.bnb_4bit_config()` gives the same "
        "NF4 settings, and `ptmoe.prepare_qlora_model` prepares the 4-bit model for QLoRA."
    )
    lora = (
        "```python\nfrom peft import LoraConfig, get_peft_model\n\n"
        "lora = LoraConfig(\n    r=8,\n    lora_alpha=16,\n"
        f'    target_modules=r".*\\.experts\\.\\d+\\.({expert_modules})",  # one adapter per expert\n)\n'
        "model = get_peft_model(model, lora)\n```\n\n"
        "With ptmoe installed, `ptmoe.expert_lora_config(model, r=8)` builds this configuration and also selects "
        "experts (`experts=`, e.g. from `ptmoe.select_experts`), sets per-expert ranks and can train the routers."
    )
    return (
        f"### With ptmoe\n\n{with_ptmoe}\n\n### With transformers only (`trust_remote_code=True`)\n\n{remote}\n\n"
        f"### 4-bit (bitsandbytes)\n\n{quantized}\n\n### LoRA per expert (PEFT)\n\n{lora}"
    )


def _evaluation_section(eval_results: Sequence[EvalResult] | None) -> str:
    if not eval_results:
        return (
            "No evaluation results yet. They are added to this card (and to its `model-index` metadata) with "
            "`ptmoe cards --eval-results results.json`."
        )
    from .evaluation.suites import anchors_for

    rows = []
    for r in eval_results:
        # Published numbers of dense models on the same suite, printed beside ours (never in `model-index`).
        anchors = anchors_for(r.dataset_type, r.dataset_config, r.metric_type)
        published = ", ".join(f"{a.model} {a.value:g}" for a in anchors) or "–"
        rows.append(
            f"| {r.task_name or r.task_type} | {r.dataset_name} | {r.dataset_split or ''} | "
            f"{r.metric_name or r.metric_type} | {r.metric_value} | {published} |"
        )
    return (
        "| Task | Dataset | Split | Metric | Value | Published (dense models) |\n|---|---|---|---|---|---|\n"
        + "\n".join(rows)
    )


def _limitations_section(entry: ZooEntry, config) -> str:
    points = [
        "All experts must be in memory: memory follows the *total* parameter count, while compute per token "
        "follows the *active* count.",
        "Upcycled experts start identical or nearly so; expert specialisation only appears with further training, "
        "and routing statistics of an untrained checkpoint say little.",
        "The language competence, domain coverage and biases are the dense source's: its pretraining corpora "
        f"({', '.join(entry.datasets) or 'see the dense source card'}) are web text, mostly Brazilian Portuguese; "
        "European and African Portuguese and informal registers are less represented.",
    ]
    if config.router_type == "switch":
        points.append(
            "With Switch routing, tokens over an expert's capacity skip that MoE layer, so outputs can depend on "
            "how the other tokens of the same sequence are routed."
        )
    points.append("Loading without ptmoe runs code from the repository (`trust_remote_code=True`).")
    return "\n".join(f"- {point}" for point in points)


def _license_section(entry: ZooEntry) -> str:
    if entry.dense_license == "other":
        return (
            "The dense source of this checkpoint is not in the ptmoe registry, so its license is unknown here: "
            "set `license:` in the metadata to the dense source's license before publishing. The modeling files "
            "are ptmoe code (Apache-2.0)."
        )
    return (
        f"The weights derive from {_source_link(entry)}, released "
        f"under the `{entry.dense_license}` license, and are distributed under the same license. The license was "
        "copied from the dense source's Hub page when the registry entry was written: re-check it there before "
        "publishing or reusing. The modeling files (`modeling_*.py`, `configuration_*.py`, `moe*.py`, `routers.py`, "
        "`router_losses.py`, `input_checks.py`) are ptmoe code under Apache-2.0."
    )


def _status(entry: ZooEntry, repo_id: str | None) -> str:
    if not (repo_id or entry.hub_id) and zoo.MODEL_REGISTRY.get(entry.name) != entry:
        return "**Status:** a trained ptmoe checkpoint prepared for the Hub with `hub_upload`."
    if repo_id or entry.hub_id:
        return f"**Status:** published as [`{repo_id or entry.hub_id}`](https://huggingface.co/{repo_id or entry.hub_id})."
    return (
        "**Status:** not published yet (`hub_id` is `None` in the ptmoe registry). This card describes the "
        "registered variant; `ptmoe.create_model(name, pretrained=True)` builds it by upcycling the dense source."
    )


def _template(template_path: str | os.PathLike | None) -> string.Template:
    path = Path(template_path) if template_path is not None else TEMPLATE_PATH
    if not path.is_file():
        raise FileNotFoundError(
            f"model card template {path} not found: run from a ptmoe source checkout (model_cards/TEMPLATE.md) "
            "or pass `template_path=`"
        )
    return string.Template(path.read_text())


def render_card(
    entry: ZooEntry | str,
    eval_results: Iterable[EvalResult | Mapping[str, Any]] | None = None,
    *,
    config=None,
    repo_id: str | None = None,
    training: str | None = None,
    template_path: str | os.PathLike | None = None,
    energy: Any = None,
) -> str:
    r"""
    Render the model card (README.md text) of a zoo variant or of a trained checkpoint.

    Args:
        entry (`ZooEntry` or `str`): a registry entry or name (or one built by `entry_from_config`).
        eval_results (`list[EvalResult | dict]`, *optional*): evaluation results; they fill the Evaluation
            section and the `model-index` metadata. Without them the card has no `model-index`.
        config (*optional*): the model config to describe; defaults to the entry's full-size config.
        repo_id (`str`, *optional*): the Hub repository the card is for (loading snippets); defaults to the
            entry's `hub_id`.
        training (`str`, *optional*): how the checkpoint was trained after upcycling (Markdown).
        template_path (`str`, *optional*): defaults to `model_cards/TEMPLATE.md` of the ptmoe checkout.
        energy (`ptmoe.energy.EnergyReport` or its `to_dict()`, *optional*): training energy and CO₂e (codecarbon),
            added to the training paragraph.
    """
    entry = zoo.get_model_info(entry) if isinstance(entry, str) else entry
    if energy is not None:
        from .energy import EnergyReport

        if isinstance(energy, Mapping):
            energy = EnergyReport(**{k: v for k, v in energy.items() if k != "cpu_power_mode_meaning"})
        training = f"{training or UNRECORDED_TRAINING}\n\n{energy.markdown()}"
    results = as_eval_results(eval_results)
    counts = zoo.parameter_counts(entry, config=config)  # cached for a registered entry at full size
    config = config if config is not None else zoo.create_config(entry.name)
    citations = "\n".join(
        f"- {c}" for c in (*entry.citations, "ptmoe: Mixture-of-Experts models for Portuguese.")
    )
    origin = f"upcycled from {_source_link(entry)} " if _has_source(entry) else ""
    summary = (
        f"{entry.description} A sparse Mixture-of-Experts (MoE) model {origin}built with ptmoe: "
        f"{_count_text(counts['total'])} parameters in total, {_count_text(counts['active'])} active per token."
    )
    if entry.notes:
        summary += f"\n\n> **Provenance notes.** {entry.notes}"
    fields = {
        "metadata": card_data(entry, results).to_yaml(),
        "title": entry.name,
        "summary": summary,
        "status": _status(entry, repo_id),
        "architecture": _architecture_section(entry, config, counts),
        "routing": _routing_section(config),
        "upcycling": _upcycling_section(entry, config, training),
        "usage": _usage_section(entry, config, repo_id),
        "evaluation": _evaluation_section(results),
        "limitations": _limitations_section(entry, config),
        "license": _license_section(entry),
        "citations": citations,
    }
    try:
        return _template(template_path).substitute(fields)
    except (KeyError, ValueError) as error:
        raise ValueError(f"model card template: unknown or malformed placeholder ({error})") from None


def card_for_model_dir(
    model_dir: str | os.PathLike,
    *,
    zoo_name: str | None = None,
    repo_id: str | None = None,
    eval_results: Iterable[EvalResult | Mapping[str, Any]] | None = None,
    training: str | None = None,
    template_path: str | os.PathLike | None = None,
    license: str | None = None,
    energy: Any = None,
) -> str:
    """Render the card of a saved ptmoe model folder (what `hub_upload prepare` writes when no card is given).

    The variant is, in order: `zoo_name`; the `zoo_name` recorded in the folder's `ptmoe_zoo.json` (written by
    `create_model(pretrained=True)`); otherwise an entry built from the folder's config (`entry_from_config`).
    Architecture, counts and task always come from the folder's own config.

    Args:
        model_dir (`str` or `os.PathLike`): the folder (with `config.json`).
        zoo_name (`str`, *optional*): the registry name this checkpoint is a version of.
        repo_id, eval_results, training, template_path, energy: as in `render_card`; without `energy`, the
            folder's `energy.json` (written by the training scripts with `--report_to codecarbon`) is used if present.
        license (`str`, *optional*): the Hub licence of the checkpoint, when its dense source is not registered
            (otherwise the card says "other" and does not validate).
    """
    from transformers import AutoConfig

    from . import auto  # noqa: F401  (registers the ptmoe configs with AutoConfig)

    model_dir = Path(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    provenance = model_dir / "ptmoe_zoo.json"
    if zoo_name is None and provenance.is_file():
        # A folder written by `create_model(pretrained=True)`: the upcycled variant itself, not trained since.
        zoo_name = json.loads(provenance.read_text()).get("zoo_name")
    elif training is None:
        training = UNRECORDED_TRAINING
    name = repo_id.split("/")[-1] if repo_id else model_dir.resolve().name
    if zoo_name is not None:
        entry = zoo.get_model_info(zoo_name)
        architecture = (config.architectures or [entry.architecture])[0]
        entry = replace(entry, architecture=architecture, pipeline_tag=task_of(architecture)[0], hub_id=None)
    else:
        entry = entry_from_config(config, name)
    if license is not None:
        entry = replace(entry, dense_license=license)
    if energy is None and (model_dir / "energy.json").is_file():
        energy = json.loads((model_dir / "energy.json").read_text(encoding="utf-8"))
    return render_card(
        entry,
        eval_results,
        config=config,
        repo_id=repo_id,
        training=training,
        template_path=template_path,
        energy=energy,
    )


def write_cards(
    out_dir: str | os.PathLike = "model_cards",
    names: Iterable[str] | None = None,
    eval_results: Mapping[str, Iterable[EvalResult | Mapping[str, Any]]] | None = None,
    template_path: str | os.PathLike | None = None,
) -> list[Path]:
    """Write `<out_dir>/<name>/README.md` for every registered variant (or `names`) and validate each card.

    Args:
        out_dir (`str` or `os.PathLike`, defaults to `"model_cards"`): where the cards go.
        names (`list[str]`, *optional*): a subset of `list_models()`.
        eval_results (`dict[str, list]`, *optional*): results per model name (see `load_eval_results`).
        template_path (`str`, *optional*): as in `render_card`.

    Returns:
        The paths written.
    """
    eval_results = dict(eval_results or {})
    unknown = sorted(set(eval_results) - set(zoo.MODEL_REGISTRY))
    if unknown:
        raise zoo.UnknownModelError(f"evaluation results for unregistered models: {', '.join(unknown)}")
    # Render and validate every card before writing any: a bad name or card leaves the folder as it was.
    cards = {}
    for name in names if names is not None else zoo.list_models():
        cards[name] = render_card(name, eval_results.get(name), template_path=template_path)
        validate_card(cards[name])
    written = []
    for name, text in cards.items():
        path = Path(out_dir) / name / "README.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


def write_folder_card(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    eval_results: Mapping[str, Iterable[EvalResult | Mapping[str, Any]]] | None = None,
    eval_results_path: str | os.PathLike | None = None,
    license: str | None = None,
) -> Path:
    """Render, validate and write the card of a trained folder to `<out_dir>/<name>/README.md`.

    Args:
        model_dir (`str`): the ptmoe folder (with `config.json`).
        out_dir (`str`): where the card goes.
        eval_results (`dict[str, list]`, *optional*): results per model name (`load_eval_results`); the entry named
            like the folder is used, or the only entry when there is one.
        eval_results_path (`str`, *optional*): the results file (named in errors).
        license (`str`, *optional*): as in `card_for_model_dir`.
    """
    name = Path(model_dir).resolve().name
    results = None
    if eval_results:
        if name in eval_results:
            results = eval_results[name]
        elif len(eval_results) == 1:
            name, results = next(iter(eval_results.items()))
        else:
            raise ValueError(
                f"{eval_results_path or 'the results'} holds results for {sorted(eval_results)}, none named {name!r}"
            )
    if not (Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"--model-dir {model_dir}: no config.json there (not a saved model folder)")
    if license is not None and license not in HUB_LICENSES:
        raise ValueError(
            f"--license {license!r} is not a Hub licence identifier (e.g. apache-2.0, mit, cc-by-4.0)"
        )
    text = card_for_model_dir(model_dir, eval_results=results, license=license)
    validate_card(text)
    path = Path(out_dir) / name / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --------------------------------------------------------------------------------------------------------------
# Validation (offline)
# --------------------------------------------------------------------------------------------------------------
def validate_card(card: str | os.PathLike | ModelCard) -> ModelCard:
    """Check a model card offline and return it parsed; raise `ValueError` listing every problem.

    Checks: the YAML block parses with `huggingface_hub.ModelCard` (strict: metadata errors are errors); `language`
    is `pt`; `license` is a Hub license identifier; `library_name` is set; `pipeline_tag` is a Hub task;
    `base_model`, when present, is a Hub id; the tags include the ptmoe tags; `model-index`, when present, parses
    back into evaluation results; every section of the template is present.

    Args:
        card (`str`, `os.PathLike` or `ModelCard`): card text, a README.md path, or a parsed card.
    """
    if isinstance(card, ModelCard):
        parsed = card
    else:
        text = Path(card).read_text() if isinstance(card, os.PathLike) else card
        if not text.lstrip().startswith("---"):
            raise ValueError("model card has no YAML metadata block (it must start with '---')")
        try:
            parsed = ModelCard(text)
        except Exception as error:  # yaml errors, invalid model-index, non-dict metadata
            raise ValueError(f"model card metadata does not parse: {error}") from None
    data = parsed.data.to_dict()
    problems = []
    if data.get("language") not in ("pt", ["pt"]):
        problems.append(f"language must be 'pt', got {data.get('language')!r}")
    if data.get("license") not in HUB_LICENSES:
        problems.append(f"license {data.get('license')!r} is not a Hub license identifier")
    if data.get("license") == "other" and not data.get("license_name"):
        problems.append("license is 'other': set the dense source's license before publishing")
    if not data.get("library_name"):
        problems.append("library_name is missing")
    if data.get("pipeline_tag") not in HUB_PIPELINE_TAGS:
        problems.append(f"pipeline_tag {data.get('pipeline_tag')!r} is not a Hub task")
    base_model = data.get("base_model")
    for model_id in [base_model] if isinstance(base_model, str) else base_model or []:
        if not _HUB_ID.match(model_id):
            problems.append(f"base_model {model_id!r} is not a Hub model id")
    missing_tags = [
        tag
        for tag in ("moe", "mixture-of-experts", "upcycled", "portuguese")
        if tag not in (data.get("tags") or [])
    ]
    if missing_tags:
        problems.append(f"tags lack {missing_tags}")
    if "model-index" in data:
        try:
            model_index_to_eval_results(data["model-index"])
        except Exception as error:
            problems.append(f"model-index does not parse: {error}")
    headings = set(re.findall(r"^## (.+?)\s*$", parsed.text, flags=re.MULTILINE))
    missing_sections = [section for section in SECTIONS if section not in headings]
    if missing_sections:
        problems.append(f"sections missing: {missing_sections}")
    if problems:
        raise ValueError("invalid model card: " + "; ".join(problems))
    return parsed


__all__ = [
    "LIBRARY_NAME",
    "TEMPLATE_PATH",
    "as_eval_results",
    "card_data",
    "card_for_model_dir",
    "entry_from_config",
    "load_eval_results",
    "render_card",
    "task_of",
    "validate_card",
    "write_cards",
    "write_folder_card",
]
