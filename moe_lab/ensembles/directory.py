"""A directory of expert LMs (what :func:`~moe_lab.train.branch.train_experts` leaves): its
manifest of finished experts, and loading them."""

from __future__ import annotations

from pathlib import Path

from moe_lab.config import ConfigError
from moe_lab.nn.model import Transformer
from moe_lab.store.checkpoint import load_run, read_json, write_json

__all__ = ["collect_manifest", "load_experts"]


def collect_manifest(out_dir: str | Path) -> dict:
    """Rebuild ``manifest.json`` from the finished experts' ``expert.json`` files.

    Experts are listed in shard order (expert i serves cluster i), whatever order jobs finished in.
    """
    out = Path(out_dir)
    entries = [read_json(p) for p in (out / "experts").glob("*/expert.json")]
    entries.sort(key=lambda e: e["index"])
    manifest = {"experts": {e["name"]: e for e in entries}}
    write_json(out / "manifest.json", manifest)
    return manifest


def load_experts(out_dir: str | Path, device="cpu") -> tuple[list[str], list[Transformer]]:
    """The finished experts of :func:`train_experts`, in manifest order, in eval mode."""

    out = Path(out_dir)
    if not (out / "manifest.json").is_file():
        raise FileNotFoundError(f"{out} has no manifest.json: run train_experts first")
    names = list(read_json(out / "manifest.json")["experts"])
    if not names:
        raise ConfigError(f"{out}/manifest.json lists no finished expert: train them first")
    runs = [load_run(out / "experts" / n / "run", device=device) for n in names]
    prints = [tokenizer.fingerprint() for _, _, tokenizer in runs]
    if len(set(prints)) > 1:
        other = next(n for n, p in zip(names, prints, strict=True) if p != prints[0])
        raise ConfigError(
            f"experts {names[0]!r} and {other!r} tokenize differently: their predictions "
            "cannot be mixed or merged (experts must share one tokenizer, e.g. a seed run's)"
        )
    return names, [model for _, model, _ in runs]
