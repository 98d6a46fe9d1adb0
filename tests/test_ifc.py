"""Information-flow control: policies fail closed, forbidden experts never influence an output,
one domain's data changes only its own expert, and provenance is enforced at load time."""

import json
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

import moe_lab.families.ifc.pipeline as pipeline
from moe_lab.accounting import estimate
from moe_lab.config import ConfigError, ModelConfig, MoEConfig, load_config
from moe_lab.data.documents import CORPUS_DIR, DataError, load_documents
from moe_lab.data.policy import AccessPolicy, PolicyError
from moe_lab.eval.generation import generate
from moe_lab.families.ifc import ExpertScope, expert_rows, load_ifc, restrict_experts, train_ifc
from moe_lab.nn.experts.moe import MoE
from moe_lab.nn.model import build_model
from moe_lab.nn.routing.topk import TopKRouter
from moe_lab.store.checkpoint import latest_checkpoint
from tests.conftest import SHORT_RUN, write_jsonl

POLICY = AccessPolicy.from_dict(
    {"principals": {"alice": ["legal"], "bob": ["legal", "code"], "guest": []}}
)
BASE = [
    *SHORT_RUN,
    "train.max_steps=8",
    "model.moe.top_k=2",
    "data.group_fields=[domain]",
    "ifc.domain_field=domain",
    "ifc.public=literature",
    "ifc.domains=[legal,code]",
]


# Module scope, so that the module-scoped `trained` run uses deterministic kernels too. With
# function scope it did not while the retraining test's own run did, and on CUDA, where the two
# kinds of kernel round differently, that test failed on an H100; a check there with both runs
# deterministic found every weight file outside the retrained domain bitwise equal.
@pytest.fixture(autouse=True, scope="module")
def _deterministic():
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


def tiny_moe(num_experts=3, top_k=2):
    cfg = ModelConfig(vocab_size=64, moe=MoEConfig(num_experts=num_experts, top_k=top_k))
    return build_model(cfg)


# -- policies ----
def test_policy_lists_public_first_then_grants_in_model_order():
    assert POLICY.permitted("bob", "literature", ["code", "legal"]) == [
        "literature",
        "code",
        "legal",
    ]
    assert POLICY.permitted("guest", "literature", ["code", "legal"]) == ["literature"]


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"principals": {}}, "empty policy"),
        ({}, "'principals' mapping"),
        ({"principals": {"a": "legal"}}, "needs a list"),
        ({"principals": {"a": []}, "admins": []}, "unknown keys"),
    ],
)
def test_unusable_policies_fail_closed(raw, match):
    with pytest.raises(PolicyError, match=match):
        AccessPolicy.from_dict(raw)


def test_unknown_principal_missing_expert_and_wrong_public_fail_closed(tmp_path):
    with pytest.raises(PolicyError, match="unknown principal 'mallory'"):
        POLICY.permitted("mallory", "literature", ["legal", "code"])
    with pytest.raises(PolicyError, match=r"granted \['code'\], which have no expert"):
        POLICY.permitted("bob", "literature", ["legal"])
    other = AccessPolicy.from_dict({"public": "wiki", "principals": {"a": []}})
    with pytest.raises(PolicyError, match="public domain 'wiki'"):
        other.permitted("a", "literature", [])
    with pytest.raises(PolicyError, match="does not exist"):
        AccessPolicy.load(tmp_path / "none.yaml")
    (tmp_path / "p.yaml").write_text("principals:\n  alice: [legal]\n")
    assert AccessPolicy.load(tmp_path / "p.yaml").grants == {"alice": frozenset({"legal"})}


# -- routing under a policy ----
def test_restricted_router_matches_a_softmax_over_the_allowed_experts_only():
    router = TopKRouter(16, MoEConfig(num_experts=5, top_k=3))
    router.reset_parameters()
    x = torch.randn(40, 16)
    router.restrict([0, 2, 4])
    weights, indices, probs, _ = router(x)
    # Reference: drop the forbidden experts' columns, then softmax, top-k and renormalise.
    logits = x @ router.gate.weight[[0, 2, 4]].t()
    ref_probs = logits.softmax(-1)
    ref_w, ref_i = ref_probs.topk(3, dim=-1)
    assert torch.equal(indices, torch.tensor([0, 2, 4])[ref_i])
    torch.testing.assert_close(weights, ref_w / ref_w.sum(-1, keepdim=True))
    assert torch.equal(probs[:, [1, 3]], torch.zeros(40, 2))  # exactly zero, not just small
    router.restrict([3])  # fewer experts allowed than top_k: k shrinks
    weights, indices, _, _ = router(x)
    assert indices.shape == (40, 1) and bool((indices == 3).all()) and bool((weights == 1).all())


