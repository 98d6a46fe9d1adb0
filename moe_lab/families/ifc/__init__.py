"""Information-flow control: one expert per security domain, experts run only when a policy allows.

Tiwari et al. 2023 ("Information Flow Control in Machine Learning through Modular Model
Architecture") limit the influence of each security domain's training data to one expert and let an
access-control policy decide which experts run. moe_lab implements both forms of a domain expert
with one policy API: an FFN expert inside MoE layers (``ifc.form=moe``) and a whole expert LM in an
ensemble (``ifc.form=ensemble``). See :mod:`moe_lab.families.ifc.pipeline` for the training phases
and the guarantees, :mod:`moe_lab.data.policy` for policies and provenance.
"""

from moe_lab.data.policy import AccessPolicy, PolicyError
from moe_lab.families.ifc.pipeline import IFCModel, discover_domains, load_ifc, train_ifc
from moe_lab.families.ifc.scope import ExpertScope, expert_rows, restrict_experts

__all__ = [
    "AccessPolicy",
    "ExpertScope",
    "IFCModel",
    "PolicyError",
    "discover_domains",
    "expert_rows",
    "load_ifc",
    "restrict_experts",
    "train_ifc",
]
