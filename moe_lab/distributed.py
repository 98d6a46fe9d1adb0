"""Data parallelism on PyTorch's own engine: ``torchrun`` + ``torch.distributed`` + DDP or FSDP2.

Under ``torchrun --nproc_per_node N`` (one or several nodes) with ``parallel.dp=ddp``, every rank
draws the same global batch of ``N * train.batch_size`` sequences from the same seeded sampler and
trains on its own slice of it, so the run equals one process with an N times larger batch (up to
floating-point summation order), and the data position in a checkpoint is the same on every rank.
Gradients are averaged by :class:`~torch.nn.parallel.DistributedDataParallel`; the loss is weighted
by each rank's share of the scored tokens so that the average is the global token mean. Rank 0
alone writes metrics, checkpoints and evaluation; every rank resumes from the same checkpoint.
NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moe_lab.config import ConfigError

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

    @property
    def is_main(self) -> bool:
        return self.rank == 0

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
        if self.mode == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(device.type, (self.world,))
            for layer in model.layers:
                fully_shard(layer, mesh=mesh)
            root = LossModule(model)
            fully_shard(root, mesh=mesh)
            return root
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(LossModule(model), device_ids=ids)

    def full_state_dict(self, model: nn.Module) -> dict[str, Tensor] | None:
        """Unsharded weights on CPU (FSDP2: a collective, so every rank calls it); None when the
        model is not sharded."""
        if self.mode != "fsdp2" or self.world == 1:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=options)

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
        return torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else "cpu"


def setup(dp: str) -> Dist:
    """Join the ``torchrun`` process group when there is one (``WORLD_SIZE`` > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if dp == "none":
        raise ConfigError(
            f"running as one of {world} torchrun processes: set parallel.dp=ddp or fsdp2 "
            "(or launch a single process)"
        )
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    return Dist(dist.get_rank(), dist.get_world_size(), local, owns, dp)
