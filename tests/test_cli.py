import json
import subprocess
import sys


def _run(*args):
    return subprocess.run([sys.executable, "-m", "moe_lab", *args], capture_output=True, text=True)


def test_info_prints_resolved_config_and_accounting(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: llama2-7b\n")
    out = _run("info", "--config", str(cfg), "model.n_layers=2", "--seq-len", "16")
    assert out.returncode == 0, out.stderr
    assert "n_layers: 2" in out.stdout and "dim: 4096" in out.stdout
    counts = json.loads(out.stdout.split("# accounting (moe_lab.accounting.estimate)\n")[1])
    assert counts["seq_len"] == 16
    assert (
        counts["total_params"]
        == 2 * 32000 * 4096 + 2 * (4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096) + 4096
    )


def test_config_error_is_one_clear_line_and_exit_code_2():
    out = _run("info", "model.n_kv_heads=3")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "model.n_heads (4) must be divisible by model.n_kv_heads (3)" in out.stderr


def test_presets_lists_every_preset():
    out = _run("presets")
    assert out.returncode == 0
    assert "llama3-405b" in out.stdout and "405,853,388,800" in out.stdout


def test_dense_vs_moe_example_runs_at_equal_flops(tmp_path):
    out = subprocess.run(
        [sys.executable, "examples/dense_vs_moe.py", "--flops", "3e10", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    table = out.stdout.split("per domain\n", 1)[1]
    rows = [line.split() for line in table.splitlines() if line.strip()]
    assert [r[0] for r in rows] == ["dense", "moe-8x-top2"]
    flops = [float(r[1]) for r in rows]
    assert all(f <= 3e10 for f in flops) and min(flops) > 0.9 * 3e10


def test_train_eval_generate_on_a_users_jsonl(tmp_path, lang_files):
    train_file, valid_file = lang_files
    run = tmp_path / "run"
    out = _run(
        "train",
        f"data.train_files=[{train_file}]",
        f"data.valid_files=[{valid_file}]",
        "data.group_fields=[lang]",
        "train.max_steps=3",
        "train.seq_len=32",
        "train.progress=false",
        f"run.dir={run}",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    out = _run("eval", str(run))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "lang=de" in out.stdout and "lang=en" in out.stdout
    report = json.loads((run / "eval.json").read_text())
    assert report["step"] == 3 and set(report["valid"]["groups"]["lang"]) == {"de", "en"}
    out = _run("generate", str(run), "--prompt", "the cat", "--max-new-tokens", "5")
    assert out.returncode == 0 and out.stdout.startswith("the cat")
    bad = _run("generate", str(run), "--prompt", "x", "--top-p", "0")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "top_p" in bad.stderr


def test_ifc_serving_example_runs(tmp_path):
    out = subprocess.run(
        [sys.executable, "examples/ifc_serving.py", "--steps", "16", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line.split() for line in out.stdout.splitlines() if "legal loss" in line]
    assert [(r[0], r[2]) for r in lines] == [
        ("guest", "literature"),
        ("lawyer", "literature+legal"),
    ]
