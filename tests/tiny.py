"""Tiny random moe_lab models and run directories written without training, for the scoring,
few-shot and harness tests; and the naive references they are checked against."""

import json
from pathlib import Path

import torch

from moe_lab.config import load_config, save_config
from moe_lab.data.tokenizer import ByteTokenizer
from moe_lab.nn.model import build_model
from moe_lab.store.checkpoint import save_checkpoint
from tests.conftest import SHORT_RUN

TINY = [
    "model.dim=32",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.ffn_hidden=48",
    "model.vocab_size=259",
    "model.max_seq_len=96",
    "model.init_std=0.3",  # large enough that random models have strong, distinct preferences
]
MOE = ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.expert_hidden=24"]


def tiny_cfg(*overrides):
    return load_config(None, [*TINY, *SHORT_RUN, *overrides])


def tiny_model(*overrides, seed=0):
    torch.manual_seed(seed)
    return build_model(tiny_cfg(*overrides).model).eval()


def ascii_model(*overrides, seed=0):
    """A tiny model whose greedy choice is always an ASCII byte: the other rows of its output
    head are zero (logit 0, below the largest of 128 random logits), so byte-level text decodes
    back to the same tokens."""
    model = tiny_model(*overrides, seed=seed)
    with torch.no_grad():
        model.head_weight[128:] = 0.0
    return model


def write_run(run_dir, *overrides, seed=0):
    """A run directory as ``moe-lab train`` leaves it, holding a random tiny model."""
    run_dir = Path(run_dir)
    cfg = tiny_cfg(*overrides, f"run.dir={run_dir}")
    model = tiny_model(*overrides, seed=seed)
    save_config(cfg, run_dir / "config.yaml")
    ByteTokenizer().save(run_dir / "tokenizer")
    save_checkpoint(run_dir / "checkpoints", 1, model, None, {"step": 1}, keep=1)
    return model


def write_experts(out_dir, n, *overrides):
    """A ``train_experts`` directory of ``n`` random tiny experts; returns them in order."""
    out_dir = Path(out_dir)
    models, entries = [], {}
    for i in range(n):
        models.append(write_run(out_dir / "experts" / f"e{i}" / "run", *overrides, seed=100 + i))
        entries[f"e{i}"] = {"name": f"e{i}", "index": i}
    save_config(tiny_cfg(*overrides, f"run.dir={out_dir}"), out_dir / "config.yaml")
    (out_dir / "manifest.json").write_text(json.dumps({"experts": entries}))
    return models


@torch.no_grad()
def naive_logprobs(model, seq):
    """``log p(x_t | x_<t)``, t >= 1, of one unpadded sequence, one forward pass: ``[n - 1]``."""
    x = torch.tensor([seq])
    lp = model(x[:, :-1]).logits.double().log_softmax(-1)[0]
    return lp.gather(-1, x[0, 1:, None])[:, 0].numpy()
