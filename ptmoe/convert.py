"""Import transformers' Switch Transformers checkpoints (google/switch-base-8 … switch-c-2048) as MoE-T5.

The converted model computes the same function: every weight keeps its value, only names change, through one
explicit key map (below) with shape checks. The source format is an argument (a `SwitchTransformers*` model or a
folder/Hub id holding one), never guessed from key names::

    transformers SwitchTransformers                                  ptmoe MoE-T5
    ...block.{i}.layer.{f}.mlp.router.classifier.weight      →      ...block.{i}.layer.{f}.moe.router.weight
    ...block.{i}.layer.{f}.mlp.experts.expert_{j}.wi/wo.weight →    ...block.{i}.layer.{f}.moe.experts.{j}.wi/wo.weight
    ...block.{i}.layer.{f}.mlp.wi/wo.weight (dense layers)   →      ...block.{i}.layer.{f}.DenseReluDense.wi/wo.weight
    attention, layer norms, shared, embed_tokens, lm_head    →      same names (MoE-T5 keeps T5's layout)

Expert capacity. transformers' `expert_capacity` is an absolute number of tokens each expert accepts per sequence,
served in sequence order; it becomes MoE-T5's `expert_capacity` unchanged (`router_type="switch"`, top-1, the
capacity factors unused). One difference: transformers counts padding tokens against the capacity and in the router
losses, MoE-T5 does not. With right padding (the tokenizer default) the real tokens' routing and outputs are
identical; with left padding, padding can take capacity from real tokens in transformers but not here; router
losses always differ when there is padding. Routers compute in fp32 whatever `router_dtype` says.

Losses. MoE-T5 adds `router_aux_loss_coef · aux + router_z_loss_coef · z` whenever `labels` are given (transformers'
Switch only with `output_router_logits=True`). The z-loss is the same quantity; the load-balancing loss is Switch
eq. 4 over all tokens of the batch per MoE layer, then averaged over layers, where transformers computes it per
sequence over all layers at once (the two agree for one sequence and one MoE layer per stack).
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers import (
    PreTrainedConfig,
    PreTrainedModel,
    SwitchTransformersConfig,
    SwitchTransformersEncoderModel,
    SwitchTransformersForConditionalGeneration,
    SwitchTransformersModel,
)

from .models.configuration_moe_t5 import MoeT5Config
from .models.modeling_moe_t5 import (
    MoeT5EncoderModel,
    MoeT5ForConditionalGeneration,
    MoeT5Model,
    MoeT5PreTrainedModel,
)
from .models.moe import check_local_checkpoint
from .outputs import check_output_dir, staged_output_dir

# target name → (MoE-T5 class, the SwitchTransformers class loaded from a path, accepted source classes)
TARGETS: dict[
    str, tuple[type[MoeT5PreTrainedModel], type[PreTrainedModel], tuple[type[PreTrainedModel], ...]]
] = {
    "conditional_generation": (
        MoeT5ForConditionalGeneration,
        SwitchTransformersForConditionalGeneration,
        (SwitchTransformersForConditionalGeneration,),
    ),
    "model": (
        MoeT5Model,
        SwitchTransformersModel,
        (SwitchTransformersForConditionalGeneration, SwitchTransformersModel),
    ),
    "encoder": (
        MoeT5EncoderModel,
        SwitchTransformersEncoderModel,
        (SwitchTransformersForConditionalGeneration, SwitchTransformersModel, SwitchTransformersEncoderModel),
    ),
}

# Source weights each target leaves out, as transformers does when it loads a bigger checkpoint into a smaller class.
_DROPPED: dict[str, tuple[str, ...]] = {
    "conditional_generation": (),
    "model": ("lm_head.",),
    "encoder": ("decoder.", "lm_head."),
}

_STACK = r"(?P<stack>encoder|decoder)\.block\.(?P<block>\d+)\.layer\.(?P<sub>\d+)"
# The explicit key map: every source key must match exactly one of these patterns (full match).
SWITCH_TO_MOE_T5_KEY_MAP: list[tuple[str, str]] = [
    (r"shared\.weight", r"shared.weight"),
    (r"(?P<stack>encoder|decoder)\.embed_tokens\.weight", r"\g<stack>.embed_tokens.weight"),
    (r"(?P<stack>encoder|decoder)\.final_layer_norm\.weight", r"\g<stack>.final_layer_norm.weight"),
    (
        _STACK
        + r"\.(?P<attn>SelfAttention|EncDecAttention)\.(?P<proj>q|k|v|o|relative_attention_bias)\.weight",
        r"\g<stack>.block.\g<block>.layer.\g<sub>.\g<attn>.\g<proj>.weight",
    ),
    (_STACK + r"\.layer_norm\.weight", r"\g<stack>.block.\g<block>.layer.\g<sub>.layer_norm.weight"),
    (
        _STACK + r"\.mlp\.router\.classifier\.weight",
        r"\g<stack>.block.\g<block>.layer.\g<sub>.moe.router.weight",
    ),
    (
        _STACK + r"\.mlp\.experts\.expert_(?P<expert>\d+)\.(?P<proj>wi|wo)\.weight",
        r"\g<stack>.block.\g<block>.layer.\g<sub>.moe.experts.\g<expert>.\g<proj>.weight",
    ),
    (
        _STACK + r"\.mlp\.(?P<proj>wi|wo)\.weight",
        r"\g<stack>.block.\g<block>.layer.\g<sub>.DenseReluDense.\g<proj>.weight",
    ),
    (r"lm_head\.weight", r"lm_head.weight"),
]
_COMPILED_KEY_MAP = [(re.compile(pattern), replacement) for pattern, replacement in SWITCH_TO_MOE_T5_KEY_MAP]


def _not_switch_error(what: str) -> ValueError:
    return ValueError(
        f"expected a SwitchTransformers checkpoint, got {what}. `convert_switch_transformers` only reads "
        "transformers' SwitchTransformers format (google/switch-base-8 … switch-c-2048); to build a MoE-T5 from a "
        "dense T5 checkpoint use `ptmoe.upcycle`."
    )


def switch_sparse_layers(num_layers: int, sparse_step: int) -> list[int]:
    """The layers transformers' `SwitchTransformersStack` makes sparse: ``i % step == 1`` (or every layer if step 1).

    This is not "every n-th layer" in ptmoe's sense (layers n-1, 2n-1, …) for steps above 2, hence explicit lists.
    """
    if sparse_step <= 0:
        return []
    return [i for i in range(num_layers) if i % sparse_step == 1 or sparse_step == 1]


def moe_t5_config_from_switch(switch_config: PreTrainedConfig) -> MoeT5Config:
    """Translate a `SwitchTransformersConfig` into the equivalent `MoeT5Config` (see the module docstring).

    Args:
        switch_config (`SwitchTransformersConfig`): the source configuration.

    Raises:
        ValueError: for a non-Switch config, a router with a bias, or a gated activation.
    """
    if not isinstance(switch_config, SwitchTransformersConfig):
        raise _not_switch_error(f"a {type(switch_config).__name__} (model_type={switch_config.model_type!r})")
    if switch_config.router_bias:
        raise ValueError(
            "This SwitchTransformers checkpoint has `router_bias=True`; MoE-T5 routers have no bias (a bare "
            "`router.weight` that quantization never touches), so it cannot be converted exactly."
        )
    if switch_config.router_dtype != "float32":
        warnings.warn(
            f"The source router computes in {switch_config.router_dtype}; MoE-T5 routers always compute in float32, "
            "so router logits can differ in the last bits.",
            stacklevel=3,
        )
    return MoeT5Config(
        vocab_size=switch_config.vocab_size,
        d_model=switch_config.d_model,
        d_kv=switch_config.d_kv,
        d_ff=switch_config.d_ff,
        num_layers=switch_config.num_layers,
        num_decoder_layers=switch_config.num_decoder_layers,
        num_heads=switch_config.num_heads,
        relative_attention_num_buckets=switch_config.relative_attention_num_buckets,
        relative_attention_max_distance=switch_config.relative_attention_max_distance,
        dropout_rate=switch_config.dropout_rate,
        layer_norm_epsilon=switch_config.layer_norm_epsilon,
        initializer_factor=switch_config.initializer_factor,
        feed_forward_proj=switch_config.dense_act_fn,  # Switch experts are plain `wi → act → wo` FFNs
        use_cache=switch_config.use_cache,
        pad_token_id=switch_config.pad_token_id,
        eos_token_id=switch_config.eos_token_id,
        bos_token_id=switch_config.bos_token_id,
        decoder_start_token_id=getattr(switch_config, "decoder_start_token_id", None),
        # Also decides T5's d_model**-0.5 rescale before the LM head, exactly as in transformers' Switch.
        tie_word_embeddings=switch_config.tie_word_embeddings,
        num_experts=switch_config.num_experts,
        num_experts_per_tok=1,
        router_type="switch",
        expert_capacity=switch_config.expert_capacity,
        router_jitter_noise=switch_config.router_jitter_noise,
        router_aux_loss_coef=switch_config.router_aux_loss_coef,
        router_z_loss_coef=switch_config.router_z_loss_coef,
        router_importance_loss_coef=0.0,
        encoder_moe_layers=switch_sparse_layers(switch_config.num_layers, switch_config.encoder_sparse_step),
        decoder_moe_layers=switch_sparse_layers(
            switch_config.num_decoder_layers, switch_config.decoder_sparse_step
        ),
    )


def convert_switch_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a SwitchTransformers state dict to MoE-T5 names with `SWITCH_TO_MOE_T5_KEY_MAP` (pure function).

    Raises:
        ValueError: for a key no rule of the map covers (including a router bias), naming it.
    """
    converted = {}
    for key, tensor in state_dict.items():
        for pattern, replacement in _COMPILED_KEY_MAP:
            if pattern.fullmatch(key):
                converted[pattern.sub(replacement, key)] = tensor
                break
        else:
            raise ValueError(f"No key-map rule for the SwitchTransformers weight {key!r}; refusing to guess.")
    return converted