def test_a_balancing_bias_cannot_select_a_forbidden_expert():
    router = TopKRouter(8, MoEConfig(num_experts=3, top_k=1, bias_update_rate=1e-3))
    router.reset_parameters()
    router.expert_bias[2] = 100.0
    router.restrict([0, 1])
    assert not bool((router(torch.randn(30, 8))[1] == 2).any())


def test_restrict_refuses_an_empty_or_out_of_range_set():
    router = TopKRouter(8, MoEConfig(num_experts=3, top_k=1))
    for bad in ([], [3], [-1]):
        with pytest.raises(ValueError, match="non-empty subset"):
            router.restrict(bad)


def _scramble(model, expert, value=None):
    with torch.no_grad():
        for moe in (m for m in model.modules() if isinstance(m, MoE)):
            for tensor, rows in expert_rows(moe, expert).values():
                tensor[rows] = torch.randn_like(tensor[rows]) if value is None else value


@pytest.mark.parametrize("value", [None, float("nan")], ids=["randomised", "nan"])
def test_outputs_do_not_depend_on_a_forbidden_experts_weights(value):
    model = tiny_moe().eval()
    restrict_experts(model, [0, 1])
    x = torch.randint(0, 64, (3, 24))
    logits = model(x).logits
    tokens = generate(
        model, x[:, :5], 8, temperature=1.0, generator=torch.Generator().manual_seed(1)
    )
    _scramble(model, 2, value)
    assert torch.equal(model(x).logits, logits)
    again = generate(
        model, x[:, :5], 8, temperature=1.0, generator=torch.Generator().manual_seed(1)
    )
    assert torch.equal(again, tokens)
    restrict_experts(model, None)  # the guard: with expert 2 permitted the change shows
    assert not torch.equal(model(x).logits, logits)


# -- update isolation ----
def test_a_scoped_step_changes_only_the_trained_experts_rows_and_follows_adamw():
    model = tiny_moe(num_experts=3, top_k=2)
    scope = ExpertScope(visible=[0, 2], trained=2)
    scope.apply(model)
    lr, wd = 1e-2, 0.1
    opt = torch.optim.AdamW(scope.param_groups(wd), lr=lr, foreach=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, 64, (2, 16))
    model.loss(x, x)[0].backward()
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    frozen = [p for n, p in model.named_parameters() if "feed_forward" not in n]
    assert frozen and all(p.grad is None for p in frozen)
    # Independent reference: plain AdamW (its own decay) on copies of expert 2's rows alone.
    ref_params, ref_grads = [], []
    for moe in moes:
        for tensor, rows in expert_rows(moe, 2).values():
            ref_params.append(tensor[rows].detach().clone().requires_grad_())
            ref_grads.append(tensor.grad[rows].clone())
            others = torch.ones(tensor.shape[0], dtype=torch.bool)
            others[rows] = False
            assert not bool(tensor.grad[others].any())  # other experts' gradients are zero
    ref = torch.optim.AdamW(ref_params, lr=lr, weight_decay=wd, foreach=False)
    for p, g in zip(ref_params, ref_grads, strict=True):
        p.grad = g
    ref.step()
    scope.before_step(lr)
    opt.step()
    trained_rows = {}  # state-dict key -> expert 2's rows in it
    for name, moe in model.named_modules():
        if isinstance(moe, MoE):
            for key, (tensor, rows) in expert_rows(moe, 2).items():
                trained_rows[f"{name}.{key}"] = rows
                torch.testing.assert_close(tensor[rows], ref_params.pop(0), rtol=0, atol=1e-7)
    for key, value in model.state_dict().items():
        others = torch.ones(value.shape[0], dtype=torch.bool)
        if key in trained_rows:
            others[trained_rows[key]] = False
            assert not torch.equal(value, before[key])  # the trained rows did move
        assert torch.equal(value[others], before[key][others]), key


