"""What the training loop calls around each optimizer step, so that it never branches on them:
an IFC expert scope (:class:`moe_lab.families.ifc.scope.ExpertScope`), the aux-loss-free
router bias update (:class:`RouterBias`) and the end of a global batch's loads
(:class:`GlobalBatchLoads`)."""

from __future__ import annotations

from torch import nn

from moe_lab.nn.routing import TopKRouter
from moe_lab.train.distributed import Dist

__all__ = ["GlobalBatchLoads", "RouterBias", "StepHook"]


class StepHook:
    """Called by the loop around every optimizer step; both methods default to nothing."""

    def before_step(self, lr: float) -> None:
        """Just before ``optimizer.step()`` of an accepted step, at learning rate ``lr``."""

    def after_step(self, skipped: bool) -> None:
        """After the step: ``skipped`` when the loss was non-finite or a spike and the
        optimizer did not step."""


class RouterBias(StepHook):
    """Aux-loss-free balancing (DeepSeek-V3): after each accepted step every biased router moves
    its bias against the expert loads of the global batch (summed over data-parallel ranks)."""

    def __init__(self, routers: list[TopKRouter], dist: Dist) -> None:
        self.routers, self.dist = routers, dist

    @classmethod
    def of(cls, model: nn.Module, dist: Dist) -> RouterBias | None:
        """The hook for ``model``'s routers with ``bias_update_rate > 0``; None if it has none."""
        routers = [
            m for m in model.modules() if isinstance(m, TopKRouter) and m.cfg.bias_update_rate > 0
        ]
        return cls(routers, dist) if routers else None

    def after_step(self, skipped: bool) -> None:
        for router in self.routers:
            if skipped:  # a rejected batch's load must not steer the next bias update
                router.tokens_per_expert.zero_()
            else:
                self.dist.sum_(router.tokens_per_expert)
                router.update_bias()


class GlobalBatchLoads(StepHook):
    """``lbl_granularity=global_batch``: a router sums its loads over the micro-batches of one
    optimizer step; after the step they start again from zero."""

    def __init__(self, routers: list[TopKRouter]) -> None:
        self.routers = routers

    @classmethod
    def of(cls, model: nn.Module) -> GlobalBatchLoads | None:
        routers = [
            m
            for m in model.modules()
            if isinstance(m, TopKRouter) and m.cfg.lbl_granularity == "global_batch"
        ]
        return cls(routers) if routers else None

    def after_step(self, skipped: bool) -> None:
        for router in self.routers:
            router.reset_step_counts()