def _check_sparse_layers(source: PreTrainedModel, config: MoeT5Config) -> None:
    """The MoE layers derived from the config must be the layers the source model really built."""
    for stack_name, expected in (
        ("encoder", config.encoder_moe_layer_indices),
        ("decoder", config.decoder_moe_layer_indices),
    ):
        stack = getattr(source, stack_name, None)
        if stack is None:
            continue
        built = [i for i, block in enumerate(stack.block) if block.is_sparse]
        if built != expected:
            raise RuntimeError(
                f"The source {stack_name} has sparse layers {built}, but its config implies {expected}: this "
                "transformers version builds Switch layers differently from what the converter knows."
            )


_HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "subfolder", "force_download", "proxies")


def _load_source(model_or_path, target: str, **from_pretrained_kwargs) -> PreTrainedModel:
    if isinstance(model_or_path, (str, os.PathLike)):
        check_local_checkpoint(model_or_path, "source")
        # Read config.json alone first: the format is checked before any weight is loaded.
        hub_kwargs = {k: v for k, v in from_pretrained_kwargs.items() if k in _HUB_KWARGS}
        config_dict, _ = PreTrainedConfig.get_config_dict(model_or_path, **hub_kwargs)
        model_type = config_dict.get("model_type")
        if model_type != SwitchTransformersConfig.model_type:
            raise _not_switch_error(f"model_type={model_type!r} in {os.fspath(model_or_path)!r}")
        return TARGETS[target][1].from_pretrained(model_or_path, **from_pretrained_kwargs)
    if not isinstance(model_or_path, PreTrainedModel) or not isinstance(
        model_or_path.config, SwitchTransformersConfig
    ):
        raise _not_switch_error(f"a {type(model_or_path).__name__}")
    accepted = TARGETS[target][2]
    if not isinstance(model_or_path, accepted):
        raise ValueError(
            f"target={target!r} needs one of {[c.__name__ for c in accepted]}, got {type(model_or_path).__name__}"
        )
    return model_or_path


