"""Checked loading of MoE checkpoints: `load_checked` around `from_pretrained`, and its checks.

Refuses missing paths (`check_local_checkpoint`), pickle-only folders, dense checkpoints and experts/routers that
do not match the config (`check_expert_keys`); keeps task heads unquantized and 4-bit weights unpacked under
bitsandbytes, and makes FSDP2 reduce unused expert gradients. Part of the model code that travels inside Hub
checkpoints: it imports only torch and transformers, never ``ptmoe``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
from collections.abc import Sequence

from torch import nn


class CheckpointMismatchError(ValueError, RuntimeError):
    """A checkpoint's weights do not fit the model (other shapes, or experts/routers the config does not build).

    A `RuntimeError`, because that is what transformers raises for a size mismatch and what code written against
    transformers catches (``except RuntimeError``); a `ValueError`, because a checkpoint that does not fit is bad
    input, which ptmoe's command line reports as one line (`ptmoe.errors.USER_ERRORS`).
    """


def _moe_layer_fields(config) -> str:
    """The config's MoE layer fields for messages: `moe_layers` (MoE-BERT) or encoder/decoder lists (MoE-T5)."""
    if hasattr(config, "encoder_moe_layers"):
        return f"encoder {config.encoder_moe_layers}, decoder {config.decoder_moe_layers}"
    return str(getattr(config, "moe_layers", None))


def check_expert_keys(loading_info: dict, config) -> None:
    """Refuse a checkpoint whose experts/routers do not match the model (no silently random experts).

    Args:
        loading_info (`dict`): the `output_loading_info` of `from_pretrained` (`missing_keys`, `unexpected_keys`).
        config: the model's config.
    """

    def moe_keys(keys):
        return sorted(k for k in keys if ".moe." in f".{k}" or ".experts." in k or ".router." in k)

    missing = moe_keys(loading_info.get("missing_keys", []))
    unexpected = moe_keys(loading_info.get("unexpected_keys", []))
    # A hash table's size is the vocabulary's (like the word embeddings'), not a property of the MoE layers: its
    # mismatch is left to the shape check of `load_checked` (rebuilt under `ignore_mismatched_sizes=True`).
    mismatched = [
        k
        for k, *_ in loading_info.get("mismatched_keys", [])
        if ".moe." in f".{k}" and not k.endswith(".hash_table")
    ]
    if missing or unexpected or mismatched:
        shown = ", ".join((missing + unexpected + mismatched)[:6])
        raise CheckpointMismatchError(
            "The checkpoint's MoE layers do not match the model config "
            f"(num_experts={config.num_experts}, num_shared_experts={config.num_shared_experts}, "
            f"router_type={config.router_type!r}, MoE layers {_moe_layer_fields(config)}): "
            f"{len(missing)} missing, {len(unexpected)} unexpected and {len(mismatched)} mismatched expert/router "
            f"weights (e.g. {shown}). Load it with the config saved beside it (do not override `num_experts` or "
            "the MoE layers), or build a new MoE model from a dense checkpoint with `ptmoe.upcycle`."
        )


