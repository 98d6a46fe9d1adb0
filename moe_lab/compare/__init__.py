"""``moe-lab compare``: every variant trained to one training-FLOP budget, one report.

:mod:`~moe_lab.compare.experiment` (the experiment file), :mod:`~moe_lab.compare.plan` (what each
variant reaches, refused when incomparable), :mod:`~moe_lab.compare.run` (resumable jobs, through
the family registry), :mod:`~moe_lab.compare.report`, :mod:`~moe_lab.compare.scaling` and
:mod:`~moe_lab.compare.plots`.
"""

from moe_lab.compare.experiment import ExperimentConfig, VariantConfig, load_experiment
from moe_lab.compare.plan import plan
from moe_lab.compare.report import report_markdown
from moe_lab.compare.run import run_compare, run_variant
from moe_lab.compare.scaling import fit_scaling

__all__ = [
    "ExperimentConfig",
    "VariantConfig",
    "fit_scaling",
    "load_experiment",
    "plan",
    "report_markdown",
    "run_compare",
    "run_variant",
]
