"""C-BTM (Gururangan et al. 2023): a seed, tf-idf balanced k-means into k clusters, k experts
branched from the seed sharing the rest of the budget; scored as an ensemble routed by the
document prefix (the random-cluster ablation too, through its clusterer), or merged: ``merge:
average`` (BTM's parameter average) or ``merge: btx`` (Branch-Train-MiX: the experts' FFNs become
one MoE, trained for ``finetune_share`` of the budget)."""

from __future__ import annotations

import shutil
import time
from dataclasses import replace
from pathlib import Path

from moe_lab import accounting
from moe_lab.budget import Phase
from moe_lab.config import Config, ConfigError, EnsembleConfig, MoEConfig, load_config
from moe_lab.data.packing import TokenStore
from moe_lab.data.tokenizer import load_tokenizer
from moe_lab.ensembles.clustering.run import cluster_documents
from moe_lab.ensembles.ensemble import evaluate_experts
from moe_lab.ensembles.merge import btx
from moe_lab.eval.evaluate import training_store
from moe_lab.families.base import Family, VariantConfig, result
from moe_lab.store.checkpoint import load_run, read_json, save_checkpoint
from moe_lab.train.branch import train_experts
from moe_lab.train.loop import train

__all__ = ["CBTM", "btx_config"]


def btx_config(cfg: Config, v: VariantConfig) -> Config:
    """The config of a BTX variant's merged MoE: expert e of every layer is expert model e's FFN."""
    top_k = min(v.top_k or 2, v.k)
    moe = MoEConfig(num_experts=v.k, top_k=top_k, expert_hidden=cfg.model.ffn_hidden)
    return replace(cfg, model=replace(cfg.model, moe=moe))


class CBTM(Family):
    name = "cbtm"

    def check(self, cfg: Config, v: VariantConfig) -> None:
        if not 0 < v.seed_share < 1:
            raise ConfigError(f"variant {v.name!r}: seed_share must be in (0, 1)")
        if v.k < 1:
            raise ConfigError(f"variant {v.name!r}: k (clusters) must be at least 1")
        if v.top_k is not None and not 1 <= v.top_k <= v.k:
            raise ConfigError(f"variant {v.name!r}: top_k must be in [1, k={v.k}] or null")
        if v.router_init not in ("random", "data"):
            raise ConfigError(f"variant {v.name!r}: router_init must be random or data")
        if v.router_init == "data" and v.merge != "btx":
            raise ConfigError(f"variant {v.name!r}: router_init=data is for merge=btx's router")

    def phases(self, cfg: Config, v: VariantConfig) -> list[Phase]:
        if v.merge != "btx":
            return [Phase(cfg, v.seed_share, 1), Phase(cfg, (1 - v.seed_share) / v.k, v.k)]
        experts = (1 - v.seed_share - v.finetune_share) / v.k
        return [
            Phase(cfg, v.seed_share, 1),
            Phase(cfg, experts, v.k),
            Phase(btx_config(cfg, v), v.finetune_share, 1),
        ]

    def ensemble(self, cfg: Config, v: VariantConfig, clusters: Path) -> EnsembleConfig:
        """How the experts are mixed: routed by the document prefix through the clusterer, top-k
        (or averaged into one model). The random-cluster ablation is routed exactly like its
        twin, through its own clusters' centroids: only the clusters differ."""
        routing = "average" if v.merge == "average" else "prefix"
        return replace(cfg.ensemble, clusters_dir=str(clusters), routing=routing, top_k=v.top_k)

    def run(self, cfg: Config, v: VariantConfig, budget: float, job: Path) -> dict:
        # The variant is scored once, as an ensemble (or merged model): its seed and experts
        # skip their own final evaluations.
        cfg = replace(cfg, train=replace(cfg.train, final_eval=False))
        seed_cfg = replace(
            cfg,
            train=replace(cfg.train, max_flops=budget * v.seed_share),
            run=replace(cfg.run, dir=str(job / "seed"), resume=True),
        )
        seed = train(seed_cfg)
        clusters = _clusters(cfg, v, job / "clusters")
        shards = {
            f"c{c}": [str(clusters / "shards" / "train" / f"cluster_{c:03d}.jsonl")]
            for c in range(v.k)
        }
        # Each expert is validated on its cluster's share of the validation documents (all of
        # them where none fell to it): without valid_files its run would hold out part of its
        # shard.
        valid = [clusters / "shards" / "valid" / f"cluster_{c:03d}.jsonl" for c in range(v.k)]
        every = [str(f) for f in valid if f.stat().st_size]
        valid_files = {
            f"c{c}": [str(f)] if f.stat().st_size else every for c, f in enumerate(valid)
        }
        expert_share = 1 - v.seed_share - (v.finetune_share if v.merge == "btx" else 0.0)
        template = replace(cfg, train=replace(cfg.train, max_flops=budget * expert_share))
        experts = job / "experts"
        manifest = train_experts(
            template, shards, experts, seed=seed.run_dir, valid_files=valid_files
        )
        runs = [seed.run_dir] + [experts / "experts" / n / "run" for n in manifest["experts"]]
        member = accounting.estimate(cfg.model, cfg.train.seq_len)
        if v.merge == "btx":
            merged = _train_btx(cfg, v, budget, job, runs)
            valid = read_json(merged.run_dir / "eval.json")["valid"]
            cost = accounting.estimate(btx_config(cfg, v).model, cfg.train.seq_len)
            return result(cost, [*runs, merged.run_dir], valid, {"run_dir": str(merged.run_dir)})
        ens = self.ensemble(cfg, v, clusters)
        started = time.perf_counter()
        valid = evaluate_experts(experts, replace(cfg, ensemble=ens))["valid"]
        eval_s = time.perf_counter() - started
        used = v.k if v.top_k is None else v.top_k
        if v.merge == "average":
            cost = member
        else:
            cost = accounting.ensemble(member, experts=v.k, active=used)
        top_k = "null" if v.top_k is None else v.top_k
        overrides = [f"ensemble.clusters_dir={clusters}", f"ensemble.routing={ens.routing}"]
        scorer = {"run_dir": str(experts), "overrides": [*overrides, f"ensemble.top_k={top_k}"]}
        return result(cost, runs, valid, scorer, eval_s)


