"""The lm-evaluation-harness adapter, from hand-built Instances, against sums of token
log-probabilities from the model's own forward pass; and lm_eval.simple_evaluate on a local task."""

import json
import math

import numpy as np
import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

from moe_lab.data.tokenizer import ByteTokenizer  # noqa: E402
from moe_lab.ensembles.ensemble import ExpertEnsemble  # noqa: E402
from moe_lab.ensembles.scoring import EnsembleScorer, FixedRouting  # noqa: E402
from moe_lab.eval.scoring import TransformerScorer  # noqa: E402
from moe_lab.interop.harness import MoeLabLM  # noqa: E402
from tests.tiny import MOE, ascii_model, naive_logprobs, tiny_model, write_run  # noqa: E402

TOK = ByteTokenizer()


def _requests(kind, args):
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def _manual(model, context, continuation):
    """Summed log p of the continuation's bytes after BOS + context; whether each is the argmax."""
    ctx, cont = TOK.encode(context), TOK.encode(continuation)
    seq = [TOK.bos_id, *ctx, *cont]
    lp = naive_logprobs(model, seq)[-len(cont) :]
    with torch.no_grad():
        logits = model(torch.tensor([seq[:-1]])).logits[0, -len(cont) :]
    return lp.sum(), bool((logits.argmax(-1) == torch.tensor(cont)).all())


@pytest.mark.parametrize("kind", [[], MOE], ids=["dense", "moe"])
def test_loglikelihood_equals_manual_sums_and_empty_context_conditions_on_bos(kind):
    model = tiny_model(*kind)
    lm = MoeLabLM(TransformerScorer(model, TOK, batch_size=2))
    args = [("The cat sat on", " the mat"), ("", "Hello"), ("a b  ", "c"), ("x" * 200, " end")]
    got = lm.loglikelihood(_requests("loglikelihood", args))
    for (context, continuation), (ll, greedy) in zip(args[:2], got, strict=False):
        ref, ref_greedy = _manual(model, context, continuation)
        assert ll == pytest.approx(ref, abs=1e-4) and greedy == ref_greedy
    # trailing whitespace moves into the continuation: "a b" + "  c"
    assert got[2][0] == pytest.approx(_manual(model, "a b", "  c")[0], abs=1e-4)
    # 205 tokens > the context of 96: the right end of BOS + context is kept
    seq = [TOK.bos_id, *TOK.encode("x" * 200 + " end")][-97:]
    assert got[3][0] == pytest.approx(naive_logprobs(model, seq)[-4:].sum(), abs=1e-4)


def test_is_greedy_is_true_exactly_for_the_greedy_continuation():
    scorer = TransformerScorer(ascii_model(), TOK)
    context = "the dog"
    greedy = TOK.decode(scorer.greedy([TOK.bos_id, *TOK.encode(context)], 6))
    assert len(TOK.encode(greedy)) == 6
    other = greedy[:-1] + chr((ord(greedy[-1]) + 1) % 128)
    out = MoeLabLM(scorer).loglikelihood(
        _requests("loglikelihood", [(context, greedy), (context, other)])
    )
    assert [g for _, g in out] == [True, False]
    assert out[0][0] > out[1][0]


def test_loglikelihood_rolling_is_the_whole_text_nll_in_windows():
    model = tiny_model()
    lm = MoeLabLM(TransformerScorer(model, TOK, batch_size=3))
    short, long = "To be, or not to be", "".join(f"line {i}, " for i in range(40))  # 320 bytes
    got = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(short,), (long,)]))
    assert got[0] == pytest.approx(naive_logprobs(model, [TOK.bos_id, *TOK.encode(short)]).sum())
    # lm-eval's own window maker is the reference: each token once, from its window's context
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    ref = 0.0
    for ctx, pred in map(
        make_disjoint_window, get_rolling_token_windows(TOK.encode(long), TOK.bos_id, 96, 1)
    ):
        ref += naive_logprobs(model, [*ctx, *pred])[-len(pred) :].sum()
    assert got[1] == pytest.approx(ref, abs=1e-3)


