"""The statistics behind a comparison: paired differences, scaling fits with bootstrap intervals,
crossovers of two curves, and the budget sweep's configuration."""

import math
import zlib

import numpy as np
import pytest
from scipy import stats

from moe_lab.compare.experiment import BudgetConfig, load_experiment
from moe_lab.compare.scaling import crossover, fit_scaling, law, scaling_study
from moe_lab.compare.scaling_nd import fit_nd, law_nd, nd_study, optimal_size
from moe_lab.compare.stats import paired_difference, significance
from moe_lab.compare.summary import group_columns, nd_section
from moe_lab.config import ConfigError, load_config


def sweep(name, e, a, gamma, noise, seeds=(0, 1, 2), budgets=(1e12, 4e12, 1.6e13, 6.4e13)):
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return [
        {
            "name": name,
            "seed": s,
            "budget_flops": c,
            "train_flops": c,
            "valid_loss": float(law(c, e, a, gamma) + rng.normal(0, noise)),
            "groups": {},
        }
        for c in budgets
        for s in seeds
    ]


@pytest.mark.parametrize("n", [2, 3, 8])
def test_a_paired_difference_agrees_with_scipys_paired_t_test(n):
    rng = np.random.default_rng(n)
    a, b = rng.normal(2.0, 0.1, n), rng.normal(2.05, 0.1, n)
    d = paired_difference(a, b)
    test = stats.ttest_rel(a, b)
    ci = test.confidence_interval(0.95)
    assert d["mean"] == pytest.approx(np.mean(a - b))
    assert (d["low"], d["high"]) == pytest.approx((ci.low, ci.high))
    assert d["p"] == pytest.approx(test.pvalue)
    assert d["significant"] == (ci.low > 0 or ci.high < 0)


def test_one_seed_gives_a_difference_without_a_test():
    d = paired_difference([2.0], [2.1])
    assert d["mean"] == pytest.approx(-0.1) and math.isnan(d["p"]) and not d["significant"]


def test_significance_pairs_by_seed_overall_and_per_group():
    records = [
        {"name": n, "seed": s, "budget_flops": 1.0, "valid_loss": loss + s * 0.01,
         "groups": {"domain": {"a": loss + s * 0.01, "b": 3.0}}}
        for n, loss in (("dense", 2.0), ("moe", 1.9))
        for s in (0, 1, 2)
    ]  # fmt: skip
    result = significance(records, "dense", 1.0)
    assert set(result) == {"moe"}
    overall = result["moe"]["overall"]
    assert overall["mean"] == pytest.approx(-0.1) and overall["significant"]  # every seed: -0.1
    assert result["moe"]["domain=a"]["significant"] and not result["moe"]["domain=b"]["significant"]


def test_a_fit_recovers_a_noisy_law_and_its_interval_holds_the_truth():
    records = sweep("dense", 1.7, 400.0, 0.28, noise=0.003)
    fit = fit_scaling(records)
    assert fit["E"] == pytest.approx(1.7, abs=0.1) and fit["gamma"] == pytest.approx(0.28, abs=0.05)
    study = scaling_study(records, "dense", n=100)["dense"]
    assert study["intervals"]["E"][0] <= 1.7 <= study["intervals"]["E"][1]
    assert study["intervals"]["gamma"][0] <= 0.28 <= study["intervals"]["gamma"][1]
    p10 = study["predicted"]["10x"]
    truth = float(law(p10["flops"], 1.7, 400.0, 0.28))
    assert p10["interval"][0] <= truth <= p10["interval"][1]
    assert study["band"]["low"][0] <= study["band"]["loss"][0] <= study["band"]["high"][0]


def test_two_curves_cross_where_the_algebra_says_and_parallel_ones_never():
    # E1 + A1 C^-g = E2 + A2 C^-g  <=>  C = ((A2 - A1) / (E1 - E2))^(1/g)
    f = {"E": 1.5, "A": 600.0, "gamma": 0.3}  # better floor, worse start
    g = {"E": 1.7, "A": 300.0, "gamma": 0.3}
    expected = (300.0 / 0.2) ** (1 / 0.3)
    assert crossover(f, g, 1e6, 1e15) == pytest.approx(expected, rel=1e-6)
    assert crossover(f, g, 1e6, expected / 2) is None  # not within the range searched
    assert crossover({**g, "E": 1.6}, g, 1e6, 1e15) is None  # always below


def test_the_study_predicts_a_crossover_with_an_interval_or_says_none():
    dense = sweep("dense", 1.7, 300.0, 0.3, noise=0.002)
    steeper = sweep("ens", 1.5, 3470.0, 0.3, noise=0.002)  # worse in the sweep, better from 1e14
    flat = sweep("moe", 1.68, 300.0, 0.3, noise=0.002)  # lower everywhere: nothing to cross
    study = scaling_study(dense + steeper + flat, "dense", n=60)
    cross = study["ens"]["crossover"]
    expected = (3170.0 / 0.2) ** (1 / 0.3)  # 1e14, past the largest budget (6.4e13)
    assert cross["flops"] == pytest.approx(expected, rel=0.5)
    assert cross["interval"][0] <= cross["flops"] <= cross["interval"][1] and cross["share"] > 0.9
    assert study["moe"]["crossover"]["flops"] is None and "crossover" not in study["dense"]


def test_budgets_are_one_value_a_list_or_a_geometric_sweep():
    assert BudgetConfig(train_flops=1e12).values() == [1e12]
    assert BudgetConfig(sweep=[4e12, 1e12]).values() == [1e12, 4e12]
    assert BudgetConfig(start=1e12, factor=2.0, count=3).values() == [1e12, 2e12, 4e12]
    for bad in (BudgetConfig(), BudgetConfig(train_flops=1e12, sweep=[2e12]),
                BudgetConfig(start=1e12), BudgetConfig(sweep=[1e12, -1.0]),
                BudgetConfig(train_flops=1e12, tolerance=0.0)):  # fmt: skip
        with pytest.raises(ConfigError, match="budget"):
            bad.values()


