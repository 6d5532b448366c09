"""The part of the verification that runs where ptmoe is NOT importable: load a Hub folder, run it, save outputs.

This file imports only the standard library, torch, safetensors, transformers (and PEFT for adapters), never
ptmoe or a sibling module: `verify.py` executes it by path in a fresh interpreter with `sys.modules["ptmoe"] =
None`, exactly as a user without ptmoe would load the folder. The same functions build the inputs and flatten
the outputs of the source model in the parent process, so both sides are run and compared identically.

    python remote_check.py FOLDER AUTO_CLASS INPUTS.safetensors OUTPUTS.safetensors [ADAPTER_DIR ...]

writes OUTPUTS.safetensors and OUTPUTS.safetensors.digests.json (a sha256 per weight tensor).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import sys
from collections.abc import Mapping

import torch

BATCH, SEQ_LEN, DECODER_LEN = 2, 12, 7
PADDED_FROM = 9  # the second sequence is padded from this position: padding must be handled the same way


def fixed_inputs(model) -> dict[str, torch.Tensor]:
    """A small fixed batch for `model`: token ids from a seeded generator, one padded row, decoder ids if needed."""
    generator = torch.Generator().manual_seed(0)
    vocab_size = model.config.vocab_size
    inputs = {
        "input_ids": torch.randint(0, vocab_size, (BATCH, SEQ_LEN), generator=generator),
        "attention_mask": torch.ones(BATCH, SEQ_LEN, dtype=torch.long),
    }
    inputs["attention_mask"][1, PADDED_FROM:] = 0
    if getattr(model.config, "is_encoder_decoder", False) and "decoder_input_ids" in _parameters(model):
        inputs["decoder_input_ids"] = torch.randint(0, vocab_size, (BATCH, DECODER_LEN), generator=generator)
    return inputs


def _parameters(model) -> Mapping[str, inspect.Parameter]:
    forward = model.get_base_model().forward if hasattr(model, "get_base_model") else model.forward
    return inspect.signature(forward).parameters


def _flatten(prefix: str, value, out: dict[str, torch.Tensor]) -> None:
    if isinstance(value, torch.Tensor):
        out[prefix] = value.detach().to("cpu").contiguous()
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    elif isinstance(value, (tuple, list)):
        for index, item in enumerate(value):
            _flatten(f"{prefix}.{index}", item, out)
    # Anything else (e.g. a KV cache object) is not an output to compare.


def state_digests(model) -> dict[str, str]:
    """sha256 of every tensor of `model.state_dict()` (with its dtype and shape), by name.

    Comparing these catches any changed weight, including those the fixed batch does not reach (an expert no
    token was routed to, embedding rows of unused tokens), which comparing outputs alone would miss.
    """
    digests = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous()
        digest = hashlib.sha256(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        digests[name] = digest.hexdigest()
    return digests


def adapter_prefix(adapter_dir: str) -> str:
    """Output-name prefix of the outputs of the model with the adapter in `adapter_dir`."""
    return f"adapter[{os.path.basename(os.path.normpath(adapter_dir))}]"


@torch.no_grad()
def run_model(model, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor the model returns for `inputs` (eval mode, router outputs included), by dotted name."""
    model.eval()
    parameters = _parameters(model)
    flags = {"return_dict": True}
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    is_moe = hasattr(getattr(model, "config", None), "output_router_logits")
    if "output_router_logits" in parameters or (takes_kwargs and is_moe):
        # compare the routing decisions (and the router losses that come with them), not only the logits
        flags["output_router_logits"] = True
    if "use_cache" in parameters:
        flags["use_cache"] = False
    outputs = model(**inputs, **flags)
    flat: dict[str, torch.Tensor] = {}
    _flatten("", outputs, flat)
    return flat


def main(argv: list[str]) -> int:
    import transformers
    from safetensors.torch import load_file, save_file

    folder, auto_class, inputs_path, outputs_path, *adapters = argv
    if sys.modules.get("ptmoe", False) is not None:
        raise SystemExit("remote_check must run with ptmoe blocked (sys.modules['ptmoe'] = None)")
    model, info = getattr(transformers, auto_class).from_pretrained(
        folder, trust_remote_code=True, output_loading_info=True
    )
    # The class must come from the folder's own code (transformers' dynamic modules), not from an installed package.
    module = type(model).__module__
    if not module.startswith("transformers_modules"):
        raise SystemExit(
            f"{auto_class} resolved to {type(model).__qualname__} from {module}, not the folder's code"
        )
    problems = {
        key: info.get(key) for key in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(key)
    }
    if problems:
        raise SystemExit(f"the weights do not match the model code: {problems}")
    with open(f"{outputs_path}.digests.json", "w") as handle:
        json.dump(state_digests(model), handle)
    inputs = load_file(inputs_path)
    outputs = run_model(model, inputs)
    if adapters:
        from peft import PeftModel

        for adapter in adapters:
            fresh = getattr(transformers, auto_class).from_pretrained(folder, trust_remote_code=True)
            adapted = PeftModel.from_pretrained(fresh, adapter)
            for key, value in run_model(adapted, inputs).items():
                outputs[f"{adapter_prefix(adapter)}.{key}"] = value
    save_file(outputs, outputs_path)
    print(f"loaded {type(model).__name__} from {module}; {len(outputs)} output tensors")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
