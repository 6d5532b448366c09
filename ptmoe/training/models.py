"""The tokenizer and the model: `load_tokenizer`, `load_config`, `load_model` (a ptmoe checkpoint, or a dense one
upcycled on the fly; full fine-tuning, LoRA or QLoRA), `add_expert_lora` (LoRA on chosen experts) and
`resolve_max_length` (the sequence length the model accepts).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from .arguments import ModelArguments, parse_expert_list
from .labels import LabelMapping

logger = logging.getLogger(__name__)

TASKS = ("masked-lm", "span-corruption", "sequence-classification", "token-classification", "seq2seq")
_MOE_MODEL_TYPES = ("moe_bert", "moe_t5")


def load_tokenizer(model_args: ModelArguments):
    """`AutoTokenizer` from `--tokenizer_name` or `--model_name_or_path`, with a clear error when missing."""
    from transformers import AutoTokenizer

    name = model_args.tokenizer_name or model_args.model_name_or_path
    try:
        return AutoTokenizer.from_pretrained(name, cache_dir=model_args.cache_dir)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"Could not load a tokenizer from {name!r}: {str(error).splitlines()[0]}. Save the tokenizer with the "
            "model (tokenizer.save_pretrained) or pass --tokenizer_name."
        ) from None


def _auto_class(task: str, model_type: str):
    import transformers

    is_t5 = "t5" in model_type
    if task in ("seq2seq", "span-corruption") or (task == "masked-lm" and is_t5):
        if not is_t5:
            raise ValueError(
                f"Task {task!r} needs an encoder-decoder (MoE-T5) checkpoint, got model_type {model_type!r}"
            )
        return transformers.AutoModelForSeq2SeqLM
    if is_t5:
        raise ValueError(
            f"Task {task!r} needs an encoder (MoE-BERT) checkpoint, got model_type {model_type!r}"
        )
    return {
        "masked-lm": transformers.AutoModelForMaskedLM,
        "sequence-classification": transformers.AutoModelForSequenceClassification,
        "token-classification": transformers.AutoModelForTokenClassification,
    }[task]


def load_config(model_args: ModelArguments):
    """The checkpoint's config (`AutoConfig`), with a clear error for a path or Hub id that cannot be loaded."""
    from transformers import AutoConfig

    import ptmoe  # noqa: F401  (registers the ptmoe model types)

    try:
        return AutoConfig.from_pretrained(model_args.model_name_or_path, cache_dir=model_args.cache_dir)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"Could not load --model_name_or_path {model_args.model_name_or_path!r}: "
            f"{str(error).splitlines()[0]}. Pass a folder with config.json or a reachable Hub id."
        ) from None


def load_model(model_args: ModelArguments, task: str, label_mapping: LabelMapping | None = None):
    """Load the model for `task`, upcycling a dense checkpoint and adding (Q)LoRA adapters as asked.

    Args:
        model_args (`ModelArguments`): checkpoint, upcycling and tuning options.
        task (`str`): one of `TASKS`. `"masked-lm"` loads a MoE-BERT MLM head or, for a MoE-T5 checkpoint, the
            seq2seq model used for span corruption.
        label_mapping (`LabelMapping`, *optional*): label set of classification tasks (sizes the head).

    Returns:
        A `PreTrainedModel`, or a `peft.PeftModel` for `--tuning lora|qlora`.

    Raises:
        `ValueError`: an unloadable checkpoint, a dense checkpoint without `--upcycle_experts`, a task the
        architecture cannot do, or QLoRA with on-the-fly upcycling.
    """
    import ptmoe  # registers the Auto classes

    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    config = load_config(model_args)
    auto_class = _auto_class(task, config.model_type)
    kwargs: dict[str, Any] = {"cache_dir": model_args.cache_dir}
    if label_mapping is not None:
        kwargs.update(label_mapping.model_kwargs())
    if model_args.ignore_mismatched_sizes:
        kwargs["ignore_mismatched_sizes"] = True
    if model_args.expert_dropout is not None:  # a config override, for loading and for upcycling alike
        kwargs["expert_dropout"] = model_args.expert_dropout

    if config.model_type not in _MOE_MODEL_TYPES:
        if model_args.upcycle_experts is None:
            raise ValueError(
                f"{model_args.model_name_or_path!r} is a dense {config.model_type!r} checkpoint: pass "
                "--upcycle_experts N to upcycle it into a MoE model on the fly, or start from a ptmoe checkpoint."
            )
        if model_args.tuning == "qlora":
            raise ValueError(
                "QLoRA loads the checkpoint in 4 bits and cannot upcycle on the fly: upcycle first (`ptmoe upcycle` "
                "or `ptmoe.upcycle(...).save_pretrained(folder)`), then pass that folder with --tuning qlora."
            )
        expert_dropout = kwargs.pop("expert_dropout", None)  # a MoE field: not for the dense config
        dense, loading_info = auto_class.from_pretrained(
            model_args.model_name_or_path, output_loading_info=True, **kwargs
        )
        upcycle_kwargs: dict[str, Any] = {
            "num_experts": model_args.upcycle_experts,
            "num_experts_per_tok": model_args.upcycle_experts_per_tok,
        }
        if expert_dropout is not None:
            upcycle_kwargs["expert_dropout"] = expert_dropout
        if model_args.upcycle_method is not None:
            upcycle_kwargs["method"] = model_args.upcycle_method
        model = ptmoe.upcycle(dense, progress=False, **upcycle_kwargs)
        logger.info("Upcycled %s into %d experts", model_args.model_name_or_path, model_args.upcycle_experts)
    else:
        if model_args.tuning == "qlora":
            kwargs["quantization_config"] = ptmoe.bnb_4bit_config()
        model, loading_info = auto_class.from_pretrained(
            model_args.model_name_or_path, output_loading_info=True, **kwargs
        )

    # ptmoe losses are means over the batch (task loss + router losses), not sums to be divided by the number of
    # label tokens. Without this, the Trainer sees `**kwargs` in `forward`, passes `num_items_in_batch`, stops
    # dividing the loss by the gradient-accumulation steps and multiplies it by the number of processes (DDP).
    if not hasattr(type(model), "accepts_loss_kwargs"):
        model.accepts_loss_kwargs = False
    if model_args.tuning == "full":
        return model
    # Modules the checkpoint did not have (a new pooler or head) start random: with LoRA they must be trained and
    # saved with the adapter, or the adapter could not be reloaded onto the base checkpoint.
    new_modules = new_module_names(model, loading_info)
    return add_expert_lora(model, model_args, new_modules)


