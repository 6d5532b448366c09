"""Expert initialisation: pure functions of the dense FFN of one layer (copy / noise / drop / partition).

`init_experts` builds the experts of one MoE layer by copying the dense FFN, adding seeded noise or re-drawing a
fraction of its neurons (Drop-Upcycling); `split_ffn` partitions the intermediate neurons into experts (random,
balanced k-means on the weights, or co-activation on calibration text) with an optional shared expert of the most
important neurons (`neuron_importance`). Seeds are derived per (stack, layer, purpose) by `_derived_seed`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch

UPCYCLING_METHODS = ("copy", "noise", "drop", "partition")
PARTITION_STRATEGIES = ("random", "clustered", "coactivation")
# Splits that need the FFN activations of the dense model on calibration text.
CALIBRATED_STRATEGIES = ("coactivation",)
_KMEANS_ITERATIONS = 25


# --------------------------------------------------------------------------------------------------------------
# Expert initialisation (pure functions of the dense FFN of one layer)
# --------------------------------------------------------------------------------------------------------------
def _derived_seed(seed: int, *parts) -> int:
    """A seed for one (stack, layer, purpose), independent of the order in which layers are processed."""
    digest = hashlib.sha256(":".join(str(p) for p in (seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def _generator(seed: int, *parts) -> torch.Generator:
    return torch.Generator().manual_seed(_derived_seed(seed, *parts))


def _input_roles(ffn: Mapping[str, torch.Tensor]) -> list[str]:
    """The projections whose *rows* are intermediate neurons (`wi`, or `wi_0` and `wi_1`)."""
    return sorted({key.split(".")[0] for key in ffn if key.startswith("wi")})


def _stats(tensor: torch.Tensor) -> tuple[float, float]:
    values = tensor.float()
    return values.mean().item(), (values.std().item() if values.numel() > 1 else 0.0)


def _normal(shape, mean: float, std: float, like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # Drawn in fp32 on the CPU generator, then cast, so that a seed gives the same experts for every dtype/device.
    values = torch.empty(shape, dtype=torch.float32).normal_(mean, std, generator=generator)
    return values.to(dtype=like.dtype, device=like.device)


def _copy_experts(ffn, num_experts: int, clone: bool) -> list[dict[str, torch.Tensor]]:
    # Without `clone` (the dense model is ours and discarded afterwards) expert 0 reuses the dense tensors.
    return [
        {key: tensor if (expert == 0 and not clone) else tensor.clone() for key, tensor in ffn.items()}
        for expert in range(num_experts)
    ]


def _noise_experts(ffn, num_experts: int, noise_std: float, generator) -> list[dict[str, torch.Tensor]]:
    scales = {key: noise_std * _stats(tensor)[1] for key, tensor in ffn.items()}
    experts = []
    for _ in range(num_experts):
        expert = {}
        for key, tensor in ffn.items():
            noise = _normal(tensor.shape, 0.0, scales[key], tensor, generator) if scales[key] > 0 else None
            expert[key] = tensor.clone() if noise is None else noise.add_(tensor)
        experts.append(expert)
    return experts


def _drop_experts(ffn, num_experts: int, drop_ratio: float, generator) -> list[dict[str, torch.Tensor]]:
    intermediate_size = ffn["wo.weight"].shape[1]
    num_dropped = max(1, int(drop_ratio * intermediate_size))  # ⌊r·d_ff⌋ as in the paper, at least one neuron
    # Statistics of the *dense* matrices (Nakamura et al. 2025, §3.2), one (mean, std) per tensor.
    neuron_tensors = [key for key in ffn if key.startswith("wi")] + ["wo.weight"]
    stats = {key: _stats(ffn[key]) for key in neuron_tensors}
    experts = []
    for _ in range(num_experts):
        dropped = torch.randperm(intermediate_size, generator=generator)[:num_dropped]
        expert = {key: tensor.clone() for key, tensor in ffn.items()}
        for key in neuron_tensors:
            mean, std = stats[key]
            tensor = expert[key]
            if key == "wo.weight":  # (hidden, intermediate): neurons are columns
                tensor[:, dropped] = _normal((tensor.shape[0], num_dropped), mean, std, tensor, generator)
            else:  # wi / wi_0 / wi_1 weight (intermediate, hidden) rows, or their bias entries
                tensor[dropped] = _normal((num_dropped, *tensor.shape[1:]), mean, std, tensor, generator)
        experts.append(expert)
    return experts


def _balanced_assignment(similarity: torch.Tensor, size: int) -> torch.Tensor:
    """Assign every row to a cluster, `size` rows per cluster, preferring each row's most similar open cluster.

    Rounds of proposals: every unassigned row proposes to its most similar cluster that still has room, and each
    cluster accepts its most similar proposers up to its remaining room. Every round fills a cluster or assigns all
    proposers, so there are at most `num_clusters` rounds (vectorised; no Python loop over rows).

    Args:
        similarity (`torch.Tensor` of shape `(N, C)`): row-to-centroid similarity.
        size (`int`): rows per cluster (`N = C · size`).

    Returns:
        `(N,)` `LongTensor` of cluster ids.
    """
    num_items, num_clusters = similarity.shape
    assignment = torch.full((num_items,), -1, dtype=torch.long)
    remaining = torch.full((num_clusters,), size, dtype=torch.long)
    while True:
        unassigned = (assignment < 0).nonzero().squeeze(-1)
        if unassigned.numel() == 0:
            return assignment
        scores = similarity[unassigned].masked_fill(remaining.eq(0), float("-inf"))  # (U, C)
        best_score, choice = scores.max(dim=1)
        for cluster in choice.unique().tolist():
            proposing = choice.eq(cluster)
            order = torch.argsort(best_score[proposing], descending=True, stable=True)
            accepted = unassigned[proposing][order[: int(remaining[cluster])]]
            assignment[accepted] = cluster
            remaining[cluster] -= accepted.numel()


def balanced_kmeans(
    features: torch.Tensor, num_clusters: int, generator: torch.Generator
) -> list[torch.Tensor]:
    """Split the rows of `features` into `num_clusters` equal-size clusters by balanced spherical k-means.

    Rows are compared by cosine similarity (rows and centroids are L2-normalised), so a cluster gathers rows that
    point in similar directions whatever their norm.

    Args:
        features (`torch.Tensor` of shape `(N, D)`): one row per item; `N` must be divisible by `num_clusters`.
        num_clusters (`int`): number of clusters.
        generator (`torch.Generator`): seeds the initial centroids (distinct random rows).

    Returns:
        `num_clusters` sorted `LongTensor`s of `N / num_clusters` row indices each, disjoint and covering all rows.
    """
    num_items = features.shape[0]
    if num_items % num_clusters != 0:
        raise ValueError(f"cannot split {num_items} rows into {num_clusters} equal clusters")
    size = num_items // num_clusters
    features = torch.nn.functional.normalize(features.float(), dim=1)
    centroids = features[torch.randperm(num_items, generator=generator)[:num_clusters]]
    assignment = None
    for _ in range(_KMEANS_ITERATIONS):
        new_assignment = _balanced_assignment(features @ centroids.T, size)  # similarity (N, C)
        if assignment is not None and torch.equal(new_assignment, assignment):
            break
        assignment = new_assignment
        members = torch.nn.functional.one_hot(assignment, num_clusters).T.to(features.dtype)  # (C, N)
        centroids = torch.nn.functional.normalize(
            members @ features, dim=1
        )  # a matmul beats index_add_ on CPU
    return [(assignment == c).nonzero().squeeze(-1) for c in range(num_clusters)]


def partition_groups(
    ffn: Mapping[str, torch.Tensor],
    num_experts: int,
    strategy: str,
    generator: torch.Generator,
    activations: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Disjoint groups of intermediate neurons, one per expert (sorted indices, equal sizes).

    Args:
        ffn (`dict`): the dense FFN of one layer (`wi.weight`, …, `wo.weight`).
        num_experts (`int`): number of groups; must divide the intermediate size.
        strategy (`str`): "random" (a seeded permutation), "clustered" (balanced spherical k-means on the rows of
            the input projection(s), `wi` or `[wi_0 | wi_1]`) or "coactivation" (balanced spherical k-means on the
            neurons' positive activations over calibration tokens: neurons that fire on the same tokens share an
            expert, MoEfication's co-activation split with k-means in place of graph partitioning).
        generator (`torch.Generator`): the layer's seeded generator.
        activations (`torch.Tensor` of shape `(T, I)`, *optional*): the layer's activations on calibration tokens
            (needed by "coactivation").
    """
    intermediate_size = ffn["wo.weight"].shape[1]
    if intermediate_size % num_experts != 0:
        raise ValueError(
            f"method='partition' cannot split {intermediate_size} intermediate neurons into {num_experts} experts"
        )
    if strategy == "random":
        groups = torch.randperm(intermediate_size, generator=generator).view(num_experts, -1)
        return [group.sort().values for group in groups]
    if strategy == "coactivation":
        if activations is None:
            raise ValueError("partition='coactivation' needs calibration text (`calibration=`)")
        # (I, T): a neuron's firing pattern; cosine similarity of two patterns = their normalised co-activation.
        features = activations.float().clamp(min=0).T
        # A neuron that never fires on the calibration text has a zero pattern: a tiny random direction keeps
        # k-means defined for it (it joins an arbitrary group).
        features = features + 1e-6 * torch.rand(features.shape, generator=generator)
        return balanced_kmeans(features, num_experts, generator)
    rows = torch.cat([ffn[f"{role}.weight"] for role in _input_roles(ffn)], dim=1)  # (I, H) or (I, 2H)
    return balanced_kmeans(rows, num_experts, generator)


