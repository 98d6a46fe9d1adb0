"""Branch-train-merge expert jobs on many machines: one job per expert through submitit.

Each job is :func:`moe_lab.btm.train_experts` restricted to one expert, the same idempotent
function a local run uses, so a job that fails or is preempted is simply submitted again. Works
with any submitit executor: ``AutoExecutor`` (Slurm, or local processes where Slurm is absent),
``LocalExecutor``, ``DebugExecutor``. Install with ``pip install 'moe-lab[launch]'``.

    import submitit
    executor = submitit.AutoExecutor(folder="runs/slurm_logs")
    executor.update_parameters(timeout_min=600, slurm_partition="gpu", gpus_per_node=1)
    jobs = submit_experts(executor, template, shards, "runs/experts", seed="runs/seed")
    manifest = wait_for(jobs, "runs/experts")
"""

from __future__ import annotations

from pathlib import Path

from moe_lab.btm import collect_manifest, train_experts

__all__ = ["submit_experts", "wait_for"]


def submit_experts(
    executor,
    cfg,
    shards: dict[str, list[str]],
    out_dir: str | Path,
    seed: str | Path | None = None,
    budget_split: str = "equal",
    valid_files: dict[str, list[str]] | None = None,
) -> list:
    """Submit one :func:`~moe_lab.btm.train_experts` job per expert; returns the submitit jobs."""
    return [
        executor.submit(
            train_experts, cfg, shards, str(out_dir), seed, budget_split, valid_files, [name]
        )
        for name in shards
    ]


def wait_for(jobs: list, out_dir: str | Path) -> dict:
    """Wait for every job (re-raising the first failure) and return the combined manifest."""
    for job in jobs:
        job.result()
    return collect_manifest(out_dir)
