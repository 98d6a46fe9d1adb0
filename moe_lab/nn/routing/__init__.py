"""What decides: token routers and their losses (later also sequence routers, access policies)."""

from moe_lab.nn.routing.losses import LBL_FORMS, load_balancing_loss, moe_aux_loss, z_loss
from moe_lab.nn.routing.topk import RouterStats, TopKRouter

__all__ = [
    "LBL_FORMS",
    "RouterStats",
    "TopKRouter",
    "load_balancing_loss",
    "moe_aux_loss",
    "z_loss",
]
