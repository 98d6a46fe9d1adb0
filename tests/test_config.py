import pytest

from moe_lab.config import (
    Config,
    ConfigError,
    ModelConfig,
    RopeScalingConfig,
    load_config,
    load_model_preset,
    model_presets,
    save_config,
)


def test_defaults_are_valid_and_are_the_cpu_tiny_shape_with_full_attention():
    cfg = load_config()
    assert cfg == Config()
    assert load_model_preset("cpu-tiny") == ModelConfig(n_kv_heads=2)


def test_overrides_are_typed_and_applied_last(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  n_layers: 3\n  rope_theta: 5.0e5\n")
    cfg = load_config(path, ["model.n_layers=5", "model.tie_embeddings=true"])
    assert cfg.model.n_layers == 5
    assert cfg.model.rope_theta == 500000.0
    assert cfg.model.tie_embeddings is True
    assert isinstance(cfg.model, ModelConfig)


def test_evaluation_batches_default_to_the_training_micro_batch():
    assert load_config(overrides=["train.batch_size=3"]).train.eval_batch == 3
    cfg = load_config(overrides=["train.batch_size=3", "train.eval_batch_size=32"])
    assert cfg.train.eval_batch == 32


def test_round_trip_through_yaml_is_identical(tmp_path):
    cfg = load_config(overrides=["model=llama3-405b", "model.n_layers=2"])
    assert cfg.model.rope_scaling == RopeScalingConfig()
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_preset_in_file_is_refined_by_file_keys_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: llama2-70b\n")
    cfg = load_config(path, ["model.n_layers=2"])
    assert (cfg.model.dim, cfg.model.n_kv_heads, cfg.model.n_layers) == (8192, 8, 2)
    preset_file = tmp_path / "mine.yaml"
    preset_file.write_text("dim: 32\nn_heads: 2\n")
    assert load_config(overrides=[f"model={preset_file}"]).model.dim == 32


def test_every_listed_preset_loads():
    names = model_presets()
    for required in [
        "llama1-7b",
        "llama1-13b",
        "llama1-33b",
        "llama1-65b",
        "llama2-7b",
        "llama2-13b",
        "llama2-70b",
        "llama3-8b",
        "llama3-70b",
        "llama3-405b",
        "cpu-tiny",
    ]:
        assert required in names
    for name in names:
        load_model_preset(name).validate()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["model.dim=120", "model.n_heads=12", "model.n_kv_heads=5"],
            r"model\.n_heads \(12\) must be divisible by model\.n_kv_heads \(5\)",
        ),
        (["model.n_heads=5"], r"model\.dim \(64\) must be divisible by model\.n_heads \(5\)"),
        (["model.dim=24", "model.n_heads=8"], r"head_dim 3"),
        (["model.n_layers=0"], r"model\.n_layers must be a positive integer, got 0"),
        (["model.rope_theta=-1"], r"model\.rope_theta must be a positive finite number, got -1"),
        (["model.norm_eps=0"], r"model\.norm_eps"),
        (["model.dim=abc"], r"model\.dim: Value 'abc'.*Integer"),
        (["model.tie_embeddings=maybe"], r"model\.tie_embeddings"),
        (
            ["model.n_head=3"],
            r"unknown config key 'model\.n_head'\. Did you mean 'model\.n_heads'\?",
        ),
        (["model.rope_scaling.fctor=2"], r"Did you mean 'model\.rope_scaling\.factor'\?"),
        (["model.rope_scaling.low_freq_factor=4"], r"high_freq_factor \(4\.0\) must exceed"),
        (["training=1"], r"unknown config key 'training'"),
        (["model=llama3-8"], r"unknown preset 'llama3-8'\. Did you mean llama3-8b"),
        (["model.dim"], r"not of the form key=value"),
        (["run.device=gpu"], r"run\.device must be auto, cpu, cuda or cuda:N; got 'gpu'"),
        (["train.eval_batch_size=0"], r"train\.eval_batch_size must be a positive integer, got 0"),
        (["train.spike_window=1"], r"train\.spike_window must be >= 2"),
        (["run.seed=-1"], r"run\.seed must be in \[0, 2\*\*32\); got -1"),
        (
            ["model.moe.num_experts=4", "parallel.ep=true"],
            r"parallel\.ep=true .* needs parallel\.dp=ddp or fsdp2",
        ),
        (["parallel.ep_degree=2"], r"parallel\.ep_degree is set but parallel\.ep is false"),
        (
            ["model.moe.backend=megablocks", "model.moe.capacity_factor=1.25"],
            r"model\.moe\.backend=megablocks runs MegaBlocks' dropless dMoE: set "
            r"model\.moe\.capacity_factor=null",
        ),
    ],
)
def test_invalid_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_missing_file_and_bad_python_values_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"model\.dim must be a positive integer, got '64'"):
        ModelConfig(dim="64").validate()


def test_the_shipped_experiments_and_policy_load():
    from moe_lab.compare import load_experiment
    from moe_lab.config import PRESET_DIR
    from moe_lab.data.policy import AccessPolicy

    experiments = PRESET_DIR.parent / "experiments"
    ifc = load_config(experiments / "ifc.yaml")
    assert ifc.model.moe is not None and ifc.ifc.policy == "ifc_policy.yaml"
    policy = AccessPolicy.load(experiments / ifc.ifc.policy)
    domains = list(ifc.ifc.domains)
    assert policy.permitted("admin", ifc.ifc.public, domains) == [ifc.ifc.public, *domains]
    xelm = load_config(experiments / "xelm.yaml")
    assert xelm.xelm.add == ["pt"] and "pt" not in xelm.xelm.languages
    default = load_experiment(experiments / "default.yaml")
    families = {v.family for v in default.variants}
    assert {"dense", "moe", "cbtm"} <= families


@pytest.mark.parametrize("name", ["xelm-compare.yaml", "ifc-compare.yaml"])
def test_the_shipped_xelm_and_ifc_comparisons_plan_within_their_budget(name, tmp_path):
    """moe-lab compare versions of xelm.yaml and ifc.yaml: every variant fits the budget."""
    from moe_lab.compare import load_experiment
    from moe_lab.compare.plan import plan
    from moe_lab.config import PRESET_DIR

    exp = load_experiment(PRESET_DIR.parent / "experiments" / name, [f"dir={tmp_path}"])
    plans = plan(exp, tmp_path)
    assert {v.family for v in exp.variants} == {"dense", name.split("-")[0]}
    assert set(plans) == {v.name for v in exp.variants}
