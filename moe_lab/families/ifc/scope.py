"""Which experts a training run sees and which one it updates: the heart of update isolation.

An :class:`ExpertScope` restricts every router of a model to the ``visible`` experts (the others
are masked before the softmax and the top-k, so they neither run nor receive gradient) and, when
``trained`` names one expert, freezes everything else: only that expert's rows of each MoE layer's
``w1``/``v1``/``w2`` and its row of each router may change. Those rows live inside tensors shared
with the other experts, so the scope

* zeroes the other rows' gradients (so the clipping norm is the trained expert's own norm and the
  optimizer's moments of the other rows stay exactly zero, which makes their Adam update zero), and
* applies AdamW's decoupled weight decay to the trained rows itself, with the optimizer's decay set
  to 0 for these tensors: a decay of the whole tensor would move the frozen experts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from moe_lab.nn.experts.moe import MoE
from moe_lab.train.hooks import StepHook

__all__ = ["ExpertScope", "expert_rows", "key_rows", "restrict_experts"]


def restrict_experts(model: nn.Module, experts: Sequence[int] | None) -> list[MoE]:
    """Route every MoE layer of ``model`` to ``experts`` only (None: to all again; see
    :meth:`~moe_lab.nn.routing.topk.TopKRouter.restrict`); returns those layers.

    Raises:
        ValueError: the model has no MoE layers.
    """
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    if not moes:
        raise ValueError("restricting experts needs a model with MoE layers")
    for moe in moes:
        moe.router.restrict(None if experts is None else list(experts))
    return moes


def expert_rows(moe: MoE, expert: int) -> dict[str, tuple[Tensor, slice]]:
    """The tensors of ``moe`` that hold per-expert rows, each with ``expert``'s row slice."""
    F = moe.cfg.expert_hidden
    rows = slice(expert * F, (expert + 1) * F)
    return {
        "w1": (moe.w1, rows),
        "v1": (moe.v1, rows),
        "w2": (moe.w2, rows),
        "router.gate.weight": (moe.router.gate.weight, slice(expert, expert + 1)),
    }


def key_rows(model: nn.Module, key: str, expert: int) -> slice:
    """``expert``'s rows of the per-expert entry ``key`` (``layers.1.feed_forward.w1``)."""
    module_name, _, tensor_name = key.partition(".feed_forward.")
    return expert_rows(model.get_submodule(f"{module_name}.feed_forward"), expert)[tensor_name][1]


class ExpertScope(StepHook):
    """Route over ``visible`` experts; update only expert ``trained`` (None: every parameter).

    Call :meth:`apply` on the model before building the optimizer, pass :meth:`param_groups` to
    it, and call :meth:`before_step` just before each optimizer step (see
    :func:`moe_lab.train.loop`).
    """

    def __init__(self, visible: Sequence[int], trained: int | None = None) -> None:
        if trained is not None and trained not in visible:
            raise ValueError(f"the trained expert {trained} must be visible ({list(visible)})")
        self.visible, self.trained = list(visible), trained
        self._rows: list[tuple[Tensor, slice]] = []

    def apply(self, model: nn.Module) -> None:
        moes = restrict_experts(model, self.visible)
        if self.trained is None:
            return
        model.requires_grad_(False)
        self._rows = []
        for moe in moes:
            for tensor, rows in expert_rows(moe, self.trained).values():
                tensor.requires_grad_(True)
                mask = torch.zeros(tensor.shape[0], 1, dtype=torch.bool, device=tensor.device)
                mask[rows] = True
                tensor.register_hook(lambda g, mask=mask: torch.where(mask, g, torch.zeros_like(g)))
                self._rows.append((tensor, rows))

    def param_groups(self, weight_decay: float) -> list[dict] | None:
        """Optimizer groups for a scoped run; None when every parameter trains as usual."""
        if self.trained is None:
            return None
        self.weight_decay = weight_decay
        return [{"params": [t for t, _ in self._rows], "weight_decay": 0.0}]

    @torch.no_grad()
    def before_step(self, lr: float) -> None:
        """AdamW's decoupled decay ``p -= lr * wd * p``, on the trained rows only."""
        if self.trained is None or self.weight_decay == 0:
            return
        for tensor, rows in self._rows:
            tensor[rows].mul_(1 - lr * self.weight_decay)
