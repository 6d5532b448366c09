"""Quantized ptmoe models for limited hardware: bitsandbytes 4-bit/8-bit loading, QLoRA, INT8 dynamic on CPU.

    checkpoint ──► Moe*.from_pretrained(path, quantization_config=bnb_4bit_config()) ──► 4-bit experts + attention
                                                                                        (routers, heads, embeddings
                                                                                         stay in full precision)
               └─► prepare_qlora_model(model) ──► PeftModel (LoRA per expert on the 4-bit base) ──► Trainer
    fp32 model ──► quantize_dynamic_int8(model) ──► CPU inference with int8 weights

What stays in full precision, and why:
- routers are bare `nn.Parameter`s (never `nn.Linear`), which bitsandbytes never converts;
- task heads are listed in the model class's `_modules_to_not_quantize`; every ptmoe `from_pretrained` adds them
  to the bitsandbytes skip list, so a plain `BitsAndBytesConfig` is enough;
- embeddings and LayerNorms are not linear layers.

The CPU repacking trap of bitsandbytes >= 0.49 on CPUs with avx512_bf16 is disabled for every ptmoe model
loaded through `from_pretrained`, and by `prepare_qlora_model` / `disable_cpu_weight_repacking` for models
quantized any other way.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import BitsAndBytesConfig
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import should_convert_module

from .errors import MissingDependencyError
from .lora import expert_lora_config
from .models.moe import disable_bnb_cpu_weight_repacking

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel


def _require_bitsandbytes(what: str) -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MissingDependencyError(
            f"{what} needs the bitsandbytes package, which is not installed: `pip install bitsandbytes` "
            "(it runs on CPU too), or use `ptmoe.quantize_dynamic_int8` for CPU inference without it."
        )


# Matmul dtypes bitsandbytes 4-bit layers compute in.
COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def bnb_4bit_config(
    compute_dtype: torch.dtype = torch.bfloat16,
    double_quant: bool = True,
    skip_modules: Sequence[str] | None = None,
    quant_type: str = "nf4",
) -> BitsAndBytesConfig:
    """Our recommended bitsandbytes 4-bit settings (QLoRA, Dettmers et al. 2023): NF4 weights, double quantization.

    Use as `ptmoe.MoeBertForSequenceClassification.from_pretrained(path, quantization_config=bnb_4bit_config())`.
    Routers and task heads stay in full precision without listing them here.

    Args:
        compute_dtype (`torch.dtype`, defaults to `torch.bfloat16`): dtype of the matmuls (weights are dequantized
            to it). bf16 is QLoRA's choice; `torch.float32` is slower but closest to the fp32 model.
        double_quant (`bool`, defaults to `True`): also quantize the per-block scales (≈0.4 bit/weight saved).
        skip_modules (`list[str]`, *optional*): extra module names (suffixes) to keep in full precision.
        quant_type (`str`, defaults to `"nf4"`): `"nf4"` (normal-float, best for normally distributed weights)
            or `"fp4"` (bitsandbytes' default, which we do not recommend).

    Raises:
        `ptmoe.errors.MissingDependencyError` (an `ImportError`): bitsandbytes is not installed.
        ValueError: an unknown `quant_type` or `compute_dtype`, or `skip_modules` that is not a list of names.
    """
    _require_bitsandbytes("4-bit loading")
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"`quant_type` must be 'nf4' or 'fp4', got {quant_type!r}")
    if isinstance(compute_dtype, str):  # "bfloat16" / "torch.float32", as in config files
        compute_dtype = getattr(torch, compute_dtype.removeprefix("torch."), compute_dtype)
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(
            f"`compute_dtype` must be one of {[str(d) for d in COMPUTE_DTYPES]} (or their names such as 'bfloat16'), "
            f"got {compute_dtype!r}"
        )
    if not isinstance(double_quant, bool):
        raise ValueError(f"`double_quant` must be True or False, got {double_quant!r}")
    if skip_modules is not None and (
        isinstance(skip_modules, str) or not all(isinstance(name, str) and name for name in skip_modules)
    ):
        raise ValueError(
            f"`skip_modules` must be a list of module names such as ['classifier'], got {skip_modules!r}"
        )
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=list(skip_modules) if skip_modules else None,
    )


def disable_cpu_weight_repacking(model: nn.Module) -> int:
    """Keep bitsandbytes 4-bit weights in their standard layout on every CPU; returns the modules changed.

    On CPUs with avx512_bf16, bitsandbytes 0.49-0.50 repacks a `Linear4bit` weight in place on its first no-grad
    eval forward; afterwards layers with an output size not a multiple of 32 fail, `save_pretrained` may write
    corrupt weights and QLoRA train → eval → train breaks. ptmoe's `from_pretrained` already calls this; call it
    for models quantized another way (e.g. `replace_with_bnb_linear`). A no-op on other CPUs and on GPUs.
    """
    return disable_bnb_cpu_weight_repacking(model)


def prepare_qlora_model(
    model: nn.Module,
    lora_config: LoraConfig | None = None,
    gradient_checkpointing: bool = True,
    **expert_lora_kwargs: Any,
) -> PeftModel:
    """A k-bit model ready for QLoRA training: frozen 4/8-bit base, fp32 norms/heads, LoRA per expert.

    Runs PEFT's `prepare_model_for_kbit_training` (for bitsandbytes models) and `get_peft_model`, after turning off
    the CPU weight repacking (see `disable_cpu_weight_repacking`) so training, evaluation and saving can be mixed.

    Args:
        model (`nn.Module`): a ptmoe model, usually loaded with `quantization_config=bnb_4bit_config()`.
        lora_config (`LoraConfig`, *optional*): the adapter; default `expert_lora_config(model, **expert_lora_kwargs)`.
        gradient_checkpointing (`bool`, defaults to `True`): recompute activations in backward to save memory
            (non-reentrant checkpointing, so no input-grad hooks are needed).
        **expert_lora_kwargs: arguments of `expert_lora_config` (`r`, `experts`, `train_router`, …).
    """
    from peft import get_peft_model, prepare_model_for_kbit_training

    if lora_config is not None and expert_lora_kwargs:
        raise TypeError("Pass either `lora_config` or expert_lora_config arguments, not both")
    disable_bnb_cpu_weight_repacking(model)
    if lora_config is None:
        lora_config = expert_lora_config(model, **expert_lora_kwargs)
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return get_peft_model(model, lora_config)


# --------------------------------------------------------------------------------------------------------------
# Which linears a quantizer converts, and the footprint that predicts
# --------------------------------------------------------------------------------------------------------------
def _heads(model: nn.Module, skip_modules: Sequence[str] | None) -> list[str]:
    return list(getattr(model, "_modules_to_not_quantize", None) or []) + list(skip_modules or [])


def quantizable_linears(model: nn.Module, skip_modules: Sequence[str] | None = None) -> list[str]:
    """Names of the `nn.Linear` layers that bitsandbytes converts when ptmoe's `from_pretrained` loads `model` in k-bit.

    Computed with transformers' own rules on the skip list `from_pretrained` ends up with: the task heads
    (`_modules_to_not_quantize`) plus `skip_modules` (or transformers' automatic list when both are empty), plus the
    class's `_keep_in_fp32_modules`. Routers are absent: they are parameters, not linear layers.
    """
    skip = _heads(model, skip_modules) or None
    patterns = HfQuantizer.get_modules_to_not_convert(
        model, skip, getattr(model, "_keep_in_fp32_modules", None)
    )
    return [
        name
        for name, m in model.named_modules()
        if type(m) is nn.Linear and should_convert_module(name, patterns)
    ]


def estimate_quantized_footprint(
    model: nn.Module, bits: int, skip_modules: Sequence[str] | None = None, dtype: torch.dtype | None = None
) -> int:
    """Bytes that `get_memory_footprint()` will report once `model` is loaded with `bits`-bit linears.

    Quantized linear weights take `bits / 8` bytes each; every other parameter and buffer keeps its size (or the
    size of `dtype` for floating-point tensors, when loading with `dtype=`). Like `get_memory_footprint`, this
    leaves out bitsandbytes' quantization constants (4-bit: one absmax per 64 weights, ≈ +3% of the 4-bit
    weights with double quantization; 8-bit: one fp32 scale per output row).

    Args:
        model (`nn.Module`): the full-precision model (e.g. built from the config).
        bits (`int`): 4 or 8.
        skip_modules (`list[str]`, *optional*): extra modules kept in full precision.
        dtype (`torch.dtype`, *optional*): the load dtype of the non-quantized floating-point tensors.
    """
    if bits not in (4, 8):
        raise ValueError(f"`bits` must be 4 or 8, got {bits}")
    quantized = {id(model.get_submodule(name).weight) for name in quantizable_linears(model, skip_modules)}

    def size(tensor: torch.Tensor) -> int:
        if id(tensor) in quantized:
            return math.ceil(tensor.numel() * bits / 8)
        if dtype is not None and tensor.is_floating_point():
            return tensor.numel() * dtype.itemsize
        return tensor.numel() * tensor.element_size()

    return sum(size(p) for p in model.parameters()) + sum(size(b) for b in model.buffers())


# --------------------------------------------------------------------------------------------------------------
# INT8 dynamic quantization (CPU inference)
# --------------------------------------------------------------------------------------------------------------
def quantize_dynamic_int8(
    model: nn.Module, skip_modules: Sequence[str] | None = None, inplace: bool = False
) -> nn.Module:
    """INT8 dynamic quantization for CPU inference: int8 weights, float activations between layers.

    Each `nn.Linear` (experts, attention, dense FFNs) becomes a dynamically quantized linear with per-channel
    int8 weights; its input is quantized on the fly per call and its output is float. Routers (parameters),
    embeddings, LayerNorms, the task heads (`_modules_to_not_quantize`) and the output embeddings (`lm_head`,
    usually tied to the input embeddings) stay fp32. Inference only.

    Uses `torch.ao.quantization.quantize_dynamic` (fbgemm/x86 kernels). torch 2.13 marks `torch.ao.quantization`
    deprecated in favour of torchao's `quantize_`; we still use it because it is present, tested here and the
    fast path on CPU (on this machine, one 768→3072→768 FFN over 2,048 tokens with 2 threads: torchao 0.18's
    `Int8DynamicActivationInt8WeightConfig` ran at ≈1.0× fp32, this at ≈1.9×). Its DeprecationWarning is
    silenced inside this call only.

    Args:
        model (`nn.Module`): an fp32 ptmoe model (not bitsandbytes-quantized).
        skip_modules (`list[str]`, *optional*): extra module names (suffixes) to keep in fp32.
        inplace (`bool`, defaults to `False`): convert `model` itself instead of a copy.
    """
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    floating = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if floating != {torch.float32}:
        raise ValueError(
            f"INT8 dynamic quantization needs an fp32 model, got parameter dtypes {sorted(map(str, floating))}"
        )
    heads = _heads(model, skip_modules)
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if (
        output_embeddings is not None
    ):  # quantizing a tied output projection would also duplicate the embeddings
        heads += [name for name, m in model.named_modules() if m is output_embeddings]
    names = [
        name
        for name, m in model.named_modules()
        if type(m) is nn.Linear and should_convert_module(name, heads)
    ]
    if not names:
        raise ValueError("The model has no nn.Linear layer to quantize (already quantized?)")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=r".*quantize_per_tensor.*deprecated.*")
        warnings.filterwarnings("ignore", message=r".*quantize_per_channel.*deprecated.*")
        quantized = quantize_dynamic(
            model, dict.fromkeys(names, per_channel_dynamic_qconfig), dtype=torch.qint8, inplace=inplace
        )
    return quantized.eval()


__all__ = [
    "bnb_4bit_config",
    "disable_cpu_weight_repacking",
    "prepare_qlora_model",
    "quantizable_linears",
    "estimate_quantized_footprint",
    "quantize_dynamic_int8",
]
