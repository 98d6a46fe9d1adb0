"""Malformed input a user can hand over gets one line naming the file (and the line), never a
bare traceback from zlib, PyYAML or datasets."""

import gzip
import json

import pytest

from moe_lab import cli
from moe_lab.compare.experiment import load_experiment
from moe_lab.config import ConfigError, load_config
from moe_lab.data.documents import DataError, load_documents
from moe_lab.data.policy import AccessPolicy, PolicyError
from tests.tiny import write_run

RECORDS = [{"text": f"record number {i} " * 10} for i in range(300)]


def _jsonl(records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        ("truncated", r"data.jsonl.gz: the compressed file is damaged or cut short after line \d+"),
        ("corrupt", r"data.jsonl.gz: the compressed file is damaged or cut short"),
    ],
)
def test_a_damaged_gzip_file_is_named(tmp_path, damage, match):
    data = bytearray(gzip.compress(_jsonl(RECORDS)))
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data[40:80] = b"\x00" * 40
    path = tmp_path / "data.jsonl.gz"
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=match):
        load_documents([str(path)], "text", [])


def test_a_bad_json_line_is_named_with_its_line_number(tmp_path):
    lines = _jsonl(RECORDS).decode().splitlines()
    lines[57] = '{"text": "cut'
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"data.jsonl, line 58: not valid JSON"):
        load_documents([str(path)], "text", [])


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("train:\n  lr: [1, 2\n", r"bad.yaml, line 3: not valid YAML"),
        ("train: {lr: 1\n", r"bad.yaml, line 2: not valid YAML"),
        ("- model\n- train\n", r"bad.yaml must hold a mapping of config sections, not a list"),
    ],
)
def test_a_malformed_config_or_experiment_file_is_named(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(path)
    with pytest.raises(ConfigError, match=match):
        load_experiment(path)


def test_a_malformed_policy_file_is_named(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("principals:\n  alice: [legal\n")
    with pytest.raises(PolicyError, match=r"access policy .*policy.yaml, line \d+: not valid YAML"):
        AccessPolicy.load(path)


def test_a_prompt_that_is_not_utf8_is_one_line(tmp_path, capsys):
    write_run(tmp_path / "run")
    prompt = b"ab\xff".decode("utf-8", "surrogateescape")  # how such bytes arrive in sys.argv
    assert cli.main(["generate", str(tmp_path / "run"), "--prompt", prompt]) == 2
    err = capsys.readouterr().err
    assert "--prompt is not valid UTF-8 text (an undecodable byte at character 2)" in err
