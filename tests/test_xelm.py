"""X-ELM: language similarity from the data, language groups, experts per group, a language added
later without touching the others, routing by language, and the dense baseline at equal FLOPs."""

import hashlib
import json

import numpy as np
import pytest
import torch

from moe_lab import cli
from moe_lab.accounting import estimate
from moe_lab.config import ConfigError, load_config
from moe_lab.data.documents import (
    CORPUS_DIR,
    DataError,
    load_documents,
    load_splits,
    with_group_field,
)
from moe_lab.data.packing import build_store, cache_root
from moe_lab.data.tokenizer import ByteTokenizer
from moe_lab.ensembles.directory import load_experts
from moe_lab.ensembles.languages import group_languages, language_similarity
from moe_lab.eval.evaluate import evaluate
from moe_lab.families.xelm import (
    add_language,
    evaluate_by_language,
    run_xelm_experiment,
    train_xelm,
)
from tests.conftest import SHORT_RUN

BASE = [
    *SHORT_RUN,
    "train.max_steps=12",
    "data.group_fields=[lang]",
]


@pytest.fixture(scope="module")
def corpus_texts():
    docs = load_documents([str(CORPUS_DIR / "train.jsonl.gz")], "text", ["lang"])
    texts = {}
    for text, lang in zip(docs["text"], docs["lang"], strict=True):
        texts.setdefault(lang, []).append(text)
    return texts


def test_language_similarity_of_the_corpus_reflects_real_relatedness(corpus_texts):
    langs, sim = language_similarity(corpus_texts)
    assert langs == sorted(corpus_texts)
    np.testing.assert_allclose(sim, sim.T, atol=1e-12)
    np.testing.assert_allclose(np.diag(sim), 1.0, atol=1e-12)
    i = {lang: k for k, lang in enumerate(langs)}
    nearest = {lang: langs[np.argsort(-sim[i[lang]])[1]] for lang in langs}
    assert nearest["pt"] == "es" and nearest["es"] == "pt"  # Ibero-Romance
    assert nearest["ja"] == "zh"  # shared Han characters
    others = [sim[i["ru"], i[lang]] for lang in langs if lang != "ru"]
    assert max(others) < 0.3  # Cyrillic stands apart


@pytest.mark.parametrize("method", ["similarity", "kmeans"])
def test_grouping_recovers_obvious_blocks(method):
    langs = ["a1", "a2", "a3", "b1", "b2", "b3"]
    sim = np.full((6, 6), 0.1)
    sim[:3, :3] = sim[3:, 3:] = 0.8
    np.fill_diagonal(sim, 1.0)
    groups = group_languages(langs, sim, 2, method)
    assert groups == {"a1+a2+a3": ["a1", "a2", "a3"], "b1+b2+b3": ["b1", "b2", "b3"]}
    with pytest.raises(ConfigError, match="n_groups"):
        group_languages(langs, sim, 7, method)
    assert group_languages(["en"], np.ones((1, 1)), 1, method) == {"en": ["en"]}


def _hashes(out):
    return {
        p.parent.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in (out / "experts").glob("*/expert.safetensors")
    }


@pytest.fixture(scope="module")
def xelm(tmp_path_factory):
    out = tmp_path_factory.mktemp("xelm")
    cfg = load_config(
        overrides=[
            *BASE,
            "xelm.grouping=mapping",
            "xelm.groups={romance: [es, fr], de: [de], ru: [ru]}",
            f"run.dir={out}",
        ]
    )
    plan = train_xelm(cfg)
    before = evaluate_by_language(cfg, out)
    hashes = _hashes(out)
    manifest = add_language(cfg, out, "pt")
    return cfg, out, plan, before, hashes, manifest


def test_seed_and_experts_train_on_their_languages(xelm):
    _, out, plan, _, _, manifest = xelm
    seed = load_config(out / "seed" / "config.yaml")
    assert sorted(seed.data.include["lang"]) == ["de", "es", "fr", "ru"]
    assert (seed.data.sample_by, seed.data.sampling_alpha) == ("lang", 0.3)
    for name, langs in {"romance": ["es", "fr"], "de": ["de"], "ru": ["ru"]}.items():
        run = load_config(out / "experts" / name / "run" / "config.yaml")
        assert run.data.include["lang"] == langs
        assert run.train.init_from == str(out / "seed")
    assert list(manifest["experts"]) == ["romance", "de", "ru", "pt"]


def test_an_added_language_branches_from_its_nearest_expert_and_changes_no_other(xelm):
    cfg, out, _, before, hashes, _ = xelm
    plan = json.loads((out / "languages.json").read_text())
    assert plan["added"] == {"pt": "romance"}
    pt = load_config(out / "experts" / "pt" / "run" / "config.yaml")
    assert pt.train.init_from == str(out / "experts" / "romance" / "run")
    assert pt.data.include["lang"] == ["pt"]
    after_hashes = _hashes(out)
    assert {k: after_hashes[k] for k in hashes} == hashes  # bit for bit
    after = evaluate_by_language(cfg, out)["valid"]["groups"]["lang"]
    for lang in ("de", "es", "fr", "ru"):
        assert after[lang] == before["valid"]["groups"]["lang"][lang]
    # Without its own expert Portuguese goes to its nearest one (romance); now to its own.
    routed = evaluate_by_language(cfg, out, experts=["romance", "de", "ru"])
    assert routed["valid"]["groups"]["lang"]["pt"]["loss"] != after["pt"]["loss"]