# -- the pipeline ----
def corpus_files(tmp_path, replace_code_with=None):
    """The shipped corpus' literature, legal and code documents as files; optionally the code
    domain's documents replaced by another domain's text (a different D_code)."""
    out = []
    for split in ("train", "valid"):
        docs = load_documents([str(CORPUS_DIR / f"{split}.jsonl.gz")], "text", ["domain"])
        keep = [r for r in docs if r["domain"] in ("literature", "legal", "code")]
        if replace_code_with is not None and split == "train":
            other = [r["text"] for r in docs if r["domain"] == replace_code_with]
            code = [r for r in keep if r["domain"] == "code"]
            keep = [r for r in keep if r["domain"] != "code"]
            keep += [{"text": t, "domain": "code"} for t in other[: len(code)]]
        out.append(str(write_jsonl(tmp_path / f"{split}.jsonl", keep)))
    return out


def ifc_cfg(tmp_path, files, *extra):
    train_file, valid_file = files
    return load_config(
        overrides=[
            *BASE,
            f"data.train_files=[{train_file}]",
            f"data.valid_files=[{valid_file}]",
            f"run.dir={tmp_path}",
            *extra,
        ]
    )


def test_the_dense_baseline_trains_on_the_ifc_runs_domains_only(tmp_path, monkeypatch):
    import moe_lab.families.ifc.experiment as experiment
    from moe_lab.data.documents import load_splits

    seen = []
    monkeypatch.setattr(experiment, "train", seen.append)  # the config it would train
    cfg = ifc_cfg(tmp_path / "run", corpus_files(tmp_path), "ifc.domains=[legal]")
    experiment.dense_baseline(pipeline.with_domain_field(cfg), 1e15, tmp_path / "dense", ["legal"])
    train_docs, _, _ = load_splits(seen[0])
    assert sorted(set(train_docs["domain"])) == ["legal", "literature"]  # code is not the run's


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ifc")
    files = corpus_files(root)
    cfg = ifc_cfg(root / "run", files)
    manifest = train_ifc(cfg)
    return root / "run", files, manifest


def restricted_logits(out, principal, x):
    return load_ifc(out, POLICY, principal).model(x).logits


def moved_tensors(out, manifest, domain) -> list[str]:
    """The tensors ``domain``'s phase changed, after asserting that it changed no row outside
    its expert's (its rows of w1, v1, w2 and its router row)."""
    seed = load_file(latest_checkpoint(out / "seed" / "checkpoints") / "model.safetensors")
    index = manifest["experts"][domain]["index"]
    run = load_file(pipeline._final_weights(out / "domains" / domain / "run"))
    moved = []
    for key, value in run.items():
        rows = torch.ones(value.shape[0], dtype=torch.bool)
        if key.endswith(("w1", "v1", "w2")):
            F = value.shape[0] // 3
            rows[index * F : (index + 1) * F] = False
        elif key.endswith("router.gate.weight"):
            rows[index] = False
        assert torch.equal(value[rows], seed[key][rows]), (domain, key)
        if not torch.equal(value, seed[key]):
            moved.append(key)
    return moved


def test_each_domain_phase_changed_only_its_experts_rows(trained):
    out, _, manifest = trained
    for domain in ("legal", "code"):
        # w1, v1, w2 and the router row in each of the 2 layers
        assert len(moved_tensors(out, manifest, domain)) == 4 * 2


def test_a_principal_without_grants_gets_exactly_the_public_model(trained):
    out, _, _ = trained
    x = torch.randint(0, 256, (2, 32))
    public = build_model(load_config(out / "public" / "run" / "config.yaml").model).eval()
    public.load_state_dict(load_file(pipeline._final_weights(out / "public" / "run")))
    restrict_experts(public, [0])
    assert torch.equal(restricted_logits(out, "guest", x), public(x).logits)
    assert not torch.equal(restricted_logits(out, "alice", x), public(x).logits)


def test_load_opens_only_permitted_files(trained, monkeypatch):
    out, _, _ = trained
    opened = []
    real = pipeline._read
    monkeypatch.setattr(
        pipeline, "_read", lambda path, device: opened.append(path) or real(path, device)
    )
    ifc = load_ifc(out, POLICY, "alice")
    assert ifc.permitted == ["literature", "legal"]
    assert {p.relative_to(out).parts[0:2] for p in opened} == {
        ("seed", "checkpoints"),
        ("domains", "legal"),
    }


