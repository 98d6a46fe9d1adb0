"""``moe-lab cluster``: fit a clusterer on a run's training documents and assign every document."""

from __future__ import annotations

import json
from pathlib import Path

from moe_lab.clustering.clusterer import Clusterer
from moe_lab.config import Config, ConfigError, save_config
from moe_lab.data import load_splits

__all__ = ["cluster_documents"]


def cluster_documents(cfg: Config) -> dict:
    """Fit on ``cfg.data``'s training documents; write the clusterer and the assignments.

    Writes, under ``run.dir``: ``config.yaml``, ``clusterer/`` (arrays + JSON),
    ``assignments/{train,valid}.jsonl`` (one ``{"index", "cluster", <group fields>}`` per document:
    balanced labels for training documents, nearest centroid for validation ones) and
    ``clusters.json`` (sizes and top terms).
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
    report = {"sizes": clusterer.sizes, "top_terms": clusterer.top_terms(8), "dir": str(out)}
    (out / "clusters.json").write_text(
        json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8"
    )
    return report
