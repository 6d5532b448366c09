"""Mixture-of-Experts building blocks shared by every ptmoe model family: the one import surface of its parts.

The data path of one MoE feed-forward layer::

    hidden_states ──► router ──► RouterOutput(router_logits, router_probs, topk_index, topk_weights, dispatch_mask)
                                      │
                                      └─► experts.{i} (only the tokens routed to i) ──► weighted sum ──► output

The code lives in sibling modules of this folder, named by what they hold:

- ``moe_config.py``: router names, MoE layer specification, config field validation, `MoeConfigMixin`;
- ``input_checks.py``: `check_input_shapes`, the shape checks at the top of the forwards;
- ``routers.py``: `RouterOutput`, `TopKRouter` and its variants, `build_router`;
- ``moe_block.py``: `MoeExpert` and `SparseMoeBlock` (dispatch and combine);
- ``router_losses.py``: the router losses and `RouterLosses`;
- ``moe_params.py``: `init_router` and `count_parameters`;
- ``moe_loading.py``: checked loading (`load_checked`, `check_local_checkpoint`, `check_expert_keys`, …);
- ``moe_pretrained.py``: `MoePreTrainedMixin` and `ForcedRouting`.

One rule for imports: the modeling and configuration files and the rest of ptmoe import these names from here
(``from .moe import X``, ``ptmoe.models.moe.X``); only the parts import one another directly.

These files travel inside Hub checkpoints next to the modeling files (``trust_remote_code``): ``save_pretrained``
copies the modeling file and every sibling module it imports relatively, recursively, so this folder stays flat
and its files import only torch, transformers and their siblings — never ``ptmoe``.
"""

from __future__ import annotations

from .input_checks import check_input_shapes
from .moe_block import MoeExpert, SparseMoeBlock
from .moe_config import (
    COMBINE_WEIGHTS,
    EXPERT_CHOICE_DECODER_ERROR,
    HASH_ROUTER_SEED,
    MOE_FIELDS_DOCSTRING,
    ROUTER_TYPES,
    SWITCH_PRESET,
    MoeConfigMixin,
    check_finite_fields,
    resolve_moe_layers,
    router_type_of,
    validate_decoder_router,
    validate_moe_fields,
    validate_routing_extensions,
)
from .moe_loading import (
    CheckpointMismatchError,
    check_expert_keys,
    check_local_checkpoint,
    disable_bnb_cpu_weight_repacking,
    keep_modules_unquantized,
    load_checked,
    reduce_unused_expert_gradients,
)
from .moe_params import count_parameters, init_router
from .moe_pretrained import ForcedRouting, MoePreTrainedMixin
from .router_losses import (
    RouterLosses,
    compute_router_losses,
    domain_names,
    expert_domain_ids,
    importance_loss,
    layer_router_losses,
    load_balancing_loss,
    router_domain_loss,
    router_z_loss,
    total_loss,
    wants_router_losses,
)
from .routers import (
    ExpertChoiceRouter,
    HashRouter,
    HierarchicalRouter,
    NoisyTopKRouter,
    RouterOutput,
    SwitchRouter,
    TopKRouter,
    build_router,
)

__all__ = [
    # moe_config
    "ROUTER_TYPES",
    "COMBINE_WEIGHTS",
    "HASH_ROUTER_SEED",
    "EXPERT_CHOICE_DECODER_ERROR",
    "SWITCH_PRESET",
    "resolve_moe_layers",
    "check_finite_fields",
    "validate_moe_fields",
    "validate_routing_extensions",
    "router_type_of",
    "validate_decoder_router",
    "MOE_FIELDS_DOCSTRING",
    "MoeConfigMixin",
    # input_checks
    "check_input_shapes",
    # routers
    "RouterOutput",
    "TopKRouter",
    "SwitchRouter",
    "NoisyTopKRouter",
    "HashRouter",
    "ExpertChoiceRouter",
    "HierarchicalRouter",
    "build_router",
    # moe_block
    "MoeExpert",
    "SparseMoeBlock",
    # router_losses
    "load_balancing_loss",
    "router_z_loss",
    "importance_loss",
    "router_domain_loss",
    "domain_names",
    "expert_domain_ids",
    "RouterLosses",
    "wants_router_losses",
    "total_loss",
    "layer_router_losses",
    "compute_router_losses",
    # moe_params
    "init_router",
    "count_parameters",
    # moe_loading
    "CheckpointMismatchError",
    "check_expert_keys",
    "disable_bnb_cpu_weight_repacking",
    "keep_modules_unquantized",
    "reduce_unused_expert_gradients",
    "check_local_checkpoint",
    "load_checked",
    # moe_pretrained
    "MoePreTrainedMixin",
    "ForcedRouting",
]