def new_module_names(model, loading_info: dict) -> list[str]:
    """Names of `model`'s modules whose weights the checkpoint lacked (`missing_keys` of `from_pretrained`'s loading
    info): a new pooler or head, which starts random and must be trained and saved beside a LoRA adapter."""
    module_names = {name for name, _ in model.named_modules()}
    return sorted({key.rsplit(".", 1)[0] for key in loading_info.get("missing_keys", [])} & module_names)


def add_expert_lora(model, model_args: ModelArguments, new_modules: Sequence[str] = ()):
    """Wrap `model` with LoRA adapters on its experts (`ptmoe.expert_lora_config`; QLoRA: `ptmoe.prepare_qlora_model`).

    The task head (e.g. `classifier`) and `new_modules` (modules absent from the checkpoint, such as a new
    pooler) are trained in full next to the adapters and saved with them; routers stay frozen.
    `--lora_experts 0,3` adapts experts 0 and 3 of every MoE layer.
    """
    import peft

    import ptmoe

    experts = parse_expert_list(model_args.lora_experts)
    if experts != "all":
        experts = {layer.key: experts for layer in ptmoe.moe_layers(model)}
    lora_kwargs = {
        "r": model_args.lora_r,
        "alpha": model_args.lora_alpha,
        "experts": experts,
        "dropout": model_args.lora_dropout,
    }
    if new_modules:
        lora_kwargs["modules_to_save"] = list(new_modules)
        logger.info(
            "Trained in full and saved with the adapter (not in the checkpoint): %s", list(new_modules)
        )
    if model_args.tuning == "qlora":
        model = ptmoe.prepare_qlora_model(model, **lora_kwargs)
    else:
        model = peft.get_peft_model(model, ptmoe.expert_lora_config(model, **lora_kwargs))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info(
        "LoRA: %d trainable parameters of %d (%.2f%%)", trainable, total, 100 * trainable / max(total, 1)
    )
    return model


def resolve_max_length(requested: int, model, tokenizer, flag: str = "--max_seq_length") -> int:
    """`requested`, lowered to what the model's position embeddings and the tokenizer accept (with a warning).

    BERT-style models fail deep inside the embeddings on longer inputs; T5's relative positions have no limit.
    """
    limits = []
    config = getattr(model, "config", None)
    max_positions = getattr(config, "max_position_embeddings", None)
    if isinstance(max_positions, int) and max_positions > 0:
        limits.append(max_positions)
    model_max_length = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max_length, int) and 0 < model_max_length < 1_000_000:  # "no limit" is stored as 1e30
        limits.append(model_max_length)
    limit = min(limits, default=requested)
    if requested > limit:
        logger.warning("%s %d is above what the model accepts (%d): using %d", flag, requested, limit, limit)
        return limit
    return requested