def neuron_importance(ffn: Mapping[str, torch.Tensor], activations: torch.Tensor) -> torch.Tensor:
    """`(I,)` importance of each intermediate neuron: its mean contribution to the FFN output on calibration tokens.

    ``importance_i = mean_t |a_ti| · ‖wo[:, i]‖₂`` — the expected norm of what neuron i adds to the output. MoEBERT
    (Zuo et al. 2022) ranks neurons by a gradient sensitivity on task data; this label-free proxy needs only
    unlabeled text and ranks the same way when the loss is locally linear in the FFN output.
    """
    return activations.float().abs().mean(dim=0) * ffn["wo.weight"].float().norm(dim=0)


def split_ffn(
    ffn: Mapping[str, torch.Tensor],
    num_experts: int,
    strategy: str,
    generator: torch.Generator,
    *,
    num_shared_neurons: int = 0,
    activations: torch.Tensor | None = None,
    combine_weights: str = "router",
    num_experts_per_tok: int | None = None,
) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor] | None]:
    """Split one dense FFN into `num_experts` routed experts (+ one shared expert of the top neurons).

    With `num_shared_neurons = S > 0`, the S most important neurons (`neuron_importance`) form an always-active
    shared expert holding the full output bias; the other ``I - S`` neurons are split by `strategy`. The layout is
    exact with all experts active:

    - `combine_weights="router"` (uniform router, renormalised weights 1/E): routed `wo` weights are scaled by E;
      without shared neurons each routed expert keeps the full bias (Σ 1/E · b = b).
    - `combine_weights="ones"` (chosen experts summed, MoEfication): routed `wo` weights unscaled; without shared
      neurons each routed expert holds ``b / k``, so the k chosen experts add the bias once.

    Returns:
        `(experts, shared)`: one dict per routed expert and the shared expert's dict (or None when S = 0).
    """
    intermediate_size = ffn["wo.weight"].shape[1]
    neurons = torch.arange(intermediate_size)
    shared_neurons = None
    if num_shared_neurons:
        if activations is None:
            raise ValueError(
                "`num_shared_neurons` > 0 ranks neurons on calibration text: pass `calibration=`"
            )
        ranked = torch.argsort(neuron_importance(ffn, activations), descending=True, stable=True)
        shared_neurons = ranked[:num_shared_neurons].sort().values
        neurons = ranked[num_shared_neurons:].sort().values
    routed_ffn = {
        key: (tensor.index_select(1, neurons) if key == "wo.weight" else tensor.index_select(0, neurons))
        if key != "wo.bias"
        else tensor
        for key, tensor in ffn.items()
    }
    routed_activations = activations.index_select(1, neurons) if activations is not None else None
    groups = [
        neurons[g] for g in partition_groups(routed_ffn, num_experts, strategy, generator, routed_activations)
    ]
    scale = num_experts if combine_weights == "router" else 1
    k = num_experts_per_tok or num_experts
    experts = []
    for group in groups:
        expert = {}
        for key, tensor in ffn.items():
            if key == "wo.weight":
                expert[key] = tensor.index_select(1, group).mul_(scale)
            elif key == "wo.bias":
                if shared_neurons is not None:
                    expert[key] = torch.zeros_like(tensor)  # the shared expert adds the bias
                else:
                    expert[key] = tensor.clone() if combine_weights == "router" else tensor / k
            else:
                expert[key] = tensor.index_select(0, group)
        experts.append(expert)
    shared = None
    if shared_neurons is not None:
        shared = {
            key: tensor.index_select(1, shared_neurons)
            if key == "wo.weight"
            else (tensor.clone() if key == "wo.bias" else tensor.index_select(0, shared_neurons))
            for key, tensor in ffn.items()
        }
    return experts, shared


