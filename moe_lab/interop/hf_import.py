"""A transformers model directory as a moe_lab run, so that an imported OLMoE, Qwen-MoE, FlexOlmo,
Mixtral or Llama trains (``train.init_from``), evaluates, generates and is routed like any run.

``moe-lab import HF_DIR --to RUN_DIR`` writes ``config.yaml`` (defaults, with the model from
``config.json``), ``model.yaml`` (that model alone, for ``model=RUN_DIR/model.yaml``), a step-0
checkpoint of the weights and, where ``HF_DIR`` has a ``tokenizer.json``, the tokenizer.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from moe_lab.config import Config
from moe_lab.config.load import save_config
from moe_lab.data.tokenizer import load_tokenizer
from moe_lab.interop.hf import from_hf
from moe_lab.store.checkpoint import save_checkpoint

__all__ = ["import_run"]


def import_run(hf_dir: str | Path, run_dir: str | Path) -> Path:
    """Write ``hf_dir`` (a ``save_pretrained`` directory) as the run directory ``run_dir``.

    Raises:
        FileExistsError: ``run_dir`` exists and is not empty.
        ValueError: the architecture or one of its settings is not supported (named).
    """
    hf_dir, out = Path(hf_dir), Path(run_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: import into a new directory")
    model = from_hf(hf_dir)  # first: nothing is written for a model that cannot be converted
    cfg = Config(model=model.cfg)
    cfg.run.dir = str(out)
    cfg.train.seq_len = min(cfg.train.seq_len, model.cfg.max_seq_len)
    if (hf_dir / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(hf_dir / "tokenizer.json")
        if tokenizer.vocab_size > model.cfg.vocab_size:
            raise ValueError(
                f"{hf_dir}/tokenizer.json has {tokenizer.vocab_size} ids, more than the model's "
                f"{model.cfg.vocab_size} embedding rows"
            )
        tokenizer.save(out / "tokenizer")
        cfg.data.tokenizer = str(out / "tokenizer")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    OmegaConf.save(OmegaConf.structured(model.cfg), out / "model.yaml")
    state = {"step": 0, "imported_from": str(hf_dir)}
    save_checkpoint(out / "checkpoints", 0, model, None, state, keep=1)
    return out
