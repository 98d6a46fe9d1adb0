"""An imported transformers MoE is a run like any other: ``moe-lab import`` writes it, it trains
from ``train.init_from``, evaluates, generates what transformers generates, is routed and
analysed, and IFC's ``restrict`` limits it."""

import json

import pytest
import torch

from moe_lab import ModelConfig
from moe_lab.cli import main
from moe_lab.config import MoEConfig
from moe_lab.data.tokenizer import ByteTokenizer
from moe_lab.eval.generation import generate
from moe_lab.eval.routing_run import analyze_run
from moe_lab.interop.export import hf_tokenizer
from moe_lab.interop.hf import config_to_hf, to_hf
from moe_lab.store.checkpoint import load_run

transformers = pytest.importorskip("transformers")

QWEN3 = ModelConfig(
    dim=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=260, ffn_hidden=48,
    max_seq_len=64, qk_norm="head",
    moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=24, dense_layers=[0], lbl="mixtral",
                  z_loss_weight=0.0),
)  # fmt: skip


@pytest.fixture
def imported(tmp_path):
    """A random Qwen3-MoE with a byte-level tokenizer.json, saved and imported."""
    torch.manual_seed(0)
    theirs = transformers.Qwen3MoeForCausalLM(config_to_hf(QWEN3, "Qwen3MoeForCausalLM")).eval()
    theirs.save_pretrained(tmp_path / "hf")
    hf_tokenizer(ByteTokenizer()).save_pretrained(tmp_path / "hf")
    assert main(["import", str(tmp_path / "hf"), "--to", str(tmp_path / "imported")]) == 0
    return theirs, tmp_path / "imported"


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def test_import_writes_a_run_with_the_same_model_and_tokenizer(imported, tmp_path):
    theirs, run = imported
    cfg, ours, tokenizer = load_run(run)
    assert cfg.model.hf_architecture == "Qwen3MoeForCausalLM"
    tokens = torch.tensor([tokenizer.encode("the cat sat on the mat")])
    assert tokens.max() < 256  # bytes, through the imported tokenizer.json
    assert (_logits(ours, tokens) - _logits(theirs, tokens)).abs().max() <= 1e-5
    with pytest.raises(FileExistsError, match="not empty"):
        from moe_lab.interop.hf_import import import_run

        import_run(tmp_path / "hf", run)


def test_an_imported_moe_trains_evaluates_generates_and_is_routed(imported, tmp_path, lang_files):
    theirs, run = imported
    trained = tmp_path / "trained"
    train_file, valid_file = lang_files
    data = [f"data.train_files=[{train_file}]", f"data.valid_files=[{valid_file}]"]
    rc = main(["train", f"model={run}/model.yaml", f"train.init_from={run}", *data,
               "train.max_steps=6", "train.lr=3e-3", "train.seq_len=32", "train.batch_size=4",
               "train.warmup_steps=1", "train.progress=false", f"run.dir={trained}"])  # fmt: skip
    assert rc == 0
    losses = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in losses if "loss" in r]
    assert losses[-1] < losses[0]

    cfg, ours, tokenizer = load_run(trained)
    changed = [k for k, v in ours.state_dict().items() if "router" in k and "bias" not in k]
    assert changed  # trained on: the routers exist and moved away from the imported weights
    start = load_run(run)[1].state_dict()
    assert not torch.equal(start[changed[0]], ours.state_dict()[changed[0]])

    # evaluation, with the routing of the MoE layers only (layer 0 is dense)
    assert main(["eval", str(trained)]) == 0
    report = json.loads((trained / "eval.json").read_text())
    assert report["valid"]["overall"]["loss"] > 0
    assert len(report["valid"]["routing"]["layers"]) == 2

    # greedy generation equals transformers' on the model exported back
    back = to_hf(ours)
    assert type(back).__name__ == "Qwen3MoeForCausalLM"
    prompt = torch.tensor([tokenizer.encode("the cat")])
    expected = back.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert torch.equal(generate(ours, prompt, 12), expected)

    # routing analysis names the MoE layers; IFC's restrict keeps tokens on the allowed experts
    routing = analyze_run(trained, max_tokens=2000)
    assert routing["layers"] == [1, 2]
    for layer in ours.layers[1:]:
        layer.feed_forward.router.restrict([0, 1])
    with torch.no_grad():
        stats = ours(prompt).routing
    assert all(s.slot_counts_KE[:, 2:].sum() == 0 for s in stats)
    assert all(s.slot_counts_KE[:, :2].sum() > 0 for s in stats)