def test_outputs_ignore_a_forbidden_domains_expert_file_changed_or_removed(trained, tmp_path):
    out, _, _ = trained
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    x = torch.randint(0, 256, (2, 40))
    reference = restricted_logits(copy, "alice", x)
    code = copy / "domains" / "code" / "expert.safetensors"
    save_file({k: torch.randn_like(v) for k, v in load_file(code).items()}, code)
    assert torch.equal(restricted_logits(copy, "alice", x), reference)
    code.unlink()
    assert torch.equal(restricted_logits(copy, "alice", x), reference)
    with pytest.raises(FileNotFoundError):  # bob may use code: its missing file is an error
        load_ifc(copy, POLICY, "bob")


@pytest.mark.parametrize("artefact", ["shared", "tokenizer"])
def test_an_artefact_touched_by_a_forbidden_domain_is_refused(trained, tmp_path, artefact):
    out, _, _ = trained
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest[artefact]["provenance"] = ["literature", "code"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PolicyError, match=r"data of \['code'\]"):
        load_ifc(copy, POLICY, "alice")
    assert load_ifc(copy, POLICY, "bob").permitted == ["literature", "legal", "code"]


def test_retraining_with_different_data_for_a_domain_changes_nothing_outside_it(trained, tmp_path):
    out, _, _ = trained
    files = corpus_files(tmp_path, replace_code_with="religion")
    other = tmp_path / "other"
    train_ifc(ifc_cfg(other, files))
    x = torch.randint(0, 256, (2, 48))
    for principal in ("guest", "alice"):
        assert torch.equal(
            restricted_logits(other, principal, x), restricted_logits(out, principal, x)
        )
    legal = "domains/legal/expert.safetensors"
    a, b = load_file(out / legal), load_file(other / legal)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The guard: a principal who may read code sees the change.
    assert not torch.equal(restricted_logits(other, "bob", x), restricted_logits(out, "bob", x))


def test_the_ensemble_form_loads_whole_expert_lms_under_the_same_policy(tmp_path, monkeypatch):
    files = corpus_files(tmp_path)
    out = tmp_path / "ens"
    manifest = train_ifc(ifc_cfg(out, files, "ifc.form=ensemble", "train.max_steps=6"))
    assert manifest["form"] == "ensemble"
    opened = []
    real = pipeline._read
    monkeypatch.setattr(
        pipeline, "_read", lambda path, device: opened.append(path) or real(path, device)
    )
    ifc = load_ifc(out, POLICY, "alice")
    assert len(ifc.experts) == 2 and "code" not in {p.parent.name for p in opened}
    public = load_file(out / "public" / "expert.safetensors")
    assert all(torch.equal(public[k], v) for k, v in ifc.experts[0].state_dict().items())


def test_bad_input_is_refused_before_training(tmp_path):
    train_file = write_jsonl(
        tmp_path / "t.jsonl",
        [{"text": "a public text", "domain": "literature"}, {"text": "no domain here"}],
    )
    files = (str(train_file), str(train_file))
    with pytest.raises(DataError, match="domain"):
        train_ifc(ifc_cfg(tmp_path / "a", files))
    assert not (tmp_path / "a" / "public").exists()
    files = corpus_files(tmp_path)
    with pytest.raises(DataError, match=r"\['medical'\] have no training documents"):
        train_ifc(ifc_cfg(tmp_path / "b", files, "ifc.domains=[legal,medical]"))
    with pytest.raises(DataError, match="no training document has domain='wiki'"):
        train_ifc(ifc_cfg(tmp_path / "c", files, "ifc.public=wiki"))
    with pytest.raises(ConfigError, match="dropless"):
        train_ifc(ifc_cfg(tmp_path / "d", files, "model.moe.capacity_factor=1.0"))
    with pytest.raises(ConfigError, match="needs MoE layers"):
        train_ifc(replace(ifc_cfg(tmp_path / "e", files), model=ModelConfig()))


