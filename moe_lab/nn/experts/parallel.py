"""Expert parallelism for the reference MoE: each of the W ranks of an ep group holds E / W experts,
and tokens travel to them (the training loop may keep several such groups: ``parallel.ep_degree``).

Every rank routes its own tokens with the full (replicated) router, then two all-to-alls move each
kept (token, slot) row to the rank that holds its expert and the expert outputs back (GShard,
MegaBlocks' ``parallel_forward_once``, torchtitan's ``AllToAllTokenDispatcher``):

1. sort the rows by expert, as the single-process layer does; expert e lives on rank
   ``e // (E / W)``, so the rows for each rank are one contiguous run;
2. exchange the per-expert row counts, then the rows (``all_to_all_single`` with uneven splits,
   differentiable: its backward is the reverse all-to-all);
3. the received rows arrive grouped by source rank; a stable sort groups them by local expert, and
   each local expert runs once on its segment (:func:`~moe_lab.nn.experts.fused.run_experts`, which
   reads the rows through that order and writes each output back to its row, so the return trip
   keeps the arrival order).

The result equals the single-process layer on the union of all ranks' tokens (tested with gloo, two
processes). Capacity, when set, counts each rank's own tokens (GShard's per-group capacity).
Gradients of an expert's weights sum the contributions of the group's tokens: the training loop
sums them over the copies of the expert and divides by the world size, as DDP averages the
replicated parameters (:meth:`moe_lab.train.distributed.Dist.clip_grad_norm_`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moe_lab.config import ConfigError
from moe_lab.nn.experts.fused import run_experts

__all__ = ["dispatch_to_experts", "expert_parameters", "gather_experts", "shard_experts"]

EXPERT_WEIGHTS = ("w1", "v1", "w2")


def expert_layers(model: nn.Module) -> list[nn.Module]:
    """The MoE layers of ``model`` (the reference MoE and its MegaBlocks subclass): the modules
    with an expert-parallel group. Found by that attribute, since the MoE layer itself imports
    this module to dispatch its tokens."""
    return [m for m in model.modules() if hasattr(m, "ep_group")]


def shard_experts(model: nn.Module, group: dist.ProcessGroup | None = None) -> int:
    """Keep only this rank's experts in every MoE layer of ``model``; return how many layers.

    Rank r of W keeps experts ``[r * E / W, (r + 1) * E / W)``: their rows of ``w1``, ``v1`` and
    ``w2``. Call it after the (rank-identical) initialisation or loading of the full model.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    layers = expert_layers(model)
    for layer in layers:
        E = layer.cfg.num_experts
        if E % world:
            raise ConfigError(
                f"expert parallelism over {world} ranks needs model.moe.num_experts divisible "
                f"by {world}; got {E}"
            )
        rows = layer.cfg.expert_hidden * (E // world)
        for name in EXPERT_WEIGHTS:
            full = getattr(layer, name)
            local = full.detach()[rank * rows : (rank + 1) * rows].clone()
            setattr(layer, name, nn.Parameter(local, requires_grad=full.requires_grad))
        layer.ep_group = group if group is not None else dist.group.WORLD
    return len(layers)


def expert_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The expert-parallel (rank-local) parameters of ``model`` by name."""
    found = {}
    for prefix, m in model.named_modules():
        if getattr(m, "ep_group", None) is not None:
            for name in EXPERT_WEIGHTS:
                found[f"{prefix}.{name}" if prefix else name] = getattr(m, name)
    return found


def gather_experts(local: Tensor, group: dist.ProcessGroup) -> Tensor:
    """The full ``[E * F, ...]`` tensor from each rank's ``[E / W * F, ...]`` rows; a collective."""
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts)


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with uneven splits; its gradient is the reverse exchange."""

    @staticmethod
    def forward(ctx, x: Tensor, recv: list[int], send: list[int], group) -> Tensor:
        ctx.recv, ctx.send, ctx.group = recv, send, group
        out = x.new_empty(sum(recv), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        out = grad.new_empty(sum(ctx.send), *grad.shape[1:])
        dist.all_to_all_single(out, grad.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return out, None, None, None


def dispatch_to_experts(
    layer: nn.Module, x_SD: Tensor, counts_E: Tensor, group: dist.ProcessGroup
) -> Tensor:
    """Expert outputs for rows ``x_SD`` sorted by expert (``counts_E`` rows per expert, all E),
    computed on the ranks that hold the experts; same order as ``x_SD``."""
    world = dist.get_world_size(group)
    E = len(counts_E)
    local_E = E // world
    # How many rows of each of its local experts every rank receives from every other.
    recv_WL = torch.empty_like(counts_E).view(world, local_E)
    dist.all_to_all_single(recv_WL, counts_E.view(world, local_E).contiguous(), group=group)
    send, recv = torch.stack([counts_E.view(world, local_E).sum(1), recv_WL.sum(1)]).tolist()
    x_RD = _AllToAll.apply(x_SD, recv, send, group)
    local_R = torch.repeat_interleave(
        torch.arange(local_E, device=x_SD.device).repeat(world), recv_WL.flatten()
    )
    order = local_R.argsort(stable=True)  # arrival order (by source rank) -> by local expert
    # Slot s of the sorted order reads row order[s] and writes it back there: arrival order.
    counts = recv_WL.sum(0)
    y_RD = run_experts(x_RD, counts, layer.w1, layer.v1, layer.w2, order, fused=layer.fused)
    return _AllToAll.apply(y_RD, send, recv, group)
