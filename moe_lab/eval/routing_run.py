"""``moe-lab routing RUN``: the routing analyses of :mod:`moe_lab.eval.routing` for a trained MoE
run on its validation documents, with saturation over every checkpoint the run kept; writes
``routing.json`` and the figures of :mod:`moe_lab.eval.routing_plots`."""

from __future__ import annotations

import logging
from pathlib import Path

from moe_lab.config import ConfigError
from moe_lab.eval.evaluate import validation_store
from moe_lab.eval.routing import (
    coactivation,
    routed_per_document,
    saturation,
    token_routes,
    top_tokens,
    usage_by_group,
    usage_summary,
)
from moe_lab.eval.routing_plots import plot_routing
from moe_lab.nn.model import build_model
from moe_lab.store.checkpoint import (
    checkpoint_step,
    list_checkpoints,
    load_checkpoint,
    load_run,
    write_json,
)

__all__ = ["analyze_run"]

log = logging.getLogger(__name__)


def analyze_run(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    max_tokens: int | None = 200_000,
    device: str = "cpu",
    overrides: list[str] | tuple[str, ...] = (),
) -> dict:
    """Analyse the routing of ``run_dir``'s latest checkpoint on its validation documents (at
    most ``max_tokens`` of them) and the saturation of each earlier checkpoint; write
    ``routing.json`` and PNG figures into ``out_dir`` (default ``RUN_DIR/routing``)."""
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "routing"
    cfg, model, tokenizer = load_run(run_dir, overrides, device=device)
    if cfg.model.moe is None:
        raise ConfigError(f"{run_dir} is a dense model: it has no routers to analyse")
    store = validation_store(cfg, tokenizer)
    t = cfg.train
    final = token_routes(model, store, t.seq_len, t.eval_batch, device, max_tokens)
    routed = routed_per_document(final, store.n_docs)
    checkpoints = list_checkpoints(run_dir / "checkpoints")
    steps, values = [], []
    for ckpt in checkpoints[:-1]:
        earlier = build_model(cfg.model, device=device)
        load_checkpoint(ckpt, earlier, restore_rng_state=False)
        routes = token_routes(earlier, store, t.seq_len, t.eval_batch, device, max_tokens)
        steps.append(checkpoint_step(ckpt))
        values.append(saturation(routes, final))
    steps.append(checkpoint_step(checkpoints[-1]))
    values.append(1.0)
    moe = cfg.model.moe
    report = {
        "run": str(run_dir),
        "tokens": int(final.indices.shape[1]),
        "experts": moe.num_experts,
        "top_k": moe.top_k,
        "layers": [i for i in range(cfg.model.n_layers) if moe.is_moe_layer(i)],
        "usage": usage_summary(routed),
        "groups": usage_by_group(routed, store),
        "coactivation": coactivation(final).tolist(),
        "top_tokens": top_tokens(final, tokenizer),
        "saturation": {"steps": steps, "values": values},
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "routing.json", report)
    report["figures"] = [str(p) for p in plot_routing(report, out)]
    log.info("wrote %s and %d figures", out / "routing.json", len(report["figures"]))
    return report
