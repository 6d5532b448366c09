"""The public entry point: `upcycle` a dense model, path or Hub id into the matching ptmoe MoE model.

It checks the arguments, picks the architecture map, builds and validates the MoE config before any weight is
read, collects calibration activations when a split needs them, converts the state dict and assigns it to a
meta-device MoE model (see the package docstring for the methods and when they are exact).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

import torch
from transformers import AutoConfig, PreTrainedModel

from ..calibration import collect_ffn_activations, load_texts, resolve_tokenizer
from ..models.moe import check_local_checkpoint
from .build import assign_tensors, initialise_remaining
from .config import build_moe_config
from .experts import CALIBRATED_STRATEGIES, PARTITION_STRATEGIES, UPCYCLING_METHODS
from .families import architecture_for_checkpoint, architecture_for_model, import_class, moe_class_for
from .state_dict import upcycle_state_dict

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------
def _check_arguments(
    num_experts, num_experts_per_tok, method, seed, noise_std, drop_ratio, partition, router_init
) -> None:
    """Fail fast, before any checkpoint is read, on arguments that do not depend on the checkpoint."""
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"`num_experts` must be an integer >= 1, got {num_experts!r}")
    if (
        isinstance(num_experts_per_tok, bool)
        or not isinstance(num_experts_per_tok, int)
        or num_experts_per_tok < 1
    ):
        raise ValueError(f"`num_experts_per_tok` must be an integer >= 1, got {num_experts_per_tok!r}")
    if num_experts_per_tok > num_experts:
        raise ValueError(
            f"`num_experts_per_tok` ({num_experts_per_tok}) cannot be larger than `num_experts` ({num_experts})"
        )
    if method not in UPCYCLING_METHODS:
        raise ValueError(f"`method` must be one of {UPCYCLING_METHODS}, got {method!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"`seed` must be an integer, got {seed!r}")
    if not isinstance(noise_std, (int, float)) or isinstance(noise_std, bool) or noise_std <= 0:
        raise ValueError(f"`noise_std` must be a number > 0, got {noise_std!r}")
    if not isinstance(drop_ratio, (int, float)) or isinstance(drop_ratio, bool) or not 0 < drop_ratio <= 1:
        raise ValueError(f"`drop_ratio` must be in (0, 1], got {drop_ratio!r}")
    if partition not in PARTITION_STRATEGIES:
        raise ValueError(f"`partition` must be one of {PARTITION_STRATEGIES}, got {partition!r}")
    if router_init not in ("normal", "zeros"):
        raise ValueError(f"`router_init` must be 'normal' or 'zeros', got {router_init!r}")


def _warn_if_not_exact(config, method: str) -> None:
    if method == "copy" and (
        config.router_type in ("switch", "expert_choice")
        or (config.router_type in ("topk", "hierarchical") and not config.norm_topk_prob)
    ):
        logger.warning(
            "method='copy' reproduces the dense model only when each token's combine weights sum to 1 "
            "(router_type 'topk' or 'hierarchical' with norm_topk_prob=True, 'noisy_topk', 'hash'); with "
            "router_type=%r and norm_topk_prob=%s the upcycled FFN outputs are scaled by the router probabilities.",
            config.router_type,
            config.norm_topk_prob,
        )
    if method == "partition" and (
        config.num_experts_per_tok != config.num_experts or config.router_init != "zeros"
    ):
        logger.info(
            "method='partition' reproduces the dense FFN exactly only with all experts active and "
            "router_init='zeros'; with num_experts_per_tok=%d of %d the active compute is k/E of the dense FFN.",
            config.num_experts_per_tok,
            config.num_experts,
        )


_CONFIG_LOAD_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "subfolder", "trust_remote_code")


def upcycle(
    dense: PreTrainedModel | str | os.PathLike,
    num_experts: int = 8,
    num_experts_per_tok: int | None = None,
    moe_layers: int | Sequence[int] | None = 2,
    *,
    encoder_moe_layers: int | Sequence[int] | None = None,
    decoder_moe_layers: int | Sequence[int] | None = None,
    method: str = "copy",
    router_type: str = "topk",
    seed: int = 0,
    router_init: str | None = None,
    noise_std: float = 0.01,
    drop_ratio: float = 0.5,
    partition: str = "random",
    task: str | None = None,
    load_kwargs: Mapping | None = None,
    progress: bool = True,
    num_shared_neurons: int = 0,
    calibration=None,
    tokenizer=None,
    calibration_tokens: int = 2048,
    **moe_config_overrides,
) -> PreTrainedModel:
    """Upcycle a dense BERT / RoBERTa / T5 model into the matching ptmoe MoE model.

    The dense architecture is read from the model's class (`BertModel` → `MoeBertModel`, `BertForMaskedLM` →
    `MoeBertForMaskedLM`, … `T5ForConditionalGeneration` → `MoeT5ForConditionalGeneration`; see
    `SUPPORTED_ARCHITECTURES`). Every weight outside the MoE layers' FFNs is carried over; see the package docstring
    for what each `method` does and when it reproduces the dense model exactly.

    Args:
        dense (`PreTrainedModel`, `str` or `os.PathLike`): a dense model, or a local path / Hub id (e.g.
            ``"neuralmind/bert-base-portuguese-cased"``) loaded with `from_pretrained`.
        num_experts (`int`, defaults to 8): experts per MoE layer.
        num_experts_per_tok (`int`, *optional*): experts per token (k); defaults to 2, or 1 for the `"switch"` and
            `"hash"` routers.
        moe_layers (`int` or `list[int]`, defaults to 2): MoE layers (every n-th layer, or a list of 0-based
            indices). For T5 it is the default of both `encoder_moe_layers` and `decoder_moe_layers`.
        encoder_moe_layers / decoder_moe_layers (`int` or `list[int]`, *optional*): T5 only; `[]` for none.
        method (`str`, defaults to `"copy"`): "copy", "noise", "drop" or "partition".
        router_type (`str`, defaults to `"topk"`): one of `ptmoe.ROUTER_TYPES` ("topk", "switch", "noisy_topk",
            "hash", "expert_choice", "hierarchical"); their fields (`router_groups`, `expert_capacity_factor`,
            `decoder_router_type`, …) go in `moe_config_overrides`.
        seed (`int`, defaults to 0): seeds every random choice (noise, dropped neurons, partition, routers).
        router_init (`str`, *optional*): "normal" (N(0, initializer_range), lets the router pick different
            experts from the start) or "zeros" (uniform routing). Defaults to "zeros" for "partition" (needed for
            its exactness) and "normal" otherwise.
        noise_std (`float`, defaults to 0.01): "noise": noise std relative to each weight tensor's std.
        drop_ratio (`float`, defaults to 0.5): "drop": fraction of intermediate neurons re-initialised, in (0, 1].
        partition (`str`, defaults to `"random"`): "partition": "random", "clustered" (balanced k-means on the
            weights) or "coactivation" (balanced k-means on the neurons' firing patterns over `calibration` text).
            Which to use: "coactivation" when calibration text is at hand and the experts will be routed sparsely
            (`ptmoe.sparsify`): a fitted router then finds experts whose neurons fire together; "clustered"
            without text; "random" as a baseline.
        task (`str`, *optional*): only for a path / Hub id: which dense head to load (see
            `architecture_for_checkpoint`); defaults to the checkpoint's architecture, or masked-LM for a
            `BertForPreTraining` checkpoint such as BERTimbau.
        load_kwargs (`dict`, *optional*): extra `from_pretrained` arguments for a path / Hub id (`dtype`,
            `revision`, `token`, `num_labels`, …).
        progress (`bool`, defaults to `True`): show a progress bar over MoE layers.
        num_shared_neurons (`int`, defaults to 0): "partition": the S most important neurons (mean contribution
            to the FFN output on `calibration` text, see `neuron_importance`) become one always-active shared expert
            (MoEBERT's importance-guided split); the other neurons are split by `partition`.
        calibration (*optional*): text for "coactivation" and `num_shared_neurons`: a list of texts, a
            `datasets.Dataset` (column "text") or a text file.
        tokenizer (*optional*): tokenizer for `calibration` (default: the dense checkpoint's).
        calibration_tokens (`int`, defaults to 2048): real tokens of `calibration` recorded per MoE layer.
        moe_config_overrides: any other MoE config field (`router_aux_loss_coef`, `capacity_factor`, …).

    Returns:
        The MoE model (`eval()` mode, the dense model's dtype and device). Its config records `upcycled_from` (the
        path / Hub id, or the dense model's `name_or_path` or class name), `upcycling_method` and `upcycling_seed`.

    Example:

    ```python
    >>> import ptmoe
    >>> moe = ptmoe.upcycle("neuralmind/bert-base-portuguese-cased", num_experts=8, method="drop")
    >>> ptmoe.save_upcycled(moe, "bertimbau-moe-8x")  # weights, config and the BERTimbau tokenizer
    ```
    """
    if num_experts_per_tok is None:
        num_experts_per_tok = 1 if router_type in ("switch", "hash") else 2
    if router_init is None:
        router_init = "zeros" if method == "partition" else "normal"
    _check_arguments(
        num_experts, num_experts_per_tok, method, seed, noise_std, drop_ratio, partition, router_init
    )
    if (
        isinstance(num_shared_neurons, bool)
        or not isinstance(num_shared_neurons, int)
        or num_shared_neurons < 0
    ):
        raise ValueError(f"`num_shared_neurons` must be an integer >= 0, got {num_shared_neurons!r}")
    needs_calibration = method == "partition" and (
        partition in CALIBRATED_STRATEGIES or num_shared_neurons > 0
    )
    calibration_texts = None
    if needs_calibration:
        if calibration is None:
            raise ValueError(
                f"partition={partition!r} with num_shared_neurons={num_shared_neurons} reads the dense FFN's "
                "activations on text: pass `calibration=` (a list of texts, a datasets.Dataset or a text file)"
            )
        calibration_texts = load_texts(calibration, what="calibration")
    load_kwargs = dict(load_kwargs or {})

    if isinstance(dense, (str, os.PathLike)):
        source = os.fspath(dense)
        check_local_checkpoint(source, "dense")
        config_kwargs = {k: v for k, v in load_kwargs.items() if k in _CONFIG_LOAD_KWARGS}
        dense_config = AutoConfig.from_pretrained(source, **config_kwargs)
        arch = architecture_for_checkpoint(dense_config, task)
        owned = True  # the dense model is loaded here and discarded: its tensors can be reused, not copied
    elif isinstance(dense, PreTrainedModel):
        if task is not None or load_kwargs:
            raise ValueError("`task` and `load_kwargs` only apply when `dense` is a path or Hub id")
        arch = architecture_for_model(dense)
        dense_config = dense.config
        source = getattr(dense.config, "_name_or_path", "") or type(dense).__name__
        owned = False
    else:
        raise TypeError(
            f"`dense` must be a transformers model or a path / Hub id, got {type(dense).__name__}"
        )

    # The config is built (and validated) before any weight is read or copied.
    config_arguments = dict(
        num_experts=num_experts,
        num_experts_per_tok=num_experts_per_tok,
        moe_layers=moe_layers,
        encoder_moe_layers=encoder_moe_layers,
        decoder_moe_layers=decoder_moe_layers,
        router_type=router_type,
        router_init=router_init,
        method=method,
        seed=seed,
        source=source,
        overrides=moe_config_overrides,
        num_shared_neurons=num_shared_neurons,
    )
    moe_config = build_moe_config(dense_config, arch, **config_arguments)
    moe_class = moe_class_for(arch)
    _warn_if_not_exact(moe_config, method)

    if owned:
        dense = import_class("transformers", arch.dense_class).from_pretrained(source, **load_kwargs)
        if type(dense).__name__ != arch.dense_class:
            raise ValueError(f"loading {source!r} gave a {type(dense).__name__}, expected {arch.dense_class}")
        # Again from the loaded config: `load_kwargs` such as `num_labels` change it.
        moe_config = build_moe_config(dense.config, arch, **config_arguments)
    activations = None
    if calibration_texts is not None:
        layers = {stack.name: getattr(moe_config, stack.layers_attr) for stack in arch.stacks}
        activations = collect_ffn_activations(
            dense, arch, layers, calibration_texts, resolve_tokenizer(dense, tokenizer), calibration_tokens
        )
    dtype = dense.dtype
    device = next(dense.parameters()).device
    dense_state_dict = dense.state_dict()
    del dense  # when loaded here, only the tensors reused by the MoE model stay alive

    with torch.device("meta"):
        model = moe_class(moe_config)
    expected_shapes = {key: tensor.shape for key, tensor in model.state_dict().items()}
    tensors = upcycle_state_dict(
        dense_state_dict,
        arch,
        moe_config,
        expected_shapes,
        method=method,
        seed=seed,
        noise_std=noise_std,
        drop_ratio=drop_ratio,
        partition=partition,
        clone=not owned,
        progress=progress,
        activations=activations,
        num_shared_neurons=num_shared_neurons,
    )
    del dense_state_dict
    assign_tensors(model, tensors)
    initialise_remaining(model, device, dtype, seed)
    leftover = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if leftover:  # would be a bug in the key map: never hand out a model with uninitialised weights
        raise RuntimeError(f"upcycle left tensors on the meta device: {leftover[:8]}")
    return model.eval()
