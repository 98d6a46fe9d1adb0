import json

import numpy as np

from moe_lab.cli import main
from moe_lab.eval.knnlm import DEFAULT_GRID, Datastore
from tests.test_knnlm import _one_thread  # noqa: F401


def test_knn_build_eval_and_optout_on_a_run(tmp_path, lang_files, capsys):
    train_file, valid_file = lang_files
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                f"data.train_files=[{train_file}]",
                f"data.valid_files=[{valid_file}]",
                "data.group_fields=[lang]",
                "train.max_steps=3",
                "train.seq_len=32",
                "train.progress=false",
                f"run.dir={run}",
            ]
        )
        == 0
    )
    assert main(["knn", "build", str(run), "--index", "flat"]) == 0
    ds = Datastore(run / "knn")
    assert ds.manifest["indexes"].keys() == {"flat"} and ds.manifest["seq_len"] == 32

    assert main(["eval", str(run), "--knn"]) == 0
    assert "kNN-LM (flat" in capsys.readouterr().out
    report = json.loads((run / "eval.json").read_text())
    knn = report["knn"]
    tuned = knn["tuned"]
    assert tuned["lambda"] in DEFAULT_GRID["lambdas"] and tuned["k"] in DEFAULT_GRID["ks"]
    assert set(knn["tune_docs"]).isdisjoint(knn["report_docs"])
    assert (
        len(knn["tune_docs"]) + len(knn["report_docs"]) == report["valid"]["overall"]["documents"]
    )
    for part in ("lm", "knn"):  # both on the reported documents only, per group
        assert knn[part]["overall"]["documents"] == len(knn["report_docs"])
        assert set(knn[part]["groups"]["lang"]) == {"de", "en"}
    assert knn["knn"]["overall"]["loss"] <= knn["lm"]["overall"]["loss"]  # λ = 0 is in the grid

    assert main(["knn", "optout", str(run), "--where", "lang=de", "--doc", "1"]) == 0
    after = Datastore(run / "knn")
    assert set(after.entry_groups("lang")) == {"en"} and 1 not in set(after.docs)
    assert after.index("flat").ntotal == after.n_entries < ds.n_entries
    assert main(["knn", "optout", str(run)]) == 2  # nothing named: a clear error, no traceback
    assert "--doc N or --where" in capsys.readouterr().err
    assert main(["eval", str(run)]) == 0  # without --knn an earlier knn section is dropped
    assert "knn" not in json.loads((run / "eval.json").read_text())
    assert np.isfinite(report["valid"]["overall"]["loss"])