def test_moe_lab_ifc_trains_both_models_and_reports_every_principal_per_domain(tmp_path, capsys):
    from moe_lab.cli import main

    train_file, valid_file = corpus_files(tmp_path)
    policy = tmp_path / "policy.yaml"
    policy.write_text("public: literature\nprincipals:\n  guest: []\n  lawyer: [legal]\n")
    args = [f"ifc.policy={policy}", f"data.train_files=[{train_file}]"]
    args += [f"data.valid_files=[{valid_file}]", f"run.dir={tmp_path / 'run'}"]
    assert main(["ifc", *BASE, *args]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert set(report["loss"]) == {
        "dense (all data)",
        "guest: literature",
        "lawyer: literature+legal",
    }
    assert all(set(v) == {"literature", "legal", "code"} for v in report["loss"].values())
    flops = report["train_flops"]
    dense = load_config(tmp_path / "run" / "dense" / "config.yaml").model
    per_step = 4 * 64 * estimate(dense, 64).train_flops_per_token  # the budget is met to a step
    assert flops["ifc"] - per_step < flops["dense"] <= flops["ifc"]
    assert "| legal |" in capsys.readouterr().out
    policy.write_text("principals:\n  intern: [medical]\n")  # a grant without an expert
    assert main(["ifc", *BASE, *args, f"run.dir={tmp_path / 'run2'}"]) == 2
    assert "which have no expert" in capsys.readouterr().err
    assert not (tmp_path / "run2").exists()  # refused before any training


def test_moe_lab_eval_and_generate_serve_one_principal(trained, tmp_path, capsys):
    from moe_lab.cli import main

    out, _, _ = trained
    policy = tmp_path / "policy.yaml"
    policy.write_text("principals:\n  alice: [legal]\n")
    who = ["--principal", "alice", "--policy", str(policy)]
    records = [
        {"query": q, "choices": [" the court", " the function", " the king"], "label": i % 3}
        for i, q in enumerate(["The appeal went to", "Call it inside", "Long live", "Ask"])
    ]
    task = write_jsonl(tmp_path / "who.jsonl", records)
    assert main(["eval", str(out), *who, "--tasks", str(task)]) == 0
    report = json.loads((out / "eval-alice.json").read_text())
    assert report["permitted"] == ["literature", "legal"]
    assert set(report["valid"]["groups"]["domain"]) == {"literature", "legal", "code"}
    from moe_lab.eval.fewshot import evaluate_task
    from moe_lab.eval.scoring import TransformerScorer

    alice = load_ifc(out, AccessPolicy.load(policy), "alice")
    expected = evaluate_task(TransformerScorer(alice.model, alice.tokenizer), records)
    assert report["fewshot"]["who"] == {"file": str(task), **expected}
    # --routing-modes is for expert directories: refused here, not ignored
    assert main(["eval", str(out), *who, "--routing-modes", "prefix"]) == 2
    capsys.readouterr()
    prompt = ["--prompt", "The law", "--max-new-tokens", "12", "--temperature", "0"]
    assert main(["generate", str(out), *who, *prompt]) == 0
    text = capsys.readouterr().out.rstrip("\n")
    ifc = load_ifc(out, AccessPolicy.load(policy), "alice")
    ids = torch.tensor([[ifc.tokenizer.bos_id, *ifc.tokenizer.encode("The law")]])
    expected = generate(ifc.model, ids, 12, eos_id=ifc.tokenizer.eos_id)
    assert text == "The law" + ifc.tokenizer.decode(expected[0, ids.shape[1] :].tolist())
    assert main(["generate", str(out), *prompt]) == 2
    assert "pass --principal and --policy" in capsys.readouterr().err
    assert main(["eval", str(out), "--principal", "mallory", "--policy", str(policy)]) == 2
    assert "unknown principal 'mallory'" in capsys.readouterr().err


def test_the_scorer_runs_only_what_the_principal_may(trained, monkeypatch):
    from moe_lab.families.loading import load_scorer

    out, _, _ = trained
    with pytest.raises(ConfigError, match="pass --principal and --policy"):
        load_scorer(out)
    opened = []
    real = pipeline._read
    monkeypatch.setattr(
        pipeline, "_read", lambda path, device: opened.append(path) or real(path, device)
    )
    scorer = load_scorer(out, principal="alice", policy=POLICY)
    assert opened and "code" not in {p.parent.name for p in opened}  # never opened
    model = load_ifc(out, POLICY, "alice").model
    tok = scorer.tokenizer
    seq = [tok.bos_id, *tok.encode("The court held that the contract was void")]
    with torch.no_grad():
        ref = model(torch.tensor([seq[:-1]])).logits.double().log_softmax(-1)[0]
    ref = ref.gather(-1, torch.tensor(seq[1:])[:, None])[:, 0].numpy()
    torch.testing.assert_close(scorer.token_logprobs([seq])[0], ref.astype("float32"))