def disable_bnb_cpu_weight_repacking(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights in place on CPUs with avx512_bf16; returns the modules changed.

    bitsandbytes >= 0.49 converts a `Linear4bit` weight to a CPU-specific packed layout on its first no-grad eval
    forward (`Linear4bit.support_avx512bf16_for_cpu`, True on CPUs with avx512_bf16). Afterwards a layer whose
    output size is not a multiple of 32 fails, `save_pretrained` can write corrupt weights and a QLoRA
    train → eval → train sequence breaks. Turning the flag off keeps the standard layout on every CPU (the flag is
    an attribute, so no bitsandbytes import is needed here).
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def keep_modules_unquantized(quantization_config, modules: Sequence[str] | None):
    """A copy of a bitsandbytes `quantization_config` whose `llm_int8_skip_modules` also lists `modules`.

    transformers' automatic skip list (`get_keys_to_not_convert`) misses a head whose last parameter is a bias (it
    strips only `.weight` from the name), e.g. `classifier`; `_keep_in_fp32_modules` would force the heads to fp32
    in fp16 loads, where their fp16 inputs then fail. Listing the heads in the skip list keeps them unquantized, in
    the load dtype.
    Configs of other quantization methods are returned unchanged.

    Args:
        quantization_config (`BitsAndBytesConfig`, `dict` or `None`): what the user passed to `from_pretrained`.
        modules (`list[str]`): module name patterns (suffixes) to keep in full precision.
    """
    if quantization_config is None or not modules:
        return quantization_config
    if isinstance(quantization_config, dict):
        is_bnb = quantization_config.get("quant_method") == "bitsandbytes" or any(
            quantization_config.get(key) for key in ("load_in_4bit", "load_in_8bit")
        )
        if not is_bnb:
            return quantization_config
        skip = quantization_config.get("llm_int8_skip_modules") or []
        return {**quantization_config, "llm_int8_skip_modules": sorted(set(skip) | set(modules))}
    if not hasattr(quantization_config, "llm_int8_skip_modules"):
        return quantization_config
    config = copy.deepcopy(quantization_config)
    config.llm_int8_skip_modules = sorted(set(config.llm_int8_skip_modules or []) | set(modules))
    return config


def reduce_unused_expert_gradients(model: nn.Module) -> bool:
    """Make an FSDP2-sharded model reduce a zero gradient for experts that got no token on a rank; True if it is one.

    Under FSDP each rank routes its own batch, so an expert can receive tokens on one rank and none on another. The
    rank without tokens then has no gradient for that expert, and FSDP2 by default leaves such parameters out of its
    reduce-scatter: the ranks send buffers of different sizes and fail or hang. `from_pretrained(...,
    distributed_config=DistributedConfig(fsdp_size=…))` calls this for ptmoe models; call it yourself after
    `torch.distributed.fsdp.fully_shard(model)` (accelerate's FSDP2 included).

    Args:
        model (`nn.Module`): the model, sharded with FSDP2 (`fully_shard`) or not (then nothing changes).
    """
    if not callable(getattr(model, "set_reduce_scatter_unused_params", None)):
        return False
    model.set_reduce_scatter_unused_params(True)
    return True


def check_local_checkpoint(
    name_or_path: str | os.PathLike, argument: str = "pretrained_model_name_or_path"
) -> None:
    """Refuse a local checkpoint path that does not exist, naming `argument` (transformers would call it a repo id).

    A value counts as a local path when it is a `PathLike`, is absolute, starts with `.` or `~`, contains a
    backslash or more than one `/` (Hub ids have at most one), or when its first component is an existing folder
    (``outputs/moe`` while ``outputs/`` exists). Anything else may be a Hub id and is left to transformers.

    Args:
        name_or_path (`str` or `os.PathLike`): a folder or a Hub id.
        argument (`str`): how the caller names it in messages, e.g. ``"--base"``.

    Raises:
        `FileNotFoundError`: the local folder does not exist. `NotADirectoryError`: it is a file.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        return
    text = os.fspath(name_or_path)
    path = os.path.expanduser(text)
    if os.path.isdir(path):
        return
    if os.path.exists(path):
        raise NotADirectoryError(f"{argument} {text!r} is a file: pass the folder that holds config.json")
    first = text.replace("\\", "/").split("/")[0]
    local = (
        not isinstance(name_or_path, str)
        or os.path.isabs(path)
        or text.startswith((".", "~"))
        or "\\" in text
        or text.count("/") > 1
        or (text.count("/") == 1 and bool(first) and os.path.isdir(first))
    )
    if local:
        raise FileNotFoundError(
            f"{argument} {text!r}: no such folder (current directory {os.getcwd()!r}). Check the path; a Hub id "
            "has the form 'name' or 'org/name'."
        )


_CONVERSION_FAILED = "issues during automatic conversion of the weights"
_EXCEPTION_LINE = re.compile(r"^\s*(\w+(?:Error|Exception)): (.+)$")


class _WarningCapture(logging.Handler):
    """Keeps the messages of one logger while loading (transformers logs conversion failures, then raises)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _conversion_errors_surfaced(name_or_path):
    """Turn transformers' "issues during automatic conversion of the weights" into a `ValueError` with the cause.

    transformers (5.x) catches the exception of a failed weight conversion (e.g. a bitsandbytes setting it
    rejects), writes its traceback into the loading report it logs, and raises a `RuntimeError` that only points
    at the log. The cause is the last "SomeError: message" line of that report.
    """
    logger = logging.getLogger("transformers")  # the report goes to a child logger (modeling_utils)
    capture = _WarningCapture()
    logger.addHandler(capture)
    try:
        yield
    except RuntimeError as error:
        if _CONVERSION_FAILED not in str(error):
            raise
        causes = [
            match.group(1, 2)
            for message in capture.messages
            for match in map(_EXCEPTION_LINE.match, message.splitlines())
            if match
        ]
        cause = f"{causes[-1][0]}: {causes[-1][1]}" if causes else "see the CONVERSION entries logged above"
        raise ValueError(
            f"Loading {os.fspath(name_or_path)!r} failed while converting its weights: {cause}. Check the "
            "`quantization_config` (e.g. `bnb_4bit_quant_type` must be 'nf4' or 'fp4'; `ptmoe.bnb_4bit_config()` "
            "validates its settings) and that the checkpoint matches the model class."
        ) from error
    finally:
        logger.removeHandler(capture)


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _refuse_pickle_only_folder(name_or_path) -> None:
    """A local folder with pickled weights and no safetensors gets a message that says so (not "file not found")."""
    if not isinstance(name_or_path, (str, os.PathLike)) or not os.path.isdir(name_or_path):
        return
    names = os.listdir(name_or_path)
    pickles = sorted(n for n in names if n.endswith(_PICKLE_SUFFIXES) and n != "training_args.bin")
    if pickles and not any(n.endswith(".safetensors") for n in names):
        raise ValueError(
            f"{os.fspath(name_or_path)!r} holds only pickled weights ({', '.join(pickles[:3])}) and no .safetensors "
            "file. ptmoe loads safetensors only, because unpickling can run arbitrary code: in an environment you "
            "trust, load it with transformers and `save_pretrained` it again (safetensors is the default)."
        )


def _refuse_dense_checkpoint(model: nn.Module, loading_info: dict, name_or_path) -> None:
    """A checkpoint without any expert or router weight is a dense one: say so and point at upcycling."""
    moe_keys = [k for k in model.state_dict() if ".moe." in f".{k}"]
    missing = set(loading_info.get("missing_keys", []))
    if moe_keys and all(k in missing for k in moe_keys):
        source = "the `state_dict`" if name_or_path is None else repr(os.fspath(name_or_path))
        raise ValueError(
            f"{source} has no expert or router weights: it is a dense checkpoint. Turn it into a "
            "MoE checkpoint first with `ptmoe.upcycle(...)` / `ptmoe upcycle --base ... --out ...`, then load that."
        )


def load_checked(from_pretrained, *args, **kwargs):
    """Run a `from_pretrained` and refuse the result when experts/routers do not match (see `check_expert_keys`).

    Size mismatches are collected instead of raised by transformers, so that a wrong `num_experts` gets the
    message above; other mismatches still fail unless the caller passed `ignore_mismatched_sizes=True`.
    With a bitsandbytes `quantization_config`, the model class's `_modules_to_not_quantize` (task heads) stay in
    full precision, and 4-bit weights are never repacked for avx512_bf16 CPUs (see
    `disable_bnb_cpu_weight_repacking`).
    """
    output_loading_info = kwargs.pop("output_loading_info", False)
    ignore_mismatched_sizes = kwargs.pop("ignore_mismatched_sizes", False)
    # `from_pretrained` is the bound classmethod of the class being loaded: its `__self__` is that class.
    model_class = getattr(from_pretrained, "__self__", None)
    if kwargs.get("quantization_config") is not None:
        kwargs["quantization_config"] = keep_modules_unquantized(
            kwargs["quantization_config"], getattr(model_class, "_modules_to_not_quantize", None)
        )
    name_or_path = args[0] if args else kwargs.get("pretrained_model_name_or_path")
    check_local_checkpoint(name_or_path)
    _refuse_pickle_only_folder(name_or_path)
    # Pickled weights (`pytorch_model.bin`) can run code when loaded: ptmoe reads safetensors only.
    kwargs.setdefault("use_safetensors", True)
    with _conversion_errors_surfaced(name_or_path):
        try:
            model, loading_info = from_pretrained(
                *args, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
            )
        except Exception as error:
            if type(error).__name__ != "SafetensorError":  # safetensors' own error type, not imported here
                raise
            raise OSError(
                f"A safetensors file of {os.fspath(name_or_path)!r} is damaged or incomplete ({error}): save or "
                "download the checkpoint again."
            ) from error
    disable_bnb_cpu_weight_repacking(model)
    reduce_unused_expert_gradients(model)
    # `from_pretrained(None, config=..., state_dict={})` is transformers' way to build a model whose every weight is
    # initialised (nothing is loaded, so nothing can be a mismatched checkpoint); any other state dict is checked.
    if not (name_or_path is None and kwargs.get("state_dict") == {}):
        _refuse_dense_checkpoint(model, loading_info, name_or_path)
        check_expert_keys(loading_info, model.config)
    mismatched = loading_info.get("mismatched_keys", [])
    if mismatched and not ignore_mismatched_sizes:
        raise CheckpointMismatchError(
            f"Checkpoint weights have other shapes than the model: {[k for k, *_ in mismatched][:6]}. Pass "
            "`ignore_mismatched_sizes=True` to re-initialise them (e.g. a new classification head)."
        )
    return (model, loading_info) if output_loading_info else model
