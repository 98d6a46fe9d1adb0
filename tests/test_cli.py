import json
import subprocess
import sys

import pytest


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
    again = subprocess.run(  # a rerun continues the finished runs: nothing trains again
        [sys.executable, "examples/dense_vs_moe.py", "--flops", "3e10", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.split("per domain\n", 1)[1] == table


def test_train_eval_generate_on_a_users_jsonl(tmp_path, lang_files, capsys):
    """Training in a real process; evaluation and generation in this one (moe_lab.cli.main)."""
    from moe_lab.cli import main

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
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    assert "lang=de" in (stdout := capsys.readouterr().out) and "lang=en" in stdout
    report = json.loads((run / "eval.json").read_text())
    assert report["step"] == 3 and set(report["valid"]["groups"]["lang"]) == {"de", "en"}
    assert main(["generate", str(run), "--prompt", "the cat", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("the cat")
    assert main(["generate", str(run), "--prompt", "x", "--top-p", "0"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "top_p" in err


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


def test_eval_tasks_adds_few_shot_accuracy_for_a_run_and_an_experts_directory(
    tmp_path, lang_files, capsys
):
    from moe_lab.cli import main
    from moe_lab.data.tokenizer import ByteTokenizer
    from moe_lab.ensembles.scoring import EnsembleScorer
    from moe_lab.eval.fewshot import evaluate_task, load_task
    from moe_lab.eval.scoring import TransformerScorer
    from tests.conftest import write_jsonl
    from tests.tiny import write_experts, write_run

    data = [f"data.train_files=[{lang_files[0]}]", f"data.valid_files=[{lang_files[1]}]"]
    data += ["data.group_fields=[lang]", "model.max_seq_len=256"]  # a corpus-cloze item fits
    items = [
        {"query": f"the {w} sat on the", "choices": ["mat", "dog", "straße"], "label": i % 3}
        for i, w in enumerate(["cat", "dog", "hund", "katze", "mat", "sun"])
    ]
    for r, lang in zip(items, ["en", "en", "de", "de", "en", "de"], strict=True):
        r["lang"] = lang
    task = write_jsonl(tmp_path / "sat.jsonl", items)
    model = write_run(tmp_path / "run", *data)
    experts = write_experts(tmp_path / "x", 2, *data, "ensemble.routing=uniform")
    tok = ByteTokenizer()
    from moe_lab.ensembles.ensemble import ExpertEnsemble
    from moe_lab.ensembles.scoring import FixedRouting

    scorers = {
        "run": TransformerScorer(model, tok),
        "x": EnsembleScorer(ExpertEnsemble(experts), FixedRouting.uniform(2), tok),
    }
    for name, scorer in scorers.items():
        args = ["eval", str(tmp_path / name), "--tasks", str(task), "--shots", "1"]
        assert main(args) == 0
        report = json.loads((tmp_path / name / "eval.json").read_text())
        assert "valid" in report and set(report["fewshot"]) == {"sat"}
        expected = evaluate_task(scorer, load_task(task), shots=1)
        assert report["fewshot"]["sat"] == {"file": str(task), **expected}
        assert set(report["fewshot"]["sat"]["groups"]["lang"]) == {"de", "en"}
        assert "sat" in capsys.readouterr().out
    args = [
        "eval",
        str(tmp_path / "run"),
        "--tasks",
        "corpus-cloze",
        "--shots",
        "1",
        "--limit",
        "8",
    ]
    assert main(args) == 0
    cloze = json.loads((tmp_path / "run" / "eval.json").read_text())["fewshot"]["corpus-cloze"]
    assert cloze["n"] == 8 and cloze["truncated"] > 0  # 1 shot overflows 256 tokens
    assert "domain=code" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "run"), "--tasks", str(tmp_path / "no.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_only_moe_labs_info_lines_reach_the_console(capsys):
    import logging

    from moe_lab.cli import _configure_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    root.handlers = [logging.StreamHandler()]  # where basicConfig would print (stderr)
    try:
        _configure_logging(verbose=False)
        logging.getLogger("faiss.loader").info("Loading faiss with AVX512 support.")
        logging.getLogger("moe_lab.compare.run").info("job 2 of 8")
        logging.getLogger("datasets").warning("a real warning")
    finally:
        root.handlers, level = saved
        root.setLevel(level)
    err = capsys.readouterr().err
    assert "AVX512" not in err and "job 2 of 8" in err and "a real warning" in err


def test_mistyped_subcommands_and_flags_get_a_suggestion(capsys):
    from moe_lab.cli import main

    with pytest.raises(SystemExit):
        main(["trian"])
    assert "did you mean 'train'?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--max-steps", "5"])
    assert "train.max_steps=...?" in capsys.readouterr().err


def test_an_interrupted_command_says_how_to_resume(monkeypatch, capsys):
    import moe_lab.cli as cli

    def interrupted(args):
        """Stopped by Ctrl-C."""
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "train", (interrupted, cli.COMMANDS["train"][1]))
    assert cli.main(["train", "train.max_steps=1"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "run.resume=true" in err and "Traceback" not in err


def test_the_readme_quickstart_runs_as_written(tmp_path):
    """The first commands of the README's command-line quickstart, in order, in a fresh folder."""
    import re
    import shlex
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = readme.split("## Quickstart: the command line", 1)[1].split("```bash\n", 1)[1]
    commands = block.split("\n\n", 1)[0].splitlines()  # up to the first blank line
    assert [c.split()[1] for c in commands] == ["train", "eval", "generate", "train", "export"]
    for command in commands:
        argv = shlex.split(re.sub(r"\s+#.*$", "", command))[1:]
        out = subprocess.run(
            [sys.executable, "-m", "moe_lab", *argv], cwd=tmp_path, capture_output=True, text=True
        )
        assert out.returncode == 0, (command, out.stderr[-2000:])
    assert (tmp_path / "runs" / "mine" / "checkpoints" / "step-00000300").is_dir()
    assert (tmp_path / "runs" / "mine-hf" / "tokenizer.json").is_file()