def test_routing_by_language_equals_running_that_languages_expert_alone(xelm):
    cfg, out, _, _, _, _ = xelm
    report = evaluate_by_language(cfg, out)["valid"]["groups"]["lang"]
    names, experts = load_experts(out)
    eval_cfg = with_group_field(cfg, "lang")
    eval_cfg.data.include = {"lang": ["de", "es", "fr", "pt", "ru"]}
    _, valid, groups = load_splits(eval_cfg)
    store = build_store(valid, ByteTokenizer(), "text", groups, cache_root(None))
    for lang, expert in {"fr": "romance", "ru": "ru", "pt": "pt"}.items():
        alone = evaluate(experts[names.index(expert)], store, 64, 4)["groups"]["lang"][lang]
        assert alone["loss"] == pytest.approx(report[lang]["loss"], rel=1e-6)


def test_languages_without_training_data_are_refused_before_training(tmp_path):
    for override in ("xelm.languages=[de,xx]", "xelm.add=[xx]"):
        cfg = load_config(overrides=[*BASE, override, f"run.dir={tmp_path / 'r'}"])
        with pytest.raises(DataError, match=r"\['xx'\] have no training documents"):
            train_xelm(cfg)
        assert not (tmp_path / "r" / "seed").exists()
    with pytest.raises(ConfigError, match="grouping=mapping needs"):
        load_config(overrides=["xelm.grouping=mapping"])


def test_the_experiment_reports_every_language_next_to_a_dense_baseline_of_equal_flops(tmp_path):
    cfg = load_config(
        overrides=[
            *BASE,
            "train.max_steps=8",
            "xelm.languages=[de,ru]",
            "xelm.add=[nl]",
            f"run.dir={tmp_path}",
        ]
    )
    result = run_xelm_experiment(cfg)
    flops = result["train_flops"]
    per_step = 4 * 64 * estimate(cfg.model, 64).train_flops_per_token
    assert flops["xelm_round1"] - per_step < flops["dense"] <= flops["xelm_round1"]
    assert set(result["loss"]["dense (joint, alpha sampling)"]) == {"de", "nl", "ru"}
    assert result["added"] == {"nl": "de"}
    for lang in ("de", "nl", "ru"):
        assert f"| {lang} |" in result["table"]
    assert (tmp_path / "report.json").is_file()
    assert torch.isfinite(torch.tensor(list(result["loss"]["X-ELM + added"].values()))).all()

    # The README's way to grow a finished run: the same command with another language added.
    index = {"languages.json", "manifest.json", "report.json"}  # what adding a language extends
    before = {
        p: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in tmp_path.rglob("*")
        if p.is_file() and p.name not in index and p.name != ".lock"
    }
    args = [*BASE, "train.max_steps=8", "xelm.languages=[de,ru]", "xelm.add=[nl,pt]"]
    assert cli.main(["xelm", *args, f"run.dir={tmp_path}"]) == 0
    grown = json.loads((tmp_path / "report.json").read_text())
    assert grown["added"] == {"nl": "de", "pt": grown["added"]["pt"]}
    assert "| pt | pt (added, from" in grown["table"]
    assert (
        grown["loss"]["dense (joint, alpha sampling)"]["de"]
        == result["loss"]["dense (joint, alpha sampling)"]["de"]
    )
    for path, (mtime, digest) in before.items():  # every existing file untouched
        assert path.stat().st_mtime_ns == mtime, path
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, path


def test_a_second_call_after_adding_a_language_retrains_nothing(xelm, monkeypatch):
    import moe_lab.families.xelm as xelm_module
    import moe_lab.train.branch as branch_module

    cfg, out, _, _, hashes, _ = xelm

    def fail(*args, **kwargs):
        raise AssertionError("nothing should train again")

    monkeypatch.setattr(xelm_module, "train", fail)
    monkeypatch.setattr(branch_module, "train", fail)
    plan = train_xelm(cfg)
    assert list(plan["manifest"]["experts"]) == ["romance", "de", "ru", "pt"]
    assert {k: v for k, v in _hashes(out).items() if k in hashes} == hashes


def test_moe_lab_generate_routes_a_prompt_by_its_language(xelm, capsys):
    from moe_lab.cli import main
    from moe_lab.eval.generation import generate

    _, out, _, _, _, _ = xelm
    names, experts = load_experts(out)
    tok = ByteTokenizer()
    ids = torch.tensor([[tok.bos_id, *tok.encode("Olá")]])
    for lang, expert in (("pt", "pt"), ("es", "romance")):
        args = ["--lang", lang, "--prompt", "Olá", "--max-new-tokens", "6", "--temperature", "0"]
        assert main(["generate", str(out), *args]) == 0
        alone = generate(experts[names.index(expert)], ids, 6, eos_id=tok.eos_id)
        expected = "Olá" + tok.decode(alone[0, ids.shape[1] :].tolist())
        assert capsys.readouterr().out.rstrip("\n") == expected
    assert main(["generate", str(out), "--lang", "xx", "--prompt", "a"]) == 2
    assert "not in the similarity table" in capsys.readouterr().err
