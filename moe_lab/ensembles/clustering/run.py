"""``moe-lab cluster``: fit a clusterer on a run's training documents and assign every document."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from moe_lab.config import Config, ConfigError, save_config
from moe_lab.data.documents import load_splits
from moe_lab.ensembles.clustering.clusterer import Clusterer

__all__ = ["cluster_documents"]


def _write_shards(directory: Path, ds, text: str, groups: list[str], labels, k: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    files = [open(directory / f"cluster_{c:03d}.jsonl", "w", encoding="utf-8") for c in range(k)]
    try:
        columns = {name: ds[name] for name in [text, *groups]}
        for i, label in enumerate(labels.tolist()):
            record = {name: values[i] for name, values in columns.items()} | {"cluster": label}
            files[label].write(json.dumps(record, ensure_ascii=False) + "\n")
    finally:
        for f in files:
            f.close()


def cluster_documents(cfg: Config) -> dict:
    """Fit on ``cfg.data``'s training documents; write the clusterer and the assignments.

    Writes, under ``run.dir``: ``config.yaml``, ``clusterer/`` (arrays + JSON),
    ``assignments/{train,valid}.jsonl`` (one ``{"index", "cluster", <group fields>}`` per document:
    balanced labels for training documents, nearest centroid for validation ones),
    ``shards/{train,valid}/cluster_NNN.jsonl`` (each cluster's documents with their text, group
    fields and ``cluster``: what an expert trains and is validated on) and ``clusters.json``.
    """
    out = Path(cfg.run.dir)
    if (out / "config.yaml").exists():
        raise ConfigError(f"run.dir {out} already holds a run; choose another run.dir")
    train, valid, groups = load_splits(cfg)
    if len(train) < cfg.cluster.k:
        raise ConfigError(
            f"cluster.k ({cfg.cluster.k}) exceeds the {len(train)} training documents"
        )
    text = cfg.data.text_field
    clusterer = Clusterer(
        cfg.cluster.k,
        cfg.cluster.n_components,
        cfg.cluster.hashing,
        cfg.cluster.hash_bits,
        seed=cfg.run.seed,
    )
    labels = {"train": clusterer.fit(train[text]), "valid": clusterer.predict(valid[text])}
    if cfg.cluster.method == "random":  # same sizes as balanced k-means, content-blind
        rng = np.random.default_rng(cfg.run.seed)
        labels = {
            split: rng.permutation(np.arange(len(ds)) % cfg.cluster.k)
            for split, ds in (("train", train), ("valid", valid))
        }
        # Routing follows the random clusters too: their centroids, in the same feature space.
        clusterer.recentre(train[text], labels["train"])
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    clusterer.save(out / "clusterer")
    (out / "assignments").mkdir(exist_ok=True)
    for split, ds in (("train", train), ("valid", valid)):
        columns = {g: ds[g] for g in groups}  # read once, not row by row
        with open(out / "assignments" / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for i, label in enumerate(labels[split].tolist()):
                record = {"index": i, "cluster": label} | {g: v[i] for g, v in columns.items()}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        _write_shards(out / "shards" / split, ds, text, groups, labels[split], cfg.cluster.k)
    report = {"sizes": clusterer.sizes, "top_terms": clusterer.top_terms(8), "dir": str(out)}
    (out / "clusters.json").write_text(
        json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8"
    )
    return report
