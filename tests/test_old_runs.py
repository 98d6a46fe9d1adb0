"""Run directories written before the layered layout (commit 5bd0f13) still load and resume.

The fixture (tests/fixtures/make_run_5bd0f13.py) is a tiny MoE run of 4 steps checkpointed at
steps 2 and 4, written by the old code, with its logits on one sentence.
"""

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from moe_lab.config import load_config
from moe_lab.store.checkpoint import load_run
from moe_lab.store.metrics import read_metrics
from moe_lab.train.loop import train

FIXTURE = Path(__file__).parent / "fixtures" / "run-5bd0f13"


def test_an_old_run_loads_with_the_logits_it_had():
    cfg, model, tokenizer = load_run(FIXTURE)
    expected = load_file(FIXTURE.parent / "run-5bd0f13-logits.safetensors")
    assert tokenizer.encode("Old runs still load.") == expected["input_ids"][0].tolist()
    assert cfg.model.moe is not None and cfg.model.moe.shared_expert_hidden == 8
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=0)


def test_an_old_checkpoint_resumes_to_the_weights_and_losses_the_old_code_reached(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    shutil.rmtree(run / "checkpoints" / "step-00000004")  # resume from step 2 of 4
    (run / "eval.json").unlink()
    cfg = load_config(run / "config.yaml", [f"run.dir={run}", "run.resume=true"])
    result = train(cfg)
    assert result.steps == 4
    new = load_file(run / "checkpoints" / "step-00000004" / "model.safetensors")
    old = load_file(FIXTURE / "checkpoints" / "step-00000004" / "model.safetensors")
    assert new.keys() == old.keys()
    for name in old:
        assert torch.equal(new[name], old[name]), name
    losses = {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}
    old_losses = {
        r["step"]: r["loss"] for r in read_metrics(FIXTURE / "metrics.jsonl") if "loss" in r
    }
    assert losses == old_losses  # steps 1-2 kept from the old run, 3-4 trained again
