"""FlexOlmo: owners train alone on their own documents, touch only their expert, start their router
rows from their data (checked against a naive loop), and opting an owner out equals the model
merged without it."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import moe_lab.families.ifc.pipeline as pipeline
from moe_lab.cli import main
from moe_lab.config import load_config
from moe_lab.data.documents import DataError, load_documents, load_splits
from moe_lab.data.tokenizer import ByteTokenizer
from moe_lab.families.flexolmo import flexolmo_config, merged_model, opt_out_policy
from moe_lab.families.ifc import load_ifc, restrict_experts, train_ifc
from moe_lab.nn.model import build_model
from moe_lab.store.checkpoint import latest_checkpoint
from tests.conftest import write_jsonl
from tests.test_ifc import corpus_files, ifc_cfg, moved_tensors

OWNERS = ["legal", "code"]


def small_corpus_files(root, per_domain=(24, 8)):
    """The first documents of each domain of :func:`corpus_files` (train, valid): the naive loop
    below runs them one span at a time."""
    out = []
    for path, n in zip(corpus_files(root), per_domain, strict=True):
        docs = load_documents([path], "text", ["domain"])
        seen, keep = {}, []
        for text, domain in zip(docs["text"], docs["domain"], strict=True):
            seen[domain] = seen.get(domain, 0) + 1
            if seen[domain] <= n:
                keep.append({"text": text, "domain": domain})
        out.append(str(write_jsonl(root / f"small-{Path(path).name}", keep)))
    return out


@pytest.fixture(scope="module")
def flex(tmp_path_factory):
    root = tmp_path_factory.mktemp("flexolmo")
    files = small_corpus_files(root)
    # FlexOlmo's own backbone (OLMo 2: QK-norm, post-norm), so the merged model exports
    # and the optional router tuning after the merge
    extra = ["model.qk_norm=projection", "model.norm_position=post", "ifc.router_tuning_share=0.2"]
    cfg = flexolmo_config(pipeline.with_domain_field(ifc_cfg(root / "run", files, *extra)))
    # owners as separate jobs: legal's alone first (the public phase with it), then the rest
    assert train_ifc(cfg, only=["legal"]) == {"pending": ["code"]}
    assert not (root / "run" / "domains" / "code").exists()
    manifest = train_ifc(cfg)
    return root / "run", files, manifest, load_config(root / "run" / "seed" / "config.yaml")


def _weights(path):
    return load_file(latest_checkpoint(path / "checkpoints") / "model.safetensors")


def test_each_owner_trains_on_its_own_documents_only(flex):
    out, _, _, _ = flex
    for owner in OWNERS:
        owner_cfg = load_config(out / "domains" / owner / "run" / "config.yaml")
        train_docs, _, _ = load_splits(owner_cfg)
        assert set(train_docs["domain"]) == {owner}


def test_an_owner_changes_no_tensor_outside_its_expert(flex):
    out, _, manifest, _ = flex
    for owner in OWNERS:
        assert len(moved_tensors(out, manifest, owner)) == 4 * 2  # its rows of 4 tensors, 2 layers


def _naive_mean_ffn_inputs(model, texts, seq_len):
    """Per layer, the mean FFN input over every input token of ``texts``, one span of at most
    ``seq_len`` tokens at a time, the post-norm blocks written out (the FFN reads the stream)."""
    tok = ByteTokenizer()
    sums, count = [torch.zeros(model.cfg.dim, dtype=torch.float64) for _ in model.layers], 0
    with torch.no_grad():
        for text in texts:
            inputs = [tok.bos_id, *tok.encode(text)]  # [BOS, x, EOS] without its last token
            for start in range(0, len(inputs), seq_len):
                ids = torch.tensor([inputs[start : start + seq_len]])
                x = model.tok_embeddings(ids)
                cos, sin = model._rope(torch.arange(ids.shape[1])[None], x.dtype)
                for layer, total in zip(model.layers, sums, strict=True):
                    x = x + layer.attention_norm(layer.attention(x, cos, sin, None, None))
                    total += x[0].double().sum(0)
                    x = x + layer.ffn_norm(layer.feed_forward(x)[0])
                count += ids.shape[1]
    return [(s / count).float() for s in sums]


def test_router_rows_are_the_mean_ffn_input_of_each_owners_data(flex):
    out, (train_file, _), manifest, cfg = flex
    docs = load_documents([train_file], "text", ["domain"])
    seed = build_model(cfg.model)
    seed.load_state_dict(_weights(out / "seed"))
    restrict_experts(seed, [0])  # the public model: its one expert is the whole FFN
    init = {owner: _weights(out / "domains" / owner / "init") for owner in OWNERS}
    for owner in OWNERS:
        index = manifest["experts"][owner]["index"]
        texts = [t for t, d in zip(docs["text"], docs["domain"], strict=True) if d == owner]
        expected = _naive_mean_ffn_inputs(seed, texts, cfg.train.seq_len)
        for i, mean in enumerate(expected):
            row = init[owner][f"layers.{i}.feed_forward.router.gate.weight"][index]
            torch.testing.assert_close(row, mean, rtol=1e-4, atol=1e-5)
    # the public row, in the seed, from public documents; every other row of the seed copies it
    public = [t for t, d in zip(docs["text"], docs["domain"], strict=True) if d == "literature"]
    for i, mean in enumerate(_naive_mean_ffn_inputs(seed, public, cfg.train.seq_len)):
        rows = seed.layers[i].feed_forward.router.gate.weight
        torch.testing.assert_close(rows[0], mean, rtol=1e-4, atol=1e-5)
        assert all(torch.equal(r, rows[0]) for r in rows[1:])


def test_opting_an_owner_out_equals_the_model_merged_without_it(flex):
    out, _, _, _ = flex
    policy = opt_out_policy(OWNERS)
    without_code = load_ifc(out, policy, "without code").model  # code's expert masked
    everyone = load_ifc(out, policy, "all owners").model
    merged = merged_model(out, ["legal"])  # code's expert never loaded: 2 experts
    assert merged.cfg.moe.num_experts == 2
    x = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(without_code(x).logits, merged(x).logits, rtol=0, atol=1e-6)
        assert (everyone(x).logits - merged(x).logits).abs().max() > 1e-3  # code's expert mattered


def test_the_merged_model_exports_to_transformers_flexolmo(flex):
    transformers = pytest.importorskip("transformers")
    from moe_lab.interop.hf import to_hf

    out, _, _, _ = flex
    with pytest.raises(ValueError, match=r"always_selected"):
        to_hf(merged_model(out), "FlexOlmoForCausalLM")
    ours = merged_model(out, public_always_selected=False)
    theirs = to_hf(ours, "FlexOlmoForCausalLM")
    assert isinstance(theirs, transformers.FlexOlmoForCausalLM)
    assert theirs.config.num_experts == 1 + len(OWNERS)
    x = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(x).logits - theirs(x).logits).abs().max() <= 1e-5


def test_moe_lab_flexolmo_reports_each_domain_with_and_without_its_owner(flex, tmp_path, capsys):
    _, (train_file, valid_file), _, _ = flex
    rc = main(["flexolmo", "model.moe.top_k=2", "train.max_steps=6", "train.seq_len=64",
               "train.batch_size=4", "train.progress=false", "train.warmup_steps=1",
               "data.group_fields=[domain]", "ifc.domain_field=domain", "ifc.public=literature",
               "ifc.domains=[legal,code]", f"data.train_files=[{train_file}]",
               f"data.valid_files=[{valid_file}]", f"run.dir={tmp_path / 'flex'}"])  # fmt: skip
    assert rc == 0
    table = capsys.readouterr().out
    for column in ("dense (all data)", "all owners: literature+legal+code",
                   "without legal: literature+code", "without code: literature+legal"):  # fmt: skip
        assert column in table
    loss = json.loads((tmp_path / "flex" / "report.json").read_text())["loss"]
    # an owner's data is modelled better with its expert than without it
    for owner in OWNERS:
        assert loss["all owners: literature+legal+code"][owner] < min(
            v[owner] for k, v in loss.items() if k.startswith(f"without {owner}")
        )
    assert np.isfinite(loss["dense (all data)"]["legal"])


def test_flexolmo_settings_override_the_ifc_ones_and_bad_input_stops_before_training(
    flex, tmp_path
):
    _, files, _, _ = flex
    cfg = flexolmo_config(ifc_cfg(tmp_path, files, "ifc.form=ensemble", "ifc.public=nobody"))
    assert cfg.ifc.form == "moe" and cfg.ifc.router_init == "data" and not cfg.ifc.mix_public
    with pytest.raises(DataError, match="no training document has domain='nobody'"):
        train_ifc(cfg)
    assert not (tmp_path / "public").exists()


def test_router_tuning_trains_only_the_routers_on_public_text(flex):
    out, _, manifest, _ = flex
    assert set(manifest["router"]["provenance"]) == {"literature", *OWNERS}
    init, run = _weights(out / "router" / "init"), _weights(out / "router" / "run")
    moved = {k for k in run if not torch.equal(run[k], init[k])}
    assert moved == {f"layers.{i}.feed_forward.router.gate.weight" for i in range(2)}
    tuning_cfg = load_config(out / "router" / "run" / "config.yaml")
    assert set(load_splits(tuning_cfg)[0]["domain"]) == {"literature"}
    assert manifest["train_flops"] == pytest.approx(
        sum(e["flops"] for e in manifest["experts"].values())
        + manifest["router"]["flops"]
        + json.loads((out / "public" / "run" / "eval.json").read_text())["flops"]
    )


def test_tuned_routers_serve_only_principals_permitted_every_domain(flex, monkeypatch):
    out, _, manifest, _ = flex
    opened = []
    read = pipeline._read
    monkeypatch.setattr(
        pipeline, "_read", lambda path, device: opened.append(path.name) or read(path, device)
    )
    policy = opt_out_policy(OWNERS)
    everyone = load_ifc(out, policy, "all owners").model
    assert "router.safetensors" in opened
    opened.clear()
    without_code = load_ifc(out, policy, "without code").model
    assert "router.safetensors" not in opened  # tuned with code's expert: never opened
    tuned_rows = load_file(out / "router" / "router.safetensors")
    key = "layers.0.feed_forward.router.gate.weight"
    assert torch.equal(everyone.state_dict()[key], tuned_rows[key])
    assert not torch.equal(without_code.state_dict()[key], tuned_rows[key])