def convert_switch_transformers(
    model_or_path: PreTrainedModel | str | os.PathLike,
    target: str = "conditional_generation",
    **from_pretrained_kwargs,
) -> MoeT5PreTrainedModel:
    """Convert a transformers `SwitchTransformers*` model into the MoE-T5 model that computes the same function.

    Args:
        model_or_path (`PreTrainedModel`, `str` or `os.PathLike`): a `SwitchTransformersForConditionalGeneration`,
            `SwitchTransformersModel` or `SwitchTransformersEncoderModel`, or a local folder / Hub id holding one
            (loaded with the `SwitchTransformers*` class of `target`).
        target (`str`, defaults to `"conditional_generation"`): `"conditional_generation"`
            ([`MoeT5ForConditionalGeneration`]), `"model"` ([`MoeT5Model`]) or `"encoder"` ([`MoeT5EncoderModel`]).
        from_pretrained_kwargs: passed to `from_pretrained` for a path (e.g. `revision`, `dtype`).

    Returns:
        The MoE-T5 model, in the source's train/eval mode and dtype. The weights are copies: the source is untouched.

    Raises:
        ValueError: for a source that is not a SwitchTransformers model, an unknown `target`, a router bias, a key
            outside the key map, or shape mismatches.
    """
    if target not in TARGETS:
        raise ValueError(f"`target` must be one of {list(TARGETS)}, got {target!r}")
    loaded_here = isinstance(model_or_path, (str, os.PathLike))
    source = _load_source(model_or_path, target, **from_pretrained_kwargs)
    config = moe_t5_config_from_switch(source.config)
    _check_sparse_layers(source, config)

    source_state = source.state_dict()
    # Embedding tables: MoE-T5 (like T5) reads both stacks' embeddings from `shared`.
    for stack in ("encoder", "decoder"):
        key = f"{stack}.embed_tokens.weight"
        if key in source_state and not torch.equal(source_state[key], source_state["shared.weight"]):
            raise ValueError(
                f"The source's `{key}` differs from `shared.weight`; MoE-T5 shares one embedding table between the "
                "encoder and the decoder, so this checkpoint cannot be converted exactly."
            )
    state_dict = convert_switch_state_dict(source_state)

    model_class = TARGETS[target][0]
    # Build without allocating or initialising weights (Switch checkpoints reach 1.6T parameters), then assign.
    with torch.device("meta"):
        model = model_class(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    # The parts of a bigger source the target does not have (e.g. the decoder, for an encoder) are left out.
    unexpected = sorted(k for k in set(state_dict) - set(expected) if not k.startswith(_DROPPED[target]))
    mismatched = [
        f"{k}: source {tuple(state_dict[k].shape)} vs MoE-T5 {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"The SwitchTransformers weights do not fit the MoE-T5 model: missing {missing[:6]}, unexpected "
            f"{unexpected[:6]}, shape mismatches {mismatched[:6]}"
        )
    state_dict = {
        k: (v.detach().clone() if not loaded_here else v.detach())
        for k, v in state_dict.items()
        if k in expected
    }
    model.load_state_dict(state_dict, strict=True, assign=True)
    untied_lm_head = target == "conditional_generation" and not source.config.tie_word_embeddings
    lm_head = model.lm_head.weight if untied_lm_head else None
    model.tie_weights()  # `assign=True` replaced the tied parameters by separate ones: tie them again
    if untied_lm_head:
        # A separate LM head (tie_word_embeddings=False): keep it, as transformers does when it loads such a T5.
        model.lm_head.weight = nn.Parameter(lm_head, requires_grad=lm_head.requires_grad)
        model.all_tied_weights_keys.pop("lm_head.weight", None)
    leftover = [
        name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta
    ]
    if leftover:
        raise RuntimeError(f"Weights left uninitialised after conversion: {leftover[:6]}")

    if target == "conditional_generation":
        model.generation_config = copy.deepcopy(source.generation_config)
    model.train(source.training)
    return model


# Tokenizer files of a local source folder, copied next to the converted weights (the vocabulary is unchanged).
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "spiece.model",
    "added_tokens.json",
)


