"""Branch-train-merge expert jobs on many machines: one job per expert, via submitit or Ray.

Each job is :func:`moe_lab.train.branch.train_experts` restricted to one expert, the same idempotent
function a local run uses, so a job that fails or is preempted is simply submitted again.
:func:`submit_experts` takes any submitit executor: ``AutoExecutor`` (Slurm, or local processes
where Slurm is absent), ``LocalExecutor``, ``DebugExecutor`` (``pip install 'moe-lab[launch]'``).
:func:`submit_experts_ray` runs one Ray task per expert on the cluster ``ray.init`` connected to
(``pip install 'moe-lab[ray]'``).

    import submitit
    executor = submitit.AutoExecutor(folder="runs/slurm_logs")
    executor.update_parameters(timeout_min=600, slurm_partition="gpu", gpus_per_node=1)
    jobs = submit_experts(executor, template, shards, "runs/experts", seed="runs/seed")
    manifest = wait_for(jobs, "runs/experts")
"""

from __future__ import annotations

from pathlib import Path

from moe_lab.ensembles.directory import collect_manifest
from moe_lab.train.branch import Shard, train_experts

__all__ = ["submit_experts", "submit_experts_ray", "wait_for"]


def submit_experts(
    executor,
    cfg,
    shards: dict[str, Shard],
    out_dir: str | Path,
    seed: str | Path | None = None,
    budget_split: str = "equal",
    valid_files: dict[str, list[str]] | None = None,
) -> list:
    """Submit one :func:`~moe_lab.train.branch.train_experts` job per expert; returns the submitit
    jobs."""
    return [
        executor.submit(
            train_experts, cfg, shards, str(out_dir), seed, budget_split, valid_files, [name]
        )
        for name in shards
    ]


def submit_experts_ray(
    cfg,
    shards: dict[str, Shard],
    out_dir: str | Path,
    seed: str | Path | None = None,
    budget_split: str = "equal",
    valid_files: dict[str, list[str]] | None = None,
    num_cpus: float = 1,
    num_gpus: float = 0,
) -> list:
    """One Ray task per expert (after ``ray.init(...)``); returns their object references."""
    try:
        import ray
    except ImportError as e:
        raise ImportError("submit_experts_ray needs Ray: pip install 'moe-lab[ray]'") from e
    task = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(train_experts)
    return [
        task.remote(cfg, shards, str(out_dir), seed, budget_split, valid_files, [name])
        for name in shards
    ]


def wait_for(handles: list, out_dir: str | Path) -> dict:
    """Wait for submitit jobs or Ray references (re-raising the first failure); return the
    combined manifest."""
    for handle in handles:
        if hasattr(handle, "result"):  # a submitit job
            handle.result()
        else:
            import ray

            ray.get(handle)
    return collect_manifest(out_dir)