def test_generate_until_is_greedy_stops_at_until_and_respects_max_gen_toks():
    model = ascii_model()
    scorer = TransformerScorer(model, TOK)
    lm = MoeLabLM(scorer)
    context = "Once upon"
    full = TOK.decode(scorer.greedy([TOK.bos_id, *TOK.encode(context)], 20))
    stop = full[8:10]
    expected = full.split(stop, 1)[0]
    kwargs = [{"until": [stop], "max_gen_toks": 20}, {"until": [], "max_gen_toks": 5}]
    out = lm.generate_until(_requests("generate_until", [(context, k) for k in kwargs]))
    assert out == [expected, full[: len(TOK.decode(TOK.encode(full)[:5]))]]
    assert stop not in out[0] and len(TOK.encode(out[1])) == 5


def test_an_ensemble_behind_the_adapter_scores_its_mixture():
    experts = [tiny_model(seed=s) for s in (1, 2)]
    ens = EnsembleScorer(ExpertEnsemble(experts), FixedRouting.uniform(2), TOK)
    ((ll, _),) = MoeLabLM(ens).loglikelihood(_requests("loglikelihood", [("ab", "cd")]))
    seq = [TOK.bos_id, *TOK.encode("abcd")]
    p = np.mean([np.exp(naive_logprobs(e, seq)[-2:]) for e in experts], axis=0)
    assert ll == pytest.approx(np.log(p).sum(), abs=1e-4)


def test_registered_as_moe_lab_and_loads_a_run_directory(tmp_path):
    model = write_run(tmp_path / "run")
    lm = get_model("moe_lab").create_from_arg_string(f"run_dir={tmp_path / 'run'},batch_size=4")
    ((ll, _),) = lm.loglikelihood(_requests("loglikelihood", [("Hi", " there")]))
    assert ll == pytest.approx(_manual(model, "Hi", " there")[0], abs=1e-4)
    with pytest.raises(ValueError, match="exactly one of scorer and run_dir"):
        MoeLabLM()


def test_moe_lab_harness_runs_a_local_jsonl_task_offline(tmp_path, monkeypatch, capsys):
    from moe_lab.cli import main

    records = [
        {"query": f"{a} plus {b} is", "choices": [str(a + b), str(a + b + 1)], "label": i % 2}
        for i, (a, b) in enumerate([(1, 2), (3, 4), (5, 1), (2, 2), (6, 3), (4, 4)])
    ]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "tiny_sums.yaml").write_text(
        "task: tiny_sums\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'items.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{query}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n"
    )
    import lm_eval.evaluator

    # Not what is tested, and slow here: the environment report runs `pip list` in a subprocess.
    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)
    model = write_run(tmp_path / "run")
    args = ["harness", str(tmp_path / "run"), "--tasks", "tiny_sums", "--include-path"]
    assert main([*args, str(tmp_path), "--limit", "5"]) == 0
    acc = json.loads((tmp_path / "run" / "harness.json").read_text())["results"]["tiny_sums"]
    picks = []  # the reference: argmax of the manual sums, item by item
    for r in records[:5]:
        lls = [_manual(model, r["query"], " " + c)[0] for c in r["choices"]]
        picks.append(int(np.argmax(lls)) == r["label"])
    assert math.isclose(acc["acc,none"], np.mean(picks))
    # lm-eval builds its prompts its own way; moe_lab.eval.fewshot agrees with it on the same items
    from moe_lab.eval.fewshot import evaluate_task
    from moe_lab.families.loading import load_scorer

    ours = evaluate_task(load_scorer(tmp_path / "run"), records[:5])["overall"]
    assert math.isclose(acc["acc,none"], ours["acc"]) and 0 < ours["acc"] < 1
    assert "tiny_sums" in capsys.readouterr().out
