"""Sparse upcycling: turn a dense BERT / RoBERTa / T5 checkpoint into a ptmoe Mixture-of-Experts checkpoint.

Upcycling (Komatsuzaki et al., ICLR 2023) starts an MoE from a dense model the user already trusts: every weight
outside the feed-forward networks (FFNs) is carried over unchanged, and the FFN of every MoE layer becomes
`num_experts` experts initialised from it. The path through this package::

    dense model / path / Hub id ──► ArchitectureMap (chosen from the dense *class*, never from key names)
        ──► MoE config (dense config + MoE fields + provenance)           validated before any weight is read
        ──► upcycle_state_dict: explicit key map + expert init method   pure function, shape-checked
        ──► MoE model built on the meta device, tensors assigned         no second copy of the weights
        ──► routers / non-persistent buffers initialised by the MoE model itself (seeded)

Initialisation methods (`method=`):

- ``"copy"``: every expert is a copy of the dense FFN (Komatsuzaki et al. 2023). Exact at initialisation when the
  combine weights of a token sum to 1: `router_type="topk"` with `norm_topk_prob=True` (any `router_init`),
  `"noisy_topk"` in eval mode, and `"hash"` (weight 1). Not exact for `"switch"`: its combine weight is the
  router probability of the chosen expert (< 1, so the FFN output is scaled down) and tokens over the expert
  capacity are dropped.
- ``"noise"``: copy, plus Gaussian noise with standard deviation ``noise_std · std(W)`` for every expert tensor
  ``W`` (its own statistics), drawn independently per expert from a seeded generator, to break the symmetry.
- ``"drop"``: Drop-Upcycling (Nakamura et al., ICLR 2025): per expert, a random subset of ``drop_ratio`` of the
  intermediate neurons (a different subset per expert) is re-initialised: their rows of `wi` (or `wi_0`/`wi_1`),
  their `wi` bias entries and their columns of `wo` are drawn from N(mean, std) of the corresponding dense
  matrix; the other neurons stay copies of the dense FFN.
- ``"partition"``: MoEfication (Zhang et al., 2022) / LLaMA-MoE (Zhu et al., 2024): the intermediate neurons are
  split into `num_experts` disjoint groups (`partition="random"`: a seeded permutation; `"clustered"`: balanced
  spherical k-means on the rows of `wi` (or `[wi_0 | wi_1]`), so an expert holds neurons that detect similar
  directions),
  and expert e holds its group's rows of `wi` and columns of `wo`, with ``expert_intermediate_size =
  intermediate_size / num_experts``. Each expert's `wo.weight` is multiplied by `num_experts` and keeps the full
  `wo.bias` (BERT). With `router_init="zeros"` (the default for this method) every router probability is 1/E,
  so with all experts active (`num_experts_per_tok == num_experts`, renormalised top-k) the MoE output is
  ``Σ_e (1/E)·(E·W_e·h_e + b) = W·h + b``: exactly the dense FFN. With k < E and the uniform weights 1/k of a
  zero router the output is ``(E/k)·Σ_{chosen} W_e·h_e + b``, whose expectation over a uniformly random choice of
  k experts is again the dense FFN, while the active compute shrinks to k/E of it.

"Exact" means on real tokens: MoE layers send padding tokens to no expert, so padding positions' own hidden states
differ from the dense model's (they are masked out of attention and of every loss).

The package, by what each part does:

    families.py     per-architecture key maps (`ArchitectureMap`, `FfnStack`, `Family`, `FAMILIES`)
    config.py       the MoE config (`build_moe_config`)
    experts.py      expert initialisation and neuron splits (`init_experts`, `split_ffn`, `partition_groups`, …)
    state_dict.py   the pure state-dict conversion (`upcycle_state_dict`, `router_keys`)
    build.py        assigning the tensors to a meta-device MoE model (`assign_tensors`, `initialise_remaining`)
    api.py          `upcycle`
    save.py         `save_upcycled`
    command.py      the `ptmoe upcycle` command line
"""

from .api import upcycle
from .build import assign_tensors as assign_tensors
from .build import initialise_remaining as initialise_remaining
from .command import add_upcycle_arguments as add_upcycle_arguments
from .command import layers_argument as layers_argument
from .command import run_upcycle_command as run_upcycle_command
from .config import build_moe_config
from .experts import CALIBRATED_STRATEGIES as CALIBRATED_STRATEGIES
from .experts import (
    PARTITION_STRATEGIES,
    UPCYCLING_METHODS,
    balanced_kmeans,
    init_experts,
    neuron_importance,
    partition_groups,
    split_ffn,
)
from .families import FAMILIES as FAMILIES
from .families import (
    SUPPORTED_ARCHITECTURES,
    ArchitectureMap,
    FfnStack,
    architecture_for_checkpoint,
    architecture_for_model,
)
from .families import Family as Family
from .families import import_class as import_class
from .families import moe_class_for as moe_class_for
from .save import save_upcycled
from .state_dict import router_keys as router_keys
from .state_dict import upcycle_state_dict

__all__ = [
    "UPCYCLING_METHODS",
    "PARTITION_STRATEGIES",
    "SUPPORTED_ARCHITECTURES",
    "ArchitectureMap",
    "FfnStack",
    "architecture_for_model",
    "architecture_for_checkpoint",
    "build_moe_config",
    "init_experts",
    "partition_groups",
    "split_ffn",
    "neuron_importance",
    "balanced_kmeans",
    "upcycle_state_dict",
    "upcycle",
    "save_upcycled",
    "assign_tensors",
    "initialise_remaining",
    "import_class",
    "layers_argument",
]