def convert_switch_to_folder(
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    target: str = "conditional_generation",
    overwrite: bool = False,
    **from_pretrained_kwargs,
) -> Path:
    """Convert a SwitchTransformers folder or Hub id and save the MoE-T5 model (safetensors) in `output_dir`.

    The saved folder carries `auto_map` and the modeling files, so it loads with `trust_remote_code=True` on a
    machine without ptmoe. Tokenizer files of a local source folder are copied along.

    Args:
        source (`str` or `os.PathLike`): folder or Hub id of a `SwitchTransformers*` checkpoint.
        output_dir (`str` or `os.PathLike`): where to write; must be empty or missing unless `overwrite`. The folder
            is written next to it and moved into place at the end (`ptmoe.outputs.staged_output_dir`).
        target (`str`): see [`convert_switch_transformers`].
        overwrite (`bool`, defaults to `False`): replace a non-empty `output_dir` (once the conversion succeeded).

    Returns:
        The output folder.
    """
    output_dir = check_output_dir(output_dir, overwrite)  # before loading anything
    model = convert_switch_transformers(source, target=target, **from_pretrained_kwargs)
    with staged_output_dir(output_dir, overwrite) as staging:
        model.save_pretrained(staging)
        source_dir = Path(source)
        if source_dir.is_dir():
            for name in _TOKENIZER_FILES:
                if (source_dir / name).is_file():
                    shutil.copy2(source_dir / name, staging / name)
    return output_dir


__all__ = [
    "SWITCH_TO_MOE_T5_KEY_MAP",
    "convert_switch_to_folder",
    "convert_switch_state_dict",
    "convert_switch_transformers",
    "moe_t5_config_from_switch",
    "switch_sparse_layers",
]
