"""Reading ``metrics.jsonl``: one JSON object per line, appended while training."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["read_metrics"]


def read_metrics(path: Path) -> list[dict]:
    """All complete records; a torn last line (a run killed mid-write) is dropped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