def _clusters(cfg: Config, v: VariantConfig, clusters: Path) -> Path:
    """The variant's k clusters (random ones for the ablation), made once."""
    if not (clusters / "clusters.json").exists():
        method = "random" if v.random_clusters else "kmeans"
        cluster_cfg = replace(
            cfg,
            cluster=replace(cfg.cluster, k=v.k, method=method),
            run=replace(cfg.run, dir=str(clusters)),
        )
        shutil.rmtree(clusters, ignore_errors=True)  # an interrupted clustering starts over
        cluster_documents(cluster_cfg)
    return clusters


def _training_stores(runs: list[Path]) -> list[TokenStore]:
    """Each expert run's training documents, tokenized by its tokenizer."""
    return [training_store(load_config(r / "config.yaml"), load_tokenizer(r / "tokenizer"))
            for r in runs]  # fmt: skip


def _train_btx(cfg: Config, v: VariantConfig, budget: float, job: Path, runs: list[Path]):
    """Merge the experts into one MoE (:func:`moe_lab.ensembles.merge.btx`) and train it, router
    included."""
    merged_cfg = btx_config(cfg, v)
    start = job / "btx" / "merged"
    if not (start / "checkpoints").exists():
        experts = [load_run(run)[1] for run in runs[1:]]
        stores = _training_stores(runs[1:]) if v.router_init == "data" else None
        model = btx(
            experts,
            top_k=merged_cfg.model.moe.top_k,
            seed=cfg.run.seed,
            router_init=v.router_init,
            router_data=stores,
            seq_len=cfg.train.seq_len,
        )
        save_checkpoint(start / "checkpoints", 0, model, None, {}, 1)
        shutil.copytree(runs[0] / "tokenizer", start / "tokenizer", dirs_exist_ok=True)
    return train(
        replace(
            merged_cfg,
            train=replace(
                cfg.train,
                max_flops=budget * v.finetune_share,
                init_from=str(start),
                final_eval=True,
            ),  # the merged model is the variant: scored here
            run=replace(cfg.run, dir=str(job / "btx" / "run"), resume=True),
        )
    )
