"""`MoePreTrainedMixin`: the `PreTrainedModel` behaviour shared by the MoE families.

Checked `from_pretrained`, parallel plans trimmed to the model's modules, weight init of registered classes, and
domain routing (`experts_named`, `route_to` with its `ForcedRouting` context manager). Part of the model code that
travels inside Hub checkpoints: it imports only torch, transformers and its sibling modules, never ``ptmoe``.
"""

from __future__ import annotations

import itertools

from transformers.distributed.parallel_utils import replace_layer_number_by_wildcard

from .moe_loading import load_checked
from .router_losses import domain_names
from .routers import HashRouter, TopKRouter


class MoePreTrainedMixin:
    """`PreTrainedModel` behaviour shared by the MoE families (put it first in the bases)."""

    # `loss` already averages over tokens and adds the router losses: the Trainer must still divide it by the
    # gradient-accumulation steps and must not rescale it by the number of processes.
    accepts_loss_kwargs = False

    def init_parallel_plans(self) -> None:
        """transformers' plan collection, keeping only the rules that name a module or parameter of this model.

        The config families declare one plan for all their models (`base_model_tp_plan`, `base_model_fsdp_plan`):
        rules for dense FFNs, shared experts, gated projections or the decoder name nothing in a model without them,
        and transformers would warn about each of those rules at every distributed load.
        """
        super().init_parallel_plans()
        names = {
            replace_layer_number_by_wildcard(name)
            for name, _ in itertools.chain(self.named_modules(), self.named_parameters())
        }
        for plan in ("_tp_plan", "_ep_plan", "_pp_plan", "_fsdp_plan"):
            rules = getattr(self, plan, None) or {}
            setattr(
                self,
                plan,
                {key: style for key, style in rules.items() if not isinstance(key, str) or key in names},
            )

    def _initialize_weights(self, module, is_custom_code: bool = False):
        # Registered classes count as "custom code", and transformers then skips modules without direct
        # parameters (attention blocks, experts), so their `_init_weights` rules never ran. Every init here goes
        # through `transformers.initialization`, which already leaves loaded tensors alone.
        super()._initialize_weights(module, is_custom_code=False)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, refusing checkpoints whose experts or routers do not match."""
        return load_checked(super().from_pretrained, *args, **kwargs)

    def resize_token_embeddings(
        self,
        new_num_tokens: int | None = None,
        pad_to_multiple_of: int | None = None,
        mean_resizing: bool = True,
    ):
        """`PreTrainedModel.resize_token_embeddings`, also fitting every hash router's token → expert table.

        Hash routers index their table by token id, so it must cover the new vocabulary: existing ids keep their
        experts, new ids get a seeded assignment (`HashRouter.resize_table`). The resized table is saved with the
        model, which therefore reloads with its new `vocab_size`.
        """
        embeddings = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        # after `pad_to_multiple_of`, as transformers sets `config.vocab_size`
        vocab_size = embeddings.weight.shape[0]
        for module in self.modules():
            if isinstance(module, HashRouter):
                module.resize_table(vocab_size)
        return embeddings

    def experts_named(self, *domains: str) -> list[int]:
        """The expert ids whose `config.expert_names` entry is one of `domains` (a `ValueError` naming unknowns)."""
        names = self.config.expert_names
        if not names:
            raise ValueError(
                "this model has no `expert_names` in its config: name the experts (ptmoe.merge_experts does, or set "
                "config.expert_names to one domain name per expert) or pass expert ids to `route_to`"
            )
        unknown = [d for d in domains if d not in names]
        if unknown:
            raise ValueError(f"no expert is named {unknown}; the experts are named {domain_names(names)}")
        return [e for e, name in enumerate(names) if name in domains]

    def route_to(self, *domains: str | int | None) -> ForcedRouting:
        """Force every MoE layer to route tokens only to the experts named `domains` (or to expert ids).

        The router still weighs the allowed experts (top-k over them, renormalised as usual); with fewer allowed
        experts than `num_experts_per_tok`, the extra slots are not dispatched. `model.route_to(None)` restores
        learned routing; used as a context manager, the previous routing comes back on exit::

            model.route_to("juridico")            # from now on
            with model.route_to("saude", "informal"):
                ...                                # only inside the block

        Set by this explicit call (not inside `forward`); the setting is not saved with the model. A hash router
        sends a token whose hashed expert is not allowed to the first allowed expert.
        """
        routers = [m for m in self.modules() if isinstance(m, TopKRouter)]
        previous = [router.forced_experts for router in routers]
        if domains == (None,) or not domains:
            experts = None
        elif all(isinstance(d, int) and not isinstance(d, bool) for d in domains):
            experts = list(domains)
        elif all(isinstance(d, str) for d in domains):
            experts = self.experts_named(*domains)
        else:
            raise ValueError(
                f"`route_to` takes domain names or expert ids (not both), or None; got {domains!r}"
            )
        for router in routers:
            router.force_experts(experts)
        return ForcedRouting(routers, previous)


class ForcedRouting:
    """Returned by `route_to`: a context manager that restores the routing in force before the call."""

    def __init__(self, routers: list[TopKRouter], previous: list[tuple[int, ...] | None]):
        self._routers, self._previous = routers, previous

    def __enter__(self) -> ForcedRouting:
        return self

    def __exit__(self, *exc_info) -> None:
        for router, experts in zip(self._routers, self._previous, strict=True):
            router.force_experts(experts)
