"""Damaged artefacts are errors naming the file: checkpoints (weights, optimizer, RNG, state),
tokenizers, clusterers and kNN datastores carry checksums recorded at write and verified at load;
a checkpoint written before checksums existed is still refused when cut short or non-finite."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from moe_lab import checksums
from moe_lab.checksums import ChecksumError
from moe_lab.data.tokenizer import load_tokenizer, train_bpe
from moe_lab.ensembles.clustering.clusterer import Clusterer
from moe_lab.eval.knnlm.datastore import Datastore, build_datastore
from moe_lab.store.checkpoint import latest_checkpoint, load_run, read_training_state
from tests.test_knnlm import SEQ_LEN, make_docs, make_store
from tests.test_knnlm import tiny_model as knn_model
from tests.tiny import write_run


def _flip_bits(path, n, seed=0):
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(seed)
    header = 8 + int.from_bytes(data[:8], "little")  # safetensors: leave the header parseable
    for i in rng.choice(np.arange(header, len(data)), size=n, replace=False):
        data[i] ^= 1 << int(rng.integers(8))
    path.write_bytes(bytes(data))


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "moe_lab", *args], capture_output=True, text=True, timeout=300
    )


def test_flipped_bits_in_the_weights_stop_eval_with_the_file_named(tmp_path):
    run = tmp_path / "run"
    write_run(run)
    weights = latest_checkpoint(run / "checkpoints") / "model.safetensors"
    _flip_bits(weights, 100)
    out = _cli("eval", str(run))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"{weights} is damaged" in out.stderr
    assert not (run / "eval.json").exists()


@pytest.mark.parametrize("damage", ["0xff", "truncated"])
def test_a_checkpoint_without_checksums_is_still_refused_when_damaged(tmp_path, damage):
    """Runs written before checksums: a cut-short file cannot be read, 0xFF bytes read as NaN."""
    run = tmp_path / "run"
    write_run(run)
    ckpt = latest_checkpoint(run / "checkpoints")
    (ckpt / checksums.MANIFEST).unlink()
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "truncated":
        weights.write_bytes(bytes(data[: len(data) // 2]))
        match = "cannot be read .* damaged or cut short"
    else:
        data[-400:] = b"\xff" * 400  # NaN in float32
        weights.write_bytes(bytes(data))
        match = "holds non-finite values"
    with pytest.raises(ChecksumError, match=f"model.safetensors {match}"):
        load_run(run)


@pytest.mark.parametrize("name", ["state.json", "rng.safetensors"])
def test_a_damaged_training_state_is_refused(tmp_path, name):
    run = tmp_path / "run"
    write_run(run)
    ckpt = latest_checkpoint(run / "checkpoints")
    path = ckpt / name
    if name == "state.json":
        path.write_text(json.dumps({**json.loads(path.read_text()), "step": 7}))
    else:
        _flip_bits(path, 3)
    with pytest.raises(ChecksumError, match=f"{name} is damaged"):
        read_training_state(ckpt)


def test_a_changed_tokenizer_is_refused(tmp_path):
    tok = train_bpe(iter(["the cat sat on the mat"] * 20), 300)
    tok.save(tmp_path / "tok")
    assert load_tokenizer(tmp_path / "tok").encode("the cat") == tok.encode("the cat")
    vocab = tmp_path / "tok" / "tokenizer.json"
    vocab.write_text(vocab.read_text().replace('"the"', '"teh"'))
    with pytest.raises(ChecksumError, match="tokenizer.json is damaged"):
        load_tokenizer(tmp_path / "tok")


def test_an_unreadable_tokenizer_file_is_a_clear_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"version": ')
    with pytest.raises(ValueError, match="tokenizer.json is not a readable tokenizer.json"):
        load_tokenizer(tmp_path / "tokenizer.json")
    pytest.importorskip("sentencepiece")
    (tmp_path / "bad.model").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="bad.model is not a readable sentencepiece model"):
        load_tokenizer(tmp_path / "bad.model")


def test_a_changed_clusterer_is_refused(tmp_path):
    texts = [d["text"] for d in make_docs(30, 0)]
    clusterer = Clusterer(3, n_components=4, seed=0)
    clusterer.fit(texts)
    clusterer.save(tmp_path / "c")
    centroids = tmp_path / "c" / "centroids.npy"
    np.save(centroids, np.load(centroids) + 1e-3)
    with pytest.raises(ChecksumError, match="centroids.npy is damaged"):
        Clusterer.load(tmp_path / "c")


def test_a_changed_datastore_is_refused(tmp_path):
    store = make_store(tmp_path, make_docs(6, 0), "train")
    build_datastore(knn_model(), store, tmp_path / "ds", seq_len=SEQ_LEN)
    Datastore(tmp_path / "ds")  # intact
    vals = tmp_path / "ds" / "vals.npy"
    changed = np.load(vals)
    changed[0] += 1
    np.save(vals, changed)
    with pytest.raises(ChecksumError, match="vals.npy is damaged"):
        Datastore(tmp_path / "ds")


def test_checksums_follow_deliberate_changes(tmp_path):
    """Files the library replaces on purpose keep verifying; others do not."""
    save_file({"w": torch.ones(2)}, tmp_path / "a.safetensors")
    (tmp_path / "b.json").write_text("{}")
    checksums.record(tmp_path)
    checksums.verify(tmp_path)
    save_file({"w": torch.zeros(2)}, tmp_path / "a.safetensors")
    with pytest.raises(ChecksumError, match="a.safetensors is damaged"):
        checksums.verify(tmp_path)
    checksums.add(tmp_path / "a.safetensors")
    checksums.verify(tmp_path)
    (tmp_path / "b.json").unlink()
    with pytest.raises(FileNotFoundError, match="b.json is missing"):
        checksums.verify(tmp_path)
    checksums.forget(tmp_path, ["b.json"])
    checksums.verify(tmp_path)