def _partition_experts(ffn, num_experts: int, strategy: str, generator) -> list[dict[str, torch.Tensor]]:
    return split_ffn(ffn, num_experts, strategy, generator)[0]


def init_experts(
    ffn: Mapping[str, torch.Tensor],
    num_experts: int,
    method: str = "copy",
    generator: torch.Generator | None = None,
    noise_std: float = 0.01,
    drop_ratio: float = 0.5,
    partition: str = "random",
    clone: bool = True,
) -> list[dict[str, torch.Tensor]]:
    """Initialise the experts of one MoE layer from the dense FFN of that layer.

    Args:
        ffn (`dict[str, torch.Tensor]`): the dense FFN in expert naming: `"wi.weight"` (intermediate, hidden),
            optional `"wi.bias"`, or `"wi_0.weight"` / `"wi_1.weight"` (gated); `"wo.weight"` (hidden,
            intermediate), optional `"wo.bias"`.
        num_experts (`int`): number of experts to build.
        method (`str`): "copy", "noise", "drop" or "partition" (see the package docstring).
        generator (`torch.Generator`, *optional*): source of randomness (a fresh seed-0 generator when omitted).
        noise_std (`float`): "noise": noise standard deviation relative to each tensor's standard deviation.
        drop_ratio (`float`): "drop": fraction of intermediate neurons re-initialised per expert, in (0, 1].
        partition (`str`): "partition": "random" or "clustered".
        clone (`bool`): "copy": when False expert 0 shares the dense tensors (for a dense model being discarded).

    Returns:
        One `dict` per expert with the keys of `ffn`.
    """
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    if method == "copy":
        return _copy_experts(ffn, num_experts, clone)
    if method == "noise":
        return _noise_experts(ffn, num_experts, noise_std, generator)
    if method == "drop":
        return _drop_experts(ffn, num_experts, drop_ratio, generator)
    if method == "partition":
        return _partition_experts(ffn, num_experts, partition, generator)
    raise ValueError(f"`method` must be one of {UPCYCLING_METHODS}, got {method!r}")