def test_run_config_keys_are_shorthand_for_base_and_one_path_is_a_list(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("budget: {train_flops: 1.0e12}\nvariants: [{name: dense}]\n")
    exp = load_experiment(path, ["data.train_files=a.jsonl", "train.lr=1e-3"])
    # compare's own default (finished jobs drop optimizer states) sits under the user's keys
    train = {"keep_optimizer": False, "lr": 1e-3}
    assert exp.base == {"data": {"train_files": "a.jsonl"}, "train": train}
    cfg = load_config(None, ["data.train_files=a.jsonl", "data.valid_files=[b.jsonl]"])
    assert cfg.data.train_files == ["a.jsonl"] and cfg.data.valid_files == ["b.jsonl"]
    (tmp_path / "run.yaml").write_text("data: {train_files: c.jsonl}\n")
    assert load_config(tmp_path / "run.yaml").data.train_files == ["c.jsonl"]


def test_a_mistyped_experiment_key_gets_a_suggestion(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("budget: {train_flops: 1.0e12}\nvariants: [{name: dense}]\n")
    with pytest.raises(ConfigError, match="'budget.train_flop'. Did you mean 'budget.train_flops'"):
        load_experiment(path, ["budget.train_flop=1e12"])
    with pytest.raises(ConfigError, match="does not fit the experiment's structure"):
        load_experiment(path, ["variants.0.overrides=[model.dim=64]"])


TRUE_ND = {"E": 1.69, "A": 406.4, "alpha": 0.34, "B": 410.7, "beta": 0.28}  # Hoffmann et al.


def nd_sweep(sizes=(1e5, 3e5, 1e6), budgets=(1e12, 4e12, 1.6e13), seeds=(0, 1, 2), noise=0.003):
    """Dense variants of several sizes: tokens from C = 6 N D, losses from the true law."""
    rng = np.random.default_rng(0)
    records = []
    for n in sizes:
        for c in budgets:
            for s in seeds:
                d = c / (6 * n)
                loss = law_nd(n, d, *TRUE_ND.values()) + rng.normal(0, noise)
                records.append({"name": f"dense-{n:.0e}", "family": "dense", "seed": s,
                                "budget_flops": c, "train_flops": c, "active_params": n,
                                "tokens": d, "valid_loss": float(loss)})  # fmt: skip
    return records


def test_an_nd_fit_recovers_a_noisy_chinchilla_law_with_intervals_holding_the_truth():
    records = nd_sweep()
    fit = fit_nd(records)
    assert fit["alpha"] == pytest.approx(0.34, abs=0.05)
    assert fit["beta"] == pytest.approx(0.28, abs=0.05)
    assert fit["E"] == pytest.approx(1.69, abs=0.15)
    study = nd_study(records + [{**records[0], "family": "moe", "name": "moe"}], n=60)
    assert list(study) == ["dense"]  # one MoE size: nothing to fit in N
    fit, iv = study["dense"]["fit"], study["dense"]["intervals"]
    for key in ("E", "alpha", "beta"):
        # seed-resampling intervals at 3 seeds are too narrow (scaling_nd's docstring): the
        # truth lies within 3 of their widths, not always inside
        assert iv[key][0] <= fit[key] <= iv[key][1], key
        assert abs(fit[key] - TRUE_ND[key]) < 3 * (iv[key][1] - iv[key][0]), key
    assert study["dense"]["variants"] == ["dense-1e+05", "dense-1e+06", "dense-3e+05"]


def test_the_compute_optimal_size_minimises_the_fitted_loss_on_a_grid():
    c = 1e18
    n_opt, d_opt = optimal_size(TRUE_ND, c)
    assert 6 * n_opt * d_opt == pytest.approx(c)
    grid = np.geomspace(n_opt / 30, n_opt * 30, 20001)
    losses = law_nd(grid, c / (6 * grid), *TRUE_ND.values())
    assert grid[np.argmin(losses)] == pytest.approx(n_opt, rel=1e-3)


def test_an_nd_fit_refuses_a_single_size():
    with pytest.raises(ValueError, match="2\\+ sizes"):
        fit_nd(nd_sweep(sizes=(1e5,)))


def test_the_report_section_gives_each_sized_family_its_fit_and_optimal_size():
    study = nd_study(nd_sweep(), n=20)
    lines = "\n".join(nd_section(study))
    row = next(line for line in lines.splitlines() if line.startswith("| dense ("))
    n_opt = study["dense"]["optimal"]["1x"]["params"]
    assert f"{study['dense']['fit']['alpha']:.3f}" in row and f"{n_opt:.3g}" in row
    assert nd_section({}) == []


def test_a_field_with_many_values_shows_those_with_the_most_validation_tokens():
    langs = [f"l{i:02d}" for i in range(20)]
    record = {"groups": {"domain": {"code": 2.0, "legal": 3.0}, "lang": dict.fromkeys(langs, 1.0)},
              "group_tokens": {"domain": {"code": 5, "legal": 9},
                               "lang": {g: 100 - i for i, g in enumerate(langs)}}}  # fmt: skip
    shown, hidden = group_columns([record])
    assert shown == [("domain", "code"), ("domain", "legal"), *(("lang", g) for g in langs[:16])]
    assert hidden == {"lang": 4}
    record["group_tokens"]["lang"]["l19"] = 1000  # the largest is shown, the 16th largest goes
    assert ("lang", "l19") in group_columns([record])[0]
    assert ("lang", "l15") not in group_columns([record])[0]
