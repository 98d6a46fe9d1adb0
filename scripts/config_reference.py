"""Write docs/configuration.md from the schemas: python scripts/config_reference.py"""

from pathlib import Path

from moe_lab.compare.experiment import ExperimentConfig
from moe_lab.config import Config
from moe_lab.config.reference import render

SCHEMAS = {
    "Run configuration (`moe-lab train`, ...)": Config,
    "Experiment file (`moe-lab compare`)": ExperimentConfig,
}
OUT = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"

if __name__ == "__main__":
    OUT.write_text(render(SCHEMAS))
    print(f"wrote {OUT}")
