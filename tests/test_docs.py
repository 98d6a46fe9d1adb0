"""The docs stay true: the configuration reference matches the schemas, every relative link in
README.md and docs/ points at a file that exists, and the package's layers import downward only."""

import ast
import re
from pathlib import Path

from moe_lab.config.reference import field_comments, render
from scripts.config_reference import OUT, SCHEMAS

ROOT = Path(__file__).resolve().parent.parent
# Bottom to top: a module may import only from its own layer or the ones before it.
LAYERS = ["config", "checksums", "accounting", "hardware", "budget", "nn", "data", "store", "eval",
          "ensembles", "train", "families", "compare", "interop", "cli"]  # fmt: skip


def test_the_configuration_reference_is_current():
    assert OUT.read_text() == render(SCHEMAS), "run: python scripts/config_reference.py"


def test_field_comments_come_from_the_source():
    from moe_lab.config import ModelConfig

    comments = field_comments(ModelConfig)
    assert comments["dim"] == "residual stream width"
    assert comments["rope_theta"].startswith("RoPE base; Llama 3 uses 500000")  # the line above


def test_relative_links_in_the_docs_resolve():
    broken = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if not target.startswith(("http://", "https://", "mailto:")):
                if not (doc.parent / target).exists():
                    broken.append(f"{doc.name}: {target}")
    assert not broken


def _layer(module: str) -> int:
    return LAYERS.index(module.split(".")[1])


def test_layers_import_only_downward():
    upward = []
    for path in sorted((ROOT / "moe_lab").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if len(parts) < 2 or parts[1] in ("__init__", "__main__"):
            continue
        me = ".".join(parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("moe_lab."):
                if _layer(node.module) > _layer(me):
                    upward.append(f"{me} imports {node.module}")
    assert not upward
