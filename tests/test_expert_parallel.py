"""Expert parallelism with real processes (gloo, world size 2) against the single-process model."""

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_lab.config import ConfigError, ModelConfig, MoEConfig
from moe_lab.nn.experts.parallel import expert_parameters, gather_experts, shard_experts
from moe_lab.nn.model import build_model

WORLD = 2
CFG = ModelConfig(
    dim=32,
    n_layers=2,
    n_heads=4,
    vocab_size=64,
    max_seq_len=32,
    moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=16, shared_expert_hidden=8),
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, fused: bool, bf16: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        reference = build_model(CFG)  # identical on both ranks: same seed
        ids = torch.randint(0, CFG.vocab_size, (WORLD, 3, 16))  # each rank's batch
        targets = torch.randint(0, CFG.vocab_size, (WORLD, 3, 16))
        ep = copy.deepcopy(reference)
        for model in (reference, ep):
            for m in model.modules():
                if hasattr(m, "fused"):
                    m.fused = fused
        assert shard_experts(ep) == CFG.n_layers

        # Reference: one process sees every rank's batch; the loss sums the per-rank losses.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            ref = [reference.loss(ids[r], targets[r]) for r in range(WORLD)]
            loss, aux, routing = ep.loss(ids[rank], targets[rank])
        sum(loss + aux for loss, aux, _ in ref).backward()
        (loss + aux).backward()

        # bf16: the experts see their rows in another order and batching, so the sums round
        # differently (and a near-tie in the second layer's routing may flip)
        tol = {"atol": 2e-3, "rtol": 2e-2} if bf16 else {"atol": 1e-6, "rtol": 1e-5}
        torch.testing.assert_close(loss, ref[rank][0], rtol=0, atol=1e-3 if bf16 else 1e-6)
        torch.testing.assert_close(aux, ref[rank][1], rtol=0, atol=1e-4 if bf16 else 1e-7)
        for mine, theirs in zip(routing, ref[rank][2], strict=True):
            assert bf16 or torch.equal(mine.slot_counts_KE, theirs.slot_counts_KE)

        local = expert_parameters(ep)
        ref_params = dict(reference.named_parameters())
        for name, p in ep.named_parameters():
            if name in local:  # rank-local experts: the gradient of every rank's tokens
                torch.testing.assert_close(
                    gather_experts(p.grad, dist.group.WORLD), ref_params[name].grad, **tol
                )
                torch.testing.assert_close(
                    gather_experts(p.detach(), dist.group.WORLD), ref_params[name]
                )
            else:  # replicated: each rank's part of the gradient, summed as DDP would
                grad = p.grad.clone()
                dist.all_reduce(grad)
                torch.testing.assert_close(grad, ref_params[name].grad, **tol)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "fused, bf16", [(True, False), (False, False), (True, True)], ids=["fused", "loop", "bf16"]
)
def test_expert_parallel_equals_the_single_process_model(fused, bf16):
    mp.spawn(_worker, args=(_free_port(), fused, bf16), nprocs=WORLD)


def _indivisible(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        cfg = copy.deepcopy(CFG)
        cfg.moe.num_experts = 3
        with pytest.raises(ConfigError, match="num_experts divisible by 2"):
            shard_experts(build_model(cfg))
    finally:
        dist.destroy_process_group()


def test_experts_must_divide_over_the_ranks():
    mp.spawn(_indivisible, args=(_free_port(),), nprocs=WORLD)
