"""Data parallelism on PyTorch's own engine: ``torchrun`` + ``torch.distributed`` + DDP or FSDP2.

Under ``torchrun --nproc_per_node N`` (one or several nodes) with ``parallel.dp=ddp``, every rank
draws the same global batch of ``N * train.batch_size`` sequences from the same seeded sampler and
trains on its own slice of it, so the run equals one process with an N times larger batch (up to
floating-point summation order), and the data position in a checkpoint is the same on every rank.
Gradients are averaged by :class:`~torch.nn.parallel.DistributedDataParallel`; the loss is weighted
by each rank's share of the scored tokens so that the average is the global token mean. An MoE's
balancing loss takes the expert loads of the global batch (summed over ranks in training) and the
rank's own mean router probabilities, so the averaged gradient is the global loss's gradient. Rank 0
alone writes metrics, checkpoints and evaluation; every rank resumes from the same checkpoint.
NCCL on CUDA, gloo on CPU.

With ``parallel.ep=true`` the MoE experts are split over the ranks instead of replicated
(:mod:`moe_lab.nn.experts.parallel`), over all of them or, with ``parallel.ep_degree=d``, over each
run of d consecutive ranks, which then hold world / d copies: DDP or FSDP2 leaves the experts alone
(FSDP2 shards the rest), their gradients are summed over the copies and averaged here, and the
gradient norm adds one copy's experts. Under DDP checkpoints gather them into the single-process
format, so an expert-parallel checkpoint loads anywhere; under FSDP2 each rank's experts are row
shards of the sharded (DCP) checkpoint, which ``moe-lab convert`` turns into that format.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moe_lab.config import ConfigError
from moe_lab.nn.experts.parallel import expert_parameters, gather_experts, shard_experts
from moe_lab.nn.routing.topk import TopKRouter

__all__ = ["Dist", "LossModule", "setup"]


class LossModule(nn.Module):
    """``forward = model.loss``: the call DDP wraps (it hooks ``forward``, not other methods)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, targets: Tensor, doc_ids: Tensor | None = None):
        return self.model.loss(input_ids, targets, doc_ids)


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this process group was created here, and is destroyed here
    mode: str = "none"  # parallel.dp in force: none | ddp | fsdp2
    experts: dict[str, nn.Parameter] = field(default_factory=dict)  # rank-local (ep) by name
    # Expert parallelism: the (replica, ep) DeviceMesh; rank r holds the experts of position
    # r % ep_degree in its ep group (consecutive ranks); the replica group joins equal positions.
    ep_mesh: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def ep_group(self) -> dist.ProcessGroup:
        """The ranks that together hold one copy of the experts."""
        return self.ep_mesh.get_group("ep")

    @property
    def replica_group(self) -> dist.ProcessGroup | None:
        """The ranks holding copies of this rank's experts; None when there is one copy."""
        return self.ep_mesh.get_group("replica") if self.ep_mesh.size(0) > 1 else None

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sum(self, value: float) -> float:
        """Sum of a float over ranks (a float64 all-reduce; the value itself when alone)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._device)
        dist.all_reduce(t)
        return float(t.item())

    def sum_(self, t: Tensor) -> Tensor:
        """Sum a tensor over ranks in place (nothing when alone)."""
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def shard(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """This rank's rows of a global batch."""
        if self.world == 1:
            return batch
        rows = next(iter(batch.values())).shape[0] // self.world
        return {k: v[self.rank * rows : (self.rank + 1) * rows] for k, v in batch.items()}

    def wrap(self, model: nn.Module, device: torch.device):
        """The callable a training step uses: ``model.loss``, DDP around it, or FSDP2: every
        block sharded on its own (gathered just before it runs), the rest with the root."""
        if self.world == 1:
            return model.loss

        for router in (m for m in model.modules() if isinstance(m, TopKRouter)):
            router.load_group = dist.group.WORLD  # balancing losses over the global batch's load
        if self.mode == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(device.type, (self.world,))
            experts = set(self.experts.values())  # rank-local already: FSDP2 leaves them alone
            for layer in model.layers:
                mine = {p for p in layer.parameters() if p in experts}
                fully_shard(layer, mesh=mesh, ignored_params=mine or None)
            root = LossModule(model)
            fully_shard(root, mesh=mesh, ignored_params=experts or None)
            return root
        from torch.nn.parallel import DistributedDataParallel

        root = LossModule(model)
        if self.experts:  # each rank's experts are its own: never averaged with another rank's
            ignored = [f"model.{name}" for name in self.experts]
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(root, ignored)
        ids = [device.index] if device.type == "cuda" else None
        # No buffer broadcast: each rank's router counts its own tokens (summed before a balancing
        # bias update, so every rank's bias stays identical); the rest are constants.
        # find_unused_parameters also stops DDP from rebuilding its gradient buckets in the order
        # of the first backward: a rebuild moves gradients to other all-reduce chunks, so at 3+
        # ranks the cross-rank sums change order and a resumed run's first step differs from the
        # straight run's in the last bits. The price: one autograd-graph walk per step.
        return DistributedDataParallel(
            root, device_ids=ids, broadcast_buffers=False, find_unused_parameters=True
        )

    def shard_experts(self, model: nn.Module, degree: int | None = None) -> None:
        """Expert parallelism: keep this rank's E / d experts of every MoE layer, d = ``degree``
        (``parallel.ep_degree``; None: the world size). Call before :meth:`wrap`."""
        from torch.distributed.device_mesh import init_device_mesh

        if self.world == 1:
            return
        degree = degree or self.world
        if self.world % degree:
            raise ConfigError(
                f"parallel.ep_degree ({degree}) must divide the number of ranks ({self.world})"
            )
        shape, names = (self.world // degree, degree), ("replica", "ep")
        self.ep_mesh = init_device_mesh(self._device.type, shape, mesh_dim_names=names)
        shard_experts(model, self.ep_group)
        self.experts = expert_parameters(model)

    def clip_grad_norm_(self, params: list[nn.Parameter], max_norm: float) -> float:
        """Average the expert gradients, then clip all gradients by their global norm.

        An expert's gradient sums the tokens of its ep group; summed over the replica group it
        holds every rank's tokens, and the loss is scaled by ``world`` for DDP's average, hence
        the division. The squared norms of one copy of the experts add over the ep group.
        """
        if not self.experts:
            return self.full(torch.nn.utils.clip_grad_norm_(params, max_norm)).item()
        local = {id(p) for p in self.experts.values()}
        replicas = self.replica_group
        for p in self.experts.values():
            if p.grad is not None:
                if replicas is not None:
                    dist.all_reduce(p.grad, group=replicas)
                p.grad.div_(self.world)
        mine = [p for p in params if id(p) in local]
        shared = [p for p in params if id(p) not in local]  # FSDP2: DTensors
        norms = [
            self.full(torch.nn.utils.get_total_norm([p.grad for p in ps if p.grad is not None]))
            for ps in (mine, shared)
        ]
        sq = torch.stack(norms).double() ** 2
        dist.all_reduce(sq[:1], group=self.ep_group)
        total = sq.sum().sqrt().float()
        for ps in (mine, shared):  # apart: one multi-tensor call cannot mix DTensors and tensors
            torch.nn.utils.clip_grads_with_norm_(ps, max_norm, total)
        return total.item()

    def full_state_dict(self, model: nn.Module) -> dict[str, Tensor] | None:
        """Unsharded weights on CPU (a collective, so every rank calls it); None when the model
        is not sharded."""
        if self.mode == "fsdp2" and self.world > 1:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
            )

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            weights = get_model_state_dict(model, options=options)
        elif self.experts:
            weights = {k: v.cpu() for k, v in model.state_dict().items()}
        else:
            return None
        if self.experts:
            for name, local in self.experts.items():
                weights[name] = gather_experts(local.detach(), self.ep_group).cpu()
        return weights

    def save_sharded(self, path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """FSDP2: every rank writes its shards of the weights and optimizer state (DCP's plan,
        stored as safetensors and JSON: :mod:`moe_lab.store.sharded_format`)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        from moe_lab.store.sharded_format import save_sharded  # DCP: only sharded runs import it

        weights, moments = get_state_dict(model, optimizer)
        save_sharded(self._experts_as_shards(weights, moments), path)

    def load_sharded(self, path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """FSDP2: every rank reads its shards of :meth:`save_sharded`'s state."""
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        from moe_lab.store.sharded_format import load_sharded  # DCP: only sharded runs need it

        weights, moments = get_state_dict(model, optimizer)
        state = self._experts_as_shards(weights, moments)
        load_sharded(state, path)  # no code from the checkpoint: see store.sharded_format
        state = self._experts_as_shards(state["model"], state["optim"], back=True)
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )

    def _experts_as_shards(self, weights: dict, moments: dict, back: bool = False) -> dict:
        """Expert parallelism under FSDP2: each rank's expert rows (weights, Adam moments) as
        row shards of one DTensor (replicated over the replica groups), so DCP saves every
        expert, not rank 0's as if all ranks held the same. ``back``: the rank-local tensors
        again, as ``set_state_dict`` expects."""
        from torch.distributed.tensor import DTensor, Replicate, Shard

        def convert(value):
            if not isinstance(value, Tensor) or value.ndim == 0:  # AdamW's scalar step
                return value
            if back:
                return value.to_local()
            placements = [Replicate(), Shard(0)]
            return DTensor.from_local(value, self.ep_mesh, placements, run_check=False)

        for name in self.experts:
            weights[name] = convert(weights[name])
            if name in moments["state"]:
                moments["state"][name] = {k: convert(v) for k, v in moments["state"][name].items()}
        return {"model": weights, "optim": moments}

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """The optimizer state dict with every rank's expert moments gathered (a collective)."""
        sd = optimizer.state_dict()
        for pid in self._expert_pids(optimizer):
            sd["state"][pid] = {
                k: gather_experts(v, self.ep_group) if _is_rows(v) else v
                for k, v in sd["state"].get(pid, {}).items()
            }
        return sd

    def local_optimizer_state(self, sd: dict, optimizer: torch.optim.Optimizer) -> dict:
        """This rank's rows of a full optimizer state dict's expert moments."""
        for pid in self._expert_pids(optimizer):
            sd["state"][pid] = {
                k: v.chunk(self.ep_mesh.size(1))[self.ep_mesh.get_local_rank("ep")].clone()
                if _is_rows(v)
                else v
                for k, v in sd["state"].get(pid, {}).items()
            }
        return sd

    def _expert_pids(self, optimizer: torch.optim.Optimizer) -> list[int]:
        """Indices of the expert parameters in the optimizer's state dict numbering."""
        local = {id(p) for p in self.experts.values()}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return [i for i, p in enumerate(params) if id(p) in local]

    @staticmethod
    def full(value: Tensor) -> Tensor:
        """A DTensor (e.g. FSDP2's gradient norm) as one ordinary tensor."""
        return value.full_tensor() if hasattr(value, "full_tensor") else value

    def close(self, failed: bool = False) -> None:
        """Leave the process group; after a failure without waiting for the other ranks."""
        if self.owns_group:
            if not failed:
                dist.barrier()  # no rank tears the group down while another still uses it
            dist.destroy_process_group()

    @property
    def _device(self) -> torch.device:
        nccl = dist.get_backend() == "nccl"
        return torch.device("cuda", self.local_rank) if nccl else torch.device("cpu")


def _is_rows(value) -> bool:
    return isinstance(value, Tensor) and value.ndim > 0  # not AdamW's scalar step


def setup(dp: str, device: str = "auto") -> Dist:
    """Join the ``torchrun`` process group when there is one (``WORLD_SIZE`` > 1): NCCL with one
    GPU per local rank, or gloo where ``device`` (``run.device``) is cpu or there is no CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if dp == "none":
        raise ConfigError(
            f"running as one of {world} torchrun processes: set parallel.dp=ddp or fsdp2 "
            "(or launch a single process)"
        )
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda and local >= torch.cuda.device_count():
        raise ConfigError(
            f"local rank {local} has no GPU of its own: this machine has "
            f"{torch.cuda.device_count()}; start at most that many processes per node "
            "(torchrun --nproc_per_node), or set run.device=cpu to run them on CPU over gloo"
        )
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(local)
    return Dist(dist.get_rank(), dist.get_world_size(), local, owns, dp)
